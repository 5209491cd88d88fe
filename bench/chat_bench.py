"""``specdec bench-chat``: second turns of two-turn conversations, drafter state persistent vs cold,
and the prefill time KV reuse saves.

Per question (interleaved): a *persistent* session on a decoder whose drafter state carries over
from every earlier turn and conversation, and a *cold* session on a second decoder whose drafter
is reset just before the second turn. Prefill with KV reuse is the persistent session's
second-turn prefill; the full prefill of the same prompt is timed separately with a fresh cache.
"""

from __future__ import annotations

import statistics
import time

import click
import torch


@torch.inference_mode()
def full_prefill_seconds(model, prompt: torch.Tensor) -> float:
    """Time to prefill ``prompt[:-1]`` into a fresh cache (what a turn costs without KV reuse)."""
    from transformers import DynamicCache

    from drafters.modeling import forward_with_cache

    started = time.perf_counter()
    forward_with_cache(model, DynamicCache(config=model.config), input_ids=prompt[:, :-1], logits_to_keep=1)
    return time.perf_counter() - started


def run(model, tokenizer, questions, max_new_tokens: int) -> list[dict]:
    from specdec import ChatSession, SpeculativeDecoder
    from specdec.models.prompts import encode_chat

    persistent = SpeculativeDecoder(model, tokenizer)
    cold = SpeculativeDecoder(model, tokenizer, scheduler=persistent.scheduler)
    rows = []
    for question in questions:
        row = {"question_id": question.question_id}
        for name, decoder in (("persistent", persistent), ("cold", cold)):
            session = ChatSession(decoder)
            session.send(question.turns[0], max_new_tokens=max_new_tokens, do_sample=False)
            if name == "cold":
                decoder.reset()
            started = time.perf_counter()
            session.send(question.turns[1], max_new_tokens=max_new_tokens, do_sample=False)
            seconds = time.perf_counter() - started
            stats = session.last_stats
            row[name] = {"tokens": stats.new_tokens, "seconds": seconds, "steps": stats.steps,
                         "prefill_seconds": stats.prefill_seconds, "prefilled": stats.prefilled_tokens,
                         "reused": stats.reused_prefix_tokens}
            if name == "persistent":
                prompt = encode_chat(tokenizer, session.messages()[:-1])
                row["full_prefill_seconds"] = full_prefill_seconds(model, prompt)
                row["prompt_tokens"] = prompt.shape[1]
        rows.append(row)
    return rows


@click.command("bench-chat")
@click.option("--dataset", type=click.Path(exists=True, dir_okay=False), required=True,
              help="Spec-Bench JSONL; its two-turn questions are used.")
@click.option("--limit", type=int, default=16, show_default=True, help="Number of two-turn questions.")
@click.option("--max-new-tokens", type=int, default=128, show_default=True)
@click.option("--model", "model_path", default=None, help="Local HF model dir or .gguf (default: SmolLM2-135M).")
@click.option("--dtype", type=click.Choice(["bf16", "fp32"]), default="bf16", show_default=True)
def bench_chat(dataset, limit, max_new_tokens, model_path, dtype):
    """Second-turn speed with persistent vs cold drafter state, and prefill saved by KV reuse."""
    from rich.console import Console
    from rich.table import Table

    from bench.datasets import read_spec_bench
    from specdec.models.loading import load_default_model, load_model

    questions = [q for q in read_spec_bench(dataset) if len(q.turns) >= 2][:limit]
    if not questions:
        raise click.ClickException("the dataset has no two-turn questions")
    model, tokenizer = load_model(model_path, dtype=dtype) if model_path else load_default_model(dtype=dtype)
    rows = run(model, tokenizer, questions, max_new_tokens)

    def total(name, key):
        return sum(r[name][key] for r in rows)

    table = Table(title=f"second turns of {len(rows)} two-turn questions, {dtype}, {max_new_tokens} new tokens")
    for column in ("drafter state", "tok/s", "MAT", "prefill ms (mean)", "tokens prefilled (mean)"):
        table.add_column(column, justify="right")
    for name in ("persistent", "cold"):
        table.add_row(name, f"{total(name, 'tokens') / total(name, 'seconds'):.1f}",
                      f"{total(name, 'tokens') / total(name, 'steps'):.2f}",
                      f"{1e3 * statistics.mean(r[name]['prefill_seconds'] for r in rows):.0f}",
                      f"{statistics.mean(r[name]['prefilled'] for r in rows):.0f}")
    table.add_row("no KV reuse", "", "", f"{1e3 * statistics.mean(r['full_prefill_seconds'] for r in rows):.0f}",
                  f"{statistics.mean(r['prompt_tokens'] - 1 for r in rows):.0f}")
    Console().print(table)
