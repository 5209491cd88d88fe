"""What an engine has done since it was made, for monitoring (`specdec serve` exports it at
``/metrics``): counters, and histograms of step time and time to first token.

Written by the engine loop (and, for refusals, by submitting threads under the loop's guard);
read by anyone: a reader may see one step's updates half applied, never a torn number.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

# Upper bounds (seconds) of the histograms' buckets; the last bucket is unbounded.
STEP_BUCKETS = (0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5)
TTFT_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


@dataclass
class Histogram:
    """Counts of observations per bucket (``bounds`` upper edges, then +inf) and their sum."""

    bounds: tuple[float, ...]
    counts: np.ndarray = field(init=False)
    total: float = 0.0

    def __post_init__(self) -> None:
        self.counts = np.zeros(len(self.bounds) + 1, dtype=np.int64)

    def observe(self, value: float) -> None:
        self.counts[int(np.searchsorted(self.bounds, value, side="left"))] += 1
        self.total += value

    @property
    def count(self) -> int:
        return int(self.counts.sum())


@dataclass
class EngineMetrics:
    """Totals since the engine was made.

    Attributes:
        submitted, refused: requests offered, and refused at once (full queue).
        ended: requests ended, by how (`specdec.step.stream.End` values).
        prompt_tokens, generated_tokens: prompt tokens of admitted requests; tokens emitted.
        prefill_chunks, verify_steps: forwards run; rows_stepped: sequences those decode steps
            verified, summed (over ``verify_steps``: the mean batch).
        drafted, accepted: draft tokens verified and accepted, by drafter name.
        step_seconds: wall time of each decode step; ttft_seconds: submission to first tokens.
    """

    submitted: int = 0
    refused: int = 0
    ended: dict[str, int] = field(default_factory=dict)
    prompt_tokens: int = 0
    generated_tokens: int = 0
    prefill_chunks: int = 0
    verify_steps: int = 0
    rows_stepped: int = 0
    drafted: dict[str, int] = field(default_factory=dict)
    accepted: dict[str, int] = field(default_factory=dict)
    step_seconds: Histogram = field(default_factory=lambda: Histogram(STEP_BUCKETS))
    ttft_seconds: Histogram = field(default_factory=lambda: Histogram(TTFT_BUCKETS))
