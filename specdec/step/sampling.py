"""How the target picks its token at every tree slot: logits processors per slot, then the argmax
or a draw, all on the model's device.

Logits processors (HF's ``LogitsProcessor`` protocol: ``(input_ids [B, L], scores [B, V]) -> scores``)
run at every slot of the verified tree with that slot's own history: the committed tokens plus
the tokens on its root path, exactly what plain decoding would have passed at that position.
Processors are called on rejected slots too, so they must be pure functions of their inputs
(HF's own are). Transformers' history-free warpers take one call for all slots, its row-wise
processors one call per tree depth, any other processor one call per slot.

A sampled choice is an inverse-CDF draw with one uniform number per *sequence position*, the
uniform a pure function of the request's sampling key and the position (`PositionDraws`): the
token at a position is then the same whichever tree, drafter or tree size verified it, so a seed
reproduces its sample exactly, and each token is exactly distributed as the target's
(processed) distribution. Acceptance follows the delta rule (see `specdec.step.accept`).

A tree whose tokens a drafter *drew* from its own distributions q (`trees.DraftDraws`: a draft
model's or the head's, each node's children drawn without replacement) is verified by recursive
rejection sampling instead (`accept_drawn`: multi-candidate speculative sampling in its without-
replacement form, as in Jeon et al. 2024's recursive rejection sampling): at a visited slot with
target distribution r, the i-th child x is accepted with probability min(1, r(x) / q_i(x)); on
rejection r becomes norm(max(0, r - q_i)) and q_{i+1} is q_i without x, renormalised; when no child
is accepted the token is drawn from r. Each step keeps r's distribution (the mass accepted at x is
min(q_i, r) and the residual carries the rest), so the output is exactly the target's, while a
draft q close to the target's accepts far more often than a fixed top-k child set can. The uniforms
are keyed by (position, sibling) (`PositionDraws.stage_uniforms`); which token a seed yields then
depends on the drafts, the distribution does not.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from transformers.generation import logits_process as lp

from specdec.device.reductions import row_argmax
from specdec.device.tree import DeviceTree
from specdec.step.accept import Accepted, accept


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


class ConstraintMask:
    """Where a request's output constraint masks the scores among its processors (the position
    of a logits processor given first in ``logits_processor``: after transformers' built-in
    processors, before temperature and the other warpers). The masks are the tree's own, one per
    slot from the state after the slot's root path (`specdec.constrain.RowMatcher.masks`)."""


def _call_mode(processor) -> str:
    """How a processor can be batched over tree slots: "all", "depth", "slot" (one call each) or
    "mask" (the constraint's per-slot masks)."""
    if isinstance(processor, ConstraintMask):
        return "mask"
    if isinstance(processor, HISTORY_FREE):
        return "all"
    if isinstance(processor, ROW_WISE) and getattr(processor, "prompt_ignore_length", None) is None:
        return "depth"
    return "slot"


@dataclass(frozen=True)
class NodeRule:
    """The target's choice at a slot: ``processors`` (applied in order with the slot's history),
    then the argmax (``do_sample=False``) or a draw from the softmax (``do_sample=True``)."""

    processors: list = field(default_factory=list)
    do_sample: bool = False

    def scores(self, logits: torch.Tensor, tree: DeviceTree, history: torch.Tensor,
               allowed: torch.Tensor | None = None) -> torch.Tensor:
        """``[n+1, V]`` scores the choice is made from: ``logits`` itself when no processor runs,
        else float32 processed scores, each slot with its own history (``history [L]`` on the
        device, root last) and, at the `ConstraintMask`, its own constraint mask (``allowed
        [n+1, V]`` bool on the device)."""
        processors = self.processors
        if allowed is not None and not any(isinstance(p, ConstraintMask) for p in processors):
            processors = [ConstraintMask(), *processors]  # a request built without one: the mask first
        if not processors:
            return logits
        return processed_scores(logits, tree, history, processors, allowed)

    def accept(self, tree: DeviceTree, scores: torch.Tensor) -> Accepted:
        """The accepted path: following the argmax (greedy), rejection sampling against the draft
        distributions (sampling a tree with draws) or the delta rule (sampling)."""
        if not self.do_sample:
            return accept(tree, row_argmax(scores))
        if tree.children is not None:
            return accept_drawn(tree, torch.softmax(scores.float(), dim=-1))
        return accept_sampled(tree, torch.softmax(scores.float(), dim=-1), tree.uniforms)

    def draft_warp(self):
        """What drafters apply to their logits ``[m, V]`` before drawing (the history-free
        processors: temperature, top-k, top-p, ...), or None when the target does not sample."""
        if not self.do_sample:
            return None
        warpers = [p for p in self.processors if _call_mode(p) == "all"]

        def warp(logits: torch.Tensor) -> torch.Tensor:
            dummy = torch.zeros((logits.shape[0], 1), dtype=torch.long, device=logits.device)
            for warper in warpers:
                logits = warper(dummy, logits)
            return logits

        return warp


def accept_sampled(tree: DeviceTree, probs: torch.Tensor, uniforms: torch.Tensor) -> Accepted:
    """The delta rule on the device: accept the path that follows the draws of `sampled_choices`."""
    return accept(tree, sampled_choices(tree, probs, uniforms))


def accept_drawn(tree: DeviceTree, probs: torch.Tensor) -> Accepted:
    """Recursive rejection sampling down a drawn tree (see the module docstring), on the device:
    ``probs [n+1, V]`` the target's distribution at every slot. A loop over depths and siblings
    whose indices are one-element device tensors (``index_select``, never a 0-d index, which
    would read it back): no host reads."""
    draft, children, tokens = tree.draft_probs, tree.children, tree.tokens
    device, siblings, vocab = tokens.device, children.shape[1], probs.shape[-1]
    node = torch.zeros(1, dtype=torch.long, device=device)  # [1] slot_idx of the walk's position
    residual = probs[0].double()  # [V] what the target's distribution at ``node`` has left
    walking = torch.ones(1, dtype=torch.bool, device=device)
    count = torch.ones(1, dtype=torch.long, device=device)
    nothing = torch.zeros(1, dtype=torch.float64, device=device)
    path, bonus = [node], None
    for depth in range(tree.max_depth + 1):
        q = draft.index_select(0, tree.draw_rows.index_select(0, node).clamp(min=0))[0].double()  # [V] node's draft
        kids = children.index_select(0, node)[0]  # [k] node's children in draw order (-1 after the last)
        moved = torch.zeros(1, dtype=torch.bool, device=device)
        for i in range(siblings):
            child = kids[i : i + 1]  # [1]
            token = tokens.index_select(0, child.clamp(min=0))  # [1]
            q_x, r_x = q.index_select(0, token), residual.index_select(0, token)
            live = walking & ~moved & (child >= 0) & (q_x > 0)  # a draw past q's support proposes nothing
            taken = live & (tree.stage_uniforms[depth, i : i + 1] * q_x < r_x)  # probability min(1, r/q)
            rejected = live & ~taken
            left = (residual - q).clamp(min=0)
            residual = torch.where(rejected & (left.sum() > 0), left / left.sum().clamp(min=1e-300), residual)
            q_left = q.scatter(0, token, nothing)
            q = torch.where(rejected, q_left / q_left.sum().clamp(min=1e-300), q)
            node = torch.where(taken, child, node)
            moved = moved | taken
        stopped = walking & ~moved  # the walk ends here: the bonus token is drawn from the residual
        cdf = residual.cumsum(dim=0)
        drawn = torch.searchsorted(cdf, tree.stage_uniforms[depth, siblings : siblings + 1] * cdf[-1:], right=True)
        drawn = drawn.clamp(max=vocab - 1)  # [1]
        bonus = drawn if bonus is None else torch.where(stopped, drawn, bonus)
        residual = torch.where(moved, probs.index_select(0, node)[0].double(), residual)
        walking = walking & moved
        count = count + walking.long()
        path.append(node)
    path = torch.cat(path[: tree.max_depth + 1])  # [max_depth+1]: entries past count repeat the tip
    block = torch.cat([tokens.index_select(0, path[1:]), bonus])
    block = block.scatter(0, count - 1, bonus)  # the bonus right after the path
    return Accepted(path=path, block=block, count=count[0])


def sampled_choices(tree: DeviceTree, probs: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """``[n+1]``: at every slot draw ``y`` from ``probs [n+1, V]`` by inverting its CDF at the
    uniform of the slot's position (``uniforms [max_depth+1]`` float64, one per depth: the slot's
    position is the committed length plus its depth)."""
    cdf = probs.double().cumsum(dim=-1)  # [n+1, V]
    targets = (uniforms[tree.depths] * cdf[:, -1])[:, None]  # [n+1, 1], below each row's total
    choices = torch.searchsorted(cdf, targets, right=True).squeeze(-1)
    return choices.clamp_(max=probs.shape[-1] - 1)


_MASK64 = (1 << 64) - 1


def _mix64(x: int) -> int:
    """splitmix64's finaliser: a bijective, well-mixed 64-bit hash."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


class PositionDraws:
    """The uniform numbers a sampled generation draws from: one per sequence position, a pure
    function of ``key`` and the position (no state, so the order in which positions are
    verified, and how many are, never changes a draw).

    Args:
        key: the request's sampling key (`sampling_key` makes one from a seed or a generator).
    """

    def __init__(self, key: int) -> None:
        self.key = _mix64(key & _MASK64)

    def uniforms(self, first: int, count: int) -> torch.Tensor:
        """``[count]`` float64 uniforms in [0, 1) for positions ``first .. first + count - 1`` (host)."""
        return torch.tensor([(_mix64(self.key ^ _mix64(position)) >> 11) * 2.0**-53
                             for position in range(first, first + count)], dtype=torch.float64)

    def stage_uniforms(self, first: int, count: int, stages: int) -> torch.Tensor:
        """``[count, stages]`` float64 uniforms in [0, 1): one per (position, stage) of rejection
        sampling, independent of `uniforms` and of each other (host)."""
        return torch.tensor([[(_mix64(self.key ^ _mix64(_mix64(position) ^ (stage + 1))) >> 11) * 2.0**-53
                              for stage in range(stages)] for position in range(first, first + count)],
                            dtype=torch.float64)

    def draft_seed(self, position: int) -> int:
        """A seed for the drafts of the tree below ``position``: drawn tokens repeat with the
        request's key, independent of every uniform the target's acceptance uses."""
        return _mix64(self.key ^ _mix64(position ^ (1 << 62))) >> 1


def sampling_key(generator: torch.Generator | int | None) -> int:
    """A request's sampling key: an int seed as given, else one draw from ``generator`` (or from
    torch's global generator, as ``torch.manual_seed`` seeds it), so that consecutive requests on
    one generator differ and the same generator state repeats them."""
    if isinstance(generator, int):
        return generator
    device = generator.device if generator is not None else "cpu"
    return int(torch.randint(0, 2**62, (1,), generator=generator, device=device))  # once per request


def slot_histories(tree: DeviceTree, history: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``(slots [g], input_ids [g, L + d])`` per depth ``d``, on the device: each slot's committed
    history plus the tokens on its root path (its own token included, since its logits predict
    the token after it)."""
    groups = []
    for depth in range(tree.max_depth + 1):
        slots = tree.by_depth[tree.depth_starts[depth] : tree.depth_starts[depth + 1]]  # [g]
        ids = history[None].expand(slots.numel(), -1)
        if depth:
            path_tokens = tree.tokens[tree.paths[slots, 1 : depth + 1]]  # [g, d]
            ids = torch.cat([ids, path_tokens], dim=1)
        groups.append((slots, ids))
    return groups


def processed_scores(logits: torch.Tensor, tree: DeviceTree, history: torch.Tensor, processors,
                     allowed: torch.Tensor | None = None) -> torch.Tensor:
    """``[n+1, V]`` float32 scores at every slot after ``processors``, each slot with its own history
    (and its own ``allowed`` tokens at a `ConstraintMask`)."""
    scores = logits.to(torch.float32, copy=True)
    groups = None
    for processor in processors:
        mode = _call_mode(processor)
        if mode == "mask":
            scores = scores.masked_fill(~allowed, float("-inf"))
            continue
        if mode == "all":
            scores = processor(history[None].expand(scores.shape[0], -1), scores)
            continue
        groups = groups if groups is not None else slot_histories(tree, history)
        for slots, ids in groups:
            if mode == "depth":
                scores[slots] = processor(ids, scores[slots])
            else:
                for row in range(slots.numel()):
                    slot = slots[row : row + 1]
                    scores[slot] = processor(ids[row : row + 1], scores[slot])
    return scores
