"""How the target picks its token at every tree node: logits processors per node, then argmax or a draw.

Logits processors (HF's ``LogitsProcessor`` protocol: ``(input_ids [B, L], scores [B, V]) -> scores``)
run at every slot of the verified tree with that slot's own history: the committed tokens plus
the tokens on its root path, which is exactly what plain decoding would have passed at that
position. Processors are called on rejected nodes too, so they must be pure functions of their
inputs (HF's own are).

Sampled verification uses the delta rule, because specdec's drafters choose candidates without
sampling (recycled successors, copied n-grams, top-k of a draft model): at a slot, draw ``y`` from
the target's processed distribution; if a child carries ``y``, move there and repeat, otherwise
emit ``y`` and stop. Each draw is fresh and the tree never depends on the draws, so the emitted
tokens are distributed exactly as ancestral sampling from the target.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from transformers.generation import logits_process as lp

from specdec.verify import Acceptance, accept_greedy
from trees import TokenTree


def _classes(*names: str) -> tuple[type, ...]:
    """The processor classes this transformers version has, by name."""
    return tuple(getattr(lp, name) for name in names if hasattr(lp, name))


# Ignore input_ids: one call covers every slot.
HISTORY_FREE = _classes(
    "TemperatureLogitsWarper", "TopKLogitsWarper", "TopPLogitsWarper", "MinPLogitsWarper", "TopHLogitsWarper",
    "TypicalLogitsWarper", "EpsilonLogitsWarper", "EtaLogitsWarper", "LogitNormalization",
    "InfNanRemoveLogitsProcessor", "SuppressTokensLogitsProcessor",
)
# Row-wise functions of (history, scores) with no per-row state: one call per tree depth.
ROW_WISE = _classes(
    "RepetitionPenaltyLogitsProcessor", "NoRepeatNGramLogitsProcessor", "NoBadWordsLogitsProcessor",
    "SequenceBiasLogitsProcessor", "MinLengthLogitsProcessor", "MinNewTokensLengthLogitsProcessor",
    "ForcedEOSTokenLogitsProcessor", "ForcedBOSTokenLogitsProcessor", "SuppressTokensAtBeginLogitsProcessor",
    "ExponentialDecayLengthPenalty",
)


@dataclass(frozen=True)
class NodeRule:
    """The target's choice at a node: ``processors`` (applied in order with the node's history),
    then the argmax (``do_sample=False``) or a draw from the softmax (``do_sample=True``)."""

    processors: list = field(default_factory=list)
    do_sample: bool = False

    @property
    def is_plain_greedy(self) -> bool:
        return not self.do_sample and not self.processors


def _call_mode(processor) -> str:
    """How a processor can be batched over tree slots: "all", "depth" or "slot" (one call each)."""
    if isinstance(processor, HISTORY_FREE):
        return "all"
    if isinstance(processor, ROW_WISE) and getattr(processor, "prompt_ignore_length", None) is None:
        return "depth"
    return "slot"


def slot_histories(tree: TokenTree, committed: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``(slot_idx [g], input_ids [g, L + d])`` per depth ``d``: each slot's committed history plus
    its root path (a node's own token included, since its logits predict the token after it)."""
    by_depth: dict[int, list[int]] = {0: [0]}
    for node_idx, depth in enumerate(tree.depths.tolist()):
        by_depth.setdefault(depth, []).append(node_idx + 1)
    groups = []
    for depth, slots in sorted(by_depth.items()):
        if depth == 0:
            ids = committed[None]
        else:
            paths = torch.stack([tree.tokens[tree.path_to(slot - 1)] for slot in slots])  # [g, d]
            ids = torch.cat([committed[None].expand(len(slots), -1), paths], dim=1)
        groups.append((torch.tensor(slots), ids))
    return groups


def processed_scores(logits: torch.Tensor, tree: TokenTree, committed: torch.Tensor, processors) -> torch.Tensor:
    """``[n+1, V]`` float32 scores at every slot after ``processors``, each slot with its own history.

    ``committed`` (``[L]``, root last) is the history of the root slot.
    """
    scores = logits.to(torch.float32, copy=True)
    groups = None
    for processor in processors:
        mode = _call_mode(processor)
        if mode == "all":
            scores = processor(committed[None].expand(scores.shape[0], -1), scores)
            continue
        groups = groups if groups is not None else slot_histories(tree, committed)
        for slots, ids in groups:
            if mode == "depth":
                scores[slots] = processor(ids, scores[slots])
            else:
                for slot, row_ids in zip(slots.tolist(), ids):
                    scores[slot : slot + 1] = processor(row_ids[None], scores[slot : slot + 1])
    return scores


def choose(tree: TokenTree, logits: torch.Tensor, committed: torch.Tensor, rule: NodeRule | None,
           generator: torch.Generator | None = None) -> tuple[Acceptance, torch.Tensor | None]:
    """Accept a path of ``tree`` given the verify logits ``[n+1, V]``.

    Returns the acceptance and the processed scores ``[n+1, V]`` (``None`` when no processor ran:
    the scores are the logits).
    """
    if rule is None or rule.is_plain_greedy:
        return accept_greedy(tree, logits.argmax(-1).tolist()), None
    scores = processed_scores(logits, tree, committed, rule.processors)
    if not rule.do_sample:
        return accept_greedy(tree, scores.argmax(-1).tolist()), scores
    return accept_sampled(tree, torch.softmax(scores, dim=-1), generator), scores


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
