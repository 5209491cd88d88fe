"""Draft-model drafter: a small causal LM with the target's vocabulary grows the tree.

The tree grows by cumulative draft probability, EAGLE-2 style: each depth expands the best
``beam`` frontier nodes with one batched draft forward (tree mask among the drafted tokens), every
expanded node offers its ``top_k`` children, and the best ``budget`` nodes overall are kept
(ancestor-closed because a child's log-probability never exceeds its parent's).
"""

from __future__ import annotations

import numpy as np
import torch

from drafters.base import DraftContext, Drafter
from drafters.modeling import SlotCache, forward_with_cache
from trees import ROOT, TokenTree, masks_by_layer_type, tree_attention_mask


def logits_size(model) -> int:
    return int(model.get_output_embeddings().weight.shape[0])


class ModelDrafter(Drafter):
    """Drafts with ``draft_model``, keeping its KV cache in step with the committed tokens.

    Args:
        draft_model: a transformers causal LM whose vocabulary equals the target's.
        vocab_size: the target's logits size (checked against the draft model's).
        top_k: children offered by each expanded node.
        beam: frontier nodes expanded per depth.
        max_depth: deepest drafted node.
    """

    name = "model"

    def __init__(self, draft_model, vocab_size: int, top_k: int = 4, beam: int = 4, max_depth: int = 8) -> None:
        if draft_model is None:
            raise ValueError("the model drafter needs draft_model=<a causal LM with the target's vocabulary>")
        draft_vocab = logits_size(draft_model)
        if draft_vocab != vocab_size:
            raise ValueError(
                f"draft_model has a vocabulary of {draft_vocab} tokens but the target has {vocab_size}: "
                "the model drafter needs a draft model with the same vocabulary"
            )
        if top_k < 1 or beam < 1 or max_depth < 1:
            raise ValueError("top_k, beam and max_depth must be >= 1")
        self.draft_model = draft_model.eval()
        self.vocab_size = vocab_size
        self.top_k, self.beam, self.max_depth = top_k, beam, max_depth
        self.source_id = 0
        self._cache = None
        self._cached_len = 0
        self._sequence_id: int | None = None

    # ------------------------------------------------------------------ draft cache
    def _sync(self, ctx: DraftContext) -> torch.Tensor:
        """Feed committed tokens the draft cache lacks (at least the root); log-probs after the root."""
        if ctx.sequence_id != self._sequence_id or self._cache is None or self._cached_len >= len(ctx.token_ids):
            self._cache = SlotCache.for_model(self.draft_model, 2 * len(ctx.token_ids) + 64)
            self._cached_len = 0
            self._sequence_id = ctx.sequence_id
        self._cache.reserve(len(ctx.token_ids) + self.beam * self.max_depth + 1)
        new = torch.from_numpy(np.ascontiguousarray(ctx.token_ids[self._cached_len :]))[None]  # [1, m] host
        out = forward_with_cache(self.draft_model, self._cache, input_ids=new.to(self.draft_model.device),
                                 logits_to_keep=1)
        self._cached_len = len(ctx.token_ids)
        return torch.log_softmax(out.logits[0, -1].float(), dim=-1)  # [V]

    @torch.inference_mode()
    def propose(self, ctx: DraftContext, budget: int) -> TokenTree:
        if budget <= 0:
            return TokenTree.empty()
        root_logp = self._sync(ctx)
        best = root_logp.topk(min(self.top_k, budget))
        tokens: list[int] = best.indices.tolist()
        ranks: list[int] = list(range(len(tokens)))
        parents: list[int] = [ROOT] * len(tokens)
        scores: list[float] = best.values.tolist()
        depths: list[int] = [1] * len(tokens)
        ancestors: list[set[int]] = [{i} for i in range(len(tokens))]
        fed: list[int] = []  # node_idx in the order their KV entered the draft cache
        frontier = list(range(len(tokens)))[: self.beam]
        for depth in range(2, self.max_depth + 1):
            kth_best = sorted(scores, reverse=True)[budget - 1] if len(scores) >= budget else -np.inf
            frontier = [f for f in frontier if scores[f] > kth_best]
            if not frontier:
                break
            logp = self._expand(frontier, tokens, ancestors, depths, fed)  # [f, V]
            top = logp.topk(self.top_k, dim=-1)
            children: list[int] = []
            for row, parent in enumerate(frontier):
                for rank, (token, value) in enumerate(zip(top.indices[row].tolist(), top.values[row].tolist())):
                    children.append(len(tokens))
                    ranks.append(rank)
                    tokens.append(token)
                    parents.append(parent)
                    scores.append(scores[parent] + value)
                    depths.append(depth)
                    ancestors.append(ancestors[parent] | {children[-1]})
            frontier = sorted(children, key=lambda c: -scores[c])[: self.beam]
        self._cache.truncate(self._cached_len)  # drafted tokens leave; committed ones stay
        tree = TokenTree(torch.tensor(tokens, dtype=torch.long), torch.tensor(parents, dtype=torch.long),
                         torch.tensor(scores, dtype=torch.float32),
                         torch.full((len(tokens),), self.source_id, dtype=torch.int8),
                         torch.tensor(ranks, dtype=torch.long))
        tree = tree.prune(budget)
        return tree

    def _expand(self, frontier, tokens, ancestors, depths, fed) -> torch.Tensor:
        """One batched draft forward over the frontier nodes; returns their log-probs ``[f, V]``."""
        columns = fed + frontier
        device = self.draft_model.device
        visible = torch.tensor([[c in ancestors[q] for c in columns] for q in frontier], device=device)  # [f, fed+f]
        query_pos = torch.tensor([self._cached_len - 1 + depths[q] for q in frontier], device=device)  # [f]
        key_pos = torch.tensor([self._cached_len - 1 + depths[c] for c in columns], device=device)  # [fed+f]
        mask = masks_by_layer_type(self.draft_model.config, lambda window: tree_attention_mask(
            visible, self._cached_len, query_pos, key_pos, self.draft_model.dtype, window))
        out = forward_with_cache(
            self.draft_model, self._cache,
            input_ids=torch.tensor([[tokens[q] for q in frontier]], device=device),  # [1, f]
            attention_mask=mask,
            position_ids=query_pos[None],
        )
        fed.extend(frontier)
        return torch.log_softmax(out.logits[0].float(), dim=-1)

    # ------------------------------------------------------------------ state
    def end_sequence(self, sequence_id: int) -> None:
        if sequence_id == self._sequence_id:
            self.reset()

    def reset(self) -> None:
        self._cache, self._cached_len, self._sequence_id = None, 0, None

    def state_dict(self) -> dict:
        return {"vocab_size": self.vocab_size}

    def load_state_dict(self, state: dict) -> None:
        from drafters.state import check_vocab_size

        check_vocab_size(state, self.vocab_size, "model drafter state")
