"""Tree forward, greedy acceptance and KV compaction against plain sequential decoding (fp32)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import DynamicCache

from drafters.modeling import forward_with_cache
from specdec import kv
from specdec.verify import accept_greedy, tree_forward
from tests.test_trees import random_tree
from trees import TokenTree


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
    ],
)
def test_accept_greedy_table(tokens, parents, targets, accepted, bonus):
    tree = TokenTree(torch.tensor(tokens, dtype=torch.long), torch.tensor(parents, dtype=torch.long))
    result = accept_greedy(tree, targets)
    assert result.accepted_nodes == accepted
    assert result.bonus_token == bonus
    assert result.kept_slots == [0] + [a + 1 for a in accepted]
    assert result.tokens(tree) == [tokens[a] for a in accepted] + [bonus]


def _prefill(model, ids: torch.Tensor) -> DynamicCache:
    cache = DynamicCache(config=model.config)
    if ids.numel():
        forward_with_cache(model, cache, input_ids=ids[None])
    return cache


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("prefix_len", [0, 1, 13])
@torch.inference_mode()
def test_tree_logits_equal_sequential_decoding(model, seed, prefix_len):
    rng = np.random.default_rng(seed)
    tree = random_tree(rng, int(rng.integers(1, 16)), vocab=96)
    prefix = torch.tensor(rng.integers(0, 96, prefix_len), dtype=torch.long)
    root = 7
    logits = tree_forward(model, _prefill(model, prefix), root, tree, prefix_len)
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
    tree_forward(model, cache, root, tree, prefix.numel())
    node = int(rng.integers(0, len(tree)))
    path = tree.path_to(node) if seed % 4 else []  # also cover "nothing accepted"
    kv.compact(cache, prefix.numel(), [0] + [p + 1 for p in path])
    committed = torch.cat([prefix, torch.tensor([root]), tree.tokens[path]])
    fresh = _prefill(model, committed)
    assert cache.get_seq_length() == committed.numel()
    for mine, ref in zip(cache.layers, fresh.layers):
        torch.testing.assert_close(mine.keys, ref.keys, atol=2e-5, rtol=1e-5)
        torch.testing.assert_close(mine.values, ref.values, atol=2e-5, rtol=1e-5)


def test_compact_rejects_bad_slots(model):
    cache = _prefill(model, torch.arange(5))
    with pytest.raises(ValueError, match="kept_slots"):
        kv.compact(cache, 3, [0, 5])
