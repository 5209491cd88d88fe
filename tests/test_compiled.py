"""The compiled verify forward (`specdec.device.compiled`): lossless in fp32 (single rows and
batches, trees partly wrong), a bounded number of graphs that later steps reuse, shared per model,
eager for good (said once) when compiling fails, and refused with a reason where it cannot apply.
Compiling a tiny model takes seconds a graph on a small CPU: the tests share one model per kind."""

from __future__ import annotations

import warnings

import pytest
import torch

import specdec
from specdec import SpeculativeDecoder
from specdec.device import compiled as compiled_module
from specdec.device import ops
from tests.conftest import ScriptedDrafter, hf_greedy, tiny_llama

pytestmark = pytest.mark.skipif(not ops.load(), reason="the compiled step runs with the csrc tree kernel")

ROWS = [[1, 7, 21, 40, 9], [3, 3, 50], [8, 61, 2, 17, 33, 4, 90, 12]]


@pytest.fixture(scope="module")
def fp32_model():
    return tiny_llama(seed=4)


def test_single_row_greedy_equals_hf_with_partly_wrong_trees(fp32_model):
    prompt = torch.tensor([ROWS[0]])
    expected = hf_greedy(fp32_model, prompt, 30)
    drafter = ScriptedDrafter(expected[0], corrupt=lambda step, depth: depth == 2, vocab_size=96)
    decoder = SpeculativeDecoder(fp32_model, drafter=drafter, tree_budget=6, compile=True)
    out = decoder.generate(prompt, max_new_tokens=30, do_sample=False, eos_token_id=-1)
    assert decoder.compiled is not None and decoder.compiled.failure is None
    assert decoder.compiled.graphs >= 1 and decoder.compiled.compile_seconds > 0
    assert torch.equal(out, expected)
    assert decoder.last_stats.steps < 30  # trees were verified


def test_batches_equal_each_row_alone_and_graphs_stay_bounded(fp32_model):
    """Rows of different lengths, with trees and plain, batched and alone: every row's output is
    its own HF greedy output; after one pass over the four kinds of forward (one row or several,
    one slot or several) a second pass over new lengths, capacities and trees compiles nothing."""
    width = max(map(len, ROWS))
    ids = torch.tensor([r + [0] * (width - len(r)) for r in ROWS])
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in ROWS])
    expected = [hf_greedy(fp32_model, torch.tensor([row]), 20)[0, len(row):].tolist() for row in ROWS]
    for budget in (None, 0):  # trees, then plain decoding
        out = specdec.generate(fp32_model, ids, attention_mask=mask, drafter="recycling+ngram", tree_budget=budget,
                               max_new_tokens=20, eos_token_id=-1, pad_token_id=0, compile=True)
        assert [out[b, width:].tolist() for b in range(len(ROWS))] == expected, budget
        alone = SpeculativeDecoder(fp32_model, drafter="recycling+ngram", tree_budget=budget, compile=True)
        out = alone.generate(torch.tensor([ROWS[1]]), max_new_tokens=20, do_sample=False, eos_token_id=-1)
        assert out[0, len(ROWS[1]):].tolist() == expected[1], budget
    compiled = SpeculativeDecoder(fp32_model, compile=True).compiled
    graphs = compiled.graphs
    assert 1 <= graphs <= 4
    longer = [row * 3 for row in ROWS]
    width = max(map(len, longer))
    ids = torch.tensor([r + [0] * (width - len(r)) for r in longer])
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in longer])
    for budget in (None, 0):
        specdec.generate(fp32_model, ids, attention_mask=mask, drafter="ngram", tree_budget=budget, max_new_tokens=30,
                         eos_token_id=-1, pad_token_id=0, compile=True)
        SpeculativeDecoder(fp32_model, drafter="recycling", tree_budget=budget, compile=True).generate(
            torch.tensor([longer[2]]), max_new_tokens=30, do_sample=False, eos_token_id=-1)
    assert compiled.graphs == graphs


def test_decoders_of_a_model_share_one_compiled_forward(fp32_model):
    first = SpeculativeDecoder(fp32_model, compile=True)
    second = SpeculativeDecoder(fp32_model, drafter="ngram", compile=True)
    assert first.compiled is second.compiled
    assert SpeculativeDecoder(fp32_model).compiled is None  # compile=False by default


def test_a_failed_compilation_runs_eager_and_says_so_once(monkeypatch):
    model = tiny_llama(seed=6)

    def broken(module, **options):
        def fail(**kwargs):
            raise RuntimeError("inductor exploded")
        return fail

    monkeypatch.setattr(compiled_module.torch, "compile", broken)
    prompt = torch.tensor([ROWS[2]])
    expected = hf_greedy(model, prompt, 16)
    decoder = SpeculativeDecoder(model, drafter="recycling+ngram", compile=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = decoder.generate(prompt, max_new_tokens=16, do_sample=False, eos_token_id=-1)
        again = decoder.generate(prompt, max_new_tokens=16, do_sample=False, eos_token_id=-1)
    assert torch.equal(out, expected) and torch.equal(again, expected)
    said = [w for w in caught if "inductor exploded" in str(w.message)]
    assert len(said) == 1 and "running it eager" in str(said[0].message)
    assert decoder.compiled.failure.startswith("RuntimeError: inductor exploded")


def test_where_it_cannot_apply_it_says_why_once():
    model = tiny_llama(seed=7)
    with pytest.warns(RuntimeWarning, match="tree kernel is not in use"):
        decoder = SpeculativeDecoder(model, tree_kernel=False, compile=True)
        assert decoder.compiled is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert decoder.compiled is None  # not said again
    with pytest.raises(TypeError, match="compile"):
        SpeculativeDecoder(model, compile="yes")


def test_reasons():
    model = tiny_llama()
    assert compiled_module.compile_unsupported(model, None, False, False) == \
        "the tree kernel is not in use for this model"
    assert "tensor-parallel" in compiled_module.compile_unsupported(model, object(), True, False)
    assert "features" in compiled_module.compile_unsupported(model, object(), False, True)
    assert compiled_module.compile_unsupported(model, object(), False, False) is None
