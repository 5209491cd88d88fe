"""Bit-packed boolean rows: the ancestor masks the tree-attention kernel reads (64 slots per word)."""

from __future__ import annotations

import numpy as np
import torch


def pack_rows(mask: torch.Tensor) -> torch.Tensor:
    """``[r, c]`` bool -> ``[r, ceil(c / 64)]`` int64; bit ``j % 64`` of word ``j // 64`` is ``mask[:, j]``."""
    rows, cols = mask.shape
    words = max(1, -(-cols // 64))
    padded = np.zeros((rows, words * 64), dtype=bool)
    padded[:, :cols] = mask.numpy()
    packed = np.packbits(padded, axis=1, bitorder="little")  # [r, words * 8] uint8, little-endian bytes
    return torch.from_numpy(packed.view("<i8").copy())


def unpack_rows(packed: torch.Tensor, cols: int) -> torch.Tensor:
    """Inverse of `pack_rows`: ``[r, words]`` int64 -> ``[r, cols]`` bool."""
    raw = np.ascontiguousarray(packed.numpy().astype("<i8")).view(np.uint8)  # [r, words * 8]
    return torch.from_numpy(np.unpackbits(raw, axis=1, bitorder="little")[:, :cols].astype(bool))
