"""Row-wise argmax and top-k over vocabulary-sized rows, fast on a CPU.

On a CPU, torch's ``argmax``/``topk`` over ``[n+1, V]`` logits run about 15x slower than its
``amax`` reduction (1.1 ms against 0.07 ms for 17 x 49,152 fp32 logits on a 2-core AVX2 CPU),
a quarter of the decode step's host time with recycling. Here both go in two stages: the maximum of
each block of columns (a fast reduction), then the exact answer inside the few blocks that can
hold it. On other devices torch's own kernels are already fast and are used directly.
"""

from __future__ import annotations

import torch

# Block widths measured fastest for 17 x 49,152 rows (fp32 and bf16): argmax 0.10 ms at 512,
# top-8 0.23 ms at 256.
ARGMAX_BLOCK, TOPK_BLOCK, SMALLEST_BLOCK = 512, 256, 64


def _block_width(x: torch.Tensor, largest: int) -> int | None:
    """For a CPU ``x``: the largest power of two up to ``largest`` that splits its rows into at
    least two equal blocks; None where torch's own kernel is the better choice."""
    vocab = x.shape[-1]
    if x.device.type != "cpu" or x.shape[0] == 0:
        return None
    width = largest
    while width >= SMALLEST_BLOCK:
        if vocab % width == 0 and vocab // width >= 2:
            return width
        width //= 2
    return None


def row_argmax(x: torch.Tensor) -> torch.Tensor:
    """``[r]`` int64: ``x.argmax(dim=-1)`` of ``x [r, V]``, the same ids (the first maximum of a
    row, NaN counted as the maximum as torch does)."""
    width = _block_width(x, ARGMAX_BLOCK)
    if width is None:
        return x.argmax(dim=-1)
    blocks = x.unflatten(-1, (-1, width))  # [r, B, width] view
    first_block = blocks.amax(dim=-1).argmax(dim=-1)  # [r]: the first block holding the row's maximum
    rows = torch.arange(x.shape[0], device=x.device)
    return first_block * width + blocks[rows, first_block].argmax(dim=-1)


def row_topk_ids(x: torch.Tensor, k: int) -> torch.Tensor:
    """``[r, k]`` int64 ids of the ``k`` largest entries of each row of ``x [r, V]``, best first
    (the values of ``x.topk(k)``; between equal values other ids may be chosen)."""
    width = _block_width(x, TOPK_BLOCK)
    if width is None or x.shape[-1] // width <= k:
        return x.topk(k, dim=-1).indices
    blocks = x.unflatten(-1, (-1, width))  # [r, B, width] view
    best_blocks = blocks.amax(dim=-1).topk(k, dim=-1).indices  # [r, k]: the k top entries lie in these
    rows = torch.arange(x.shape[0], device=x.device)[:, None]
    candidates = blocks[rows, best_blocks]  # [r, k, width]
    values_at = candidates.flatten(1).topk(k, dim=-1).indices  # [r, k] into the k * width candidates
    return best_blocks.gather(1, values_at // width) * width + values_at % width
