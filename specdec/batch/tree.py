"""The trees of a batch on the model's device, from one host-to-device copy.

Each row of a batched verify forward feeds ``q`` slots (``q`` = the largest tree of the batch plus
its root): row ``b``'s root and draft nodes, then padding slots that attend only to themselves,
are never candidates for acceptance, and whose outputs are ignored. Rows without a sequence in
this step (a gap left by a sequence that is between steps) are all padding. Every field of every
row is packed on the host (numpy) into one flat int64 buffer, copied up once; on the device each
field is a view of that copy, and each active row also gets a `DeviceTree` of views (its own
slots only) for the per-slot logits processors and sampling.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from specdec.device.tree import DeviceTree, FieldLayout, candidate_flags
from trees import TokenTree


@dataclass(frozen=True)
class RowTree:
    """One active row's tree for the batch: ``tree`` below ``root``, the sampling ``uniforms``
    (``[max_depth+1]`` float64 host, or None) and the row's cache length ``length``."""

    tree: TokenTree
    root: int
    uniforms: torch.Tensor | None
    length: int


@dataclass(frozen=True)
class BatchTree:
    """The batch's trees on the device, ``B`` rows of ``q`` slots (slot space per row).

    Attributes:
        tokens, depths, parent_slots: ``[B, q]`` int64 (padding: token 0, depth 0, its own parent).
        candidates: ``[B, q]`` bool (padding: False).
        ancestors: ``[B, q, q]`` bool, slot j is slot i or one of its ancestors (padding: itself).
        packed_ancestors: ``[B, q, ceil(q/64)]`` int64, the same as bits (the kernel's layout).
        paths: ``[B, q, D]`` int64, the slots from the root to each slot, then padding.
        lengths: ``[B]`` int64, each row's cache length (its root's position).
        rows: per row, its `DeviceTree` (views of its own slots) or None for an idle row.
        queries: ``q``; lengths_host: the lengths as host ints.
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

    def position_ids(self) -> torch.Tensor:
        """``[B, q]`` positions: each row's length plus the slot's depth."""
        return self.depths + self.lengths[:, None]


def batch_layout(b: int, q: int, w: int, d: int) -> FieldLayout:
    """The fields of ``b`` rows of ``q`` slots (``w`` ancestor words, paths of ``d`` slots)."""
    return FieldLayout({"tokens": b * q, "depths": b * q, "parents": b * q, "by_depth": b * q, "packed": b * q * w,
                        "paths": b * q * d, "uniforms": b * d, "lengths": b,
                        "flags": -(-(b * q * q + b * q) // 8)})  # bool bytes: ancestors [b, q, q], candidates [b, q]


def upload_batch(rows: list[RowTree | None], idle_lengths: list[int], device: torch.device) -> BatchTree:
    """The batch's ``rows`` (None: idle) on ``device`` in one copy. An idle row's padding is
    written after its ``idle_lengths[b]`` held positions, which it keeps."""
    trees = [row.tree for row in rows if row is not None]
    b = len(rows)
    q = 1 + max(len(t) for t in trees)
    d = 1 + max(t.max_depth for t in trees)
    w = -(-q // 64)
    layout = batch_layout(b, q, w, d)
    host = torch.zeros(layout.size, dtype=torch.long, pin_memory=torch.device(device).type == "cuda")
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
    ancestors[:, np.arange(q), np.arange(q)] = True  # padding sees itself
    parents[:] = np.arange(q)
    by_depth[:] = np.arange(q)
    paths[:] = np.arange(q)[:, None]
    packed[:, np.arange(q), np.arange(q) // 64] = (np.ones(q, dtype=np.uint64) << (np.arange(q) % 64).astype(
        np.uint64)).view(np.int64)
    widths = []
    for i, row in enumerate(rows):
        if row is None:
            lengths[i] = idle_lengths[i]
            widths.append(None)
            continue
        tree, slots = row.tree, len(row.tree) + 1
        width = tree.max_depth + 1
        row_ancestors = tree.ancestor_mask().numpy()  # [s, s]
        depths[i, :slots] = np.concatenate([[0], tree.depths.numpy()])
        tokens[i, :slots] = np.concatenate([[row.root], tree.tokens.numpy()])
        parents[i, :slots] = np.concatenate([[0], tree.parents.numpy() + 1])
        by_depth[i, :slots] = np.argsort(depths[i, :slots], kind="stable")
        ancestors[i, :slots, :slots] = row_ancestors
        row_packed = tree.packed_ancestor_mask().numpy()  # [s, ceil(s/64)]
        packed[i, :slots, :] = 0
        packed[i, :slots, : row_packed.shape[1]] = row_packed
        paths[i, :slots, :width] = np.argsort(~row_ancestors, axis=1, kind="stable")[:, :width]
        if row.uniforms is not None:
            uniforms[i, :width] = row.uniforms.numpy().view(np.int64)
        candidates[i, 0] = True
        candidates[i, 1:slots] = candidate_flags(tree)
        lengths[i] = row.length
        widths.append(width)
    pack = host.to(device, non_blocking=True)  # [size]: the step's one host-to-device copy
    flag_bytes = layout.view(pack, "flags").view(torch.uint8).view(torch.bool)
    batch = BatchTree(
        tokens=layout.view(pack, "tokens").view(b, q), depths=layout.view(pack, "depths").view(b, q),
        parent_slots=layout.view(pack, "parents").view(b, q),
        candidates=flag_bytes[b * q * q : b * q * q + b * q].view(b, q),
        ancestors=flag_bytes[: b * q * q].view(b, q, q), packed_ancestors=layout.view(pack, "packed").view(b, q, w),
        paths=layout.view(pack, "paths").view(b, q, d), lengths=layout.view(pack, "lengths"),
        rows=[], queries=q, lengths_host=lengths.tolist(),
    )
    by_depth_device = layout.view(pack, "by_depth").view(b, q)
    uniforms_device = layout.view(pack, "uniforms").view(torch.float64).view(b, d)
    for i, row in enumerate(rows):
        batch.rows.append(None if row is None else _row_view(batch, i, row.tree, widths[i], by_depth_device[i],
                                                              uniforms_device[i]))
    return batch


def _row_view(batch: BatchTree, i: int, tree: TokenTree, width: int, by_depth: torch.Tensor,
              uniforms: torch.Tensor) -> DeviceTree:
    """Row ``i``'s own slots as a `DeviceTree` of views."""
    slots = len(tree) + 1
    starts = np.zeros(width + 1, dtype=np.int64)
    np.cumsum(np.bincount(np.concatenate([[0], tree.depths.numpy()]), minlength=width), out=starts[1:])
    return DeviceTree(
        tokens=batch.tokens[i, :slots], depths=batch.depths[i, :slots], parent_slots=batch.parent_slots[i, :slots],
        candidates=batch.candidates[i, :slots], by_depth=by_depth[:slots],
        packed_ancestors=batch.packed_ancestors[i, :slots], ancestors=batch.ancestors[i, :slots, :slots],
        paths=batch.paths[i, :slots, :width], uniforms=uniforms[:width], n=len(tree), max_depth=tree.max_depth,
        depth_starts=starts.tolist(),
    )
