"""`specdec serve` under limits (issue 32): readiness while loading, a full queue (429 with
``Retry-After``), body size, message count, prompt length, stop strings and the model's context
(400 naming the field, before any model work), the API key before the body is parsed,
templating off the event loop, and ``/metrics`` in Prometheus' format."""

from __future__ import annotations

import threading

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

import specdec
from specdec.serving import completions as completions_module
from specdec.serving.limits import ServerLimits
from specdec.serving.server import build_app
from tests.test_server import MODEL, RunningServer, assert_error_shape, wait_for_health

KEY = "sk-limits"
TIMEOUT = 60


@pytest.fixture(scope="module")
def loaded(tiny_model_dir):
    return specdec.load_model(str(tiny_model_dir), dtype="fp32")


def chat(messages, **options) -> dict:
    return {"model": MODEL, "messages": messages, "temperature": 0, **options}


def test_not_ready_until_loaded_then_serving(loaded):
    model, tokenizer = loaded
    app = build_app(None, MODEL, max_tokens_limit=8)
    server = RunningServer(app, ready=False)  # listening, the model not loaded yet
    try:
        health = server.first_health
        assert health.status_code == 503 and health.json()["status"] == "loading"
        assert health.headers["retry-after"].isdigit()
        refused = httpx.post(f"{server.url}/v1/chat/completions", json=chat([{"role": "user", "content": "hi"}]),
                             timeout=10)
        assert refused.status_code == 503 and refused.headers["retry-after"].isdigit()
        assert_error_shape(refused.json())
        app.state.served.set(specdec.SpeculativeDecoder(model, tokenizer))
        wait_for_health(server.url, server.thread.is_alive)
        answer = httpx.post(f"{server.url}/v1/chat/completions", json=chat([{"role": "user", "content": "hi"}]),
                            timeout=TIMEOUT)
        assert answer.status_code == 200 and answer.json()["usage"]["completion_tokens"] == 8
        metrics = httpx.get(f"{server.url}/metrics", timeout=10).text
        assert 'specdec_requests_refused_total{reason="loading"} 1.0' in metrics
    finally:
        server.stop()


@pytest.fixture(scope="module")
def gated(loaded):
    """A server whose engine holds one row and one queue place, with a gate before each step."""
    model, tokenizer = loaded
    decoder = specdec.SpeculativeDecoder(model, tokenizer, max_batch=1, max_queued=1)
    opened, waiting = threading.Event(), threading.Event()
    step = decoder.loop.step

    def gated_step(sequences):
        waiting.set()
        assert opened.wait(TIMEOUT)
        return step(sequences)

    decoder.loop.step = gated_step
    limits = ServerLimits(max_body_bytes=4096, max_messages=3, max_prompt_tokens=40)
    server = RunningServer(build_app(decoder, MODEL, api_key=KEY, max_tokens_limit=600, limits=limits))
    server.opened, server.waiting, server.decoder = opened, waiting, decoder
    opened.set()
    yield server
    opened.set()
    server.stop()


def post(server, body=None, content=None, key=KEY, headers=None) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} | (headers or {})
    return httpx.post(f"{server.url}/v1/chat/completions", json=body, content=content, headers=headers,
                      timeout=TIMEOUT)


def test_a_full_queue_is_a_429_with_retry_after_at_once(gated):
    gated.opened.clear()
    gated.waiting.clear()
    replies = {}

    def send(name):
        replies[name] = post(gated, chat([{"role": "user", "content": "hello there"}], max_tokens=4))

    first = threading.Thread(target=send, args=("running",))
    first.start()
    assert gated.waiting.wait(TIMEOUT)  # the first holds the only row
    second = threading.Thread(target=send, args=("queued",))
    second.start()
    while gated.decoder.queued == 0:
        assert second.is_alive()
    refused = post(gated, chat([{"role": "user", "content": "what is this"}], max_tokens=4))
    assert refused.status_code == 429 and refused.headers["retry-after"] == "1"
    assert_error_shape(refused.json())
    assert refused.json()["error"]["code"] == "rate_limit_exceeded"
    gated.opened.set()
    first.join(TIMEOUT)
    second.join(TIMEOUT)
    assert replies["running"].status_code == replies["queued"].status_code == 200


@pytest.mark.parametrize("body, param", [
    (chat([{"role": "user", "content": "hi"}] * 4), "messages"),  # more than max_messages
    (chat([{"role": "user", "content": " ".join(["hello"] * 60)}]), "messages"),  # more than max_prompt_tokens
    (chat([{"role": "user", "content": "hi"}], stop=["x" * 300]), "stop"),  # a stop string too long
    (chat([{"role": "user", "content": "w1 w2 w3 w4 w5 w6 w7 w8 w9 w10"}], max_tokens=520), "max_tokens"),  # context
])
def test_limits_are_400s_naming_the_field_before_any_work(gated, body, param):
    steps = gated.decoder.metrics.verify_steps + gated.decoder.metrics.prefill_chunks
    response = post(gated, body)
    assert response.status_code == 400
    assert_error_shape(response.json(), param)
    assert gated.decoder.metrics.verify_steps + gated.decoder.metrics.prefill_chunks == steps


def test_a_body_over_the_limit_is_a_413_announced_or_streamed(gated):
    big = b'{"model": "tiny-llama", "messages": [{"role": "user", "content": "' + b"a" * 5000 + b'"}]}'
    response = post(gated, content=big, headers={"Content-Type": "application/json"})
    assert response.status_code == 413
    assert_error_shape(response.json())
    chunked = post(gated, content=iter([big[:3000], big[3000:]]), headers={"Content-Type": "application/json"})
    assert chunked.status_code == 413  # no Content-Length: counted as it arrives


def test_the_key_is_checked_before_the_body_is_parsed(gated):
    unparsable = post(gated, content=b"{not json", key="sk-wrong", headers={"Content-Type": "application/json"})
    assert unparsable.status_code == 401  # not a 400: the body was never parsed
    assert post(gated, content=b"{not json", headers={"Content-Type": "application/json"}).status_code == 400
    assert httpx.get(f"{gated.url}/metrics", timeout=10).status_code == 200  # no key needed


def test_templating_and_tokenisation_run_off_the_event_loop(gated, monkeypatch):
    threads = []
    real = completions_module.encode_chat
    monkeypatch.setattr(completions_module, "encode_chat",
                        lambda *args: threads.append(threading.current_thread()) or real(*args))
    assert post(gated, chat([{"role": "user", "content": "hello"}], max_tokens=2)).status_code == 200
    server_thread = gated.thread  # uvicorn's event loop runs on this thread
    assert threads and all(thread is not server_thread for thread in threads)


def test_metrics_in_prometheus_format(gated):
    client = openai.OpenAI(base_url=f"{gated.url}/v1", api_key=KEY, max_retries=0, timeout=TIMEOUT)
    client.chat.completions.create(model=MODEL, temperature=0, max_tokens=6,
                                   messages=[{"role": "user", "content": "hello there"}])
    families = {family.name: family for family in text_string_to_metric_families(
        httpx.get(f"{gated.url}/metrics", timeout=10).text)}
    for name in ("specdec_requests_running", "specdec_requests_queued", "specdec_requests_refused",
                 "specdec_requests_finished", "specdec_prompt_tokens", "specdec_generation_tokens",
                 "specdec_verify_steps", "specdec_draft_tokens", "specdec_accepted_tokens", "specdec_step_seconds",
                 "specdec_time_to_first_token_seconds"):
        assert name in families, name
    value = {(s.name, tuple(sorted(s.labels.items()))): s.value for f in families.values() for s in f.samples}
    metrics = gated.decoder.metrics
    assert value[("specdec_generation_tokens_total", ())] == metrics.generated_tokens >= 6
    assert value[("specdec_verify_steps_total", ())] == metrics.verify_steps
    assert value[("specdec_requests_finished_total", (("end", "finished"),))] == metrics.ended["finished"]
    assert value[("specdec_step_seconds_count", ())] == metrics.verify_steps
    assert value[("specdec_time_to_first_token_seconds_count", ())] >= 1
    drafted = {labels: v for (name, labels), v in value.items() if name == "specdec_draft_tokens_total"}
    assert drafted and sum(drafted.values()) == sum(metrics.drafted.values())


def test_a_request_past_its_time_limit_is_a_504_or_an_error_event(loaded):
    model, tokenizer = loaded
    decoder = specdec.SpeculativeDecoder(model, tokenizer)
    step = decoder.loop.step

    def slow_step(sequences):
        threading.Event().wait(0.1)  # a slow model
        return step(sequences)

    decoder.loop.step = slow_step
    server = RunningServer(build_app(decoder, MODEL, max_tokens_limit=64, limits=ServerLimits(request_timeout=0.3)))
    try:
        body = chat([{"role": "user", "content": "hello there"}], max_tokens=64)
        response = httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=TIMEOUT)
        assert response.status_code == 504 and response.json()["error"]["code"] == "timeout"
        with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=body | {"stream": True},
                          timeout=TIMEOUT) as streamed:
            events = [line for line in streamed.iter_lines() if line.startswith("data: ")]
        assert '"code": "timeout"' in events[-1]  # an error event ends the stream
        assert decoder.metrics.ended.get("timed_out") == 2
    finally:
        server.stop()
