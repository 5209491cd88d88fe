"""Sampling preserves the target distribution (chi-square with a negative control); greedy with
repetition penalty equals HF."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from scipy.stats import chisquare
from transformers.generation.logits_process import (
    LogitsProcessorList,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

import specdec
from drafters import ModelDrafter
from specdec.device.tree import DeviceTree, HostBuffer, upload_one
from specdec.step.accept import Accepted
from specdec.step.sampling import accept_drawn, accept_sampled
from tests.conftest import read_one, tiny_llama, untrained_head
from trees import DEFAULT_RANK_PRIOR, DraftDraws, TokenTree, best_first

P_VALUE = 1e-3


def chi_square_p(counts: dict, expected: dict, n: int) -> float:
    cells = [c for c in expected if expected[c] * n >= 5]
    observed = np.array([counts.get(c, 0) for c in cells] + [n - sum(counts.get(c, 0) for c in cells)], float)
    probs = np.array([expected[c] for c in cells] + [1.0 - sum(expected[c] for c in cells)])
    keep = probs * n > 1e-9
    return float(chisquare(observed[keep], probs[keep] * n * observed[keep].sum() / (probs[keep] * n).sum()).pvalue)


# ---------------------------------------------------------------- unit level: a Markov-chain "LM"
V = 6
RNG = np.random.default_rng(0)
TARGET = torch.tensor(RNG.dirichlet(np.ones(V) * 0.7, size=V), dtype=torch.float32)  # P(next | last)
DRAFT = torch.tensor(RNG.dirichlet(np.ones(V) * 0.7, size=V), dtype=torch.float32)


def draft_tree(root: int) -> TokenTree:
    """Widths 3 then 2: top-3 successors of the root under DRAFT, top-2 below the first two."""
    first = DRAFT[root].topk(3).indices.tolist()
    tokens, parents = list(first), [-1, -1, -1]
    for parent in (0, 1):
        for token in DRAFT[first[parent]].topk(2).indices.tolist():
            tokens.append(token)
            parents.append(parent)
    return TokenTree(torch.tensor(tokens), torch.tensor(parents))


def broken_accept(tree: DeviceTree, probs: torch.Tensor, uniforms: torch.Tensor, threshold: float = 0.25) -> Accepted:
    """A plausible-looking but biased verifier: takes a child outright when the target likes it."""
    tokens, parents = tree.tokens.tolist(), tree.parent_slots.tolist()
    slot, path = 0, [0]
    while True:
        liked = [c for c in range(1, tree.n + 1) if parents[c] == slot and probs[slot, tokens[c]] > threshold]
        if not liked:
            cdf = probs[slot].double().cumsum(0)
            drawn = min(int(torch.searchsorted(cdf, uniforms[len(path) - 1] * cdf[-1], right=True)), len(cdf) - 1)
            break
        slot = liked[0]
        path.append(slot)
    width = tree.max_depth + 1
    padded = path + [0] * (width - len(path))
    block = [tokens[c] for c in path[1:]] + [drawn] + [0] * (width - len(path))
    return Accepted(path=torch.tensor(padded), block=torch.tensor(block), count=torch.tensor(len(path)))


def sample_two(accept, trials: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    buffer = HostBuffer(torch.device("cpu"))
    counts: dict = {}
    for _ in range(trials):
        out, root = [], 0
        while len(out) < 2:
            tree = draft_tree(root)
            slots = torch.cat([torch.tensor([root]), tree.tokens])
            uniforms = torch.from_numpy(rng.random(tree.max_depth + 1))
            out += read_one(accept(upload_one(tree, root, buffer, uniforms), TARGET[slots], uniforms)).tokens
            root = out[-1]
        key = tuple(out[:2])
        counts[key] = counts.get(key, 0) + 1
    return counts


def markov_expected() -> dict:
    return {(a, b): float(TARGET[0, a] * TARGET[a, b]) for a, b in itertools.product(range(V), repeat=2)}


def drawn_tree(root: int, rng) -> TokenTree:
    """Widths 3 then 2 like `draft_tree`, each parent's children drawn without replacement from
    DRAFT (the exponential race), carrying the distributions they were drawn from."""
    def draw(row: int, count: int) -> list[int]:
        keys = np.log(DRAFT[row].numpy()) - np.log(rng.exponential(size=V))
        return np.argsort(-keys)[:count].tolist()

    first = draw(root, 3)
    tokens, parents, ranks, rows = list(first), [-1, -1, -1], [0, 1, 2], [0, 0, 0]
    for parent in (0, 1):
        for rank, token in enumerate(draw(first[parent], 2)):
            tokens.append(token)
            parents.append(parent)
            ranks.append(rank)
            rows.append(1 + parent)
    return TokenTree(torch.tensor(tokens), torch.tensor(parents), ranks=torch.tensor(ranks),
                     draws=DraftDraws(DRAFT[[root, first[0], first[1]]], torch.tensor(rows)))


def accept_drawn_without_residual(tree: DeviceTree, probs: torch.Tensor) -> Accepted:
    """A plausible-looking but biased rejection sampler: the i-th child is accepted with
    probability min(1, p(x) / q(x)), but a rejection updates neither p nor q (and the bonus
    token is drawn from p)."""
    tokens, node, path = tree.tokens.tolist(), 0, [0]
    for depth in range(tree.max_depth + 1):
        q = tree.draft_probs[max(int(tree.draw_rows[node]), 0)]
        moved = False
        for i, child in enumerate(tree.children[node].tolist()):
            u = float(tree.stage_uniforms[depth, i])
            if child >= 0 and u * float(q[tokens[child]]) < float(probs[node, tokens[child]]):
                node, moved = child, True
                path.append(child)
                break
        if not moved:
            cdf = probs[node].double().cumsum(0)
            u = tree.stage_uniforms[depth, tree.children.shape[1]]
            bonus = min(int(torch.searchsorted(cdf, (u * cdf[-1]).view(1), right=True)[0]), len(cdf) - 1)
            break
    width = tree.max_depth + 1
    block = [tokens[c] for c in path[1:]] + [bonus] + [0] * (width - len(path))
    return Accepted(path=torch.tensor(path + [0] * (width - len(path))), block=torch.tensor(block),
                    count=torch.tensor(len(path)))


def sample_two_drawn(accept, trials: int, seed: int) -> dict:
    rng, draw_rng = np.random.default_rng(seed), np.random.default_rng(seed + 1000)  # independent streams
    buffer = HostBuffer(torch.device("cpu"))
    counts: dict = {}
    for _ in range(trials):
        out, root = [], 0
        while len(out) < 2:
            tree = drawn_tree(root, draw_rng)
            slots = torch.cat([torch.tensor([root]), tree.tokens])
            stages = tree.max_depth + 1
            device_tree = upload_one(tree, root, buffer, torch.zeros(stages, dtype=torch.float64),
                                     lambda siblings: torch.from_numpy(rng.random((stages, siblings + 1))))
            assert device_tree.children is not None  # the draws are usable: rejection sampling verifies
            out += read_one(accept(device_tree, TARGET[slots])).tokens
            root = out[-1]
        key = tuple(out[:2])
        counts[key] = counts.get(key, 0) + 1
    return counts


def test_rejection_sampling_of_drawn_trees_matches_target_joint_distribution():
    trials = 20_000
    assert chi_square_p(sample_two_drawn(accept_drawn, trials, seed=2), markov_expected(), trials) > P_VALUE


def test_rejection_sampling_without_the_residual_fails_the_same_test():
    trials = 20_000
    broken = sample_two_drawn(accept_drawn_without_residual, trials, seed=2)
    assert chi_square_p(broken, markov_expected(), trials) < 1e-6


def test_drawn_children_that_are_not_the_first_draws_fall_back_to_the_delta_rule():
    """Only a prefix of each parent's draws can be verified by rejection sampling; a tree that
    kept a later draw without an earlier one is verified by the delta rule (lossless for any tree)."""
    tree = drawn_tree(0, np.random.default_rng(0))
    buffer = HostBuffer(torch.device("cpu"))

    def upload(kept: TokenTree) -> DeviceTree:
        return upload_one(kept, 0, buffer, None, lambda siblings: torch.zeros(kept.max_depth + 1, siblings + 1,
                                                                                dtype=torch.float64))

    assert upload(tree).children is not None
    assert upload(tree.select(np.array([True, False, True, True, True, False, False]))).children is None  # 0 and 2
    assert upload(tree.select(np.array([True] * 3 + [False] * 4))).children is not None


def test_delta_rule_matches_target_joint_distribution():
    trials = 20_000
    assert chi_square_p(sample_two(accept_sampled, trials, seed=1), markov_expected(), trials) > P_VALUE


def test_broken_verifier_fails_the_same_test():
    trials = 20_000
    assert chi_square_p(sample_two(broken_accept, trials, seed=1), markov_expected(), trials) < 1e-6


# ---------------------------------------------------------------- end to end on a tiny model
SMALL_V = 8
PROMPT = torch.tensor([[3, 4, 5, 3, 4]])
SETTINGS = dict(temperature=0.8, top_k=6, top_p=0.95, repetition_penalty=1.3)


def make_small_model():
    """The tiny model of the distribution tests (vocabulary SMALL_V, moderate logits)."""
    model = tiny_llama(vocab_size=SMALL_V, seed=4)
    with torch.no_grad():
        model.lm_head.weight.mul_(0.25)  # back to moderate logits: many tokens keep mass
    return model


@pytest.fixture(scope="module")
def small_model():
    return make_small_model()


def processed_probs(model, ids: torch.Tensor) -> torch.Tensor:
    processors = LogitsProcessorList([
        RepetitionPenaltyLogitsProcessor(SETTINGS["repetition_penalty"]),
        TemperatureLogitsWarper(SETTINGS["temperature"]),
        TopKLogitsWarper(SETTINGS["top_k"]),
        TopPLogitsWarper(SETTINGS["top_p"]),
    ])
    with torch.no_grad():
        scores = model(ids).logits[:, -1].float()
    return torch.softmax(processors(ids, scores), dim=-1)[0]


def exact_joint(model) -> dict:
    first = processed_probs(model, PROMPT)
    expected = {}
    for a in range(SMALL_V):
        if first[a] == 0:
            continue
        second = processed_probs(model, torch.cat([PROMPT, torch.tensor([[a]])], dim=1))
        for b in range(SMALL_V):
            expected[(a, b)] = float(first[a] * second[b])
    return expected


def sample_generate(model, trials: int, seed: int, drafter: str = "auto", draft_model=None,
                    draft_head=None) -> tuple[dict, int]:
    """Counts of the first two sampled tokens, and the widest tree level verified."""
    generator = torch.Generator().manual_seed(seed)
    decoder = specdec.SpeculativeDecoder(model, drafter=drafter, draft_model=draft_model, draft_head=draft_head,
                                         tree_budget=6)
    counts: dict = {}
    widest = 0
    for _ in range(trials):
        out = decoder.generate(PROMPT, max_new_tokens=2, eos_token_id=-1, do_sample=True, generator=generator,
                               **SETTINGS)
        key = tuple(out[0, PROMPT.shape[1]:].tolist())
        counts[key] = counts.get(key, 0) + 1
        widest = max(widest, decoder.last_stats.max_tree_width)
    return counts, widest


@pytest.mark.parametrize("drafter", ["auto", "recycling", "ngram", "model", "head", "auto+head"])
def test_generate_sampling_matches_exact_distribution(small_model, drafter, monkeypatch):
    """Each drafter's trees (width > 1), then the same test with a biased verifier (must fail)."""
    draft_model = tiny_llama(vocab_size=SMALL_V, seed=11) if drafter == "model" else None
    draft_head = untrained_head(small_model) if "head" in drafter else None
    drafter = "auto" if drafter == "auto+head" else drafter
    trials = 1200
    expected = exact_joint(small_model)
    drawn_calls = []
    monkeypatch.setattr("specdec.step.sampling.accept_drawn",
                        lambda tree, probs: drawn_calls.append(1) or accept_drawn(tree, probs))
    counts, widest = sample_generate(small_model, trials, seed=7, drafter=drafter, draft_model=draft_model,
                                     draft_head=draft_head)
    assert widest > 1
    assert bool(drawn_calls) == (drafter in ("model", "head"))  # drafters with distributions draw; others choose
    assert set(counts) <= {k for k, v in expected.items() if v > 0}  # only tokens the warpers allow
    assert chi_square_p(counts, expected, trials) > P_VALUE
    monkeypatch.setattr("specdec.step.sampling.accept_sampled",
                        lambda tree, probs, uniforms: broken_accept(tree, probs, uniforms, threshold=0.05))
    monkeypatch.setattr("specdec.step.sampling.accept_drawn",
                        lambda tree, probs: broken_accept(tree, probs, tree.uniforms, threshold=0.05))
    broken, _ = sample_generate(small_model, trials // 2, seed=7, drafter=drafter, draft_model=draft_model,
                                draft_head=draft_head)
    assert chi_square_p(broken, expected, trials // 2) < 1e-6


def test_seeded_sampling_is_repeatable(small_model):
    def run(seed):
        return specdec.generate(small_model, PROMPT, max_new_tokens=20, eos_token_id=-1, do_sample=True,
                                tree_budget=6, generator=torch.Generator().manual_seed(seed), **SETTINGS)

    assert torch.equal(run(3), run(3))
    assert any(not torch.equal(run(3), run(s)) for s in (4, 5, 6))


def test_greedy_with_repetition_penalty_matches_hf(model):
    prompt = torch.tensor([[5, 6, 7, 5, 6, 7, 5, 6]])
    ref = model.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False, max_new_tokens=30,
                         repetition_penalty=1.3, eos_token_id=-1, pad_token_id=0)
    out = specdec.SpeculativeDecoder(model).generate(prompt, max_new_tokens=30, eos_token_id=-1,
                                                     repetition_penalty=1.3)
    assert torch.equal(out, ref)


def test_a_seed_gives_the_same_sample_whatever_verifies_it(small_model):
    """Draws are per sequence position, so the tree (drafter, size, acceptance) never changes a
    seeded sample: every drafter and budget reproduces plain decoding's sample token for token."""
    draft_model = tiny_llama(vocab_size=SMALL_V, seed=11)

    def run(drafter, budget, seed):
        decoder = specdec.SpeculativeDecoder(small_model, drafter=drafter, tree_budget=budget,
                                             draft_model=draft_model if "model" in drafter else None)
        return decoder.generate(PROMPT, max_new_tokens=30, eos_token_id=-1, do_sample=True, generator=seed,
                                **SETTINGS).tolist()

    for seed in (1, 2, 3):
        plain = run("recycling", 0, seed)
        for drafter, budget in (("recycling", 6), ("ngram", 12), ("auto", None), ("recycling+ngram", 3),
                                ("model-topk", 6)):  # the draft model's top-k children: no draws
            assert run(drafter, budget, seed) == plain, (seed, drafter, budget)
    assert len({tuple(run("auto", None, seed)[0]) for seed in range(6)}) > 1  # the seed matters


def test_drawn_drafts_from_the_target_itself_are_all_accepted(small_model):
    """With the target as its own draft model and only history-free warpers, q = p: every first
    draw is accepted (min(1, p/q) = 1), so each step commits the drawn shape's whole rank-0 chain
    plus the bonus token (the delta rule would accept a fixed child only with probability p)."""
    settings = dict(temperature=0.8, top_k=6, top_p=0.95)
    shape = best_first(8, DEFAULT_RANK_PRIOR, max_depth=8, max_rank=4)
    chain, node = 0, -1
    while (first := np.flatnonzero((shape.parents == node) & (shape.ranks == 0))).size:  # the rank-0 path
        chain, node = chain + 1, int(first[0])
    drafter = ModelDrafter(small_model, SMALL_V, clock=lambda: 0.0)  # no timings: the depth rule drafts every depth
    decoder = specdec.SpeculativeDecoder(small_model, drafter=drafter, tree_budget=8)
    for seed in range(3):
        out = decoder.generate(PROMPT, max_new_tokens=5 * (chain + 1), eos_token_id=-1, do_sample=True,
                               generator=seed, return_dict_in_generate=True, **settings)
        assert out.spec_stats.accepted_lengths == [chain + 1] * 5
