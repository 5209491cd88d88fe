"""Verification: ONE target forward over every row's ``[root] + tree`` slots, with tree attention."""

from __future__ import annotations

import inspect
from contextlib import nullcontext
from functools import lru_cache, partial

import torch

from drafters.modeling import forward_with_cache
from specdec.device.cache import RowCache
from specdec.device.hybrid import seams
from specdec.device.hybrid.levels import TreeLevels, tree_forward
from specdec.device.tree import BatchTree
from trees.masks import batch_tree_attention_mask, masks_by_layer_type


@lru_cache(maxsize=None)
def _takes_positions(forward_type) -> bool:
    return "position_ids" in inspect.signature(forward_type.forward).parameters


def takes_positions(model) -> bool:
    """Whether ``model.forward`` takes ``position_ids`` (pure state-space models have no positions)."""
    return _takes_positions(type(model))


def _recurrent_tree(model, cache: RowCache, batch: BatchTree):
    """The tree-levels context of a verify forward through recurrent layers (`specdec.device.hybrid`),
    from the batch's host copy of the tree shape."""
    if not cache.recurrent:
        return nullcontext()
    if not seams.installed(model):  # the seams would run the tree's slots as one sequence
        raise RuntimeError(f"{type(model).__name__} has recurrent layers but specdec's tree seams are not installed "
                           "for it (specdec.step.support.support_for installs them)")
    return tree_forward(TreeLevels.from_parents(batch.parents_host, batch.depths_host, batch.tokens.device))


def verify_rows(model, cache: RowCache, batch: BatchTree, kernel=None, compiled=None) -> torch.Tensor:
    """Run the target on ``batch`` (``B`` rows of ``q`` slots) over ``cache``'s rows ``0..B-1``.

    Each row's slots are written right after its own prefix (compact each row afterwards). With
    ``kernel`` (a `specdec.device.attention.TreeKernel`) attention runs through the tree kernel,
    all rows in one operator call on CPU, and ``compiled`` (a `specdec.device.compiled.CompiledForward`
    of ``model``), when given, runs the forward; otherwise through the model's attention with one
    additive mask ``[B, 1, q, K]`` built on the device. Returns logits ``[B, q, V]`` on the
    model's device, in slot order.
    """
    cache.begin_forward(0, batch.lengths_host, batch.queries, batch.lengths)
    try:
        kwargs = {"input_ids": batch.tokens}  # [B, q]
        if not takes_positions(model):  # a pure state-space model: the tree reaches it through its seams alone
            with _recurrent_tree(model, cache, batch):
                return forward_with_cache(model, cache, **kwargs).logits
        kwargs["position_ids"] = batch.position_ids()  # [B, q]
        if kernel is not None:
            from specdec.device.attention import TREE_KWARG, BatchTreeMeta

            meta = BatchTreeMeta(batch.packed_ancestors, batch.lengths_host, batch.lengths)
            unused_mask = batch.tokens.new_zeros(1, 1, 1, 1)  # 4-D: transformers takes it as built, builds none
            forward = compiled if compiled is not None else partial(forward_with_cache, model)
            with kernel.active(), _recurrent_tree(model, cache, batch):
                out = forward(cache, attention_mask=unused_mask, **kwargs, **{TREE_KWARG: meta})
        else:
            with _recurrent_tree(model, cache, batch):
                out = forward_with_cache(model, cache, attention_mask=tree_masks(model, batch, cache.forward.end),
                                         **kwargs)
    finally:
        cache.end_forward()
    return out.logits


def tree_masks(model, batch: BatchTree, key_len: int):
    """The verify forward's additive mask(s) ``[B, 1, q, key_len]`` (a dict by layer type for
    hybrid sliding-window models), built on the device."""
    return masks_by_layer_type(model.config, lambda window: batch_tree_attention_mask(
        batch.ancestors, batch.lengths, batch.depths, key_len, model.dtype, window))


def prefill_row(model, cache: RowCache, row: int, ids: torch.Tensor, logits_to_keep: int) -> torch.Tensor:
    """Cache ``ids`` (``[m]`` on the model's device) in row ``row`` after the positions it holds, as
    one causal forward of that row alone. Returns the logits ``[1, k, V]`` of the last
    ``logits_to_keep`` positions (0: all)."""
    length = cache.lengths[row]
    positions = torch.arange(length, length + ids.numel(), device=ids.device)[None]  # [1, m]
    cache.begin_forward(row, [length], ids.numel())
    try:
        kwargs = {"position_ids": positions} if takes_positions(model) else {}
        out = forward_with_cache(model, cache, input_ids=ids[None], logits_to_keep=logits_to_keep, **kwargs)
    finally:
        cache.end_forward()
    cache.lengths[row] = length + ids.numel()
    return out.logits
