"""The two-stage row argmax and top-k used on CPU logits, against torch's own kernels."""

from __future__ import annotations

import pytest
import torch

from specdec.device.reductions import row_argmax, row_topk_ids


def logits_with_ties(rows: int, vocab: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, vocab, generator=generator).to(dtype)
    x[0, 3] = x[0, vocab - 2] = 50.0  # the maximum twice, far apart: the first one counts
    x[1] = 0.0  # every entry equal
    x[2, vocab // 2] = x[2, vocab // 2 + 1] = 50.0  # twice in one block
    x[3, 7] = float("nan")  # NaN is the maximum for torch
    x[4, vocab - 1] = float("inf")
    x[5] = float("-inf")
    x[6] = x[6].round()  # many ties everywhere
    return x


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("vocab", [49152, 1024, 32000, 50257, 96])  # blocks of 512, 256, 256; none; none
@pytest.mark.parametrize("seed", range(3))
def test_row_argmax_is_torch_argmax(dtype, vocab, seed):
    x = logits_with_ties(9, vocab, dtype, seed)
    assert torch.equal(row_argmax(x), x.argmax(dim=-1))
    assert torch.equal(row_argmax(x[:1]), x[:1].argmax(dim=-1))


def test_row_argmax_of_no_rows():
    assert row_argmax(torch.zeros(0, 4096)).shape == (0,)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("vocab", [49152, 32000, 50257, 2048])
@pytest.mark.parametrize("k", [1, 4, 8])
def test_row_topk_ids_hold_the_top_values(dtype, vocab, k):
    x = logits_with_ties(9, vocab, dtype, seed=k)[[0, 1, 2, 4, 6, 7, 8]]  # no NaN rows: their order is undefined
    ids = row_topk_ids(x, k)
    assert ids.shape == (x.shape[0], k)
    assert torch.equal(x.gather(1, ids), x.topk(k, dim=-1).values)  # the same values, best first
    assert all(len(set(row)) == k for row in ids.tolist())  # distinct ids
