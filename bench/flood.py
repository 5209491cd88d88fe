"""A flood of concurrent requests against an OpenAI-compatible chat endpoint: streamed, non-streamed
and abandoned ones at once (`specdec bench-serve --flood`, and the suite's flood test).

Every request reports how it ended (``answered``, ``refused`` with 429 and a ``Retry-After``,
``abandoned`` by its client, ``failed``), its answer when it has one, and its seconds.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass

import httpx

KINDS = ("streamed", "plain", "abandoned-stream", "abandoned-plain")


@dataclass(frozen=True)
class FloodResult:
    """One request of a flood."""

    kind: str
    question: str
    outcome: str  # answered | refused | abandoned | failed
    answer: str | None
    seconds: float
    detail: str = ""


def rss_bytes() -> int:
    """This process's resident memory (Linux)."""
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmRSS:"))


async def _one(client: httpx.AsyncClient, url: str, model: str, kind: str, question: str, max_tokens: int,
               abandon_after: float) -> FloodResult:
    body = {"model": model, "messages": [{"role": "user", "content": question}], "max_tokens": max_tokens,
            "temperature": 0, "stream": kind in ("streamed", "abandoned-stream")}
    started = time.monotonic()

    def done(outcome: str, answer: str | None = None, detail: str = "") -> FloodResult:
        return FloodResult(kind, question, outcome, answer, time.monotonic() - started, detail)

    if kind == "abandoned-plain":  # the client gives up before the answer can come
        try:
            response = await asyncio.wait_for(client.post(url, json=body), timeout=abandon_after)
        except asyncio.TimeoutError:
            return done("abandoned")
        return done("refused" if response.status_code == 429 else "answered-early")
    async with client.stream("POST", url, json=body) as response:
        if response.status_code == 429:
            retry = response.headers.get("retry-after", "")
            return done("refused" if retry.isdigit() else "failed", detail=f"429 without Retry-After: {retry!r}")
        if response.status_code != 200:
            return done("failed", detail=f"{response.status_code}: {(await response.aread())[:200]!r}")
        if kind == "abandoned-stream":
            async for _ in response.aiter_lines():
                break  # leaves after the first event
            return done("abandoned")
        if kind == "plain":
            return done("answered", json.loads(await response.aread())["choices"][0]["message"]["content"])
        pieces = []
        async for line in response.aiter_lines():
            if line.startswith("data: {"):
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    return done("failed", detail=str(chunk["error"]))
                pieces.append(chunk["choices"][0]["delta"].get("content") or "")
        return done("answered", "".join(pieces))


async def _flood(url: str, model: str, questions: list[str], requests: int, max_tokens: int, timeout: float,
                 abandon_after: float) -> list[FloodResult]:
    limits = httpx.Limits(max_connections=requests, max_keepalive_connections=0)
    async with httpx.AsyncClient(timeout=timeout, limits=limits) as client:
        jobs = [(KINDS[i % len(KINDS)], questions[i % len(questions)]) for i in range(requests)]

        async def guarded(kind: str, question: str) -> FloodResult:
            started = time.monotonic()
            try:
                return await _one(client, url, model, kind, question, max_tokens, abandon_after)
            except httpx.HTTPError as err:  # a timeout or a refused connection: the flood's failure
                return FloodResult(kind, question, "failed", None, time.monotonic() - started, repr(err))

        return await asyncio.gather(*(guarded(kind, question) for kind, question in jobs))


def flood(url: str, model: str, questions: list[str], requests: int, max_tokens: int = 24, timeout: float = 300.0,
          abandon_after: float = 0.05) -> list[FloodResult]:
    """``requests`` concurrent chat completions against ``url`` (a ``/v1/chat/completions``
    address), a quarter of each kind of `KINDS`, cycling through ``questions``; each client gives
    up after ``timeout`` seconds, an abandoning non-streamed one after ``abandon_after``."""
    return asyncio.run(_flood(url, model, questions, requests, max_tokens, timeout, abandon_after))


class ServeProcess:
    """`specdec serve` in a process of its own on a free loopback port (its memory is its own)."""

    def __init__(self, model_path: str | None, dtype: str, device: str, drafter: str, max_queued: int,
                 name: str, log_path: str) -> None:
        import socket
        import subprocess
        import sys

        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.root = f"http://127.0.0.1:{self.port}"
        self.url = f"{self.root}/v1/chat/completions"
        args = [sys.executable, "-m", "specdec.cli", "serve", "--port", str(self.port), "--dtype", dtype,
                "--device", device, "--drafter", drafter, "--max-queued", str(max_queued),
                "--served-model-name", name, *(["--model", model_path] if model_path else [])]
        self.log = open(log_path, "w")
        self.process = subprocess.Popen(args, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 600
        while True:  # 503 while the model loads, then 200
            try:
                if httpx.get(f"{self.root}/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"specdec serve did not become ready (see {log_path})")
            time.sleep(0.2)

    def rss_bytes(self) -> int:
        with open(f"/proc/{self.process.pid}/status") as status:
            return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmRSS:"))

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(30)
        except Exception:
            self.process.kill()
        self.log.close()


def run_flood(model_path: str | None, dtype: str, device: str, drafter: str, max_queued: int, prompts: list[str],
              requests: int, max_tokens: int, timeout: float) -> dict:
    """Flood a fresh `specdec serve`: a greedy answer before; a warm-up of 16 concurrent requests
    (the server's first batched forwards allocate what they keep: oneDNN kernels for each batch
    shape, Python's arenas), with the server's RSS before and after it; the flood with the RSS
    sampled throughout; then (once ``/health`` shows nothing running or queued) the server's state,
    its KV cache from ``/metrics``, and the same greedy question again."""
    import statistics
    import tempfile
    import threading

    name = "flood-model"
    with tempfile.NamedTemporaryFile(prefix="specdec-serve-", suffix=".log", delete=False) as log:
        log_path = log.name
    server = ServeProcess(model_path, dtype, device, drafter, max_queued, name, log_path)
    try:
        def greedy() -> str:
            body = {"model": name, "messages": [{"role": "user", "content": prompts[0]}], "max_tokens": max_tokens,
                    "temperature": 0}
            return httpx.post(server.url, json=body, timeout=timeout).json()["choices"][0]["message"]["content"]

        before_answer = greedy()
        rss_cold = server.rss_bytes()
        flood(server.url, name, prompts, 16, max_tokens, timeout, abandon_after=0.5)  # the warm-up
        while (health := httpx.get(f"{server.root}/health", timeout=10).json())["running"] or health["queued"]:
            time.sleep(0.05)
        rss_before, peak, flooding = server.rss_bytes(), [0], threading.Event()
        flooding.set()

        def sample() -> None:
            while flooding.is_set():
                peak[0] = max(peak[0], server.rss_bytes())
                time.sleep(0.05)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        started = time.perf_counter()
        results = flood(server.url, name, prompts, requests, max_tokens, timeout, abandon_after=0.5)
        wall = time.perf_counter() - started
        while (health := httpx.get(f"{server.root}/health", timeout=10).json())["running"] or health["queued"]:
            if time.perf_counter() - started > wall + timeout:
                raise RuntimeError(f"the server still holds requests {timeout:.0f} s after the flood: {health}")
            time.sleep(0.05)
        settled = time.perf_counter() - started - wall
        flooding.clear()
        sampler.join()
        rss_after = server.rss_bytes()
        metrics = httpx.get(f"{server.root}/metrics", timeout=10).text
        cache_bytes = next(float(line.split()[-1]) for line in metrics.splitlines()
                           if line.startswith("specdec_kv_cache_bytes "))
        same_after = greedy() == before_answer
    finally:
        server.stop()
    outcomes: dict[str, list[float]] = {}
    for result in results:
        outcomes.setdefault(result.outcome, []).append(result.seconds)
    same_question = [r for r in results if r.outcome == "answered" and r.question == prompts[0]]
    return {"requests": requests, "queue": max_queued, "dtype": dtype, "wall_seconds": wall,
            "settled_seconds": settled, "client_timeout": timeout,
            "outcomes": {k: {"count": len(v), "max_s": max(v), "median_s": statistics.median(v)}
                         for k, v in sorted(outcomes.items())},
            "failures": [f"{r.kind}: {r.detail}" for r in results if r.outcome == "failed"][:10],
            "answered_like_alone": [sum(r.answer == before_answer for r in same_question), len(same_question)],
            "health_after": health, "cache_bytes_after": cache_bytes, "rss_cold_mb": rss_cold / 2**20,
            "rss_before_mb": rss_before / 2**20,
            "rss_peak_mb": peak[0] / 2**20, "rss_after_mb": rss_after / 2**20, "same_greedy_answer_after": same_after}


def flood_markdown(figures: dict) -> str:
    """The flood's figures as Markdown."""
    lines = [f"Flood: {figures['requests']} concurrent requests (streamed, non-streamed, abandoned) against "
             f"`specdec serve` ({figures['dtype']}, batch 8, queue {figures['queue']}), client timeout "
             f"{figures['client_timeout']:.0f} s; flood {figures['wall_seconds']:.1f} s, nothing running or queued "
             f"{figures['settled_seconds']:.2f} s after it.", "",
             "| outcome | requests | max s | median s |", "|---|---|---|---|"]
    for outcome, row in figures["outcomes"].items():
        lines.append(f"| {outcome} | {row['count']} | {row['max_s']:.2f} | {row['median_s']:.2f} |")
    health = figures["health_after"]
    alike, asked = figures["answered_like_alone"]
    lines += ["", f"After: /health running {health['running']}, queued {health['queued']}; KV cache "
                  f"{figures['cache_bytes_after']:.0f} bytes; server RSS {figures['rss_cold_mb']:.0f} MB after its "
                  f"first request, {figures['rss_before_mb']:.0f} MB after a warm-up of 16 (before the flood), "
                  f"{figures['rss_peak_mb']:.0f} MB peak, {figures['rss_after_mb']:.0f} MB after "
                  f"({figures['rss_after_mb'] / figures['rss_before_mb'] - 1:+.1%}); the greedy answer after the "
                  f"flood is {'identical' if figures['same_greedy_answer_after'] else 'DIFFERENT'} to the one "
                  f"before; {alike} of {asked} flood answers to that question are identical to it (bf16 forwards "
                  "of other shapes round differently and may part at near-ties; fp32 must be exact)."]
    if figures["failures"]:
        lines.append("Failures: " + "; ".join(figures["failures"]))
    return "\n".join(lines)
