"""Benchmark questions: Spec-Bench JSONL files and a built-in prompt set."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

# Spec-Bench reports MT-bench's eight categories as one task, "multi-turn conversation".
MT_BENCH_CATEGORIES = frozenset(
    {"writing", "roleplay", "reasoning", "math", "coding", "extraction", "stem", "humanities"}
)


class DatasetError(ValueError):
    """A dataset file or selection that cannot be benchmarked (one clear line for the user)."""


@dataclass(frozen=True)
class Question:
    """One benchmark item: every turn is a user message, answered with the history so far."""

    question_id: str
    category: str
    turns: tuple[str, ...]

    @property
    def task(self) -> str:
        """Spec-Bench task: the category, with MT-bench's eight folded into ``mt_bench``."""
        return "mt_bench" if self.category in MT_BENCH_CATEGORIES else self.category


_PASSAGE = (
    "The Rhine rises in the Swiss Alps and flows about 1,230 kilometres through Switzerland, "
    "Liechtenstein, Austria, Germany, France and the Netherlands before reaching the North Sea. "
    "For centuries it has been one of Europe's busiest waterways: barges carry coal, grain, "
    "chemicals and containers between the port of Rotterdam and the industrial cities upstream. "
    "In dry summers the water level near Kaub can fall so low that barges must sail half empty, "
    "which raises transport prices across the region."
)

BUILTIN_QUESTIONS: tuple[Question, ...] = (
    Question("chat-1", "chat", ("Give me three tips for sleeping better, one sentence each.",)),
    Question("chat-2", "chat", ("What is a good way to start learning to play the guitar?",
                                "And how long should I practise every day?")),
    Question("code-1", "code", ("Write a Python function that returns the n-th Fibonacci number iteratively.",)),
    Question("code-2", "code", ("Write a Python function is_palindrome(s) that ignores case and spaces, "
                                "with a short docstring.",)),
    Question("summary-1", "summarization", (f"Summarise this passage in two sentences.\n\n{_PASSAGE}",)),
    Question("summary-2", "summarization", (f"List the countries named in this passage.\n\n{_PASSAGE}",)),
    Question("translation-1", "translation", ("Translate to French: The weather is nice today, so we are "
                                              "going to the beach with our friends.",)),
    Question("translation-2", "translation", ("Translate to German: Where is the train station? I need to "
                                              "buy a ticket to Berlin.",)),
    Question("qa-1", "qa", (f"{_PASSAGE}\n\nQuestion: why do barges sometimes sail half empty?",)),
    Question("qa-2", "qa", ("What is the capital of Australia, and why is it not Sydney?",)),
    Question("math-1", "math_reasoning", ("A shop sells pens at 3 dollars each. Tom buys 7 pens and pays "
                                          "with a 50 dollar note. How much change does he get? Think step by step.",)),
    Question("math-2", "math_reasoning", ("If a train travels 180 km in 2 hours, what is its average speed? "
                                          "Explain your steps.",)),
)


def read_spec_bench(path: str | Path) -> list[Question]:
    """Questions from a Spec-Bench JSONL file (``question_id``, ``category``, ``turns``)."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"dataset file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise DatasetError(f"{path}: not UTF-8 text (byte {err.start}): a Spec-Bench file is UTF-8 JSON "
                           "lines") from None
    except OSError as err:
        raise DatasetError(f"{path}: cannot be read ({err.strerror})") from None
    questions: list[Question] = []
    for line_no, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise DatasetError(f"{path}:{line_no}: not valid JSON ({err.msg})") from None
        if not isinstance(row, dict):
            raise DatasetError(f"{path}:{line_no}: expected a JSON object")
        missing = [key for key in ("question_id", "category", "turns") if key not in row]
        if missing:
            raise DatasetError(f"{path}:{line_no}: missing field(s) {', '.join(missing)}")
        turns = row["turns"]
        if not isinstance(turns, list) or not turns or not all(isinstance(t, str) and t for t in turns):
            raise DatasetError(f"{path}:{line_no}: 'turns' must be a non-empty list of non-empty strings")
        questions.append(Question(str(row["question_id"]), str(row["category"]), tuple(turns)))
    if not questions:
        raise DatasetError(f"{path}: no questions")
    return questions


def select(
    questions: list[Question], categories: list[str] | None = None, limit_per_category: int | None = None
) -> list[Question]:
    """Filter by task or raw category name and keep the first ``limit_per_category`` of each task.

    Order is preserved. Unknown category names and empty selections raise `DatasetError`.
    """
    if categories:
        known = {q.task for q in questions} | {q.category for q in questions}
        unknown = sorted(set(categories) - known)
        if unknown:
            raise DatasetError(f"unknown categor{'y' if len(unknown) == 1 else 'ies'} {', '.join(unknown)}; "
                               f"known: {', '.join(sorted(known))}")
        questions = [q for q in questions if q.task in categories or q.category in categories]
    if limit_per_category is not None:
        if limit_per_category < 1:
            raise DatasetError(f"--limit-per-category must be >= 1, got {limit_per_category}")
        seen: dict[str, int] = {}
        kept = []
        for q in questions:
            seen[q.task] = seen.get(q.task, 0) + 1
            if seen[q.task] <= limit_per_category:
                kept.append(q)
        questions = kept
    if not questions:
        raise DatasetError("the selection is empty")
    return questions
