"""A proposed tree on the model's device, from one host-to-device copy.

Everything the verify forward, the per-node logits processors and acceptance need about a tree is
packed on the host into one int64 tensor (pinned when the device is a GPU), copied up once
without blocking, and unpacked there; the ancestor matrix and root paths are derived on the
device. Tensors here are in slot space (``[n+1]``: slot 0 is the root, slot ``i + 1`` draft node
``i``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from trees import TokenTree

# rows of the host pack, before the packed ancestor words (_UNIFORMS: float64 bits, first max_depth+1 columns)
_TOKENS, _DEPTHS, _PARENTS, _CANDIDATES, _BY_DEPTH, _UNIFORMS = range(6)
_ROWS = 6


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

    def position_ids(self, prefix_len: int) -> torch.Tensor:
        """``[1, n+1]`` positions of the slots: ``prefix_len + depth``."""
        return (self.depths + prefix_len)[None]


def candidate_flags(tree: TokenTree) -> torch.Tensor:
    """``[n]`` bool: node is the first child of its parent with its token (host)."""
    seen: set[tuple[int, int]] = set()
    flags = torch.ones(len(tree), dtype=torch.bool)
    for node_idx, key in enumerate(zip(tree.parents.tolist(), tree.tokens.tolist())):
        if key in seen:
            flags[node_idx] = False
        seen.add(key)
    return flags


class TreeUploader:
    """Packs trees on the host and copies each to ``device`` in one non-blocking transfer.

    On a GPU the host buffer is pinned and reused once the previous copy out of it has completed
    (normally long before: every step synchronises when it reads its outcome back); a copy still
    in flight gets a fresh buffer instead of a wait.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = torch.device(device)
        self._pinned = self.device.type == "cuda"
        self._buffer = torch.empty(0, dtype=torch.long)
        self._copied = None  # CUDA event recorded after the last copy out of the buffer

    def _host(self, rows: int, cols: int) -> torch.Tensor:
        in_flight = self._copied is not None and not self._copied.query()
        if in_flight or self._buffer.numel() < rows * cols:
            self._buffer = torch.empty(max(rows * cols, 2 * self._buffer.numel()), dtype=torch.long,
                                       pin_memory=self._pinned)
        return self._buffer[: rows * cols].view(rows, cols)

    def upload(self, tree: TokenTree, root: int, uniforms: torch.Tensor | None = None) -> DeviceTree:
        """``tree`` below ``root`` on the device; ``uniforms`` (``[max_depth+1]`` float64, host) are
        the sampling draws of the tree's positions, carried in the same copy."""
        n = len(tree)
        max_depth = tree.max_depth
        packed = tree.packed_ancestor_mask()  # [n+1, W] host int64
        words = packed.shape[1]
        depths = torch.cat([torch.zeros(1, dtype=torch.long), tree.depths])  # [n+1]
        host = self._host(_ROWS + words, n + 1)
        host[_TOKENS, 0] = root
        host[_TOKENS, 1:] = tree.tokens
        host[_DEPTHS] = depths
        host[_PARENTS, 0] = 0
        host[_PARENTS, 1:] = tree.parents + 1
        host[_CANDIDATES, 0] = 1
        host[_CANDIDATES, 1:] = candidate_flags(tree)
        host[_BY_DEPTH] = torch.argsort(depths, stable=True)
        host[_UNIFORMS] = 0
        if uniforms is not None:
            host[_UNIFORMS, : max_depth + 1] = uniforms.view(torch.int64)  # the float64 bits
        host[_ROWS:] = packed.T
        pack = host.to(self.device, non_blocking=True)  # [rows, n+1]: the one host-to-device copy
        if self._pinned:
            self._copied = torch.cuda.Event()
            self._copied.record()
        counts = torch.bincount(depths, minlength=max_depth + 1).tolist()  # host data
        starts = [0]
        for count in counts:
            starts.append(starts[-1] + count)
        packed_device = pack[_ROWS:].T.contiguous()  # [n+1, W]
        ancestors = unpack_bits(packed_device, n + 1)
        return DeviceTree(
            tokens=pack[_TOKENS], depths=pack[_DEPTHS], parent_slots=pack[_PARENTS],
            candidates=pack[_CANDIDATES].bool(), by_depth=pack[_BY_DEPTH], packed_ancestors=packed_device,
            ancestors=ancestors, paths=root_paths(ancestors, max_depth),
            uniforms=pack[_UNIFORMS, : max_depth + 1].view(torch.float64), n=n, max_depth=max_depth,
            depth_starts=starts,
        )


def unpack_bits(packed: torch.Tensor, cols: int) -> torch.Tensor:
    """``[r, W]`` int64 -> ``[r, cols]`` bool on the same device (bit j of word j // 64)."""
    shifts = torch.arange(64, device=packed.device)
    bits = (packed.unsqueeze(-1) >> shifts) & 1  # arithmetic shift; & 1 keeps the bit, the sign bit too
    return bits.reshape(packed.shape[0], -1)[:, :cols].bool()


def root_paths(ancestors: torch.Tensor, max_depth: int) -> torch.Tensor:
    """``[n+1, max_depth+1]``: for each slot, its ancestors in slot order (root first, itself last)
    followed by padding. Slot order is topological, so ascending slots are root-to-leaf order."""
    order = torch.sort((~ancestors).to(torch.uint8), dim=1, stable=True).indices  # ancestors first
    return order[:, : max_depth + 1]
