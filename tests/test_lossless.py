"""Greedy output equals model.generate(do_sample=False), token for token (fp32, tiny models)."""

from __future__ import annotations

import pytest
import torch

import specdec
from drafters import ModelDrafter
from specdec import SpeculativeDecoder
from tests.conftest import ScriptedDrafter, hf_greedy, tiny_llama

PROMPTS = [torch.randint(3, 96, (1, n), generator=torch.Generator().manual_seed(n)) for n in (1, 5, 17)]


def _reference(model, prompt, max_new_tokens, eos_token_id=-1):
    if max_new_tokens == 0:  # transformers refuses max_new_tokens=0; the answer is the prompt itself
        return prompt
    return hf_greedy(model, prompt, max_new_tokens, eos_token_id)


@pytest.mark.parametrize("max_new_tokens", [0, 1, 2, 33])
@pytest.mark.parametrize("prompt", PROMPTS, ids=lambda p: f"len{p.shape[1]}")
def test_recycling_matches_hf_greedy(model, prompt, max_new_tokens):
    ref = _reference(model, prompt, max_new_tokens)
    out = specdec.generate(model, prompt, max_new_tokens=max_new_tokens, eos_token_id=-1)
    assert torch.equal(out, ref)


@pytest.mark.parametrize(
    "regime, corrupt, sibling",
    [
        ("all-accepted", None, True),
        ("mixed-sibling", lambda step, d: (step + d) % 3 == 2, True),
        ("mixed-cut", lambda step, d: d == step % 5, False),
    ],
)
@pytest.mark.parametrize("max_new_tokens", [1, 2, 33])
def test_scripted_regimes_match(model, regime, corrupt, sibling, max_new_tokens):
    prompt = PROMPTS[1]
    ref = _reference(model, prompt, 40)
    drafter = ScriptedDrafter(ref[0], depth=6, corrupt=corrupt, sibling=sibling)
    decoder = SpeculativeDecoder(model, drafter=drafter, tree_budget=16)
    out = decoder.generate(prompt, max_new_tokens=max_new_tokens, eos_token_id=-1, return_dict_in_generate=True)
    assert torch.equal(out.sequences, ref[:, : prompt.shape[1] + max_new_tokens])
    stats = out.spec_stats
    assert stats.new_tokens == max_new_tokens
    if regime == "all-accepted" and max_new_tokens == 33:
        assert stats.steps == 5  # 7 tokens per step (6 drafted + bonus): ceil(33 / 7)
    if regime.startswith("mixed") and max_new_tokens == 33:
        assert 1.0 < stats.mean_accepted_tokens < 7.0


def test_none_accepted_is_plain_decoding(model):
    prompt = PROMPTS[2]
    ref = _reference(model, prompt, 33)
    decoder = SpeculativeDecoder(model, drafter=ScriptedDrafter(None, depth=5), tree_budget=8)
    out = decoder.generate(prompt, max_new_tokens=33, eos_token_id=-1, return_dict_in_generate=True)
    assert torch.equal(out.sequences, ref)
    assert out.spec_stats.steps >= 30  # random drafts are (almost) never accepted


@pytest.mark.parametrize("eos_offset", [0, 3, 5])
def test_eos_accepted_mid_block_ends_output(model, eos_offset):
    """Declare a token the model produces to be EOS (transformers#47912 repro)."""
    prompt = PROMPTS[1]
    free = _reference(model, prompt, 30)[0, prompt.shape[1] :].tolist()
    eos = free[eos_offset]
    first = free.index(eos)
    ref = _reference(model, prompt, 30, eos_token_id=eos)
    assert ref.shape[1] == prompt.shape[1] + first + 1
    full = _reference(model, prompt, 30)
    drafter = ScriptedDrafter(full[0], depth=8)  # everything accepted: EOS lands inside a block
    out = SpeculativeDecoder(model, drafter=drafter, tree_budget=8).generate(
        prompt, max_new_tokens=30, eos_token_id=[eos], return_dict_in_generate=True
    )
    assert torch.equal(out.sequences, ref)
    assert out.spec_stats.new_tokens == first + 1


def test_default_eos_from_generation_config(model):
    prompt = PROMPTS[2]
    ref = model.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False, max_new_tokens=40)
    out = specdec.generate(model, prompt, max_new_tokens=40)
    assert torch.equal(out, ref)


@pytest.mark.parametrize("budget", [0, 1, 3, 40])
def test_tree_budgets_keep_output(model, budget):
    prompt = PROMPTS[2]
    ref = _reference(model, prompt, 25)
    out = SpeculativeDecoder(model, tree_budget=budget).generate(prompt, max_new_tokens=25, eos_token_id=-1)
    assert torch.equal(out, ref)


def test_hot_state_repeated_prompt_accepts_more(model):
    """The second run of a prompt drafts from what the first one recycled."""
    prompt = PROMPTS[1]
    decoder = SpeculativeDecoder(model, tree_budget=12)
    first = decoder.generate(prompt, max_new_tokens=40, eos_token_id=-1, return_dict_in_generate=True)
    second = decoder.generate(prompt, max_new_tokens=40, eos_token_id=-1, return_dict_in_generate=True)
    assert torch.equal(first.sequences, second.sequences)
    assert second.spec_stats.steps < first.spec_stats.steps
    decoder.reset()
    cold = decoder.generate(prompt, max_new_tokens=40, eos_token_id=-1, return_dict_in_generate=True)
    assert cold.spec_stats.steps == first.spec_stats.steps


def test_other_vocab_model():
    model = tiny_llama(vocab_size=300, seed=3)
    prompt = torch.randint(0, 300, (1, 9), generator=torch.Generator().manual_seed(1))
    ref = _reference(model, prompt, 33)
    assert torch.equal(specdec.generate(model, prompt, max_new_tokens=33, eos_token_id=-1), ref)


@pytest.mark.parametrize("drafter", ["ngram", "recycling+ngram"])
@pytest.mark.parametrize("max_new_tokens", [1, 2, 33])
def test_ngram_and_hybrid_match_hf_greedy(model, drafter, max_new_tokens):
    # a repetitive prompt so n-gram matches exist
    prompt = torch.tensor([[5, 6, 7, 8, 5, 6, 7, 8, 5, 6, 9, 5, 6]])
    ref = _reference(model, prompt, max_new_tokens)
    decoder = SpeculativeDecoder(model, drafter=drafter, tree_budget=10)
    verified = []  # (sources, accepted node_idx) of every verified tree, as the drafter is told
    observe = decoder.drafter.observe

    def recording_observe(feedback):
        if feedback.tree is not None:
            verified.append((feedback.tree.sources.numpy(), list(feedback.accepted_nodes)))
        observe(feedback)

    decoder.drafter.observe = recording_observe
    for _ in range(2):  # the second run also drafts from the cross-request store
        verified.clear()
        out = decoder.generate(prompt, max_new_tokens=max_new_tokens, eos_token_id=-1, return_dict_in_generate=True)
        assert torch.equal(out.sequences, ref)
    names = {m.source_id: m.name for m in getattr(decoder.drafter, "members", [decoder.drafter])}
    expected: dict[str, dict[str, int]] = {}
    for sources, accepted in verified:  # the per-drafter counts, recounted from what was verified
        for node, source in enumerate(sources):
            entry = expected.setdefault(names[int(source)], {"proposed": 0, "accepted": 0})
            entry["proposed"] += 1
            entry["accepted"] += node in accepted
    assert out.spec_stats.per_drafter == expected


@pytest.mark.parametrize("relation", ["copy", "unrelated"])
def test_model_drafter_matches_hf_greedy(model, relation):
    draft = model if relation == "copy" else tiny_llama(seed=11)
    prompt = PROMPTS[2]
    ref = _reference(model, prompt, 33)
    decoder = SpeculativeDecoder(model, drafter="model", draft_model=draft, tree_budget=12)
    out = decoder.generate(prompt, max_new_tokens=33, eos_token_id=-1, return_dict_in_generate=True)
    assert torch.equal(out.sequences, ref)
    if relation == "copy":
        assert out.spec_stats.mean_accepted_tokens >= 2.5  # a copy of the target drafts what it will say
        chain = ModelDrafter(draft, vocab_size=96, top_k=1, beam=1, max_depth=8,  # every drafted token accepted
                             clock=lambda: 0.0)  # no timings: the depth rule drafts every depth
        out = SpeculativeDecoder(model, drafter=chain, tree_budget=12).generate(
            prompt, max_new_tokens=33, eos_token_id=-1, return_dict_in_generate=True)
        assert torch.equal(out.sequences, ref)
        assert out.spec_stats.accepted_lengths == [9, 9, 9, 6]
    else:
        assert out.spec_stats.mean_accepted_tokens < 1.5
    assert torch.equal(specdec.generate(model, prompt, drafter="model+recycling", draft_model=draft,
                                        max_new_tokens=33, eos_token_id=-1), ref)
