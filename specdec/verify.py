"""Verification: one target forward over ``[root] + tree`` and greedy acceptance."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from trees import TokenTree


def tree_forward(model, cache, root_token: int, tree: TokenTree, prefix_len: int) -> torch.Tensor:
    """Run the target on ``[root] + tree.tokens`` after ``prefix_len`` cached tokens.

    The tree's KV is appended to ``cache`` (compact it afterwards). Returns logits
    ``[n+1, V]`` in slot order (slot 0 = root).
    """
    input_ids = torch.cat([torch.tensor([root_token]), tree.tokens])[None]  # [1, n+1]
    if len(tree):
        mask = tree.attention_mask(prefix_len, model.dtype)  # [1, 1, n+1, prefix_len+n+1]
        position_ids = tree.position_ids(prefix_len)  # [1, n+1]
    else:
        mask, position_ids = None, torch.tensor([[prefix_len]])
    out = model(
        input_ids=input_ids,
        attention_mask=mask,
        position_ids=position_ids,
        past_key_values=cache,
        use_cache=True,
    )
    return out.logits[0]


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
