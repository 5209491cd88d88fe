"""The engine loop: the one thread that runs an engine's model. Callers only enqueue and read.

::

    caller (generate / ChatSession / HTTP handler)       engine loop (this module's thread)
      submit ──► bounded admission queue ──────────────► admit between steps into a free cache row
      read its own Stream ◄── each step's tokens ◄─────── one prefill chunk, then ONE decode step
      cancel(): a flag ───────────────────────────────── honoured at the next step boundary
      full queue: `Overloaded` at once

Each cycle: honour cancellations and deadlines (a queued request is dropped unprefilled, a running
one frees its row), admit queued requests into free rows up to ``max_batch``, cache up to
``prefill_chunk`` positions of the joining prompts, oldest first (up to ``max_prefill_chunk`` when
nobody is decoding), then one decode step for every running row (`specdec.step.step.Step`). A
sequence that ends frees its row at once, the last row moving into the hole so the running rows
stay packed, and the cache is refitted to the rows live now. Forwards of several engines on one
model take turns under the model's lock (a plain lock: nothing on the loop re-enters it).

Who runs the cycles (the *driver*): exactly one thread at a time, and one whenever work is left.
A request submitted for reading at leisure (a stream, a server's request) gets a thread of the
loop's own if none runs; it returns when nothing is left, so the loop never sleeps on a timer and
never spins. A blocking call (``decode``: ``generate``, a batch, ``ChatSession.send``) that finds
no driver runs the cycles on its own thread until its request has ended, then hands the loop to a
thread of its own if other work is left: with GNU OpenMP (PyTorch's CPU builds) compute on a
second thread makes both slower (libgomp throttles its spin-waits once it manages more threads
than there are cores), so a caller that also computes keeps all compute on one thread this way.
No caller's thread (nor a thread pool) is ever needed for another caller's progress.
"""

from __future__ import annotations

import queue
import threading
import time
from collections import deque
from collections.abc import Callable

import torch

from specdec.device.memory import release_free_memory
from specdec.device.openmp import release_thread_team
from specdec.step.per_model import entry_for
from specdec.step.prefill import prefill_chunk
from specdec.step.sequence import Sequence, State, common_prefix_len
from specdec.step.step import Step
from specdec.step.stream import End, Overloaded

CAPACITY_ROUND = 128  # positions: the cache is sized in these steps, so similar requests reuse it


class Loop:
    """Owns one engine's model, cache and scheduler on a thread of its own.

    Args:
        engine: the `specdec.step.engine.Engine` (model, drafter, scheduler, cache).
        max_batch: the most sequences holding a cache row (decoding or prefilling) at once.
        max_queued: the most requests waiting for a row; one more is refused with `Overloaded`.
        prefill_chunk: prompt positions cached per cycle while other rows are decoding.
        max_prefill_chunk: the largest prefill forward when nobody else is decoding.
    """

    def __init__(self, engine, max_batch: int, max_queued: int, prefill_chunk: int,
                 max_prefill_chunk: int = 2048) -> None:
        self.engine = engine
        self.max_batch, self.max_queued = max_batch, max_queued
        self.prefill_chunk, self.max_prefill_chunk = prefill_chunk, max(prefill_chunk, max_prefill_chunk)
        self.step = Step(engine)
        self.wake: queue.SimpleQueue = queue.SimpleQueue()  # any thread, any finaliser may put
        self._guard = threading.Lock()  # the admission queue and the thread handle; never held across work
        self._queue: deque[Sequence] = deque()
        self._driver: threading.Thread | None = None  # the thread running cycles (None: nothing to run)
        self._background: threading.Thread | None = None  # the loop's own thread, while it drives
        self.rows: list[Sequence] = []  # by cache row: the sequences holding one (the driver only)

    # ------------------------------------------------------------------ callers' side
    def submit(self, seq: Sequence, drive: bool = False) -> bool:
        """Queue ``seq`` for admission, or raise `Overloaded` at once when the queue is full.

        With no driver, the loop's own thread starts, unless ``drive``: then the calling thread
        becomes the driver and this returns True; it must then call `drive_until`."""
        metrics = self.engine.metrics
        with self._guard:
            metrics.submitted += 1
            if len(self._queue) >= self.max_queued:
                metrics.refused += 1
                raise Overloaded(len(self._queue), len(self.rows))
            self._queue.append(seq)
            driving = self._driver is None and drive
            if driving:
                self._driver = threading.current_thread()
            elif self._driver is None:
                self._start_background()
        self.wake.put(None)
        return driving

    def drive_until(self, done: Callable[[], bool], keep: bool = False) -> None:
        """Run cycles on the calling thread (the driver `submit` made it) until ``done()``; then,
        unless ``keep`` (the caller drives again soon, and must), hand the loop to a thread of its
        own when work is left. Anything escaping a cycle (an interrupt inside a step) fails every
        request, since no row can be trusted, and propagates."""
        handed = False
        try:
            with torch.inference_mode():
                while not done() and self._cycle():
                    pass
        except BaseException as err:
            self._fail_everything(err if isinstance(err, Exception)
                                  else RuntimeError(f"the engine was interrupted ({type(err).__name__})"))
            handed = True
            raise
        finally:
            if not keep or handed:
                self._hand_over()

    @property
    def room(self) -> bool:
        """Whether the queue takes one more request now."""
        with self._guard:
            return len(self._queue) < self.max_queued

    @property
    def queued(self) -> int:
        """Requests waiting for a row."""
        with self._guard:
            return len(self._queue)

    @property
    def running(self) -> int:
        """Requests holding a cache row (prefilling or decoding)."""
        return len(self.rows)

    @property
    def driver(self) -> threading.Thread | None:
        """The thread running the cycles now (None when there is nothing to run)."""
        return self._driver

    @property
    def thread(self) -> threading.Thread | None:
        """The loop's own thread while it drives (None when idle or driven by a blocking caller)."""
        return self._background

    # ------------------------------------------------------------------ the loop
    def _start_background(self) -> None:
        """Give the loop a thread of its own as driver (called holding ``_guard``)."""
        self._background = self._driver = threading.Thread(target=self._run, name="specdec-engine", daemon=True)
        self._background.start()

    def _hand_over(self) -> None:
        """The calling driver lets go: to the loop's own thread when work is left. The caller's
        OpenMP team goes too, so that it does not slow the next driver's compute (see
        `specdec.device.openmp`; the loop's own thread lets its team go when it ends)."""
        with self._guard:
            if self._driver is not threading.current_thread():
                return
            self._driver = None
            if self.rows or self._queue:
                self._start_background()
        release_thread_team()

    def _run(self) -> None:
        device = self.engine.model.device
        if device.type == "cuda":
            torch.cuda.set_device(device)
        try:
            with torch.inference_mode():
                while self._cycle():
                    pass
        except BaseException as err:  # a defect of the loop itself: no reader may wait forever
            self._fail_everything(err)
            raise

    def _cycle(self) -> bool:
        """One cycle (see the module docstring); False once nothing is left and the thread may end."""
        while True:  # wake-ups only say "look again": drop them, never wait on them
            try:
                self.wake.get_nowait()
            except queue.Empty:
                break
        self._reap()
        self._admit()
        if not self.rows:
            with self._guard:
                if self._queue:
                    return True
                self._driver = None
                if self._background is threading.current_thread():
                    self._background = None
                return False
        running = [seq for seq in self.rows if seq.state is State.RUNNING]
        budget = self.prefill_chunk if running else self.max_prefill_chunk  # prompt positions this cycle
        for joining in [seq for seq in self.rows if seq.state is State.PREFILLING]:
            if budget <= 0:
                break
            budget -= self._prefill(joining, budget)
        if running:
            self._step(running)
        return True

    def _reap(self) -> None:
        """End the cancelled and the overdue: queued ones never prefilled, running ones freed."""
        now = time.monotonic()
        with self._guard:
            dropped = [seq for seq in self._queue if seq.ticket.cancelled or _overdue(seq, now)]
            for seq in dropped:
                self._queue.remove(seq)
        for seq in dropped + [seq for seq in self.rows if seq.ticket.cancelled or _overdue(seq, now)]:
            self._end(seq, End.CANCELLED if seq.ticket.cancelled else End.TIMED_OUT)

    def _admit(self) -> None:
        """Queued requests into free rows, oldest first, up to ``max_batch`` rows."""
        while len(self.rows) < self.max_batch:
            with self._guard:
                if not self._queue:
                    return
                seq = self._queue.popleft()
            try:
                self._take_row(seq)
            except Exception as err:  # an allocation failure fails this request alone
                self._end(seq, End.FAILED, err)

    def _take_row(self, seq: Sequence) -> None:
        """Give ``seq`` the next row: room in the cache, the reusable prefix of its kept KV state,
        its history on the device."""
        engine, cache = self.engine, self.engine.cache
        seq.slot = len(self.rows)
        self.rows.append(seq)
        try:
            self._fit()
            kv = seq.request.kv
            if kv is not None and kv.token_ids:
                seq.reused = common_prefix_len(kv.token_ids, seq.seen[:-1])
                if cache.recurrent and seq.reused < len(kv.token_ids):
                    seq.reused = 0  # recurrent states exist only after all the kept positions
                cache.load_row(seq.slot, [k[:, : seq.reused] for k in kv.keys], [v[:, : seq.reused] for v in kv.values],
                               kv.states if seq.reused else None, length=seq.reused)
            seq.history_device = torch.from_numpy(seq.history).to(engine.model.device)  # the prompt, copied up once
        except BaseException:
            self.rows.pop()
            seq.slot = None
            self._fit()
            raise
        seq.state = State.PREFILLING
        seq.started = engine.clock()
        stats = seq.result.stats
        stats.reused_prefix_tokens, stats.prefilled_tokens = seq.reused, len(seq.seen) - 1 - seq.reused
        engine.metrics.prompt_tokens += seq.prompt_len
        if cache.lengths[seq.slot] == len(seq.seen) - 1:  # nothing left to prefill
            self._start_decoding(seq)

    def _prefill(self, seq: Sequence, limit: int) -> int:
        """Cache at most ``limit`` more positions of ``seq``'s prompt; how many it cached."""
        before = self.engine.cache.lengths[seq.slot]
        try:
            with entry_for(self.engine.model).lock:
                done = prefill_chunk(self.engine, seq, limit)
        except Exception as err:
            if self.engine.cache.recurrent:  # some layers' states may have moved on past the row's length
                seq.consistent = False
            self._end(seq, End.FAILED, err)
            return 0
        cached = self.engine.cache.lengths[seq.slot] - before
        self.engine.metrics.prefill_chunks += 1
        if done:
            self._start_decoding(seq)
        return cached

    def _start_decoding(self, seq: Sequence) -> None:
        seq.state = State.RUNNING
        seq.result.stats.prefill_seconds = self.engine.clock() - seq.started

    def _step(self, running: list[Sequence]) -> None:
        metrics, started = self.engine.metrics, time.monotonic()
        try:
            with entry_for(self.engine.model).lock:
                stepped = self.step(running)
        except Exception as err:  # the shared work failed: every row of the step fails, the cache stays consistent
            for seq in running:
                self._end(seq, End.FAILED, err)
            return
        now = time.monotonic()
        metrics.verify_steps += 1
        metrics.rows_stepped += len(running)
        metrics.step_seconds.observe(now - started)
        for seq, new in stepped.items():
            if isinstance(new, BaseException):
                self._end(seq, End.FAILED, new)
                continue
            if new:
                metrics.generated_tokens += len(new)
                if seq.first_tokens is None:
                    seq.first_tokens = now
                    metrics.ttft_seconds.observe(now - seq.submitted)
                try:
                    seq.outbox.put(new)
                except Exception as err:  # the request's own listener failed
                    self._end(seq, End.FAILED, err)
                    continue
            if seq.finished:
                self._end(seq, End.FINISHED)

    # ------------------------------------------------------------------ ending
    def _end(self, seq: Sequence, end: End, error: BaseException | None = None) -> None:
        """Close ``seq``: its kept KV state updated from its row (or cleared after a failure inside
        a forward of it), final statistics, its row freed and the cache refitted, then its reader told."""
        engine = self.engine
        if seq.slot is not None:
            kv = seq.request.kv
            if kv is not None:
                if seq.consistent:
                    length = engine.cache.lengths[seq.slot]
                    kv.keys, kv.values = engine.cache.snapshot_row(seq.slot, length)
                    kv.states = engine.cache.snapshot_states(seq.slot)
                    kv.token_ids = seq.seen[:length]
                else:
                    kv.clear()
            self._free_row(seq)
        stats = seq.result.stats
        stats.new_tokens = len(seq.result.tokens)
        if seq.started is not None:
            stats.decode_seconds = engine.clock() - seq.started - stats.prefill_seconds
            stats.scheduler = engine.scheduler.explain(len(seq.seen), engine.source_names)
            engine.drafter.end_sequence(seq.sequence_id)
        seq.state = State.ENDED
        engine.metrics.ended[end.value] = engine.metrics.ended.get(end.value, 0) + 1
        seq.outbox.close(end, error)

    def _free_row(self, seq: Sequence) -> None:
        """Free ``seq``'s row; the last row moves into it, so the rows stay packed."""
        cache, slot = self.engine.cache, seq.slot
        last = self.rows.pop()
        if last is not seq:
            cache.move_row(last.slot, slot)
            last.slot = slot
            self.rows[slot] = last
        else:
            cache.lengths[slot] = 0
        seq.slot = None
        self._fit()

    def _fit(self) -> None:
        """Size the cache to the rows live now: grown when they need more (rows doubling up to
        ``max_batch``, positions with a quarter spare), shrunk when it holds over twice what they
        need (a failed shrink keeps the larger buffers), freed when none is live."""
        cache = self.engine.cache
        if not self.rows:
            if cache.rows:
                cache.free()
                release_free_memory(self.engine.model.device)  # the allocators give it back, too
            return
        rows = len(self.rows)
        largest_tree = max(self._largest_tree(seq) for seq in self.rows)  # every row of a step feeds that many slots
        capacity = max(seq.final_len for seq in self.rows) + largest_tree + 1
        if rows > cache.rows or capacity > cache.capacity:
            cache.fit(min(self.max_batch, max(rows, 2 * cache.rows)) if rows > cache.rows else cache.rows,
                      _rounded(capacity * 5 // 4) if capacity > cache.capacity else cache.capacity)
        elif cache.rows * cache.capacity > 2 * rows * _rounded(capacity):
            try:
                cache.fit(rows, _rounded(capacity))
            except Exception:
                pass

    def _largest_tree(self, seq: Sequence) -> int:
        budget = seq.request.tree_budget
        return budget if budget is not None else self.engine.scheduler.max_budget

    def _fail_everything(self, err: BaseException) -> None:
        with self._guard:
            waiting = list(self._queue)
            self._queue.clear()
            self._driver = None
            if self._background is threading.current_thread():
                self._background = None
        for seq in self.rows + waiting:
            seq.state = State.ENDED
            seq.outbox.close(End.FAILED, err)
        self.rows = []
        self.engine.cache.free()


def _overdue(seq: Sequence, now: float) -> bool:
    return seq.deadline is not None and now >= seq.deadline


def _rounded(positions: int) -> int:
    return -(-positions // CAPACITY_ROUND) * CAPACITY_ROUND
