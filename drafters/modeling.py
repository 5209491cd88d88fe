"""Calling a transformers model with an explicit, preallocated KV cache.

`SlotCache` (the draft model's cache; the target's is `specdec.device.cache.RowCache`) is a
transformers ``Cache`` whose layers (`SlotLayer`) hold each attention layer's keys and values in
one buffer ``[B, H_kv, capacity, D]`` allocated at the first forward. A forward
writes its rows right after the rows already held and attends to views of the held rows (no
concatenation, no copy of the past); forgetting rows (rejected tree slots, a conversation rolled
back) only shortens the held length, a host integer: nothing here reads the device.
Sliding-window layers keep every position too: the window is applied by the attention masks
(`trees.masks`), so rejected tree rows never evict history.

transformers 5.24 renamed the forward argument ``past_key_values`` to ``cache`` (the old name warns
until its removal in 5.40); older 5.x versions only know ``past_key_values`` and silently swallow
``cache`` into ``**kwargs``. `forward_with_cache` reads the name from the model's own signature.
"""

from __future__ import annotations

import inspect
from functools import lru_cache

import torch
from transformers.cache_utils import Cache, CacheLayerMixin


@lru_cache(maxsize=None)
def _cache_keyword(forward_type) -> str:
    parameters = inspect.signature(forward_type.forward).parameters
    return "cache" if "cache" in parameters else "past_key_values"


def cache_keyword(model) -> str:
    """``"cache"`` or ``"past_key_values"``: the name ``model.forward`` takes its KV cache by."""
    return _cache_keyword(type(model))


def forward_with_cache(model, cache, **kwargs):
    """``model(**kwargs)`` with ``cache`` passed under the right name and ``use_cache=True``."""
    return model(**{cache_keyword(model): cache}, use_cache=True, **kwargs)


def returned_cache(output):
    """The KV cache a forward with ``use_cache=True`` returned (``cache`` from transformers 5.24,
    ``past_key_values`` before)."""
    return output["cache"] if "cache" in output.keys() else output.get("past_key_values")  # no old-name read


class CacheFullError(ValueError):
    """A forward would write past the cache's capacity."""


class SlotLayer(CacheLayerMixin):
    """One attention layer's cache in a preallocated buffer; ``length`` rows are valid."""

    is_sliding = False  # windows are masks here: every position is kept
    is_compileable = False
    is_croppable = True

    def __init__(self, capacity: int) -> None:
        super().__init__()
        self.capacity = capacity
        self.length = 0

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        batch, heads = key_states.shape[:2]  # local heads under tensor parallelism
        self.device = key_states.device
        self.keys = key_states.new_zeros(batch, heads, self.capacity, key_states.shape[-1])
        self.values = value_states.new_zeros(batch, heads, self.capacity, value_states.shape[-1])
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Write ``[B, H, q, D]`` new rows after the held ones; return views of all held rows."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        end = self.length + key_states.shape[-2]
        if end > self.capacity:
            raise CacheFullError(f"the KV cache holds {self.capacity} positions; this forward needs {end}")
        self.keys[:, :, self.length : end] = key_states
        self.values[:, :, self.length : end] = value_states
        self.length = end
        return self.keys[:, :, :end], self.values[:, :, :end]

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.length + query_length, 0

    def get_seq_length(self) -> int:
        return self.length

    def get_max_length(self) -> int:
        return self.capacity

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove > 0:
            raise ValueError("SlotLayer.crop takes a negative count of tokens to remove")
        self.length = max(self.length + tokens_to_remove, 0)

    def reset(self) -> None:
        self.length = 0

    def resize(self, capacity: int) -> None:
        """Reallocate to ``capacity`` positions, keeping the held rows."""
        if self.is_initialized and capacity != self.capacity:
            for name in ("keys", "values"):
                old = getattr(self, name)
                new = old.new_zeros(*old.shape[:2], capacity, old.shape[-1])
                new[:, :, : self.length] = old[:, :, : self.length]
                setattr(self, name, new)
        self.capacity = capacity


class SlotCache(Cache):
    """A preallocated KV cache for ``num_layers`` attention layers of up to ``capacity`` positions."""

    def __init__(self, num_layers: int, capacity: int) -> None:
        super().__init__(layers=[SlotLayer(capacity) for _ in range(num_layers)])

    @classmethod
    def for_model(cls, model, capacity: int) -> "SlotCache":
        config = model.config.get_text_config(decoder=True)
        return cls(config.num_hidden_layers, capacity)

    @property
    def length(self) -> int:
        """Positions held (the same in every layer)."""
        return self.layers[0].length

    @property
    def capacity(self) -> int:
        return self.layers[0].capacity

    def truncate(self, length: int) -> None:
        """Forget everything after the first ``length`` positions."""
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot truncate a cache of {self.length} positions to {length}")
        for layer in self.layers:
            layer.length = length

    def reserve(self, capacity: int) -> None:
        """Make room for at least ``capacity`` positions (one reallocation and copy when it grows)."""
        if capacity > self.capacity:
            for layer in self.layers:
                layer.resize(capacity)


def position_limit(model) -> int | None:
    """The number of learned absolute positions (GPT-2's ``n_positions``), or None when positions
    are computed (RoPE and the like) and the model runs past ``max_position_embeddings``."""
    config = model.config.get_text_config(decoder=True)
    declared = {getattr(config, name, None) for name in ("max_position_embeddings", "n_positions", "n_ctx")}
    declared.discard(None)
    for name, module in model.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if isinstance(module, torch.nn.Embedding) and ("pos" in leaf or leaf == "wpe") \
                and module.num_embeddings in declared:
            return int(module.num_embeddings)
    return None
