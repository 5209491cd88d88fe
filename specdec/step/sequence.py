"""One sequence's decoding state between steps, and the per-model lock every step holds."""

from __future__ import annotations

import threading
from dataclasses import dataclass

import numpy as np
import torch

from drafters.modeling import SlotCache
from specdec.step.per_model import entry_for


@dataclass
class SequenceState:
    """One generation's decoding state between steps.

    The cache holds ``prefix_len`` positions: the model-visible history but its last token,
    ``root``, which the next verify forward feeds. ``history`` (host) and ``history_device``
    (the model's device) hold the ``n_committed`` committed ids (prompt, padding included, then
    new tokens); ``seen`` (host) the ids the model attended to, for KV reuse.
    """

    cache: SlotCache
    history: np.ndarray
    history_device: torch.Tensor
    n_committed: int
    prefix_len: int
    root: int
    sequence_id: int
    prompt_len: int
    seen: list[int]

    def advance(self, emitted: list[int], block: torch.Tensor) -> None:
        """Commit ``emitted`` (host) whose device copy is ``block`` (``[len(emitted)]``)."""
        end = self.n_committed + len(emitted)
        self.history[self.n_committed : end] = emitted
        self.history_device[self.n_committed : end] = block
        self.prefix_len += len(emitted)
        self.n_committed = end
        self.seen.extend(emitted)
        self.root = emitted[-1]


def common_prefix_len(a: list[int], b: list[int]) -> int:
    """Length of the longest common prefix of two id lists."""
    limit = min(len(a), len(b))
    mismatch = np.flatnonzero(np.asarray(a[:limit]) != np.asarray(b[:limit]))
    return int(mismatch[0]) if mismatch.size else limit


def model_lock(model) -> threading.RLock:
    """The lock every decoder of ``model`` holds for each step (one forward at a time)."""
    return entry_for(model).lock
