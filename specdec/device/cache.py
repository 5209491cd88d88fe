"""The engine's KV cache: one preallocated buffer per attention layer, a row per sequence.

Layout: every attention layer holds keys and values ``[R, H_kv, capacity, D]`` on the model's
device; the sequence in row ``b`` has its ``lengths[b]`` positions (everything it attends to but
its root, padding excluded) contiguous at the start of the row. A forward covers rows
``start .. start + B - 1`` and feeds ``q`` query slots a row, written right after each row's own
prefix (``lengths[b] .. lengths[b] + q - 1``), so every row stays contiguous: attention reads
strided views (no gather of pages), the tree kernel reads ``[0, lengths[b] + q)`` of a row, and
compaction moves a row's accepted slots next to its prefix. Keys past a row's own slots, up to the
longest row of the forward, belong to other rows: the masks hide them. A prefill chunk is a
forward of one row; a decode step one forward over the running rows (a single sequence: one row).

Memory follows the load: `fit` sizes the buffers to the rows live now and the positions they can
reach (growing or shrinking, the live rows copied over), `free` drops them when no row is live.
Buffers are allocated eagerly once the first forward has shown each layer's shapes, so an
allocation failure surfaces where a row is admitted (failing that request alone), never inside a
step. Nothing here reads the device.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from drafters.modeling import CacheFullError
from specdec.device import ops


@dataclass(frozen=True)
class LayerShape:
    """What one layer's buffers hold per position: heads, key and value widths, dtype, device."""

    heads: int
    key_dim: int
    value_dim: int
    dtype: torch.dtype
    device: torch.device


@dataclass(frozen=True)
class Forward:
    """The forward under way: rows ``start .. start + rows - 1``, row b writing its ``queries``
    slots at ``offsets[b]`` (``[rows]`` int64 on the device; ``offsets_host`` the same)."""

    start: int
    rows: int
    offsets: torch.Tensor | None
    offsets_host: list[int]
    queries: int

    @property
    def end(self) -> int:
        """Keys each row of the forward reads: up to the longest row's last slot."""
        return max(self.offsets_host) + self.queries


class RowLayer(CacheLayerMixin):
    """One attention layer's rows; written by a forward at per-row offsets."""

    is_sliding = False  # windows are masks here: every position is kept
    is_compileable = False
    is_croppable = False

    def __init__(self, owner: "RowCache") -> None:
        super().__init__()
        self.owner = owner
        self.shape: LayerShape | None = None  # known from the first forward
        self.keys: torch.Tensor | None = None  # [R, H, capacity, Dk]
        self.values: torch.Tensor | None = None  # [R, H, capacity, Dv]

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.shape = LayerShape(key_states.shape[1], key_states.shape[-1], value_states.shape[-1], key_states.dtype,
                                key_states.device)
        self.device = key_states.device
        self.keys, self.values = self.owner.allocate_layer(self.shape)
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Write ``[B, H, q, D]`` new slots of the forward's rows at each row's offset; return views
        of those rows up to the longest row's end (``[B, H, end, D]``)."""
        if self.keys is None:
            self.lazy_initialization(key_states, value_states)
        forward = self.owner.forward
        if torch.compiler.is_compiling():  # `specdec.device.compiled`: no host integer of this step in the graph
            return self._update_compiled(forward, key_states, value_states)
        rows = slice(forward.start, forward.start + forward.rows)
        keys, values = self.keys[rows], self.values[rows]
        if forward.rows == 1:  # one row (a single sequence, a prefill chunk): a plain slice
            offset = forward.offsets_host[0]
            keys[:, :, offset : offset + forward.queries] = key_states
            values[:, :, offset : offset + forward.queries] = value_states
        else:
            ops.kv_write(keys, values, key_states, value_states, forward.offsets, self.owner.write_index)
        end = forward.end
        return keys[:, :, :end], values[:, :, :end]

    def _update_compiled(self, forward: "Forward", key_states: torch.Tensor, value_states: torch.Tensor):
        """`update` for a compiled verify forward of rows ``0 .. B-1``: writes through the
        ``kv_write`` operator at the device offsets and returns the whole buffers (``[R, H,
        capacity, D]``, R >= B: no slice, so no size relation to guard); the tree kernel reads row
        b < B up to its own slots."""
        torch.ops.specdec.kv_write(self.keys, self.values, key_states, value_states, forward.offsets)
        return self.keys, self.values

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.owner.forward.end, 0

    def get_seq_length(self) -> int:
        forward = self.owner.forward
        return forward.end - forward.queries if forward is not None else 0

    def get_max_length(self) -> int:
        return self.owner.capacity


class RowCache(Cache):
    """KV rows for ``rows`` sequences of up to ``capacity`` positions each.

    ``lengths[b]`` (host ints) are the positions row ``b`` holds. A forward is bracketed by
    `begin_forward` and `end_forward`.
    """

    def __init__(self, num_layers: int) -> None:
        super().__init__(layers=[RowLayer(self) for _ in range(num_layers)])
        self.rows = 0
        self.capacity = 0
        self.lengths: list[int] = []
        self.forward: Forward | None = None
        self._index: torch.Tensor | None = None

    @classmethod
    def for_model(cls, model) -> "RowCache":
        return cls(model.config.get_text_config(decoder=True).num_hidden_layers)

    @property
    def bytes(self) -> int:
        """Bytes the buffers hold now."""
        return sum(t.numel() * t.element_size() for layer in self.layers for t in (layer.keys, layer.values)
                   if t is not None)

    # ------------------------------------------------------------------ sizing
    def allocate_layer(self, shape: LayerShape) -> tuple[torch.Tensor, torch.Tensor]:
        """Zeroed ``rows x capacity`` keys and values of a layer of ``shape``."""
        return (torch.zeros(self.rows, shape.heads, self.capacity, shape.key_dim, dtype=shape.dtype,
                            device=shape.device),
                torch.zeros(self.rows, shape.heads, self.capacity, shape.value_dim, dtype=shape.dtype,
                            device=shape.device))

    def fit(self, rows: int, capacity: int) -> None:
        """Buffers of exactly ``rows`` rows of ``capacity`` positions, keeping rows ``0 .. rows-1``
        (each must fit: ``lengths[b] <= capacity``). Every new buffer is allocated before any old
        one is dropped, so a failed allocation raises with the cache unchanged."""
        if rows == self.rows and capacity == self.capacity:
            return
        if any(length > capacity for length in self.lengths[:rows]):
            raise ValueError(f"a row holds {max(self.lengths[:rows])} positions, more than the capacity {capacity}")
        old_rows, old_capacity = self.rows, self.capacity
        self.rows, self.capacity = rows, capacity
        try:
            fresh = [self.allocate_layer(layer.shape) if layer.shape is not None else (None, None)
                     for layer in self.layers]
        except BaseException:
            self.rows, self.capacity = old_rows, old_capacity
            raise
        kept, held = min(rows, old_rows), min(capacity, old_capacity)
        for layer, (keys, values) in zip(self.layers, fresh):
            if keys is not None and layer.keys is not None and kept and held:
                keys[:kept, :, :held] = layer.keys[:kept, :, :held]
                values[:kept, :, :held] = layer.values[:kept, :, :held]
            layer.keys, layer.values = keys, values
        self.lengths = (self.lengths + [0] * rows)[:rows]

    def free(self) -> None:
        """Drop every buffer (no row is live); the layers' shapes are kept."""
        for layer in self.layers:
            layer.keys = layer.values = None
        self.rows, self.capacity, self.lengths = 0, 0, []

    # ------------------------------------------------------------------ rows in, out and around
    def load_row(self, row: int, keys: list[torch.Tensor], values: list[torch.Tensor]) -> None:
        """Row ``row`` := the positions of a saved row (`snapshot_row`: ``[H, L, D]`` a layer)."""
        length = keys[0].shape[1] if keys else 0
        for layer, k, v in zip(self.layers, keys, values):
            if layer.keys is None:  # no forward of this cache yet: the saved row shows the layer's shape
                layer.lazy_initialization(k[None], v[None])
            layer.keys[row, :, :length] = k
            layer.values[row, :, :length] = v
        self.lengths[row] = length

    def snapshot_row(self, row: int, length: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Copies of the first ``length`` positions of row ``row`` (``[H, length, D]`` a layer)."""
        layers = [layer for layer in self.layers if layer.keys is not None]
        return ([layer.keys[row, :, :length].clone() for layer in layers],
                [layer.values[row, :, :length].clone() for layer in layers])

    def move_row(self, source: int, target: int) -> None:
        """Row ``target`` := row ``source``, which is then empty."""
        length = self.lengths[source]
        for layer in self.layers:
            if layer.keys is not None and length:
                layer.keys[target, :, :length] = layer.keys[source, :, :length]
                layer.values[target, :, :length] = layer.values[source, :, :length]
        self.lengths[target], self.lengths[source] = length, 0

    def compact_row(self, row: int, kept_slots: torch.Tensor, host_slots: list[int], queries: int) -> None:
        """After a forward of ``queries`` slots a row: keep row ``row``'s prefix, then its verified
        slots ``kept_slots`` (``[m]`` int64 device, strictly increasing; ``host_slots`` the same on
        the host) in that order, in one ``kv_compact`` operator call for every layer (on CUDA one
        kernel launch per layer tensor); rows already in place (the root alone, or the first
        children down a chain) are not moved."""
        length = self.lengths[row]
        if len(host_slots) > queries:
            raise ValueError(f"cannot keep {len(host_slots)} of {queries} verified slots")
        if host_slots != list(range(len(host_slots))):
            layers = [layer for layer in self.layers if layer.keys is not None]
            end = length + queries
            ops.kv_compact([layer.keys[row : row + 1, :, :end] for layer in layers],
                           [layer.values[row : row + 1, :, :end] for layer in layers], length, kept_slots)
        self.lengths[row] = length + len(host_slots)

    # ------------------------------------------------------------------ one forward
    def begin_forward(self, start: int, offsets_host: list[int], queries: int,
                      offsets: torch.Tensor | None = None) -> None:
        """The next forward covers rows ``start .. start + len(offsets_host) - 1`` and feeds
        ``queries`` slots a row, row b written at ``offsets_host[b]`` (``offsets``: the same as an
        int64 device tensor, needed when the forward covers several rows)."""
        forward = Forward(start, len(offsets_host), offsets, list(offsets_host), queries)
        if start + forward.rows > self.rows or forward.end > self.capacity:
            raise CacheFullError(f"the KV cache holds {self.rows} rows of {self.capacity} positions; this forward "
                                 f"needs rows {start}..{start + forward.rows - 1} up to position {forward.end}")
        if forward.rows > 1 and offsets is None:
            raise ValueError("a forward of several rows needs its offsets on the device")
        self.forward, self._index = forward, None

    def write_index(self) -> torch.Tensor:
        """``[B, 1, q, 1]`` int64 device positions the forward's slots are written to."""
        if self._index is None:
            forward = self.forward
            steps = torch.arange(forward.queries, device=forward.offsets.device)
            self._index = (forward.offsets[:, None] + steps[None, :])[:, None, :, None]
        return self._index

    def end_forward(self) -> None:
        self.forward, self._index = None, None

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.layers[0].get_seq_length()
