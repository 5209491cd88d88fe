"""Several drafters proposing one tree: trie union of their trees, pruned to one budget."""

from __future__ import annotations

from dataclasses import replace

from drafters.base import DraftContext, Drafter, VerifyFeedback
from trees import TokenTree, merge


class HybridDrafter(Drafter):
    """Merge the trees of several drafters (best score per shared node) and keep the best nodes.

    Each member is given a distinct ``source_id`` (its position) so its acceptance statistics
    count only the nodes it contributed. The name joins the members' names with ``+``.
    """

    def __init__(self, members: list[Drafter]) -> None:
        if len(members) < 2:
            raise ValueError("a hybrid drafter needs at least two drafters")
        names = [m.name for m in members]
        if len(set(names)) != len(names):
            raise ValueError(f"a hybrid drafter needs distinct drafters, got {'+'.join(names)}")
        for source_id, member in enumerate(members):
            member.source_id = source_id
        self.members = members
        self.name = "+".join(names)
        self.feedback_topk = max(m.feedback_topk for m in members)
        self.needs_features = max(m.needs_features for m in members)

    def propose(self, ctx: DraftContext, budget: int) -> TokenTree:
        if budget <= 0:
            return TokenTree.empty()
        ctx = replace(ctx, sampling=None)  # merged trees are verified by the delta rule: no draws
        trees = [tree for tree in (member.propose(ctx, budget) for member in self.members) if len(tree)]
        if len(trees) <= 1:  # nothing to merge: one tree is verified as its drafter made it (duplicate
            # siblings included, as for a single drafter: only the first of them can be accepted)
            return trees[0].prune(budget) if trees else TokenTree.empty()
        return merge(trees).prune(budget)

    def observe(self, feedback: VerifyFeedback) -> None:
        for member in self.members:
            member.observe(feedback)

    def end_sequence(self, sequence_id: int) -> None:
        for member in self.members:
            member.end_sequence(sequence_id)

    def reset(self) -> None:
        for member in self.members:
            member.reset()

    def state_dict(self) -> dict:
        return {member.name: member.state_dict() for member in self.members}

    def load_state_dict(self, state: dict) -> None:
        """Every member's state, all or nothing (a member that refuses its state leaves every
        member as it was)."""
        from drafters.state import StateError

        if not isinstance(state, dict):
            raise StateError(f"{self.name} state: expected a dictionary, got {type(state).__name__}")
        missing = [m.name for m in self.members if m.name not in state]
        if missing:
            raise StateError(f"{self.name} state has no entry for drafter(s) {', '.join(missing)}")
        before = [member.state_dict() for member in self.members]
        try:
            for member in self.members:
                member.load_state_dict(state[member.name])
        except Exception:
            for member, old in zip(self.members, before):
                member.load_state_dict(old)
            raise
