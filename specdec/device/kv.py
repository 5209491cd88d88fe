"""KV-cache compaction after verification: keep the prefix and the accepted path, in place."""

from __future__ import annotations

import torch

from drafters.modeling import SlotCache
from specdec.device import ops


def compact(cache: SlotCache, prefix_len: int, kept_slots: torch.Tensor, host_slots: list[int] | None = None) -> None:
    """Keep the first ``prefix_len`` positions of ``cache``, then the verified slots ``kept_slots``
    (``[m]`` int64 on the cache's device, strictly increasing, slot 0 = position ``prefix_len``)
    in that order; everything after is forgotten. ``host_slots``, the same slots where the host
    has read them already, lets a path whose rows are all in place (slots ``0..m-1``: the root
    alone, or the first children down a chain) skip the operator.

    The kept rows of every layer move next to the prefix in one ``kv_compact`` operator call (on
    CUDA one kernel launch per layer tensor; the prefix
    itself is never copied; rows already in place are not moved). The slot values are never read
    on the host: on the CPU the operator checks them, on a GPU they must come from acceptance.
    """
    held = cache.length - prefix_len
    m = kept_slots.numel()
    if m > held:
        raise ValueError(f"cannot keep {m} of {held} verified slots")
    layers = [layer for layer in cache.layers if layer.is_initialized]
    in_place = host_slots is not None and host_slots == list(range(m))
    if layers and not in_place:
        end = cache.length  # views of the held rows: the operator checks slots against them
        ops.kv_compact([layer.keys[:, :, :end] for layer in layers], [layer.values[:, :, :end] for layer in layers],
                       prefix_len, kept_slots)
    cache.truncate(prefix_len + m)
