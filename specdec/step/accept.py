"""Acceptance on the device, and the step's one read of its outcome.

Given the target's choice at every slot (the argmax for greedy decoding, a draw for sampling), a
slot is *matched* when its token is its parent's choice (only the first sibling with a token can
match) and *on the accepted path* when it and all its ancestors are matched. Matched slots form a
single chain from the root, so the accepted path is the deepest slot on it: a few gathers over
the ancestor matrix, no loop over depths, no reads. The bonus token is the choice at that slot.

Sampled verification uses the delta rule with one uniform per depth (the uniform of that depth's
sequence position), shared by every slot at that depth: the walk that draws at each slot it
visits and follows the child carrying the draw visits one slot per depth, so each uniform it uses
decides one draw, independent of the others, and the output keeps the target's distribution.
Trees whose tokens a drafter drew from its own distributions are verified by rejection sampling
instead (`specdec.step.sampling.accept_drawn`), which returns the same `Accepted`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from specdec.device.tree import DeviceTree


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
    rows = accept_rows(tree.tokens[None], tree.parent_slots[None], tree.candidates[None], tree.ancestors[None],
                       tree.depths[None], tree.paths[None], choices[None])
    return Accepted(path=rows.path[0], block=rows.block[0], count=rows.count[0])


def accept_rows(tokens: torch.Tensor, parent_slots: torch.Tensor, candidates: torch.Tensor, ancestors: torch.Tensor,
                depths: torch.Tensor, paths: torch.Tensor, choices: torch.Tensor) -> Accepted:
    """`accept` for ``B`` trees at once, each padded to ``q`` slots: ``tokens``, ``parent_slots``,
    ``candidates``, ``depths``, ``choices`` ``[B, q]``, ``ancestors [B, q, q]``, ``paths [B, q, D]``.
    Returns ``path``, ``block`` ``[B, D]`` and ``count [B]``."""
    matched = (tokens == choices.gather(1, parent_slots)) & candidates  # [B, q]
    matched[:, 0] = True  # the root is committed already
    on_path = ~(ancestors & ~matched[:, None, :]).any(dim=-1)  # [B, q]: every slot from the root to here matched
    best = torch.where(on_path, depths, -1).argmax(dim=-1)  # [B] the tips: matched slots form one chain
    rows = torch.arange(tokens.shape[0], device=tokens.device)
    path = paths[rows, best]  # [B, D]
    count = depths[rows, best] + 1  # [B]
    bonus = choices[rows, best][:, None]  # [B, 1]
    block = torch.cat([tokens.gather(1, path[:, 1:]), bonus], dim=1)  # [B, D]
    block = block.scatter(1, (count - 1)[:, None], bonus)  # the bonus right after the path
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


def read_outcomes(accepted: Accepted, topk_ids: torch.Tensor | None, slots: list[int | None]) -> list[Outcome | None]:
    """The outcomes of ``B`` rows (``accepted`` from `accept_rows`) and, when asked, the top-k ids
    ``[B * q, k]`` of their ``q`` slots, in one transfer: the step's only blocking read.
    ``slots[b]`` is how many of row b's slots are real (None: an idle row, whose outcome is None)."""
    batch, width = accepted.path.shape
    parts = [accepted.count, accepted.path.reshape(-1), accepted.block.reshape(-1)]
    if topk_ids is not None:
        parts.append(topk_ids.reshape(-1))
    host = torch.cat(parts).tolist()
    counts = host[:batch]
    paths = host[batch : batch + batch * width]
    blocks = host[batch + batch * width : batch + 2 * batch * width]
    if topk_ids is not None:
        topk = np.asarray(host[batch + 2 * batch * width :], dtype=np.int64).reshape(batch, -1, topk_ids.shape[-1])
    outcomes = []
    for b, real in enumerate(slots):
        if real is None:
            outcomes.append(None)
            continue
        row = slice(b * width, b * width + counts[b])
        outcomes.append(Outcome(path_slots=paths[row], tokens=blocks[row],
                                topk_ids=topk[b, :real] if topk_ids is not None else np.zeros((0, 0), np.int64)))
    return outcomes
