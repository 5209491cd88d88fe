"""Attention masks for tree queries over a cached prefix: the one place they are built.

Masks are built from tensors on whatever device those tensors live on (the model's, for the
verify forward), so nothing is built on the host and copied per step. A mask is additive
(0 = attend, the dtype's minimum = blocked): a boolean mask would be silently wrong under eager
attention, which adds the mask to the scores.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def tree_attention_mask(visible: torch.Tensor, prefix_len: int, query_pos: torch.Tensor, key_pos: torch.Tensor,
                        dtype: torch.dtype, window: int | None = None) -> torch.Tensor:
    """``[1, 1, q, prefix_len + c]`` additive mask on ``visible``'s device.

    ``visible`` (``[q, c]`` bool) says which of the ``c`` keys after the cached prefix (positions
    ``key_pos``) each query (positions ``query_pos``) may see; every query sees the whole prefix
    (positions ``0 .. prefix_len - 1``). With a sliding ``window`` a query at ``p`` only sees keys
    at ``k`` with ``p - k < window``.
    """
    if prefix_len < 0:
        raise ValueError(f"prefix_len must be >= 0, got {prefix_len}")
    if window is not None and window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    device = visible.device
    queries = visible.shape[0]
    allowed = torch.cat([torch.ones(queries, prefix_len, dtype=torch.bool, device=device), visible], dim=1)
    if window is not None:
        all_keys = torch.cat([torch.arange(prefix_len, device=device), key_pos.to(device)])
        allowed &= (query_pos.to(device)[:, None] - all_keys[None, :]) < window
    mask = torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill_(~allowed, torch.finfo(dtype).min)
    return mask[None, None]


def batch_tree_attention_mask(ancestors: torch.Tensor, lengths: torch.Tensor, depths: torch.Tensor, key_len: int,
                              dtype: torch.dtype, window: int | None = None) -> torch.Tensor:
    """``[B, 1, q, key_len]`` additive mask of a batched tree forward, on ``ancestors``' device.

    Row ``b`` holds its own ``lengths[b]`` cached positions at keys ``0 .. lengths[b] - 1`` and its
    ``q`` tree slots right after them; query ``i`` of row ``b`` (at position ``lengths[b] +
    depths[b, i]``) sees the row's whole prefix and the slots ``j`` with ``ancestors[b, i, j]``
    (``[B, q, q]`` bool), nothing else (keys past a row's slots belong to longer rows). With a
    sliding ``window`` a query at ``p`` only sees keys at ``k`` with ``p - k < window``.
    """
    if window is not None and window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    batch, queries = depths.shape
    device = ancestors.device
    keys = torch.arange(key_len, device=device)
    relative = keys[None, :] - lengths[:, None]  # [B, K]: key index within the row's tree slots
    in_prefix = relative < 0
    in_tree = ~in_prefix & (relative < queries)
    slot = relative.clamp(0, queries - 1)  # [B, K]
    visible = ancestors.gather(2, slot[:, None, :].expand(batch, queries, key_len))  # [B, q, K]
    allowed = in_prefix[:, None, :] | (in_tree[:, None, :] & visible)
    if window is not None:
        key_pos = torch.where(in_prefix, keys[None, :], lengths[:, None] + depths.gather(1, slot))  # [B, K]
        query_pos = lengths[:, None] + depths  # [B, q]
        allowed &= (query_pos[:, :, None] - key_pos[:, None, :]) < window
    mask = torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill_(~allowed, torch.finfo(dtype).min)
    return mask[:, None]


def sliding_window_of(config) -> tuple[int | None, bool]:
    """``(window, hybrid)`` of a model config: its sliding window (None without sliding layers),
    and whether it also has full-attention layers (Gemma 3 style: one mask per layer type)."""
    config = config.get_text_config(decoder=True)
    window = getattr(config, "sliding_window", None)
    if not window or getattr(config, "use_sliding_window", True) is False:
        return None, False
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None and not {"sliding_attention", "hybrid_sliding"} & set(layer_types):
        return None, False
    return int(window), layer_types is not None and bool({"full_attention", "hybrid"} & set(layer_types))


def masks_by_layer_type(config, build: Callable[[int | None], torch.Tensor]):
    """The ``attention_mask`` argument for a model: ``build(None)`` for full attention,
    ``build(window)`` when every layer slides, a dict by layer type for hybrid models (None for
    layer types that do not attend, such as recurrent layers: trees reach them through their seams)."""
    window, hybrid = sliding_window_of(config)
    if window is None:
        return build(None)
    sliding = build(window)
    if not hybrid:
        return sliding
    full = build(None)
    masks = {"full_attention": full, "sliding_attention": sliding, "hybrid": full, "hybrid_sliding": sliding}
    layer_types = getattr(config.get_text_config(decoder=True), "layer_types", None) or []
    return {kind: None for kind in layer_types if kind not in masks} | masks
