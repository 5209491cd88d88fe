"""``specdec bench-structured``: constrained generation on the schema set (`bench.schema_set`),
timed side by side: HF ``generate`` with the constraint as a logits processor, specdec with the
same constraint, and specdec unconstrained on the same prompts.

Each question runs the three methods back to back in a rotating order (A B C, B C A, C A B, ...),
so drift on a shared host falls on every method alike. The first ``warmup`` questions run every
method untimed (specdec's scheduler measures its cost curve and its drafters learn there, as they
would in a running server; the timed questions are others). Reported:
tokens per second over the whole set, each method's ratio to constrained HF (per-question geometric
mean of the speed ratios), specdec's mean accepted tokens per verify forward (MAT), how many of the
grammar drafter's nodes were accepted, and whether every constrained answer equals HF's (in bf16,
with the logit margin between the two choices where they first differ) and validates against its
schema.
"""

from __future__ import annotations

import json
import math
import time

import click
import torch

METHODS = ("hf-constrained", "specdec-constrained", "specdec-free")


def first_difference_margin(model, ids: torch.Tensor, ours: list[int], theirs: list[int]) -> float:
    """Where two answers to ``ids`` first differ: the gap between the target's logits for the two
    tokens chosen there, from one forward over the common prefix."""
    i = next(i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b)
    prefix = torch.cat([ids, torch.tensor([theirs[:i]], dtype=torch.long)], dim=1)
    logits = model(prefix).logits[0, -1].float()
    return abs(float(logits[ours[i]] - logits[theirs[i]]))


def run_set(model, tokenizer, questions, max_new_tokens: int, drafter: str, warmup: int) -> dict:
    """Time every method on every question (see the module docstring); returns the figures."""
    from specdec import Constraint, ConstraintLogitsProcessor, SpeculativeDecoder
    from specdec.models.prompts import encode_chat

    decoder = SpeculativeDecoder(model, tokenizer, drafter=drafter)
    vocab = model.get_output_embeddings().weight.shape[0]

    def once(method: str, ids: torch.Tensor, constraint) -> tuple[list[int], float, object]:
        start = time.perf_counter()
        if method == "hf-constrained":
            out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                 max_new_tokens=max_new_tokens,
                                 logits_processor=[ConstraintLogitsProcessor(constraint, tokenizer, vocab)])
            stats = None
        else:
            out = decoder.generate(ids, do_sample=False, max_new_tokens=max_new_tokens,
                                   constraint=constraint if method == "specdec-constrained" else None)
            stats = decoder.last_stats
        return out[0, ids.shape[1]:].tolist(), time.perf_counter() - start, stats

    figures = {m: {"tokens": 0, "seconds": 0.0, "steps": 0, "log_ratio": 0.0} for m in METHODS}
    grammar = {"proposed": 0, "accepted": 0}
    mismatches, invalid = {}, []
    with torch.inference_mode():
        for i, question in enumerate(questions):
            ids = encode_chat(tokenizer, [{"role": "user", "content": question.prompt}])
            constraint = Constraint.json_schema(question.schema)
            order = METHODS[i % 3:] + METHODS[: i % 3]
            runs = {method: once(method, ids, constraint) for method in order}
            if i < warmup:
                continue
            hf_tokens, hf_seconds, _ = runs["hf-constrained"]
            for method, (tokens, seconds, stats) in runs.items():
                entry = figures[method]
                entry["tokens"] += len(tokens)
                entry["seconds"] += seconds
                entry["log_ratio"] += math.log((len(tokens) / seconds) / (len(hf_tokens) / hf_seconds))
                if stats is not None:
                    entry["steps"] += stats.steps
                    if method == "specdec-constrained":
                        for key in grammar:
                            grammar[key] += stats.per_drafter.get("grammar", {}).get(key, 0)
            ours = runs["specdec-constrained"][0]
            if ours != hf_tokens:  # a margin where they differ; None: one ends earlier (EOS) than the other
                differ = any(a != b for a, b in zip(ours, hf_tokens))
                mismatches[question.name] = first_difference_margin(model, ids, ours, hf_tokens) if differ else None
            try:
                import jsonschema

                jsonschema.validate(json.loads(tokenizer.decode(hf_tokens, skip_special_tokens=True)),
                                    question.schema)
            except Exception:  # noqa: BLE001 - reported, not raised
                invalid.append(question.name)
    count = len(questions) - warmup
    rows = {}
    for method, entry in figures.items():
        rows[method] = {"tokens": entry["tokens"], "tok_per_s": entry["tokens"] / entry["seconds"],
                        "vs_hf_constrained": math.exp(entry["log_ratio"] / count),
                        "mat": entry["tokens"] / entry["steps"] if entry["steps"] else None}
    return {"questions": count, "warmup": warmup, "methods": rows, "grammar_nodes": grammar,
            "mismatches": mismatches, "invalid": invalid}


@click.command("bench-structured")
@click.option("--model", "model_name", default="default", show_default=True,
              help="'default' (SmolLM2-135M-Instruct), a model directory or a GGUF file")
@click.option("--dtype", default="bf16", show_default=True, type=click.Choice(["bf16", "fp32"]))
@click.option("--max-new-tokens", default=200, show_default=True, type=click.IntRange(1, 4096))
@click.option("--drafter", default="auto", show_default=True)
@click.option("--limit", default=0, show_default=True, type=click.IntRange(0), help="first N questions (0: all)")
@click.option("--warmup", default=4, show_default=True, type=click.IntRange(0),
              help="the first N questions warm every method up, untimed")
@click.option("--json-out", type=click.Path(dir_okay=False), default=None, help="also write the figures here")
def bench_structured(model_name, dtype, max_new_tokens, drafter, limit, warmup, json_out):
    """JSON-schema constrained generation: specdec against HF generate with the same constraint."""
    from bench.schema_set import SCHEMA_QUESTIONS
    from specdec import load_default_model, load_model

    model, tokenizer = (load_default_model(dtype=dtype) if model_name == "default" else load_model(model_name, dtype))
    questions = SCHEMA_QUESTIONS[:limit] if limit else SCHEMA_QUESTIONS
    if warmup >= len(questions):
        raise click.BadParameter(f"{warmup} warm-up questions leave none of the {len(questions)} to time",
                                 param_hint="--warmup")
    report = run_set(model, tokenizer, questions, max_new_tokens, drafter, warmup)
    click.echo(f"{report['questions']} questions timed after {warmup} warm-up ones, {dtype}, "
               f"max_new_tokens={max_new_tokens}, drafter={drafter}")
    click.echo(f"{'method':<22}{'tokens':>8}{'tok/s':>9}{'vs HF':>8}{'MAT':>7}")
    for method, row in report["methods"].items():
        mat = "-" if row["mat"] is None else f"{row['mat']:.2f}"
        click.echo(f"{method:<22}{row['tokens']:>8}{row['tok_per_s']:>9.1f}{row['vs_hf_constrained']:>7.2f}x{mat:>7}")
    grammar = report["grammar_nodes"]
    click.echo(f"grammar drafter: {grammar['accepted']} of {grammar['proposed']} proposed nodes accepted")
    margins = ", ".join(f"{name} (logit margin {margin:.3f})" if margin is not None else f"{name} (ends elsewhere)"
                        for name, margin in report["mismatches"].items())
    click.echo(f"constrained answers equal to HF's: {report['questions'] - len(report['mismatches'])}"
               f"/{report['questions']} {margins}")
    click.echo(f"HF answers valid against their schema: {report['questions'] - len(report['invalid'])}"
               f"/{report['questions']} {report['invalid'] or ''}")
    if json_out:
        with open(json_out, "w") as handle:
            json.dump(report, handle, indent=2)
