"""Token trees through hybrid and state-space models (`specdec.device.hybrid`): Gated DeltaNet, Kimi Delta
Attention, Mamba-2, Mamba-1 and short-convolution layers.

- batched verification: every row of a left-padded batch decodes exactly as ``model.generate``
  decodes it alone (fp32 greedy), each row with its own states;
- state after acceptance: after every step of scripted trees (nothing past the root accepted,
  a chain, an accepted path through non-adjacent slots) each layer's conv and recurrent states
  equal those transformers' own step-by-step decoding leaves after the same tokens;
- sampling keeps the target's distribution on a Gated DeltaNet and a Mamba-2 family, and a biased
  verifier fails the same test;
- unknown recurrent mixers are refused before any forward.

The family matrix (tests/test_family_matrix.py) covers every family's greedy equality with wide trees.
"""

from __future__ import annotations

import pytest
import torch
from transformers.cache_utils import DynamicCache, LinearAttentionCacheLayerMixin

from drafters.modeling import forward_with_cache
from specdec import SpeculativeDecoder, UnsupportedGeneration
from specdec.device.cache import RowCache
from specdec.device.tree import HostBuffer, RowTree, upload_rows
from specdec.step.request import DecodeRequest, KVState
from specdec.step.support import support_for
from specdec.step.verify import prefill_row, takes_positions, verify_rows
from tests.conftest import hf_greedy
from tests.test_batch import ROWS, left_padded
from tests.test_family_matrix import tiny_model
from tests.test_sampling import SMALL_V, broken_accept, chi_square_p, exact_joint, sample_generate
from trees import TokenTree

# One family of each recurrent kind (and falcon_h1: attention and Mamba-2 in the same layer).
KINDS = {"qwen3_5_text": "Gated DeltaNet", "kimi_linear": "Kimi Delta Attention", "mamba2": "Mamba-2",
         "falcon_h1": "Mamba-2 beside attention", "mamba": "Mamba-1", "lfm2": "short convolution"}


@pytest.mark.parametrize("model_type", list(KINDS))
def test_batched_rows_each_decode_as_alone(model_type):
    model, _, _ = tiny_model(model_type)
    ids, mask = left_padded(ROWS)
    decoder = SpeculativeDecoder(model, drafter="recycling+ngram", tree_budget=8)
    out = decoder.generate(ids, attention_mask=mask, max_new_tokens=16, eos_token_id=-1, pad_token_id=0)
    for b, row in enumerate(ROWS):
        alone = hf_greedy(model, torch.tensor([row]), 16)[0, len(row):].tolist()
        assert out[b, ids.shape[1]:].tolist() == alone, (model_type, b)
    assert sum(s.drafted_tokens for s in decoder.last_stats) > 0  # trees were verified


def _hf_states_by_length(model, seq: list[int], start: int) -> dict[int, list[dict]]:
    """transformers' own decoding of ``seq``: ``seq[:start]`` in one forward, then one token at a
    time; each recurrent layer's conv and recurrent states (copies) after every length."""
    cache = DynamicCache(config=model.config)
    positions = takes_positions(model)

    def run(ids: list[int], offset: int) -> None:
        kwargs = {"position_ids": torch.arange(offset, offset + len(ids))[None]} if positions else {}
        forward_with_cache(model, cache, input_ids=torch.tensor([ids]), **kwargs)

    def states() -> list[dict]:
        return [{"conv": {i: s[0].clone() for i, s in layer.conv_states.items() if s is not None},
                 "recurrent": {i: s[0].clone() for i, s in layer.recurrent_states.items() if s is not None}}
                for layer in cache.layers if isinstance(layer, LinearAttentionCacheLayerMixin)]

    run(seq[:start], 0)
    by_length = {start: states()}
    for length in range(start, len(seq)):
        run([seq[length]], length)
        by_length[length + 1] = states()
    return by_length


def _scripted_tree(truth: list[int], step: int, vocab: int) -> TokenTree:
    """Tokens and parents of a tree under the root: nothing right (step 0 mod 3), a right chain of
    three beside a wrong sibling, or a right path through non-adjacent slots."""
    wrong = [(t + 1 + step % 5) % vocab for t in truth]
    if step % 3 == 0:
        tokens, parents = [wrong[0], (wrong[0] + 3) % vocab, truth[1]], [-1, -1, 0]
    elif step % 3 == 1:
        tokens, parents = [truth[0], wrong[0], truth[1], truth[2]], [-1, -1, 0, 2]
    else:
        tokens, parents = [wrong[0], truth[0], wrong[1], truth[1]], [-1, -1, 1, 1]
    return TokenTree(torch.tensor(tokens), torch.tensor(parents))


@pytest.mark.parametrize("model_type", list(KINDS))
@torch.inference_mode()
def test_states_after_acceptance_equal_step_by_step_decoding(model_type):
    model, prompt, reference = tiny_model(model_type)
    assert support_for(model).reason is None
    seq, start = reference[0].tolist(), prompt.shape[1] - 1  # the cache holds all but the root
    vocab = model.get_input_embeddings().num_embeddings
    expected = _hf_states_by_length(model, seq, start)
    cache = RowCache.for_model(model)
    cache.fit(1, len(seq) + 8)
    prefill_row(model, cache, 0, torch.tensor(seq[:start]), 1)
    accepted_per_step, step = [], 0
    while cache.lengths[0] + 4 < len(seq):
        root_idx = cache.lengths[0]
        tree = _scripted_tree(seq[root_idx + 1 : root_idx + 4], step, vocab)
        batch = upload_rows([RowTree(tree, seq[root_idx], length=root_idx)], [root_idx], HostBuffer(model.device))
        choice = verify_rows(model, cache, batch, None)[0].argmax(-1).tolist()  # [q]: the target's token per slot
        path, slot = [0], 0
        children = {}
        for node, parent in enumerate(tree.parents.tolist(), start=1):
            children.setdefault(parent + 1, []).append(node)
        while (nxt := [c for c in children.get(slot, []) if tree.tokens[c - 1] == choice[slot]]):
            slot = nxt[0]
            path.append(slot)
        assert [seq[root_idx + 1 + i] for i in range(len(path))] == [choice[s] for s in path]  # greedy = generate
        cache.compact_row(0, torch.tensor(path), path, batch.queries)
        accepted_per_step.append(len(path) - 1)
        got = [layer.states for layer in cache.layers if layer.states is not None]
        want = expected[cache.lengths[0]]
        assert len(got) == len(want) > 0
        for layer_idx, (ours, theirs) in enumerate(zip(got, want)):
            for name, table in (("conv", ours.conv), ("recurrent", ours.recurrent)):
                assert set(table) == set(theirs[name]), (model_type, layer_idx, name)
                for idx, state in theirs[name].items():
                    scale = float(state.abs().max().clamp(min=1.0))
                    torch.testing.assert_close(table[idx][0], state, atol=1e-5 * scale, rtol=1e-5,
                                               msg=f"{model_type} layer {layer_idx} {name}[{idx}] step {step}")
        step += 1
    assert 0 in accepted_per_step and max(accepted_per_step) >= 2  # empty steps and multi-token ones


@pytest.mark.parametrize("model_type", ["qwen3_5_text", "mamba2"])
def test_sampling_keeps_the_distribution(model_type, monkeypatch):
    """A Gated DeltaNet and a Mamba-2 family: the first two sampled tokens follow the target's
    processed joint distribution through wide trees; a biased verifier fails the same test."""
    model, _, _ = tiny_model(model_type, vocab_size=SMALL_V, logit_scale=1.0)
    trials = 1200
    expected = exact_joint(model)
    assert sum(p > 0.01 for p in expected.values()) > 4  # a spread distribution, not a near-certainty
    counts, widest = sample_generate(model, trials, seed=7)
    assert widest > 1
    assert chi_square_p(counts, expected, trials) > 1e-3
    monkeypatch.setattr("specdec.step.sampling.accept_sampled",
                        lambda tree, probs, uniforms: broken_accept(tree, probs, uniforms, threshold=0.05))
    broken, _ = sample_generate(model, trials // 2, seed=7)
    assert chi_square_p(broken, expected, trials // 2) < 1e-6


def test_unknown_recurrent_mixers_are_refused_before_any_forward():
    model, prompt, _ = tiny_model("qwen3_5_text")
    mixer = next(m for m in model.modules() if type(m).__name__ == "Qwen3_5GatedDeltaNet")
    mixer.__class__ = type("HomegrownDeltaNet", (type(mixer),), {})  # the same code under a name specdec does not know
    calls = []
    model.register_forward_pre_hook(lambda module, args: calls.append(1))
    decoder = SpeculativeDecoder(model)
    assert "HomegrownDeltaNet" in decoder.unsupported
    with pytest.raises(UnsupportedGeneration):
        decoder.generate(prompt, max_new_tokens=4)
    assert not calls


@pytest.mark.parametrize("model_type", ["qwen3_5_text", "mamba"])
def test_conversation_reuses_states_only_after_the_whole_kept_history(model_type):
    """A kept conversation (`KVState`): an extension of it starts from the kept recurrent states
    (a pure state-space model too, whose rows hold no keys); a rolled-back one is prefilled afresh,
    since recurrent states exist only after every kept position. Both stay exact."""
    model, prompt, _ = tiny_model(model_type)
    decoder = SpeculativeDecoder(model, tree_budget=8)
    kv = KVState()
    first = prompt[0]
    out = decoder.decode(DecodeRequest(prompt=first, max_new_tokens=10, kv=kv))
    extended = torch.cat([first, torch.tensor(out.tokens), torch.tensor([40, 41, 42])])
    again = decoder.decode(DecodeRequest(prompt=extended, max_new_tokens=10, kv=kv))
    assert again.stats.reused_prefix_tokens == len(first) + len(out.tokens) - 1
    assert again.tokens == hf_greedy(model, extended[None], 10)[0, len(extended):].tolist()
    rolled_back = torch.cat([first, torch.tensor([50, 51])])
    third = decoder.decode(DecodeRequest(prompt=rolled_back, max_new_tokens=10, kv=kv))
    assert third.stats.reused_prefix_tokens == 0
    assert third.tokens == hf_greedy(model, rolled_back[None], 10)[0, len(rolled_back):].tolist()


def test_bench_verify_prices_the_tree_pass_against_the_models_own_chain():
    """`specdec bench-verify`'s measurement runs the engine's verify forward on a hybrid and adds the
    model's own chain of the same length (figures only: no timing is asserted)."""
    from bench.verify_cost import measure

    model, _, _ = tiny_model("qwen3_5_text")
    rows = measure(model, context=12, sizes=[0, 3], repeats=1)
    assert [row["n"] for row in rows] == [0, 3]
    assert all({"sdpa_ms", "chain_ms", "sdpa_ratio", "chain_ratio"} <= set(row) for row in rows)


def test_a_failure_inside_a_verify_forward_leaves_the_kept_states_exact(monkeypatch):
    """A verify forward that fails part-way through its recurrent layers changes no row's states:
    the conversation kept after the failed request continues exactly from where it stood."""
    from specdec.device.hybrid import seams

    model, prompt, _ = tiny_model("qwen3_5_text")
    decoder = SpeculativeDecoder(model, tree_budget=8)
    kv = KVState()
    first = decoder.decode(DecodeRequest(prompt=prompt[0], max_new_tokens=6, kv=kv))
    walk, calls = seams.walk, []

    def failing(levels, cached, step):
        calls.append(1)
        if len(calls) == 3:  # the second verify forward, after its convolution stepped the tree
            raise RuntimeError("injected mid-forward")
        return walk(levels, cached, step)

    monkeypatch.setattr(seams, "walk", failing)
    history = torch.cat([prompt[0], torch.tensor(first.tokens), torch.tensor([40, 41])])
    with pytest.raises(RuntimeError, match="injected"):
        decoder.decode(DecodeRequest(prompt=history, max_new_tokens=6, kv=kv))
    monkeypatch.setattr(seams, "walk", walk)
    assert len(calls) == 3 and len(kv.token_ids) > len(history) - 1  # kept: the history and one step past it
    extended = torch.tensor(kv.token_ids + [42])
    again = decoder.decode(DecodeRequest(prompt=extended, max_new_tokens=8, kv=kv))
    assert again.stats.reused_prefix_tokens == len(extended) - 1  # the kept states were used
    assert again.tokens == hf_greedy(model, extended[None], 8)[0, len(extended):].tolist()
