"""Several drafters proposing one tree: trie union of their trees, pruned to one budget.

Only the members in ``running`` propose into the tree (the engine's scheduler decides each step
which drafters pay for themselves); a member in ``shadowed`` proposes beside it, its tree neither
merged nor verified, so what it would have brought is still measured; every member keeps learning
from every verified forward. The hybrid measures what each member costs and brings
(`DrafterUsage`): the host seconds of its ``propose``, the seconds spent merging, and the nodes and
accepted tokens that member alone proposed (a node is a path from the root, so it is a member's own
when no other member's tree holds the same path): what the step would have lost without it. A
shadow, cut to the verified tree's size (its best nodes), is charged its nodes that tree lacked and
credited the tokens of its longest root path that the sequence then committed beyond what the
verified tree accepted (greedy: exactly what verifying it too would have added).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace

import numpy as np

from drafters.base import DraftContext, Drafter, VerifyFeedback
from trees import ROOT, TokenTree, merge


@dataclass
class DrafterUsage:
    """What a hybrid's members cost and brought since the last `HybridDrafter.take_usage`.

    Attributes:
        propose_seconds: by ``source_id``: host seconds its ``propose`` took (every row summed).
        merge_seconds: host seconds spent merging the members' trees.
        own_verified: by ``source_id``: verified nodes no other member proposed.
        own_accepted: by ``source_id``: accepted nodes no other member proposed (for a shadow:
            the tokens its tree would have added, counted once the sequence has committed them).
        shadowed: the ``source_id`` s that proposed in shadow (not merged, not verified).
    """

    propose_seconds: dict[int, float] = field(default_factory=dict)
    merge_seconds: float = 0.0
    own_verified: dict[int, int] = field(default_factory=dict)
    own_accepted: dict[int, int] = field(default_factory=dict)
    shadowed: set[int] = field(default_factory=set)


@dataclass
class _Shadow:
    """A tree proposed in shadow, waiting for the tokens the sequence commits after its root."""

    source: int
    tree: TokenTree
    start: int  # the committed length when it was proposed: its depth-0 nodes guess token ``start``
    verified: bool = False  # whether its step's feedback came
    accepted: int = 0  # tokens the verified tree accepted that step


def _children(tree: TokenTree) -> dict[tuple[int, int], int]:
    """``(parent node_idx, token) -> node_idx`` of ``tree``: its trie, to walk by tokens."""
    pairs = zip(tree.tokens.tolist(), tree.parents.tolist())
    return {(parent, token): node for node, (token, parent) in enumerate(pairs)}


def _matched(tree: TokenTree, continuation: np.ndarray) -> int:
    """How many tokens of ``continuation`` a root path of ``tree`` spells, from its first."""
    children = _children(tree)
    node, depth = ROOT, 0
    for token in continuation.tolist():
        node = children.get((node, token))
        if node is None:
            break
        depth += 1
    return depth


def _held(tree: TokenTree, other: TokenTree) -> np.ndarray:
    """``[n]`` bool: which nodes of ``tree`` (by ``node_idx``) ``other`` holds too, as the same
    path of tokens from the root."""
    children = _children(other)
    match = [-2] * len(tree)  # node_idx in other, or -2 (a node below an unmatched one is unmatched)
    for node, (token, parent) in enumerate(zip(tree.tokens.tolist(), tree.parents.tolist())):
        above = ROOT if parent == ROOT else match[parent]
        if above != -2:
            match[node] = children.get((above, token), -2)
    return np.asarray(match) != -2


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
        self.running: frozenset[int] | None = None  # source_ids that propose (None: every member)
        self.shadowed: frozenset[int] = frozenset()  # source_ids that propose in shadow
        self.clock = time.perf_counter  # host seconds (tests inject a fake one)
        self._usage = DrafterUsage()
        self._proposed: dict[int, dict[int, TokenTree]] = {}  # sequence_id -> its last proposal, by member
        self._shadows: dict[int, list[_Shadow]] = {}  # sequence_id -> shadow trees, oldest first

    def propose(self, ctx: DraftContext, budget: int) -> TokenTree:
        if budget <= 0:
            return TokenTree.empty()
        ctx = replace(ctx, sampling=None)  # merged trees are verified by the delta rule: no draws
        usage, proposed = self._usage, {}
        shadows = self._credit_shadows(ctx)
        for member in self.members:
            source = member.source_id
            shadow = source in self.shadowed
            if self.running is not None and source not in self.running and not shadow:
                continue
            began = self.clock()
            tree = member.propose(ctx, budget)
            usage.propose_seconds[source] = usage.propose_seconds.get(source, 0.0) + self.clock() - began
            if shadow:
                usage.shadowed.add(source)
                shadows.append(_Shadow(source, tree, len(ctx.token_ids)))
            elif len(tree):
                proposed[source] = tree
        self._proposed[ctx.sequence_id] = proposed
        trees = list(proposed.values())
        if len(trees) <= 1:  # nothing to merge: one tree is verified as its drafter made it (duplicate
            # siblings included, as for a single drafter: only the first of them can be accepted)
            return trees[0].prune(budget) if trees else TokenTree.empty()
        began = self.clock()
        merged = merge(trees).prune(budget)
        usage.merge_seconds += self.clock() - began
        return merged

    def observe(self, feedback: VerifyFeedback) -> None:
        proposed = self._proposed.pop(feedback.sequence_id, None)
        if feedback.tree is not None and proposed:
            self._credit(feedback.tree, feedback.accepted_nodes, proposed)
        if feedback.tree is not None:
            for shadow in self._shadows.get(feedback.sequence_id, ()):
                if not shadow.verified:  # proposed this step: given the verified tree's room (one node at
                    # least), charge the nodes it would have added
                    shadow.tree = shadow.tree.prune(max(len(feedback.tree), 1))
                    shadow.verified, shadow.accepted = True, len(feedback.accepted_nodes)
                    own = int((~_held(shadow.tree, feedback.tree)).sum()) if len(shadow.tree) else 0
                    self._usage.own_verified[shadow.source] = self._usage.own_verified.get(shadow.source, 0) + own
        for member in self.members:
            member.observe(feedback)

    def _credit_shadows(self, ctx: DraftContext) -> list[_Shadow]:
        """Credit the shadows of ``ctx``'s sequence whose guesses its committed tokens now settle
        (each: its root path's tokens beyond those the verified tree accepted); the rest wait.
        Returns the sequence's list of waiting shadows."""
        waiting = []
        for shadow in self._shadows.get(ctx.sequence_id, ()):
            if not shadow.verified:  # its step failed before the feedback: nothing to compare with
                continue
            continuation = np.asarray(ctx.token_ids[shadow.start :])  # [c] committed after its root
            matched = _matched(shadow.tree, continuation)
            if matched == continuation.size and matched < shadow.tree.max_depth:
                waiting.append(shadow)  # every committed token guessed, deeper guesses not settled yet
                continue
            gain = max(0, matched - shadow.accepted)
            self._usage.own_accepted[shadow.source] = self._usage.own_accepted.get(shadow.source, 0) + gain
        self._shadows[ctx.sequence_id] = waiting
        return waiting

    def wants_prompt_topk(self, tokens: np.ndarray) -> np.ndarray:
        """Where any member that learns from the target's top-k wants it."""
        wanted = np.zeros(len(tokens), dtype=bool)
        for member in self.members:
            if member.feedback_topk:
                wanted |= member.wants_prompt_topk(tokens)
        return wanted

    def _credit(self, tree: TokenTree, accepted_nodes, proposed: dict[int, TokenTree]) -> None:
        """Count the verified and accepted nodes of ``tree`` that one member alone proposed."""
        usage = self._usage
        if not len(tree):
            return
        held = {source: _held(tree, member_tree) for source, member_tree in proposed.items()}  # [n] each
        holders = np.sum(list(held.values()), axis=0)  # [n] how many members hold each node
        accepted = np.zeros(len(tree), dtype=bool)
        accepted[list(accepted_nodes)] = True
        for source, holds in held.items():
            mine = holds & (holders == 1)
            usage.own_verified[source] = usage.own_verified.get(source, 0) + int(mine.sum())
            usage.own_accepted[source] = usage.own_accepted.get(source, 0) + int((mine & accepted).sum())

    def take_usage(self) -> DrafterUsage:
        """What the members cost and brought since the last call (then counted afresh)."""
        usage, self._usage = self._usage, DrafterUsage()
        return usage

    def end_sequence(self, sequence_id: int) -> None:
        self._proposed.pop(sequence_id, None)
        self._shadows.pop(sequence_id, None)  # guesses past its end are never settled
        for member in self.members:
            member.end_sequence(sequence_id)

    def reset(self) -> None:
        self._proposed.clear()
        self._shadows.clear()
        self._usage = DrafterUsage()
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
