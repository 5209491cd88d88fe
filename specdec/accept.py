"""Acceptance on the device, and the step's one read of its outcome.

Given the target's choice at every slot (the argmax for greedy decoding, a draw for sampling), a
slot is *matched* when its token is its parent's choice (only the first sibling with a token can
match) and *on the accepted path* when it and all its ancestors are matched. Matched slots form a
single chain from the root, so the accepted path is the deepest slot on it: a few gathers over
the ancestor matrix, no loop over depths, no reads. The bonus token is the choice at that slot.

Sampled verification uses the delta rule with one independent draw per slot: the walk that would
draw at each visited slot and follow the child carrying the draw sees exactly these draws (the
draws at slots it never visits are never used), so the output keeps the target's distribution.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from specdec.device_tree import DeviceTree


@dataclass(frozen=True)
class Accepted:
    """Device-side outcome of one verification.

    Attributes:
        path: ``[max_depth+1]`` int64 slots of the accepted path from the root (the first
            ``count`` entries; the rest is padding).
        block: ``[max_depth+1]`` int64 committed tokens: accepted draft tokens then the bonus token
            (the first ``count`` entries).
        count: 0-d int64, root plus accepted nodes (= tokens committed).
    """

    path: torch.Tensor
    block: torch.Tensor
    count: torch.Tensor


def accept(tree: DeviceTree, choices: torch.Tensor) -> Accepted:
    """The accepted path given the target's choice ``choices [n+1]`` (int64) at every slot."""
    matched = (tree.tokens == choices[tree.parent_slots]) & tree.candidates  # [n+1]
    matched[0] = True  # the root is committed already
    on_path = ~(tree.ancestors & ~matched).any(dim=-1)  # [n+1]: every slot from the root to here matched
    best = torch.where(on_path, tree.depths, -1).argmax()  # the tip: matched slots form one chain
    path = tree.paths[best]  # [D+1]
    count = tree.depths[best] + 1
    block = torch.cat([tree.tokens[path[1:]], choices[best].view(1)])  # [D+1]
    block = block.scatter(0, (count - 1).view(1), choices[best].view(1))  # the bonus right after the path
    return Accepted(path=path, block=block, count=count)


@dataclass(frozen=True)
class Outcome:
    """What the host learns from one verification (from a single device-to-host copy).

    Attributes:
        path_slots: slots of the root and the accepted nodes, in path order.
        tokens: the committed tokens: accepted draft tokens, then the bonus token.
        topk_ids: ``[n+1, k]`` the target's top-k tokens at every slot (``k = 0``: none asked).
    """

    path_slots: list[int]
    tokens: list[int]
    topk_ids: np.ndarray

    @property
    def accepted_nodes(self) -> tuple[int, ...]:
        """``node_idx`` of the accepted draft nodes, root to tip."""
        return tuple(slot - 1 for slot in self.path_slots[1:])

    @property
    def bonus_token(self) -> int:
        return self.tokens[-1]


def read_outcome(accepted: Accepted, topk_ids: torch.Tensor | None) -> Outcome:
    """Copy the outcome (and the top-k ids ``[n+1, k]`` the drafters learn from) to the host in
    one transfer: the only blocking read of the step."""
    width = accepted.path.numel()
    parts = [accepted.count.view(1), accepted.path, accepted.block]
    if topk_ids is not None:
        parts.append(topk_ids.reshape(-1))
    host = torch.cat(parts).tolist()  # the step's synchronisation point
    count = host[0]
    slots = host[1 : 1 + width]
    block = host[1 + width : 1 + 2 * width]
    topk = np.asarray(host[1 + 2 * width :], dtype=np.int64).reshape(topk_ids.shape) if topk_ids is not None \
        else np.zeros((0, 0), dtype=np.int64)
    return Outcome(path_slots=slots[:count], tokens=block[:count], topk_ids=topk)
