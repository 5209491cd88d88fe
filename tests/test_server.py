"""`specdec serve`: the OpenAI-compatible server, run in-process by uvicorn on 127.0.0.1 and driven
by the real ``openai`` client (and raw ``httpx`` where a client would not send such a request)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time

import httpx
import openai
import pytest
import torch
import uvicorn

import specdec
from specdec.models.prompts import encode_chat
from specdec.serving.server import build_app
from specdec.serving.text_stream import StreamedText

MODEL = "tiny-llama"
KEY = "sk-test-key"
NEW = 16
LIMIT = 64
QUESTIONS = ["hello there", "what is this", "w1 w2 w3", "again and again", "w5 w9 w10 w11", "hello w3",
             "this and that w7", "there is w20"]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_for_health(url: str, alive, seconds: float = 60, ready: bool = True) -> httpx.Response:
    """Poll ``url/health`` until it answers 200 (``ready=False``: answers at all); ``alive()`` false
    or the time out is an error."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            response = httpx.get(f"{url}/health", timeout=1)
            if response.status_code == 200 or not ready:
                return response
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline or not alive():
            raise RuntimeError(f"no server answered at {url}")
        time.sleep(0.05)


class RunningServer:
    """A uvicorn server on a free port of 127.0.0.1, in a daemon thread."""

    def __init__(self, app, ready: bool = True) -> None:
        self.app = app
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        self.first_health = wait_for_health(self.url, self.thread.is_alive, 30, ready)

    def client(self, api_key: str = "unused") -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=api_key, max_retries=0, timeout=60)

    def health(self) -> dict:
        return httpx.get(f"{self.url}/health", timeout=10).json()

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


@pytest.fixture(scope="module")
def loaded(tiny_model_dir):
    return specdec.load_model(str(tiny_model_dir), dtype="fp32")


@pytest.fixture(scope="module")
def decoder(loaded):
    model, tokenizer = loaded
    return specdec.SpeculativeDecoder(model, tokenizer, drafter="recycling+ngram")


@pytest.fixture(scope="module")
def served(decoder):
    running = RunningServer(build_app(decoder, MODEL, max_tokens_limit=LIMIT))
    yield running
    running.stop()


@pytest.fixture(scope="module")
def keyed(loaded):
    model, tokenizer = loaded
    running = RunningServer(build_app(specdec.SpeculativeDecoder(model, tokenizer, drafter="recycling+ngram"),
                                      MODEL, api_key=KEY, max_tokens_limit=LIMIT))
    yield running
    running.stop()


@pytest.fixture(scope="module")
def client(served):
    return served.client()


def chat_ids(tokenizer, question: str) -> torch.Tensor:
    return encode_chat(tokenizer, [{"role": "user", "content": question}])  # [1, L]


def greedy_tokens(decoder, prompt: torch.Tensor, max_new_tokens: int = NEW) -> list[int]:
    out = decoder.generate(prompt, max_new_tokens=max_new_tokens, do_sample=False)
    return out[0, prompt.shape[1]:].tolist()


def ask(client, question: str, **options):
    options.setdefault("max_tokens", NEW)
    options.setdefault("temperature", 0)
    return client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": question}], **options)


def test_chat_completion_is_hf_greedy_with_openai_fields(served, client, loaded, decoder):
    model, tokenizer = loaded
    prompt = chat_ids(tokenizer, QUESTIONS[0])
    hf = model.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False, max_new_tokens=NEW)
    expected = hf[0, prompt.shape[1]:].tolist()
    assert greedy_tokens(decoder, prompt) == expected
    reply = ask(client, QUESTIONS[0])
    assert reply.object == "chat.completion" and reply.id.startswith("chatcmpl-") and reply.model == MODEL
    assert abs(reply.created - time.time()) < 120
    [choice] = reply.choices
    assert choice.index == 0 and choice.message.role == "assistant"
    assert choice.message.content == tokenizer.decode(expected, skip_special_tokens=True)
    assert choice.finish_reason == ("stop" if tokenizer.eos_token_id in expected else "length")
    assert reply.usage.prompt_tokens == prompt.shape[1]
    assert reply.usage.completion_tokens == len(expected) == NEW
    assert reply.usage.total_tokens == prompt.shape[1] + NEW
    stats = reply.model_extra["specdec"]
    assert stats["new_tokens"] == NEW and stats["steps"] >= 1 and stats["mean_accepted_tokens"] >= 1
    assert stats["mean_accepted_tokens"] == pytest.approx(NEW / stats["steps"])
    assert stats["accepted_tokens"] == NEW - stats["steps"] and stats["drafted_tokens"] >= stats["accepted_tokens"]


def test_streamed_chat_matches_the_whole_reply(client):
    whole = ask(client, QUESTIONS[1])
    chunks = list(ask(client, QUESTIONS[1], stream=True, stream_options={"include_usage": True}))
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id and c.model == MODEL for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    pieces = [c.choices[0].delta.content for c in chunks[1:] if c.choices and c.choices[0].delta.content]
    assert len(pieces) > 1
    assert "".join(pieces) == whole.choices[0].message.content
    *_, last_choice_chunk, usage_chunk = chunks
    assert last_choice_chunk.choices[0].finish_reason == whole.choices[0].finish_reason
    assert last_choice_chunk.choices[0].delta.content is None
    assert last_choice_chunk.model_extra["specdec"]["mean_accepted_tokens"] >= 1
    assert [c.choices[0].finish_reason for c in chunks[:-2]] == [None] * (len(chunks) - 2)
    assert usage_chunk.choices == [] and usage_chunk.usage.model_dump() == whole.usage.model_dump()


def test_sse_wire_format_ends_with_done(served):
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hello"}], "max_tokens": 4, "temperature": 0,
            "stream": True}
    with httpx.stream("POST", f"{served.url}/v1/chat/completions", json=body, timeout=60) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        raw = response.read().decode()
    events = raw.split("\n\n")
    assert events[-1] == "" and events[-2] == "data: [DONE]"
    payloads = [json.loads(e.removeprefix("data: ")) for e in events[:-2]]
    assert all(e.startswith("data: ") for e in events[:-1])
    assert payloads[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert payloads[-1]["choices"][0]["delta"] == {} and payloads[-1]["choices"][0]["finish_reason"] == "length"
    assert "usage" not in payloads[-1]


def test_completions_endpoint_streamed_and_not(client, loaded, decoder):
    _, tokenizer = loaded
    ids = tokenizer("hello there")["input_ids"]
    expected = greedy_tokens(decoder, torch.tensor([ids]), 12)
    reply = client.completions.create(model=MODEL, prompt="hello there", max_tokens=12, temperature=0)
    assert reply.object == "text_completion" and reply.id.startswith("cmpl-")
    assert reply.choices[0].text == tokenizer.decode(expected, skip_special_tokens=True)
    assert reply.usage.prompt_tokens == len(ids) and reply.usage.completion_tokens == len(expected)
    assert reply.model_extra["specdec"]["mean_accepted_tokens"] >= 1
    chunks = list(client.completions.create(model=MODEL, prompt="hello there", max_tokens=12, temperature=0,
                                            stream=True))
    assert all(c.object == "text_completion" for c in chunks)
    assert "".join(c.choices[0].text for c in chunks) == reply.choices[0].text
    assert chunks[-1].choices[0].finish_reason == reply.choices[0].finish_reason
    assert [c.choices[0].finish_reason for c in chunks[:-1]] == [None] * (len(chunks) - 1)


def test_concurrent_clients_get_what_each_gets_alone(served, client):
    alone = {q: ask(client, q) for q in QUESTIONS}
    metrics = served.app.state.served.decoder.metrics
    steps, rows = metrics.verify_steps, metrics.rows_stepped
    together, failures = {}, []

    def one(question: str) -> None:
        try:
            together[question] = ask(client, question)
        except Exception as err:  # reported below: a thread's exception would otherwise be lost
            failures.append(err)

    threads = [threading.Thread(target=one, args=(q,)) for q in QUESTIONS]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not failures
    assert metrics.rows_stepped - rows > metrics.verify_steps - steps  # some forwards verified several requests
    assert len({alone[q].choices[0].message.content for q in QUESTIONS}) > 1  # the questions differ
    for q in QUESTIONS:
        assert together[q].choices[0].message.content == alone[q].choices[0].message.content
        assert together[q].usage.completion_tokens == alone[q].usage.completion_tokens


def test_stop_strings_cut_before_the_stop(client):
    text = ask(client, QUESTIONS[0]).choices[0].message.content
    words = text.split()
    assert len(set(words)) >= 3
    stop = f" {words[2]}"
    expected = text[: text.find(stop)]
    reply = ask(client, QUESTIONS[0], stop=[stop, "never-seen"])
    assert reply.choices[0].message.content == expected
    assert reply.choices[0].finish_reason == "stop"
    assert reply.usage.completion_tokens < NEW
    chunks = list(ask(client, QUESTIONS[0], stop=stop, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == expected
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_seeded_sampling_repeats_and_matches_generate(client, loaded, decoder):
    _, tokenizer = loaded
    options = {"temperature": 0.9, "seed": 1234, "max_tokens": 12}
    first, second = (ask(client, QUESTIONS[2], **options).choices[0].message.content for _ in range(2))
    assert first == second
    prompt = chat_ids(tokenizer, QUESTIONS[2])
    out = decoder.generate(prompt, max_new_tokens=12, do_sample=True, temperature=0.9, top_p=1.0, top_k=0,
                           generator=1234)
    assert first == tokenizer.decode(out[0, prompt.shape[1]:], skip_special_tokens=True)
    assert first != ask(client, QUESTIONS[2], max_tokens=12).choices[0].message.content  # greedy differs


def slowed(monkeypatch, decoder, seconds: float = 0.05) -> list:
    """Make each of ``decoder``'s steps take ``seconds`` longer; returns the list of the stepped
    sequences (`specdec.step.sequence.Sequence`) it records."""
    step, seen = decoder.loop.step, []

    def slow_step(sequences):
        seen.extend(seq for seq in sequences if seq not in seen)
        time.sleep(seconds)
        return step(sequences)

    monkeypatch.setattr(decoder.loop, "step", slow_step)
    return seen


def wait_until_idle(served, seconds: float = 30) -> dict:
    """``/health`` once nothing runs or waits (a bounded poll: the engine frees a row at its next step)."""
    deadline = time.monotonic() + seconds
    while (health := served.health())["running"] or health["queued"]:
        assert time.monotonic() < deadline, health
        time.sleep(0.02)
    return health


@pytest.mark.parametrize("stream", [True, False])
def test_a_client_that_disconnects_frees_its_generation(served, client, monkeypatch, stream):
    seen = slowed(monkeypatch, served.app.state.served.decoder, 0.05 if stream else 0.3)
    body = {"model": MODEL, "messages": [{"role": "user", "content": QUESTIONS[3]}], "max_tokens": LIMIT,
            "temperature": 0, "stream": stream}
    if stream:
        with httpx.stream("POST", f"{served.url}/v1/chat/completions", json=body, timeout=60) as response:
            lines = response.iter_lines()  # held: dropping the iterator would close the connection
            # a token: a step has run (the role chunk alone may come before the engine steps once)
            next(line for line in lines if line.startswith("data: {")
                 and json.loads(line[6:])["choices"][0]["delta"].get("content"))
            health = served.health()
            assert health["running"] + health["queued"] == 1
    else:
        with pytest.raises(httpx.ReadTimeout):  # the client gives up while the server generates
            httpx.post(f"{served.url}/v1/chat/completions", json=body, timeout=1.0)
    wait_until_idle(served)
    [seq] = seen
    tokens = seq.result.tokens
    assert 0 < len(tokens) < LIMIT and tokens[-1] not in seq.request.eos_ids  # cut short, not finished
    assert seq.result.stats.new_tokens == len(tokens)  # the generation was closed (its stats finalised)
    monkeypatch.undo()
    assert ask(client, QUESTIONS[3], max_tokens=4).usage.completion_tokens == 4


def test_a_failing_generation_is_a_500_without_internals_and_the_server_keeps_serving(served, client, monkeypatch):
    def broken(sequences):
        raise RuntimeError("the model fell over at /secret/path.py")

    monkeypatch.setattr(served.app.state.served.decoder.loop, "step", broken)
    with pytest.raises(openai.InternalServerError) as caught:
        ask(client, "hello")
    body = caught.value.response.json()
    assert_error_shape(body)
    assert body["error"]["type"] == "server_error"
    for internal in ("RuntimeError", "fell over", "/secret/path.py"):
        assert internal not in body["error"]["message"]
    with pytest.raises(openai.APIError, match="the generation failed") as streamed:
        list(ask(client, "hello", stream=True))  # after the role chunk: an error event ends the stream
    assert "fell over" not in str(streamed.value)
    monkeypatch.undo()
    wait_until_idle(served)
    assert ask(client, "hello", max_tokens=2).usage.completion_tokens == 2


def assert_error_shape(body: dict, param=None) -> None:
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["param"] == param
    assert "Traceback" not in error["message"]


def test_malformed_json_is_a_400_in_openai_shape(served, client):
    response = httpx.post(f"{served.url}/v1/chat/completions", content=b'{"model": "tiny-llama", "messages": [',
                          headers={"Content-Type": "application/json"}, timeout=10)
    assert response.status_code == 400
    assert_error_shape(response.json())
    response = httpx.post(f"{served.url}/v1/chat/completions", json={"model": MODEL}, timeout=10)
    assert response.status_code == 400
    assert_error_shape(response.json(), "messages")
    assert ask(client, QUESTIONS[0], max_tokens=2).usage.completion_tokens == 2  # still serving


def test_unknown_model_is_a_404(client):
    with pytest.raises(openai.NotFoundError) as caught:
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hello"}])
    assert caught.value.status_code == 404
    assert_error_shape(caught.value.response.json(), "model")
    assert caught.value.code == "model_not_found"


@pytest.mark.parametrize("options, param", [
    ({"max_tokens": LIMIT + 1}, "max_tokens"),
    ({"max_completion_tokens": LIMIT + 1}, "max_completion_tokens"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"n": 2}, "n"),
    ({"temperature": 5}, "temperature"),
    ({"top_p": 0}, "top_p"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
])
def test_bad_values_are_400s_naming_the_field(client, options, param):
    with pytest.raises(openai.BadRequestError) as caught:
        ask(client, "hello", **options)
    assert caught.value.status_code == 400
    assert_error_shape(caught.value.response.json(), param)


def test_an_empty_completion_prompt_is_a_400(client):
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(model=MODEL, prompt="", max_tokens=4)
    assert_error_shape(caught.value.response.json(), "prompt")


def test_unknown_routes_and_unset_fields(served, client):
    response = httpx.get(f"{served.url}/v1/nothing-here", timeout=10)
    assert response.status_code == 404
    assert_error_shape(response.json())
    reply = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hello"}],
                                           temperature=0, extra_body={"user": "someone", "logit_bias": {}})
    # unknown fields are ignored; with max_tokens unset the server's limit is the length
    assert reply.usage.completion_tokens == LIMIT or reply.choices[0].finish_reason == "stop"


def test_models_lists_the_served_model(client, served):
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert served.health() == {"status": "ok", "model": MODEL, "running": 0, "queued": 0}


def test_api_key_is_required_when_set(keyed):
    with pytest.raises(openai.AuthenticationError) as caught:
        ask(keyed.client("sk-wrong"), "hello")
    assert_error_shape(caught.value.response.json())
    response = httpx.post(f"{keyed.url}/v1/chat/completions", timeout=10,
                          json={"model": MODEL, "messages": [{"role": "user", "content": "hello"}]})
    assert response.status_code == 401
    assert_error_shape(response.json())
    assert httpx.get(f"{keyed.url}/v1/models", timeout=10).status_code == 401
    assert keyed.health()["status"] == "ok"  # no key needed
    good = keyed.client(KEY)
    assert ask(good, "hello", max_tokens=3).usage.completion_tokens == 3
    assert [m.id for m in good.models.list().data] == [MODEL]


def test_build_app_checks_its_arguments(decoder, loaded):
    model, _ = loaded
    with pytest.raises(ValueError, match="tokenizer"):
        build_app(specdec.SpeculativeDecoder(model, drafter="ngram"), MODEL)
    with pytest.raises(ValueError, match="max_tokens_limit"):
        build_app(decoder, MODEL, max_tokens_limit=0)
    with pytest.raises(ValueError, match="model_name"):
        build_app(decoder, "")


def test_specdec_serve_command(tiny_model_dir):
    port = free_port()
    env = dict(os.environ, SPECDEC_API_KEY=KEY)
    process = subprocess.Popen(
        [sys.executable, "-c", "from specdec.cli import main; main()", "serve", "--model", str(tiny_model_dir),
         "--dtype", "fp32", "--port", str(port), "--drafter", "ngram", "--max-tokens-limit", "8"],
        stderr=subprocess.PIPE, text=True, env=env)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_for_health(url, lambda: process.poll() is None)
        assert httpx.get(f"{url}/health", timeout=10).json()["model"] == tiny_model_dir.name
        client = openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0, timeout=60)
        reply = client.chat.completions.create(model=tiny_model_dir.name, temperature=0,
                                               messages=[{"role": "user", "content": "hello"}])
        assert reply.usage.completion_tokens == 8  # --max-tokens-limit: the length of a request that sets none
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{url}/v1", api_key="sk-other", max_retries=0).models.list()
    finally:
        process.terminate()
        _, stderr = process.communicate(timeout=30)
    assert f"at http://127.0.0.1:{port}/v1" in stderr and "API key required" in stderr


class PieceTokenizer:
    """Token id i decodes to ``pieces[i]`` (bytes): a decode joins the pieces of its ids and shows
    an incomplete UTF-8 character as U+FFFD, as byte-level tokenizers do."""

    def __init__(self, pieces: list[bytes]) -> None:
        self.pieces = pieces

    def decode(self, tokens, skip_special_tokens: bool = True) -> str:
        return b"".join(self.pieces[i] for i in tokens).decode("utf-8", errors="replace")


def stream_texts(texts: list[str], stops: list[str]) -> tuple[list[str], StreamedText]:
    """What `StreamedText` shows after each token of a generation whose text after token n is
    ``texts[n - 1]``, then at its end."""
    encoded = [text.encode() for text in texts]
    pieces = [later[len(earlier):] for earlier, later in zip([b""] + encoded, encoded)]
    text = StreamedText(PieceTokenizer(pieces), stops)
    shown = []
    for n in range(1, len(texts) + 1):
        shown.append(text.update(list(range(n))))
        if text.stopped:
            break
    end = text.update(list(range(len(texts))), final=True)
    return shown + [end + text.rest()], text


def test_streamed_text_holds_back_a_possible_stop_string():
    shown, text = stream_texts(["ab", "abc", "abcSt", "abcStOP", "abcStOPx"], ["StOP"])
    assert shown == ["ab", "c", "", "", ""] and text.stopped and text.text == "abc"
    shown, text = stream_texts(["ab", "abSt", "abStay", "abStay!"], ["StOP"])
    assert shown == ["ab", "", "Stay", "!", ""] and not text.stopped
    shown, text = stream_texts(["x", "xyz", "xyzEND"], ["END", "y"])  # the earliest stop wins
    assert shown == ["x", "", ""] and text.text == "x"


def test_streamed_text_waits_for_whole_characters():
    e_acute = "\u00e9".encode()
    pieces = [b"caf", e_acute[:1], e_acute[1:], b" ok", "\u20ac".encode()[:2]]  # the last: half a euro sign
    text, shown = StreamedText(PieceTokenizer(pieces)), []
    for n in range(1, len(pieces) + 1):
        shown.append(text.update(list(range(n))))
    end = text.update(list(range(len(pieces))), final=True) + text.rest()
    assert shown == ["caf", "", "\u00e9", " ok", ""] and end == "\ufffd"  # shown only once it has ended


def test_streamed_text_decodes_a_window_not_the_whole_text():
    """Each update decodes the previous piece's tokens and the new ones, never everything again."""
    words = [f" w{i}".encode() for i in range(200)]

    class Counting(PieceTokenizer):
        longest = 0

        def decode(self, tokens, skip_special_tokens: bool = True) -> str:
            Counting.longest = max(Counting.longest, len(tokens))
            return super().decode(tokens, skip_special_tokens)

    text = StreamedText(Counting(words))
    shown = "".join(text.update(list(range(n))) for n in range(1, len(words) + 1))
    assert shown == b"".join(words).decode() and Counting.longest <= 2
