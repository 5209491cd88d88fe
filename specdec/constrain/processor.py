"""The sequential reference: a constraint as a transformers ``LogitsProcessor``, for plain
``model.generate`` (and the oracle specdec's tree step is tested against). Each call masks the
scores of every row with the state after that row's tokens since the first call."""

from __future__ import annotations

import numpy as np
import torch
from transformers.generation.logits_process import LogitsProcessor

from specdec.constrain.constraint import Constraint
from specdec.constrain.matcher import RowMatcher, TokenConstraint, unpack_masks


class ConstraintLogitsProcessor(LogitsProcessor):
    """Masks every token ``constraint`` forbids after the tokens generated so far (-inf).

    Args:
        constraint: the `Constraint` (or an OpenAI ``response_format`` dict).
        tokenizer: the model's HF fast tokenizer.
        vocab_size: rows of the model's logits (default: the scores' width at the first call).

    One instance serves one ``model.generate`` call: the first call's ``input_ids`` length is the
    prompt. Given to specdec (``logits_processor=[...]``), it is read as ``constraint=`` at its
    place in the list, and the engine checks every tree node against it along its own path.
    """

    def __init__(self, constraint, tokenizer, vocab_size: int | None = None) -> None:
        constraint = Constraint.from_response_format(constraint, "constraint")
        if constraint is None:
            raise ValueError("constraint: {'type': 'text'} constrains nothing; pass no processor")
        self.constraint = constraint
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.prompt_len: int | None = None
        self.rows: list[RowMatcher] = []

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self.prompt_len is None:
            bound = TokenConstraint(self.constraint, self.tokenizer, self.vocab_size or scores.shape[-1])
            self.prompt_len = input_ids.shape[1]
            self.rows = [bound.start() for _ in range(input_ids.shape[0])]
        words = np.zeros((len(self.rows), self.rows[0].words), dtype=np.int32)
        for row, (matcher, ids) in enumerate(zip(self.rows, input_ids.tolist())):
            matcher.advance(ids[self.prompt_len + matcher.consumed :])
            matcher.fill_mask(words[row])
        allowed = unpack_masks(torch.from_numpy(words).to(scores.device), scores.shape[-1])  # [B, V]
        return scores.masked_fill(~allowed, float("-inf"))
