"""On a CUDA device (``pytest -m cuda``; skipped without one): the CUDA operators against the
pure-torch reference, greedy equality with ``model.generate`` for every drafter, seeded sampling,
and the one-synchronisation-per-step budget seen by CUDA's own sync detector.

Runs from a plain checkout (``PYTHONPATH=. python -m pytest -m cuda``) with torch, transformers,
numba, networkx, click and rich; the csrc extension is built on first use (nvcc needed for the
CUDA operators; without it the tests of the operators are skipped and the rest use the fallbacks).
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

import specdec
from specdec.device import ops
from tests.conftest import hf_greedy, tiny_llama
from tests.test_families import tiny_gemma3
from tests.test_trees import random_tree
from trees import pack_rows

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")]

DEVICE = torch.device("cuda")
TOLERANCE = {torch.float32: 2e-4, torch.bfloat16: 2e-2, torch.float16: 5e-3}


def cuda_ops_loaded() -> bool:
    return ops.load() and ops.cuda_usable()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("prefix_len", [0, 17, 1000, 4000])
@pytest.mark.parametrize("group", [1, 4])
def test_tree_attention_cuda_matches_reference(dtype, prefix_len, group):
    if not cuda_ops_loaded():
        pytest.skip(f"CUDA operators not built: {ops.status()}")
    rng = np.random.default_rng(prefix_len + group)
    torch.manual_seed(prefix_len)
    for n, dim in ((1, 64), (9, 128), (64, 64), (128, 80)):
        mask = random_tree(rng, n - 1).ancestor_mask() if n > 1 else torch.ones(1, 1, dtype=torch.bool)
        anc = pack_rows(mask).to(DEVICE)
        seq = prefix_len + n
        # K and V as narrowed views of a larger buffer, as the preallocated cache hands them over
        k = torch.randn(1, 2, seq + 37, dim, device=DEVICE, dtype=dtype)[:, :, :seq]
        v = torch.randn(1, 2, seq + 37, dim, device=DEVICE, dtype=dtype)[:, :, :seq]
        q = torch.randn(1, 2 * group, n, dim, device=DEVICE, dtype=dtype)
        ours = torch.ops.specdec.tree_attention(q, k, v, anc, prefix_len, dim ** -0.5)
        reference = ops.tree_attention_reference(q, k, v, anc, prefix_len, dim ** -0.5)
        torch.testing.assert_close(ours.float(), reference.float(), atol=TOLERANCE[dtype], rtol=TOLERANCE[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_kv_compact_cuda_matches_reference(dtype):
    if not cuda_ops_loaded():
        pytest.skip(f"CUDA operators not built: {ops.status()}")
    torch.manual_seed(0)
    for prefix_len, keep in ((6, [0, 2, 3, 7]), (0, [0, 1]), (100, [0, 5, 9, 33, 60])):
        keep = torch.tensor(keep, device=DEVICE)
        keys = [torch.randn(1, 3, 200, 64, device=DEVICE, dtype=dtype)[:, :, :170] for _ in range(2)]
        values = [torch.randn(1, 3, 200, 64, device=DEVICE, dtype=dtype)[:, :, :170] for _ in range(2)]
        expected_k, expected_v = [t.clone() for t in keys], [t.clone() for t in values]
        ops.kv_compact_reference(expected_k, expected_v, prefix_len, keep)
        torch.ops.specdec.kv_compact(keys, values, prefix_len, keep)
        end = prefix_len + keep.numel()
        for ours, ref in zip(keys + values, expected_k + expected_v):
            assert torch.equal(ours[:, :, :end], ref[:, :, :end])


def drafters_for(reference: torch.Tensor):
    from tests.conftest import ScriptedDrafter

    return {"recycling": "recycling", "ngram": "ngram", "auto": "auto", "model": "model",
            "oracle": ScriptedDrafter(reference[0].cpu(), depth=6),
            "mixed": ScriptedDrafter(reference[0].cpu(), depth=6, corrupt=lambda step, d: (step + d) % 3 == 0)}


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_greedy_equality_on_cuda_for_every_drafter(family):
    make = {"llama": lambda seed=0: tiny_llama(seed=seed), "gemma3": tiny_gemma3}[family]
    model, draft = make().to(DEVICE), make(seed=7).to(DEVICE)
    prompt = torch.tensor([[5, 17, 33, 8, 41, 17, 33, 9, 60, 61, 5, 17, 33, 70, 71, 72, 5, 17, 33, 8, 41, 90]],
                          device=DEVICE)
    reference = hf_greedy(model, prompt, 40)
    for name, drafter in drafters_for(reference).items():
        for budget in (None, 10):
            decoder = specdec.SpeculativeDecoder(model, drafter=drafter, tree_budget=budget,
                                                 draft_model=draft if name == "model" else None)
            out = decoder.generate(prompt, max_new_tokens=40, eos_token_id=-1)
            assert out.device == prompt.device
            assert out.tolist() == reference.tolist(), f"{family} / {name} / budget {budget}"


def test_seeded_sampling_on_cuda_repeats_and_stays_in_the_allowed_set():
    model = tiny_llama(seed=4).to(DEVICE)
    prompt = torch.tensor([[3, 4, 5, 3, 4]], device=DEVICE)

    def run(seed):
        return specdec.generate(model, prompt, max_new_tokens=30, eos_token_id=-1, do_sample=True, top_k=5,
                                temperature=0.9, generator=seed, tree_budget=8)

    first = run(11)
    assert torch.equal(first, run(11)) and not torch.equal(first, run(12))
    # every sampled token is within the top-5 of the target at its position (top_k=5 is respected)
    with torch.no_grad():
        logits = model(first).logits[0, prompt.shape[1] - 1 : -1]
    allowed = logits.topk(5, dim=-1).indices
    assert (allowed == first[0, prompt.shape[1]:, None]).any(dim=-1).all()


def test_one_synchronisation_per_step_on_cuda():
    """CUDA's own detector counts synchronising calls; the decode steps make one each."""
    model = tiny_llama(seed=6).to(DEVICE)
    prompt = torch.tensor([[5, 6, 7, 8, 5, 6, 7, 8, 5, 6]], device=DEVICE)
    for drafter in ("recycling", "ngram", "auto"):
        decoder = specdec.SpeculativeDecoder(model, drafter=drafter, tree_budget=8)
        decoder.generate(prompt, max_new_tokens=8, eos_token_id=-1)  # warm-up (allocations, lazy builds)
        torch.cuda.synchronize()
        step = decoder.loop.step  # the engine loop runs each decode step through it
        counts = []

        def counted_step(*args, **kwargs):
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                torch.cuda.set_sync_debug_mode("warn")
                try:
                    return step(*args, **kwargs)
                finally:
                    torch.cuda.set_sync_debug_mode("default")
                    counts.append(sum("synchroniz" in str(w.message) for w in caught))

        decoder.loop.step = counted_step
        out = decoder.generate(prompt, max_new_tokens=32, eos_token_id=-1, return_dict_in_generate=True)
        assert out.spec_stats.steps == len(counts) and max(counts) <= 1, (drafter, counts)
