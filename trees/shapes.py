"""Static tree shapes: which (parent, child rank) slots a drafter fills, before any tokens exist.

A `TreeShape` is a template for drafters that propose ranked successors (Token Recycling, top-k of
a draft model): node ``node_idx`` is the ``ranks[node_idx]``-th best successor of its parent.
Shapes are listed in breadth-first order (parents first) with a prior log-score per node.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass

import numpy as np

ROOT = -1

# Prior probability that the rank-r successor is the target's choice, before anything is learned.
# Measured order of magnitude for Token Recycling on SmolLM2-135M (top-1 accepted ~45% of the time).
DEFAULT_RANK_PRIOR = (0.45, 0.12, 0.06, 0.04, 0.03, 0.02, 0.015, 0.01)


@dataclass(frozen=True)
class TreeShape:
    """A tree template.

    Attributes:
        parents: ``[n]`` int64 parent ``node_idx`` (``-1`` for children of the root).
        ranks: ``[n]`` int64 successor rank of each node under its parent (0 = best).
        log_prior: ``[n]`` float32 prior log-probability that the node is reached and accepted.
    """

    parents: np.ndarray
    ranks: np.ndarray
    log_prior: np.ndarray

    def __post_init__(self) -> None:
        n = len(self.parents)
        if len(self.ranks) != n or len(self.log_prior) != n:
            raise ValueError("parents, ranks and log_prior must have the same length")
        parents = np.asarray(self.parents, dtype=np.int64)
        if n and ((parents < ROOT).any() or (parents >= np.arange(n)).any()):
            raise ValueError("parents[i] must be -1 (root) or the index of an earlier node")
        if n and (np.asarray(self.ranks) < 0).any():
            raise ValueError("ranks must be non-negative")
        object.__setattr__(self, "parents", parents)
        object.__setattr__(self, "ranks", np.asarray(self.ranks, dtype=np.int64))
        object.__setattr__(self, "log_prior", np.asarray(self.log_prior, dtype=np.float32))

    def __len__(self) -> int:
        return len(self.parents)

    @property
    def depths(self) -> np.ndarray:
        depths = np.zeros(len(self), dtype=np.int64)
        for node_idx, parent in enumerate(self.parents):
            depths[node_idx] = 1 if parent == ROOT else depths[parent] + 1
        return depths

    def widths(self) -> tuple[int, ...]:
        """Number of nodes at each depth (depth 1 first)."""
        return tuple(int(c) for c in np.bincount(self.depths)[1:]) if len(self) else ()


def _rank_rates(rates, max_rank: int) -> np.ndarray:
    rates = np.asarray(rates, dtype=np.float64)
    if rates.ndim == 1:
        rates = rates[None, :]
    if rates.ndim != 2 or rates.shape[1] == 0:
        raise ValueError("rates must be a [ranks] or [depths, ranks] array")
    if (rates < 0).any() or (rates > 1).any():
        raise ValueError("rates must lie in [0, 1]")
    return rates[:, :max_rank]


def best_first(budget: int, rates=DEFAULT_RANK_PRIOR, max_depth: int = 16, max_rank: int = 8) -> TreeShape:
    """The ``budget`` nodes of highest prior value, value = product of per-edge acceptance rates.

    ``rates[depth-1][rank]`` (or ``rates[rank]`` for every depth) is the probability that the
    rank-``rank`` successor at that depth is accepted given its parent was. Since expected accepted
    length is the sum of node values and values shrink along paths, the top-N set is the optimal
    ancestor-closed tree of N nodes under that model (greedy, heap-based).
    """
    if not isinstance(budget, (int, np.integer)) or budget < 0:
        raise ValueError(f"budget must be a non-negative int, got {budget!r}")
    if max_depth < 1:
        raise ValueError(f"max_depth must be >= 1, got {max_depth}")
    table = _rank_rates(rates, max_rank)

    def rate(depth: int, rank: int) -> float:
        row = table[min(depth - 1, len(table) - 1)]
        return float(row[rank]) if rank < len(row) else 0.0

    parents: list[int] = []
    ranks: list[int] = []
    log_prior: list[float] = []
    depths: list[int] = []
    # heap of (-log value, tie-break counter, parent node_idx, rank, depth)
    heap: list[tuple[float, int, int, int, int]] = []
    counter = 0

    def push(parent: int, rank: int, depth: int, parent_log: float) -> None:
        nonlocal counter
        r = rate(depth, rank)
        if depth > max_depth or r <= 0.0:
            return
        heapq.heappush(heap, (-(parent_log + np.log(r)), counter, parent, rank, depth))
        counter += 1

    push(ROOT, 0, 1, 0.0)
    while heap and len(parents) < budget:
        neg_log, _, parent, rank, depth = heapq.heappop(heap)
        node_idx = len(parents)
        parents.append(parent)
        ranks.append(rank)
        log_prior.append(-neg_log)
        depths.append(depth)
        push(parent, rank + 1, depth, log_prior[parent] if parent != ROOT else 0.0)
        push(node_idx, 0, depth + 1, -neg_log)
    return _breadth_first(parents, ranks, log_prior, depths)


def _breadth_first(parents, ranks, log_prior, depths) -> TreeShape:
    """Reorder nodes by (depth, parent, rank) so each depth is a contiguous level."""
    n = len(parents)
    order = sorted(range(n), key=lambda i: (depths[i], i))
    new_index = {old: new for new, old in enumerate(order)}
    return TreeShape(
        np.array([ROOT if parents[i] == ROOT else new_index[parents[i]] for i in order], dtype=np.int64),
        np.array([ranks[i] for i in order], dtype=np.int64),
        np.array([log_prior[i] for i in order], dtype=np.float32),
    )
