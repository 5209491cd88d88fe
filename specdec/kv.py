"""KV-cache compaction after verification: keep the prefix and the accepted path, drop the rest."""

from __future__ import annotations

from typing import Sequence

import torch

from specdec import ops


def compact(cache, prefix_len: int, kept_slots: Sequence[int]) -> None:
    """Keep ``cache[:prefix_len]`` plus the tree slots ``kept_slots`` (in that order), in place.

    ``cache`` holds ``prefix_len`` committed positions followed by the verified slots
    ``[root] + nodes``. When the kept slots are a leading run ``0..m-1`` this is a crop (no copy);
    otherwise the kept rows of every layer move into place right after the prefix in one
    ``kv_compact`` call (the prefix itself is never copied). Only full-attention layers are
    supported for now.
    """
    total = cache.get_seq_length()
    n_slots = total - prefix_len
    kept = list(kept_slots)
    if len(kept) > n_slots or (kept and (min(kept) < 0 or max(kept) >= n_slots)):
        raise ValueError(f"kept_slots {kept} out of range for {n_slots} verified slots")
    if kept == list(range(len(kept))):
        if n_slots > len(kept):
            cache.crop(-(n_slots - len(kept)))
        return
    if any(getattr(layer, "is_sliding", False) for layer in cache.layers):
        raise NotImplementedError("KV compaction of sliding-window cache layers is not supported yet")
    index = torch.tensor(kept, dtype=torch.long)
    # One call moves the kept rows of every layer: [B, H_kv, prefix_len + n_slots, D] each.
    ops.kv_compact([layer.keys for layer in cache.layers], [layer.values for layer in cache.layers],
                   prefix_len, index)
    for layer in cache.layers:
        layer.keys = layer.keys[..., : prefix_len + len(kept), :]
        layer.values = layer.values[..., : prefix_len + len(kept), :]
