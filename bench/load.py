"""The clients of `specdec bench-serve`: N threads streaming chat completions, in a process of their
own, so no engine shares its interpreter with the load.

Every engine under test gets the same clients the same way: vLLM's server runs in processes of its
own, and `specdec serve`'s engine would otherwise hold one interpreter lock with the clients'
threads (parsing every streamed chunk), which is not how anyone deploys it. The parent sends one
JSON job on stdin and reads one JSON answer on stdout; the run's wall time is measured inside the
client process, from the first request sent to the last answer read, so starting the process is
not counted.

Run as ``python -m bench.load`` (the parent does this through `run_clients`).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

from bench.errors import BenchError

CHECKOUT = Path(__file__).resolve().parent.parent  # where ``bench`` imports from, for the child

Figures = tuple[float, float, int, float]  # (latency s, time to first token s, completion tokens, MAT or NaN)


def run_clients(url: str, model: str, questions: list[str], max_tokens: int,
                concurrency: int) -> tuple[list[Figures], float]:
    """``questions`` answered by ``concurrency`` client threads (in a child process) taking the
    next question in turn: each request's figures, and the run's wall seconds. A failed request
    or a failed client process is a `BenchError`."""
    job = {"url": url, "model": model, "questions": questions, "max_tokens": max_tokens,
           "concurrency": concurrency}
    path = os.pathsep.join(filter(None, [str(CHECKOUT), os.environ.get("PYTHONPATH")]))
    child = subprocess.run([sys.executable, "-m", "bench.load"], input=json.dumps(job), capture_output=True,
                           text=True, env={**os.environ, "PYTHONPATH": path})
    if child.returncode != 0:
        last = (child.stderr.strip().splitlines() or ["no output"])[-1]
        raise BenchError(f"the benchmark clients failed against {url}: {last}")
    answer = json.loads(child.stdout)
    return [tuple(figures) for figures in answer["results"]], answer["seconds"]


def _stream_one(client, url: str, model: str, question: str, max_tokens: int) -> Figures:
    """One streamed, greedy chat completion and its figures."""
    body = {"model": model, "messages": [{"role": "user", "content": question}], "max_tokens": max_tokens,
            "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
    started, first, tokens, mat = time.perf_counter(), None, 0, float("nan")
    with client.stream("POST", url, json=body) as response:
        if response.status_code != 200:
            raise BenchError(f"the server answered {response.status_code}: {response.read()[:200]!r}")
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if first is None and chunk.get("choices") and chunk["choices"][0]["delta"].get("content"):
                first = time.perf_counter() - started
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            if chunk.get("specdec"):
                mat = chunk["specdec"].get("mean_accepted_tokens", mat)
    latency = time.perf_counter() - started
    return latency, latency if first is None else first, tokens, mat


def _client_threads(url: str, model: str, questions: list[str], max_tokens: int,
                    concurrency: int) -> tuple[list[Figures], float]:
    """The run itself, in this process: ``concurrency`` threads; the first failure stops them."""
    import httpx

    results: list[Figures] = []
    waiting, lock = list(questions), threading.Lock()
    errors: list[BaseException] = []

    def client_loop() -> None:
        with httpx.Client(timeout=600) as client:
            while True:
                with lock:
                    if not waiting or errors:
                        return
                    question = waiting.pop(0)
                try:
                    figures = _stream_one(client, url, model, question, max_tokens)
                except BaseException as err:  # reported after the run
                    with lock:
                        errors.append(err)
                    return
                with lock:
                    results.append(figures)

    started = time.perf_counter()
    threads = [threading.Thread(target=client_loop) for _ in range(concurrency)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    return results, time.perf_counter() - started


def main() -> None:
    job = json.load(sys.stdin)
    try:
        results, seconds = _client_threads(job["url"], job["model"], job["questions"], job["max_tokens"],
                                           job["concurrency"])
    except Exception as err:  # the parent reports the last line
        sys.exit(f"{type(err).__name__}: {err}")
    json.dump({"results": results, "seconds": seconds}, sys.stdout)


if __name__ == "__main__":
    main()
