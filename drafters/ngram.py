"""N-gram / suffix-match drafter: copy what followed earlier occurrences of the recent suffix.

Matching runs against the current context (prompt + generated text) and, optionally, a bounded
store of this drafter's previous outputs, so content repeated across requests is drafted too.
"""

from __future__ import annotations

import bisect
from collections import OrderedDict, deque

import numpy as np
import torch

from drafters.base import DraftContext, Drafter, VerifyFeedback
from drafters.stats import AcceptanceStats
from trees import ROOT, TokenTree

BOUNDARY = -1  # separates sequences in the store; never part of a match


class NGramIndex:
    """End positions of every n-gram (``min_n <= n <= max_n``) of a growing token sequence.

    Positions are absolute (they never shift). ``extend`` costs O(max_n) dictionary updates per
    appended token; ``matches`` costs O(max_n) lookups plus the continuations it returns;
    ``evict_front`` forgets the oldest tokens in amortised O(max_n) per token. Nothing scans the
    sequence per step.
    """

    def __init__(self, min_n: int, max_n: int) -> None:
        self.min_n, self.max_n = min_n, max_n
        self._tokens: list[int] = []
        self._offset = 0  # absolute position of self._tokens[0]
        self.start = 0  # absolute position of the oldest live token
        self.ends: dict[tuple[int, ...], list[int]] = {}  # ascending absolute end positions
        self._first: dict[tuple[int, ...], int] = {}  # per key: index of its first live end position

    def __len__(self) -> int:
        """Absolute length: every token ever appended, evicted ones included."""
        return self._offset + len(self._tokens)

    @property
    def tokens(self) -> list[int]:
        """The live tokens (oldest first)."""
        return self._tokens[self.start - self._offset :]

    def token(self, position: int) -> int:
        return self._tokens[position - self._offset]

    def extend(self, tokens) -> None:
        for token in tokens:
            self._tokens.append(int(token))
            end = len(self) - 1
            for key in self._keys_ending_at(end, self.start):
                self.ends.setdefault(key, []).append(end)

    def _keys_ending_at(self, end: int, floor: int):
        """The indexed n-grams ending at ``end`` that start at or after ``floor``."""
        for n in range(self.min_n, self.max_n + 1):
            if end + 1 - n < floor:
                return
            key = tuple(self._tokens[end - n + 1 - self._offset : end + 1 - self._offset])
            if BOUNDARY in key:
                return
            yield key

    def evict_front(self, count: int) -> None:
        """Forget the ``count`` oldest live tokens. Callers evict whole sequences (up to and
        including their boundary) so that no live n-gram starts in the evicted part."""
        origin = self.start  # what `extend` saw as the floor of these n-grams
        for position in range(origin, min(origin + count, len(self))):
            for key in self._keys_ending_at(position, origin):
                first = self._first.get(key, 0) + 1
                positions = self.ends[key]
                if first == len(positions):
                    del self.ends[key]
                    self._first.pop(key, None)
                elif first > 32 and 2 * first > len(positions):
                    del positions[:first]
                    self._first.pop(key, None)
                else:
                    self._first[key] = first
            self.start = position + 1
        if self.start - self._offset > max(64, len(self._tokens) // 2):
            del self._tokens[: self.start - self._offset]
            self._offset = self.start

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
        before = len(self) - 1 if before is None else before
        first = self._first.get(suffix, 0)
        usable = ends[first : bisect.bisect_left(ends, before, lo=first)]  # ends are ascending
        order = _alternate(usable) if earliest_too else reversed(usable)
        found = []
        for end in order:
            continuation = self._tokens[end + 1 - self._offset : end + 1 + depth - self._offset]
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
        self._contexts: OrderedDict[int, tuple[NGramIndex, int]] = OrderedDict()  # sequence_id -> (index, prompt_len)
        self._stored: deque[int] = deque()  # lengths of the stored outputs, oldest first
        self._stored_total = 0  # tokens in the store, one boundary per output included
        self._store = NGramIndex(min_n, max_n)

    # ------------------------------------------------------------------ context tracking
    # Sequences decoded concurrently (chat sessions on threads) keep their own context index.
    MAX_OPEN_SEQUENCES = 16

    def _sync(self, ctx: DraftContext) -> NGramIndex:
        """The context index of ``ctx``'s sequence, extended to its committed tokens."""
        entry = self._contexts.get(ctx.sequence_id)
        if entry is None or len(ctx.token_ids) < len(entry[0]):
            entry = (NGramIndex(self.min_n, self.max_n), ctx.prompt_len)
            self._contexts[ctx.sequence_id] = entry
            while len(self._contexts) > self.MAX_OPEN_SEQUENCES:  # abandoned without end_sequence
                self.end_sequence(next(iter(self._contexts)))
        self._contexts.move_to_end(ctx.sequence_id)
        index = entry[0]
        if len(ctx.token_ids) > len(index):
            index.extend(ctx.token_ids[len(index) :].tolist())
        return index

    def end_sequence(self, sequence_id: int) -> None:
        """Move the finished sequence's output into the cross-request store."""
        entry = self._contexts.pop(sequence_id, None)
        if entry is not None:
            index, prompt_len = entry
            self._remember(index.tokens[prompt_len:])

    def _remember(self, output: list[int]) -> None:
        """Add a finished output to the store, evicting the oldest outputs beyond ``store_tokens``
        (incrementally: amortised O(max_n) per token, whatever the store size)."""
        if not self.store_tokens or len(output) < self.min_n + 1:
            return
        output = list(output[-(self.store_tokens - 1) :])
        self._store.extend(output + [BOUNDARY])
        self._stored.append(len(output) + 1)  # +1: the boundary after each output
        self._stored_total += len(output) + 1
        while self._stored_total > self.store_tokens:
            evicted = self._stored.popleft()
            self._store.evict_front(evicted)
            self._stored_total -= evicted

    # ------------------------------------------------------------------ drafting
    def propose(self, ctx: DraftContext, budget: int) -> TokenTree:
        index = self._sync(ctx)
        if budget <= 0:
            return TokenTree.empty()
        context = index.tokens
        matches: list[tuple[list[int], int]] = []  # (continuation, match length)
        for n in range(min(self.max_n, len(context)), self.min_n - 1, -1):
            suffix = tuple(context[-n:])
            room = self.max_matches - len(matches)
            for source in (index, self._store):
                for continuation in source.continuations(suffix, self.max_depth, room, earliest_too=self.earliest_too):
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
        self._contexts.clear()
        self._stored.clear()
        self._stored_total = 0
        self._store = NGramIndex(self.min_n, self.max_n)

    def stored_outputs(self) -> list[list[int]]:
        """The outputs in the cross-request store, oldest first."""
        tokens = self._store.tokens
        outputs, start = [], 0
        for length in self._stored:
            outputs.append(tokens[start : start + length - 1])
            start += length
        return outputs

    def state_dict(self) -> dict:
        return {"stats": self.stats.state_dict(), "vocab_size": self.vocab_size,
                "store": [torch.tensor(s, dtype=torch.long) for s in self.stored_outputs()]}

    def load_state_dict(self, state: dict) -> None:
        """Restore `state_dict` output; the vocabulary, the statistics and every stored id are
        validated before the drafter changes."""
        from drafters.state import StateError, check_array, check_vocab_size, field

        where = "n-gram state"
        if self.vocab_size is not None or state.get("vocab_size") is not None:
            check_vocab_size(state, self.vocab_size, where)
        stats = AcceptanceStats(prior=self.stats.prior)
        stats.load_state_dict(field(state, "stats", where))
        store = field(state, "store", where)
        if not isinstance(store, (list, tuple)):
            raise StateError(f"{where}: store must be a list of token-id tensors, got {type(store).__name__}")
        high = None if self.vocab_size is None else self.vocab_size - 1
        outputs = [check_array(s, f"{where}: store[{i}]", (None,), "int", low=0, high=high).tolist()
                   for i, s in enumerate(store)]
        self.reset()
        self.stats = stats
        for output in outputs:
            self._remember(output)


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
    return tree.with_scores(torch.from_numpy(scores), source)
