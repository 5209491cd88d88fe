"""Chat sessions: multi-turn equality with HF generate, KV reuse, threads, cancellation,
save/load, prefix mismatches, streaming text, and `specdec chat` through a pseudo-terminal."""

from __future__ import annotations

import os
import pty
import select
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from drafters.state import StateError
from specdec import ChatSession, SpeculativeDecoder
from specdec.models.prompts import encode_chat

NEW = 12
ROOT_DIR = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def pair(tiny_model_dir):
    return AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval(), AutoTokenizer.from_pretrained(tiny_model_dir)


def hf_answer(model, tokenizer, messages) -> str:
    """The next answer as HF generate gives it on the full templated history."""
    ids = encode_chat(tokenizer, messages)
    out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=NEW)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def hf_conversation(model, tokenizer, turns, system=None, history=None) -> list[str]:
    messages = ([{"role": "system", "content": system}] if system else []) + list(history or [])
    answers = []
    for turn in turns:
        messages.append({"role": "user", "content": turn})
        answers.append(hf_answer(model, tokenizer, messages))
        messages.append({"role": "assistant", "content": answers[-1]})
    return answers


TURNS = ["hello there", "and again what is this", "w1 w2 w3 hello", "is this again"]


def test_multi_turn_equals_hf_turn_by_turn_with_kv_reuse(pair):
    model, tokenizer = pair
    session = ChatSession(SpeculativeDecoder(model, tokenizer), system_prompt="w5 w6 w7")
    expected = hf_conversation(model, tokenizer, TURNS, system="w5 w6 w7")
    for i, (turn, answer) in enumerate(zip(TURNS, expected)):
        assert session.send(turn, max_new_tokens=NEW) == answer
        stats = session.last_stats
        if i:  # everything before this turn's new user message is already cached
            assert stats.reused_prefix_tokens > stats.prefilled_tokens > 0
        else:
            assert stats.reused_prefix_tokens == 0
    assert [m["content"] for m in session.history[1::2]] == expected
    assert [m["role"] for m in session.messages()[:3]] == ["system", "user", "assistant"]


def test_sessions_on_threads_match_serial_runs(pair):
    model, tokenizer = pair
    decoder = SpeculativeDecoder(model, tokenizer)
    conversations = [[f"w{i} w{i + 1} hello", f"w{2 * i} is this"] for i in range(8)]
    serial = []
    for turns in conversations:
        session = ChatSession(decoder)
        serial.append([session.send(t, max_new_tokens=NEW) for t in turns])
    results: dict[int, list[str]] = {}
    start = threading.Barrier(8)

    def run(index):
        session = ChatSession(decoder)
        start.wait()
        results[index] = [session.send(t, max_new_tokens=NEW) for t in conversations[index]]

    threads = [threading.Thread(target=run, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert [results[i] for i in range(8)] == serial
    assert serial == [hf_conversation(model, tokenizer, turns) for turns in conversations]


def test_cancelled_stream_leaves_sessions_consistent(pair):
    model, tokenizer = pair
    decoder = SpeculativeDecoder(model, tokenizer, tree_budget=2)
    cancelled, other = ChatSession(decoder), ChatSession(decoder)
    stream = cancelled.stream("hello there", max_new_tokens=40, eos_token_id=-1)
    first = next(stream)
    stream.close()
    partial = cancelled.history[-1]["content"]
    assert first and partial.startswith(first.strip()) and len(partial.split()) < 40
    assert cancelled.last_stats.new_tokens < 40
    # the other session, and the cancelled one's next turn, are exact
    assert other.send("what is this", max_new_tokens=NEW) == hf_answer(model, tokenizer, [
        {"role": "user", "content": "what is this"}])
    expected = hf_conversation(model, tokenizer, ["and again"], history=cancelled.history)
    assert cancelled.send("and again", max_new_tokens=NEW) == expected[0]


def test_save_and_load_round_trip(pair, tmp_path):
    model, tokenizer = pair
    decoder = SpeculativeDecoder(model, tokenizer)
    session = ChatSession(decoder, system_prompt="w9", own_drafter=True)
    session.send("hello there", max_new_tokens=NEW)
    session.save(tmp_path / "chat.pt")
    restored = ChatSession.load(tmp_path / "chat.pt", decoder)
    assert restored.history == session.history and restored.system_prompt == "w9" and restored.own_drafter
    assert restored.decoder.drafter is not decoder.drafter  # private drafter state came back privately
    assert restored.send("and again", max_new_tokens=NEW) == session.send("and again", max_new_tokens=NEW)
    (tmp_path / "bad.pt").write_bytes(b"nope")
    with pytest.raises(StateError, match="not a readable specdec state file"):
        ChatSession.load(tmp_path / "bad.pt", decoder)


def test_cache_prefix_mismatch_still_answers_correctly(pair):
    model, tokenizer = pair
    session = ChatSession(SpeculativeDecoder(model, tokenizer))
    session.send("hello there", max_new_tokens=NEW)
    session.send("what is this", max_new_tokens=NEW)
    session.history[1]["content"] = "w3 w4 w5"  # an edited earlier answer: the cache no longer matches
    expected = hf_conversation(model, tokenizer, ["and again"], history=session.history)
    assert session.send("and again", max_new_tokens=NEW) == expected[0]
    assert 0 < session.last_stats.reused_prefix_tokens < 12  # only the common prefix was reused
    session.reset()
    assert session.history == [] and session.send("hello there", max_new_tokens=NEW) == hf_conversation(
        model, tokenizer, ["hello there"])[0]


def test_stream_yields_whole_characters(pair):
    model, tokenizer = pair
    session = ChatSession(SpeculativeDecoder(model, tokenizer))
    chunks = list(session.stream("hello there", max_new_tokens=NEW))
    assert "".join(chunks) == session.history[-1]["content"]
    with pytest.raises(ValueError, match="message is empty"):
        session.send("   ")


def test_shared_and_private_drafters(pair):
    model, tokenizer = pair
    decoder = SpeculativeDecoder(model, tokenizer)
    assert ChatSession(decoder).decoder is decoder
    private = ChatSession(decoder, own_drafter=True).decoder
    assert private.drafter is not decoder.drafter and private.scheduler is decoder.scheduler
    with pytest.raises(ValueError, match="tokenizer"):
        ChatSession(SpeculativeDecoder(model))


def read_until(fd, marker: str, count: int, timeout: float = 120.0) -> str:
    """Read the pseudo-terminal until ``marker`` appeared ``count`` times."""
    seen, deadline = "", time.time() + timeout
    while seen.count(marker) < count:
        remaining = deadline - time.time()
        assert remaining > 0, f"timed out waiting for {marker!r}; got:\n{seen}"
        ready, _, _ = select.select([fd], [], [], remaining)
        if ready:
            try:
                data = os.read(fd, 4096)
            except OSError:
                break
            seen += data.decode("utf-8", "replace")
    return seen


def test_specdec_chat_through_a_pseudo_terminal(tiny_model_dir):
    main, secondary = pty.openpty()
    process = subprocess.Popen(
        [sys.executable, "-c", "from specdec.cli import main; main()", "chat", "--model", str(tiny_model_dir),
         "--dtype", "fp32", "--max-new-tokens", "8"],
        stdin=secondary, stdout=secondary, stderr=secondary, cwd=ROOT_DIR, close_fds=True,
    )
    os.close(secondary)
    try:
        read_until(main, "> ", 1)
        os.write(main, b"hello there\n")
        first = read_until(main, "tok/s", 1)
        os.write(main, b"and again\n")
        second = read_until(main, "tok/s", 1)
        assert "mean accepted tokens per step" in first and "reused" in second
        os.write(main, b"/quit\n")
        assert process.wait(timeout=60) == 0
    finally:
        if process.poll() is None:
            process.kill()
        os.close(main)


def test_send_streams_its_text_to_a_callback_on_the_callers_thread(pair):
    model, tokenizer = pair
    decoder = SpeculativeDecoder(model, tokenizer)
    whole = ChatSession(decoder).send("hello there", max_new_tokens=24, eos_token_id=-1)
    pieces, threads = [], set()
    session = ChatSession(decoder)

    def on_text(piece: str) -> None:
        pieces.append(piece)
        threads.add(threading.current_thread())

    assert session.send("hello there", on_text=on_text, max_new_tokens=24, eos_token_id=-1) == whole
    assert len(pieces) > 1 and "".join(pieces) == whole and threads == {threading.current_thread()}
    assert session.history[-1] == {"role": "assistant", "content": whole}


def test_an_empty_answer_is_still_a_turn(pair):
    """A model may end an answer at once: the conversation (and `specdec bench`'s multi-turn
    questions) goes on with an empty assistant turn; an empty user message is still refused."""
    _, tokenizer = pair
    history = [{"role": "user", "content": "hello there"}, {"role": "assistant", "content": ""},
               {"role": "user", "content": "and again"}]
    ids = encode_chat(tokenizer, history)
    assert ids.shape[1] > encode_chat(tokenizer, history[:1]).shape[1]
    assert "and again" in tokenizer.decode(ids[0])
    with pytest.raises(ValueError, match="non-empty content"):
        encode_chat(tokenizer, history[:1] + [{"role": "user", "content": ""}])
