"""The benchmark harness: datasets, interleaving, summary arithmetic, CLI errors and JSON output."""

from __future__ import annotations

import json
import sys

import pytest
import torch
from click.testing import CliRunner

from bench.datasets import BUILTIN_QUESTIONS, DatasetError, Question, read_spec_bench, select
from bench.harness import Record, first_difference, interleave, summarize
from specdec.cli import main


def write_jsonl(path, rows):
    path.write_text("\n".join(json.dumps(r) if not isinstance(r, str) else r for r in rows) + "\n")
    return path


def test_read_spec_bench_multi_turn_and_tasks(tmp_path):
    path = write_jsonl(tmp_path / "q.jsonl", [
        {"question_id": 81, "category": "writing", "turns": ["a", "b"]},
        {"question_id": "t1", "category": "translation", "turns": ["c"]},
    ])
    questions = read_spec_bench(path)
    assert questions[0] == Question("81", "writing", ("a", "b"))
    assert [q.task for q in questions] == ["mt_bench", "translation"]


@pytest.mark.parametrize(
    "rows, message",
    [
        (["{not json"], "not valid JSON"),
        ([{"question_id": 1, "turns": ["x"]}], "missing field"),
        ([{"question_id": 1, "category": "qa", "turns": []}], "non-empty list"),
        ([{"question_id": 1, "category": "qa", "turns": [3]}], "non-empty list"),
        (["[1, 2]"], "JSON object"),
        ([""], "no questions"),
    ],
)
def test_bad_dataset_files(tmp_path, rows, message):
    with pytest.raises(DatasetError, match=message):
        read_spec_bench(write_jsonl(tmp_path / "bad.jsonl", rows))
    with pytest.raises(DatasetError, match="not found"):
        read_spec_bench(tmp_path / "missing.jsonl")


def test_select_filters_and_limits():
    questions = [Question(str(i), c, ("t",)) for i, c in enumerate(["qa", "qa", "qa", "writing", "coding", "rag"])]
    assert [q.question_id for q in select(questions, limit_per_category=2)] == ["0", "1", "3", "4", "5"]
    assert [q.question_id for q in select(questions, ["mt_bench"], 1)] == ["3"]
    assert [q.question_id for q in select(questions, ["coding", "rag"])] == ["4", "5"]
    with pytest.raises(DatasetError, match="unknown category"):
        select(questions, ["poetry"])
    with pytest.raises(DatasetError, match="empty"):
        select([], None, None)


def test_builtin_set_covers_the_promised_kinds():
    tasks = {q.task for q in BUILTIN_QUESTIONS}
    assert {"chat", "code", "summarization", "translation", "qa", "math_reasoning"} <= tasks
    assert len(BUILTIN_QUESTIONS) >= 12


def test_interleave_order():
    qs = [Question("a", "qa", ("x",)), Question("b", "qa", ("y",))]
    order = [(r, q.question_id, m) for r, q, m in interleave(["A", "B", "C"], qs, 2)]
    assert order[:6] == [(0, "a", "A"), (0, "a", "B"), (0, "a", "C"), (0, "b", "A"), (0, "b", "B"), (0, "b", "C")]
    assert len(order) == 12 and order[6] == (1, "a", "A")


def test_first_difference():
    assert first_difference([1, 2, 3], [1, 2, 3]) is None
    assert first_difference([1, 2, 3], [1, 5, 3]) == 1
    assert first_difference([1, 2], [1, 2, 3]) == 2


def test_summary_arithmetic_on_hand_made_records():
    records = [
        Record("baseline", "1", "qa", 100, 10.0, None),
        Record("baseline", "2", "rag", 50, 10.0, None),
        Record("recycling", "1", "qa", 100, 5.0, 50, identical=True, first_diff=None, draft_seconds=0.05,
               drafted_tokens=400),
        Record("recycling", "2", "rag", 50, 2.0, 20, identical=False, first_diff=7, draft_seconds=0.02,
               drafted_tokens=160),
    ]
    summary = summarize(records)
    base, spec = summary["baseline"], summary["recycling"]
    assert base["tok_per_s"] == pytest.approx(150 / 20)
    assert spec["tok_per_s"] == pytest.approx(150 / 7)
    assert spec["speedup"] == pytest.approx((150 / 7) / (150 / 20))
    assert spec["mat"] == pytest.approx(150 / 70)
    assert spec["identical_fraction"] == pytest.approx(0.5)
    assert spec["per_category"]["qa"]["speedup"] == pytest.approx(2.0)
    assert spec["per_category"]["rag"]["speedup"] == pytest.approx(5.0)
    assert spec["per_category"]["rag"]["mat"] == pytest.approx(2.5)
    assert spec["draft_ms_per_step"] == pytest.approx(1e3 * 0.07 / 70)
    assert spec["mean_tree_size"] == pytest.approx(8.0)
    assert base["mat"] is None and base["identical_fraction"] is None and base["draft_ms_per_step"] is None


@pytest.mark.parametrize(
    "args, message",
    [
        (["--methods", "baseline,warp-drive"], "unknown method"),
        (["--dataset", "/nonexistent.jsonl"], "not found"),
        (["--categories", "poetry"], "unknown category"),
        (["--methods", "hf-assisted"], "draft-model"),
        (["--methods", "ngram@x"], "unknown method"),
        (["--methods", "ngram@65"], "unknown method"),
        (["--methods", "baseline@4"], "unknown method"),
    ],
)
def test_cli_errors_exit_2_without_traceback(args, message):
    result = CliRunner().invoke(main, ["bench", *args])
    assert result.exit_code == 2
    assert message in result.output
    assert "Traceback" not in result.output


def test_bench_json_schema_on_tiny_model(tmp_path, tiny_model_dir):
    dataset = write_jsonl(tmp_path / "q.jsonl", [
        {"question_id": 1, "category": "writing", "turns": ["hello there", "and again"]},
        {"question_id": 2, "category": "qa", "turns": ["what is this"]},
    ])
    out = tmp_path / "out.json"
    result = CliRunner().invoke(main, [
        "bench", "--model", str(tiny_model_dir), "--dtype", "fp32", "--dataset", str(dataset),
        "--max-new-tokens", "6", "--methods", "baseline,hf-pld,recycling", "--json", str(out),
        "--markdown", str(tmp_path / "out.md"), "--plot", str(tmp_path / "out.png"),
    ])
    assert result.exit_code == 0, result.output
    payload = json.loads(out.read_text())
    assert set(payload) == {"config", "results", "summary"}
    assert len(payload["results"]) == 6
    for row in payload["results"]:
        assert {"method", "question_id", "category", "new_tokens", "seconds", "steps", "identical"} <= set(row)
    assert set(payload["summary"]) == {"baseline", "hf-pld", "recycling"}
    for figures in payload["summary"].values():
        assert {"tok_per_s", "speedup", "mat", "identical_fraction", "per_category"} <= set(figures)
        assert set(figures["per_category"]) == {"mt_bench", "qa"}
    assert payload["summary"]["recycling"]["identical_fraction"] == 1.0
    assert_figures_follow_records(payload, "recycling")
    assert (tmp_path / "out.png").read_bytes()[:4] == b"\x89PNG"
    assert "| recycling |" in (tmp_path / "out.md").read_text()


def test_bench_explain_reports_each_drafter_of_auto(tmp_path, tiny_model_dir):
    dataset = write_jsonl(tmp_path / "q.jsonl", [{"question_id": 1, "category": "qa", "turns": ["what is this"]}])
    result = CliRunner().invoke(main, [
        "bench", "--model", str(tiny_model_dir), "--dtype", "fp32", "--dataset", str(dataset),
        "--max-new-tokens", "24", "--methods", "auto", "--explain"])
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())  # the console wraps long lines
    for drafter in ("recycling", "ngram"):
        said = text.split(f"drafter {drafter}: ", 1)[1].split(" ms: net ", 1)
        assert said[0].split(";")[0] in ("running", "skipped") and "drafting" in said[0] and len(said) == 2
    assert "drafter steps skipped:" in text


def assert_figures_follow_records(payload: dict, method: str) -> None:
    """The summary's MAT and speedup are what the per-question records add up to, and every
    record is a possible decode (at least one token per step, new tokens counted per turn)."""
    rows = [r for r in payload["results"] if r["method"] == method]
    base = [r for r in payload["results"] if r["method"] == "baseline"]
    for row in rows:
        assert 1 <= row["steps"] <= row["new_tokens"]
    figures = payload["summary"][method]
    assert figures["mat"] == pytest.approx(sum(r["new_tokens"] for r in rows) / sum(r["steps"] for r in rows))
    rate = sum(r["new_tokens"] for r in rows) / sum(r["seconds"] for r in rows)
    base_rate = sum(r["new_tokens"] for r in base) / sum(r["seconds"] for r in base)
    assert figures["speedup"] == pytest.approx(rate / base_rate)


def test_method_at_budget_fixes_the_tree_budget(tiny_model_dir):
    from bench.methods import make_method, split_budget
    from specdec.models.loading import load_model

    assert split_budget("recycling+ngram@16") == ("recycling+ngram", 16) and split_budget("auto") == ("auto", None)
    model, tokenizer = load_model(str(tiny_model_dir), dtype="fp32")
    fixed, adaptive = make_method("ngram@4", model, tokenizer), make_method("ngram", model, tokenizer)
    assert fixed.decoder.tree_budget == 4 and adaptive.decoder.tree_budget is None
    prompt = torch.tensor([[5, 6, 7, 8, 5, 6, 7, 8, 5, 6, 7, 8, 5, 6]])
    generation = fixed.generate(prompt, 12)
    assert max(generation.stats.tree_sizes) <= 4 and generation.new_ids == adaptive.generate(prompt, 12).new_ids


def test_divergence_margin_is_the_logit_gap(model):
    import torch

    from bench.harness import divergence_margin

    prompt = torch.tensor([[5, 6, 7]])
    with torch.no_grad():
        logits = model(torch.tensor([[5, 6, 7, 11]])).logits[0, -1]
    best, second = logits.topk(2).indices.tolist()
    reference = Record("baseline", "q", "qa", 2, 1.0, None, turns=[(prompt, [11, best])])
    other = Record("recycling", "q", "qa", 2, 1.0, 2, turns=[(prompt, [11, second])])
    assert divergence_margin(model, reference, other) == pytest.approx(float(logits[best] - logits[second]), abs=1e-4)
    assert divergence_margin(model, reference, reference) is None


def test_bench_sample_is_seeded_and_reports_mat(tmp_path, tiny_model_dir):
    dataset = write_jsonl(tmp_path / "q.jsonl", [
        {"question_id": 1, "category": "writing", "turns": ["hello there", "and again"]},
        {"question_id": 2, "category": "qa", "turns": ["what is this"]},
    ])
    payloads = []
    for run in range(2):
        out = tmp_path / f"sample{run}.json"
        result = CliRunner().invoke(main, [
            "bench", "--model", str(tiny_model_dir), "--dtype", "fp32", "--dataset", str(dataset),
            "--max-new-tokens", "8", "--methods", "baseline,recycling", "--sample", "--temperature", "0.9",
            "--json", str(out),
        ])
        assert result.exit_code == 0, result.output
        assert "sampling T=0.9" in result.output
        payloads.append(json.loads(out.read_text()))
    payload = payloads[0]
    assert payload["config"]["decoding"] == {"do_sample": True, "temperature": 0.9, "seed": 0}
    assert all(row["identical"] is None for row in payload["results"])  # samples are not compared
    assert_figures_follow_records(payload, "recycling")
    tokens = [[row["new_tokens"] for row in p["results"]] for p in payloads]
    assert tokens[0] == tokens[1]


def test_sampled_benchmark_repeats_outputs_with_the_same_seed(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from bench.datasets import Question
    from bench.harness import run_benchmark
    from bench.methods import make_method

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    questions = [Question("a", "qa", ("hello there",)), Question("b", "qa", ("what is this", "and again"))]
    sampling = {"do_sample": True, "temperature": 1.0}

    def outputs(seed):
        methods = [make_method(name, model, tokenizer, sampling=sampling) for name in ("baseline", "recycling")]
        return [r.output_ids for r in run_benchmark(methods, questions, tokenizer, 12, seed=seed)]

    first = outputs(5)
    assert first == outputs(5)
    assert first != outputs(6)


@pytest.mark.parametrize("command", ["bench", "bench-serve"])
def test_peer_without_vllm_says_how_to_get_it(command, tmp_path):
    missing = CliRunner().invoke(main, [command, "--peer", "vllm", "--vllm-python", str(tmp_path / "nope" / "python")])
    assert missing.exit_code == 2
    assert "--vllm-python" in missing.output and "dev.py peers" in missing.output
    assert "Traceback" not in missing.output
    without = CliRunner().invoke(main, [command, "--peer", "vllm", "--vllm-python", sys.executable])
    assert without.exit_code == 2
    assert "cannot import vllm" in without.output and "Traceback" not in without.output


@pytest.fixture
def fake_vllm_python(tmp_path, monkeypatch):
    """An interpreter that imports the suite's stand-in for vLLM (tests/fake_vllm), and the file
    where the stand-in records how each server was started."""
    from pathlib import Path

    fake = Path(__file__).parent / "fake_vllm"
    python = tmp_path / "python"
    python.write_text(f'#!/bin/sh\nPYTHONPATH="{fake}" exec "{sys.executable}" "$@"\n')
    python.chmod(0o755)
    started = tmp_path / "started.jsonl"
    monkeypatch.setenv("FAKE_VLLM_ARGS", str(started))
    return python, started


def test_bench_peer_runs_vllm_plain_and_ngram_interleaved(tmp_path, tiny_model_dir, fake_vllm_python):
    python, started = fake_vllm_python
    dataset = write_jsonl(tmp_path / "q.jsonl", [{"question_id": 1, "category": "qa", "turns": ["what is this"]},
                                                 {"question_id": 2, "category": "qa", "turns": ["hello there"]}])
    out = tmp_path / "out.json"
    result = CliRunner().invoke(main, [
        "bench", "--model", str(tiny_model_dir), "--dtype", "fp32", "--dataset", str(dataset), "--max-new-tokens", "5",
        "--methods", "baseline", "--peer", "vllm", "--vllm-python", str(python), "--json", str(out)])
    assert result.exit_code == 0, result.output
    payload = json.loads(out.read_text())
    assert set(payload["summary"]) == {"baseline", "vllm-plain", "vllm-ngram"}
    order = [row["method"] for row in payload["results"]]
    assert order == ["baseline", "vllm-plain", "vllm-ngram"] * 2  # interleaved question by question
    peer_rows = [row for row in payload["results"] if row["method"].startswith("vllm")]
    assert all(row["new_tokens"] == 5 for row in peer_rows)  # the peer's token ids came back
    runs = [json.loads(line) for line in started.read_text().splitlines()]
    assert len(runs) == 2
    plain, ngram = runs
    assert "--speculative-config" not in plain and json.loads(ngram[ngram.index("--speculative-config") + 1]) == \
        {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 4, "prompt_lookup_min": 2}
    for run in runs:
        assert "--no-enable-prefix-caching" in run and run[run.index("--max-num-seqs") + 1] == "1"
        assert run[run.index("--dtype") + 1] == "float32" and run[-1] == "KV=4"


def test_bench_serve_peer_reports_vllm_rows_with_their_mat(tmp_path, tiny_model_dir, fake_vllm_python):
    python, _ = fake_vllm_python
    out = tmp_path / "serve.json"
    result = CliRunner().invoke(main, [
        "bench-serve", "--model", str(tiny_model_dir), "--dtype", "fp32", "--requests", "3", "--concurrency", "1,2",
        "--max-tokens", "4", "--peer", "vllm", "--vllm-python", str(python), "--json", str(out)])
    assert result.exit_code == 0, result.output
    rows = json.loads(out.read_text())
    configs = [(row["config"], row["concurrency"]) for row in rows]
    assert configs == [("hf-sequential", 1)] + [(c, n) for n in (1, 2) for c in
                                                ("specdec", "plain-batched", "vllm-plain", "vllm-ngram")]
    for row in rows:
        if row["config"].startswith("vllm"):
            assert row["requests"] == 3 and row["tokens"] == 12
            assert row["mat"] == (3.0 if row["config"] == "vllm-ngram" else None)  # 1 + accepted / drafts
    assert "vLLM's MAT is 1 + accepted / drafts" in result.output


def test_bench_clients_failure_is_a_bench_error_naming_the_server():
    from bench.errors import BenchError
    from bench.load import run_clients
    from bench.peers import free_port

    url = f"http://127.0.0.1:{free_port()}/v1/chat/completions"  # nothing listens there
    with pytest.raises(BenchError, match=f"clients failed against {url}: ConnectError"):
        run_clients(url, "m", ["hello"], 4, 1)


def test_wait_quiet_waits_while_a_peer_process_tree_burns_a_core(tmp_path):
    """A peer whose child process still computes is waited for (up to the limit); once it sleeps,
    the wait ends at once."""
    import subprocess
    import sys
    import time
    from types import SimpleNamespace

    import psutil

    from bench.peers import wait_quiet

    flag = tmp_path / "burn"
    flag.touch()
    script = ("import os, subprocess, sys, time\n"
              "child = subprocess.Popen([sys.executable, '-c', "
              "'import os, sys, time\\nwhile os.path.exists(sys.argv[1]): pass\\ntime.sleep(60)', sys.argv[1]])\n"
              "time.sleep(60)\n")
    parent = subprocess.Popen([sys.executable, "-c", script, str(flag)])
    try:
        server = SimpleNamespace(process=parent)
        while not psutil.Process(parent.pid).children():  # the burning child is up
            time.sleep(0.05)
        assert wait_quiet([server], interval=0.1, limit=1.5) >= 1.5  # its child burns: never quiet
        flag.unlink()
        assert wait_quiet([server], interval=0.1, limit=10.0) < 10.0  # sleeping now: quiet
    finally:
        for child in psutil.Process(parent.pid).children(recursive=True):
            child.kill()
        parent.kill()
        parent.wait()
