"""What a caller holds for a submitted request: its `Stream` of new tokens, read from any thread or
from asyncio, and cancellable from anywhere.

The engine loop writes each step's tokens into the request's `Outbox` and never waits on a reader;
the caller reads them at its own pace. Cancelling (`Stream.cancel`, `close`, a request-level
deadline, or garbage collection of a stream nobody holds any more) only sets a flag and wakes the
loop, which honours it at the next step boundary: the row is freed there, and a request cancelled
while still queued is never prefilled. Nothing here takes a lock the loop can hold while a
finaliser runs (a `queue.SimpleQueue` put is safe even inside ``__del__``), and nothing that may
run in a finaliser waits, so a stream collected on any thread, the loop's included, cannot
deadlock it.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import weakref
from collections import deque
from enum import Enum

from specdec.step.request import DecodeResult


class Overloaded(RuntimeError):
    """The engine's admission queue is full: the request was refused at once, before any work.

    Attributes:
        queued: requests waiting when it was refused (the queue's limit).
        running: requests holding a cache row then.
        retry_after: seconds after which a retry is likely to be admitted (a hint).
    """

    def __init__(self, queued: int, running: int, retry_after: int = 1) -> None:
        super().__init__(f"the engine is full: {running} requests running and {queued} queued (max_queued); "
                         f"retry in about {retry_after} s")
        self.queued, self.running, self.retry_after = queued, running, retry_after


class Cancelled(RuntimeError):
    """Raised by a stream's reader when the request ended without finishing: cancelled by its
    holder, or past its deadline (`TimedOut`)."""


class TimedOut(Cancelled):
    """The request passed its deadline (``DecodeRequest.timeout``) before it finished."""


class End(Enum):
    """How a request ended."""

    FINISHED = "finished"  # EOS, a stop rule or its length
    CANCELLED = "cancelled"
    TIMED_OUT = "timed_out"
    FAILED = "failed"


class Outbox:
    """One request's output, written by the loop (never blocking), read by its `Stream`.

    ``listener`` (optional) is called with each step's tokens on the loop's thread, before they
    are readable; an exception from it propagates to the loop, which fails the request. ``waker``
    is called (on the loop's thread) after every write, for a reader on another event system
    (asyncio); it must not block.
    """

    def __init__(self, listener=None) -> None:
        self._lock = threading.Lock()
        self._ready = threading.Condition(self._lock)
        self._steps: deque[list[int]] = deque()
        self.end: End | None = None
        self.error: BaseException | None = None
        self.listener = listener
        self.waker = None

    def put(self, tokens: list[int]) -> None:
        if self.listener is not None:
            self.listener(tokens)
        with self._lock:
            self._steps.append(tokens)
            self._ready.notify_all()
        self._wake()

    def close(self, end: End, error: BaseException | None = None) -> None:
        with self._lock:
            self.end, self.error = end, error
            self._ready.notify_all()
        self._wake()

    def _wake(self) -> None:
        waker = self.waker
        if waker is not None:
            try:
                waker()
            except RuntimeError:  # the reader's event loop is closed: nobody is reading any more
                pass

    def take(self, block: bool) -> list[int] | None:
        """The next step's tokens; None once the request has ended and everything was taken (or,
        not blocking, when nothing is there yet)."""
        with self._lock:
            while block and not self._steps and self.end is None:
                self._ready.wait()
            return self._steps.popleft() if self._steps else None

    def wait_end(self) -> End:
        with self._lock:
            while self.end is None:
                self._ready.wait()
            return self.end

    @property
    def pending(self) -> bool:
        with self._lock:
            return bool(self._steps)


class Ticket:
    """The flags a caller may set on a live request (read by the loop at step boundaries).

    ``wake`` is the loop's wake-up queue: putting into it is safe from any thread and finaliser.
    """

    def __init__(self, wake: queue.SimpleQueue) -> None:
        self.cancelled = False
        self.wake = wake

    def cancel(self) -> None:
        self.cancelled = True
        self.wake.put(None)


def _cancel_on_collect(ticket: Ticket) -> None:
    ticket.cancel()


class Stream:
    """A submitted request's new tokens, step by step (`specdec.SpeculativeDecoder.submit`).

    Iterate it (``for tokens in stream``, or ``async for`` in asyncio) for each step's accepted
    tokens; ``tokens`` holds everything read so far, and `result` the whole generation once it has
    ended (`wait`). A request that failed raises its error to the reader after its last tokens;
    one cancelled or past its deadline raises `Cancelled` / `TimedOut`, unless it was this stream's
    own `cancel` or `close`. Any thread may read, cancel or close it; a stream that is dropped
    unread is cancelled when garbage-collected.
    """

    def __init__(self, outbox: Outbox, ticket: Ticket, result: DecodeResult) -> None:
        self._outbox, self._ticket, self._result = outbox, ticket, result
        self.tokens: list[int] = []
        self._own_cancel = False
        self._aio_event: asyncio.Event | None = None
        weakref.finalize(self, _cancel_on_collect, ticket)

    # ------------------------------------------------------------------ reading
    def __iter__(self) -> "Stream":
        return self

    def __next__(self) -> list[int]:
        tokens = self._outbox.take(block=True)
        if tokens is None:
            self._raise_end()
            raise StopIteration
        self.tokens.extend(tokens)
        return tokens

    def __aiter__(self) -> "Stream":
        if self._aio_event is None:
            loop, event = asyncio.get_running_loop(), asyncio.Event()
            self._aio_event = event
            self._outbox.waker = lambda: loop.call_soon_threadsafe(event.set)
            event.set()  # look at what is there already
        return self

    async def __anext__(self) -> list[int]:
        while True:
            tokens = self._outbox.take(block=False)
            if tokens is not None:
                self.tokens.extend(tokens)
                return tokens
            if self._outbox.end is not None and not self._outbox.pending:
                self._raise_end()
                raise StopAsyncIteration
            await self._aio_event.wait()
            self._aio_event.clear()

    def _raise_end(self) -> None:
        end, error = self._outbox.end, self._outbox.error
        if end is End.FAILED:
            raise error
        if end is End.TIMED_OUT:
            raise TimedOut(str(error) if error else "the request passed its deadline")
        if end is End.CANCELLED and not self._own_cancel:
            raise Cancelled("the request was cancelled")

    # ------------------------------------------------------------------ ending
    def cancel(self) -> None:
        """Stop the request at the next step boundary (its row is freed there; a queued request is
        never prefilled). Never blocks; safe from any thread."""
        self._own_cancel = True
        self._ticket.cancel()

    def close(self) -> None:
        """`cancel` unless the request has ended already. Never blocks (it may run in a finaliser):
        `wait` for the end, which comes at the engine's next step boundary."""
        if self._outbox.end is None:
            self.cancel()

    def wait(self) -> DecodeResult:
        """Block until the request has ended (its row free, its kept KV state written); its
        `result` (a failure raises as in iteration; so does a cancellation that was not this
        stream's own)."""
        self._outbox.wait_end()
        self._raise_end()
        return self._result

    def wait_ended(self) -> End:
        """Block until the request has ended; how it ended (nothing is raised)."""
        return self._outbox.wait_end()

    @property
    def ended(self) -> End | None:
        """How the request ended, or None while it is queued or running."""
        return self._outbox.end

    @property
    def result(self) -> DecodeResult:
        """The generation (complete once `ended`): tokens, statistics, scores and logits when asked."""
        return self._result

    def __enter__(self) -> "Stream":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
