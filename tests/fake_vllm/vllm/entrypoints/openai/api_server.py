"""A stand-in for ``python -m vllm.entrypoints.openai.api_server``: /health, /metrics, and greedy-looking
completions (each answer counts up from the prompt's last token), streamed chat completions, and
speculation counters when ``--speculative-config`` is given. It records the arguments it was started
with in ``$FAKE_VLLM_ARGS`` (a file) so the tests can check them."""

import argparse
import json
import os
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

parser = argparse.ArgumentParser()
for flag in ("--model", "--served-model-name", "--host", "--port", "--dtype", "--max-num-seqs",
             "--speculative-config"):
    parser.add_argument(flag)
parser.add_argument("--no-enable-prefix-caching", action="store_true")
args = parser.parse_args()
if os.environ.get("FAKE_VLLM_ARGS"):
    with open(os.environ["FAKE_VLLM_ARGS"], "a") as out:
        out.write(json.dumps(sys.argv[1:] + ["KV=" + os.environ.get("VLLM_CPU_KVCACHE_SPACE", "")]) + "\n")
if not os.path.isfile(os.path.join(args.model, "config.json")):
    sys.exit(f"no model at {args.model}")
counters = {"drafts": 0, "accepted": 0}


class Handler(BaseHTTPRequestHandler):
    def log_message(self, *_):
        pass

    def reply(self, status, body, kind="application/json"):
        data = body.encode()
        self.send_response(status)
        self.send_header("content-type", kind)
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        if self.path == "/health":
            return self.reply(200, "")
        if self.path == "/metrics":
            lines = []
            if args.speculative_config:
                lines += [f'vllm:spec_decode_num_drafts_total{{model_name="x"}} {counters["drafts"]}',
                          f'vllm:spec_decode_num_accepted_tokens_total{{model_name="x"}} {counters["accepted"]}']
            return self.reply(200, "\n".join(lines) + "\n", "text/plain")
        self.reply(404, "{}")

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["content-length"])))
        if body.get("model") != args.served_model_name:
            return self.reply(404, json.dumps({"error": "no such model"}))
        n = int(body["max_tokens"])
        if args.speculative_config:  # every step drafts 4 and accepts 2: MAT 3
            counters["drafts"] += 1
            counters["accepted"] += 2
        if self.path == "/v1/completions":
            ids = [(body["prompt"][-1] + 1 + i) % 64 for i in range(n)]
            return self.reply(200, json.dumps({"choices": [{"text": "", "token_ids": ids}]}))
        self.send_response(200)
        self.send_header("content-type", "text/event-stream")
        self.end_headers()
        for i in range(n):
            chunk = {"choices": [{"delta": {"content": f" w{i}"}}]}
            self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
        usage = {"choices": [], "usage": {"completion_tokens": n}}
        self.wfile.write(f"data: {json.dumps(usage)}\n\ndata: [DONE]\n\n".encode())


ThreadingHTTPServer((args.host, int(args.port)), Handler).serve_forever()
