"""A flood against `specdec serve` with a small queue (issue 32): hundreds of concurrent streamed,
non-streamed and abandoned requests. Every request ends well within its timeout (answered, or
refused at once with 429 and ``Retry-After``); afterwards nothing runs or waits, the process's
memory is back near where it was, and a greedy request gets exactly the answer it got before."""

from __future__ import annotations

import time

import httpx

import specdec
from bench.flood import flood, rss_bytes
from specdec.serving.server import build_app
from tests.test_server import RunningServer

MODEL = "tiny-llama"
CLIENT_TIMEOUT = 60.0
QUESTIONS = ["hello there", "what is this", "w1 w2 w3", "again and again", "w5 w9 w10 w11", "hello w3"]
REQUESTS = 300


def test_a_flood_of_streamed_plain_and_abandoned_requests_ends_cleanly(tiny_model_dir):
    model, tokenizer = specdec.load_model(str(tiny_model_dir), dtype="fp32")
    decoder = specdec.SpeculativeDecoder(model, tokenizer, drafter="recycling+ngram", max_batch=4, max_queued=6)
    server = RunningServer(build_app(decoder, MODEL, max_tokens_limit=32))
    try:
        client = server.client()
        alone = {q: client.chat.completions.create(model=MODEL, temperature=0, max_tokens=24, messages=[
            {"role": "user", "content": q}]).choices[0].message.content for q in QUESTIONS}
        before = rss_bytes()
        results = flood(f"{server.url}/v1/chat/completions", MODEL, QUESTIONS, REQUESTS, timeout=CLIENT_TIMEOUT)
        outcomes = {}
        for result in results:
            outcomes[result.outcome] = outcomes.get(result.outcome, 0) + 1
            assert result.outcome != "failed", result
            assert result.seconds < CLIENT_TIMEOUT / 2, result  # well within the timeout
            if result.outcome == "answered":
                assert result.answer == alone[result.question], result
        assert outcomes.get("answered", 0) >= 4 and outcomes.get("refused", 0) >= REQUESTS // 2, outcomes
        assert outcomes.get("abandoned", 0) >= REQUESTS // 8, outcomes
        deadline = time.monotonic() + 30
        while (health := server.health())["running"] or health["queued"]:  # the abandoned end at a step
            assert time.monotonic() < deadline, health
            time.sleep(0.05)
        thread = decoder.loop.thread
        if thread is not None:
            thread.join(30)
        assert decoder.cache.rows == 0 and decoder.cache.bytes == 0
        assert rss_bytes() <= 1.1 * before
        again = client.chat.completions.create(model=MODEL, temperature=0, max_tokens=24,
                                               messages=[{"role": "user", "content": QUESTIONS[0]}])
        assert again.choices[0].message.content == alone[QUESTIONS[0]]
        metrics = httpx.get(f"{server.url}/metrics", timeout=10).text
        refused = next(float(line.split()[-1]) for line in metrics.splitlines()
                       if line.startswith('specdec_requests_refused_total{reason="queue_full"}'))
        assert refused == outcomes["refused"]
    finally:
        server.stop()
