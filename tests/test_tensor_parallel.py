"""Tensor parallelism (transformers' own, gloo on CPU) under torchrun: two ranks of a tiny Llama
give, on every rank, exactly single-process ``model.generate``'s greedy tokens with every drafter
(scheduler on and off), and the same sampled tokens on both ranks."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from specdec import load_model
from specdec.models.distributed import TensorParallelError, check_shardable
from tests.tp_worker import NEW, PROMPTS, RUNS

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_ranks(model_dir: Path, out_dir: Path, ranks: int = 2, timeout: float = 150.0) -> None:
    """torchrun ``ranks`` CPU processes of `tests.tp_worker`; the whole process group is killed on
    failure or timeout, so nothing is left behind."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={ranks}",
               f"--master-port={free_port()}", str(ROOT / "tests" / "tp_worker.py"), str(model_dir), str(out_dir)]
    process = subprocess.Popen(command, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               start_new_session=True)
    try:
        output, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
        pytest.fail(f"torchrun did not finish within {timeout} s")
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    assert process.returncode == 0, output.decode(errors="replace")[-4000:]


def test_two_cpu_ranks_equal_one_process(tiny_model_dir, tmp_path):
    model, _ = load_model(tiny_model_dir, dtype="fp32")
    references = [model.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                                 do_sample=False, max_new_tokens=NEW, eos_token_id=-1, pad_token_id=0)[0].tolist()
                  for p in PROMPTS]
    run_ranks(tiny_model_dir, tmp_path)
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for result in results:
        assert result["sharded"]  # the model really was split across the ranks
        assert set(result["greedy"]) == {f"{d}@{b}" for d, b in RUNS}
        for run, outputs in result["greedy"].items():
            assert outputs == references, f"rank {result['rank']}, {run}"
    assert results[0]["sampled"] == results[1]["sampled"]
    assert results[0]["sampled"][0] != results[0]["sampled"][1]  # the seeds matter


def test_a_rank_count_that_does_not_divide_the_heads_is_refused(tiny_model_dir):
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(tiny_model_dir)
    check_shardable(config, 2)
    with pytest.raises(TensorParallelError, match="divide the 4 query heads and the 2 key-value heads"):
        check_shardable(config, 3)


def test_tensor_parallel_outside_torchrun_is_a_clear_error(tiny_model_dir, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(TensorParallelError, match="torchrun"):
        load_model(tiny_model_dir, dtype="fp32", tensor_parallel=True)
