"""A constraint running beside one sequence: its llguidance matcher at the committed tokens, the
token masks of a tree's nodes (each given its own root path), and the tokens the grammar forces.

Masks are bit-packed as llguidance writes them: ``[rows, ceil(V / 32)]`` int32, bit ``t % 32`` of
word ``t // 32`` set when token ``t`` is allowed. A state whose mask would allow nothing (the
matcher failed) allows the end-of-sequence token instead, so generation ends rather than emitting
an arbitrary token; the sequential reference (`specdec.constrain.processor`) does the same.
"""

from __future__ import annotations

import threading
import weakref

import llguidance
import llguidance.hf
import numpy as np
import torch

from specdec.constrain.constraint import Constraint, ConstraintError
from trees import TokenTree

_tokenizers: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # HF tokenizer -> {vocab size: LLTokenizer}
_tokenizers_guard = threading.Lock()


def grammar_tokenizer(tokenizer, vocab_size: int) -> llguidance.LLTokenizer:
    """llguidance's view of the HF fast ``tokenizer`` for logits of ``vocab_size`` rows (built once
    per tokenizer and size: about 0.4 s for a 49k vocabulary)."""
    if tokenizer is None:
        raise ValueError("a constraint needs the model's tokenizer: pass tokenizer= (or build the decoder with one)")
    with _tokenizers_guard:
        sizes = _tokenizers.setdefault(tokenizer, {})
        if vocab_size not in sizes:
            eos = tokenizer.eos_token_id
            if eos is None:
                raise ValueError("a constraint needs a tokenizer with an eos_token_id (generation ends there)")
            try:
                sizes[vocab_size] = llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab_size)
            except ValueError as err:
                raise ValueError(f"a constraint needs a fast (Rust) Hugging Face tokenizer: {err}") from None
        return sizes[vocab_size]


def mask_words(vocab_size: int) -> int:
    """int32 words of one packed mask row."""
    return (vocab_size + 31) // 32


def unpack_masks(words: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """``[m, W]`` int32 packed masks -> ``[m, vocab_size]`` bool (on ``words``' device)."""
    bits = torch.arange(32, dtype=torch.int32, device=words.device)
    return ((words[:, :, None] >> bits) & 1).flatten(1)[:, :vocab_size].bool()


class TokenConstraint:
    """A `Constraint` bound to a model's tokenizer: what a request carries; `start` makes each
    sequence's matcher.

    Args:
        constraint: the compiled constraint.
        tokenizer: the model's HF fast tokenizer.
        vocab_size: rows of the model's logits.
    """

    def __init__(self, constraint: Constraint, tokenizer, vocab_size: int) -> None:
        self.constraint = constraint
        self.tokenizer = grammar_tokenizer(tokenizer, vocab_size)
        failed, messages = llguidance.LLMatcher.validate_grammar_with_warnings(constraint.grammar, self.tokenizer)
        if failed:
            raise ConstraintError("constraint", f"not usable with this tokenizer: {messages[0]}")
        self.vocab_size = vocab_size
        self.eos_id = int(tokenizer.eos_token_id)
        self._ready: RowMatcher | None = self._matcher()  # built here, where the request is prepared

    def start(self) -> RowMatcher:
        """A matcher at the start of the output (the first one was built with the constraint)."""
        matcher, self._ready = self._ready, None
        return matcher if matcher is not None else self._matcher()

    def _matcher(self) -> RowMatcher:
        return RowMatcher(self.constraint, self.tokenizer, self.vocab_size, self.eos_id)


class RowMatcher:
    """One sequence's constraint: a matcher that has consumed exactly the sequence's committed new
    tokens (the prompt is not constrained).

    Args:
        constraint: the compiled `Constraint`.
        tokenizer: `grammar_tokenizer`'s view of the model's tokenizer.
        vocab_size: rows of the model's logits.
        eos_id: the token a dead end allows.
    """

    def __init__(self, constraint: Constraint, tokenizer: llguidance.LLTokenizer, vocab_size: int,
                 eos_id: int) -> None:
        self.matcher = llguidance.LLMatcher(tokenizer, constraint.grammar)
        if self.matcher.is_error():
            raise ValueError(f"constraint: {self.matcher.get_error()}")
        self.vocab_size = vocab_size
        self.eos_id = eos_id
        self.words = mask_words(vocab_size)
        self.consumed = 0  # committed tokens seen
        self.ended = False  # an EOS was committed

    # ------------------------------------------------------------------ committed state
    def advance(self, tokens: list[int]) -> None:
        """Consume newly committed ``tokens`` (each was allowed by its mask). The output ends at the
        first EOS: later tokens (a batch's padding) are counted and ignored."""
        for token in tokens:
            self.consumed += 1
            if self.ended:
                continue
            if token == self.eos_id:  # allowed where the grammar may end (or at a dead end): output ends
                self.ended = True
                continue
            if not self.matcher.consume_token(token):
                raise RuntimeError(f"constraint rejected committed token {token}: {self.matcher.get_error()}")

    def fill_mask(self, row: np.ndarray) -> None:
        """Write the mask of the matcher's current state into ``row`` (``[W]`` int32, C-contiguous):
        after an EOS (when EOS does not end the generation) and at a dead end, EOS alone."""
        if self.ended:
            self.eos_only(row)
            return
        self.matcher.unsafe_compute_mask_ptr(row.ctypes.data, row.nbytes)
        if not row.any():
            self.eos_only(row)

    def eos_only(self, row: np.ndarray) -> None:
        row[:] = 0
        row.view(np.uint32)[self.eos_id // 32] = np.uint32(1 << (self.eos_id % 32))

    # ------------------------------------------------------------------ trees
    def shape(self, tree: TokenTree, source: int, limit: int) -> TokenTree:
        """``tree`` without the nodes the constraint forbids (a child whose token its parent's state
        refuses can never be the target's choice, nor can anything below it), plus the grammar
        drafter's proposals: below the root and below every kept node, the tokens the grammar forces
        there (`compute_ff_tokens`; after the grammar's end, the EOS token), unless that node already
        has them as a child, at most ``limit`` nodes in all, each scored as its parent (``source``
        marks them)."""
        tokens, scores = tree.tokens.tolist(), tree.scores.tolist()
        children = tree.children()
        keep = np.zeros(len(tree), dtype=bool)
        forced: list[tuple[int, list[int], float]] = []  # (parent node_idx, chain, score)
        room = limit

        def visit(slot: int, score: float) -> None:  # the matcher stands at ``slot``'s state
            nonlocal room
            chain = self.forced_tokens(room)
            if chain and not any(tokens[child] == chain[0] for child in children[slot]):
                forced.append((slot - 1, chain, score))
                room -= len(chain)
            for child in children[slot]:
                if tokens[child] == self.eos_id:  # the output's end: nothing below it is kept
                    keep[child] = self.eos_allowed()
                elif not self.ended and self.matcher.try_consume_tokens([tokens[child]]) == 1:
                    keep[child] = True
                    visit(child + 1, scores[child])
                    self.matcher.rollback(1)

        visit(0, 0.0)
        kept = tree.select(keep) if not keep.all() else tree
        if not forced:
            return kept
        index = np.cumsum(keep) - 1  # old node_idx -> kept node_idx
        tokens, parents = kept.tokens.tolist(), kept.parents.tolist()
        scores, sources, ranks = kept.scores.tolist(), kept.sources.tolist(), kept.ranks.tolist()
        for parent, chain, score in forced:
            parent_idx = -1 if parent < 0 else int(index[parent])
            for token in chain:
                tokens.append(token)
                parents.append(parent_idx)
                scores.append(score)
                sources.append(source)
                ranks.append(0)  # the grammar's only candidate there
                parent_idx = len(tokens) - 1
        return TokenTree(torch.tensor(tokens), torch.tensor(parents), torch.tensor(scores),
                         torch.tensor(sources, dtype=torch.int8), torch.tensor(ranks))

    def eos_allowed(self) -> bool:
        """Whether the output may end at the matcher's state (the grammar is satisfied, or nothing
        else is allowed)."""
        if self.ended or self.matcher.is_accepting() or self.matcher.is_stopped():
            return True
        row = np.zeros(self.words, dtype=np.int32)
        self.fill_mask(row)
        return bool(row.view(np.uint32)[self.eos_id // 32] >> np.uint32(self.eos_id % 32) & 1)

    def forced_tokens(self, limit: int) -> list[int]:
        """Up to ``limit`` tokens the grammar forces from the matcher's state."""
        if limit <= 0:
            return []
        if self.ended or self.matcher.is_stopped():
            return [self.eos_id]
        return self.matcher.compute_ff_tokens()[:limit]

    def masks(self, tree: TokenTree) -> np.ndarray:
        """``[n+1, W]`` int32 packed masks of ``tree``'s slots (slot 0 = root), each from the state
        after the slot's own root path; every node must be allowed (a `shape`'d tree)."""
        out = np.zeros((len(tree) + 1, self.words), dtype=np.int32)
        tokens, children = tree.tokens.tolist(), tree.children()

        def visit(slot: int) -> None:
            self.fill_mask(out[slot])
            for child in children[slot]:
                if tokens[child] == self.eos_id:  # past the output's end: EOS alone
                    self.eos_only(out[child + 1])
                    continue
                if not self.matcher.consume_token(tokens[child]):
                    raise RuntimeError(f"constraint refused tree token {tokens[child]}: {self.matcher.get_error()}")
                visit(child + 1)
                self.matcher.rollback(1)

        visit(0)
        return out

