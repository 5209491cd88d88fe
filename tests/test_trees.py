"""TokenTree structure, masks, pruning, merging and static shapes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from trees import ROOT, TokenTree, best_first, merge, tree_attention_mask


def random_tree(rng: np.random.Generator, n: int, vocab: int = 50) -> TokenTree:
    parents = [ROOT] + [int(rng.integers(-1, i)) for i in range(1, n)]
    scores = []
    for i, p in enumerate(parents):
        scores.append((0.0 if p == ROOT else scores[p]) + float(np.log(rng.uniform(0.05, 1.0))))
    return TokenTree(torch.tensor(rng.integers(0, vocab, n)), torch.tensor(parents), torch.tensor(scores))


def brute_ancestors(tree: TokenTree) -> torch.Tensor:
    n = len(tree)
    mask = torch.zeros(n + 1, n + 1, dtype=torch.bool)
    for slot in range(n + 1):
        mask[slot, 0] = True
        node = slot - 1
        while node != ROOT:
            mask[slot, node + 1] = True
            node = int(tree.parents[node])
    return mask


def test_hand_written_masks():
    two_by_two = TokenTree([5, 6, 7, 8], [-1, -1, 0, 1])
    expected = torch.tensor(
        [[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [1, 0, 1, 0, 0], [1, 1, 0, 1, 0], [1, 0, 1, 0, 1]], dtype=torch.bool
    )
    assert torch.equal(two_by_two.ancestor_mask(), expected)
    assert two_by_two.depths.tolist() == [1, 1, 2, 2]
    assert [two_by_two.path_to(leaf) for leaf in (2, 3)] == [[0, 2], [1, 3]]
    assert two_by_two.position_ids(10).tolist() == [[10, 11, 11, 12, 12]]
    line = TokenTree.chain([4, 4, 4])
    assert torch.equal(line.ancestor_mask(), torch.tril(torch.ones(4, 4, dtype=torch.bool)))


@pytest.mark.parametrize("seed", range(20))
def test_random_tree_invariants(seed):
    rng = np.random.default_rng(seed)
    tree = random_tree(rng, int(rng.integers(1, 40)))
    assert torch.equal(tree.ancestor_mask(), brute_ancestors(tree))
    prefix = int(rng.integers(0, 30))
    slot_pos = tree.position_ids(prefix)[0]
    mask = tree_attention_mask(tree.ancestor_mask(), prefix, slot_pos, slot_pos, torch.float32)
    n = len(tree)
    assert mask.shape == (1, 1, n + 1, prefix + n + 1)
    assert bool((mask[0, 0, :, :prefix] == 0).all())
    assert torch.equal(mask[0, 0, :, prefix:] == 0, tree.ancestor_mask())
    assert tree.position_ids(prefix)[0, 1:].tolist() == (prefix + tree.depths).tolist()
    for node in range(n):
        path = tree.path_to(node)
        assert path[-1] == node and len(path) == int(tree.depths[node])
        assert int(tree.parents[path[0]]) == ROOT
        assert all(int(tree.parents[b]) == a for a, b in zip(path, path[1:]))


@pytest.mark.parametrize("seed", range(10))
def test_prune_keeps_best_ancestor_closed(seed):
    rng = np.random.default_rng(100 + seed)
    tree = random_tree(rng, 30)
    budget = int(rng.integers(0, 30))
    pruned = tree.prune(budget)
    assert len(pruned) == budget
    # scores never increase along paths, so the kept set is exactly the top-`budget` scores
    assert sorted(pruned.scores.tolist(), reverse=True) == pytest.approx(
        sorted(tree.scores.tolist(), reverse=True)[:budget]
    )
    for node in range(len(pruned)):  # valid tree whose paths exist in the original
        tokens = pruned.tokens[pruned.path_to(node)].tolist()
        assert any(tree.tokens[tree.path_to(o)].tolist() == tokens for o in range(len(tree)))


def test_prune_waits_for_parent_when_child_scores_higher():
    tree = TokenTree([1, 2, 3], [-1, 0, -1], [-2.0, -0.1, -1.0])
    pruned = tree.prune(1)
    assert pruned.tokens.tolist() == [3]
    assert tree.prune(2).tokens.tolist() == [1, 3]


def test_merge_is_a_trie_union():
    a = TokenTree([1, 2, 3], [-1, 0, 0], [-1.0, -2.0, -3.0], torch.tensor([0, 0, 0]))
    b = TokenTree([1, 2, 4, 5], [-1, 0, -1, 1], [-0.5, -2.5, -1.0, -2.0], torch.tensor([1, 1, 1, 1]))
    merged = merge([a, b])
    assert merged.tokens.tolist() == [1, 2, 3, 4, 5]
    assert merged.parents.tolist() == [-1, 0, 0, -1, 1]
    assert merged.scores.tolist() == pytest.approx([-0.5, -2.0, -3.0, -1.0, -2.0])
    assert merged.sources.tolist() == [1, 0, 0, 1, 1]
    assert len(merge([])) == 0


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"tokens": [1, 2], "parents": [-1]}, "parents has 1"),
        ({"tokens": [1, 2], "parents": [-1, 1]}, "earlier node"),
        ({"tokens": [1, 2], "parents": [-1, -2]}, "earlier node"),
        ({"tokens": [1, -2], "parents": [-1, 0]}, "non-negative"),
        ({"tokens": [[1]], "parents": [[-1]]}, "one-dimensional"),
        ({"tokens": [1.5], "parents": [-1]}, "integers"),
        ({"tokens": [1], "parents": [-1], "scores": [0.0, 1.0]}, "scores"),
    ],
)
def test_invalid_trees_raise(kwargs, message):
    with pytest.raises(ValueError, match=message):
        TokenTree(**kwargs)


def test_bad_prune_budget_and_select():
    tree = TokenTree([1, 2], [-1, 0])
    with pytest.raises(ValueError, match="budget"):
        tree.prune(-1)
    with pytest.raises(ValueError, match="ancestor-closed"):
        tree.select(torch.tensor([False, True]))


def test_best_first_shapes():
    for budget in (0, 1, 8, 20):
        tree = best_first(budget)
        assert len(tree) == budget
        for node, parent in enumerate(tree.parents):
            assert parent < node
            if parent >= 0:
                assert tree.log_prior[node] <= tree.log_prior[parent]
    assert best_first(10, rates=[[1.0, 0.5], [0.9, 0.0]], max_depth=3).widths() == (2, 2, 2)
    with pytest.raises(ValueError, match="budget"):
        best_first(-3)


def test_with_scores_keeps_the_structure_and_select_keeps_depths():
    tree = TokenTree(torch.tensor([5, 6, 7, 8]), torch.tensor([-1, 0, 0, 2]), torch.tensor([0.0, -1.0, -0.5, -2.0]))
    depths, ancestors = tree.depths, tree.ancestor_mask()
    rescored = tree.with_scores(torch.tensor([-3.0, -1.0, -2.0, -0.5], dtype=torch.float64), source=2)
    assert rescored.scores.dtype == torch.float32 and rescored.scores.tolist() == [-3.0, -1.0, -2.0, -0.5]
    assert rescored.sources.tolist() == [2, 2, 2, 2] and torch.equal(rescored.ranks, tree.ranks)
    assert torch.equal(rescored.depths, depths) and torch.equal(rescored.ancestor_mask(), ancestors)
    with pytest.raises(ValueError, match="NaN"):
        tree.with_scores(torch.tensor([0.0, float("nan"), 0.0, 0.0]))
    with pytest.raises(ValueError, match="shape"):
        tree.with_scores(torch.zeros(3))
    sub = tree.select(torch.tensor([True, False, True, True]))
    assert sub.tokens.tolist() == [5, 7, 8] and sub.parents.tolist() == [-1, 0, 1]
    fresh = TokenTree(sub.tokens, sub.parents)
    assert torch.equal(sub.depths, fresh.depths) and torch.equal(sub.ancestor_mask(), fresh.ancestor_mask())
