"""The batched verify forward: every row's ``[root] + tree`` slots in one target forward."""

from __future__ import annotations

import torch

from drafters.modeling import forward_with_cache
from specdec.batch.cache import BatchCache
from specdec.batch.tree import BatchTree
from trees.masks import batch_tree_attention_mask, masks_by_layer_type


def verify_batch(model, cache: BatchCache, batch: BatchTree, kernel=None) -> torch.Tensor:
    """Run the target on ``batch`` (``B`` rows of ``q`` slots) over ``cache``'s rows ``0..B-1``.

    Each row's slots are written right after its own prefix (compact each row afterwards). With
    ``kernel`` (a `specdec.device.attention.TreeKernel`) attention runs through the tree kernel row by
    row; otherwise through the model's attention with one additive mask ``[B, 1, q, K]`` built on
    the device. Returns logits ``[B, q, V]`` on the model's device, in slot order.
    """
    rows, queries = batch.tokens.shape
    cache.begin_forward(batch.lengths, rows, queries)
    try:
        kwargs = {"input_ids": batch.tokens, "position_ids": batch.position_ids()}  # [B, q] each
        if kernel is not None:
            from specdec.device.attention import TREE_KWARG, BatchTreeMeta

            with kernel.active():
                out = forward_with_cache(model, cache, **kwargs,
                                         **{TREE_KWARG: BatchTreeMeta(batch.packed_ancestors, batch.lengths_host)})
        else:
            mask = masks_by_layer_type(model.config, lambda window: batch_tree_attention_mask(
                batch.ancestors, batch.lengths, batch.depths, cache.forward_end, model.dtype, window))
            out = forward_with_cache(model, cache, attention_mask=mask, **kwargs)
    finally:
        cache.end_forward()
    return out.logits
