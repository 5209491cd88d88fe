"""Node values calibrated per drafter and per depth by what verification accepted.

A drafter scores each node with the probability that it is reached and accepted. Those values
are learned by the drafter from its own statistics and can be off by a factor (a fourfold
underestimate was measured for Token Recycling in bf16). For every (drafter, depth) cell this
keeps decayed sums of the values of verified nodes and of how many of them were accepted; the
factor ``accepted / predicted`` corrects the values before the scheduler weighs them. Cells with
little evidence shrink towards their drafter's factor, and drafters towards the global one
(pseudo-count `PRIOR`), so one lucky node cannot inflate a whole depth.

Sums decay every verified step, so a drafter whose text turns copyable recovers as soon as some
of its nodes are verified again (the scheduler's probes make sure they are).
"""

from __future__ import annotations

import numpy as np

MAX_SOURCES = 16  # drafter ids per tree (`TokenTree.sources`)
MAX_DEPTH = 16  # depths beyond share the last cell
PRIOR = 1.0  # pseudo-count, in predicted nodes, pulling a cell towards its drafter's factor


class Calibration:
    """Per (drafter, depth) correction factors for node values.

    Args:
        decay: forgetting factor applied to all sums at every recorded step.
    """

    def __init__(self, decay: float = 0.97) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"decay must be in (0, 1), got {decay}")
        self.decay = decay
        self.predicted = np.zeros((MAX_SOURCES, MAX_DEPTH))  # decayed sums of raw node values
        self.accepted = np.zeros((MAX_SOURCES, MAX_DEPTH))  # decayed counts of accepted nodes
        self.error_sums = np.zeros((MAX_SOURCES, 3))  # decayed (raw predicted, calibrated predicted, accepted)
        self._factors = None  # `factors`, until the sums change

    def factors(self) -> np.ndarray:
        """``[MAX_SOURCES, MAX_DEPTH]`` multipliers: cell, shrunk to drafter, shrunk to global."""
        if self._factors is None:
            overall = (self.accepted.sum() + PRIOR) / (self.predicted.sum() + PRIOR)
            per_source = (self.accepted.sum(1) + PRIOR * overall) / (self.predicted.sum(1) + PRIOR)
            self._factors = (self.accepted + PRIOR * per_source[:, None]) / (self.predicted + PRIOR)
            self._factors.setflags(write=False)  # shared until the next record
        return self._factors

    def apply(self, values: np.ndarray, sources: np.ndarray, depths: np.ndarray) -> np.ndarray:
        """``[n]`` calibrated values in [0, 1] of nodes with raw ``values``, ``sources`` and ``depths`` (>= 1)."""
        cells = self._cells(sources, depths)
        return np.clip(values * self.factors()[cells], 0.0, 1.0)

    def record(self, values: np.ndarray, sources: np.ndarray, depths: np.ndarray, accepted: np.ndarray) -> None:
        """Verified nodes (raw ``values``, ``sources``, ``depths``) and which were ``accepted`` (bool)."""
        calibrated = self.apply(values, sources, depths)  # what the scheduler believed when it chose them
        self._factors = None
        self.predicted *= self.decay
        self.accepted *= self.decay
        self.error_sums *= self.decay
        cells = self._cells(sources, depths)
        np.add.at(self.predicted, cells, values)
        np.add.at(self.accepted, cells, accepted.astype(float))
        source = np.minimum(sources, MAX_SOURCES - 1)
        for column, amount in enumerate((values, calibrated, accepted.astype(float))):
            np.add.at(self.error_sums[:, column], source, amount)

    def report(self, names: dict[int, str] | None = None) -> dict:
        """Per drafter: accepted nodes per unit of raw value, and the relative error of the raw and
        the calibrated predictions of accepted nodes, ``|predicted - accepted| / max(predicted,
        accepted)`` in [0, 1] (decayed sums over recent steps)."""
        names = names or {}
        out = {}
        for source in np.flatnonzero(self.error_sums[:, 0] > 1e-9):
            raw, calibrated, accepted = self.error_sums[source]
            out[names.get(int(source), str(int(source)))] = {
                "accepted_per_value": round(float(accepted / raw), 3),
                "error_raw": round(float(abs(raw - accepted) / max(raw, accepted)), 3),
                "error_calibrated": round(float(abs(calibrated - accepted) / max(calibrated, accepted, 1e-12)), 3),
                "by_depth": [round(float(f), 3) for f in self.factors()[source, 1:8]],
            }
        return out

    @staticmethod
    def _cells(sources: np.ndarray, depths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return np.minimum(sources.astype(np.int64), MAX_SOURCES - 1), np.minimum(depths, MAX_DEPTH - 1)

    def state_dict(self) -> dict:
        return {"predicted": self.predicted.tolist(), "accepted": self.accepted.tolist(),
                "error_sums": self.error_sums.tolist()}

    def load_state_dict(self, state: dict, where: str) -> None:
        """Restore `state_dict` output; arrays are checked for shape and range (`drafters.state.StateError`)."""
        from drafters.state import array_field

        predicted = array_field(state, "predicted", where, (MAX_SOURCES, MAX_DEPTH), low=0.0)
        accepted = array_field(state, "accepted", where, (MAX_SOURCES, MAX_DEPTH), low=0.0)
        error_sums = array_field(state, "error_sums", where, (MAX_SOURCES, 3), low=0.0)
        self.predicted, self.accepted, self.error_sums = predicted, accepted, error_sums
        self._factors = None
