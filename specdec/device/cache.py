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

Recurrent layers (linear attention, state-space, convolution: hybrid models) keep their conv and
recurrent states per row beside (``hybrid`` layers) or instead of keys and values, in
`specdec.device.hybrid.states.RowStates`; such a row can only be continued from its end, so compaction
keeps the accepted path's last node's states and a row's snapshot holds them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.cache_utils import Cache, CacheLayerMixin, get_layer_types_and_kwargs

from drafters.modeling import CacheFullError
from specdec.device import ops
from specdec.device.hybrid.states import RowStates

RECURRENT_LAYER_TYPES = frozenset({"linear_attention", "conv", "hybrid", "hybrid_sliding"})


def layer_types_of(config) -> list[str]:
    """Each layer's cache type as transformers' own cache sees it (mlp / moe layers: ``dummy``);
    a config transformers cannot read it from (a sliding layer without a window) keeps the
    ``layer_types`` it states."""
    config = config.get_text_config(decoder=True)
    try:
        return list(get_layer_types_and_kwargs(config)[0])
    except (AttributeError, ValueError, TypeError):
        return list(getattr(config, "layer_types", None) or ["full_attention"] * config.num_hidden_layers)


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

    def __init__(self, owner: "RowCache", layer_type: str = "full_attention") -> None:
        super().__init__()
        self.owner = owner
        self.attends = layer_type not in ("linear_attention", "conv", "dummy")  # holds keys and values
        recurrent = layer_type in RECURRENT_LAYER_TYPES
        self.states = RowStates() if recurrent else None  # conv / recurrent states of a recurrent layer
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

    holds_rows = True  # the hybrid seams' mark of a specdec cache

    def __init__(self, num_layers: int, layer_types: list[str] | None = None) -> None:
        layer_types = layer_types or ["full_attention"] * num_layers
        if len(layer_types) != num_layers:
            raise ValueError(f"{len(layer_types)} layer types for {num_layers} layers")
        super().__init__(layers=[RowLayer(self, kind) for kind in layer_types])
        self.rows = 0
        self.capacity = 0
        self.lengths: list[int] = []
        self.forward: Forward | None = None
        self._index: torch.Tensor | None = None

    @classmethod
    def for_model(cls, model) -> "RowCache":
        config = model.config.get_text_config(decoder=True)
        return cls(config.num_hidden_layers, layer_types_of(config))

    @property
    def recurrent(self) -> list[RowStates]:
        """The recurrent layers' states (empty for attention-only models)."""
        return [layer.states for layer in self.layers if layer.states is not None]

    @property
    def bytes(self) -> int:
        """Bytes the buffers hold now."""
        return sum(t.numel() * t.element_size() for layer in self.layers for t in (layer.keys, layer.values)
                   if t is not None) + sum(states.bytes for states in self.recurrent)

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
            fresh_states = [states.resized(rows) for states in self.recurrent]
        except BaseException:
            self.rows, self.capacity = old_rows, old_capacity
            raise
        kept, held = min(rows, old_rows), min(capacity, old_capacity)
        for layer, (keys, values) in zip(self.layers, fresh):
            if keys is not None and layer.keys is not None and kept and held:
                keys[:kept, :, :held] = layer.keys[:kept, :, :held]
                values[:kept, :, :held] = layer.values[:kept, :, :held]
            layer.keys, layer.values = keys, values
        for states, tables in zip(self.recurrent, fresh_states):
            states.adopt(rows, tables)
        self.lengths = (self.lengths + [0] * rows)[:rows]

    def free(self) -> None:
        """Drop every buffer (no row is live); the layers' shapes are kept."""
        for layer in self.layers:
            layer.keys = layer.values = None
        for states in self.recurrent:
            states.adopt(0, ({}, {}))
        self.rows, self.capacity, self.lengths = 0, 0, []

    # ------------------------------------------------------------------ rows in, out and around
    def load_row(self, row: int, keys: list[torch.Tensor], values: list[torch.Tensor],
                 states: list[dict] | None = None, length: int | None = None) -> None:
        """Row ``row`` := the positions of a saved row (`snapshot_row`: ``[H, L, D]`` a layer), and,
        for recurrent layers, their ``states`` after all ``length`` positions (`snapshot_states`;
        ``length`` defaults to the keys' length, and must be given for a model without attention)."""
        length = length if length is not None else keys[0].shape[1] if keys else 0
        for layer, k, v in zip([layer for layer in self.layers if layer.attends], keys, values):
            if layer.keys is None:  # no forward of this cache yet: the saved row shows the layer's shape
                layer.lazy_initialization(k[None], v[None])
            layer.keys[row, :, :length] = k
            layer.values[row, :, :length] = v
        if self.recurrent and length and len(states or []) != len(self.recurrent):
            raise ValueError(f"a row of {length} positions needs the states of all {len(self.recurrent)} recurrent "
                             f"layers, got {len(states or [])}")
        for layer_states, saved in zip(self.recurrent, states or []):
            layer_states.load_row(row, saved)
        self.lengths[row] = length

    def snapshot_row(self, row: int, length: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Copies of the first ``length`` positions of row ``row`` (``[H, length, D]`` a layer)."""
        layers = [layer for layer in self.layers if layer.attends and layer.keys is not None]
        return ([layer.keys[row, :, :length].clone() for layer in layers],
                [layer.values[row, :, :length].clone() for layer in layers])

    def snapshot_states(self, row: int) -> list[dict]:
        """Copies of row ``row``'s recurrent states (after all its positions), a recurrent layer each."""
        return [states.snapshot_row(row) for states in self.recurrent]

    def move_row(self, source: int, target: int) -> None:
        """Row ``target`` := row ``source``, which is then empty."""
        length = self.lengths[source]
        for layer in self.layers:
            if layer.keys is not None and length:
                layer.keys[target, :, :length] = layer.keys[source, :, :length]
                layer.values[target, :, :length] = layer.values[source, :, :length]
        for states in self.recurrent:
            states.move_row(source, target)
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
        if host_slots:
            for states in self.recurrent:
                states.commit(row, host_slots[-1])
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
        for states in self.recurrent:
            states.release_nodes()
            for row, length in enumerate(offsets_host, start):
                if length == 0:  # a row starting afresh: no states left from the row's previous sequence
                    states.clear_row(row)
        self.forward, self._index = forward, None

    def write_index(self) -> torch.Tensor:
        """``[B, 1, q, 1]`` int64 device positions the forward's slots are written to."""
        if self._index is None:
            forward = self.forward
            steps = torch.arange(forward.queries, device=forward.offsets.device)
            self._index = (forward.offsets[:, None] + steps[None, :])[:, None, :, None]
        return self._index

    def release_tree_states(self) -> None:
        """Forget the per-node states of the last verify forward (its rows are compacted)."""
        for states in self.recurrent:
            states.release_nodes()

    def end_forward(self) -> None:
        self.forward, self._index = None, None

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.layers[0].get_seq_length()  # any layer: every one reads the forward's lengths

    # ------------------------------------------------------------------ recurrent layers (transformers' API)
    def _states(self, layer_idx: int) -> RowStates:
        states = self.layers[layer_idx].states
        if states is None:
            raise ValueError(f"layer {layer_idx} of this cache is not a recurrent layer")
        return states

    def has_previous_state(self, layer_idx: int | None = None, state_idx: int | None = None) -> bool:
        """Whether the forward's rows hold history: a forward of several rows (a verify) or of a row
        that already holds positions (a verify forward of one row at offset 0 starts from zeros)."""
        forward = self.forward
        return forward is not None and (forward.rows > 1 or forward.offsets_host[0] > 0)

    def get_conv_state(self, layer_idx: int, state_idx: int = 0) -> torch.Tensor | None:
        """The forward's rows' conv states (`RowStates.get`)."""
        forward = self.forward
        return self._states(layer_idx).get(self._states(layer_idx).conv, state_idx, forward.start, forward.rows,
                                           self.has_previous_state())

    def get_recurrent_state(self, layer_idx: int, state_idx: int = 0) -> torch.Tensor | None:
        """The forward's rows' recurrent states (`RowStates.get`)."""
        forward = self.forward
        return self._states(layer_idx).get(self._states(layer_idx).recurrent, state_idx, forward.start, forward.rows,
                                           self.has_previous_state())

    def update_conv_state(self, conv_states: torch.Tensor, layer_idx: int, state_idx: int = 0,
                          conv_kernel_size: int | None = None, **kwargs) -> torch.Tensor:
        """`RowStates.update_conv` for the forward's rows."""
        return self._states(layer_idx).update_conv(conv_states, state_idx, self.forward.start,
                                                   self.has_previous_state(), conv_kernel_size)

    def update_recurrent_state(self, recurrent_states: torch.Tensor, layer_idx: int, state_idx: int = 0,
                               **kwargs) -> torch.Tensor:
        """`RowStates.update_recurrent` for the forward's rows."""
        return self._states(layer_idx).update_recurrent(recurrent_states, state_idx, self.forward.start)

    def is_recording_past(self, layer_idx: int) -> bool:
        return False  # rows are rolled back by `compact_row`, not by transformers' recorded history

    def get_recurrent_states_to_keep(self, layer_idx: int | None = None) -> int:
        return 0

    def increase_count(self, layer_idx: int, state_idx: int) -> None:
        """Lengths are the rows' own (`lengths`): nothing to count."""
