"""The acceptance-rate scheduler: how many draft nodes to verify, from measured costs and values.

Each step the drafters propose a tree of up to `draft_budget` nodes whose scores estimate, per
node, the log-probability of being reached and accepted (learned per drafter, depth and rank).
`choose_size` keeps the ``n`` best nodes that maximise expected tokens per second::

    (1 + calibration * sum of the n best node values) / (T(n) + overhead)

where ``T(n)`` is the measured wall time of a verify forward of ``n`` draft nodes (plus the root)
on this hardware, at the current context length, and ``calibration`` corrects the node values by
what verification actually accepted. ``n = 0`` (plain decoding) is chosen when drafting does not
pay. Decisions are a pure function of the recorded history, so they are deterministic.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import numpy as np

# Tree sizes whose verify cost is tracked; other sizes interpolate linearly between them.
SIZE_BUCKETS = (0, 1, 2, 4, 6, 8, 12, 16, 24, 32, 48, 64)
# Prior relative cost of each extra draft node (T(n) ~ T(0) * (1 + slope * n)) until measured;
# about what bf16 / fp32 forwards of a 135M model cost on a 2-core CPU.
PRIOR_SLOPE = 0.03


@dataclass
class CostModel:
    """Verify-forward seconds per tree size, as a function of context length.

    Per size bucket: an exponential moving average of ``seconds / (1 + context_len / context_scale)``
    so that measurements taken at different context lengths stay comparable.
    """

    decay: float = 0.8
    context_scale: float = 2048.0

    def __post_init__(self) -> None:
        self.seconds = np.full(len(SIZE_BUCKETS), np.nan)  # normalised EMA per bucket
        self.counts = np.zeros(len(SIZE_BUCKETS), dtype=np.int64)

    @staticmethod
    def bucket(size: int) -> int:
        """Index of the largest bucket not above ``size``."""
        return int(np.searchsorted(SIZE_BUCKETS, size, side="right") - 1)

    def record(self, size: int, context_len: int, seconds: float) -> None:
        b = self.bucket(min(size, SIZE_BUCKETS[-1]))
        normalised = seconds / (1.0 + context_len / self.context_scale)
        old = self.seconds[b]
        self.seconds[b] = normalised if np.isnan(old) else self.decay * old + (1 - self.decay) * normalised
        self.counts[b] += 1

    def curve(self, context_len: int) -> np.ndarray:
        """``[SIZE_BUCKETS[-1] + 1]`` estimated seconds for every tree size 0..64 (NaN if nothing measured)."""
        measured = ~np.isnan(self.seconds)
        sizes = np.arange(SIZE_BUCKETS[-1] + 1)
        if not measured.any():
            return np.full(len(sizes), np.nan)
        xs = np.asarray(SIZE_BUCKETS)[measured]
        ys = self.seconds[measured]
        base = ys[0] / (1 + PRIOR_SLOPE * xs[0])
        if len(xs) == 1:
            curve = base * (1 + PRIOR_SLOPE * sizes)
        else:
            # inside the measured range interpolate; outside, extend the slope of the nearest two
            # measured buckets (never flatter than a quarter of the prior slope)
            floor = base * PRIOR_SLOPE * 0.25
            curve = np.interp(sizes, xs, ys)
            slope_high = max((ys[-1] - ys[-2]) / (xs[-1] - xs[-2]), floor)
            slope_low = max((ys[1] - ys[0]) / (xs[1] - xs[0]), floor)
            above, below = sizes > xs[-1], sizes < xs[0]
            curve[above] = ys[-1] + slope_high * (sizes[above] - xs[-1])
            curve[below] = np.maximum(ys[0] - slope_low * (xs[0] - sizes[below]), 0.25 * ys[0])
        return curve * (1.0 + context_len / self.context_scale)


class Scheduler:
    """Chooses the verified tree size each step; shared by every request of one decoder.

    Args:
        max_budget: the largest tree it will verify.
        explore_every: every this many steps, verify the size bucket next to the choice, above and
            below in turn, so unmeasured costs and stale acceptance values get refreshed.
        decay: forgetting factor of the calibration and cost averages.
    """

    def __init__(self, max_budget: int = 48, explore_every: int = 16, decay: float = 0.9) -> None:
        if not 0 <= max_budget <= SIZE_BUCKETS[-1]:
            raise ValueError(f"max_budget must be between 0 and {SIZE_BUCKETS[-1]}, got {max_budget}")
        if explore_every < 1:
            raise ValueError(f"explore_every must be >= 1, got {explore_every}")
        self.max_budget = max_budget
        self.explore_every = explore_every
        self.decay = decay
        self.cost = CostModel()
        self.predicted = 1.0  # decayed sums for calibration = accepted / predicted
        self.accepted = 1.0
        self.overhead = 0.0  # EMA of per-step seconds outside the verify forward
        self.steps = 0
        self.decisions = 0
        self.last_size = 0
        self._lock = threading.Lock()

    @property
    def calibration(self) -> float:
        return self.accepted / self.predicted

    def draft_budget(self) -> int:
        """How many nodes to ask the drafters for: room to grow past the last choice."""
        return int(min(self.max_budget, max(8, 2 * self.last_size)))

    def choose_size(self, node_values: np.ndarray, context_len: int) -> int:
        """Number of best nodes to verify, given the proposed nodes' values (probabilities, best first)."""
        with self._lock:
            values = np.sort(np.asarray(node_values, dtype=np.float64))[::-1][: self.max_budget]
            gain = 1.0 + self.calibration * np.concatenate([[0.0], np.cumsum(values)])  # [m+1]
            cost = self.cost.curve(context_len)
            if np.isnan(cost).any():
                size = min(len(values), 8)  # nothing measured yet: a modest first tree
            else:
                rate = gain / (cost[: len(gain)] + self.overhead)
                size = int(np.argmax(rate))
            self.decisions += 1
            if self.decisions % self.explore_every == 0:
                size = self._neighbour(size, len(values), up=(self.decisions // self.explore_every) % 2 == 1)
            self.last_size = size
            return size

    @staticmethod
    def _neighbour(size: int, available: int, up: bool) -> int:
        """The size bucket next to ``size`` (above or below), within the available nodes."""
        if up:
            bigger = [b for b in SIZE_BUCKETS if b > size]
            return min(available, bigger[0]) if bigger and available > size else size
        smaller = [b for b in SIZE_BUCKETS if b < size]
        return smaller[-1] if smaller else size

    def record(self, size: int, context_len: int, verify_seconds: float, overhead_seconds: float,
               predicted_accepted: float, accepted: int) -> None:
        """One verified step: its size, timing, the summed value of its nodes and what was accepted."""
        with self._lock:
            self.steps += 1
            self.cost.record(size, context_len, verify_seconds)
            self.overhead = overhead_seconds if self.steps == 1 else 0.9 * self.overhead + 0.1 * overhead_seconds
            if size:
                self.predicted = self.decay * self.predicted + predicted_accepted
                self.accepted = self.decay * self.accepted + accepted

    def state_dict(self) -> dict:
        return {"cost_seconds": self.cost.seconds.tolist(), "cost_counts": self.cost.counts.tolist(),
                "predicted": self.predicted, "accepted": self.accepted, "overhead": self.overhead,
                "steps": self.steps}

    def load_state_dict(self, state: dict) -> None:
        """Restore `state_dict` output after validating every field (`drafters.state.StateError`)."""
        from drafters.state import array_field, float_field, int_field

        where = "scheduler state"
        raw = array_field(state, "cost_seconds", where, (len(SIZE_BUCKETS),), low=0.0, allow_nan=True)  # NaN: unmeasured
        counts = array_field(state, "cost_counts", where, (len(SIZE_BUCKETS),), "int", low=0)
        predicted = float_field(state, "predicted", where, low=1e-12)
        accepted = float_field(state, "accepted", where, low=0.0)
        overhead = float_field(state, "overhead", where, low=0.0)
        steps = int_field(state, "steps", where, low=0)
        self.cost.seconds, self.cost.counts = raw, counts
        self.predicted, self.accepted, self.overhead, self.steps = predicted, accepted, overhead, steps

    def explain(self, context_len: int = 512) -> dict:
        """What the scheduler believes: cost curve (ms) at ``context_len``, calibration, recent choices."""
        curve = self.cost.curve(context_len)
        return {
            "calibration": round(self.calibration, 3),
            "overhead_ms": round(1e3 * self.overhead, 2),
            "verify_ms": {int(b): (None if np.isnan(curve[b]) else round(1e3 * float(curve[b]), 1))
                          for b in SIZE_BUCKETS},
            "measured_buckets": {int(b): int(c) for b, c in zip(SIZE_BUCKETS, self.cost.counts) if c},
        }
