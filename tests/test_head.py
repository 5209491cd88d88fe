"""The learned ``head`` drafter: training on a synthetic language, losslessness, head files."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from drafters import HeadDrafter, HeadFile, default_head_path, make_drafter
from drafters.head import DraftHead, choose_readout, model_identity
from drafters.state import StateError
from specdec import SpeculativeDecoder
from specdec.distill import Shard, Trainer, distill_batch, split_positions
from tests.conftest import hf_greedy, tiny_llama

VOCAB = 96


def phrase_book(seed: int = 0, phrases: int = 10) -> list[list[int]]:
    """Random phrases of 5-9 tokens (ids 3..95): a language whose text is mostly predictable."""
    rng = np.random.default_rng(seed)
    return [rng.integers(3, VOCAB, size=rng.integers(5, 10)).tolist() for _ in range(phrases)]


def sentences(book, count: int, length: int, seed: int) -> torch.Tensor:
    """``[count, length]`` texts made of random phrases from ``book``."""
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(count):
        row: list[int] = []
        while len(row) < length:
            row += book[rng.integers(len(book))]
        rows.append(row[:length])
    return torch.tensor(rows)


@pytest.fixture(scope="module")
def trained_target():
    """A tiny Llama trained (seconds) to speak the phrase-book language."""
    book = phrase_book()
    model = tiny_llama(seed=3)
    with torch.no_grad():
        model.lm_head.weight.div_(8.0)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for step in range(150):
        batch = sentences(book, 32, 48, seed=step)
        loss = model(input_ids=batch, labels=batch).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval(), book


def train_head(model, book, steps: int) -> HeadFile:
    """Distil a head from the target's greedy replies to phrase-book prompts (``steps`` = 0: untrained)."""
    prompts = sentences(book, 48, 12, seed=1000).tolist()
    shards = [distill_batch(model, prompts[i : i + 16], 40, pad=0, eos_ids=[2]) for i in range(0, 48, 16)]
    data = Shard.cat(shards)
    counts = np.bincount(data.topk_ids[:, 0].numpy(), minlength=VOCAB).astype(float)
    readout = choose_readout(counts, [2], coverage=0.99, smallest=32)
    trainer = Trainer(model, data, readout, inner=128, lr=3e-3, batch_size=128)
    train, _ = split_positions(data)
    if steps:
        trainer.train(train, until=float("inf"), total_steps=steps)
    return HeadFile(trainer.head.eval(), readout, model_identity(model), {})


def acceptance(model, head_file, prompts) -> float:
    """Mean accepted draft tokens per step with the head drafter at a fixed budget of 8."""
    decoder = SpeculativeDecoder(model, drafter=HeadDrafter(head_file, model), tree_budget=8)
    accepted = []
    for prompt in prompts:
        decoder.generate(prompt[None], max_new_tokens=32)
        accepted += [n - 1 for n in decoder.last_stats.accepted_lengths]
    return float(np.mean(accepted))


def test_a_trained_head_is_accepted_far_more_than_an_untrained_one(trained_target):
    model, book = trained_target
    held_out = sentences(book, 6, 10, seed=5000)
    trained = acceptance(model, train_head(model, book, steps=300), held_out)
    untrained = acceptance(model, train_head(model, book, steps=0), held_out)
    print(f"accepted per step: trained {trained:.2f}, untrained {untrained:.2f}")
    assert trained > 1.5 and trained > untrained + 1.0, (trained, untrained)


@pytest.mark.parametrize("drafter", ["head", "auto"])
def test_greedy_with_a_head_equals_generate(trained_target, drafter, tmp_path):
    model, book = trained_target
    path = tmp_path / "head.pt"
    train_head(model, book, steps=40).save(path)
    decoder = SpeculativeDecoder(model, drafter=drafter, draft_head=path)
    assert "head" in decoder.drafter.name
    for prompt in sentences(book, 3, 9, seed=7000):
        out = decoder.generate(prompt[None], max_new_tokens=40)
        assert torch.equal(out, hf_greedy(model, prompt[None], 40))
    assert decoder.last_stats.per_drafter["head"]["proposed"] > 0


def test_auto_finds_the_head_saved_for_the_model(trained_target, tmp_path, monkeypatch):
    model, book = trained_target
    monkeypatch.setenv("SPECDEC_HOME", str(tmp_path))
    assert SpeculativeDecoder(model).drafter.name == "recycling+ngram"
    train_head(model, book, steps=0).save(default_head_path(model))
    assert SpeculativeDecoder(model).drafter.name == "recycling+ngram+head"


def test_a_head_refuses_another_model(trained_target, tmp_path):
    model, book = trained_target
    path = tmp_path / "head.pt"
    train_head(model, book, steps=0).save(path)
    other_weights = tiny_llama(seed=11)
    with pytest.raises(StateError, match="other weights"):
        HeadFile.load(path, other_weights)
    other_shape = tiny_llama(vocab_size=VOCAB + 4, seed=3)
    with pytest.raises(StateError, match="another model"):
        HeadFile.load(path, other_shape)
    with pytest.raises(StateError, match="another model"):
        make_drafter("head", VOCAB + 4, target=other_shape, draft_head=path)


def test_malformed_head_files_are_state_errors(trained_target, tmp_path):
    model, book = trained_target
    path = tmp_path / "head.pt"
    train_head(model, book, steps=0).save(path)
    good = torch.load(path, weights_only=True)
    cases = {
        "truncated": None,
        "kind": {**good, "kind": "specdec-drafter"},
        "version": {**good, "version": 99},
        "readout out of range": {**good, "readout_ids": torch.tensor([0, VOCAB])},
        "readout repeated": {**good, "readout_ids": torch.tensor([3, 3])},
        "weight shape": {**good, "weights": {**good["weights"], "fuse.bias": torch.zeros(3)}},
        "weight NaN": {**good, "weights": {**good["weights"], "fuse.bias": torch.full((64,), float("nan"))}},
        "missing weight": {**good, "weights": {k: v for k, v in good["weights"].items() if k != "up.weight"}},
        "hidden": {**good, "hidden": -1},
    }
    for name, payload in cases.items():
        bad = tmp_path / f"{name}.pt"
        if payload is None:
            bad.write_bytes(path.read_bytes()[:200])
        else:
            torch.save(payload, bad)
        with pytest.raises(StateError):
            HeadFile.load(bad, model)
    with pytest.raises(FileNotFoundError, match="specdec distill"):
        HeadFile.load(tmp_path / "missing.pt", model)


def test_head_drafter_without_a_feature_proposes_nothing(trained_target):
    model, book = trained_target
    drafter = HeadDrafter(train_head(model, book, steps=0), model)
    from drafters import DraftContext

    assert len(drafter.propose(DraftContext(np.array([5, 6, 7])), 8)) == 0
    assert isinstance(DraftHead(8, 16)(torch.zeros(2, 8), torch.zeros(2, 8)), torch.Tensor)


def test_prompt_files_are_checked(tmp_path):
    from specdec.distill import DistillError, read_prompts

    good = tmp_path / "p.jsonl"
    good.write_text('{"turns": ["What is 2+2?", "And 3+3?"]}\nplain line prompt\n\n', encoding="utf-8")
    assert read_prompts(good) == ["What is 2+2?", "plain line prompt"]
    cases = {"missing.txt": None, "bad.jsonl": '{"turns": [}\n', "turns.jsonl": '{"turns": []}\n',
             "empty.txt": "\n\n", "latin1.txt": "caf\xe9\n".encode("latin-1")}
    for name, content in cases.items():
        path = tmp_path / name
        if isinstance(content, bytes):
            path.write_bytes(content)
        elif content is not None:
            path.write_text(content, encoding="utf-8")
        with pytest.raises(DistillError, match="--prompts"):
            read_prompts(path)


def test_distill_cli_refuses_bad_arguments(tmp_path):
    from click.testing import CliRunner

    from specdec.cli import main

    for args in (["--minutes", "0"], ["--batch-size", "0"], ["--prompts", str(tmp_path / "missing.jsonl")]):
        result = CliRunner().invoke(main, ["distill", *args])
        assert result.exit_code == 2, (args, result.output)
        assert "Traceback" not in result.output


class CharTokenizer:
    """A template-free tokenizer for the tiny models: one id per character."""

    chat_template = None
    pad_token_id, eos_token_id = 0, 2

    def __call__(self, text, return_tensors=None, **_):
        ids = [3 + ord(c) % (VOCAB - 3) for c in text]
        return {"input_ids": torch.tensor([ids]) if return_tensors == "pt" else ids}


def test_distill_resumes_after_an_interruption(trained_target, tmp_path):
    from specdec.distill import distill

    model, _ = trained_target
    prompts = [f"prompt number {i} about {'xyz' * (i % 3)}" for i in range(12)]
    out = tmp_path / "head.pt"
    work = tmp_path / "head.pt.work"

    class Interrupted(Exception):
        pass

    def interrupt(phase, done):
        raise Interrupted

    def fake_clock():  # half a second per reading: the budget is deterministic
        ticks = iter(range(10**9))
        return lambda: 0.5 * next(ticks)

    options = dict(minutes=1, prompts=prompts, self_prompt_count=0, batch_size=4, max_new_tokens=12)
    with pytest.raises(Interrupted):
        distill(model, CharTokenizer(), out, progress=interrupt, clock=fake_clock(), **options)
    assert len(list(work.glob("shard-*.pt"))) == 1 and not out.exists()
    seen = []
    report = distill(model, CharTokenizer(), out, clock=fake_clock(), progress=lambda *p: seen.append(p), **options)
    assert out.is_file() and not work.exists()
    assert seen[0] == ("data", pytest.approx(8 / 12))  # the first batch was kept, not redone
    assert report.sequences == len(prompts) and report.train_steps > 0
    HeadFile.load(out, model)
