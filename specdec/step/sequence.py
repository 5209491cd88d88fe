"""One request's decoding state, owned by the engine loop from submission to its end.

States: ``QUEUED`` (in the admission queue) -> ``PREFILLING`` (holds a cache row; its prompt is
cached chunk by chunk between decode steps) -> ``RUNNING`` (in every decode step) -> ended (its
`Outbox` says how). Every transition happens on the loop's thread; a caller only sets the
`Ticket`'s flag and reads the outbox.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

import numpy as np
import torch

from specdec.constrain.matcher import RowMatcher
from specdec.step.request import DecodeRequest, DecodeResult
from specdec.step.stream import Outbox, Ticket


class State(enum.Enum):
    QUEUED = "queued"
    PREFILLING = "prefilling"
    RUNNING = "running"
    ENDED = "ended"


@dataclass(eq=False)
class Sequence:
    """One request inside the engine.

    ``seen`` are the ids the model attends to (the prompt without padding, then new tokens); the
    cache row ``slot`` holds a prefix of them while prefilling, then everything but the root (the
    last committed token, which the next verify forward feeds). ``history`` (host)
    and ``history_device`` (the model's device, from admission) hold the ``n_committed`` committed
    ids (prompt, padding included, then new tokens) that drafters and logits processors read.
    """

    request: DecodeRequest
    result: DecodeResult
    outbox: Outbox
    ticket: Ticket
    sequence_id: int
    seen: list[int]
    submitted: float  # time.monotonic() at submission
    deadline: float | None  # time.monotonic() past which it is cancelled
    history: np.ndarray = field(init=False)
    history_device: torch.Tensor | None = None
    n_committed: int = 0
    state: State = State.QUEUED
    slot: int | None = None
    reused: int = 0  # positions of ``seen`` copied into the row from the request's kept KV state
    started: float | None = None  # loop clock at admission
    first_tokens: float | None = None  # time.monotonic() when its first tokens were emitted
    finished: bool = False
    consistent: bool = True  # False after a failure inside a forward of its row
    matcher: RowMatcher | None = None  # its constraint's state after its committed new tokens

    def __post_init__(self) -> None:
        prompt = self.request.prompt
        self.history = np.empty(prompt.numel() + self.request.max_new_tokens + 1, dtype=np.int64)
        self.history[: prompt.numel()] = prompt.numpy()
        self.n_committed = prompt.numel()
        if self.request.constraint is not None:
            self.matcher = self.request.constraint.start()

    @property
    def root(self) -> int:
        return self.seen[-1]

    @property
    def prompt_len(self) -> int:
        return self.request.prompt.numel()

    @property
    def final_len(self) -> int:
        """The most positions its row can hold: every attended prompt token and new token."""
        return len(self.seen) - 1 + self.request.max_new_tokens

    def advance(self, emitted: list[int], block: torch.Tensor) -> None:
        """Commit ``emitted`` (host) whose device copy is ``block`` (``[len(emitted)]``); its
        constraint's matcher consumes them last."""
        end = self.n_committed + len(emitted)
        self.history[self.n_committed : end] = emitted
        self.history_device[self.n_committed : end] = block
        self.n_committed = end
        self.seen.extend(emitted)
        if self.matcher is not None:
            self.matcher.advance(emitted)


def common_prefix_len(a: list[int], b: list[int]) -> int:
    """Length of the longest common prefix of two id lists."""
    limit = min(len(a), len(b))
    mismatch = np.flatnonzero(np.asarray(a[:limit]) != np.asarray(b[:limit]))
    return int(mismatch[0]) if mismatch.size else limit
