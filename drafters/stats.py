"""Online acceptance statistics by tree depth and sibling rank, with exponential forgetting."""

from __future__ import annotations

import numpy as np
import torch

from trees import DEFAULT_RANK_PRIOR, ROOT, TokenTree


class AcceptanceStats:
    """How often a node at (depth, rank) is accepted once its parent was (rank: `TokenTree.ranks`).

    Counts decay by ``decay`` per observed step, so the estimate follows a changing text. Rates
    are smoothed towards a prior worth ``prior_weight`` observations.

    Args:
        max_depth: depths beyond this share the last row.
        max_rank: ranks beyond this share the last column.
        decay: per-step forgetting factor in (0, 1].
        prior: per-rank prior acceptance rates (default `trees.DEFAULT_RANK_PRIOR`).
        prior_weight: pseudo-observations given to the prior.
    """

    def __init__(self, max_depth: int = 16, max_rank: int = 8, decay: float = 0.995,
                 prior=DEFAULT_RANK_PRIOR, prior_weight: float = 4.0) -> None:
        if not 0 < decay <= 1:
            raise ValueError(f"decay must be in (0, 1], got {decay}")
        self.max_depth, self.max_rank, self.decay = max_depth, max_rank, decay
        prior = np.asarray(prior, dtype=np.float64)[:max_rank]
        self.prior = np.pad(prior, (0, max_rank - len(prior)), constant_values=prior[-1] if len(prior) else 0.0)
        self.prior_weight = prior_weight
        self.reached = np.zeros((max_depth, max_rank))
        self.accepted = np.zeros((max_depth, max_rank))
        self.steps = 0

    def update(self, tree: TokenTree, accepted_nodes, source: int | None = None) -> None:
        """Record one verification: nodes whose parent was accepted were 'reached'.

        With ``source`` set, only nodes proposed by that source count.
        """
        self.reached *= self.decay
        self.accepted *= self.decay
        self.steps += 1
        if not len(tree):
            return
        accepted = np.zeros(len(tree), dtype=bool)
        accepted[list(accepted_nodes)] = True
        parents = tree.parents.numpy()
        reached = np.where(parents == ROOT, True, accepted[np.maximum(parents, 0)])
        if source is not None:
            reached &= tree.sources.numpy() == source
        depth = np.minimum(tree.depths.numpy(), self.max_depth) - 1
        rank = np.minimum(tree.ranks.numpy(), self.max_rank - 1)
        np.add.at(self.reached, (depth[reached], rank[reached]), 1.0)
        np.add.at(self.accepted, (depth[reached], rank[reached]), accepted[reached].astype(np.float64))

    def rates(self) -> np.ndarray:
        """``[max_depth, max_rank]`` smoothed acceptance rates in [0, 1]."""
        weight = self.reached + self.prior_weight
        smoothed = (self.accepted + self.prior_weight * self.prior) / np.maximum(weight, 1e-12)
        return np.where(weight > 0, smoothed, self.prior)

    def reset(self) -> None:
        self.reached[:] = 0.0
        self.accepted[:] = 0.0
        self.steps = 0

    def state_dict(self) -> dict:
        return {"reached": torch.from_numpy(self.reached.copy()), "accepted": torch.from_numpy(self.accepted.copy()),
                "steps": self.steps}

    def load_state_dict(self, state: dict) -> None:
        """Restore `state_dict` output after checking shapes, finiteness and ranges."""
        from drafters.state import StateError, array_field, int_field

        shape = self.reached.shape
        reached = array_field(state, "reached", "acceptance statistics", shape, low=0.0)
        accepted = array_field(state, "accepted", "acceptance statistics", shape, low=0.0)
        if (accepted > reached + 1e-6).any():
            raise StateError("acceptance statistics: more accepted than reached nodes")
        steps = int_field(state, "steps", "acceptance statistics", low=0)
        self.reached[:], self.accepted[:], self.steps = reached, accepted, steps
