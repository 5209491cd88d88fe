"""The acceptance-rate scheduler: which draft nodes to verify, from measured costs and values.

Each step the drafters propose a tree whose scores estimate, per node, the log-probability of
being reached and accepted. `Scheduler.select` calibrates those values per drafter and depth
(`specdec.calibration`), and keeps the ``n`` best nodes that maximise expected tokens per second::

    (1 + sum of the n best calibrated values) / (T(n, L) + overhead)

with ``T`` the fitted verify cost (`specdec.costs`); ``n = 0`` is plain decoding. Exploration is
driven by uncertainty: the size chosen maximises the rate with each cost lowered by `explore`
standard errors (optimism in the face of uncertainty), so a size whose cost is unknown or noisy is
measured while it could be the best one, and not once its cost is known to lose. No drafter is
starved: a drafter whose nodes were left out for `probe_every` steps gets its best `probe_nodes`
verified, so its acceptance keeps being measured at a bounded cost. Decisions are a pure function
of the recorded history, so they are deterministic.
"""

from __future__ import annotations

import threading

import numpy as np
import torch

from specdec.calibration import Calibration
from specdec.costs import SIZE_BUCKETS, CostModel
from trees import TokenTree

__all__ = ["Scheduler", "SIZE_BUCKETS"]
FIRST_SIZE = 8  # the tree verified before anything is measured


class Scheduler:
    """Chooses the verified nodes each step; shared by every request of one decoder.

    Args:
        max_budget: the largest tree it will verify (0..64).
        probe_every: a drafter none of whose nodes was verified for this many steps gets a probe.
        probe_nodes: how many of its best nodes a probe verifies.
        explore: standard errors of optimism on costs (0: always exploit the point estimates).
        decay: forgetting factor of the calibration sums (per step) and the overhead average.
    """

    def __init__(self, max_budget: int = 48, probe_every: int = 8, probe_nodes: int = 2, explore: float = 1.0,
                 decay: float = 0.97) -> None:
        if not 0 <= max_budget <= SIZE_BUCKETS[-1]:
            raise ValueError(f"max_budget must be between 0 and {SIZE_BUCKETS[-1]}, got {max_budget}")
        if probe_every < 1 or probe_nodes < 1:
            raise ValueError(f"probe_every and probe_nodes must be >= 1, got {probe_every} and {probe_nodes}")
        if not explore >= 0:
            raise ValueError(f"explore must be >= 0, got {explore}")
        self.max_budget = max_budget
        self.probe_every = probe_every
        self.probe_nodes = probe_nodes
        self.explore = explore
        self.cost = CostModel()
        self.calibration = Calibration(decay)
        self.overhead = 0.0  # EMA of per-step seconds outside the verify forward
        self.steps = 0
        self.probes = 0
        self.last_size = 0
        self._idle = np.zeros(16, dtype=np.int64)  # per drafter: steps since one of its nodes was verified
        self._lock = threading.Lock()

    def draft_budget(self) -> int:
        """How many nodes to ask the drafters for: room to grow past the last choice."""
        return int(min(self.max_budget, max(8, 2 * self.last_size)))

    def choose_size(self, values: np.ndarray, context_len: int) -> int:
        """How many of the nodes with calibrated ``values`` (any order) to verify at ``context_len``."""
        with self._lock:
            return self._size(np.sort(np.asarray(values, dtype=np.float64))[::-1], context_len)

    def select(self, tree: TokenTree, context_len: int) -> TokenTree:
        """The sub-tree to verify: the best nodes by calibrated value, plus any due probes."""
        n = len(tree)
        with self._lock:
            if n == 0:
                self.last_size = 0
                return tree
            sources, depths = tree.sources.numpy(), tree.depths.numpy()
            values = self.calibration.apply(np.exp(tree.scores.numpy().astype(np.float64)), sources, depths)
            parents = tree.parents.numpy()
            by_depth = [np.flatnonzero(depths == d) for d in range(2, int(depths.max()) + 1)]
            for nodes in by_depth:  # a child never beats its parent
                values[nodes] = np.minimum(values[nodes], values[parents[nodes]])
            order = np.lexsort((np.arange(n), depths, -values))  # best first, ancestors before descendants
            keep = np.zeros(n, dtype=bool)
            keep[order[: self._size(values[order], context_len)]] = True
            if self.max_budget:
                self._probe(keep, order, sources)
            for nodes in reversed(by_depth):  # close over ancestors, deepest first
                keep[parents[nodes[keep[nodes]]]] = True
            self.last_size = int(keep.sum())
        return tree if keep.all() else tree.select(torch.from_numpy(keep))

    def _size(self, values: np.ndarray, context_len: int) -> int:
        """The number of leading ``values`` (sorted best first) that maximises the optimistic rate."""
        values = values[: self.max_budget]
        gain = 1.0 + np.concatenate([[0.0], np.cumsum(values)])  # [m+1] expected tokens per step
        cost, error = self.cost.curve(context_len)
        if np.isnan(cost[0]):
            return min(len(values), FIRST_SIZE)
        cost, error = cost[: len(gain)], error[: len(gain)]
        # a cost's lower bound is also one for every larger size (costs are monotone in n)
        optimistic = np.maximum.accumulate(np.maximum(cost - self.explore * error, 0.5 * cost))
        return int(np.argmax(gain / (optimistic + self.overhead)))

    def _probe(self, keep: np.ndarray, order: np.ndarray, sources: np.ndarray) -> None:
        """Add the best nodes of every drafter left out for `probe_every` steps (`select` adds their ancestors)."""
        for source in np.unique(sources):
            mine = sources == source
            if keep[mine].any():
                self._idle[source] = 0
                continue
            self._idle[source] += 1
            if self._idle[source] >= self.probe_every:
                best = [i for i in order if mine[i]][: self.probe_nodes]
                keep[best] = True
                self._idle[source] = 0
                self.probes += 1

    def record(self, tree: TokenTree, context_len: int, verify_seconds: float, overhead_seconds: float,
               accepted_nodes) -> None:
        """One verified step: the verified ``tree``, its timing, and the ``node_idx`` it accepted."""
        with self._lock:
            self.steps += 1
            self.cost.record(len(tree), context_len, verify_seconds)
            self.overhead = overhead_seconds if self.steps == 1 else 0.9 * self.overhead + 0.1 * overhead_seconds
            if len(tree):
                accepted = np.zeros(len(tree), dtype=bool)
                accepted[list(accepted_nodes)] = True
                self.calibration.record(np.exp(tree.scores.numpy().astype(np.float64)), tree.sources.numpy(),
                                        tree.depths.numpy(), accepted)

    def state_dict(self) -> dict:
        return {"cost": self.cost.state_dict(), "calibration": self.calibration.state_dict(),
                "overhead": self.overhead, "steps": self.steps}

    def load_state_dict(self, state: dict) -> None:
        """Restore `state_dict` output after validating every field (`drafters.state.StateError`)."""
        from drafters.state import StateError, field, float_field, int_field

        where = "scheduler state"
        cost, calibration = CostModel(), Calibration(self.calibration.decay)
        for part, key in ((cost, "cost"), (calibration, "calibration")):
            value = field(state, key, where)
            if not isinstance(value, dict):
                raise StateError(f"{where}: {key} must be a dictionary, got {type(value).__name__}")
            part.load_state_dict(value, f"{where}: {key}")
        overhead = float_field(state, "overhead", where, low=0.0)
        steps = int_field(state, "steps", where, low=0)
        self.cost, self.calibration, self.overhead, self.steps = cost, calibration, overhead, steps

    def explain(self, context_len: int = 512, names: dict[int, str] | None = None) -> dict:
        """What the scheduler believes: the fitted cost curve (ms) at ``context_len`` with its
        standard errors, the context slope, the per-drafter calibration, and how often it probed."""
        curve, error = self.cost.curve(context_len)
        counts = self.cost.counts
        return {
            "overhead_ms": round(1e3 * self.overhead, 2),
            "verify_ms": {int(b): (None if np.isnan(curve[b]) else round(1e3 * float(curve[b]), 2))
                          for b in SIZE_BUCKETS},
            "verify_ms_error": {int(b): round(1e3 * float(error[b]), 2) for b in SIZE_BUCKETS
                                if not np.isnan(error[b])},
            "ms_per_1k_context": round(1e6 * self.cost.context_slope(), 3),
            "measured": {int(b): int(c) for b, c in zip(SIZE_BUCKETS, counts) if c},
            "calibration": self.calibration.report(names),
            "probes": self.probes,
        }
