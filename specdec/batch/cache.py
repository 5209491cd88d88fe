"""One preallocated KV cache shared by the sequences of a batch: a row per sequence.

Layout: every attention layer holds keys and values ``[R, H_kv, capacity, D]`` on the model's
device; row ``b`` belongs to one sequence, whose ``lengths[b]`` positions (everything it attends
to but its root, padding excluded) are contiguous at the start of the row. A batched verify
forward feeds ``q`` query slots per row and writes row ``b``'s slots right after its own prefix,
at ``lengths[b] .. lengths[b] + q - 1``, so every row stays contiguous (the tree attention
kernel reads ``[0, lengths[b] + q)`` of a row as it reads a single sequence's cache) and
compaction is the single-sequence compaction applied to the row. Keys past a row's own slots, up
to the longest row, are another row's business: the masks hide them.

Why rows and not pages: on this project's targets (135M-1B parameters, contexts of a few
thousand tokens) a row per sequence costs little memory (SmolLM2-135M in bf16: 23 KB per
position, 0.4 GB for 8 rows of 2,300 positions), keeps every attention read a strided view (no gather
of pages per layer per step), and lets the existing kernels run unchanged per row. A sequence
joins by copying its prefilled batch-1 cache into a free row, and leaves by copying its row back
(for a conversation that continues) or just freeing it. Nothing here reads the device.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from drafters.modeling import CacheFullError, SlotCache
from specdec.device import ops


class BatchLayer(CacheLayerMixin):
    """One attention layer's rows; written by a batched forward at per-row offsets."""

    is_sliding = False  # windows are masks here: every position is kept
    is_compileable = False
    is_croppable = False

    def __init__(self, owner: "BatchCache") -> None:
        super().__init__()
        self.owner = owner
        self.keys: torch.Tensor | None = None
        self.values: torch.Tensor | None = None

    def ensure(self, like: torch.Tensor) -> None:
        """Buffers of the owner's ``rows`` x ``capacity``, shaped like ``like`` (``[*, H, *, D]``),
        (re)allocated keeping what the old ones held."""
        rows, capacity = self.owner.rows, self.owner.capacity
        if self.keys is not None and self.keys.shape[0] >= rows and self.keys.shape[2] >= capacity:
            return
        shape = (rows, like.shape[1], capacity, like.shape[-1])
        for name in ("keys", "values"):
            old = getattr(self, name)
            new = like.new_zeros(shape)
            if old is not None:
                new[: old.shape[0], :, : old.shape[2]] = old
            setattr(self, name, new)
        self.device = like.device
        self.is_initialized = True

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.ensure(key_states)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Write ``[B, H, q, D]`` new slots of rows ``0..B-1`` at each row's offset; return views of
        rows ``0..B-1`` up to the longest row's end (``[B, H, max(lengths) + q, D]``)."""
        owner = self.owner
        self.ensure(key_states)
        rows, queries = key_states.shape[0], key_states.shape[-2]
        index = owner.write_index(queries)  # [B, 1, q, 1] device, expanded below
        shape = (rows, key_states.shape[1], queries, key_states.shape[-1])
        self.keys[:rows].scatter_(2, index.expand(shape), key_states)
        self.values[:rows].scatter_(2, index.expand(shape), value_states)
        end = owner.forward_end
        return self.keys[:rows, :, :end], self.values[:rows, :, :end]

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.owner.forward_end, 0

    def get_seq_length(self) -> int:
        return self.owner.forward_end - self.owner.forward_queries

    def get_max_length(self) -> int:
        return self.owner.capacity


class BatchCache(Cache):
    """KV rows for up to ``rows`` sequences of up to ``capacity`` positions each (grown on demand).

    ``lengths[b]`` (host ints) are the positions row ``b`` holds. A batched forward is bracketed
    by `begin_forward` (the rows' write offsets, on the device) and `end_forward`.
    """

    def __init__(self, num_layers: int, device: torch.device) -> None:
        super().__init__(layers=[BatchLayer(self) for _ in range(num_layers)])
        self.device = torch.device(device)
        self.rows = 0
        self.capacity = 0
        self.lengths: list[int] = []
        self._offsets: torch.Tensor | None = None  # [B] int64 device: row b writes at offsets[b] + i
        self.forward_end = 0
        self.forward_queries = 0

    @classmethod
    def for_model(cls, model) -> "BatchCache":
        config = model.config.get_text_config(decoder=True)
        return cls(config.num_hidden_layers, model.device)

    def reserve(self, rows: int, capacity: int) -> None:
        """Room for ``rows`` rows of ``capacity`` positions (rows grown geometrically), keeping what
        is held; buffers are allocated when the first keys arrive."""
        if rows > self.rows:
            self.lengths += [0] * (max(rows, 2 * self.rows) - self.rows)
            self.rows = len(self.lengths)
        self.capacity = max(capacity, self.capacity)
        for layer in self.layers:
            if layer.keys is not None:
                layer.ensure(layer.keys)

    # ------------------------------------------------------------------ rows in and out
    def load_row(self, row: int, source: SlotCache) -> None:
        """Row ``row`` := the ``source.length`` positions of a batch-1 ``source`` cache."""
        length = source.length
        for layer, held in zip(self.layers, source.layers):
            if length:
                layer.ensure(held.keys)
                layer.keys[row, :, :length] = held.keys[0, :, :length]
                layer.values[row, :, :length] = held.values[0, :, :length]
        self.lengths[row] = length

    def store_row(self, row: int, target: SlotCache) -> None:
        """``target`` (a batch-1 cache) := the positions of row ``row``."""
        length = self.lengths[row]
        target.truncate(0)
        target.reserve(length)
        for layer, held in zip(self.layers, target.layers):
            if layer.keys is None:
                continue
            if not held.is_initialized:
                held.lazy_initialization(layer.keys[row : row + 1, :, :1], layer.values[row : row + 1, :, :1])
            held.keys[0, :, :length] = layer.keys[row, :, :length]
            held.values[0, :, :length] = layer.values[row, :, :length]
            held.length = length

    def row_views(self, row: int, end: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Every layer's ``[1, H, end, D]`` keys and values of row ``row`` (views)."""
        return ([layer.keys[row : row + 1, :, :end] for layer in self.layers],
                [layer.values[row : row + 1, :, :end] for layer in self.layers])

    def compact_row(self, row: int, kept_slots: torch.Tensor, host_slots: list[int], queries: int) -> None:
        """After a forward of ``queries`` slots a row: keep row ``row``'s prefix, then its verified
        slots ``kept_slots`` (``[m]`` int64 device, strictly increasing; ``host_slots`` the same on
        the host) in that order (`specdec.device.kv.compact` on the row)."""
        length = self.lengths[row]
        if host_slots != list(range(len(host_slots))):  # rows already in place are not moved
            keys, values = self.row_views(row, length + queries)
            ops.kv_compact(keys, values, length, kept_slots)
        self.lengths[row] = length + len(host_slots)

    # ------------------------------------------------------------------ one batched forward
    def begin_forward(self, offsets: torch.Tensor, rows: int, queries: int) -> None:
        """The next forward feeds ``queries`` slots for rows ``0..rows-1``, row ``b`` written at
        ``offsets[b]`` (``[rows]`` int64 on the device; the host knows them as ``lengths``)."""
        end = max(self.lengths[:rows]) + queries
        if end > self.capacity:
            raise CacheFullError(f"the batch KV cache holds {self.capacity} positions a row; this forward needs {end}")
        self._offsets, self.forward_end, self.forward_queries = offsets, end, queries
        self._index: torch.Tensor | None = None

    def write_index(self, queries: int) -> torch.Tensor:
        """``[B, 1, q, 1]`` int64 device positions the forward's slots are written to."""
        if self._index is None:
            steps = torch.arange(queries, device=self._offsets.device)
            self._index = (self._offsets[:, None] + steps[None, :])[:, None, :, None]
        return self._index

    def end_forward(self) -> None:
        self._offsets, self._index, self.forward_end, self.forward_queries = None, None, 0, 0

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.layers[0].get_seq_length()
