"""Verification: one target forward over ``[root] + tree`` and greedy acceptance."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from drafters.masks import masks_for
from drafters.modeling import forward_with_cache
from trees import TokenTree


def tree_forward(model, cache, root_token: int, tree: TokenTree, prefix_len: int, kernel=None) -> torch.Tensor:
    """Run the target on ``[root] + tree.tokens`` after ``prefix_len`` cached tokens.

    The tree's KV is appended to ``cache`` (compact it afterwards). With ``kernel`` (a
    `specdec.attention.TreeKernel`) attention runs through ``torch.ops.specdec.tree_attention``
    on the packed ancestor bits; otherwise through the model's own attention with an additive 4D
    mask. Returns logits ``[n+1, V]`` in slot order (slot 0 = root).
    """
    device = model.device
    input_ids = torch.cat([torch.tensor([root_token]), tree.tokens])[None].to(device)  # [1, n+1]
    position_ids = (tree.position_ids(prefix_len) if len(tree) else torch.tensor([[prefix_len]])).to(device)
    if len(tree) and kernel is not None:
        from specdec.attention import TREE_KWARG, TreeMeta

        meta = TreeMeta(tree.packed_ancestor_mask().to(device), prefix_len)  # [n+1, ceil((n+1)/64)] int64
        with kernel.active():
            out = forward_with_cache(model, cache, input_ids=input_ids, position_ids=position_ids,
                                     **{TREE_KWARG: meta})
        return out.logits[0]
    mask = tree_masks(model, tree, prefix_len) if len(tree) else None
    out = forward_with_cache(model, cache, input_ids=input_ids, attention_mask=mask, position_ids=position_ids)
    return out.logits[0]


def tree_masks(model, tree: TokenTree, prefix_len: int):
    """The verify forward's additive mask(s) for ``model`` (see `drafters.masks.masks_for`)."""
    return masks_for(model, lambda window: tree.attention_mask(prefix_len, model.dtype, window))


@dataclass(frozen=True)
class Acceptance:
    """The outcome of one verification.

    Attributes:
        accepted_nodes: ``node_idx`` of the accepted draft nodes, root to tip.
        bonus_token: the target's token after the last accepted node (next root).
    """

    accepted_nodes: tuple[int, ...]
    bonus_token: int

    @property
    def kept_slots(self) -> list[int]:
        """Slots whose KV stays in the cache: the root and the accepted nodes, in path order."""
        return [0] + [node_idx + 1 for node_idx in self.accepted_nodes]

    def tokens(self, tree: TokenTree) -> list[int]:
        """The new committed tokens: accepted draft tokens then the bonus token."""
        return [int(tree.tokens[i]) for i in self.accepted_nodes] + [self.bonus_token]


def accept_greedy(tree: TokenTree, target_tokens: list[int]) -> Acceptance:
    """Walk from the root, following the child whose token is the target's choice.

    ``target_tokens[slot_idx]`` is the target's greedy token after that slot. Siblings with the
    same token are never both followed: the first one wins.
    """
    children = tree.children()
    tokens = tree.tokens.tolist()
    slot = 0
    accepted: list[int] = []
    while True:
        want = target_tokens[slot]
        nxt = next((c for c in children[slot] if tokens[c] == want), None)
        if nxt is None:
            return Acceptance(tuple(accepted), want)
        accepted.append(nxt)
        slot = nxt + 1
