"""Continuous batching for threads: concurrent generations on one decoder share each verify forward.

Every generation is a *ticket*. A thread that wants its ticket's next step marks it as waiting;
the first waiting thread that finds no step under way becomes the step's leader: it waits briefly
until every live generation is waiting too (`gather_seconds` at most, so a slow reader never
stalls the others for long), admits new requests into free rows (each prefilled alone), runs ONE
batched step (`BatchEngine.step`) for every waiting ticket, hands each its tokens and wakes them.
No background thread: steps happen while somebody wants one, and a generation that is closed
(a cancelled stream, a disconnected client) leaves the batch and frees its row at once. Each
generation's output is what it would be alone (greedy: token for token).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

from specdec.batch.engine import BatchEngine, Member
from specdec.step.request import DecodeRequest, DecodeResult
from specdec.step.sequence import model_lock
from specdec.step.support import UnsupportedGeneration


class _Ticket:
    """One generation's place in the batch and its last step's outcome."""

    def __init__(self, request: DecodeRequest, result: DecodeResult) -> None:
        self.request, self.result = request, result
        self.member: Member | None = None
        self.waiting = False  # wants a step
        self.tokens: list[int] | None = None  # the last step's new tokens, once it ran
        self.error: BaseException | None = None


_BATCHERS_GUARD = threading.Lock()


def batcher_for(decoder) -> "Batcher":
    """The `Batcher` every caller of ``decoder`` shares (sessions, batched generate, the server),
    kept in ``decoder.batcher``."""
    with _BATCHERS_GUARD:
        if decoder.batcher is None:
            decoder.batcher = Batcher(decoder)
        return decoder.batcher


class Batcher:
    """Shares the decoder's model among concurrent generations, verified together.

    Args:
        decoder: the `specdec.SpeculativeDecoder` whose model, drafter and scheduler run the steps.
        max_batch: the most sequences holding a cache row (later requests wait for a free row).
        gather_seconds: how long a step's leader waits for the other live generations to ask.
    """

    def __init__(self, decoder, max_batch: int = 8, gather_seconds: float = 0.005) -> None:
        if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
            raise ValueError(f"max_batch must be an int >= 1, got {max_batch!r}")
        if not gather_seconds >= 0:
            raise ValueError(f"gather_seconds must be >= 0, got {gather_seconds!r}")
        if decoder.sharded:
            raise UnsupportedGeneration("batched generation under tensor parallelism is not supported")
        self.decoder = decoder
        self.engine = BatchEngine(decoder)
        self.max_batch = max_batch
        self.gather_seconds = gather_seconds
        self._live: list[_Ticket] = []  # joined and not left, admitted or not
        self._cond = threading.Condition()
        self._leading = False
        self.steps = 0  # batched forwards run
        self.rows_stepped = 0  # sequences verified, summed over those forwards

    @property
    def active(self) -> int:
        """Generations in the batch (admitted or waiting for a row)."""
        with self._cond:
            return len(self._live)

    def decode_steps(self, request: DecodeRequest, result: DecodeResult) -> Iterator[list[int]]:
        """Same contract as `SpeculativeDecoder.decode_steps`: yields each step's new tokens, and
        closing the iterator ends the generation (its row is freed at once)."""
        ticket = self._join(request, result)
        if ticket is None:
            return
        try:
            finished = False
            while not finished:
                self._advance([ticket])
                tokens, finished = ticket.tokens, ticket.member.finished
                if request.on_tokens is not None:
                    request.on_tokens(tokens)
                yield tokens
        finally:
            self._leave(ticket)

    def decode_all(self, requests: list[DecodeRequest], results: list[DecodeResult]) -> None:
        """Run ``requests`` to the end together (one thread drives them; other threads' generations
        share the same forwards). ``results`` fill as `SpeculativeDecoder.decode` fills one."""
        tickets = [self._join(request, result) for request, result in zip(requests, results)]
        running = [t for t in tickets if t is not None]
        try:
            while running:
                self._advance(running)
                for ticket in [t for t in running if t.member is not None and t.member.finished]:
                    running.remove(ticket)
                    self._leave(ticket)
        finally:
            for ticket in running:
                self._leave(ticket)

    # ------------------------------------------------------------------ joining and leaving
    def _join(self, request: DecodeRequest, result: DecodeResult) -> _Ticket | None:
        if self.decoder.unsupported:
            raise UnsupportedGeneration(self.decoder.unsupported)
        if request.max_new_tokens == 0:
            return None
        ticket = _Ticket(request, result)
        with self._cond:
            self._live.append(ticket)
        return ticket

    def _leave(self, ticket: _Ticket) -> None:
        with self._cond:
            if ticket in self._live:
                self._live.remove(ticket)
            self._cond.notify_all()
        if ticket.member is not None:
            with model_lock(self.decoder.model):
                self.engine.release(ticket.member)
            ticket.member = None

    # ------------------------------------------------------------------ stepping
    def _advance(self, tickets: list[_Ticket]) -> None:
        """Return once every ticket of ``tickets`` that holds a row had one more step, and at least
        one did (leading steps as needed); tickets still waiting for a row stay waiting."""
        with self._cond:
            for ticket in tickets:
                ticket.waiting, ticket.tokens = True, None
            self._cond.notify_all()
            while True:
                failed = next((t.error for t in tickets if t.error is not None), None)
                if failed is not None:
                    raise failed
                stepped = [t.tokens is not None for t in tickets]
                if any(stepped) and all(done or t.member is None for done, t in zip(stepped, tickets)):
                    return  # every ticket with a row had its step (the others still wait for one)
                if self._leading:
                    self._cond.wait()
                    continue
                self._leading = True
                try:
                    self._lead()
                finally:
                    self._leading = False
                    self._cond.notify_all()

    def _lead(self) -> None:
        """One batched step for every waiting ticket (called holding ``_cond``, released while the
        model works)."""
        deadline = time.monotonic() + self.gather_seconds
        while not all(t.waiting or (t.member is not None and t.member.finished) for t in self._live) \
                and self._cond.wait(max(deadline - time.monotonic(), 0)):
            pass
        admitted = sum(t.member is not None for t in self._live)
        joining = [t for t in self._live if t.member is None and t.waiting][: max(self.max_batch - admitted, 0)]
        stepping = [t for t in self._live if t.waiting and (t.member is not None or t in joining)]
        if not stepping:
            self._cond.wait(self.gather_seconds or None)
            return
        self._cond.release()
        try:
            with model_lock(self.decoder.model):
                ready = []
                for ticket in stepping:
                    try:
                        if ticket.member is None:
                            ticket.member = self.engine.admit(ticket.request, ticket.result)
                        ready.append(ticket)
                    except Exception as err:  # this request alone fails (e.g. a prompt too long)
                        ticket.error = err
                try:
                    tokens = self.engine.step([t.member for t in ready]) if ready else []
                except Exception as err:
                    for ticket in ready:
                        ticket.error = err
                    tokens = []
        finally:
            self._cond.acquire()
        for ticket, new in zip(ready, tokens):
            ticket.tokens, ticket.waiting = new, False
        self.steps += bool(tokens)
        self.rows_stepped += len(tokens)
