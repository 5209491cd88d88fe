"""The engine of one model: its drafter, scheduler, kernel and KV cache, driven by one loop that
owns the model (`specdec.step.loop`). Every caller, a single ``generate`` as much as a server's
hundredth client, submits a request and reads its own `Stream`; the loop runs ONE decode step for
every running sequence (`specdec.step.step`), a single sequence being a batch of one.
"""

from __future__ import annotations

import copy
import itertools
import threading
import time
import warnings
from collections.abc import Callable

import torch

from drafters import Drafter, HybridDrafter, default_head_path, make_drafter
from drafters.modeling import position_limit
from drafters.state import StateError, check_vocab_size, field, read_state_file
from specdec.device.cache import RowCache
from specdec.device.compiled import CompiledForward, compile_unsupported
from specdec.device.tree import HostBuffer
from specdec.models import distributed
from specdec.schedule.scheduler import Scheduler
from specdec.step.features import FeatureTap
from specdec.step.loop import Loop
from specdec.step.metrics import EngineMetrics
from specdec.step.per_model import compiled_forward, entry_for, forward_module
from specdec.step.request import DecodeRequest, DecodeResult, SpecStats, check_logprobs, check_tree_budget
from specdec.step.sequence import Sequence
from specdec.step.stream import End, Outbox, Overloaded, Stream, Ticket
from specdec.step.support import UnsupportedGeneration, support_for, vocab_size_of

AUTO = "auto"


def resolve_drafter_name(drafter: str | Drafter, draft_model=None, model=None, draft_head=None) -> str | Drafter:
    """``"auto"`` means every available drafter: recycling and n-gram, plus the model drafter
    when a draft model is given and the head drafter when a head is given or `specdec distill`
    saved one for ``model`` (`drafters.default_head_path`)."""
    if drafter == AUTO:
        has_head = draft_head is not None or (model is not None and default_head_path(model).is_file())
        return "recycling+ngram" + ("+model" if draft_model is not None else "") + ("+head" if has_head else "")
    return drafter


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    return value


class Engine:
    """One model with its drafter, scheduler and kernel, drafter state kept across calls, and the
    loop that runs its steps; the public `specdec.SpeculativeDecoder` (its arguments) adds
    ``generate``.

    Loop arguments (see `SpeculativeDecoder` for the others): ``max_batch`` sequences decode
    together at most, ``max_queued`` more may wait for a row (one more is refused with
    `specdec.Overloaded`), and a joining prompt is cached ``prefill_chunk`` positions per step
    while others are decoding.
    """

    def __init__(
        self,
        model,
        tokenizer=None,
        drafter: str | Drafter = AUTO,
        tree_budget: int | None = None,
        draft_model=None,
        draft_head=None,
        scheduler: Scheduler | None = None,
        clock=time.perf_counter,
        tree_kernel: bool | None = None,
        compile: bool = False,
        max_batch: int = 8,
        max_queued: int = 64,
        prefill_chunk: int = 256,
    ) -> None:
        if tree_kernel not in (None, True, False):
            raise TypeError(f"tree_kernel must be None, True or False, got {tree_kernel!r}")
        if not isinstance(compile, bool):
            raise TypeError(f"compile must be True or False, got {compile!r}")
        for name, value in (("max_batch", max_batch), ("max_queued", max_queued), ("prefill_chunk", prefill_chunk)):
            _positive_int(name, value)
        self.model = model
        self.tokenizer = tokenizer
        self.tree_kernel = tree_kernel
        if tree_kernel:
            self.kernel  # required: probe now, so an unusable kernel is an error here
        self.vocab_size = vocab_size_of(model)
        self.logits_size = int(model.get_output_embeddings().weight.shape[0])
        self.drafter = make_drafter(resolve_drafter_name(drafter, draft_model, model, draft_head), self.logits_size,
                                    draft_model=draft_model, target=model, draft_head=draft_head)
        self.tree_budget = None if tree_budget is None else check_tree_budget(tree_budget)
        self.scheduler = scheduler if scheduler is not None else Scheduler()
        members = self.drafter.members if isinstance(self.drafter, HybridDrafter) else [self.drafter]
        self.source_names = {m.source_id: m.name for m in members}
        self.grammar_source = max(self.source_names) + 1  # the nodes a constraint forces
        self.source_names[self.grammar_source] = "grammar"
        self.sharded = distributed.is_sharded(model)  # tensor parallel: ranks must verify the same nodes
        self.clock = clock
        self.position_limit = position_limit(model)
        declared = getattr(model.config.get_text_config(decoder=True), "max_position_embeddings", None)
        self.context_length = self.position_limit or declared  # what servers hold requests to (None: unknown)
        self.forward_model = forward_module(model, self.sharded)  # verify and prefill forwards run this
        self.features = FeatureTap(model, self.drafter.needs_features)
        self.compile = compile
        self._compiled: CompiledForward | None | bool = None  # False: not compiled (said once)
        self.cache = RowCache.for_model(model)
        self.buffer = HostBuffer(model.device)
        self.metrics = EngineMetrics()
        self.loop = Loop(self, 1 if self.sharded else max_batch, max_queued, prefill_chunk)
        self._options = dict(drafter=drafter, tree_budget=tree_budget, draft_model=draft_model,
                             draft_head=draft_head, clock=clock, tree_kernel=tree_kernel, compile=compile,
                             max_batch=max_batch, max_queued=max_queued, prefill_chunk=prefill_chunk)
        self.last_stats: SpecStats | list[SpecStats] | None = None
        self._sequences = itertools.count()

    def fork(self) -> "Engine":
        """A decoder on the same model, tokenizer, scheduler and kernel with a fresh drafter of the
        same kind (private drafter state) and a loop of its own."""
        options = dict(self._options)
        if isinstance(options["drafter"], Drafter):
            options["drafter"] = copy.deepcopy(options["drafter"])
            options["drafter"].reset()
        return type(self)(self.model, self.tokenizer, scheduler=self.scheduler, **options)

    @property
    def unsupported(self) -> str | None:
        """Why this model cannot be decoded speculatively (None when it can); decided once per
        model, before any generation, by `specdec.step.support.support_for`."""
        return support_for(self.model, self.tree_kernel).reason

    @property
    def kernel(self):
        """The tree-attention kernel verify forwards use (None: the model's attention with a mask)."""
        return support_for(self.model, self.tree_kernel).kernel

    @property
    def compiled(self) -> "CompiledForward | None":
        """The compiled verify forward (`specdec.device.compiled`) when ``compile=True`` and this
        model allows it (else None; why not is warned once)."""
        if self._compiled is None:
            reason = compile_unsupported(self.model, self.kernel, self.sharded, self.drafter.needs_features) \
                if self.compile else "compile=False"
            if reason is None:
                self._compiled = compiled_forward(self.model)
            else:
                self._compiled = False
                if self.compile:
                    warnings.warn(f"specdec: compile=True but the verify forward runs eager: {reason}",
                                  RuntimeWarning, stacklevel=2)
        return self._compiled or None

    # ------------------------------------------------------------------ requests
    def submit(self, request: DecodeRequest, on_tokens: Callable[[list[int]], None] | None = None) -> Stream:
        """Queue ``request`` for the engine loop and return its `Stream` at once (the loop runs on
        a thread of its own; nothing runs on the calling thread). ``on_tokens``, when given, is
        called with each step's new tokens on the loop's thread (it must not block; if it raises,
        the request fails with that error).

        Raises, before any work: `UnsupportedGeneration` for a model specdec cannot verify trees
        on; ValueError when the prompt plus ``max_new_tokens`` would pass the model's learned
        positions; `specdec.Overloaded` when ``max_queued`` requests are waiting already.
        """
        return self._enqueue(request, on_tokens, drive=False)[0]

    def decode(self, request: DecodeRequest, on_tokens: Callable[[list[int]], None] | None = None) -> DecodeResult:
        """Generate after ``request.prompt`` until EOS, a stop criterion or ``max_new_tokens``
        (`run`, then the result). Raises what `submit` raises, and the request's failure."""
        return self.run(request, on_tokens).wait()

    def run(self, request: DecodeRequest, on_tokens: Callable[[list[int]], None] | None = None) -> Stream:
        """`submit` ``request`` and return its `Stream` once the request has ended. The steps run
        on the calling thread when no loop runs (see `specdec.step.loop`): a blocking caller that
        also computes keeps all compute on its own thread. An interrupt (Ctrl-C) while this thread
        runs a step fails every request of the engine, and propagates."""
        stream, driving = self._enqueue(request, on_tokens, drive=True)
        self._finish(driving, [stream])
        return stream

    def decode_all(self, requests: list[DecodeRequest]) -> list[DecodeResult]:
        """Run ``requests`` to their ends, verified together (several per forward; on the calling
        thread when no loop runs). More requests than the queue holds are submitted as it makes room."""
        streams: list[Stream] = []
        driving = False
        try:
            for request in requests:
                while True:
                    try:
                        stream, mine = self._enqueue(request, None, drive=True)
                        break
                    except Overloaded:
                        if driving:  # run the loop here until it has admitted some
                            self.loop.drive_until(lambda: self.loop.room, keep=True)
                            driving = self.loop.driver is threading.current_thread()
                        elif not any(stream.ended is None for stream in streams):
                            raise
                        else:  # another thread drives: wait for one of ours to end
                            next(stream for stream in streams if stream.ended is None).wait_ended()
                driving = driving or mine
                streams.append(stream)
            self._finish(driving, streams)
            driving = False
            return [stream.wait() for stream in streams]
        finally:
            for stream in streams:
                stream.close()
            if driving:  # an error between submissions: the loop must not be left without a driver
                self.loop.drive_until(lambda: True)

    def _finish(self, driving: bool, streams: list[Stream]) -> None:
        """Until ``streams`` have ended: run the loop here if this thread drives it, else wait."""
        if driving:
            self.loop.drive_until(lambda: all(stream.ended is not None for stream in streams))
        for stream in streams:
            stream.wait_ended()

    def _enqueue(self, request: DecodeRequest, on_tokens, drive: bool) -> tuple[Stream, bool]:
        """The request's `Stream`, queued for the loop; and whether the calling thread must drive it."""
        if self.unsupported:
            raise UnsupportedGeneration(self.unsupported)
        prompt = request.prompt
        seen = (prompt if request.attended is None else prompt[request.attended]).tolist()
        limit = self.position_limit
        if limit is not None and len(seen) + request.max_new_tokens - 1 > limit:
            raise ValueError(f"the prompt ({len(seen)} tokens) plus max_new_tokens ({request.max_new_tokens}) would "
                             f"feed positions past the model's {limit} learned positions (transformers fails there "
                             "too): shorten one of them")
        check_logprobs(request, self.logits_size)
        if self.sharded and (self.loop.running or self.loop.queued):
            raise UnsupportedGeneration("concurrent requests under tensor parallelism are not supported: every rank "
                                        "must run the same requests in the same order")
        result = DecodeResult(tokens=[], stats=SpecStats())
        outbox, ticket = Outbox(on_tokens), Ticket(self.loop.wake)
        now = time.monotonic()
        seq = Sequence(request, result, outbox, ticket, next(self._sequences), seen, now,
                       None if request.timeout is None else now + request.timeout)
        stream = Stream(outbox, ticket, result)
        if request.max_new_tokens == 0:
            outbox.close(End.FINISHED)
            return stream, False
        return stream, self.loop.submit(seq, drive)

    @property
    def running(self) -> int:
        """Requests holding a cache row now (prefilling or decoding)."""
        return self.loop.running

    @property
    def queued(self) -> int:
        """Requests waiting for a cache row now."""
        return self.loop.queued

    # ------------------------------------------------------------------ learned state
    def reset(self) -> None:
        """Forget what the drafter learned (the scheduler's cost measurements are kept)."""
        with entry_for(self.model).lock:  # never inside a step
            self.drafter.reset()

    def state_dict(self) -> dict:
        """Everything learned: the drafters' state and the scheduler's statistics."""
        with entry_for(self.model).lock:
            return {"kind": "specdec-decoder", "drafter": self.drafter.name,
                    "drafter_state": self.drafter.state_dict(), "scheduler": self.scheduler.state_dict(),
                    "vocab_size": self.logits_size}

    def load_state_dict(self, state: dict) -> None:
        """Restore `state_dict` output. Everything is validated first; on any error (another
        drafter or vocabulary, malformed fields) a `drafters.state.StateError` is raised and the
        decoder is unchanged."""
        check_vocab_size(state, self.logits_size, "decoder state")
        if field(state, "drafter", "decoder state") != self.drafter.name:
            raise StateError(f"decoder state was saved for drafter {state.get('drafter')!r}; this decoder has "
                             f"{self.drafter.name!r}: build SpeculativeDecoder(..., drafter={state.get('drafter')!r})")
        scheduler = Scheduler()
        scheduler.load_state_dict(field(state, "scheduler", "decoder state"))
        with entry_for(self.model).lock:
            self.drafter.load_state_dict(field(state, "drafter_state", "decoder state"))
            self.scheduler.load_state_dict(scheduler.state_dict())

    def save(self, path) -> None:
        """Write `state_dict` to ``path`` (``torch.save``)."""
        torch.save(self.state_dict(), path)

    def load(self, path) -> None:
        """Read a file written by `save` (validated; see `load_state_dict`)."""
        self.load_state_dict(read_state_file(path, "specdec-decoder"))

