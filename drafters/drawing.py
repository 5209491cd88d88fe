"""Drawn trees: a fixed best-first shape whose children are drawn from a drafter's distributions.

Under sampling, a drafter with distributions of its own (a draft model, the head) fixes the tree's
shape before any draw (best-first over the rank prior, so it does not depend on the tokens), then
fills it depth by depth: the nodes of a depth that have children get one draft distribution each
(one batched forward of the drafter), and each parent's children are drawn from it without
replacement in rank order. The tree carries those distributions (`trees.DraftDraws`) so the
target can verify it by rejection sampling; node scores are the shape's priors, so pruning by
score keeps the first draws of each parent.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from trees import DEFAULT_RANK_PRIOR, ROOT, DraftDraws, TokenTree, TreeShape, best_first


@dataclass(frozen=True)
class DrawDepth:
    """One depth of a `DrawPlan` (host arrays; node_idx are the shape's, breadth-first).

    Attributes:
        nodes: the depth's node_idx (contiguous).
        expand: the node_idx of the depth above whose children are drawn here, in row order
            (empty at depth 1: the root's children come from the root's distribution).
        expand_parents: for each ``expand`` node, the index of its parent in the depth above's
            ``expand`` (0 for children of the root).
        visible: ``[len(expand), fed]`` bool, the ancestors (itself included) of each ``expand``
            node among every node fed so far, these last (a draft model's tree mask).
        fed_depths: ``[fed]`` the depths of the nodes fed so far.
        local_rows: for each node, the index of its parent in ``expand`` (0: the root).
        rows: for each node, the global row of the distribution it is drawn from (0: the root's).
    """

    nodes: np.ndarray
    expand: np.ndarray
    expand_parents: np.ndarray
    visible: np.ndarray
    fed_depths: np.ndarray
    local_rows: np.ndarray
    rows: np.ndarray


class DrawPlan:
    """The shape of a drawn tree of ``budget`` nodes and how to fill it, depth by depth."""

    def __init__(self, budget: int, max_depth: int, top_k: int) -> None:
        self.shape: TreeShape = best_first(budget, DEFAULT_RANK_PRIOR, max_depth=max_depth, max_rank=top_k)
        self._on_device: dict[str, list[dict[str, torch.Tensor]]] = {}
        parents, depths = self.shape.parents, self.shape.depths
        ancestors: list[set[int]] = []
        for node, parent in enumerate(parents):
            ancestors.append({node} | (ancestors[parent] if parent != ROOT else set()))
        row_of, fed, previous = {ROOT: 0}, [], [ROOT]
        self.depths: list[DrawDepth] = []
        for depth in range(1, int(depths.max(initial=0)) + 1):
            nodes = np.flatnonzero(depths == depth)
            expand = [] if depth == 1 else sorted({int(parents[m]) for m in nodes})
            for node in expand:
                row_of[node] = len(row_of)
            fed.extend(expand)
            index_in = {node: i for i, node in enumerate(expand or [ROOT])}
            self.depths.append(DrawDepth(
                nodes=nodes, expand=np.array(expand, dtype=np.int64),
                expand_parents=np.array([previous.index(int(parents[m])) if parents[m] != ROOT else 0
                                         for m in expand], dtype=np.int64),
                visible=np.array([[c in ancestors[p] for c in fed] for p in expand], dtype=bool),
                fed_depths=depths[np.array(fed, dtype=np.int64)],
                local_rows=np.array([index_in[int(parents[m])] for m in nodes], dtype=np.int64),
                rows=np.array([row_of[int(parents[m])] for m in nodes], dtype=np.int64)))
            previous = expand or [ROOT]

    def __len__(self) -> int:
        return len(self.shape)

    def on(self, device: torch.device) -> list[dict[str, torch.Tensor]]:
        """Per depth, the index arrays drafting reads, on ``device`` (copied there once per plan):
        ``expand``, ``expand_parents``, ``visible``, ``fed_depths``, ``local_rows`` and ``ranks``."""
        key = str(device)
        if key not in self._on_device:
            self._on_device[key] = [{name: torch.from_numpy(np.ascontiguousarray(value)).to(device) for name, value in (
                ("expand", depth.expand), ("expand_parents", depth.expand_parents), ("visible", depth.visible),
                ("fed_depths", depth.fed_depths), ("local_rows", depth.local_rows), ("ranks", self.ranks(depth)))}
                for depth in self.depths]
        return self._on_device[key]

    def ranks(self, depth: DrawDepth) -> np.ndarray:
        return self.shape.ranks[depth.nodes]

    def tree(self, drawn: list[torch.Tensor], probs: list[torch.Tensor], source_id: int) -> TokenTree:
        """The tree of the first ``len(drawn)`` depths: ``drawn`` each depth's tokens (device),
        ``probs`` the ``[r, V]`` rows they were drawn from; the tokens' one copy to the host."""
        depths = self.depths[: len(drawn)]
        n, shape = sum(len(d.nodes) for d in depths), self.shape
        tokens = torch.tensor(torch.cat(drawn).tolist(), dtype=torch.long)
        return TokenTree(tokens, torch.from_numpy(shape.parents[:n]), torch.from_numpy(shape.log_prior[:n]),
                         torch.full((n,), source_id, dtype=torch.int8), torch.from_numpy(shape.ranks[:n]),
                         DraftDraws(torch.cat(probs), torch.from_numpy(np.concatenate([d.rows for d in depths]))))


def draw_children(probs: torch.Tensor, local_rows: torch.Tensor, ranks: torch.Tensor, width: int,
                  generator) -> torch.Tensor:
    """``[m]`` drawn tokens: node j is the ``ranks[j]``-th draw without replacement from row
    ``local_rows[j]`` of ``probs [r, V]`` (the exponential race: the order of ``E_v / q_v``,
    ``E ~ Exp(1)``, is sequential sampling without replacement); ``width`` (host) bounds the
    ranks. All on ``probs``' device, no host read."""
    race = probs.log() - torch.empty_like(probs).exponential_(generator=generator).log()  # [r, V]
    drawn = race.topk(width, dim=-1).indices  # [r, width] in draw order
    return drawn[local_rows, ranks]


def draft_generator(device: torch.device, seed: int) -> torch.Generator:
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    return generator
