"""KV-cache compaction after verification: keep the prefix and the accepted path, drop the rest."""

from __future__ import annotations

from typing import Sequence

import torch

from specdec import ops


def compact(cache, prefix_len: int, kept_slots: Sequence[int]) -> None:
    """Keep ``cache[:prefix_len]`` plus the tree slots ``kept_slots`` (in that order), in place.

    ``cache`` holds ``prefix_len`` committed positions followed by the verified slots
    ``[root] + nodes``. When the kept slots are a leading run ``0..m-1`` this is a crop (no copy);
    otherwise the kept rows of every full-attention layer move into place right after the prefix
    in one ``kv_compact`` call (the prefix itself is never copied). Sliding-window layers (their
    cache must record the past: ``cache.activate_past_recording()``) drop the verified slots and
    re-append the kept ones, then trim back to the window.
    """
    total = cache.get_seq_length()
    n_slots = total - prefix_len
    kept = list(kept_slots)
    if len(kept) > n_slots or (kept and (min(kept) < 0 or max(kept) >= n_slots)):
        raise ValueError(f"kept_slots {kept} out of range for {n_slots} verified slots")
    full = [layer for layer in cache.layers if not getattr(layer, "is_sliding", False)]
    sliding = [layer for layer in cache.layers if getattr(layer, "is_sliding", False)]
    if kept == list(range(len(kept))):
        if n_slots > len(kept):
            cache.crop(-(n_slots - len(kept)))
    else:
        index = torch.tensor(kept, dtype=torch.long)
        if full:  # one call moves the kept rows of every full layer: [B, H_kv, prefix_len + n_slots, D] each
            ops.kv_compact([layer.keys for layer in full], [layer.values for layer in full], prefix_len, index)
            for layer in full:
                layer.keys = layer.keys[..., : prefix_len + len(kept), :]
                layer.values = layer.values[..., : prefix_len + len(kept), :]
        for layer in sliding:  # past recording keeps every verified slot until the crop
            keys = layer.keys[..., -n_slots:, :].index_select(-2, index)  # [B, H_kv, m, D]
            values = layer.values[..., -n_slots:, :].index_select(-2, index)
            layer.crop(-n_slots)
            layer.update(keys, values)
    for layer in sliding:
        layer.crop(0)  # back to the last window - 1 positions
