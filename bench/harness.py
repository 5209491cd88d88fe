"""Running methods over questions, interleaved, and turning records into summary figures."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterator

import torch

from bench.datasets import Question
from bench.methods import Method
from specdec.models.prompts import encode_chat

BASELINE = "baseline"


@dataclass
class Record:
    """One method answering every turn of one question (one repeat)."""

    method: str
    question_id: str
    category: str
    new_tokens: int
    seconds: float
    steps: int | None
    identical: bool | None = None
    draft_seconds: float | None = None
    drafted_tokens: int | None = None
    per_drafter: dict | None = None
    first_diff: int | None = None
    divergence_margin: float | None = None
    repeat: int = 0
    turns: list[tuple[torch.Tensor, list[int]]] = field(default_factory=list, repr=False)

    @property
    def output_ids(self) -> list[int]:
        return [t for _, new_ids in self.turns for t in new_ids]

    def as_json(self) -> dict:
        row = asdict(self)
        row.pop("turns")
        return row


def interleave(methods: list[str], questions: list[Question], repeats: int) -> Iterator[tuple[int, Question, str]]:
    """Run order: for each repeat, each question, every method in turn (A B C A B C ...)."""
    for repeat in range(repeats):
        for question in questions:
            for method in methods:
                yield repeat, question, method


def answer(method: Method, tokenizer, question: Question, max_new_tokens: int, seed: int | None = None):
    """All turns of ``question``, each with the method's own earlier answers in the history.

    ``seed`` (sampled methods) seeds turn ``i`` with ``seed + i``: every method sees the same seeds.
    A tokenizer without a chat template (a base model) gets the first turn as a completion prompt.

    Returns ``(turns, seconds, stats)``: each turn's prompt ids and new ids, the seconds spent
    inside generate calls, and the specdec statistics of every turn (empty for HF methods).
    """
    history: list[dict[str, str]] = []
    turns: list[tuple[torch.Tensor, list[int]]] = []
    seconds = 0.0
    stats = []
    turns_to_ask = question.turns if getattr(tokenizer, "chat_template", None) else question.turns[:1]
    for i, turn in enumerate(turns_to_ask):
        history.append({"role": "user", "content": turn})
        prompt = encode_chat(tokenizer, history)
        started = time.perf_counter()
        generation = method.generate(prompt, max_new_tokens, None if seed is None else seed + i)
        seconds += time.perf_counter() - started
        turns.append((prompt, generation.new_ids))
        if generation.stats is not None:
            stats.append(generation.stats)
        history.append({"role": "assistant", "content": tokenizer.decode(generation.new_ids, skip_special_tokens=True)})
    return turns, seconds, stats


def first_difference(a: list[int], b: list[int]) -> int | None:
    """Index of the first differing token (the shorter length if one is a prefix), None if equal."""
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


@torch.inference_mode()
def divergence_margin(model, reference: Record, other: Record) -> float | None:
    """Logit gap, under a fresh forward of the shared prefix, between the baseline's token and the
    other method's token at their first difference (small = a near-tie; None if no such token).

    Only the first differing turn counts: earlier turns were identical, so its prompt is shared.
    """
    for (prompt, ref_ids), (_, other_ids) in zip(reference.turns, other.turns):
        at = first_difference(ref_ids, other_ids)
        if at is None:
            continue
        if at >= min(len(ref_ids), len(other_ids)):
            return None
        context = torch.cat([prompt[0], torch.tensor(ref_ids[:at], dtype=torch.long)])[None]
        logits = model(context, logits_to_keep=1).logits[0, -1].float()
        return float(logits[ref_ids[at]] - logits[other_ids[at]])
    return None


def run_benchmark(
    methods: list[Method],
    questions: list[Question],
    tokenizer,
    max_new_tokens: int,
    repeats: int = 1,
    state: str = "hot",
    on_record: Callable[[Record], None] | None = None,
    model=None,
    seed: int | None = None,
) -> list[Record]:
    """Interleaved run of every method on every question.

    Greedy runs (``seed=None``): each record is compared with the baseline's output for the same
    question and repeat; with ``model`` given, divergent records also get their
    `divergence_margin` (computed untimed). Sampled runs (``seed`` given, methods built with
    sampling settings) seed each question identically for every method and compare nothing.
    """
    by_name = {m.name: m for m in methods}
    records: list[Record] = []
    baselines: dict[tuple[int, str], Record] = {}
    position = {id(question): i for i, question in enumerate(questions)}
    for repeat, question, name in interleave(list(by_name), questions, repeats):
        method = by_name[name]
        if state == "cold":
            method.reset()
        question_seed = None if seed is None else seed + 1000 * (repeat * len(questions) + position[id(question)])
        turns, seconds, stats = answer(method, tokenizer, question, max_new_tokens, question_seed)
        record = Record(name, question.question_id, question.task, sum(len(t[1]) for t in turns), seconds,
                        sum(s.steps for s in stats) if stats else None, repeat=repeat, turns=turns)
        if stats:
            record.draft_seconds = sum(s.draft_seconds for s in stats)
            record.drafted_tokens = sum(s.drafted_tokens for s in stats)
            record.per_drafter = {}
            for s in stats:
                for drafter, counts in s.per_drafter.items():
                    mine = record.per_drafter.setdefault(drafter, {"proposed": 0, "accepted": 0})
                    mine["proposed"] += counts["proposed"]
                    mine["accepted"] += counts["accepted"]
        if name == BASELINE:
            baselines[(repeat, question.question_id)] = record
        reference = baselines.get((repeat, question.question_id))
        if reference is not None and seed is None:
            record.first_diff = first_difference(reference.output_ids, record.output_ids)
            record.identical = record.first_diff is None
            if not record.identical and model is not None:
                record.divergence_margin = divergence_margin(model, reference, record)
        records.append(record)
        if on_record is not None:
            on_record(record)
    return records


def _figures(records: list[Record]) -> dict:
    new_tokens = sum(r.new_tokens for r in records)
    seconds = sum(r.seconds for r in records)
    stepped = [r for r in records if r.steps is not None]
    compared = [r for r in records if r.identical is not None]
    margins = [abs(r.divergence_margin) for r in records if r.divergence_margin is not None]
    return {
        "new_tokens": new_tokens,
        "seconds": seconds,
        "tok_per_s": new_tokens / seconds if seconds > 0 else 0.0,
        "mat": (sum(r.new_tokens for r in stepped) / sum(r.steps for r in stepped))
        if stepped and sum(r.steps for r in stepped) else None,
        "identical_fraction": sum(r.identical for r in compared) / len(compared) if compared else None,
        "max_divergence_margin": max(margins) if margins else None,
        "draft_ms_per_step": 1e3 * sum(r.draft_seconds for r in stepped) / sum(r.steps for r in stepped)
        if stepped and sum(r.steps for r in stepped) else None,
        "mean_tree_size": sum(r.drafted_tokens for r in stepped) / sum(r.steps for r in stepped)
        if stepped and sum(r.steps for r in stepped) else None,
    }


def summarize(records: list[Record], baseline: str = BASELINE) -> dict[str, dict]:
    """Per method (and per category): tokens, seconds, tok/s, speedup over ``baseline``, MAT, identical."""
    methods = list(dict.fromkeys(r.method for r in records))
    categories = list(dict.fromkeys(r.category for r in records))
    summary: dict[str, dict] = {}
    base = {c: _figures([r for r in records if r.method == baseline and r.category == c]) for c in categories}
    base_all = _figures([r for r in records if r.method == baseline])
    for method in methods:
        mine = [r for r in records if r.method == method]
        figures = _figures(mine)
        figures["speedup"] = figures["tok_per_s"] / base_all["tok_per_s"] if base_all["tok_per_s"] else None
        figures["per_category"] = {}
        for category in categories:
            cat = _figures([r for r in mine if r.category == category])
            cat["speedup"] = cat["tok_per_s"] / base[category]["tok_per_s"] if base[category]["tok_per_s"] else None
            figures["per_category"][category] = cat
        summary[method] = figures
    return summary
