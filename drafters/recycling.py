"""Token Recycling: draft from the target's own recent top-k successors of every token.

An adjacency matrix ``succ[V, k]`` holds, for each token id, the top-k next tokens the target
predicted the last time that token was verified (accepted or not: rejected branches are
"recycled"). Drafting expands a tree shape breadth-first: node = the ``rank``-th successor of its
parent's token. The rows of tokens never seen before are seeded from the prompt's logits (the
prefill computes the LM head only where a drafter asks: refreshing known rows from every prompt
position cost long prompts more than it brought), and rows are kept across calls (hot start).
"""

from __future__ import annotations

import numba
import numpy as np
import torch

from drafters.base import DraftContext, Drafter, VerifyFeedback
from drafters.stats import AcceptanceStats
from trees import TokenTree, TreeShape, best_first

UNKNOWN = -1  # a successor slot never observed


@numba.njit(cache=True)
def _expand(succ, root, shape_parents, shape_ranks, shape_scores):  # pragma: no cover - numba
    """Fill a shape from the successor matrix.

    Drops slots whose successor is unknown, duplicate siblings and everything below a dropped
    slot. Returns (tokens, parents, scores, ranks, n) where parents are renumbered into the kept
    nodes' ``node_idx`` space and ranks are successor columns.
    """
    n_shape = shape_parents.shape[0]
    kept_index = np.full(n_shape, -1, np.int64)
    tokens = np.empty(n_shape, np.int64)
    parents = np.empty(n_shape, np.int64)
    scores = np.empty(n_shape, np.float32)
    ranks = np.empty(n_shape, np.int64)
    n = 0
    for slot in range(n_shape):
        parent_slot = shape_parents[slot]
        if parent_slot >= 0:
            parent_node = kept_index[parent_slot]
            if parent_node < 0:
                continue
            parent_token = tokens[parent_node]
        else:
            parent_node = -1
            parent_token = root
        token = succ[parent_token, shape_ranks[slot]]
        if token < 0 or token >= succ.shape[0]:  # unknown successor (ids are validated on load too)
            continue
        duplicate = False
        for other in range(n):
            if parents[other] == parent_node and tokens[other] == token:
                duplicate = True
                break
        if duplicate:
            continue
        kept_index[slot] = n
        tokens[n] = token
        parents[n] = parent_node
        scores[n] = shape_scores[slot]
        ranks[n] = shape_ranks[slot]
        n += 1
    return tokens, parents, scores, ranks, n


class TokenRecycling(Drafter):
    """Token Recycling drafter (Luo et al., 2024), lossless with any verifier.

    Args:
        vocab_size: the target's vocabulary size (rows of the successor matrix).
        k: successors kept per token (columns).
        shape: a fixed `TreeShape` to fill (then pruned by prior score to the budget); ``None``
            makes the tree dynamic: a best-first shape of ``SLOTS_PER_NODE * budget`` slots grown
            from the per-(depth, rank) acceptance rates learned online (refreshed every
            ``REFRESH_STEPS`` verifications), keeping the ``budget`` best nodes with known tokens.
    """

    name = "recycling"
    # Slots in the default shape per node of budget: spare slots stand in for unknown successors
    # and duplicate siblings, and the best-scored nodes are kept.
    SLOTS_PER_NODE = 2
    REFRESH_STEPS = 32

    def __init__(self, vocab_size: int, k: int = 8, shape: TreeShape | None = None) -> None:
        if vocab_size <= 0:
            raise ValueError(f"vocab_size must be positive, got {vocab_size}")
        if k <= 0:
            raise ValueError(f"k must be positive, got {k}")
        if shape is not None and len(shape) and int(shape.ranks.max()) >= k:
            raise ValueError(f"shape uses successor rank {int(shape.ranks.max())} but k={k}")
        self.vocab_size = vocab_size
        self.k = k
        self.feedback_topk = k
        self.shape = shape
        self._shapes: dict[int, TreeShape] = {}
        self._shapes_at_step = 0
        self.stats = AcceptanceStats(max_rank=k)
        self._shape_rates = self.stats.rates()  # the rates the cached shapes were grown from
        self.succ = np.full((vocab_size, k), UNKNOWN, dtype=np.int32)  # [V, k] token ids

    def shape_for(self, budget: int) -> TreeShape:
        """The shape filled for a given node budget."""
        if self.shape is not None:
            return self.shape
        if self.stats.steps - self._shapes_at_step >= self.REFRESH_STEPS:
            self._shapes.clear()
            self._shapes_at_step = self.stats.steps
            self._shape_rates = self.stats.rates()
        if budget not in self._shapes:
            self._shapes[budget] = best_first(budget * self.SLOTS_PER_NODE, rates=self._shape_rates, max_rank=self.k)
        return self._shapes[budget]

    def propose(self, ctx: DraftContext, budget: int) -> TokenTree:
        shape = self.shape_for(budget)
        root = ctx.root
        if budget <= 0 or len(shape) == 0 or not 0 <= root < self.vocab_size:
            return TokenTree.empty()
        tokens, parents, scores, ranks, n = _expand(self.succ, root, shape.parents, shape.ranks, shape.log_prior)
        tree = TokenTree(torch.from_numpy(tokens[:n]), torch.from_numpy(parents[:n]), torch.from_numpy(scores[:n]),
                         torch.full((n,), self.source_id, dtype=torch.int8), torch.from_numpy(ranks[:n]))
        return tree.prune(budget)

    def observe(self, feedback: VerifyFeedback) -> None:
        """Overwrite the rows of every verified token with the target's top-k (later rows win) and
        update the acceptance statistics."""
        if feedback.tree is not None:
            self.stats.update(feedback.tree, feedback.accepted_nodes, source=self.source_id)
        tokens = np.asarray(feedback.tokens, dtype=np.int64)
        if tokens.size == 0:
            return
        topk = np.asarray(feedback.topk_ids)[:, : self.k]
        # keep the last occurrence of each token so the committed path overrides rejected nodes
        _, first_from_end = np.unique(tokens[::-1], return_index=True)
        rows = tokens.size - 1 - first_from_end
        self.succ[tokens[rows], : topk.shape[1]] = topk[rows]

    def wants_prompt_topk(self, tokens: np.ndarray) -> np.ndarray:
        """The prompt positions whose token has no successor row yet (all of them when cold)."""
        tokens = np.asarray(tokens, dtype=np.int64)
        inside = (tokens >= 0) & (tokens < self.vocab_size)
        return inside & (self.succ[np.where(inside, tokens, 0), 0] == UNKNOWN)

    def reset(self) -> None:
        self.succ.fill(UNKNOWN)
        self.stats.reset()
        self._shapes.clear()
        self._shapes_at_step = 0
        self._shape_rates = self.stats.rates()

    def state_dict(self) -> dict:
        return {"succ": torch.from_numpy(self.succ.copy()), "vocab_size": self.vocab_size, "k": self.k,
                "stats": self.stats.state_dict(), "shape_rates": torch.from_numpy(self._shape_rates.copy()),
                "shapes_at_step": self._shapes_at_step}

    def load_state_dict(self, state: dict) -> None:
        """Restore `state_dict` output; every field is validated before the drafter changes."""
        from drafters.state import StateError, array_field, check_vocab_size, int_field

        where = "recycling state"
        check_vocab_size(state, self.vocab_size, where)
        if int_field(state, "k", where, low=1) != self.k:
            raise StateError(f"{where}: saved with k={state['k']} successors per token, this drafter keeps {self.k}")
        succ = array_field(state, "succ", where, (self.vocab_size, self.k), "int", low=UNKNOWN,
                           high=self.vocab_size - 1)
        stats = AcceptanceStats(max_rank=self.k)
        stats.load_state_dict(state.get("stats", stats.state_dict()))
        rates = array_field(state, "shape_rates", where, stats.reached.shape, low=0.0, high=1.0) \
            if "stats" in state else stats.rates()
        shapes_at_step = int_field(state, "shapes_at_step", where, low=0, high=stats.steps) if "stats" in state else 0
        self.succ[...] = succ
        self.stats = stats
        self._shape_rates, self._shapes_at_step = rates, shapes_at_step
        self._shapes.clear()
