"""Device-true step timings for the scheduler.

On a CPU the verify forward runs synchronously, so the host clock around it is its cost. On CUDA
the host only launches kernels: the forward is timed with CUDA events, read after the step's one
synchronisation point (when they have certainly completed), never by the launch time.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class StepTimes:
    """Seconds one step spent: drafting (host), the verify forward (device-true) and everything
    else outside the forward (host work that the device did not overlap)."""

    draft: float
    verify: float
    overhead: float


class StepTimer:
    """Times the phases of one decode step: `begin`, `verify_begins`, `verify_ends`, `end`.

    Args:
        clock: host time source in seconds (tests inject a fake one).
        device: the model's device; CUDA devices are timed with events.
    """

    def __init__(self, clock, device: torch.device) -> None:
        self.clock = clock
        self.cuda = torch.device(device).type == "cuda"
        self._events = None
        if self.cuda:
            self._events = [torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)]

    def begin(self) -> None:
        self._begin = self.clock()

    def verify_begins(self) -> None:
        self._verify_begin = self.clock()
        if self.cuda:
            self._events[0].record()

    def verify_ends(self) -> None:
        self._verify_end = self.clock()
        if self.cuda:
            self._events[1].record()

    def end(self) -> StepTimes:
        """The step's times; call after the step's host synchronisation (the events are complete)."""
        total = self.clock() - self._begin
        if self.cuda:
            verify = self._events[0].elapsed_time(self._events[1]) / 1e3
        else:
            verify = self._verify_end - self._verify_begin
        draft = self._verify_begin - self._begin
        return StepTimes(draft=draft, verify=verify, overhead=max(total - verify, draft))
