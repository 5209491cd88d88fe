"""n-gram, draft-model and hybrid drafters; acceptance statistics; dynamic shapes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from drafters import DraftContext, HybridDrafter, ModelDrafter, NGramDrafter, TokenRecycling, make_drafter
from drafters.hybrid import DrafterUsage
from drafters.ngram import NGramIndex
from drafters.stats import AcceptanceStats
from tests.conftest import ScriptedDrafter, tiny_llama
from trees import TokenTree


def ctx(tokens, sequence_id=0, prompt_len=0) -> DraftContext:
    return DraftContext(np.array(tokens, dtype=np.int64), sequence_id, prompt_len)


def paths_of(tree: TokenTree) -> list[list[int]]:
    """The token paths from the root to every leaf, in leaf order."""
    leaves = [node for node, kids in enumerate(tree.children()[1:]) if not kids]
    return [tree.tokens[tree.path_to(leaf)].tolist() for leaf in leaves]


# ---------------------------------------------------------------- n-gram matcher tables
def test_longest_match_wins():
    drafter = NGramDrafter(min_n=1, max_n=3, max_matches=1, max_depth=3)
    # suffix (1, 2, 3) occurred once (followed by 9 9 9); the unigram 3 also occurred before 7 7
    tree = drafter.propose(ctx([1, 2, 3, 9, 9, 9, 3, 7, 7, 5, 1, 2, 3]), budget=8)
    assert paths_of(tree) == [[9, 9, 9]]


def test_several_continuations_form_a_trie_ranked_by_count():
    drafter = NGramDrafter(min_n=1, max_n=2, max_matches=4, max_depth=2)
    tokens = [5, 6, 1, 5, 6, 2, 5, 6, 1, 8, 5, 6]
    tree = drafter.propose(ctx(tokens), budget=10)
    first_level = tree.tokens[tree.parents == -1].tolist()
    assert first_level[0] == 1 and set(first_level) == {1, 2}  # 1 follows (5, 6) twice, 2 once
    assert sorted(map(tuple, paths_of(tree))) == [(1, 5), (1, 8), (2, 5)]
    scores = dict(zip(tree.tokens.tolist(), tree.scores.tolist()))
    assert scores[1] > scores[2]


def test_no_match_and_short_prompt_give_empty_trees():
    drafter = NGramDrafter(min_n=2, max_n=3)
    assert len(drafter.propose(ctx([1, 2, 3, 4, 5]), budget=8)) == 0  # no repeated suffix
    assert len(drafter.propose(ctx([7], sequence_id=1), budget=8)) == 0  # shorter than min_n
    assert len(drafter.propose(ctx([1, 2, 1, 2], sequence_id=2), budget=0)) == 0


def test_index_is_incremental_and_budget_respected():
    drafter = NGramDrafter(min_n=1, max_n=3, max_matches=3, max_depth=6)
    tokens = [4, 5, 6, 7, 8, 9, 4, 5]
    drafter.propose(ctx(tokens), budget=3)
    tree = drafter.propose(ctx(tokens + [6]), budget=3)
    assert paths_of(tree) == [[7, 8, 9]]
    assert len(drafter._contexts[0][0]) == len(tokens) + 1


def test_cross_request_store_drafts_repeated_outputs():
    drafter = NGramDrafter(min_n=2, max_n=3, store_tokens=100)
    drafter.propose(ctx([1, 2, 10, 11, 12, 13, 14], sequence_id=0, prompt_len=2), budget=4)
    assert len(drafter.propose(ctx([3, 10, 11], sequence_id=1, prompt_len=3), budget=4)) == 0  # 0 still open
    drafter.end_sequence(0)
    tree = drafter.propose(ctx([3, 10, 11], sequence_id=1, prompt_len=3), budget=4)
    assert paths_of(tree) == [[12, 13, 14]]
    tiny = NGramDrafter(min_n=2, max_n=3, store_tokens=5)
    tiny.propose(ctx([1, 10, 11, 12, 13, 14, 15, 16], sequence_id=0, prompt_len=1), budget=4)
    tiny.end_sequence(0)
    tiny.propose(ctx([2, 30, 31, 32], sequence_id=1, prompt_len=1), budget=4)
    tiny.end_sequence(1)
    assert sum(len(s) + 1 for s in tiny.stored_outputs()) <= 5
    assert tiny.stored_outputs() == [[30, 31, 32]]


def test_ngram_index_boundaries():
    index = NGramIndex(1, 2)
    index.extend([1, 2, -1, 1, 3])
    assert index.continuations((1,), depth=3, limit=5) == [[3], [2]]


def test_ngram_state_round_trip():
    drafter = NGramDrafter(min_n=2, max_n=2)
    drafter.propose(ctx([1, 2, 10, 11, 12], sequence_id=0, prompt_len=2), budget=4)
    drafter.end_sequence(0)
    other = NGramDrafter(min_n=2, max_n=2)
    other.load_state_dict(drafter.state_dict())
    a = drafter.propose(ctx([9, 10, 11], sequence_id=2), budget=4)
    b = other.propose(ctx([9, 10, 11], sequence_id=2), budget=4)
    assert paths_of(a) == paths_of(b) == [[12]]


# ---------------------------------------------------------------- statistics and shapes
def test_sibling_ranks_and_stats_update():
    tree = TokenTree([5, 6, 7, 8], [-1, -1, 0, 0], [-1.0, -0.5, -2.0, -3.0])
    assert tree.ranks.tolist() == [1, 0, 0, 1]  # default ranks: among siblings by score
    stats = AcceptanceStats(max_depth=4, max_rank=4, decay=1.0, prior=(0.5, 0.5, 0.5, 0.5), prior_weight=0.0)
    stats.update(tree, accepted_nodes=[0, 2])
    assert stats.reached[0, :2].tolist() == [1.0, 1.0] and stats.accepted[0, :2].tolist() == [0.0, 1.0]
    assert stats.reached[1, :2].tolist() == [1.0, 1.0] and stats.accepted[1, :2].tolist() == [1.0, 0.0]
    stats.update(tree, accepted_nodes=[])  # depth-2 nodes are not reached now
    assert stats.reached[1, :2].tolist() == [1.0, 1.0]
    assert stats.rates()[0, 1] == pytest.approx(0.5)


def test_stats_forget_and_filter_by_source():
    tree = TokenTree([5, 6], [-1, -1], [-1.0, -2.0], torch.tensor([0, 1]))
    stats = AcceptanceStats(decay=0.5, prior_weight=0.0)
    for _ in range(10):
        stats.update(tree, [0], source=1)  # node 0 belongs to source 0: ignored
    assert stats.reached[0, 0] == 0.0 and stats.reached[0, 1] > 0 and stats.accepted[0, 1] == 0.0
    assert stats.reached[0, 1] < 2.0  # geometric forgetting


def test_recycling_learns_a_deeper_tree_when_top1_is_always_accepted():
    drafter = TokenRecycling(16, k=4)
    drafter.succ[:] = (np.arange(16)[:, None] + np.arange(1, 5)[None, :]) % 16
    shallow = drafter.propose(ctx([1]), budget=8)
    always_accepted_chain = TokenTree.chain([2, 3, 4, 5, 6, 7, 8, 9])
    for _ in range(drafter.REFRESH_STEPS):
        drafter.stats.update(always_accepted_chain, accepted_nodes=range(8))
    deep = drafter.propose(ctx([1]), budget=8)
    assert deep.max_depth > shallow.max_depth


# ---------------------------------------------------------------- hybrid and model drafters
def test_hybrid_merges_and_names():
    drafter = make_drafter("recycling+ngram", 32)
    assert isinstance(drafter, HybridDrafter) and drafter.name == "recycling+ngram"
    drafter.members[0].succ[3, :2] = [7, 8]
    tree = drafter.propose(ctx([3, 9, 9, 3]), budget=8)  # ngram: 3 -> 9 ; recycling: 3 -> 7, 8
    assert set(tree.tokens[tree.parents == -1].tolist()) == {7, 8, 9}
    assert set(tree.sources.tolist()) == {0, 1}
    with pytest.raises(ValueError, match="distinct"):
        HybridDrafter([NGramDrafter(), NGramDrafter()])
    with pytest.raises(ValueError, match="drafter must be one of"):
        make_drafter("recycling+warp", 32)


class _Fixed(ScriptedDrafter):
    """Proposes the same tree every step and counts its proposals."""

    def __init__(self, name: str, tree: TokenTree) -> None:
        super().__init__(None)
        self.name, self.tree, self.calls = name, tree, 0

    def propose(self, ctx, budget):
        self.calls += 1
        return self.tree


def test_hybrid_counts_what_each_member_alone_brought_and_runs_only_the_chosen():
    from drafters import VerifyFeedback

    # a: 5 -> 6 -> 7 ; b: 5 -> 6 -> 8 and 9. Shared: the path (5,); (5,6) too. a alone: (5,6,7).
    a = _Fixed("a", TokenTree(torch.tensor([5, 6, 7]), torch.tensor([-1, 0, 1])))
    b = _Fixed("b", TokenTree(torch.tensor([5, 6, 8, 9]), torch.tensor([-1, 0, 1, -1])))
    hybrid = HybridDrafter([a, b])
    ticks = iter(range(100))
    hybrid.clock = lambda: float(next(ticks))  # every clock read one second later
    tree = hybrid.propose(ctx([1, 2], sequence_id=3), budget=16)
    paths = {tuple(tree.path_to(i)): i for i in range(len(tree))}
    path_tokens = {tuple(tree.tokens[list(p)].tolist()): i for p, i in paths.items()}
    accepted = (path_tokens[(5,)], path_tokens[(5, 6)], path_tokens[(5, 6, 7)])
    hybrid.observe(VerifyFeedback(tokens=np.zeros(1, np.int64), topk_ids=np.zeros((1, 0), np.int64),
                                  committed=np.ones(1, bool), tree=tree, accepted_nodes=accepted, sequence_id=3))
    usage = hybrid.take_usage()
    assert usage.propose_seconds == {0: 1.0, 1: 1.0} and usage.merge_seconds == 1.0
    assert len(tree) == 5 and usage.own_verified == {0: 1, 1: 2} and usage.own_accepted == {0: 1, 1: 0}
    assert hybrid.take_usage() == DrafterUsage()  # counted afresh
    hybrid.running = frozenset({1})
    alone = hybrid.propose(ctx([1, 2, 5], sequence_id=3), budget=16)
    assert (a.calls, b.calls) == (1, 2) and len(alone) == 4  # b's tree as it made it, no merge
    assert hybrid.take_usage().merge_seconds == 0.0


def _feedback(tree: TokenTree, accepted_tokens: list[int], sequence_id: int):
    """The feedback of a verified ``tree`` whose path of ``accepted_tokens`` was accepted."""
    from drafters import VerifyFeedback

    nodes, parent = [], -1
    for token in accepted_tokens:
        parent = next(i for i in range(len(tree)) if int(tree.parents[i]) == parent and int(tree.tokens[i]) == token)
        nodes.append(parent)
    return VerifyFeedback(tokens=np.zeros(1, np.int64), topk_ids=np.zeros((1, 0), np.int64), committed=np.ones(1, bool),
                          tree=tree, accepted_nodes=tuple(nodes), sequence_id=sequence_id)


def test_a_shadowed_member_is_charged_and_credited_what_verifying_its_tree_would_have_added():
    # a (in the tree): 5 -> 6 -> 7. b (in shadow): 5 -> 6 -> 8 -> 4, and 9 (its worst node, cut: the
    # verified tree has 3 nodes, so b's best 3 are kept: 5, 6, 8).
    a = _Fixed("a", TokenTree(torch.tensor([5, 6, 7]), torch.tensor([-1, 0, 1])))
    b = _Fixed("b", TokenTree(torch.tensor([5, 6, 8, 4, 9]), torch.tensor([-1, 0, 1, 2, -1]),
                              torch.tensor([-0.1, -0.2, -0.3, -0.4, -2.0])))
    hybrid = HybridDrafter([a, b])
    hybrid.running, hybrid.shadowed = frozenset({0}), frozenset({1})
    tree = hybrid.propose(ctx([1, 2], sequence_id=3), budget=16)
    assert tree.tokens.tolist() == [5, 6, 7] and b.calls == 1  # b drafted, its tree not merged
    hybrid.observe(_feedback(tree, [5, 6], sequence_id=3))  # the target: 5, 6, then 8 (the bonus)
    usage = hybrid.take_usage()
    assert usage.shadowed == {1} and set(usage.propose_seconds) == {0, 1} and usage.merge_seconds == 0.0
    # a alone in the tree: all of it a's own; b's own node: 8 (4 and 9 cut), unverified so far
    assert usage.own_verified == {0: 3, 1: 1} and usage.own_accepted == {0: 2}
    hybrid.running, hybrid.shadowed = frozenset({0}), frozenset()
    hybrid.propose(ctx([1, 2, 5, 6, 8], sequence_id=3), budget=16)  # committed 5, 6, 8: b's 3 nodes settled
    assert hybrid.take_usage().own_accepted == {1: 1}  # one token beyond the two the tree accepted

    # a shadow waits while every committed token matches it and its deeper guesses are unsettled
    hybrid.running, hybrid.shadowed = frozenset({0}), frozenset({1})
    tree = hybrid.propose(ctx([1, 2], sequence_id=4), budget=16)
    hybrid.observe(_feedback(tree, [], sequence_id=4))  # nothing accepted; the target's bonus: 5
    hybrid.take_usage()
    hybrid.running, hybrid.shadowed = frozenset({0}), frozenset()
    hybrid.propose(ctx([1, 2, 5], sequence_id=4), budget=16)
    assert hybrid.take_usage().own_accepted == {}  # 5 matched, 6 and 8 not settled yet
    hybrid.propose(ctx([1, 2, 5, 6, 3], sequence_id=4), budget=16)
    assert hybrid.take_usage().own_accepted == {1: 2}  # 5, 6 matched, 8 missed: two beyond none accepted
    hybrid.propose(ctx([1, 2, 5, 6, 3, 3], sequence_id=4), budget=16)
    assert hybrid.take_usage().own_accepted == {}  # settled once
    hybrid.shadowed = frozenset({1})
    hybrid.propose(ctx([1, 2, 5, 6, 3, 3], sequence_id=4), budget=16)
    hybrid.end_sequence(4)  # an unverified shadow of an ended sequence is dropped
    assert 4 not in hybrid._shadows


def test_model_drafter_vocab_check(model):
    with pytest.raises(ValueError, match="vocabulary of 50 tokens but the target has 96"):
        ModelDrafter(tiny_llama(vocab_size=50), vocab_size=96)
    with pytest.raises(ValueError, match="draft_model"):
        make_drafter("model", 96)


def test_model_drafter_copy_of_target_drafts_the_greedy_path(model):
    from tests.conftest import hf_greedy

    prompt = torch.tensor([[5, 9, 11, 4]])
    ref = hf_greedy(model, prompt, 6)[0].tolist()
    drafter = ModelDrafter(model, vocab_size=96, top_k=2, beam=2, max_depth=6)
    tree = drafter.propose(ctx(prompt[0].tolist()), budget=12)
    assert ref[4:8] in [p[:4] for p in paths_of(tree)]
    assert len(tree) <= 12 and all(p < i for i, p in enumerate(tree.parents.tolist()))
    for node, parent in enumerate(tree.parents.tolist()):  # scores fall along paths
        if parent >= 0:
            assert tree.scores[node] <= tree.scores[parent] + 1e-6
    assert drafter._cache.get_seq_length() == prompt.shape[1]  # drafted tokens were cropped


def test_earliest_too_alternates_recent_and_earliest():
    index = NGramIndex(1, 1)
    index.extend([7, 1, 7, 2, 7, 3, 7, 4, 7])
    assert index.continuations((7,), depth=1, limit=4, earliest_too=True) == [[4], [1], [3], [2]]
    assert index.continuations((7,), depth=1, limit=4) == [[4], [3], [2], [1]]


def test_model_drafter_drafts_deeper_only_while_it_pays():
    """Depths past the first are drafted while the depth rule measures that they pay; a draft
    model whose deeper forwards cost more than they save stops at depth 1 (probes aside)."""
    draft = tiny_llama(seed=9)
    vocab = int(draft.get_output_embeddings().weight.shape[0])
    context = ctx([5, 6, 7, 8, 5, 6])
    assert ModelDrafter(draft, vocab).propose(context, 12).max_depth > 1  # unmeasured: every depth
    costly = ModelDrafter(draft, vocab)
    costly.depths.depth_seconds[:] = 1.0  # a second per depth against 10 ms steps
    costly.depths.step_seconds = 0.01
    assert costly.propose(context, 12).max_depth == 1


def test_hybrid_asks_for_the_prompt_topk_its_learning_members_want():
    recycling = TokenRecycling(20, k=2)
    recycling.succ[4] = [5, 6]
    hybrid = HybridDrafter([recycling, NGramDrafter()])
    tokens = np.array([4, 7, 4, 8])
    assert hybrid.wants_prompt_topk(tokens).tolist() == [False, True, False, True]
    assert hybrid.feedback_topk == 2
