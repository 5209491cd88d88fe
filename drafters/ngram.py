"""N-gram / suffix-match drafter: copy what followed earlier occurrences of the recent suffix.

Matching runs against the current context (prompt + generated text) and, optionally, a bounded
store of this drafter's previous outputs, so content repeated across requests is drafted too.
"""

from __future__ import annotations

import bisect
from collections import deque

import numpy as np
import torch

from drafters.base import DraftContext, Drafter, VerifyFeedback
from drafters.stats import AcceptanceStats
from trees import ROOT, TokenTree

BOUNDARY = -1  # separates sequences in the store; never part of a match


class NGramIndex:
    """End positions of every n-gram (``min_n <= n <= max_n``) of a growing token sequence.

    ``extend`` costs O(max_n) dictionary updates per appended token; ``matches`` costs O(max_n)
    lookups plus the continuations it returns. Nothing scans the sequence per step.
    """

    def __init__(self, min_n: int, max_n: int) -> None:
        self.min_n, self.max_n = min_n, max_n
        self.tokens: list[int] = []
        self.ends: dict[tuple[int, ...], list[int]] = {}

    def __len__(self) -> int:
        return len(self.tokens)

    def extend(self, tokens) -> None:
        for token in tokens:
            self.tokens.append(int(token))
            end = len(self.tokens) - 1
            for n in range(self.min_n, self.max_n + 1):
                if end + 1 < n:
                    break
                key = tuple(self.tokens[end - n + 1 : end + 1])
                if BOUNDARY in key:
                    break
                self.ends.setdefault(key, []).append(end)

    def continuations(self, suffix: tuple[int, ...], depth: int, limit: int, before: int | None = None,
                      earliest_too: bool = False):
        """Up to ``limit`` continuations of earlier occurrences of ``suffix``, most recent first
        (with ``earliest_too``: alternately the most recent and the earliest remaining one).

        Only occurrences ending before position ``before`` count (default: anywhere but the very
        end); each continuation stops at ``depth`` tokens or a sequence boundary.
        """
        ends = self.ends.get(suffix)
        if not ends:
            return []
        before = len(self.tokens) - 1 if before is None else before
        usable = ends[: bisect.bisect_left(ends, before)]  # ends are ascending
        order = _alternate(usable) if earliest_too else reversed(usable)
        found = []
        for end in order:
            continuation = self.tokens[end + 1 : end + 1 + depth]
            if BOUNDARY in continuation:
                continuation = continuation[: continuation.index(BOUNDARY)]
            if continuation:
                found.append(continuation)
            if len(found) >= limit:
                break
        return found


def _alternate(ends: list[int]):
    """Most recent, earliest, second most recent, second earliest, ..."""
    low, high = 0, len(ends) - 1
    while low <= high:
        yield ends[high]
        if low < high:
            yield ends[low]
        low, high = low + 1, high - 1


class NGramDrafter(Drafter):
    """Suffix matching over the context (longest suffix first) drafted as a trie.

    For n from ``max_n`` down to ``min_n`` the last n tokens are looked up; the continuations of
    their most recent earlier occurrences (up to ``max_matches``, longer matches first) are merged
    into a trie. Siblings are ranked by how many continuations pass through them (ties: the longer
    match first), and a node's score is the product of learned per-(depth, rank) acceptance rates
    along its path.

    Args:
        min_n, max_n: shortest and longest suffix matched.
        max_matches: continuations merged into one tree.
        max_depth: tokens drafted per continuation.
        store_tokens: size of the cross-request store of previous outputs (0 disables it);
            the oldest outputs are evicted first.
        earliest_too: also take the earliest occurrences (alternating with the most recent).
    """

    name = "ngram"

    def __init__(self, vocab_size: int | None = None, min_n: int = 1, max_n: int = 4, max_matches: int = 6,
                 max_depth: int = 8, store_tokens: int = 20_000, earliest_too: bool = False) -> None:
        if not 1 <= min_n <= max_n:
            raise ValueError(f"need 1 <= min_n <= max_n, got min_n={min_n}, max_n={max_n}")
        if max_matches < 1 or max_depth < 1:
            raise ValueError("max_matches and max_depth must be >= 1")
        if store_tokens < 0:
            raise ValueError(f"store_tokens must be >= 0, got {store_tokens}")
        self.vocab_size = vocab_size
        self.min_n, self.max_n = min_n, max_n
        self.max_matches, self.max_depth = max_matches, max_depth
        self.store_tokens = store_tokens
        self.earliest_too = earliest_too
        self.stats = AcceptanceStats(prior=(0.5, 0.15, 0.08, 0.05, 0.03, 0.02, 0.015, 0.01))
        self.source_id = 0
        self._context = NGramIndex(min_n, max_n)
        self._sequence_id: int | None = None
        self._prompt_len = 0
        self._stored: deque[list[int]] = deque()
        self._store = NGramIndex(min_n, max_n)

    # ------------------------------------------------------------------ context tracking
    def _sync(self, ctx: DraftContext) -> None:
        if ctx.sequence_id != self._sequence_id:
            self._remember(self._context.tokens[self._prompt_len :])
            self._context = NGramIndex(self.min_n, self.max_n)
            self._sequence_id, self._prompt_len = ctx.sequence_id, ctx.prompt_len
        if len(ctx.token_ids) > len(self._context):
            self._context.extend(ctx.token_ids[len(self._context) :].tolist())

    def _remember(self, output: list[int]) -> None:
        """Add a finished output to the store, evicting the oldest beyond ``store_tokens``."""
        if not self.store_tokens or len(output) < self.min_n + 1:
            return
        self._stored.append(list(output[-(self.store_tokens - 1) :]))
        total = sum(len(s) + 1 for s in self._stored)  # +1: the boundary after each output
        if total <= self.store_tokens:
            self._store.extend(self._stored[-1] + [BOUNDARY])
            return
        while total > self.store_tokens:
            total -= len(self._stored.popleft()) + 1
        self._store = NGramIndex(self.min_n, self.max_n)
        for sequence in self._stored:
            self._store.extend(sequence + [BOUNDARY])

    # ------------------------------------------------------------------ drafting
    def propose(self, ctx: DraftContext, budget: int) -> TokenTree:
        self._sync(ctx)
        if budget <= 0:
            return TokenTree.empty()
        context = self._context.tokens
        matches: list[tuple[list[int], int]] = []  # (continuation, match length)
        for n in range(min(self.max_n, len(context)), self.min_n - 1, -1):
            suffix = tuple(context[-n:])
            room = self.max_matches - len(matches)
            for index in (self._context, self._store):
                for continuation in index.continuations(suffix, self.max_depth, room, earliest_too=self.earliest_too):
                    matches.append((continuation, n))
                room = self.max_matches - len(matches)
                if room <= 0:
                    break
            if len(matches) >= self.max_matches:
                break
        if not matches:
            return TokenTree.empty()
        return self._trie(matches).prune(budget)

    def _trie(self, matches: list[tuple[list[int], int]]) -> TokenTree:
        tokens: list[int] = []
        parents: list[int] = []
        weight: list[float] = []
        index: dict[tuple[int, int], int] = {}
        for continuation, n in matches:
            parent = ROOT
            for token in continuation:
                key = (parent, token)
                if key not in index:
                    index[key] = len(tokens)
                    tokens.append(token)
                    parents.append(parent)
                    weight.append(0.0)
                node = index[key]
                weight[node] += 1.0 + 0.01 * n  # count, longer matches break ties
                parent = node
        tree = TokenTree(torch.tensor(tokens, dtype=torch.long), torch.tensor(parents, dtype=torch.long),
                         torch.tensor(weight, dtype=torch.float32))
        return with_rank_scores(tree, self.stats.rates(), self.source_id)

    # ------------------------------------------------------------------ learning
    def observe(self, feedback: VerifyFeedback) -> None:
        if feedback.tree is not None:
            self.stats.update(feedback.tree, feedback.accepted_nodes, source=self.source_id)

    def reset(self) -> None:
        self.stats.reset()
        self._context = NGramIndex(self.min_n, self.max_n)
        self._sequence_id = None
        self._stored.clear()
        self._store = NGramIndex(self.min_n, self.max_n)

    def state_dict(self) -> dict:
        return {"stats": self.stats.state_dict(), "store": [torch.tensor(s, dtype=torch.long) for s in self._stored]}

    def load_state_dict(self, state: dict) -> None:
        self.reset()
        self.stats.load_state_dict(state["stats"])
        for sequence in state["store"]:
            self._remember(torch.as_tensor(sequence).tolist())


def with_rank_scores(tree: TokenTree, rates: np.ndarray, source: int) -> TokenTree:
    """The same tree with scores = sum of log per-(depth, rank) rates along each path.

    ``tree.ranks`` (by default derived from the input scores) index the rates.
    """
    ranks = np.minimum(tree.ranks.numpy(), rates.shape[1] - 1)
    depths = np.minimum(tree.depths.numpy(), rates.shape[0]) - 1
    edge = np.log(np.maximum(rates[depths, ranks], 1e-6))
    scores = np.empty(len(tree), dtype=np.float32)
    for node_idx, parent in enumerate(tree.parents.tolist()):
        scores[node_idx] = edge[node_idx] + (scores[parent] if parent != ROOT else 0.0)
    return TokenTree(tree.tokens, tree.parents, torch.from_numpy(scores),
                     torch.full((len(tree),), source, dtype=torch.int8), tree.ranks)
