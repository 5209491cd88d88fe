"""Logits processing per tree node, and sampled verification that preserves the target's distribution.

specdec's drafters choose candidates without sampling (recycled successors, copied n-grams, top-k
of a draft model), so verification uses the delta rule: at a node, sample ``y`` from the target's
processed distribution; if a child carries ``y``, move there and repeat, otherwise emit ``y`` and
stop. Each draw is fresh, and the tree never depends on the draws, so the emitted tokens are
distributed exactly as ancestral sampling from the target.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.generation.logits_process import (
    LogitsProcessorList,
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from specdec.verify import Acceptance, accept_greedy
from trees import TokenTree


@dataclass(frozen=True)
class SamplingConfig:
    """How the target's next token is chosen at every node (validated on construction).

    ``do_sample=False`` is greedy (argmax after the history processors, e.g. repetition penalty);
    ``do_sample=True`` samples after the history processors and the warpers, as HF's generate does.
    """

    do_sample: bool = False
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None

    def __post_init__(self) -> None:
        if self.do_sample and not self.temperature > 0:
            raise ValueError(f"temperature must be > 0 when sampling, got {self.temperature}")
        if self.top_k is not None and (not isinstance(self.top_k, int) or self.top_k < 0):
            raise ValueError(f"top_k must be a non-negative int, got {self.top_k!r}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.min_p is not None and not 0 <= self.min_p <= 1:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
        if self.repetition_penalty is not None and not self.repetition_penalty > 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")

    def processors(self) -> tuple[LogitsProcessorList, LogitsProcessorList]:
        """(history-dependent processors, warpers), in the order HF's generate applies them."""
        history = LogitsProcessorList()
        if self.repetition_penalty is not None and self.repetition_penalty != 1.0:
            history.append(RepetitionPenaltyLogitsProcessor(self.repetition_penalty))
        warpers = LogitsProcessorList()
        if not self.do_sample:
            return history, warpers
        if self.temperature != 1.0:
            warpers.append(TemperatureLogitsWarper(self.temperature))
        if self.top_k:
            warpers.append(TopKLogitsWarper(self.top_k))
        if self.top_p is not None and self.top_p < 1.0:
            warpers.append(TopPLogitsWarper(self.top_p))
        if self.min_p:
            warpers.append(MinPLogitsWarper(self.min_p))
        return history, warpers


def processed_scores(
    logits: torch.Tensor, tree: TokenTree, committed: torch.Tensor, config: SamplingConfig
) -> torch.Tensor:
    """``[n+1, V]`` float32 scores at every slot after the logits processors.

    ``committed`` (``[L]``, root last) is the history of the root slot; a node's history is that
    plus the tokens on its root path, so history-dependent processors see exactly what plain
    decoding would have seen there.
    """
    history, warpers = config.processors()
    scores = logits.float()
    if history:
        rows = []
        for slot in range(len(tree) + 1):
            path = tree.tokens[tree.path_to(slot - 1)] if slot else tree.tokens[:0]
            ids = torch.cat([committed, path])[None]  # [1, L + depth]
            rows.append(history(ids, scores[slot : slot + 1]))
        scores = torch.cat(rows)
    if warpers:
        scores = warpers(committed[None].expand(scores.shape[0], -1), scores)
    return scores


def choose(tree: TokenTree, logits: torch.Tensor, committed: torch.Tensor, config: SamplingConfig | None,
           generator: torch.Generator | None = None) -> Acceptance:
    """Accept a path of ``tree`` given the verify logits ``[n+1, V]``: greedy or sampled."""
    if config is None:
        return accept_greedy(tree, logits.argmax(-1).tolist())
    scores = processed_scores(logits, tree, committed, config)
    if not config.do_sample:
        return accept_greedy(tree, scores.argmax(-1).tolist())
    return accept_sampled(tree, torch.softmax(scores, dim=-1), generator)


def accept_sampled(tree: TokenTree, probs: torch.Tensor, generator: torch.Generator | None = None) -> Acceptance:
    """The delta-rule walk: draw at a slot, follow the child with that token, else stop there."""
    children = tree.children()
    tokens = tree.tokens.tolist()
    slot = 0
    accepted: list[int] = []
    while True:
        drawn = int(torch.multinomial(probs[slot], 1, generator=generator))
        nxt = next((c for c in children[slot] if tokens[c] == drawn), None)
        if nxt is None:
            return Acceptance(tuple(accepted), drawn)
        accepted.append(nxt)
        slot = nxt + 1
