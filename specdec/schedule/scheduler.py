"""The acceptance-rate scheduler: which draft nodes to verify, from measured costs and values.

Each step the drafters propose a tree whose scores estimate, per node, the log-probability of
being reached and accepted. `Scheduler.select` calibrates those values per drafter and depth
(`specdec.schedule.calibration`), and keeps the ``n`` best nodes that maximise expected tokens per second::

    (1 + sum of the n best calibrated values) / (T(n, L) + overhead)

with ``T`` the fitted verify cost (`specdec.schedule.costs`); ``n = 0`` is plain decoding. Exploration is
driven by uncertainty: the size chosen maximises the rate with each cost lowered by `explore`
standard errors (optimism in the face of uncertainty), so a size whose cost is unknown or noisy is
measured while it could be the best one, and not once its cost is known to lose. No drafter is
starved: a drafter whose nodes were left out for `probe_every` steps gets its best `probe_nodes`
verified, so its acceptance keeps being measured at a bounded cost. Which drafters of a hybrid run
at all is chosen too (`drafters`, a `specdec.schedule.drafter_choice.DrafterChoice`): a drafter whose
accepted nodes do not pay for its drafting, merging and verification is skipped, and measured in
shadow until it would pay again. Decisions are a pure function of the recorded history, so they are deterministic.
"""

from __future__ import annotations

import threading

import numpy as np
import torch

from specdec.schedule.calibration import MAX_SOURCES, Calibration
from specdec.schedule.costs import POSITION_BUCKETS, SIZE_BUCKETS, CostModel
from specdec.schedule.drafter_choice import DrafterChoice
from trees import TokenTree

__all__ = ["Scheduler", "SIZE_BUCKETS"]
FIRST_POSITIONS = 9  # positions a forward verifies before anything is measured: a tree of 8 for one row


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
        self.batch_cost = CostModel(POSITION_BUCKETS)  # forwards of several rows, by query positions - 1
        self._overhead: dict[int, float] = {}  # by row count: EMA of per-step seconds outside the verify forward
        self.steps = 0
        self.probes = 0
        self.last_size = 0
        self._idle = np.zeros(MAX_SOURCES, dtype=np.int64)  # per drafter: steps since one of its nodes was verified
        self.drafters = DrafterChoice()
        self._lock = threading.Lock()

    def draft_budget(self) -> int:
        """How many nodes to ask the drafters for: room to grow past the last choice."""
        return int(min(self.max_budget, max(8, 2 * self.last_size)))

    def select(self, tree: TokenTree, context_len: int) -> TokenTree:
        """The sub-tree to verify: the best nodes by calibrated value, plus any due probes."""
        return self.select_batch([tree], context_len)[0]

    def select_batch(self, trees: list[TokenTree], context_len: int) -> list[TokenTree]:
        """The sub-trees to verify in one batched forward of ``len(trees)`` sequences (the longest
        at ``context_len``): every row keeps its ``n`` best nodes, ``n`` chosen for the whole
        batch from the cost measured for this many rows (a batched forward feeds ``n + 1`` slots
        a row), plus any due probes."""
        with self._lock:
            ranked = [self._ranked(tree) for tree in trees]
            size = self._size([values[order] for values, order, _ in ranked if order.size], context_len, len(trees))
            keeps = [self._best(tree, order, size) for tree, (_, order, _) in zip(trees, ranked)]
            if self.max_budget:
                self._probe(trees, keeps, [order for _, order, _ in ranked])
            selected = [self._closed(tree, keep, parents) for tree, keep, (_, _, parents) in zip(trees, keeps, ranked)]
            self.last_size = max(len(tree) for tree in selected)
        return selected

    def _ranked(self, tree: TokenTree) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(values, order, parents)``: calibrated node values (a child never above its parent)
        and the nodes best first, ancestors before descendants."""
        n = len(tree)
        if n == 0:
            return np.zeros(0), np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
        sources, depths = tree.sources.numpy(), tree.depths.numpy()
        values = self.calibration.apply(np.exp(tree.scores.numpy().astype(np.float64)), sources, depths)
        parents = tree.parents.numpy()
        for d in range(2, int(depths.max()) + 1):
            nodes = np.flatnonzero(depths == d)
            values[nodes] = np.minimum(values[nodes], values[parents[nodes]])
        return values, np.lexsort((np.arange(n), depths, -values)), parents

    @staticmethod
    def _best(tree: TokenTree, order: np.ndarray, size: int) -> np.ndarray:
        """``[n]`` bool: ``tree``'s ``size`` best nodes (``order``: best first)."""
        keep = np.zeros(len(tree), dtype=bool)
        keep[order[:size]] = True
        return keep

    @staticmethod
    def _closed(tree: TokenTree, keep: np.ndarray, parents: np.ndarray) -> TokenTree:
        """``tree`` cut to the nodes ``keep`` marks, closed over their ancestors."""
        if len(tree) == 0:
            return tree
        depths = tree.depths.numpy()
        for d in range(int(depths.max()), 1, -1):  # close over ancestors, deepest first
            nodes = np.flatnonzero((depths == d) & keep)
            keep[parents[nodes]] = True
        return tree if keep.all() else tree.select(torch.from_numpy(keep))

    def _size(self, rows: list[np.ndarray], context_len: int, batch: int = 1) -> int:
        """The per-row node count that maximises the optimistic rate of a forward of ``batch``
        rows, each row's node values sorted best first."""
        if not rows:
            return 0
        width = min(self.max_budget, max(len(values) for values in rows))
        gain = np.full(width + 1, float(batch))  # [m+1] expected tokens per step, every row's bonus token
        for values in rows:
            cumulative = np.concatenate([[0.0], np.cumsum(values[:width])])
            gain += np.pad(cumulative, (0, width + 1 - len(cumulative)), mode="edge")
        cost, error = self._curve(batch, context_len)
        if np.isnan(cost[0]):  # nothing measured yet: trees only as large as one row's first
            return min(width, max(0, FIRST_POSITIONS // batch - 1))
        cost, error = cost[: len(gain)], error[: len(gain)]
        # a cost's lower bound is also one for every larger size (costs are monotone in n)
        optimistic = np.maximum.accumulate(np.maximum(cost - self.explore * error, 0.5 * cost))
        return int(np.argmax(gain / (optimistic + self._overhead.get(batch, 0.0))))

    def _curve(self, batch: int, context_len: int) -> tuple[np.ndarray, np.ndarray]:
        """``([65], [65])`` seconds (and standard errors) of a forward of ``batch`` rows with 0..64
        nodes a row, the longest row at ``context_len``: one row's own curve, or the batched
        forwards' curve by query positions (``batch * (n + 1)``), whatever row count measured them,
        with the context counted over every row's keys; extended linearly past its largest bucket."""
        if batch == 1:
            return self.cost.curve(context_len)
        cost, error = self.batch_cost.curve(batch * context_len)
        index = batch * np.arange(SIZE_BUCKETS[-1] + 1) + batch - 1  # [65] positions - 1
        last = len(cost) - 1
        step = cost[last] - cost[last - 1]
        beyond = np.maximum(index - last, 0)
        index = np.minimum(index, last)
        return cost[index] + step * beyond, error[index] + (error[last] / cost[last]) * step * beyond

    def _probe(self, trees: list[TokenTree], keeps: list[np.ndarray], orders: list[np.ndarray]) -> None:
        """Once per step: a drafter none of whose nodes was kept in any row for `probe_every` steps
        gets its best `probe_nodes` verified, in the first row that has some (one row: in a batched
        forward every row pays for the largest tree); `_closed` adds their ancestors."""
        kept: dict[int, bool] = {}
        for tree, keep in zip(trees, keeps):
            sources = tree.sources.numpy()
            for source in np.unique(sources):
                kept[int(source)] = kept.get(int(source), False) or bool(keep[sources == source].any())
        for source, was_kept in kept.items():
            if was_kept:
                self._idle[source] = 0
                continue
            self._idle[source] += 1
            if self._idle[source] < self.probe_every:
                continue
            for tree, keep, order in zip(trees, keeps, orders):
                mine = tree.sources.numpy() == source
                if mine.any():
                    keep[[i for i in order if mine[i]][: self.probe_nodes]] = True
                    break
            self._idle[source] = 0
            self.probes += 1

    def record(self, tree: TokenTree, context_len: int, verify_seconds: float, overhead_seconds: float,
               accepted_nodes) -> None:
        """One verified step: the verified ``tree``, its timing, and the ``node_idx`` it accepted."""
        self.record_batch([tree], context_len, verify_seconds, overhead_seconds, [accepted_nodes])

    def record_batch(self, trees: list[TokenTree], context_len: int, verify_seconds: float, overhead_seconds: float,
                     accepted_nodes: list) -> None:
        """One batched step: the verified ``trees`` (one per row, the longest row at
        ``context_len``), its timing, and each row's accepted ``node_idx``."""
        batch = len(trees)
        with self._lock:
            self.steps += 1
            nodes = max(len(tree) for tree in trees)
            if batch == 1:
                self.cost.record(nodes, context_len, verify_seconds)
            else:
                self.batch_cost.record(batch * (nodes + 1) - 1, batch * context_len, verify_seconds)
            last = self._overhead.get(batch)
            self._overhead[batch] = overhead_seconds if last is None else 0.9 * last + 0.1 * overhead_seconds
            for tree, nodes in zip(trees, accepted_nodes):
                if len(tree):
                    accepted = np.zeros(len(tree), dtype=bool)
                    accepted[list(nodes)] = True
                    self.calibration.record(np.exp(tree.scores.numpy().astype(np.float64)), tree.sources.numpy(),
                                            tree.depths.numpy(), accepted)

    def choose_drafters(self, sources: list[int]) -> tuple[frozenset[int], frozenset[int]]:
        """The ``source_id`` s of a hybrid's members that propose into this step's tree, and those
        that propose in shadow (`DrafterChoice.choose`)."""
        with self._lock:
            return self.drafters.choose(sources)

    def record_drafters(self, usage, rows: int, nodes: int, context_len: int, step_seconds: float,
                        tokens: int) -> None:
        """What a hybrid's members cost and brought in one step of ``rows`` rows with trees of up
        to ``nodes`` nodes (the longest row at ``context_len``) that took ``step_seconds`` and
        emitted ``tokens``; a node is priced from the fitted cost curve between one node and ``nodes``."""
        with self._lock:
            cost = self._curve(rows, context_len)[0]
            node_seconds = float(cost[nodes] - cost[1]) / (nodes - 1) if nodes >= 2 else 0.0
            self.drafters.record(usage, step_seconds, tokens, rows, node_seconds if node_seconds > 0 else 0.0)

    @property
    def overhead(self) -> float:
        """EMA of per-step seconds outside the verify forward (one-sequence steps)."""
        return self._overhead.get(1, 0.0)

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
        self.cost, self.calibration, self.steps = cost, calibration, steps
        self._overhead = {1: overhead} if steps else {}

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
            "drafters": self.drafters.explain(names),
            "drafter_skips": self.drafters.skips,
        }
