"""Any model family: greedy equality with model.generate (fp32) on tiny random Llama, Qwen2, Gemma 3
(hybrid sliding-window / full attention, contexts shorter and longer than the window) and GPT-2
(learned absolute positions), for every drafter."""

from __future__ import annotations

import pytest
import torch
from transformers import (
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    GPT2Config,
    GPT2LMHeadModel,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from specdec import SpeculativeDecoder
from tests.conftest import ScriptedDrafter, hf_greedy, tiny_llama

V = 96
WINDOW = 8


def _sharpen(model):
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(8.0)
    return model.eval()


def tiny_qwen2(seed: int = 0):
    torch.manual_seed(seed)
    return _sharpen(Qwen2ForCausalLM(Qwen2Config(
        vocab_size=V, hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=6,
        num_key_value_heads=2, max_position_embeddings=512, bos_token_id=1, eos_token_id=2, pad_token_id=0)))


def tiny_gemma3(seed: int = 0):
    torch.manual_seed(seed)
    config = Gemma3TextConfig(
        vocab_size=V, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, sliding_window=WINDOW, max_position_embeddings=512,
        layer_types=["sliding_attention", "sliding_attention", "sliding_attention", "full_attention"],
        bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return _sharpen(Gemma3ForCausalLM(config))


def tiny_gpt2(seed: int = 0):
    torch.manual_seed(seed)
    return _sharpen(GPT2LMHeadModel(GPT2Config(
        vocab_size=V, n_embd=64, n_layer=2, n_head=4, n_positions=512, bos_token_id=1, eos_token_id=2)))


FAMILIES = {
    "llama": lambda seed=0: tiny_llama(seed=seed),
    "qwen2": tiny_qwen2,
    "gemma3": tiny_gemma3,
    "gpt2": tiny_gpt2,
}

# Gemma 3's prompts: shorter than the window, and three times longer.
PROMPTS = {
    "short": torch.tensor([[5, 17, 33, 8, 41]]),
    "long": torch.tensor([[5, 17, 33, 8, 41, 17, 33, 9, 60, 61, 5, 17, 33, 70, 71, 72, 5, 17, 33, 8, 41, 90, 91, 17]]),
}


def drafters(reference: torch.Tensor, family: str) -> dict:
    return {
        "recycling": "recycling",
        "ngram": "ngram",
        "recycling+ngram": "recycling+ngram",
        "model": "model",
        "oracle": ScriptedDrafter(reference[0], depth=6),
        "mixed": ScriptedDrafter(reference[0], depth=6, corrupt=lambda step, d: (step + d) % 3 == 0),
    }


CASES = [("gemma3", "short"), ("gemma3", "long"), ("llama", "long"), ("qwen2", "long"), ("gpt2", "long")]


@pytest.mark.parametrize("family, prompt_name", CASES)
def test_greedy_equality_for_every_drafter(family, prompt_name):
    """Only Gemma 3 has a window, so only it needs contexts on both sides of it."""
    model = FAMILIES[family]()
    draft_model = FAMILIES[family](seed=7)
    prompt = PROMPTS[prompt_name]
    new = 40  # with the long prompt, 64 positions: eight windows
    reference = hf_greedy(model, prompt, new)
    for name, drafter in drafters(reference, family).items():
        decoder = SpeculativeDecoder(model, drafter=drafter, tree_budget=10,
                                     draft_model=draft_model if name == "model" else None)
        out = decoder.generate(prompt, max_new_tokens=new, eos_token_id=-1)
        assert out.tolist() == reference.tolist(), f"{family} / {prompt_name} / {name}"
        if name == "oracle":
            assert decoder.last_stats.mean_accepted_tokens > 3  # long accepted blocks cross the window


def test_gemma3_uses_one_mask_per_layer_type():
    """Every layer keeps every position (the cache never evicts); the sliding layers' mask applies
    the window: a slot at position p sees keys at k only if p - k < window."""
    from specdec.device.tree import HostBuffer, RowTree, upload_rows
    from specdec.step.verify import tree_masks
    from trees import TokenTree, sliding_window_of

    model = tiny_gemma3()
    assert sliding_window_of(model.config) == (WINDOW, True)
    tree = TokenTree(torch.tensor([3, 4, 5]), torch.tensor([-1, 0, -1]))
    batch = upload_rows([RowTree(tree, 7, length=20)], [20], HostBuffer(torch.device("cpu")))
    masks = tree_masks(model, batch, 20 + batch.queries)
    assert masks["full_attention"].shape == masks["sliding_attention"].shape == (1, 1, 4, 24)
    full, sliding = masks["full_attention"][0, 0] == 0, masks["sliding_attention"][0, 0] == 0  # True = attends
    ancestors = torch.tensor([[1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0], [1, 0, 0, 1]], dtype=torch.bool)
    assert torch.equal(full[:, 20:], ancestors) and full[:, :20].all()
    positions = torch.tensor([20, 21, 22, 21])  # 20 + depth
    keys = torch.cat([torch.arange(20), positions])
    assert torch.equal(sliding, full & ((positions[:, None] - keys[None, :]) < WINDOW))
    assert sliding_window_of(tiny_llama().config) == (None, False)
    assert SpeculativeDecoder(model).kernel is None  # sliding layers keep the mask path


def test_gemma3_chat_session_beyond_the_window():
    """KV reuse with sliding layers: a pure extension of the cached history is reused, and so is
    the common prefix of a rollback (the cache keeps every position; windows are masks); both
    stay exact."""
    from specdec.step.request import DecodeRequest, KVState

    model = tiny_gemma3()
    decoder = SpeculativeDecoder(model, tree_budget=8)
    kv = KVState()
    first = PROMPTS["long"][0]
    out = decoder.decode(DecodeRequest(prompt=first, max_new_tokens=12, kv=kv))
    extended = torch.cat([first, torch.tensor(out.tokens), torch.tensor([40, 41, 42])])
    again = decoder.decode(DecodeRequest(prompt=extended, max_new_tokens=12, kv=kv))
    assert again.stats.reused_prefix_tokens == len(first) + len(out.tokens) - 1
    assert again.tokens == hf_greedy(model, extended[None], 12)[0, len(extended):].tolist()
    rolled_back = torch.cat([first, torch.tensor([50, 51])])
    third = decoder.decode(DecodeRequest(prompt=rolled_back, max_new_tokens=12, kv=kv))
    assert third.stats.reused_prefix_tokens >= len(first)  # the whole first prompt, three windows long
    assert third.tokens == hf_greedy(model, rolled_back[None], 12)[0, len(rolled_back):].tolist()


def test_state_files_refuse_another_vocabulary(tmp_path):
    decoder = SpeculativeDecoder(tiny_llama(), drafter="recycling")
    assert decoder.drafter.succ.shape[0] == V  # the recycling matrix is sized from the model's vocabulary
    decoder.save(tmp_path / "state.pt")
    other = SpeculativeDecoder(tiny_llama(vocab_size=80), drafter="recycling")
    with pytest.raises(ValueError, match="vocabulary of 96"):
        other.load(tmp_path / "state.pt")
