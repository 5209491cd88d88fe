"""The ``specdec`` command line: ``generate``, ``bench`` and ``bench-verify``."""

from __future__ import annotations

import click


@click.group()
@click.version_option(package_name="specdec")
def main() -> None:
    """Lossless speculative decoding for Hugging Face causal LMs."""


@main.command()
@click.argument("prompt")
@click.option("--model", "model_path", default=None, help="Local HF model dir or .gguf (default: SmolLM2-135M).")
@click.option("--dtype", type=click.Choice(["bf16", "fp32"]), default="bf16", show_default=True)
@click.option("--max-new-tokens", type=int, default=128, show_default=True)
@click.option("--drafter", default="auto", show_default=True, help="auto, recycling, ngram, or several joined by +.")
@click.option("--tree-budget", type=int, default=None, help="Draft nodes per verify step (default: scheduled).")
def generate(prompt: str, model_path: str | None, dtype: str, max_new_tokens: int, drafter: str,
             tree_budget: int | None) -> None:
    """Answer PROMPT (with the chat template) and print speed statistics."""
    from specdec import SpeculativeDecoder
    from specdec.models import load_default_model, load_model
    from specdec.prompts import encode_chat

    if not prompt.strip():
        raise click.BadParameter("the prompt is empty", param_hint="PROMPT")
    model, tokenizer = load_model(model_path, dtype=dtype) if model_path else load_default_model(dtype=dtype)
    try:
        options = {} if tree_budget is None else {"tree_budget": tree_budget}
        decoder = SpeculativeDecoder(model, tokenizer, drafter=drafter, **options)
        prompt_ids = encode_chat(tokenizer, [{"role": "user", "content": prompt}])
        out = decoder.generate(prompt_ids, max_new_tokens=max_new_tokens, return_dict_in_generate=True)
    except (ValueError, TypeError) as err:
        raise click.UsageError(str(err)) from None
    stats = out.spec_stats
    click.echo(tokenizer.decode(out.sequences[0, prompt_ids.shape[1] :], skip_special_tokens=True))
    seconds = stats.prefill_seconds + stats.decode_seconds
    click.echo(
        f"\n[{stats.new_tokens} tokens in {seconds:.2f} s: {stats.new_tokens / max(seconds, 1e-9):.1f} tok/s, "
        f"{stats.steps} verify steps, mean accepted tokens per step {stats.mean_accepted_tokens:.2f}]",
        err=True,
    )


def _add_bench() -> None:
    # The benchmark harness lives in the top-level `bench` package, which depends on specdec.
    from bench.cli import bench
    from bench.verify_cost import bench_verify

    main.add_command(bench)
    main.add_command(bench_verify)


_add_bench()
