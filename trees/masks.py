"""Additive attention masks for tree queries over a cached prefix, with or without a sliding window."""

from __future__ import annotations

import torch


def additive_mask(visible: torch.Tensor, prefix_len: int, query_pos: torch.Tensor, key_pos: torch.Tensor,
                  dtype: torch.dtype = torch.float32, window: int | None = None,
                  held: int | None = None) -> torch.Tensor:
    """``[1, 1, q, kv]`` mask: 0 = attend, ``finfo(dtype).min`` = blocked.

    ``visible`` (``[q, c]`` bool) says which of the ``c`` tree keys (positions ``key_pos``; the
    last ``q`` of them are the queries themselves) each query (positions ``query_pos``) may see;
    every query sees the cached prefix. Without a window the cache holds all ``prefix_len``
    positions (``kv = prefix_len + c``). A sliding-window layer holds ``held`` prefix positions
    (default: the last ``window - 1``), returns only its last ``window - 1 + q`` keys, and a query
    at ``p`` sees a key at ``k`` only if ``p - k < window``.
    """
    if prefix_len < 0:
        raise ValueError(f"prefix_len must be >= 0, got {prefix_len}")
    if window is not None and window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    if window is None:
        cached = prefix_len
    else:
        cached = min(prefix_len, window - 1) if held is None else held
    allowed = torch.cat([torch.ones(visible.shape[0], cached, dtype=torch.bool), visible], dim=1)
    if window is not None:
        all_keys = torch.cat([torch.arange(prefix_len - cached, prefix_len), key_pos])
        allowed &= (query_pos[:, None] - all_keys[None, :]) < window
        allowed = allowed[:, -(window - 1 + visible.shape[0]):]
    mask = torch.zeros(allowed.shape, dtype=dtype).masked_fill_(~allowed, torch.finfo(dtype).min)
    return mask[None, None]
