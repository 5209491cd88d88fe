"""Batched verification through the engine loop: every row of a batch decodes exactly as it would
alone (fp32 greedy), sequences join and leave between steps, concurrent threads share forwards,
and batched sampling keeps the target's distribution (with a negative control)."""

from __future__ import annotations

import threading

import pytest
import torch

import specdec
from specdec import ChatSession, SpeculativeDecoder
from specdec.api.arguments import prepare_request
from specdec.step.sampling import sampled_choices as exact_choices
from tests.conftest import hf_greedy, tiny_llama
from tests.test_families import FAMILIES
from tests.test_sampling import PROMPT as SAMPLE_PROMPT
from tests.test_sampling import SETTINGS, chi_square_p, exact_joint, make_small_model

ROWS = [[5, 6, 7, 8, 5, 6, 7, 8, 5, 6], [9, 10, 11, 9, 10], [3, 4, 5, 6, 7, 3, 4, 5, 6, 7, 3, 4, 5, 6, 7, 8],
        [12, 13, 12, 13, 12, 13, 12]]


@pytest.fixture(scope="module")
def small_model():
    return make_small_model()


def left_padded(rows: list[list[int]], pad: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``([B, L] ids, [B, L] mask)`` with each row padded on the left to the longest."""
    width = max(map(len, rows))
    ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    return ids, mask


def alone(model, row: list[int], new: int, eos: int = -1) -> list[int]:
    """HF greedy continuation of ``row`` by itself."""
    out = hf_greedy(model, torch.tensor([row]), new, eos_token_id=eos)
    return out[0, len(row):].tolist()


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("drafter", ["recycling", "ngram", "auto"])
def test_batched_generate_equals_each_row_alone(family, drafter):
    model = FAMILIES[family](seed=3)
    ids, mask = left_padded(ROWS)
    for kernel in (None, False):  # the tree kernel where it is exact, and the model's attention with masks
        decoder = SpeculativeDecoder(model, drafter=drafter, tree_kernel=kernel)
        out = decoder.generate(ids, attention_mask=mask, max_new_tokens=24, eos_token_id=-1, pad_token_id=0)
        assert out.shape == (len(ROWS), ids.shape[1] + 24)
        assert torch.equal(out[:, : ids.shape[1]], ids)
        for b, row in enumerate(ROWS):
            assert out[b, ids.shape[1]:].tolist() == alone(model, row, 24), (family, drafter, kernel, b)
        assert sum(s.drafted_tokens for s in decoder.last_stats) > 0  # trees were verified


def test_batched_generate_returns_what_hf_returns_with_eos_inside_blocks(model):
    """Rows end at different steps (EOS inside an accepted block): HF's batched output, padding after EOS."""
    ids, mask = left_padded(ROWS)
    eos = alone(model, ROWS[0], 30)[9]  # a token row 0 emits mid-answer
    reference = model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=30, eos_token_id=eos,
                               pad_token_id=0)
    decoder = SpeculativeDecoder(model, drafter="auto", tree_budget=8)  # trees every step, whatever this host's costs
    out = decoder.generate(ids, attention_mask=mask, max_new_tokens=30, eos_token_id=eos, pad_token_id=0)
    assert torch.equal(out, reference)
    lengths = [s.new_tokens for s in decoder.last_stats]
    assert len(set(lengths)) > 1 and min(lengths) < 30  # rows did finish at different steps
    assert max(s.mean_accepted_tokens for s in decoder.last_stats) > 1.0  # blocks of several tokens


def test_right_padding_and_mixed_drafters(model):
    """Right-padded rows continue from their last real token; a draft model and fixed budgets batch too."""
    width = max(map(len, ROWS))
    ids = torch.tensor([r + [0] * (width - len(r)) for r in ROWS])
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in ROWS])
    for drafter, budget in (("model", None), ("recycling+ngram", 6), ("ngram", 0)):
        draft_model = tiny_llama(seed=9) if drafter == "model" else None
        out = specdec.generate(model, ids, attention_mask=mask, drafter=drafter, draft_model=draft_model,
                               tree_budget=budget, max_new_tokens=16, eos_token_id=-1, pad_token_id=0)
        assert torch.equal(out[:, :width], ids)
        for b, row in enumerate(ROWS):
            assert out[b, width:].tolist() == alone(model, row, 16), (drafter, b)


def _request(decoder, row, new):
    request, _ = prepare_request(decoder, torch.tensor(row), None, None, None, None, None, None, None,
                                 {"max_new_tokens": new, "eos_token_id": -1})
    return request


def record_steps(decoder) -> list[int]:
    """Wrap ``decoder``'s decode step to record how many rows each step verified."""
    step, sizes = decoder.loop.step, []

    def counted(sequences):
        sizes.append(len(sequences))
        return step(sequences)

    decoder.loop.step = counted
    return sizes


def test_sequences_join_and_leave_between_steps(model):
    """Continuous batching: a cancelled sequence frees its row at the next step, a queued one takes it."""
    decoder = SpeculativeDecoder(model, drafter="auto", max_batch=2)
    sizes = record_steps(decoder)
    first = decoder.submit(_request(decoder, ROWS[0], 30))
    second = decoder.submit(_request(decoder, ROWS[1], 12))
    cancelled = next(second) + next(second)
    second.cancel()
    third = decoder.submit(_request(decoder, ROWS[2], 20))  # queued until a row is free
    fourth = decoder.submit(_request(decoder, ROWS[3], 25))
    results = [stream.wait() for stream in (first, third, fourth)]
    assert second.wait_ended().value == "cancelled" and second.result.tokens[: len(cancelled)] == cancelled
    assert cancelled == alone(model, ROWS[1], 12)[: len(cancelled)]
    for result, row, new in zip(results, (ROWS[0], ROWS[2], ROWS[3]), (30, 20, 25)):
        assert result.tokens == alone(model, row, new)
    assert max(sizes) == 2 and 1 in sizes  # rows shared forwards, never more than max_batch
    assert decoder.running == 0 and decoder.queued == 0 and decoder.cache.rows == 0  # every row freed
    assert decoder.metrics.ended == {"finished": 3, "cancelled": 1}


def test_threads_share_forwards_and_each_gets_its_own_answer(tiny_model_dir):
    model, tokenizer = specdec.load_model(str(tiny_model_dir), dtype="fp32")
    decoder = SpeculativeDecoder(model, tokenizer)
    questions = ["hello there", "what is this", "w1 w2 w3 w1 w2", "again and again", "w5 w6 w7", "this and that"]
    serial = [ChatSession(decoder.fork()).send(q, max_new_tokens=24, eos_token_id=-1) for q in questions]
    answers = [None] * len(questions)
    start = threading.Barrier(len(questions))

    def chat(i):
        start.wait()
        answers[i] = ChatSession(decoder).send(questions[i], max_new_tokens=24, eos_token_id=-1)

    threads = [threading.Thread(target=chat, args=(i,)) for i in range(len(questions))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert answers == serial
    metrics = decoder.metrics
    assert metrics.rows_stepped > 1.5 * metrics.verify_steps  # forwards really were shared
    assert decoder.running == 0 and decoder.queued == 0  # every row freed


def test_a_closed_stream_frees_its_row(tiny_model_dir):
    model, tokenizer = specdec.load_model(str(tiny_model_dir), dtype="fp32")
    decoder = SpeculativeDecoder(model, tokenizer)
    session = ChatSession(decoder)
    stream = session.stream("hello there", max_new_tokens=40, eos_token_id=-1)
    next(stream)
    assert decoder.running == 1
    stream.close()
    session.wait()  # the engine honours the close at its next step boundary
    assert decoder.running == 0 and decoder.cache.rows == 0
    assert session.send("what is this", max_new_tokens=8, eos_token_id=-1)  # still usable, KV reused


def test_loop_arguments_are_checked(model):
    for name in ("max_batch", "max_queued", "prefill_chunk"):
        for bad in (0, -1, 1.5, True):
            with pytest.raises(ValueError, match=name):
                SpeculativeDecoder(model, **{name: bad})


def test_rows_beyond_max_batch_wait_for_a_free_row(model):
    decoder = SpeculativeDecoder(model, drafter="ngram", max_batch=2, max_queued=1)
    sizes = record_steps(decoder)
    ids, mask = left_padded(ROWS)
    out = decoder.generate(ids, attention_mask=mask, max_new_tokens=10, eos_token_id=-1, pad_token_id=0)
    for b, row in enumerate(ROWS):
        assert out[b, ids.shape[1]:].tolist() == alone(model, row, 10)
    assert max(sizes) == 2  # four prompts, two rows; one queued at a time (the batch waited for room)


def _biased_choices(tree, probs, uniforms):
    """A plausible-looking but biased sampler: takes the mode whenever it has a fifth of the mass."""
    drawn = exact_choices(tree, probs, uniforms)
    top, mode = probs.max(dim=-1)
    return torch.where(top > 0.2, mode, drawn)


def test_batched_sampling_keeps_the_distribution(small_model, monkeypatch):
    rows, calls = 8, 150
    expected = exact_joint(small_model)
    batch = SAMPLE_PROMPT.repeat(rows, 1)

    def sample(calls):
        generator = torch.Generator().manual_seed(5)
        decoder = SpeculativeDecoder(small_model, drafter="auto", tree_budget=6)
        counts, widest = {}, 0
        for _ in range(calls):
            out = decoder.generate(batch, max_new_tokens=2, eos_token_id=-1, do_sample=True, generator=generator,
                                   **SETTINGS)
            for row in out[:, SAMPLE_PROMPT.shape[1]:].tolist():
                counts[tuple(row)] = counts.get(tuple(row), 0) + 1
            widest = max([widest] + [s.max_tree_width for s in decoder.last_stats])
        return counts, widest

    counts, widest = sample(calls)
    assert widest > 1
    assert chi_square_p(counts, expected, rows * calls) > 1e-3
    monkeypatch.setattr("specdec.step.sampling.sampled_choices", _biased_choices)
    broken, _ = sample(calls // 2)
    assert chi_square_p(broken, expected, rows * (calls // 2)) < 1e-6


def test_batched_drawn_trees_keep_the_distribution(small_model, monkeypatch):
    """Rows of one batch whose draft model drew their trees: each row is verified by rejection
    sampling in the shared step (it really ran), the rows keep the target's distribution, and a
    biased verifier in its place fails the same test."""
    from specdec.step.sampling import accept_drawn
    from tests.test_sampling import SMALL_V, broken_accept

    rows, calls = 6, 150
    expected = exact_joint(small_model)
    batch = SAMPLE_PROMPT.repeat(rows, 1)
    draft_model = tiny_llama(vocab_size=SMALL_V, seed=11)
    drawn = []

    def sample(calls):
        generator = torch.Generator().manual_seed(9)
        decoder = SpeculativeDecoder(small_model, drafter="model", draft_model=draft_model, tree_budget=6)
        sizes = record_steps(decoder)
        counts = {}
        for _ in range(calls):
            out = decoder.generate(batch, max_new_tokens=2, eos_token_id=-1, do_sample=True, generator=generator,
                                   **SETTINGS)
            for row in out[:, SAMPLE_PROMPT.shape[1]:].tolist():
                counts[tuple(row)] = counts.get(tuple(row), 0) + 1
        return counts, max(sizes)

    monkeypatch.setattr("specdec.step.sampling.accept_drawn",
                        lambda tree, probs: drawn.append(1) or accept_drawn(tree, probs))
    counts, widest_batch = sample(calls)
    assert drawn and widest_batch == rows  # drawn trees, verified rows together
    assert chi_square_p(counts, expected, rows * calls) > 1e-3
    monkeypatch.setattr("specdec.step.sampling.accept_drawn",
                        lambda tree, probs: broken_accept(tree, probs, tree.uniforms, threshold=0.05))
    broken, _ = sample(calls // 2)
    assert chi_square_p(broken, expected, rows * (calls // 2)) < 1e-6


def test_seeded_batched_sampling_repeats_and_rows_differ(small_model):
    batch = SAMPLE_PROMPT.repeat(4, 1)

    def run(seed):
        return specdec.generate(small_model, batch, max_new_tokens=12, eos_token_id=-1, do_sample=True,
                                generator=seed, **SETTINGS)

    assert torch.equal(run(11), run(11))
    assert len({tuple(row) for row in run(11).tolist()}) > 1  # each row draws its own sample
