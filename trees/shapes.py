"""Static tree shapes: which (parent, child rank) slots a drafter fills, before any tokens exist.

A `TreeShape` is a template for drafters that propose ranked successors (Token Recycling, top-k of
a draft model): node ``node_idx`` is the ``ranks[node_idx]``-th best successor of its parent.
Shapes are listed in breadth-first order (parents first) with a prior log-score per node.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass
from typing import Sequence

import numba
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


def chain(length: int) -> TreeShape:
    """A single path of rank-0 successors."""
    if length < 0:
        raise ValueError(f"length must be >= 0, got {length}")
    prior = np.log(DEFAULT_RANK_PRIOR[0]) * np.arange(1, length + 1)
    return TreeShape(np.arange(length) - 1, np.zeros(length, dtype=np.int64), prior)


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


def wide_shallow(widths: Sequence[int], rates=DEFAULT_RANK_PRIOR, max_rank: int = 8) -> TreeShape:
    """A Token-Recycling-style shape with ``widths[d]`` nodes at depth ``d+1``.

    At each depth the nodes are the best (parent, rank) slots by prior value, so wide levels
    spread over the likeliest parents (the rank-0 chain gets the most children).
    """
    widths = [int(w) for w in widths]
    if any(w < 0 for w in widths):
        raise ValueError(f"widths must be non-negative, got {widths}")
    table = _rank_rates(rates, max_rank)
    parents: list[int] = []
    ranks: list[int] = []
    log_prior: list[float] = []
    depths: list[int] = []
    level: list[int] = [ROOT]
    for depth, width in enumerate(widths, start=1):
        row = table[min(depth - 1, len(table) - 1)]
        candidates = []
        for parent in level:
            base = 0.0 if parent == ROOT else log_prior[parent]
            for rank in range(min(max_rank, len(row))):
                if row[rank] > 0:
                    candidates.append((base + np.log(row[rank]), parent, rank))
        candidates.sort(key=lambda c: (-c[0], c[1], c[2]))
        level = []
        for value, parent, rank in sorted(candidates[:width], key=lambda c: (c[1], c[2])):
            level.append(len(parents))
            parents.append(parent)
            ranks.append(rank)
            log_prior.append(value)
            depths.append(depth)
        if not level:
            break
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


@numba.njit(cache=True)
def _sequoia_tables(rates, budget, max_depth):  # pragma: no cover - numba
    """DP over (nodes, depth, first free rank): best expected accepted tokens and choices."""
    max_rank = rates.shape[1]
    # best[d, b, m]: best value of <= m nodes hung under one parent whose children sit at depth d+1,
    # using child ranks b.. only; choice[d, b, m]: nodes given to the rank-b child (0 = none).
    best = np.zeros((max_depth + 1, max_rank + 1, budget + 1))
    choice = np.zeros((max_depth + 1, max_rank + 1, budget + 1), dtype=np.int64)
    for d in range(max_depth - 1, -1, -1):
        row = min(d, rates.shape[0] - 1)
        for b in range(max_rank - 1, -1, -1):
            p = rates[row, b]
            for m in range(1, budget + 1):
                value = best[d, b + 1, m]
                pick = 0
                if p > 0.0:
                    for s in range(1, m + 1):
                        candidate = p * (1.0 + best[d + 1, 0, s - 1]) + best[d, b + 1, m - s]
                        if candidate > value + 1e-12:
                            value = candidate
                            pick = s
                best[d, b, m] = value
                choice[d, b, m] = pick
    return best, choice


def sequoia(budget: int, rates=DEFAULT_RANK_PRIOR, max_depth: int = 8, max_rank: int = 8) -> TreeShape:
    """Sequoia-style optimal shape by dynamic programming over per-(depth, rank) acceptance rates.

    Maximises the expected number of accepted draft tokens (sum over nodes of the product of rates
    along the path) with at most ``budget`` nodes and depth at most ``max_depth``.
    """
    if not isinstance(budget, (int, np.integer)) or budget < 0:
        raise ValueError(f"budget must be a non-negative int, got {budget!r}")
    if max_depth < 1:
        raise ValueError(f"max_depth must be >= 1, got {max_depth}")
    table = _rank_rates(rates, max_rank)
    best, choice = _sequoia_tables(np.ascontiguousarray(table), int(budget), int(max_depth))
    parents: list[int] = []
    ranks: list[int] = []
    log_prior: list[float] = []
    depths: list[int] = []

    def build(parent: int, depth: int, rank: int, m: int, parent_log: float) -> None:
        while m > 0 and rank < table.shape[1]:
            size = int(choice[depth, rank, m])
            if size == 0:
                rank += 1
                continue
            node_idx = len(parents)
            node_log = parent_log + float(np.log(table[min(depth, len(table) - 1), rank]))
            parents.append(parent)
            ranks.append(rank)
            log_prior.append(node_log)
            depths.append(depth + 1)
            build(node_idx, depth + 1, 0, size - 1, node_log)
            m -= size
            rank += 1

    build(ROOT, 0, 0, int(budget), 0.0)
    return _breadth_first(parents, ranks, log_prior, depths)


def expected_accepted(shape: TreeShape) -> float:
    """Expected accepted draft tokens of a shape: the sum of its nodes' prior probabilities."""
    return float(np.exp(shape.log_prior.astype(np.float64)).sum())
