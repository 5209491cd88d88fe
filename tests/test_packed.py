"""The engine's forwards on prepacked linear weights (`specdec.device.packed`): the view computes
what the model computes, shares its parameters and hooks, follows in-place weight changes, is made
once per model, and leaves the user's model as it was."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
from torch import nn

from specdec import SpeculativeDecoder
from specdec.device import packed
from specdec.device.packed import PackedLinear, can_pack, packed_view
from tests.conftest import ScriptedDrafter, hf_greedy, tiny_llama

pytestmark = pytest.mark.skipif(can_pack(tiny_llama().to(torch.bfloat16)) is not None,
                                reason="this torch build cannot pack linear weights")


def bf16_llama(seed: int = 0):
    return tiny_llama(seed=seed, vocab_size=128).to(torch.bfloat16)


@pytest.mark.parametrize("shape", [(1, 1), (1, 7), (3, 5), (4, 1)])
def test_view_computes_what_the_model_computes(shape):
    model = bf16_llama()
    view = packed_view(model)
    ids = torch.randint(3, 128, shape, generator=torch.Generator().manual_seed(sum(shape)))
    with torch.inference_mode():
        expected = model(ids).logits.float()
        got = view(ids).logits.float()
    torch.testing.assert_close(got, expected, atol=2e-2, rtol=2e-2)
    assert torch.equal(got.argmax(-1), expected.argmax(-1))


def test_view_uses_packed_weights_and_leaves_the_model_alone():
    model = bf16_llama()
    view = packed_view(model)
    linears = [m for m in view.modules() if isinstance(m, nn.Linear)]
    assert linears and all(type(m) is PackedLinear for m in linears)
    assert all(type(m) is nn.Linear for m in model.modules() if isinstance(m, nn.Linear))  # the model unchanged
    assert {id(p) for p in view.parameters()} == {id(p) for p in model.parameters()}  # shared, not copied
    assert view.lm_head.weight is model.lm_head.weight


def test_packed_path_really_runs(monkeypatch):
    """Every row count goes through the packed operator (a broken one would be seen)."""
    model = bf16_llama()
    view = packed_view(model)
    calls = []
    real = packed.packed_linear

    def counting(*args):
        calls.append(args[0].shape[0])
        return real(*args)

    monkeypatch.setattr(packed, "packed_linear", counting)
    with torch.inference_mode():
        view(torch.tensor([[5, 6, 7]]))
        assert calls and set(calls) == {3}
        calls.clear()
        view(torch.tensor([[5]]))
    assert calls and set(calls) == {1}


def test_in_place_weight_change_is_followed():
    model = bf16_llama()
    view = packed_view(model)
    ids = torch.tensor([[4, 9, 17, 33]])
    with torch.no_grad():
        model.lm_head.weight.mul_(-1.0)  # e.g. fine-tuning between calls
        model.model.layers[0].mlp.down_proj.weight.add_(0.5)
    with torch.inference_mode():
        torch.testing.assert_close(view(ids).logits.float(), model(ids).logits.float(), atol=2e-2, rtol=2e-2)


def test_hooks_on_the_model_fire_in_the_view():
    model = bf16_llama()
    view = packed_view(model)
    seen = []
    handle = model.lm_head.register_forward_pre_hook(lambda module, args: seen.append(args[0].shape))
    try:
        with torch.inference_mode():
            view(torch.tensor([[4, 9, 17]]))
    finally:
        handle.remove()
    assert seen == [torch.Size([1, 3, 64])]


def test_what_is_not_packed_says_why(monkeypatch):
    assert "float16" in can_pack(tiny_llama().to(torch.float16))
    assert can_pack(tiny_llama()) is None  # fp32 packs too
    model = bf16_llama()
    monkeypatch.setattr(packed, "_available_bytes", lambda: 1000)
    assert "memory" in can_pack(model)
    monkeypatch.setattr(packed, "_available_bytes", lambda: None)
    assert can_pack(model) is not None


def test_decoders_share_one_view_and_fp16_runs_the_model_itself():
    model = bf16_llama()
    first, second = SpeculativeDecoder(model), SpeculativeDecoder(model, drafter="ngram")
    assert first.forward_model is second.forward_model
    assert isinstance(first.forward_model.lm_head, PackedLinear)
    fp32 = tiny_llama()
    assert isinstance(SpeculativeDecoder(fp32).forward_model.lm_head, PackedLinear)
    fp16 = tiny_llama().to(torch.float16)
    assert SpeculativeDecoder(fp16).forward_model is fp16


def test_packed_decoding_equals_the_targets_greedy_output():
    """bf16, the packed view verifying trees that are partly wrong: the same tokens as HF greedy
    (decisive argmaxes: the tiny model's output weights are scaled up)."""
    model = bf16_llama(seed=3)
    prompt = torch.tensor([[1, 7, 21, 40, 9]])
    with torch.inference_mode():
        expected = hf_greedy(model, prompt, 24)
    drafter = ScriptedDrafter(expected[0], corrupt=lambda step, d: d == 2, vocab_size=128)
    decoder = SpeculativeDecoder(model, drafter=drafter, tree_budget=8)
    assert isinstance(decoder.forward_model.lm_head, PackedLinear)
    out = decoder.generate(prompt, max_new_tokens=24, do_sample=False, eos_token_id=-1)
    assert torch.equal(out, expected)
    assert decoder.last_stats.steps < 24  # trees were verified (several rows a forward)


def test_the_view_does_not_keep_the_model_alive():
    model = bf16_llama()
    decoder = SpeculativeDecoder(model)
    assert isinstance(decoder.forward_model.lm_head, PackedLinear)
    ref = weakref.ref(model)
    del model, decoder
    gc.collect()
    assert ref() is None


def test_a_model_converted_after_packing_is_followed():
    """``model.to(...)`` after the view was made: a dtype that is not packed (fp16) runs eager
    (exactly the model's own forward), fp32 and bf16 weights are packed again."""
    model = bf16_llama()
    view = packed_view(model)
    ids = torch.tensor([[4, 9, 17, 33]])
    model.to(torch.float16)
    with torch.inference_mode():
        assert torch.equal(view(ids).logits, model(ids).logits)
    model.to(torch.float32)
    with torch.inference_mode():
        torch.testing.assert_close(view(ids).logits, model(ids).logits, atol=1e-5, rtol=1e-5)
    assert view.lm_head.packed.dtype == torch.float32
    model.to(torch.bfloat16)
    with torch.no_grad():
        model.lm_head.weight.mul_(-1.0)
    with torch.inference_mode():
        torch.testing.assert_close(view(ids).logits.float(), model(ids).logits.float(), atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("rows", [1, 3, 8])
@pytest.mark.parametrize("with_bias", [False, True])
def test_packed_operator_equals_onednns_own_and_the_plain_product(dtype, rows, with_bias, monkeypatch):
    """The csrc operator, its fallback without the extension, and ``F.linear``: one product."""
    from specdec.device import ops

    generator = torch.Generator().manual_seed(rows)
    weight = torch.randn(40, 24, generator=generator).to(dtype)
    bias = torch.randn(40, generator=generator).to(dtype) if with_bias else None
    x = torch.randn(rows, 24, generator=generator).to(dtype)
    packed_weight = torch.ops.mkldnn._reorder_linear_weight(weight)
    expected = torch.nn.functional.linear(x, weight, bias).float()
    with torch.inference_mode():
        got = ops.packed_linear(x, packed_weight, bias, 40)
        assert ops.load() and got.shape == (rows, 40) and got.dtype == dtype
        torch.testing.assert_close(got.float(), expected, atol=2e-2, rtol=2e-2)
        monkeypatch.setattr(ops, "load", lambda: False)
        assert torch.equal(ops.packed_linear(x, packed_weight, bias, 40), got)


def test_packed_operator_checks_the_output_width():
    from specdec.device import ops

    packed_weight = torch.ops.mkldnn._reorder_linear_weight(torch.randn(40, 24).to(torch.bfloat16))
    with pytest.raises(RuntimeError, match="expected 41"):
        ops.packed_linear(torch.randn(2, 24).to(torch.bfloat16), packed_weight, None, 41)
