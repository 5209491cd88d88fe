"""Regression tests for the defects a wary user found (issue 13): threads, state files, position
limits, vocabulary checks, the chat and bench CLIs, drop-in argument handling, n-gram eviction."""

from __future__ import annotations

import gc
import queue
import re
import threading

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2Config, GPT2LMHeadModel

import specdec
from drafters import NGramDrafter, TokenRecycling
from drafters.ngram import NGramIndex
from drafters.state import StateError
from specdec import ChatSession, SpeculativeDecoder
from specdec.cli import main
from tests.conftest import ScriptedDrafter, hf_greedy, tiny_llama

NEW = 12
TIMEOUT = 120  # seconds; a deadlock shows up as a timeout, never as a hang of the suite


@pytest.fixture(scope="module")
def pair(tiny_model_dir):
    return AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval(), AutoTokenizer.from_pretrained(tiny_model_dir)


def run_in_thread(function, *args):
    """``function(*args)`` on another thread; its result, or a failure if it does not end in time."""
    results: queue.Queue = queue.Queue()
    thread = threading.Thread(target=lambda: results.put(function(*args)), daemon=True)
    thread.start()
    thread.join(TIMEOUT)
    assert not thread.is_alive(), f"{function.__name__} did not finish within {TIMEOUT} s (blocked by a lock?)"
    return results.get_nowait()


# ---------------------------------------------------------------- 1. no lock held across yields
def test_an_open_stream_never_blocks_another_threads_generation(pair):
    model, tokenizer = pair
    decoder = SpeculativeDecoder(model, tokenizer, tree_budget=2)
    serial_open = ChatSession(decoder).send("hello there", max_new_tokens=40, eos_token_id=-1)
    serial_other = ChatSession(decoder).send("what is this", max_new_tokens=NEW)
    holder = ChatSession(decoder)
    opened, release = threading.Event(), threading.Event()
    chunks: list[str] = []

    def hold_open():  # a web handler that stops reading after the first chunk
        stream = holder.stream("hello there", max_new_tokens=40, eos_token_id=-1)
        chunks.append(next(stream))
        opened.set()
        release.wait(TIMEOUT)
        chunks.extend(stream)  # then reads the rest
        return "".join(chunks)

    holding = threading.Thread(target=lambda: chunks.append(hold_open()), daemon=True)
    holding.start()
    assert opened.wait(TIMEOUT)
    assert run_in_thread(lambda: ChatSession(decoder).send("what is this", max_new_tokens=NEW)) == serial_other
    assert run_in_thread(lambda: decoder.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=8,
                                                  eos_token_id=-1).tolist()) == \
        hf_greedy(model, torch.tensor([[5, 6, 7]]), 8).tolist()
    release.set()
    holding.join(TIMEOUT)
    assert chunks[-1] == serial_open  # the held stream still ends with the serial answer


def test_a_stream_is_read_and_closed_from_other_threads(pair):
    model, tokenizer = pair
    decoder = SpeculativeDecoder(model, tokenizer, tree_budget=2)
    expected = ChatSession(decoder).send("hello there", max_new_tokens=40, eos_token_id=-1)
    session = ChatSession(decoder)
    stream = session.stream("hello there", max_new_tokens=40, eos_token_id=-1)
    pieces = []
    while True:  # a thread pool: every next() on a different thread
        piece = run_in_thread(lambda: next(stream, None))
        if piece is None:
            break
        pieces.append(piece)
    assert "".join(pieces) == expected
    cancelled = ChatSession(decoder)
    stream = cancelled.stream("hello there", max_new_tokens=40, eos_token_id=-1)
    first = run_in_thread(next, stream)
    run_in_thread(stream.close)  # closed by a thread that did not start it
    assert cancelled.history[-1]["content"].startswith(first.strip())
    assert cancelled.send("what is this", max_new_tokens=NEW)  # the session is usable again


def test_an_abandoned_stream_is_released_by_garbage_collection(pair):
    model, tokenizer = pair
    decoder = SpeculativeDecoder(model, tokenizer, tree_budget=2)
    session = ChatSession(decoder)
    stream = session.stream("hello there", max_new_tokens=40, eos_token_id=-1)
    next(stream)
    with pytest.raises(RuntimeError, match="still answering"):
        next(session.stream("and again"))
    del stream
    gc.collect()
    assert session.history[-1]["role"] == "assistant"  # the partial answer was recorded
    assert run_in_thread(lambda: session.send("and again", max_new_tokens=NEW))


# ---------------------------------------------------------------- 2, 4, 6. state files
def test_out_of_vocabulary_successor_is_refused_not_a_segfault(tmp_path):
    drafter = TokenRecycling(50, k=4)
    state = drafter.state_dict()
    state["succ"][3, 0] = 10_000  # a crafted file: an id far outside the vocabulary
    torch.save({"kind": "specdec-drafter", "drafter": "recycling", "state": state}, tmp_path / "bad.pt")
    fresh = TokenRecycling(50, k=4)
    with pytest.raises(StateError, match="above the allowed maximum 49"):
        fresh.load(tmp_path / "bad.pt")
    assert (fresh.succ == -1).all()  # nothing was loaded
    from drafters import DraftContext

    assert len(fresh.propose(DraftContext(np.array([3])), 8)) == 0


def test_ngram_state_refuses_another_vocabulary(tmp_path):
    decoder = SpeculativeDecoder(tiny_llama(), drafter="ngram")
    decoder.generate(torch.tensor([[5, 6, 7, 5, 6, 7, 5]]), max_new_tokens=10, eos_token_id=-1)
    decoder.drafter.save(tmp_path / "ngram.pt")
    other = NGramDrafter(vocab_size=50)
    with pytest.raises(StateError, match="vocabulary of 96 tokens; this one has 50"):
        other.load(tmp_path / "ngram.pt")
    same = NGramDrafter(vocab_size=96)
    same.load(tmp_path / "ngram.pt")
    assert same.stored_outputs() == decoder.drafter.stored_outputs() != []
    decoder.save(tmp_path / "decoder.pt")
    with pytest.raises(StateError, match="vocabulary of 96 tokens; this one has 80"):
        SpeculativeDecoder(tiny_llama(vocab_size=80), drafter="ngram").load(tmp_path / "decoder.pt")


def test_load_errors_say_what_the_file_is(tmp_path, model):
    decoder = SpeculativeDecoder(model, drafter="recycling")
    decoder.save(tmp_path / "decoder.pt")
    decoder.drafter.save(tmp_path / "drafter.pt")
    with pytest.raises(StateError, match=r"is a specdec-decoder file \(read it with SpeculativeDecoder.load\)"):
        decoder.drafter.load(tmp_path / "decoder.pt")
    with pytest.raises(StateError, match=r"is a specdec-drafter file \(read it with Drafter.load\)"):
        decoder.load(tmp_path / "drafter.pt")
    data = (tmp_path / "decoder.pt").read_bytes()
    (tmp_path / "truncated.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(StateError, match="truncated"):
        decoder.load(tmp_path / "truncated.pt")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        decoder.load(tmp_path / "missing.pt")


# ---------------------------------------------------------------- 3. learned absolute positions
@pytest.mark.parametrize("drafter", ["recycling", "ngram", "recycling+ngram", "model"])
@pytest.mark.parametrize("max_new_tokens", [1, 2])
def test_draft_nodes_past_the_position_table_are_pruned(drafter, max_new_tokens):
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=96, n_embd=32, n_layer=2, n_head=2, n_positions=32)).eval()
    prompt = torch.tensor([[5, 6, 7, 8] * 7 + [5, 6]])  # 30 tokens: repetitive, so drafts are deep
    reference = hf_greedy(model, prompt, max_new_tokens)
    decoder = SpeculativeDecoder(model, drafter=drafter, tree_budget=8,
                                 draft_model=model if drafter == "model" else None)
    assert decoder.generate(prompt, max_new_tokens=max_new_tokens, eos_token_id=-1).tolist() == reference.tolist()
    with pytest.raises(ValueError, match="past the model's 32 learned positions"):
        decoder.generate(prompt, max_new_tokens=4, eos_token_id=-1)


# ---------------------------------------------------------------- 5. specdec chat keeps the conversation
def test_chat_survives_bad_files(tiny_model_dir, tmp_path):
    (tmp_path / "corrupt.pt").write_bytes(b"\x00garbage")
    (tmp_path / "state.pt").write_bytes(b"PK\x03\x04truncated")
    commands = f"hello there\n/load {tmp_path / 'corrupt.pt'}\n/load {tmp_path / 'nothing.pt'}\nand again\n/quit\n"
    result = CliRunner().invoke(main, ["chat", "--model", str(tiny_model_dir), "--dtype", "fp32", "--max-new-tokens",
                                       "6", "--state", str(tmp_path / "state.pt")], input=commands)
    assert result.exit_code == 0, result.output
    assert "Traceback" not in result.output
    assert "--state" in result.output and "not loaded" in result.output
    assert "/load failed" in result.output and "not a readable specdec state file" in result.output
    reused = [int(n) for n in re.findall(r"\(reused (\d+)\)", result.output)]
    assert len(reused) == 2 and reused[1] > 0  # both turns answered; the second continued the conversation
    assert (tmp_path / "state.pt").read_bytes() == b"PK\x03\x04truncated"  # the bad file was left alone


# ---------------------------------------------------------------- 7. specdec bench input errors
@pytest.mark.parametrize("case", ["non-utf8", "missing-model"])
def test_bench_input_errors_are_one_line_exit_2(tmp_path, case):
    dataset = tmp_path / "q.jsonl"
    if case == "non-utf8":
        dataset.write_bytes(b'{"question_id": 1, "category": "qa", "turns": ["caf\xe9"]}\n')
        args = ["--dataset", str(dataset)]
    else:
        args = ["--model", str(tmp_path / "no-such-model")]
    result = CliRunner().invoke(main, ["bench", *args])
    assert result.exit_code == 2 and isinstance(result.exception, SystemExit)
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error:"), result.output
    assert ("not UTF-8" if case == "non-utf8" else "not found") in lines[0]


# ---------------------------------------------------------------- 8. drop-in differences from HF
@pytest.mark.parametrize("prompt", [[5, 17, 0, 33, 8, 0, 41, 12], [0, 0, 5, 17, 33, 8, 41, 12]],
                         ids=["pad-inside", "left-padded"])
def test_pad_token_in_an_unmasked_prompt_follows_hf(model, prompt):
    prompt = torch.tensor([prompt])
    reference = model.generate(prompt, do_sample=False, max_new_tokens=NEW, pad_token_id=0, eos_token_id=-1)
    for drafter in ("recycling", "ngram"):
        out = specdec.generate(model, prompt, drafter=drafter, max_new_tokens=NEW, pad_token_id=0, eos_token_id=-1)
        assert out.tolist() == reference.tolist()
    mask = torch.ones_like(prompt)
    assert specdec.generate(model, prompt, attention_mask=mask, max_new_tokens=NEW, pad_token_id=0,
                            eos_token_id=-1).tolist() == model.generate(
        prompt, attention_mask=mask, do_sample=False, max_new_tokens=NEW, pad_token_id=0, eos_token_id=-1).tolist()
    with pytest.raises(specdec.UnsupportedGeneration, match="last token is masked"):
        specdec.generate(model, torch.tensor([[5, 6, 0]]), max_new_tokens=4, pad_token_id=0)


def test_sampling_only_values_are_ignored_under_greedy_like_hf(model):
    prompt = torch.tensor([[5, 6, 7, 8]])
    reference = model.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False, top_p=1.5,
                               max_new_tokens=NEW, eos_token_id=-1, pad_token_id=0)  # HF logs and ignores top_p
    out = specdec.generate(model, prompt, do_sample=False, top_p=1.5, max_new_tokens=NEW, eos_token_id=-1)
    assert out.tolist() == reference.tolist()
    with pytest.raises(ValueError, match="top_p"):
        specdec.generate(model, prompt, do_sample=True, top_p=1.5, max_new_tokens=NEW)


# ---------------------------------------------------------------- 9. incremental n-gram eviction
def test_full_ngram_store_evicts_incrementally():
    rng = np.random.default_rng(0)
    drafter = NGramDrafter(vocab_size=12, min_n=1, max_n=3, store_tokens=60)
    store = drafter._store
    outputs = []
    for i in range(40):
        output = rng.integers(0, 12, int(rng.integers(3, 15))).tolist()
        drafter._remember(output)
        outputs.append(output)
        kept = drafter.stored_outputs()
        assert sum(len(o) + 1 for o in kept) <= 60 and kept == [o for o in outputs if o in kept][-len(kept):]
        assert drafter._store is store  # never rebuilt
        fresh = NGramIndex(1, 3)
        for o in kept:
            fresh.extend(o + [-1])
        for n in (1, 2, 3):
            for suffix in {tuple(o[j: j + n]) for o in kept for j in range(len(o) - n + 1)}:
                assert store.continuations(suffix, 4, 50) == fresh.continuations(suffix, 4, 50), suffix
        assert sum(len(v) for v in store.ends.values()) - sum(store._first.values()) == \
            sum(len(v) for v in fresh.ends.values())  # no stale positions survive
    assert len(store._tokens) <= 2 * 60 + 64  # the token list is trimmed as it goes


def test_sessions_interleave_their_ngram_contexts():
    """Steps of two sequences interleave (threads): each keeps its own context, so its drafts are
    those of a drafter that sees it alone, and each finished output enters the store once."""
    from drafters import DraftContext

    shared = NGramDrafter(vocab_size=50, min_n=1, max_n=2)
    alone = {1: NGramDrafter(vocab_size=50, min_n=1, max_n=2), 2: NGramDrafter(vocab_size=50, min_n=1, max_n=2)}
    a, b = [1, 2, 3, 4, 1, 2], [7, 8, 9, 7, 8]
    for step in range(4):
        for sequence_id, tokens in ((1, a + [3, 4, 1][:step]), (2, b + [9, 7, 8][:step])):
            ctx = DraftContext(np.array(tokens), sequence_id, 2)
            mine, reference = shared.propose(ctx, 4), alone[sequence_id].propose(ctx, 4)
            assert len(mine) > 0 and mine.tokens.tolist() == reference.tokens.tolist()
    shared.end_sequence(1)
    shared.end_sequence(2)
    shared.end_sequence(2)  # a second end is a no-op
    assert shared.stored_outputs() == [a[2:] + [3, 4, 1], b[2:] + [9, 7, 8]]


def test_a_drafter_proposing_ids_outside_the_vocabulary_is_a_clear_error(model):
    """A custom drafter's tree is host input too: an id past the model's vocabulary never reaches
    the embedding (an IndexError there, or a device-side assert on CUDA)."""
    vocab = model.get_input_embeddings().num_embeddings
    drafter = ScriptedDrafter(None, depth=3, vocab_size=vocab + 50, seed=1)
    decoder = SpeculativeDecoder(model, drafter=drafter, tree_budget=3)
    with pytest.raises(ValueError, match="outside the model's vocabulary"):
        for _ in range(20):  # random ids: some step proposes one past the vocabulary
            decoder.generate(torch.tensor([[3, 4, 5, 6]]), max_new_tokens=8, eos_token_id=-1)
