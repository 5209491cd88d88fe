"""A verify forward's tree slots level by level, and the walk that steps recurrent state along them.

Along a tree a node's state is its parent's state advanced by the node's own input, so every slot
at depth d can be stepped together, from its parent's state at depth d - 1 (the root's from the
row's cached state): D + 1 calls of a layer's own single-token function for a tree of depth D,
the same arithmetic as decoding the nodes one at a time, which is what ``model.generate`` does.

`TreeLevels` holds the step's slot order; `tree_forward` makes it the active tree of the calling
thread while the verify forward runs (the seams read it from there: some of transformers' seam
functions get neither the cache nor the layer), and `walk` runs one layer's steps.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class Level:
    """The slots of one depth: ``rows``, ``slots`` and ``parents`` (``[m]`` int64 on the device;
    ``parents[i]`` is the slot of ``slots[i]``'s parent in the same row, or -1 for the row's
    cached state, which ``from_cache`` then says of every slot of this level)."""

    rows: torch.Tensor
    slots: torch.Tensor
    parents: torch.Tensor
    from_cache: bool


@dataclass(frozen=True)
class TreeLevels:
    """``B`` rows of ``q`` slots, by depth: ``levels[d]`` the slots at depth d (level 0: each
    row's root, and padding slots, which start from the cached state and are never accepted)."""

    rows: int
    queries: int
    levels: tuple[Level, ...]

    @classmethod
    def from_parents(cls, parent_slots: np.ndarray, depths: np.ndarray, device) -> "TreeLevels":
        """From ``[B, q]`` host arrays: each slot's parent slot (itself for the root and padding)
        and depth."""
        rows, queries = parent_slots.shape
        slot_idx = np.arange(queries)
        from_cache = parent_slots == slot_idx[None, :]  # [B, q]: the root and padding
        level_of = np.where(from_cache, 0, depths)  # [B, q]
        levels = []
        for depth in range(int(level_of.max()) + 1):
            row_idx, node_idx = np.nonzero(level_of == depth)
            parents = np.where(from_cache[row_idx, node_idx], -1, parent_slots[row_idx, node_idx])
            levels.append(Level(*(torch.from_numpy(np.ascontiguousarray(a, dtype=np.int64)).to(device)
                                  for a in (row_idx, node_idx, parents)), from_cache=depth == 0))
        return cls(rows, queries, tuple(levels))

    @classmethod
    def chain(cls, queries: int, device) -> "TreeLevels":
        """One row of ``queries`` slots, each the child of the one before: a prefill chunk."""
        slot_idx = np.arange(queries)
        return cls.from_parents(np.maximum(slot_idx - 1, 0)[None], slot_idx[None], device)


_ACTIVE: ContextVar[TreeLevels | None] = ContextVar("specdec_tree_levels", default=None)


def active() -> TreeLevels | None:
    """The tree of the verify forward running on this thread, or None outside one."""
    return _ACTIVE.get()


@contextmanager
def tree_forward(levels: TreeLevels) -> Iterator[None]:
    """Make ``levels`` the active tree of this thread for the duration of a verify forward."""
    token = _ACTIVE.set(levels)
    try:
        yield
    finally:
        _ACTIVE.reset(token)


Step = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def walk(levels: TreeLevels, cached: torch.Tensor, step: Step) -> tuple[torch.Tensor, torch.Tensor]:
    """Step one layer's state along the tree.

    ``cached``: ``[B, *S]`` each row's state before its root. ``step(states [m, *S], rows [m],
    slots [m])`` advances the given states by those slots' inputs and returns ``(new states
    [m, *S], outputs [m, *O])``; it may change ``states`` in place (it gets a copy).
    Returns ``(node states [B, q, *S], outputs [B, q, *O])``, slot order.
    """
    node_states = cached.new_empty(levels.rows, levels.queries, *cached.shape[1:])  # [B, q, *S]
    outputs = None
    for level in levels.levels:
        parents = (cached.index_select(0, level.rows) if level.from_cache
                   else node_states[level.rows, level.parents])  # [m, *S], a copy either way
        states, out = step(parents, level.rows, level.slots)
        node_states[level.rows, level.slots] = states
        if outputs is None:
            outputs = out.new_empty(levels.rows, levels.queries, *out.shape[1:])  # [B, q, *O]: every slot is in a level
        outputs[level.rows, level.slots] = out
    return node_states, outputs
