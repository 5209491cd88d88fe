"""Tree forward, acceptance and KV compaction against plain sequential decoding (fp32)."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from drafters import Drafter
from drafters.modeling import SlotCache, forward_with_cache
from specdec.device import ops
from specdec.device.cache import RowCache
from specdec.device.tree import HostBuffer, RowTree, upload_one, upload_rows
from specdec.step.accept import accept
from specdec.step.verify import prefill_row, verify_rows
from tests.conftest import read_one
from tests.test_trees import brute_ancestors, random_tree
from trees import TokenTree

CPU = torch.device("cpu")


def outcome_of(tree: TokenTree, choices: list[int]):
    return read_one(accept(upload_one(tree, 1, HostBuffer(CPU)), torch.tensor(choices)))


@pytest.mark.parametrize(
    "tokens, parents, targets, accepted, bonus",
    [
        ([5, 6, 7], [-1, 0, 1], [5, 6, 7, 9], (0, 1, 2), 9),  # perfect match + bonus
        ([5, 6, 7], [-1, 0, 1], [4, 6, 7, 9], (), 4),  # early mismatch
        ([5, 6, 7], [-1, 0, 1], [5, 6, 8, 9], (0, 1), 8),  # mismatch at the last node
        ([5], [-1], [5, 3], (0,), 3),  # single node
        ([], [], [3], (), 3),  # empty tree: bonus only
        ([5, 6, 7, 8], [-1, -1, 0, 1], [6, 1, 8, 9, 0], (1, 3), 0),  # second sibling matches
        ([5, 5, 7], [-1, -1, 1], [5, 7, 1, 2], (0,), 7),  # duplicate siblings: the first wins
        ([5, 5, 7], [-1, -1, 0], [5, 7, 1, 2], (0, 2), 2),  # ... and its subtree counts
        ([3, 4, 9, 8, 9], [-1, 0, 1, 0, 3], [3, 8, 5, 6, 9, 1], (0, 3, 4), 1),  # a deep second branch
    ],
)
def test_accept_table(tokens, parents, targets, accepted, bonus):
    tree = TokenTree(torch.tensor(tokens, dtype=torch.long), torch.tensor(parents, dtype=torch.long))
    result = outcome_of(tree, targets)
    assert result.accepted_nodes == accepted
    assert result.bonus_token == bonus
    assert result.path_slots == [0] + [a + 1 for a in accepted]
    assert result.tokens == [tokens[a] for a in accepted] + [bonus]


@pytest.mark.parametrize("seed", range(20))
def test_device_acceptance_equals_the_walk(seed):
    """The vectorised acceptance equals walking from the root along the first matching child."""
    rng = np.random.default_rng(seed)
    tree = random_tree(rng, int(rng.integers(1, 40)), vocab=4)  # few tokens: many matches and duplicates
    slots = upload_one(tree, 0, HostBuffer(CPU))
    assert torch.equal(slots.ancestors, brute_ancestors(tree))
    choices = rng.integers(0, 4, len(tree) + 1).tolist()
    children, tokens, slot, walk = tree.children(), tree.tokens.tolist(), 0, []
    while True:
        nxt = next((c for c in children[slot] if tokens[c] == choices[slot]), None)
        if nxt is None:
            break
        walk.append(nxt)
        slot = nxt + 1
    result = outcome_of(tree, choices)
    assert result.accepted_nodes == tuple(walk)
    assert result.tokens == [tokens[w] for w in walk] + [choices[slot]]


def _prefill(model, ids: torch.Tensor, capacity: int = 64) -> RowCache:
    """A one-row cache holding ``ids``."""
    cache = RowCache.for_model(model)
    cache.fit(1, capacity)
    if ids.numel():
        prefill_row(model, cache, 0, ids, 1)
    return cache


def _verify(model, cache: RowCache, tree: TokenTree, root: int) -> tuple[torch.Tensor, int]:
    """Row 0's tree forward: logits ``[n+1, V]`` and the forward's slots a row."""
    length = cache.lengths[0]
    batch = upload_rows([RowTree(tree, root, length=length)], [length], HostBuffer(CPU))
    return verify_rows(model, cache, batch)[0], batch.queries


def _held(cache: RowCache, row: int, length: int):
    """Every layer's keys and values of ``row``'s first ``length`` positions."""
    return [(layer.keys[row, :, :length], layer.values[row, :, :length]) for layer in cache.layers]


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("prefix_len", [0, 1, 13])
@torch.inference_mode()
def test_tree_logits_equal_sequential_decoding(model, seed, prefix_len):
    rng = np.random.default_rng(seed)
    tree = random_tree(rng, int(rng.integers(1, 16)), vocab=96)
    prefix = torch.tensor(rng.integers(0, 96, prefix_len), dtype=torch.long)
    root = 7
    logits, _ = _verify(model, _prefill(model, prefix), tree, root)
    assert logits.shape == (len(tree) + 1, 96)
    for slot in range(len(tree) + 1):
        path = [] if slot == 0 else tree.path_to(slot - 1)
        sequence = torch.cat([prefix, torch.tensor([root]), tree.tokens[path]])
        expected = model(sequence[None]).logits[0, -1]
        torch.testing.assert_close(logits[slot], expected, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("seed", range(8))
@torch.inference_mode()
def test_compacted_cache_equals_fresh_prefill(model, seed):
    rng = np.random.default_rng(50 + seed)
    tree = random_tree(rng, int(rng.integers(1, 20)), vocab=96)
    prefix = torch.tensor(rng.integers(0, 96, 11), dtype=torch.long)
    root = 3
    cache = _prefill(model, prefix)
    keys_before = cache.layers[0].keys
    _, queries = _verify(model, cache, tree, root)
    node = int(rng.integers(0, len(tree)))
    path = tree.path_to(node) if seed % 4 else []  # also cover "nothing accepted"
    kept = [0] + [p + 1 for p in path]
    cache.compact_row(0, torch.tensor(kept), kept, queries)
    committed = torch.cat([prefix, torch.tensor([root]), tree.tokens[path]])
    fresh = _prefill(model, committed)
    assert cache.lengths[0] == committed.numel() and cache.layers[0].keys is keys_before  # in place, no growth
    for (keys, values), (ref_keys, ref_values) in zip(_held(cache, 0, committed.numel()),
                                                      _held(fresh, 0, committed.numel())):
        torch.testing.assert_close(keys, ref_keys, atol=2e-5, rtol=1e-5)
        torch.testing.assert_close(values, ref_values, atol=2e-5, rtol=1e-5)


@torch.inference_mode()
def test_a_path_already_in_place_is_not_moved(model, monkeypatch):
    """Accepting the first nodes of a chain leaves every kept row where the forward wrote it: the
    operator is skipped, and the cache still equals a prefill."""
    prefix, root, chain = torch.arange(9), 3, TokenTree.chain([5, 6, 7, 8])
    cache = _prefill(model, prefix)
    _, queries = _verify(model, cache, chain, root)

    def moved(*args):
        raise AssertionError("kv_compact ran for rows already in place")

    monkeypatch.setattr(ops, "kv_compact", moved)
    cache.compact_row(0, torch.tensor([0, 1, 2]), [0, 1, 2], queries)
    fresh = _prefill(model, torch.cat([prefix, torch.tensor([root, 5, 6])]))
    assert cache.lengths[0] == 12
    for (keys, values), (ref_keys, ref_values) in zip(_held(cache, 0, 12), _held(fresh, 0, 12)):
        torch.testing.assert_close(keys, ref_keys, atol=2e-5, rtol=1e-5)
        torch.testing.assert_close(values, ref_values, atol=2e-5, rtol=1e-5)
    cache.lengths[0] = 9
    with pytest.raises(AssertionError, match="already in place"):  # a branch does move rows
        cache.compact_row(0, torch.tensor([0, 2]), [0, 2], queries)


@pytest.mark.parametrize("seed", range(4))
@torch.inference_mode()
def test_rows_of_one_forward_each_decode_as_alone(model, seed):
    """Rows of different lengths in one forward: each row's logits and compacted cache equal that
    row verified alone, and an idle row in between keeps what it holds."""
    rng = np.random.default_rng(70 + seed)
    prefixes = [torch.tensor(rng.integers(0, 96, n), dtype=torch.long) for n in (5, 17, 9)]
    trees = [random_tree(rng, int(rng.integers(1, 12)), vocab=96) for _ in prefixes]
    cache = RowCache.for_model(model)
    cache.fit(4, 64)
    slots_of = [0, 1, 3]
    for slot, prefix in zip(slots_of, prefixes):
        prefill_row(model, cache, slot, prefix, 1)
    prefill_row(model, cache, 2, torch.arange(6), 1)  # an idle row (prefilling, say) inside the forward
    idle = [(k.clone(), v.clone()) for k, v in _held(cache, 2, 6)]
    rows = [None] * 4
    for slot, prefix, tree in zip(slots_of, prefixes, trees):
        rows[slot] = RowTree(tree, 7, length=prefix.numel())
    batch = upload_rows(rows, cache.lengths, HostBuffer(CPU))
    logits = verify_rows(model, cache, batch)
    for slot, prefix, tree in zip(slots_of, prefixes, trees):
        alone, _ = _verify(model, _prefill(model, prefix), tree, 7)
        torch.testing.assert_close(logits[slot, : len(tree) + 1], alone, atol=2e-5, rtol=1e-5)
        path = tree.path_to(len(tree) - 1)
        kept = [0] + [p + 1 for p in path]
        cache.compact_row(slot, torch.tensor(kept), kept, batch.queries)
        committed = torch.cat([prefix, torch.tensor([7]), tree.tokens[path]])
        fresh = _prefill(model, committed)
        for (keys, values), (ref_keys, ref_values) in zip(_held(cache, slot, committed.numel()),
                                                          _held(fresh, 0, committed.numel())):
            torch.testing.assert_close(keys, ref_keys, atol=2e-5, rtol=1e-5)
            torch.testing.assert_close(values, ref_values, atol=2e-5, rtol=1e-5)
    assert cache.lengths[2] == 6
    assert all(torch.equal(k, k0) and torch.equal(v, v0) for (k, v), (k0, v0) in zip(_held(cache, 2, 6), idle))


@torch.inference_mode()
def test_cache_rows_fit_move_snapshot_and_free(model):
    """`fit` keeps live rows when it grows or shrinks; a moved row and a reloaded snapshot hold
    the same keys; `free` drops every buffer; a failed allocation leaves the cache unchanged."""
    cache = _prefill(model, torch.arange(10), capacity=16)
    before = [(k.clone(), v.clone()) for k, v in _held(cache, 0, 10)]
    cache.fit(3, 40)
    assert (cache.rows, cache.capacity, cache.lengths) == (3, 40, [10, 0, 0])
    assert all(torch.equal(k, k0) and torch.equal(v, v0) for (k, v), (k0, v0) in zip(_held(cache, 0, 10), before))
    cache.move_row(0, 2)
    assert cache.lengths == [0, 0, 10]
    assert all(torch.equal(k, k0) for (k, _), (k0, _) in zip(_held(cache, 2, 10), before))
    keys, values = cache.snapshot_row(2, 10)
    cache.fit(1, 12)
    cache.load_row(0, keys, values)
    assert cache.lengths == [10] and cache.bytes < 40 * 3 * 1000
    assert all(torch.equal(k, k0) for (k, _), (k0, _) in zip(_held(cache, 0, 10), before))
    with pytest.raises(ValueError, match="more than the capacity"):
        cache.fit(1, 8)

    def no_memory(*args, **kwargs):
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory")

    allocate = cache.allocate_layer
    cache.allocate_layer = no_memory
    with pytest.raises(RuntimeError, match="allocate"):
        cache.fit(4, 64)
    cache.allocate_layer = allocate
    assert (cache.rows, cache.capacity, cache.lengths) == (1, 12, [10])
    assert all(torch.equal(k, k0) for (k, _), (k0, _) in zip(_held(cache, 0, 10), before))
    cache.free()
    assert cache.bytes == 0 and cache.rows == 0


@pytest.mark.parametrize("seed", range(12))
def test_uploaded_tree_fields_follow_the_tree(seed):
    """Every field of the uploaded tree against the tree's own host structure, and a later upload
    never changes an earlier tree."""
    rng = np.random.default_rng(300 + seed)
    buffer = HostBuffer(CPU)
    size = int(rng.integers(1, 70)) if seed else 0  # up to two ancestor words; seed 0: the empty tree
    tree = random_tree(rng, size, vocab=5) if size else TokenTree.empty()
    slots = upload_one(tree, 4, buffer)
    snapshot = {name: getattr(slots, name).clone() for name in ("tokens", "depths", "parent_slots", "candidates",
                                                                "by_depth", "packed_ancestors", "ancestors", "paths")}
    upload_one(random_tree(rng, 30, vocab=5), 1, buffer)
    for name, before in snapshot.items():
        assert torch.equal(getattr(slots, name), before), name
    n, tokens, parents = len(tree), tree.tokens.tolist(), tree.parents.tolist()
    assert slots.tokens.tolist() == [4] + tokens
    assert slots.parent_slots.tolist() == [0] + [p + 1 for p in parents]
    assert slots.depths.tolist() == [0] + tree.depths.tolist()
    assert torch.equal(slots.ancestors, brute_ancestors(tree))
    assert torch.equal(slots.packed_ancestors, tree.packed_ancestor_mask())
    first_seen = {}
    for node_idx, key in enumerate(zip(parents, tokens)):
        first_seen.setdefault(key, node_idx)
    assert slots.candidates.tolist() == [True] + [first_seen[k] == i for i, k in enumerate(zip(parents, tokens))]
    for slot in range(n + 1):
        path = [0] + [p + 1 for p in (tree.path_to(slot - 1) if slot else [])]
        assert slots.paths[slot, : len(path)].tolist() == path
    depths = slots.depths.tolist()
    assert [depths[s] for s in slots.by_depth.tolist()] == sorted(depths)
    for depth in range(slots.max_depth + 1):
        start, end = slots.depth_starts[depth], slots.depth_starts[depth + 1]
        assert {depths[s] for s in slots.by_depth[start:end].tolist()} == {depth}


def test_compact_rejects_bad_slots(model):
    cache = _prefill(model, torch.arange(5))
    with pytest.raises(ValueError, match="cannot keep 3 of 2 verified slots"):
        cache.compact_row(0, torch.tensor([0, 1, 2]), [0, 1, 2], 2)
    with pytest.raises((RuntimeError, IndexError)):  # slot 5 is past the 2 verified slots
        cache.compact_row(0, torch.tensor([0, 5]), [0, 5], 2)


def test_draft_model_cache_rolls_back_and_grows_in_place(model):
    """The model drafter's own `SlotCache`."""
    cache = SlotCache.for_model(model, 12)
    forward_with_cache(model, cache, input_ids=torch.arange(10)[None])
    keys = cache.layers[0].keys
    cache.truncate(4)
    assert cache.length == 4 and cache.layers[0].keys is keys
    cache.reserve(40)
    assert cache.capacity == 40 and torch.equal(cache.layers[0].keys[:, :, :4], keys[:, :, :4])
    with pytest.raises(ValueError, match="truncate"):
        cache.truncate(5)
    from drafters.modeling import CacheFullError

    small = SlotCache.for_model(model, 3)
    with pytest.raises(CacheFullError, match="holds 3 positions"):
        forward_with_cache(model, small, input_ids=torch.arange(4)[None])


def test_specdec_calls_do_not_use_deprecated_cache_names(capsys):
    """transformers 5.24 warns (once per process, through its logger) when a forward's cache is
    passed or read under the old name ``past_key_values``; specdec's own calls never do."""
    import transformers.utils.logging as hf_logging

    from specdec import SpeculativeDecoder
    from tests.conftest import tiny_llama

    hf_logging.warning_once.cache_clear()  # an earlier warning in this process would hide a new one
    records = []
    handler = logging.Handler()
    handler.emit = lambda record: records.append(record.getMessage())
    hf_logging.get_logger("transformers").addHandler(handler)
    try:
        SpeculativeDecoder(tiny_llama(seed=4)).generate(torch.tensor([[5, 6, 7, 8]]), max_new_tokens=12)
    finally:
        hf_logging.get_logger("transformers").removeHandler(handler)
    assert not [r for r in records if "deprecated" in r], records


class PromptRecorder(Drafter):
    """Proposes nothing; asks for the prompt's top-k at chosen positions and for the last two
    positions' features, and keeps what the prefill shows it."""

    name = "prompt-recorder"
    feedback_topk = 3
    needs_features = 2

    def __init__(self, wanted: list[int]) -> None:
        self.wanted, self.shown = wanted, []

    def propose(self, ctx, budget):
        return TokenTree.empty()

    def wants_prompt_topk(self, tokens):
        asked = np.zeros(len(tokens), dtype=bool)
        asked[self.wanted] = True
        return asked

    def observe(self, feedback):
        if feedback.tree is None:
            self.shown.append(feedback)


@pytest.mark.parametrize("wanted", [[], [0, 3], [4, 5, 6], [0, 1, 2, 3, 4, 5, 6]])
def test_prefill_shows_the_topk_where_asked_and_the_last_features(model, wanted):
    from specdec import SpeculativeDecoder

    prompt = torch.tensor([[5, 9, 5, 17, 30, 9, 41, 3]])  # cached: positions 0-6 (3 is the root)
    drafter = PromptRecorder(wanted)
    SpeculativeDecoder(model, drafter=drafter, tree_budget=0).generate(prompt, max_new_tokens=1)
    with torch.no_grad():
        logits = model(prompt).logits[0]  # [8, V]
        features = model.model(prompt).last_hidden_state[0]  # [8, h]: what the LM head reads
    (shown,) = drafter.shown
    assert shown.tokens.tolist() == prompt[0, wanted].tolist()
    assert shown.topk_ids.tolist() == logits[wanted].topk(3).indices.tolist()
    assert shown.committed.all() and len(shown.committed) == len(wanted)
    torch.testing.assert_close(shown.features, features[5:7])
