"""Token Recycling drafter: expansion tables, updates, state."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from drafters import DraftContext, TokenRecycling, VerifyFeedback, make_drafter
from trees import TreeShape


def ctx(*tokens: int) -> DraftContext:
    return DraftContext(np.array(tokens, dtype=np.int64))


def drafter_with(rows: dict[int, list[int]], vocab: int = 20, k: int = 3, shape=None) -> TokenRecycling:
    drafter = TokenRecycling(vocab, k=k, shape=shape)
    for token, successors in rows.items():
        drafter.succ[token, : len(successors)] = successors
    return drafter


def ranked_shape(parents: list[int], ranks: list[int], rates: list[float]) -> TreeShape:
    """A shape whose node values are products of ``rates[rank]`` along the path."""
    log_prior: list[float] = []
    for parent, rank in zip(parents, ranks):
        log_prior.append((log_prior[parent] if parent >= 0 else 0.0) + float(np.log(rates[rank])))
    return TreeShape(np.array(parents), np.array(ranks), np.array(log_prior))


def test_expands_shape_breadth_first():
    shape = ranked_shape([-1, -1, 0, 0, 2], [0, 1, 0, 1, 0], rates=[0.5, 0.3, 0.1])
    drafter = drafter_with({1: [4, 5, 6], 4: [7, 8, 9], 5: [10, 11, 12], 7: [13, 14, 15]}, shape=shape)
    tree = drafter.propose(ctx(0, 1), budget=10)
    # depth 1: successors 0 and 1 of the root (token 1); depth 2: two best slots (4's rank 0 and 1);
    # depth 3: rank 0 under token 7
    assert tree.tokens.tolist() == [4, 5, 7, 8, 13]
    assert tree.parents.tolist() == [-1, -1, 0, 0, 2]
    assert tree.ranks.tolist() == [0, 1, 0, 1, 0]  # successor columns, used by the acceptance statistics
    assert tree.scores.tolist() == pytest.approx(shape.log_prior.tolist())


def test_unknown_rows_and_duplicate_siblings_are_dropped():
    drafter = drafter_with({1: [4, 4, 6], 4: [-1, 9, 9]},
                           shape=ranked_shape([-1, -1, -1, 0, 0, 1], [0, 1, 2, 0, 1, 0], [0.5, 0.3, 0.2]))
    tree = drafter.propose(ctx(1), budget=10)
    assert tree.tokens.tolist() == [4, 6, 9]
    assert tree.parents.tolist() == [-1, -1, 0]
    assert len(drafter_with({}).propose(ctx(3), budget=8)) == 0


def test_budget_caps_the_tree():
    drafter = drafter_with({1: [2, 3, 4], 2: [5, 6, 7], 3: [8, 9, 10]})
    for budget in (0, 1, 4, 7):
        tree = drafter.propose(ctx(1), budget=budget)
        assert len(tree) == budget
        for node, parent in enumerate(tree.parents.tolist()):  # ancestor-closed, scores fall along paths
            assert parent < node
            if parent >= 0:
                assert tree.scores[node] <= tree.scores[parent]


def test_observe_overwrites_rows_and_committed_rows_win():
    drafter = TokenRecycling(20, k=2)
    feedback = VerifyFeedback(
        tokens=np.array([3, 5, 3]),  # token 3 rejected first, then committed
        topk_ids=np.array([[1, 2], [6, 7], [8, 9]]),
        committed=np.array([False, True, True]),
    )
    drafter.observe(feedback)
    assert drafter.succ[3].tolist() == [8, 9]
    assert drafter.succ[5].tolist() == [6, 7]
    assert drafter.succ[4].tolist() == [-1, -1]


def test_state_round_trip_and_reset(tmp_path):
    drafter = drafter_with({1: [2, 3, 4], 2: [5, 6, 7]})
    path = tmp_path / "recycling.pt"
    drafter.save(path)
    other = TokenRecycling(20, k=3)
    other.load(path)
    a, b = drafter.propose(ctx(1), 6), other.propose(ctx(1), 6)
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.parents, b.parents)
    other.reset()
    assert len(other.propose(ctx(1), 6)) == 0
    with pytest.raises(ValueError, match="vocabulary of 20 tokens; this one has 21"):
        TokenRecycling(21, k=3).load_state_dict(drafter.state_dict())


def test_constructor_and_registry_errors():
    with pytest.raises(ValueError, match="vocab_size"):
        TokenRecycling(0)
    with pytest.raises(ValueError, match="rank"):
        TokenRecycling(10, k=2, shape=TreeShape(np.array([-1]), np.array([3]), np.array([0.0])))
    with pytest.raises(ValueError, match="drafter must be one of"):
        make_drafter("nope", 10)


def test_prompt_asks_for_the_rows_it_does_not_know():
    drafter = drafter_with({3: [4, 5], 7: [1]}, vocab=10)
    asked = drafter.wants_prompt_topk(np.array([3, 2, 7, 2, 9, -1, 10, 0]))
    assert asked.tolist() == [False, True, False, True, True, False, False, True]  # out-of-vocabulary ids: never


def lm_head_rows_of_one_step_generation(model, drafter, prompt: torch.Tensor) -> list[int]:
    """The rows the LM head read in each forward of a one-token plain generation of ``prompt``."""
    from specdec import SpeculativeDecoder

    rows: list[int] = []
    handle = model.get_output_embeddings().register_forward_pre_hook(lambda module, args: rows.append(args[0].shape[1]))
    try:
        SpeculativeDecoder(model, drafter=drafter, tree_budget=0).generate(prompt[None], max_new_tokens=1)
    finally:
        handle.remove()
    return rows


def test_prefill_seeds_only_unknown_rows_and_reads_the_lm_head_only_there(model):
    k = 4
    prompt = torch.tensor([5, 9, 5, 17, 30, 9, 41, 3])  # cached: all but the root (3)
    drafter = TokenRecycling(model.config.vocab_size, k=k)
    drafter.succ[17] = [1, 2, 3, 4]  # known: kept, and its position not read
    # the last two forwards: the prefill, at positions 0, 1, 2, 4, 5, 6 (not 3, the known token 17), then
    # the one plain step (before them: the decoder's first-use probes)
    assert lm_head_rows_of_one_step_generation(model, drafter, prompt)[-2:] == [6, 1]
    with torch.no_grad():
        topk = model(prompt[None]).logits[0].topk(k).indices  # [8, k] the target's successors by position
    for token, last_position in ((5, 2), (9, 5), (30, 4), (41, 6)):  # later occurrences win
        assert drafter.succ[token].tolist() == topk[last_position].tolist()
    assert drafter.succ[17].tolist() == [1, 2, 3, 4]
    # hot: every prompt token known, the prefill reads one LM-head row
    assert lm_head_rows_of_one_step_generation(model, drafter, prompt)[-2:] == [1, 1]
