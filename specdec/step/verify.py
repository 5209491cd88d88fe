"""Verification: one target forward over ``[root] + tree`` with tree attention."""

from __future__ import annotations

import torch

from drafters.modeling import forward_with_cache
from specdec.device.tree import DeviceTree
from trees.masks import masks_by_layer_type, tree_attention_mask


def verify_forward(model, cache, tree: DeviceTree, prefix_len: int, kernel=None) -> torch.Tensor:
    """Run the target on the tree's slots after ``prefix_len`` cached positions.

    The slots' keys and values are written to ``cache`` right after the prefix (compact it
    afterwards). With ``kernel`` (a `specdec.device.attention.TreeKernel`) attention runs through
    ``torch.ops.specdec.tree_attention`` on the packed ancestor bits; otherwise through the
    model's own attention with an additive mask built on the device. Returns logits ``[n+1, V]``
    on the model's device, in slot order.
    """
    input_ids = tree.tokens[None]  # [1, n+1]
    position_ids = tree.position_ids(prefix_len)  # [1, n+1]
    if tree.n and kernel is not None:
        from specdec.device.attention import TREE_KWARG, TreeMeta

        with kernel.active():
            out = forward_with_cache(model, cache, input_ids=input_ids, position_ids=position_ids,
                                     **{TREE_KWARG: TreeMeta(tree.packed_ancestors, prefix_len)})
        return out.logits[0]
    mask = tree_masks(model, tree, prefix_len) if tree.n else None
    out = forward_with_cache(model, cache, input_ids=input_ids, attention_mask=mask, position_ids=position_ids)
    return out.logits[0]


def tree_masks(model, tree: DeviceTree, prefix_len: int):
    """The verify forward's additive mask(s) ``[1, 1, n+1, prefix_len + n+1]`` (a dict by layer type
    for hybrid sliding-window models), built on the device."""
    positions = tree.depths + prefix_len  # [n+1]
    return masks_by_layer_type(model.config, lambda window: tree_attention_mask(
        tree.ancestors, prefix_len, positions, positions, model.dtype, window))
