"""Faults injected into the engine loop, the way it fails in production, repeated (issue 32).

Each round floods one engine (kept across rounds, so anything that leaks accumulates) with more
requests than it has rows and queue places, while a drafter raises on about 1 % of proposals,
other threads close streams at random steps, readers vanish while their request is queued or
mid-stream, and an allocation fails now and then. After every round: no row in use, nothing
queued, no more rows than the batch limit were ever allocated, and every request that finished
answered exactly what ``model.generate`` answers for its prompt alone (fp32 greedy).
"""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from drafters import Drafter, make_drafter
from specdec import Overloaded, SpeculativeDecoder
from specdec.api.arguments import prepare_request
from specdec.step.stream import End
from tests.conftest import hf_greedy, tiny_llama

ROUNDS = 50
NEW = 12
TIMEOUT = 60
PROMPTS = [[5, 6, 7, 8, 5, 6, 7, 8, 5, 6], [9, 10, 11, 9, 10], [3, 4, 5, 6, 7, 3, 4, 5, 6, 7, 3, 4],
           [12, 13, 12, 13, 12, 13, 12], [20, 21, 22, 23, 20, 21], [40, 41, 40, 41, 40, 41, 40, 41, 40]]


class FlakyDrafter(Drafter):
    """recycling+ngram that raises on a fraction of its proposals (before touching any state)."""

    name = "flaky"

    def __init__(self, vocab_size: int, rate: float, seed: int) -> None:
        self.inner = make_drafter("recycling+ngram", vocab_size)
        self.feedback_topk, self.needs_features = self.inner.feedback_topk, self.inner.needs_features
        self.rate, self.rng, self.failures = rate, np.random.default_rng(seed), 0
        self._lock = threading.Lock()

    def propose(self, ctx, budget):
        with self._lock:
            fail = self.rng.random() < self.rate
        if fail:
            self.failures += 1
            raise RuntimeError("injected drafter failure")
        return self.inner.propose(ctx, budget)

    def observe(self, feedback):
        self.inner.observe(feedback)

    def end_sequence(self, sequence_id):
        self.inner.end_sequence(sequence_id)

    def reset(self):
        self.inner.reset()


@pytest.fixture(scope="module")
def model():
    return tiny_llama(seed=4)


@pytest.fixture(scope="module")
def expected(model):
    return {tuple(p): hf_greedy(model, torch.tensor([p]), NEW)[0, len(p):].tolist() for p in PROMPTS}


def test_faults_repeated_leave_the_engine_clean_and_survivors_exact(model, expected):
    drafter = FlakyDrafter(96, rate=0.01, seed=0)
    decoder = SpeculativeDecoder(model, drafter=drafter, max_batch=3, max_queued=4)
    rng = np.random.default_rng(1)
    allocate = decoder.cache.allocate_layer
    most_rows, outcomes = [0], {end: 0 for end in End} | {"refused": 0}
    step = decoder.loop.step

    def watched(rows):
        most_rows[0] = max(most_rows[0], decoder.cache.rows)
        return step(rows)

    decoder.loop.step = watched
    for round_idx in range(ROUNDS):
        fail_allocation = round_idx % 10 == 3  # every tenth round, the next allocation fails
        if fail_allocation:
            def failing(shape):
                decoder.cache.allocate_layer = allocate  # once
                raise RuntimeError("injected allocation failure: can't allocate memory")

            decoder.cache.allocate_layer = failing
        streams, prompts, threads = [], [], []
        for _ in range(int(rng.integers(5, 10))):  # more than rows + queue places: some are refused
            prompt = PROMPTS[int(rng.integers(len(PROMPTS)))]
            made, _ = prepare_request(decoder, torch.tensor(prompt), None, None, None, None, None, None, None,
                                      {"max_new_tokens": NEW, "eos_token_id": -1})
            try:
                stream = decoder.submit(made)
            except Overloaded:
                outcomes["refused"] += 1
                continue
            streams.append(stream)
            prompts.append(prompt)
            fate = rng.random()
            if fate < 0.15:  # the reader vanishes at once: queued, or just admitted
                stream.cancel()
            elif fate < 0.35:  # another thread closes it after a random number of steps
                threads.append(threading.Thread(target=close_after, args=(stream, int(rng.integers(1, 4)))))
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(TIMEOUT)
            assert not thread.is_alive()
        for stream, prompt in zip(streams, prompts):
            end = stream.wait_ended()
            outcomes[end] += 1
            if end is End.FINISHED:
                assert stream.result.tokens == expected[tuple(prompt)], (round_idx, prompt)
            else:  # cut short: what it produced is still the start of the exact answer
                assert stream.result.tokens == expected[tuple(prompt)][: len(stream.result.tokens)]
        thread = decoder.loop.thread
        if thread is not None:
            thread.join(TIMEOUT)
            assert not thread.is_alive(), f"round {round_idx}: the loop did not end with nothing left"
        assert decoder.running == 0 and decoder.queued == 0, round_idx
        assert decoder.cache.rows == 0 and decoder.cache.bytes == 0, round_idx
        decoder.cache.allocate_layer = allocate
    assert most_rows[0] <= 3
    assert drafter.failures > 0 and outcomes[End.FAILED] >= drafter.failures  # the faults did happen
    assert outcomes[End.FINISHED] > ROUNDS and outcomes[End.CANCELLED] > 0 and outcomes["refused"] > 0, outcomes


def close_after(stream, steps: int) -> None:
    """Read ``steps`` steps of ``stream`` (fewer if it ends), then close it from this thread."""
    try:
        for _ in range(steps):
            if next(stream, None) is None:
                break
    except RuntimeError:  # an injected failure ended it first (the main thread checks how it ended)
        pass
    stream.close()
