"""The step's trees on the model's device, from one host-to-device copy.

A verify forward feeds ``B`` cache rows ``q`` query slots each (``q`` = the largest tree of the
step plus its root; a single sequence is a batch of one): row ``b``'s root and draft nodes, then
padding slots that attend only to themselves, are never candidates for acceptance and whose
outputs are ignored. A row with no sequence in the step (an idle row) is all padding.

Everything the forward, the per-node logits processors and acceptance need is computed on the
host (numpy: a tree has a few dozen nodes, and a handful of small numpy operations costs less
than launching one device kernel), packed into one flat int64 buffer (pinned and reused when the
device is a GPU) and copied up once without blocking; on the device every field is a view of that
copy, so an upload runs no device computation. Tensors are in slot space per row (``[q]``: slot
0 is the root, slot ``i + 1`` draft node ``i``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from trees import TokenTree


@dataclass(frozen=True)
class DeviceTree:
    """One row's tree as views of the step's upload (its own ``n+1`` slots).

    Attributes:
        tokens: ``[n+1]`` int64 token of each slot (the root first).
        depths: ``[n+1]`` int64 depth of each slot (root 0).
        parent_slots: ``[n+1]`` int64 parent slot of each slot (the root is its own parent).
        candidates: ``[n+1]`` bool, whether a slot may be accepted: the first of its siblings that
            carries its token (so at most one child of a slot can match the target's choice).
        by_depth: ``[n+1]`` int64 slots ordered by depth (``depth_starts`` delimits the depths).
        packed_ancestors: ``[n+1, W]`` int64, bit j of row i set iff slot j is slot i or one of its
            ancestors (what the tree-attention kernel reads).
        ancestors: ``[n+1, n+1]`` bool, the same unpacked.
        paths: ``[n+1, max_depth+1]`` int64, row i = the slots from the root down to slot i, then
            padding (slots that are not on the path).
        uniforms: ``[max_depth+1]`` float64, the sampling uniform of each depth's position
            (zeros for greedy decoding).
        n: draft nodes (host int); max_depth: deepest node (host int); depth_starts: host list,
            ``by_depth[depth_starts[d]:depth_starts[d+1]]`` are the slots at depth d.
        draft_probs, children, draw_rows, stage_uniforms: only for a tree whose tokens were drawn
            (`trees.DraftDraws`) and verified by sampling, else None: the draft distributions
            ``[m, V]``; ``[n+1, k]`` int64 each slot's children in draw order (-1 after the last);
            ``[n+1]`` int64 the row of ``draft_probs`` its children were drawn from (-1: none);
            ``[max_depth+1, k+1]`` float64 uniforms, one per (depth, sibling) and one for the
            depth's residual draw.
    """

    tokens: torch.Tensor
    depths: torch.Tensor
    parent_slots: torch.Tensor
    candidates: torch.Tensor
    by_depth: torch.Tensor
    packed_ancestors: torch.Tensor
    ancestors: torch.Tensor
    paths: torch.Tensor
    uniforms: torch.Tensor
    n: int
    max_depth: int
    depth_starts: list[int]
    draft_probs: torch.Tensor | None = None
    children: torch.Tensor | None = None
    draw_rows: torch.Tensor | None = None
    stage_uniforms: torch.Tensor | None = None


@dataclass(frozen=True)
class RowTree:
    """One row's tree for the step (host): ``tree`` below ``root``; the sampling ``uniforms``
    (``[max_depth+1]`` float64, or None for greedy decoding); for a sampled tree with draws,
    ``stage_uniforms(siblings)`` gives rejection sampling's ``[max_depth+1, siblings+1]`` float64
    uniforms (None: the delta rule); ``length``, the row's cache length (its root's position)."""

    tree: TokenTree
    root: int
    uniforms: torch.Tensor | None = None
    stage_uniforms: Callable[[int], torch.Tensor] | None = None
    length: int = 0


@dataclass(frozen=True)
class BatchTree:
    """The step's trees on the device, ``B`` rows of ``q`` slots.

    Attributes:
        tokens, depths, parent_slots: ``[B, q]`` int64 (padding: token 0, depth 0, its own parent).
        candidates: ``[B, q]`` bool (padding: False).
        ancestors: ``[B, q, q]`` bool, slot j is slot i or one of its ancestors (padding: itself).
        packed_ancestors: ``[B, q, ceil(q/64)]`` int64, the same as bits (the kernel's layout).
        paths: ``[B, q, D]`` int64, the slots from the root to each slot, then padding.
        lengths: ``[B]`` int64, each row's cache length (its root's position).
        rows: per row, its `DeviceTree` (views of its own slots) or None for an idle row.
        queries: ``q``; lengths_host: the lengths as host ints.
        parents_host, depths_host: ``[B, q]`` host copies of ``parent_slots`` and ``depths``
            (recurrent layers walk the tree by depth: `specdec.device.hybrid.levels`).
    """

    tokens: torch.Tensor
    depths: torch.Tensor
    parent_slots: torch.Tensor
    candidates: torch.Tensor
    ancestors: torch.Tensor
    packed_ancestors: torch.Tensor
    paths: torch.Tensor
    lengths: torch.Tensor
    rows: list[DeviceTree | None]
    queries: int
    lengths_host: list[int]
    parents_host: np.ndarray | None = None
    depths_host: np.ndarray | None = None

    def position_ids(self) -> torch.Tensor:
        """``[B, q]`` positions: each row's length plus the slot's depth."""
        return self.depths + self.lengths[:, None]


def candidate_flags(tree: TokenTree) -> np.ndarray:
    """``[n]`` bool: node is the first child of its parent with its token (host)."""
    keys = (tree.parents.numpy() + 1) << 32 | tree.tokens.numpy()  # token ids are below 2**32
    flags = np.zeros(len(tree), dtype=bool)
    flags[np.unique(keys, return_index=True)[1]] = True
    return flags


def draw_table(tree: TokenTree) -> tuple[np.ndarray, np.ndarray] | None:
    """``(children [n+1, k], rows [n+1])`` in slot space for a tree with draws (host): each slot's
    children in the order they were drawn (-1 after the last) and the draft row they were drawn
    from (-1: no children). None when the tree has no draws or they cannot be used: a parent's
    children must be the first ones it drew (ranks ``0..c-1``), all from one row."""
    if tree.draws is None or len(tree) == 0:
        return None
    parent_slots = tree.parents.numpy() + 1
    ranks, rows = tree.ranks.numpy(), tree.draws.rows.numpy()
    counts = np.bincount(parent_slots, minlength=len(tree) + 1)
    width = int(counts.max())
    if (ranks >= counts[parent_slots]).any():  # a rank past the parent's count: not the first draws
        return None
    children = np.full((len(tree) + 1, width), -1, dtype=np.int64)
    children[parent_slots, ranks] = np.arange(1, len(tree) + 1)
    if (children[counts > 0][:, 0] < 0).any() or ((children >= 0).sum(axis=1) != counts).any():
        return None  # a repeated rank
    slot_rows = np.full(len(tree) + 1, -1, dtype=np.int64)
    slot_rows[parent_slots] = rows
    if (slot_rows[parent_slots] != rows).any():  # siblings drawn from different rows
        return None
    return children, slot_rows


class FieldLayout:
    """Where each named field sits in one flat int64 upload buffer (``sizes``: words per field, in order)."""

    def __init__(self, sizes: dict[str, int]) -> None:
        self.spans, offset = {}, 0
        for name, size in sizes.items():
            self.spans[name] = (offset, offset + size)
            offset += size
        self.size = offset

    def view(self, flat, name: str):
        """The span of field ``name`` in ``flat`` (a tensor or array), as a view."""
        start, end = self.spans[name]
        return flat[start:end]


class HostBuffer:
    """The host side of the step's one copy. On a GPU a pinned buffer reused once the previous
    copy out of it has completed (normally long before: every step synchronises when it reads its
    outcome back; a copy still in flight gets a fresh buffer instead of a wait). On a CPU the
    buffer is the device tree itself, so each upload gets its own."""

    def __init__(self, device: torch.device) -> None:
        self.device = torch.device(device)
        self._pinned = self.device.type == "cuda"
        self._buffer = torch.empty(0, dtype=torch.long)
        self._copied = None  # CUDA event recorded after the last copy out of the buffer

    def take(self, size: int) -> torch.Tensor:
        """``[size]`` zeroed int64 host words for the next upload."""
        if not self._pinned:
            return torch.zeros(size, dtype=torch.long)
        in_flight = self._copied is not None and not self._copied.query()
        if in_flight or self._buffer.numel() < size:
            self._buffer = torch.empty(max(size, 2 * self._buffer.numel()), dtype=torch.long, pin_memory=True)
        words = self._buffer[:size]
        words.zero_()
        return words

    def send(self, words: torch.Tensor) -> torch.Tensor:
        """``words`` on the device: the one non-blocking host-to-device copy."""
        pack = words.to(self.device, non_blocking=True)
        if self._pinned:
            self._copied = torch.cuda.Event()
            self._copied.record(torch.cuda.current_stream(self.device))  # the stream the copy went on
        return pack


def _layout(b: int, q: int, w: int, d: int, drawn: dict[int, tuple[int, int, int]]) -> FieldLayout:
    """The fields of ``b`` rows of ``q`` slots (``w`` ancestor words, paths of ``d`` slots), plus,
    for each drawn row i, ``drawn[i] = (slots, width, siblings)`` of its draw table."""
    extra = {}
    for i, (slots, width, siblings) in drawn.items():
        extra |= {f"children{i}": slots * siblings, f"draw_rows{i}": slots, f"stage{i}": width * (siblings + 1)}
    return FieldLayout({"tokens": b * q, "depths": b * q, "parents": b * q, "by_depth": b * q, "packed": b * q * w,
                        "paths": b * q * d, "uniforms": b * d, "lengths": b, **extra,
                        "flags": -(-(b * q * q + b * q) // 8)})  # bool bytes: ancestors [b, q, q], candidates [b, q]


def upload_rows(rows: list[RowTree | None], idle_lengths: list[int], buffer: HostBuffer) -> BatchTree:
    """The step's ``rows`` (None: an idle row) on ``buffer``'s device in one copy. An idle row's
    padding is written after its ``idle_lengths[b]`` held positions, which it keeps."""
    live = [row for row in rows if row is not None]
    b = len(rows)
    q = 1 + max(len(row.tree) for row in live)
    d = 1 + max(row.tree.max_depth for row in live)
    w = -(-q // 64)
    tables = {i: draw_table(row.tree) for i, row in enumerate(rows)
              if row is not None and row.stage_uniforms is not None}
    tables = {i: table for i, table in tables.items() if table is not None}
    drawn = {i: (len(rows[i].tree) + 1, rows[i].tree.max_depth + 1, table[0].shape[1]) for i, table in tables.items()}
    layout = _layout(b, q, w, d, drawn)
    host = buffer.take(layout.size)
    array = host.numpy()
    tokens, depths, parents, by_depth = (layout.view(array, name).reshape(b, q)
                                         for name in ("tokens", "depths", "parents", "by_depth"))
    packed = layout.view(array, "packed").reshape(b, q, w)
    paths = layout.view(array, "paths").reshape(b, q, d)
    uniforms = layout.view(array, "uniforms").reshape(b, d)
    lengths = layout.view(array, "lengths")
    flags = layout.view(array, "flags").view(np.uint8)
    ancestors = flags[: b * q * q].reshape(b, q, q)
    candidates = flags[b * q * q : b * q * q + b * q].reshape(b, q)
    padding = np.arange(q)
    ancestors[:, padding, padding] = True  # padding sees itself
    parents[:] = padding
    by_depth[:] = padding
    paths[:] = padding[:, None]
    packed[:, padding, padding // 64] = (np.ones(q, dtype=np.uint64) << (padding % 64).astype(np.uint64)).view(np.int64)
    for i, row in enumerate(rows):
        if row is None:
            lengths[i] = idle_lengths[i]
            continue
        tree, slots = row.tree, len(row.tree) + 1
        width = tree.max_depth + 1
        row_ancestors = tree.ancestor_mask().numpy()  # [s, s]
        depths[i, 0], depths[i, 1:slots] = 0, tree.depths.numpy()
        tokens[i, 0], tokens[i, 1:slots] = row.root, tree.tokens.numpy()
        parents[i, 0], parents[i, 1:slots] = 0, tree.parents.numpy() + 1
        by_depth[i, :slots] = np.argsort(depths[i, :slots], kind="stable")
        ancestors[i, :slots, :slots] = row_ancestors
        row_packed = tree.packed_ancestor_mask().numpy()  # [s, ceil(s/64)]
        packed[i, :slots, :] = 0
        packed[i, :slots, : row_packed.shape[1]] = row_packed
        # each slot's ancestors in slot order (slot order is topological: root first, itself last), then padding
        paths[i, :slots, :width] = np.argsort(~row_ancestors, axis=1, kind="stable")[:, :width]
        if row.uniforms is not None:
            uniforms[i, :width] = row.uniforms.numpy().view(np.int64)  # the float64 bits
        candidates[i, 0] = True
        candidates[i, 1:slots] = candidate_flags(tree)
        lengths[i] = row.length
        if i in tables:
            children, draw_rows = tables[i]
            layout.view(array, f"children{i}")[:] = children.reshape(-1)
            layout.view(array, f"draw_rows{i}")[:] = draw_rows
            stage = row.stage_uniforms(children.shape[1])  # [width, siblings + 1] float64
            layout.view(array, f"stage{i}")[:] = stage.numpy().reshape(-1).view(np.int64)
    lengths_host = lengths.tolist()
    pack = buffer.send(host)  # [size]: the step's one host-to-device copy
    flag_bytes = layout.view(pack, "flags").view(torch.uint8).view(torch.bool)
    batch = BatchTree(
        tokens=layout.view(pack, "tokens").view(b, q), depths=layout.view(pack, "depths").view(b, q),
        parent_slots=layout.view(pack, "parents").view(b, q),
        candidates=flag_bytes[b * q * q : b * q * q + b * q].view(b, q),
        ancestors=flag_bytes[: b * q * q].view(b, q, q), packed_ancestors=layout.view(pack, "packed").view(b, q, w),
        paths=layout.view(pack, "paths").view(b, q, d), lengths=layout.view(pack, "lengths"),
        rows=[], queries=q, lengths_host=lengths_host, parents_host=parents.copy(), depths_host=depths.copy(),
    )
    by_depth_device = layout.view(pack, "by_depth").view(b, q)
    uniforms_device = layout.view(pack, "uniforms").view(torch.float64).view(b, d)
    for i, row in enumerate(rows):
        if row is None:
            batch.rows.append(None)
            continue
        draws = {}
        if i in tables:
            slots, width, siblings = drawn[i]
            draws = dict(draft_probs=_on(row.tree.draws.probs, buffer.device),
                         children=layout.view(pack, f"children{i}").view(slots, siblings),
                         draw_rows=layout.view(pack, f"draw_rows{i}"),
                         stage_uniforms=layout.view(pack, f"stage{i}").view(torch.float64).view(width, siblings + 1))
        batch.rows.append(_row_view(batch, i, row.tree, by_depth_device[i], uniforms_device[i], draws))
    return batch


def upload_one(tree: TokenTree, root: int, buffer: HostBuffer, uniforms: torch.Tensor | None = None,
               stage_uniforms: Callable[[int], torch.Tensor] | None = None, length: int = 0) -> DeviceTree:
    """One tree as the row view of a batch of one (`upload_rows`)."""
    return upload_rows([RowTree(tree, root, uniforms, stage_uniforms, length)], [length], buffer).rows[0]


def _on(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``tensor`` on ``device`` (a draft model on another device hands its distributions over)."""
    return tensor if tensor.device == device else tensor.to(device)


def _row_view(batch: BatchTree, i: int, tree: TokenTree, by_depth: torch.Tensor, uniforms: torch.Tensor,
              draws: dict) -> DeviceTree:
    """Row ``i``'s own slots as a `DeviceTree` of views."""
    slots, width = len(tree) + 1, tree.max_depth + 1
    starts = np.zeros(width + 1, dtype=np.int64)
    np.cumsum(np.bincount(np.concatenate([[0], tree.depths.numpy()]), minlength=width), out=starts[1:])
    return DeviceTree(
        tokens=batch.tokens[i, :slots], depths=batch.depths[i, :slots], parent_slots=batch.parent_slots[i, :slots],
        candidates=batch.candidates[i, :slots], by_depth=by_depth[:slots],
        packed_ancestors=batch.packed_ancestors[i, :slots], ancestors=batch.ancestors[i, :slots, :slots],
        paths=batch.paths[i, :slots, :width], uniforms=uniforms[:width], n=len(tree), max_depth=tree.max_depth,
        depth_starts=starts.tolist(), **draws,
    )
