"""KV-cache compaction after verification: keep the prefix and the accepted path, drop the rest."""

from __future__ import annotations

from typing import Sequence

import torch


def compact(cache, prefix_len: int, kept_slots: Sequence[int]) -> None:
    """Keep ``cache[:prefix_len]`` plus the tree slots ``kept_slots`` (in that order), in place.

    ``cache`` holds ``prefix_len`` committed positions followed by the verified slots
    ``[root] + nodes``. When the kept slots are a leading run ``0..m-1`` this is a crop (no copy);
    otherwise each layer gathers the kept rows into place
    right after the prefix (the prefix itself is never copied). Only full-attention layers are supported for now.
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
    index = torch.tensor(kept, dtype=torch.long)
    for layer in cache.layers:
        if getattr(layer, "is_sliding", False):
            raise NotImplementedError("KV compaction of sliding-window cache layers is not supported yet")
        for name in ("keys", "values"):
            states = getattr(layer, name)  # [B, H_kv, prefix_len + n_slots, D]
            kept_states = states[..., prefix_len:, :].index_select(-2, index)  # [B, H_kv, m, D] (a copy)
            states[..., prefix_len : prefix_len + len(kept), :] = kept_states
            setattr(layer, name, states[..., : prefix_len + len(kept), :])
