"""A proposed tree on the model's device, from one host-to-device copy.

Everything the verify forward, the per-node logits processors and acceptance need about a tree is
computed on the host (numpy: a tree has a few dozen nodes, and a handful of small numpy operations
costs less than launching one device kernel) and packed into one flat int64 buffer (pinned when
the device is a GPU), copied up once without blocking; on the device every field is a view of
that copy, so uploading a tree runs no device computation. Tensors here are in slot space
(``[n+1]``: slot 0 is the root, slot ``i + 1`` draft node ``i``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from trees import TokenTree


@dataclass(frozen=True)
class DeviceTree:
    """One tree's tensors on the model's device.

    Attributes:
        tokens: ``[n+1]`` int64 token of each slot (the root first).
        depths: ``[n+1]`` int64 depth of each slot (root 0).
        parent_slots: ``[n+1]`` int64 parent slot of each slot (the root is its own parent).
        candidates: ``[n+1]`` bool, whether a slot may be accepted: the first of its siblings that
            carries its token (so at most one child of a slot can match the target's choice).
        by_depth: ``[n+1]`` int64 slots ordered by depth (``depth_starts`` delimits the depths).
        packed_ancestors: ``[n+1, ceil((n+1)/64)]`` int64, bit j of row i set iff slot j is slot i
            or one of its ancestors (what the tree-attention kernel reads).
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

    def position_ids(self, prefix_len: int) -> torch.Tensor:
        """``[1, n+1]`` positions of the slots: ``prefix_len + depth``."""
        return (self.depths + prefix_len)[None]


def candidate_flags(tree: TokenTree) -> np.ndarray:
    """``[n]`` bool: node is the first child of its parent with its token (host)."""
    keys = (tree.parents.numpy() + 1) << 32 | tree.tokens.numpy()  # token ids are below 2**32
    flags = np.zeros(len(tree), dtype=bool)
    flags[np.unique(keys, return_index=True)[1]] = True
    return flags


def _on(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``tensor`` on ``device`` (a draft model on another device hands its distributions over)."""
    return tensor if tensor.device == device else tensor.to(device)


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


def tree_layout(slots: int, words: int, width: int, siblings: int = 0) -> FieldLayout:
    """The fields of a tree with ``slots`` slots, ``words`` ancestor words per slot, paths of
    ``width`` slots and, for drawn trees, ``siblings`` children per slot at most."""
    drawn = {"children": slots * siblings, "draw_rows": slots, "stage_uniforms": width * (siblings + 1)} \
        if siblings else {}
    return FieldLayout({"tokens": slots, "depths": slots, "parents": slots, "by_depth": slots, "packed": slots * words,
                        "paths": slots * width, "uniforms": width, **drawn,
                        "flags": -(-(slots * slots + slots) // 8)})  # bool bytes: ancestors [slots, slots], candidates


class TreeUploader:
    """Packs trees on the host and copies each to ``device`` in one non-blocking transfer.

    On a GPU the host buffer is pinned and reused once the previous copy out of it has completed
    (normally long before: every step synchronises when it reads its outcome back); a copy still
    in flight gets a fresh buffer instead of a wait. On a CPU the buffer is the device tree itself,
    so each tree gets its own.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = torch.device(device)
        self._pinned = self.device.type == "cuda"
        self._buffer = torch.empty(0, dtype=torch.long)
        self._copied = None  # CUDA event recorded after the last copy out of the buffer

    def _host(self, size: int) -> torch.Tensor:
        """``[size]`` int64 host buffer for the next tree."""
        if self.device.type == "cpu":  # the "copy" is the buffer itself: a fresh one per tree
            return torch.empty(size, dtype=torch.long)
        in_flight = self._copied is not None and not self._copied.query()
        if in_flight or self._buffer.numel() < size:
            self._buffer = torch.empty(max(size, 2 * self._buffer.numel()), dtype=torch.long, pin_memory=self._pinned)
        return self._buffer[:size]

    def upload(self, tree: TokenTree, root: int, uniforms: torch.Tensor | None = None,
               stage_uniforms=None) -> DeviceTree:
        """``tree`` below ``root`` on the device; ``uniforms`` (``[max_depth+1]`` float64, host) are
        the sampling draws of the tree's positions, carried in the same copy. For a tree with
        usable draws (`draw_table`), ``stage_uniforms(siblings)`` gives the ``[max_depth+1,
        siblings+1]`` float64 uniforms of rejection sampling, and the draw fields are filled."""
        n, max_depth = len(tree), tree.max_depth
        slots, width = n + 1, max_depth + 1
        ancestors = tree.ancestor_mask().numpy()  # [n+1, n+1] bool
        packed = tree.packed_ancestor_mask().numpy()  # [n+1, W]
        table = draw_table(tree) if stage_uniforms is not None else None
        siblings = 0 if table is None else table[0].shape[1]
        layout = tree_layout(slots, packed.shape[1], width, siblings)
        host = self._host(layout.size)
        host_array = host.numpy()
        fields = {name: layout.view(host_array, name) for name in layout.spans}  # numpy views of the buffer
        depths = fields["depths"]
        depths[0], depths[1:] = 0, tree.depths.numpy()
        fields["tokens"][0], fields["tokens"][1:] = root, tree.tokens.numpy()
        fields["parents"][0], fields["parents"][1:] = 0, tree.parents.numpy() + 1
        fields["by_depth"][:] = np.argsort(depths, kind="stable")
        fields["packed"][:] = packed.reshape(-1)
        # each slot's ancestors in slot order (slot order is topological: root first, itself last), then padding
        fields["paths"][:] = np.argsort(~ancestors, axis=1, kind="stable")[:, :width].reshape(-1)
        fields["uniforms"][:] = 0 if uniforms is None else uniforms.numpy().view(np.int64)  # the float64 bits
        if table is not None:
            fields["children"][:], fields["draw_rows"][:] = table[0].reshape(-1), table[1]
            fields["stage_uniforms"][:] = stage_uniforms(siblings).numpy().reshape(-1).view(np.int64)
        flags = fields["flags"].view(np.uint8)
        flags[: slots * slots] = ancestors.reshape(-1)
        flags[slots * slots] = True  # the root
        flags[slots * slots + 1 : slots * slots + slots] = candidate_flags(tree)
        pack = host.to(self.device, non_blocking=True)  # [size]: the one host-to-device copy
        if self._pinned:
            self._copied = torch.cuda.Event()
            self._copied.record(torch.cuda.current_stream(self.device))  # the stream the copy went on
        starts = np.zeros(width + 1, dtype=np.int64)
        np.cumsum(np.bincount(depths, minlength=width), out=starts[1:])
        flag_bytes = layout.view(pack, "flags").view(torch.uint8).view(torch.bool)
        return DeviceTree(
            tokens=layout.view(pack, "tokens"), depths=layout.view(pack, "depths"),
            parent_slots=layout.view(pack, "parents"), candidates=flag_bytes[slots * slots : slots * slots + slots],
            by_depth=layout.view(pack, "by_depth"), packed_ancestors=layout.view(pack, "packed").view(slots, -1),
            ancestors=flag_bytes[: slots * slots].view(slots, slots),
            paths=layout.view(pack, "paths").view(slots, width),
            uniforms=layout.view(pack, "uniforms").view(torch.float64), n=n, max_depth=max_depth,
            depth_starts=starts.tolist(),
            **({} if table is None else dict(
                draft_probs=_on(tree.draws.probs, self.device),
                children=layout.view(pack, "children").view(slots, siblings),
                draw_rows=layout.view(pack, "draw_rows"),
                stage_uniforms=layout.view(pack, "stage_uniforms").view(torch.float64).view(width, siblings + 1))),
        )
