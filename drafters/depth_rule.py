"""When a learned drafter stops drafting deeper: measured value of a depth against its measured cost.

A depth ``d`` is worth drafting when the decoding time it is expected to save, ``reach(d)`` (the
measured chance that verification accepts the drafter's own path down to depth ``d``) times the
measured seconds per emitted token, exceeds the measured seconds that depth's draft forward takes,
and the draft so far stays within ``share`` of a step. All figures are decayed averages, so they
follow the text being written; reach starts optimistic so new depths get measured.
"""

from __future__ import annotations

import numpy as np

PRIOR_REACH = 0.5  # reach(d) before any measurement: PRIOR_REACH ** d
PRIOR_WEIGHT = 2.0  # in observations
DECAY = 0.97  # per observation
DRAFT_SHARE = 0.15  # the most a draft may take of a step, by default


class DepthRule:
    """Per-depth acceptance and cost, and the decision whether to draft the next depth.

    Args:
        max_depth: the deepest depth measured.
        share: the most a draft may take of a step (seconds of drafting / seconds per step).
        probe_every: a depth that does not pay is still drafted at every ``probe_every``-th
            refusal, so its reach and cost stay measured.
    """

    def __init__(self, max_depth: int, share: float = DRAFT_SHARE, probe_every: int = 16) -> None:
        self.max_depth, self.share, self.probe_every = max_depth, share, probe_every
        depths = np.arange(1, max_depth + 1)
        self.hits = PRIOR_WEIGHT * PRIOR_REACH ** depths  # decayed counts of reaching depth d (index d-1)
        self.tries = np.full(max_depth, PRIOR_WEIGHT)
        self.depth_seconds = np.zeros(max_depth)  # decayed mean seconds of depth d's forward (0: unmeasured)
        self.step_seconds = 0.0  # decayed mean seconds between successive drafts (0: unmeasured)
        self.tokens_per_step = 1.0
        self.skipped = np.zeros(max_depth, dtype=np.int64)  # consecutive refusals of depth d

    def reach(self) -> np.ndarray:
        """``[max_depth]`` measured chance that the drafter's own path is accepted to depth d."""
        return self.hits / self.tries

    def should_draft(self, depth: int, drafted_seconds: float) -> bool:
        """Whether to draft ``depth`` (1-based) after ``drafted_seconds`` of drafting this step."""
        cost = self.depth_seconds[depth - 1]
        if cost == 0.0 or self.step_seconds == 0.0:
            return True  # unmeasured: draft, and so measure
        saves = self.reach()[depth - 1] * self.step_seconds / max(self.tokens_per_step, 1.0)
        pays = saves > cost and drafted_seconds + cost <= self.share * self.step_seconds
        if pays:
            self.skipped[depth - 1] = 0
            return True
        self.skipped[depth - 1] += 1
        if self.skipped[depth - 1] >= self.probe_every:  # a probe: keep measuring what does not pay
            self.skipped[depth - 1] = 0
            return True
        return False

    def record_depth(self, depth: int, seconds: float) -> None:
        """``depth``'s draft forward took ``seconds``."""
        last = self.depth_seconds[depth - 1]
        self.depth_seconds[depth - 1] = seconds if last == 0.0 else 0.9 * last + 0.1 * seconds

    def record_step(self, seconds: float, emitted: int) -> None:
        """A step took ``seconds`` (draft to draft) and emitted ``emitted`` tokens."""
        self.step_seconds = seconds if self.step_seconds == 0.0 else 0.9 * self.step_seconds + 0.1 * seconds
        self.tokens_per_step = 0.9 * self.tokens_per_step + 0.1 * emitted

    def record_outcome(self, drafted_depth: int, reached: int) -> None:
        """The drafter drafted ``drafted_depth`` depths and verification accepted its own path to
        depth ``reached``."""
        if drafted_depth <= 0:
            return
        self.hits[:drafted_depth] = DECAY * self.hits[:drafted_depth] + (np.arange(1, drafted_depth + 1) <= reached)
        self.tries[:drafted_depth] = DECAY * self.tries[:drafted_depth] + 1.0

    def report(self) -> dict:
        """Per-depth reach and draft milliseconds, and the step they are weighed against."""
        return {"reach": [round(float(r), 3) for r in self.reach()],
                "depth_ms": [round(1e3 * float(s), 3) for s in self.depth_seconds],
                "step_ms": round(1e3 * self.step_seconds, 2), "tokens_per_step": round(self.tokens_per_step, 2)}


def own_path_depth(tokens: np.ndarray, parents: np.ndarray, accepted: list[int]) -> int:
    """How deep the accepted tokens (root to tip) follow a path of the tree ``tokens``/``parents``
    (``node_idx`` space, -1 the root)."""
    node = -1
    for depth, token in enumerate(accepted):
        match = np.flatnonzero((parents == node) & (tokens == token))
        if not match.size:
            return depth
        node = int(match[0])
    return len(accepted)
