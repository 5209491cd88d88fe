"""Draft-model drafter: a small causal LM with the target's vocabulary grows the tree on its device.

Greedy decoding: the tree grows by cumulative draft probability, EAGLE-2 style. Each depth expands
the best ``beam`` frontier nodes with one batched draft forward (tree mask among the drafted
tokens), every expanded node offers its ``top_k`` children, and the best ``budget`` nodes overall
are kept (ancestor-closed because a child's log-probability never exceeds its parent's). Depths
beyond the first are drafted while they pay (`drafters.depth_rule.DepthRule`: the measured chance
that verification follows the draft that deep, against the measured seconds of that forward).

Sampling: a drawn tree (`drafters.drawing`): a fixed best-first shape whose children are drawn
without replacement from the draft distribution after the request's warpers, one batched draft
forward per depth, verified by the target's rejection sampling.

Either way the proposal stays on the device until one copy of the whole tree to the host.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from drafters.base import DraftContext, Drafter, DraftSampling, VerifyFeedback
from drafters.depth_rule import DepthRule, own_path_depth
from drafters.drawing import DrawPlan, draft_generator, draw_children
from drafters.modeling import SlotCache, forward_with_cache, position_limit
from trees import (
    ROOT,
    TokenTree,
    masks_by_layer_type,
    tree_attention_mask,
)


def logits_size(model) -> int:
    return int(model.get_output_embeddings().weight.shape[0])


class ModelDrafter(Drafter):
    """Drafts with ``draft_model``, keeping its KV cache in step with the committed tokens.

    Args:
        draft_model: a transformers causal LM whose vocabulary equals the target's.
        vocab_size: the target's logits size (checked against the draft model's).
        top_k: children offered by each expanded node.
        beam: frontier nodes expanded per depth (greedy decoding).
        max_depth: deepest drafted node.
        draw: under sampling, draw the children from the draft distribution for the target's
            rejection sampling (True); False keeps the greedy beam's top-k children and the delta
            rule (registered as ``model-topk``: a seed then yields the same tokens whatever the tree).
        draft_share: the most drafting may take of a step; deeper depths are drafted while they
            pay (`drafters.depth_rule.DepthRule`: measured reach against measured forward time).
        clock: the host time source of those measurements.
    """

    name = "model"

    def __init__(self, draft_model, vocab_size: int, top_k: int = 4, beam: int = 4, max_depth: int = 8,
                 draw: bool = True, draft_share: float = 0.5, clock=time.perf_counter) -> None:
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
        self.draw = draw
        self.position_limit = position_limit(draft_model)  # learned absolute positions (None: computed)
        self.name = "model" if draw else "model-topk"
        self.draft_share, self.clock = draft_share, clock
        self.depths = DepthRule(max_depth, draft_share)
        self._proposed: tuple | None = None  # (tokens, parents, depths drafted) of the last tree
        self._observed_at: float | None = None
        self._cache = None
        self._cached_len = 0
        self._sequence_id: int | None = None
        self._plans: dict[int, DrawPlan] = {}  # by budget

    # ------------------------------------------------------------------ draft cache
    def _sync(self, ctx: DraftContext, budget: int) -> torch.Tensor:
        """Feed committed tokens the draft cache lacks (at least the root); ``[V]`` logits after the root."""
        if ctx.sequence_id != self._sequence_id or self._cache is None or self._cached_len >= len(ctx.token_ids):
            self._cache = SlotCache.for_model(self.draft_model, 2 * len(ctx.token_ids) + 64)
            self._cached_len = 0
            self._sequence_id = ctx.sequence_id
        self._cache.reserve(len(ctx.token_ids) + max(self.beam * self.max_depth, budget) + 1)
        new = torch.from_numpy(np.ascontiguousarray(ctx.token_ids[self._cached_len :]))[None]  # [1, m] host
        out = forward_with_cache(self.draft_model, self._cache, input_ids=new.to(self.draft_model.device),
                                 logits_to_keep=1)
        self._cached_len = len(ctx.token_ids)
        return out.logits[0, -1].float()

    @torch.inference_mode()
    def propose(self, ctx: DraftContext, budget: int) -> TokenTree:
        if budget <= 0:
            return TokenTree.empty()
        root_logits = self._sync(ctx, budget)  # [V] device
        # a depth-d draft forward feeds nodes at position cached_len - 2 + d: inside the draft model's positions
        deepest = self.max_depth if self.position_limit is None else self.position_limit - self._cached_len + 1
        try:
            if ctx.sampling is not None and self.draw:
                return self._drawn(root_logits, budget, ctx.sampling, deepest)
            return self._beam(root_logits, budget, deepest)
        finally:
            self._cache.truncate(self._cached_len)  # drafted tokens leave; committed ones stay

    def _forward(self, tokens: torch.Tensor, visible: torch.Tensor, depth: int,
                 key_depths: torch.Tensor) -> torch.Tensor:
        """One batched draft forward of ``tokens [f]`` (nodes at ``depth``) that see the committed
        cache and the fed draft keys ``visible [f, c]`` marks (depths ``key_depths [c]``, these
        nodes last); returns their ``[f, V]`` logits (device)."""
        device = self.draft_model.device
        query_pos = torch.full((tokens.numel(),), self._cached_len - 1 + depth, device=device)  # [f]
        key_pos = key_depths.to(device) + (self._cached_len - 1)  # [c]
        mask = masks_by_layer_type(self.draft_model.config, lambda window: tree_attention_mask(
            visible, self._cached_len, query_pos, key_pos, self.draft_model.dtype, window))
        out = forward_with_cache(self.draft_model, self._cache, input_ids=tokens[None], attention_mask=mask,
                                 position_ids=query_pos[None])
        return out.logits[0].float()

    # ------------------------------------------------------------------ greedy: best-first beam
    def _beam(self, root_logits: torch.Tensor, budget: int, deepest: int) -> TokenTree:
        device = root_logits.device
        top = torch.log_softmax(root_logits, dim=-1).topk(min(self.top_k, budget))
        width = top.indices.numel()
        tokens, scores = [top.indices], [top.values]  # device, per depth
        parents = [torch.full((width,), ROOT, device=device)]
        ranks = [torch.arange(width, device=device)]
        drafted = width
        frontier = torch.arange(min(self.beam, width), device=device)  # node_idx, best first
        frontier_tokens, frontier_scores = top.indices[: frontier.numel()], top.values[: frontier.numel()]
        seen = torch.zeros((frontier.numel(), 0), dtype=torch.bool, device=device)  # [f, fed] ancestors fed so far
        key_depths = torch.zeros(0, dtype=torch.long, device=device)
        spent = 0.0
        for depth in range(2, min(self.max_depth, budget, deepest) + 1):
            if not self.depths.should_draft(depth, spent):
                break
            started = self.clock()
            f = frontier.numel()
            visible = torch.cat([seen, torch.eye(f, dtype=torch.bool, device=device)], dim=1)  # [f, fed+f]
            key_depths = torch.cat([key_depths, torch.full((f,), depth - 1, device=device)])
            top = torch.log_softmax(self._forward(frontier_tokens, visible, depth - 1, key_depths), dim=-1
                                    ).topk(self.top_k, dim=-1)  # [f, k]
            child_scores = (frontier_scores[:, None] + top.values).flatten()  # [f*k]
            tokens.append(top.indices.flatten())
            scores.append(child_scores)
            parents.append(frontier.repeat_interleave(self.top_k))
            ranks.append(torch.arange(self.top_k, device=device).repeat(f))
            best = child_scores.topk(min(self.beam, child_scores.numel())).indices  # the next frontier
            frontier = drafted + best
            drafted += child_scores.numel()
            frontier_tokens, frontier_scores = tokens[-1][best], child_scores[best]
            seen = visible[best // self.top_k]
            seconds = self.clock() - started
            self.depths.record_depth(depth, seconds)
            spent += seconds
        packed = torch.stack([torch.cat(part).double() for part in (tokens, parents, scores, ranks)])
        host = np.asarray(packed.tolist())  # [4, n]: the proposal's one copy to the host
        tree = TokenTree(torch.from_numpy(host[0].astype(np.int64)), torch.from_numpy(host[1].astype(np.int64)),
                         torch.from_numpy(host[2].astype(np.float32)),
                         torch.full((host.shape[1],), self.source_id, dtype=torch.int8),
                         torch.from_numpy(host[3].astype(np.int64)))
        self._proposed = (tree.tokens.numpy(), tree.parents.numpy(), tree.max_depth)
        return tree.prune(budget)

    # ------------------------------------------------------------------ sampling: drawn children
    def _drawn(self, root_logits: torch.Tensor, budget: int, sampling: DraftSampling, deepest: int) -> TokenTree:
        """A `DrawPlan` tree: one draft forward per depth over the nodes whose children it draws."""
        if budget not in self._plans:
            self._plans[budget] = DrawPlan(budget, self.max_depth, self.top_k)
        plan = self._plans[budget]
        if len(plan) == 0:
            return TokenTree.empty()
        device = root_logits.device
        generator = draft_generator(device, sampling.seed)
        arrays = plan.on(device)
        probs = [torch.softmax(sampling.warp(root_logits[None]), dim=-1)]  # [1, V]: the root's draft distribution
        drawn: list[torch.Tensor] = []  # each depth's drawn tokens, in node order
        spent = 0.0
        for number, (depth, on) in enumerate(zip(plan.depths, arrays), start=1):
            if number > 1 and (number > deepest or not self.depths.should_draft(number, spent)):
                break  # whole depths are cut: each parent keeps its first draws
            started = self.clock()
            if number > 1:  # feed the nodes that have children: their distributions are the new rows
                logits = self._forward(torch.cat(drawn)[on["expand"]], on["visible"], number - 1, on["fed_depths"])
                probs.append(torch.softmax(sampling.warp(logits), dim=-1))
            width = int(plan.ranks(depth).max()) + 1
            drawn.append(draw_children(probs[-1], on["local_rows"], on["ranks"], width, generator))
            if number > 1:
                seconds = self.clock() - started
                self.depths.record_depth(number, seconds)
                spent += seconds
        tree = plan.tree(drawn, probs, self.source_id)  # the proposal's one copy to the host
        self._proposed = (tree.tokens.numpy(), tree.parents.numpy(), len(drawn))
        return tree

    # ------------------------------------------------------------------ measurements and state
    def observe(self, feedback: VerifyFeedback) -> None:
        """Measure the step (draft to draft) and how deep verification followed the last tree."""
        if feedback.tree is None:
            return
        now = self.clock()
        if self._observed_at is not None:
            self.depths.record_step(now - self._observed_at, len(feedback.accepted_nodes) + 1)
        if self._proposed is not None and len(feedback.tree):
            tokens, parents, depth = self._proposed
            accepted = feedback.tree.tokens[list(feedback.accepted_nodes)].tolist()
            self.depths.record_outcome(min(depth, feedback.tree.max_depth), own_path_depth(tokens, parents, accepted))
        self._proposed, self._observed_at = None, now

    def explain(self) -> dict:
        """The depth rule's measurements: per-depth reach and draft milliseconds."""
        return self.depths.report()

    def end_sequence(self, sequence_id: int) -> None:
        if sequence_id == self._sequence_id:  # its cache goes; the measurements stay
            self._cache, self._cached_len, self._sequence_id = None, 0, None
            self._proposed, self._observed_at = None, None

    def reset(self) -> None:
        self._cache, self._cached_len, self._sequence_id = None, 0, None
        self._proposed, self._observed_at = None, None
        self.depths = DepthRule(self.max_depth, self.draft_share)

    def state_dict(self) -> dict:
        return {"vocab_size": self.vocab_size}

    def load_state_dict(self, state: dict) -> None:
        from drafters.state import check_vocab_size

        check_vocab_size(state, self.vocab_size, "model drafter state")
