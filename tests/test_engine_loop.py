"""The engine loop (issue 32): one loop owns the model; callers submit and read their own streams.

A full queue refuses at once; cancellation, deadlines and garbage collection are flags honoured at
the next step boundary (a request cancelled while queued is never prefilled); a long prompt joins
in chunks between the running rows' steps; the cache follows the rows live now; an allocation
failure or a failing row fails that request alone. Every surviving answer is HF's greedy one
(fp32), and nothing leaks: no row, no queued request, no thread.
"""

from __future__ import annotations

import gc
import threading

import pytest
import torch
from transformers.generation.logits_process import LogitsProcessor, LogitsProcessorList

from specdec import Cancelled, Overloaded, SpeculativeDecoder, TimedOut
from specdec.api.arguments import prepare_request
from specdec.step import loop as loop_module
from specdec.step.stream import End
from tests.conftest import hf_greedy, tiny_llama

TIMEOUT = 60  # seconds; a stuck engine shows up as a failure, never as a hung suite
PROMPTS = [[5, 6, 7, 8, 5, 6, 7, 8, 5, 6], [9, 10, 11, 9, 10], [3, 4, 5, 6, 7, 3, 4, 5, 6, 7, 3, 4],
           [12, 13, 12, 13, 12, 13, 12]]


@pytest.fixture(scope="module")
def model():
    return tiny_llama(seed=2)


def request(decoder, prompt, new: int = 16, **options):
    made, _ = prepare_request(decoder, torch.tensor(prompt), None, options.pop("logits_processor", None), None,
                              None, None, None, None, {"max_new_tokens": new, "eos_token_id": -1, **options})
    return made


def alone(model, prompt, new: int = 16) -> list[int]:
    return hf_greedy(model, torch.tensor([prompt]), new)[0, len(prompt):].tolist()


class Gate:
    """Holds the engine loop before each decode step until `open` (bounded: never hangs a test);
    records the rows of every step."""

    def __init__(self, decoder) -> None:
        self.opened, self.waiting = threading.Event(), threading.Event()
        self.sizes: list[int] = []
        step = decoder.loop.step

        def gated(sequences):
            self.waiting.set()
            assert self.opened.wait(TIMEOUT), "the gate was never opened"
            self.sizes.append(len(sequences))
            return step(sequences)

        decoder.loop.step = gated

    def open(self) -> None:
        self.opened.set()


def wait_idle(decoder) -> None:
    """Join the loop's thread: it returns once nothing is queued or running."""
    thread = decoder.loop.thread
    if thread is not None:
        thread.join(TIMEOUT)
        assert not thread.is_alive(), "the engine loop did not end although nothing was left"
    assert decoder.running == 0 and decoder.queued == 0 and decoder.cache.rows == 0 and decoder.cache.bytes == 0


def test_a_full_queue_refuses_at_once_and_the_rest_still_answer(model):
    decoder = SpeculativeDecoder(model, drafter="recycling+ngram", max_batch=1, max_queued=2)
    gate = Gate(decoder)
    first = decoder.submit(request(decoder, PROMPTS[0]))
    assert gate.waiting.wait(TIMEOUT)  # the first holds the only row; the loop waits at its first step
    queued = [decoder.submit(request(decoder, prompt)) for prompt in PROMPTS[1:3]]
    with pytest.raises(Overloaded, match="max_queued") as refused:
        decoder.submit(request(decoder, PROMPTS[3]))
    assert (refused.value.queued, refused.value.running, refused.value.retry_after) == (2, 1, 1)
    assert decoder.metrics.refused == 1
    gate.open()
    assert [stream.wait().tokens for stream in [first] + queued] == [alone(model, p) for p in PROMPTS[:3]]
    wait_idle(decoder)


def test_a_request_cancelled_while_queued_is_never_prefilled(model, monkeypatch):
    prefilled = []
    real = loop_module.prefill_chunk
    monkeypatch.setattr(loop_module, "prefill_chunk", lambda engine, seq, limit: prefilled.append(seq.request)
                        or real(engine, seq, limit))
    decoder = SpeculativeDecoder(model, max_batch=1)
    gate = Gate(decoder)
    first = decoder.submit(request(decoder, PROMPTS[0]))
    assert gate.waiting.wait(TIMEOUT)
    dropped = request(decoder, PROMPTS[1])
    stream = decoder.submit(dropped)
    stream.cancel()
    gate.open()
    assert stream.wait_ended() is End.CANCELLED and stream.tokens == [] and stream.wait().tokens == []
    assert first.wait().tokens == alone(model, PROMPTS[0])
    assert all(made is not dropped for made in prefilled) and len(prefilled) == 1
    wait_idle(decoder)


def test_a_stream_cancelled_from_another_thread_ends_at_the_next_step(model):
    decoder = SpeculativeDecoder(model, max_batch=2)
    keep, cut = decoder.submit(request(decoder, PROMPTS[0], 40)), decoder.submit(request(decoder, PROMPTS[1], 40))
    read = next(cut)
    closer = threading.Thread(target=cut.close)
    closer.start()
    closer.join(TIMEOUT)
    assert cut.wait_ended() is End.CANCELLED
    assert read == alone(model, PROMPTS[1], 40)[: len(read)]
    assert cut.result.tokens == alone(model, PROMPTS[1], 40)[: len(cut.result.tokens)] != alone(model, PROMPTS[1], 40)
    assert keep.wait().tokens == alone(model, PROMPTS[0], 40)
    wait_idle(decoder)


def test_a_stream_nobody_holds_is_cancelled_by_garbage_collection(model):
    decoder = SpeculativeDecoder(model)
    gate = Gate(decoder)
    sequences = []
    step = decoder.loop.step
    decoder.loop.step = lambda rows: sequences.extend(r for r in rows if r not in sequences) or step(rows)
    stream = decoder.submit(request(decoder, PROMPTS[0], 200))
    gate.open()
    next(stream)
    del stream
    gc.collect()
    [seq] = sequences
    assert seq.outbox.wait_end() is End.CANCELLED and len(seq.result.tokens) < 200
    wait_idle(decoder)


def test_a_deadline_cancels_at_the_next_step(model):
    decoder = SpeculativeDecoder(model)
    gate = Gate(decoder)
    late = request(decoder, PROMPTS[0], 64)
    late.timeout = 0.0
    stream = decoder.submit(late)
    gate.open()
    with pytest.raises(TimedOut):
        stream.wait()
    assert stream.ended is End.TIMED_OUT and decoder.metrics.ended == {"timed_out": 1}
    other = decoder.submit(request(decoder, PROMPTS[1]))
    assert other.wait().tokens == alone(model, PROMPTS[1])
    wait_idle(decoder)


def test_someone_elses_cancellation_raises_to_the_reader(model):
    decoder = SpeculativeDecoder(model)
    stream = decoder.submit(request(decoder, PROMPTS[0], 64))
    stream._ticket.cancel()  # e.g. a server cancelling on a client's disconnect
    with pytest.raises(Cancelled):
        list(stream)
    wait_idle(decoder)


def test_a_long_prompt_joins_in_chunks_between_the_running_rows_steps(model, monkeypatch):
    events = []
    real_prefill = loop_module.prefill_chunk

    def logged_prefill(engine, seq, limit):
        events.append(("prefill", seq.sequence_id, limit))
        return real_prefill(engine, seq, limit)

    monkeypatch.setattr(loop_module, "prefill_chunk", logged_prefill)
    decoder = SpeculativeDecoder(model, prefill_chunk=32)
    step = decoder.loop.step
    decoder.loop.step = lambda rows: events.append(("step", tuple(r.sequence_id for r in rows))) or step(rows)
    running = decoder.submit(request(decoder, PROMPTS[0], 120))
    next(running)  # decoding now
    long_prompt = [(7 * i) % 90 + 3 for i in range(300)]
    joining = decoder.submit(request(decoder, long_prompt, 8))
    assert joining.wait().tokens == alone(model, long_prompt, 8)
    assert running.wait().tokens == alone(model, PROMPTS[0], 120)
    chunks = [i for i, event in enumerate(events) if event[0] == "prefill" and event[1] == 1]
    assert len(chunks) == -(-299 // 32) and all(events[i][2] == 32 for i in chunks)  # 299 positions, 32 a chunk
    for a, b in zip(chunks, chunks[1:]):  # the running row stepped between every two chunks
        assert any(event[0] == "step" and 0 in event[1] for event in events[a:b])
    assert events[0] == ("prefill", 0, 2048)  # alone, a prompt is cached in one forward
    wait_idle(decoder)


def test_the_cache_follows_the_rows_live_now(model):
    decoder = SpeculativeDecoder(model, tree_budget=4)
    capacities = []
    step = decoder.loop.step
    decoder.loop.step = lambda rows: capacities.append(decoder.cache.capacity) or step(rows)
    big, small = decoder.submit(request(decoder, PROMPTS[0], 400)), decoder.submit(request(decoder, PROMPTS[1], 60))
    next(big)
    next(small)
    big.cancel()
    assert big.wait_ended() is End.CANCELLED
    mark = len(capacities)
    assert small.wait().tokens == alone(model, PROMPTS[1], 60)
    largest = max(capacities[:mark])
    assert largest >= 400 and capacities[mark:] and max(capacities[mark:]) < largest / 2  # shrunk to the live row
    wait_idle(decoder)  # idle: every buffer freed
    again = decoder.submit(request(decoder, PROMPTS[2], 20))
    assert again.wait().tokens == alone(model, PROMPTS[2], 20)
    assert max(capacities[-3:]) < largest / 2  # sized for this request, not the largest ever seen
    wait_idle(decoder)


def test_an_allocation_failure_fails_that_request_alone(model):
    decoder = SpeculativeDecoder(model, tree_budget=4)
    running = decoder.submit(request(decoder, PROMPTS[0], 40))
    next(running)
    allocate, calls = decoder.cache.allocate_layer, []

    def failing(shape):
        calls.append(shape)
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 1 TB")

    decoder.cache.allocate_layer = failing
    doomed = decoder.submit(request(decoder, PROMPTS[1], 40))  # needs a second row: the cache must grow
    with pytest.raises(RuntimeError, match="allocate"):
        doomed.wait()
    decoder.cache.allocate_layer = allocate
    assert calls and doomed.ended is End.FAILED
    assert running.wait().tokens == alone(model, PROMPTS[0], 40)
    assert decoder.submit(request(decoder, PROMPTS[2])).wait().tokens == alone(model, PROMPTS[2])
    wait_idle(decoder)


class Raises(LogitsProcessor):
    def __call__(self, input_ids, scores):
        raise ValueError("this request's processor failed")


def test_a_failing_row_fails_alone_and_the_others_stay_exact(model):
    decoder = SpeculativeDecoder(model, max_batch=4)
    gate = Gate(decoder)
    good = [decoder.submit(request(decoder, prompt, 24)) for prompt in PROMPTS[:3]]
    bad = decoder.submit(request(decoder, PROMPTS[3], 24, logits_processor=LogitsProcessorList([Raises()])))
    gate.open()
    with pytest.raises(ValueError, match="processor failed"):
        bad.wait()
    assert [stream.wait().tokens for stream in good] == [alone(model, prompt, 24) for prompt in PROMPTS[:3]]
    assert max(gate.sizes) == 4  # the failing row shared a forward with the others
    wait_idle(decoder)


def test_two_decoders_on_one_model_take_turns(model):
    first, second = SpeculativeDecoder(model, drafter="ngram"), SpeculativeDecoder(model, drafter="recycling")
    streams = [decoder.submit(request(decoder, prompt, 32)) for decoder in (first, second) for prompt in PROMPTS]
    results = [stream.wait().tokens for stream in streams]
    assert results == [alone(model, prompt, 32) for prompt in PROMPTS] * 2
    wait_idle(first)
    wait_idle(second)


def record_threads(decoder) -> list[tuple[int, str]]:
    """Wrap ``decoder``'s step to record (rows, thread name) of every step."""
    step, seen = decoder.loop.step, []

    def recorded(sequences):
        seen.append((len(sequences), threading.current_thread().name))
        return step(sequences)

    decoder.loop.step = recorded
    return seen


def test_a_blocking_call_runs_its_steps_on_its_own_thread(model):
    """With nobody else driving, ``decode`` (``generate``) steps on the caller's thread: all compute
    on one thread (a second OpenMP team would slow both), and no thread is left behind."""
    decoder = SpeculativeDecoder(model)
    steps = record_threads(decoder)
    assert decoder.decode(request(decoder, PROMPTS[0], 24)).tokens == alone(model, PROMPTS[0], 24)
    assert steps and {name for _, name in steps} == {threading.current_thread().name}
    assert decoder.loop.driver is None and decoder.loop.thread is None
    wait_idle(decoder)


def test_a_blocking_caller_lets_its_openmp_team_go_when_it_stops_driving(model, monkeypatch):
    """Its team would otherwise throttle the next driver's compute (`specdec.device.openmp`)."""
    decoder = SpeculativeDecoder(model)
    released = []
    monkeypatch.setattr(loop_module, "release_thread_team", lambda: released.append(threading.current_thread().name))
    caller = threading.Thread(target=lambda: decoder.decode(request(decoder, PROMPTS[0], 8)), name="blocking-caller")
    caller.start()
    caller.join(TIMEOUT)
    assert released == ["blocking-caller"]
    decoder.submit(request(decoder, PROMPTS[1], 8)).wait()  # the loop's own thread: its team ends with it
    assert released == ["blocking-caller"]
    wait_idle(decoder)


def test_a_blocking_caller_hands_the_loop_over_when_others_remain(model):
    decoder = SpeculativeDecoder(model)
    steps = record_threads(decoder)
    joined = threading.Event()
    stream = []
    step = decoder.loop.step

    def first_step_admits_another(sequences):  # while the blocking caller drives, a stream joins
        if not joined.is_set():
            joined.set()
            stream.append(decoder.submit(request(decoder, PROMPTS[1], 64)))
        return step(sequences)

    decoder.loop.step = first_step_admits_another
    caller = threading.Thread(target=lambda: stream.append(decoder.decode(request(decoder, PROMPTS[0], 8))),
                              name="blocking-caller")
    caller.start()
    caller.join(TIMEOUT)
    streamed, short = stream
    assert short.tokens == alone(model, PROMPTS[0], 8)
    assert streamed.wait().tokens == alone(model, PROMPTS[1], 64)  # went on after its driver left
    names = [name for _, name in steps]
    assert names[0] == "blocking-caller" and names[-1] == "specdec-engine"
    assert any(rows == 2 for rows, _ in steps)  # the two shared forwards while the caller drove
    wait_idle(decoder)


def test_an_interrupt_inside_a_blocking_callers_step_fails_every_request_and_leaves_a_clean_engine(model):
    decoder = SpeculativeDecoder(model)
    step, calls = decoder.loop.step, []

    def interrupted(sequences):
        calls.append(len(sequences))
        if len(calls) == 3:
            raise KeyboardInterrupt
        return step(sequences)

    decoder.loop.step = interrupted
    other = []
    hook = decoder.loop.step

    def admit_another(sequences):
        if not other:
            other.append(decoder.submit(request(decoder, PROMPTS[1], 64)))
        return hook(sequences)

    decoder.loop.step = admit_another
    with pytest.raises(KeyboardInterrupt):
        decoder.decode(request(decoder, PROMPTS[0], 64))
    with pytest.raises(RuntimeError, match="interrupted"):
        other[0].wait()
    decoder.loop.step = step
    wait_idle(decoder)
    assert decoder.decode(request(decoder, PROMPTS[2])).tokens == alone(model, PROMPTS[2])
