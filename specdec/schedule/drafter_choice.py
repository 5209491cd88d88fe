"""Which drafters of a hybrid run at all: each must save more time than it costs.

Drafting and merging cost host time every step, and a drafter's nodes cost verify time, whether
or not they are accepted. Per step the hybrid reports, for each member that proposed
(`drafters.hybrid.DrafterUsage`), its ``propose`` seconds and the verified and accepted nodes that
member alone proposed (what the step would not have had without it). A member's net worth per
step, in seconds::

    own accepted tokens x seconds per token          (the time those tokens would take otherwise)
    - its propose seconds - its share of the merge   (host time)
    - own verified nodes a row x seconds per node     (the verify forward's marginal cost)

with seconds per token the step's wall time over the tokens it emitted (keeping a member is worth
it exactly when the step's rate with it beats the rate without: its tokens and its seconds taken
away), and the seconds per node the scheduler's fitted cost curve (the same measurements) adds
between a one-node tree and this step's size: the price of a tree at all is not charged to
whichever member filled it, since without it the others' nodes would fill it. Each is an
exponentially decayed average over the steps the member ran (its first step, which may compile,
not counted). A member whose average is below zero by two standard errors is skipped: it proposes
in shadow (its tree neither merged nor verified; the hybrid credits it, once the sequence commits
the tokens, with what its tree, cut to the verified tree's size, would have added, and charges
the nodes that tree lacked), so it is measured while skipped and comes back as soon as it would pay
(a drafter's worth moves with the text: an n-gram drafter pays on a repetitive document, not on a
poem; Token Recycling pays once its matrix fills). Skipping saves its merge and its verified
nodes, the bulk of its cost; its drafting goes on while that is cheap (at most ``SHADOW_SHARE`` of
a step), else it drafts in shadow every `probe_every` steps, its figures from before aged by the
steps it sat out. Figures are per machine and dtype, since they are measured on them.
"""

from __future__ import annotations

from dataclasses import dataclass

MIN_STEPS = 8  # steps a member runs before its average may skip it
SHADOW_SHARE = 0.02  # a skipped member whose drafting costs at most this share of a step drafts in shadow every step


@dataclass
class _Worth:
    """One member's decayed figures (per step it drafted), in seconds."""

    value: float = 0.0
    propose: float = 0.0
    merge: float = 0.0
    verify: float = 0.0
    net_squared: float = 0.0  # of the per-step net: its spread says how sure the average is
    steps: int = 0
    warm: bool = False  # its first step is not counted: a drafter's first call may compile (numba) or load
    skipped_for: int = 0  # steps since it last drafted, while skipped
    gap: int = 0  # steps it had not drafted before this one

    @property
    def net(self) -> float:
        return self.value - self.propose - self.merge - self.verify

    def loses(self, decay: float) -> bool:
        """Whether it is measured and its average net is below zero by two standard errors (a
        decayed average weighs about (1 + decay) / (1 - decay) steps): a drafter whose worth comes
        in bursts (the n-gram drafter on a document it copies from) is not skipped between them."""
        error = (max(self.net_squared - self.net ** 2, 0.0) * (1.0 - decay) / (1.0 + decay)) ** 0.5
        return self.steps >= MIN_STEPS and self.net + 2.0 * error < 0.0


class DrafterChoice:
    """Decides, step by step, which members of a hybrid propose into the tree and which in shadow
    (`choose`), from what each cost and brought (`record`).

    Args:
        decay: weight of the past per recorded step (0.98: about the last fifty steps count).
        probe_every: a skipped member whose drafting is not cheap drafts in shadow once this many steps.
    """

    def __init__(self, decay: float = 0.98, probe_every: int = 16) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"decay must be in (0, 1), got {decay}")
        if probe_every < 1:
            raise ValueError(f"probe_every must be >= 1, got {probe_every}")
        self.decay, self.probe_every = decay, probe_every
        self._worth: dict[int, _Worth] = {}
        self._step_seconds = 0.0  # decayed average of a recorded step's wall seconds
        self.skips = 0  # member-steps skipped, in all

    def choose(self, sources: list[int]) -> tuple[frozenset[int], frozenset[int]]:
        """The members of ``sources`` that propose into this step's tree (those that pay, or are
        still being measured) and those that propose in shadow (skipped ones, every step while
        their drafting is cheap, else when their probe is due)."""
        running, shadowed = [], []
        for source in sources:
            worth = self._worth.setdefault(source, _Worth())
            if not worth.loses(self.decay):
                running.append(source)
            else:
                self.skips += 1
                if worth.propose > SHADOW_SHARE * self._step_seconds and worth.skipped_for + 1 < self.probe_every:
                    worth.skipped_for += 1
                    continue
                shadowed.append(source)
            worth.gap, worth.skipped_for = worth.skipped_for, 0
        return frozenset(running), frozenset(shadowed)

    def record(self, usage, step_seconds: float, tokens: int, rows: int, node_seconds: float) -> None:
        """One step: ``usage`` (a `drafters.hybrid.DrafterUsage`), the step's wall seconds and the
        tokens it emitted over its ``rows`` rows, and the fitted seconds one more node a row adds
        to a forward of this step's tree size."""
        if not usage.propose_seconds or tokens <= 0:
            return
        self._step_seconds += (1.0 - self.decay) * (step_seconds - self._step_seconds) if self._step_seconds \
            else step_seconds
        per_token = step_seconds / tokens
        merged = [source for source in usage.propose_seconds if source not in usage.shadowed]
        merge_share = usage.merge_seconds / (len(merged) - 1) if len(merged) > 1 else 0.0
        for source, seconds in usage.propose_seconds.items():
            worth = self._worth.setdefault(source, _Worth())
            if not worth.warm:
                worth.warm = True
                continue
            step = {"value": usage.own_accepted.get(source, 0) * per_token, "propose": seconds,
                    "merge": worth.merge if source in usage.shadowed else merge_share,  # a shadow merged nothing
                    "verify": usage.own_verified.get(source, 0) / rows * node_seconds}
            weight = 1.0 - self.decay ** (1 + worth.gap) if worth.steps else 1.0  # steps sat out age the past
            worth.gap = 0
            step["net_squared"] = (step["value"] - step["propose"] - step["merge"] - step["verify"]) ** 2
            for name, figure in step.items():
                setattr(worth, name, getattr(worth, name) + weight * (figure - getattr(worth, name)))
            worth.steps += 1

    def explain(self, names: dict[int, str] | None = None) -> dict:
        """Per member (by name): its figures in ms per step it drafted, and whether it runs now."""
        names = names or {}
        return {names.get(source, str(source)): {
            "value_ms": round(1e3 * w.value, 3), "propose_ms": round(1e3 * w.propose, 3),
            "merge_ms": round(1e3 * w.merge, 3), "verify_ms": round(1e3 * w.verify, 3),
            "net_ms": round(1e3 * w.net, 3), "steps": w.steps,
            "running": not w.loses(self.decay)} for source, w in sorted(self._worth.items())}
