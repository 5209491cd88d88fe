"""``specdec distill``: train a draft head for a target by self-distillation, on this machine.

1. **Text** (`specdec.distill.corpus`): documentation shipped with installed packages, the
   closest text to chat replies a fresh machine holds.
2. **Replies** (until `REPLY_SHARE` of the budget): the target answers, greedily in batches, the
   user's prompts (Spec-Bench JSONL or one per line), prompts it writes itself (Magpie-style) and
   requests made from the text (summarise, explain, translate, ...): its own replies are the data
   closest to what it will be asked to draft.
3. **Readout**: the fewest most frequent reply tokens covering `COVERAGE` of them (FR-Spec), EOS
   included; replies and text weigh equally.
4. **Labels** (until `DATA_SHARE` of the budget): one teacher-forced forward per batch gives, at
   every reply position, the target's feature and its top next-token probabilities over the
   readout (`specdec.distill.labels`), the replies first, then the text as chat turns.
5. **Training** (the rest, `specdec.distill.training`): the EAGLE-style head on chunks with a
   window of context, unrolled chains, soft cross-entropy and feature regression; chunks from
   the replies are oversampled to `REPLY_WEIGHT` of the draws.

Everything is kept in a work directory beside the output (``<out>.work``): the plan, generated
replies, labelled shards and training checkpoints, so an interrupted run resumes where it stopped
(within the same budget); it is removed once the head is saved.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from drafters.head import HeadFile, choose_readout, model_identity, readout_coverage
from specdec.distill.corpus import PIECE_TOKENS, Text, packaged_texts, task_prompts
from specdec.distill.labels import Shard, batches_by_length, generate_replies, label_sequences
from specdec.distill.training import Trainer, head_heads, split_positions
from specdec.models.prompts import encode_chat

COVERAGE = 0.95  # share of reply tokens the readout must cover
REPLY_SHARE = 0.4  # share of the time budget spent generating the target's own replies
DATA_SHARE = 0.62  # share of the time budget spent on data (replies and labels); the rest trains
REPLY_WEIGHT = 0.5  # share of training chunks drawn from the target's replies (oversampled)
TASK_PROMPTS = 4000  # requests about the text offered for replies (the budget answers what it can)
WINDOW = 32  # committed entries the head attends to
TEXT_CHARS = 6_000_000  # documentation text gathered (more than the default budget labels)
PLAN_CHUNK = 256  # sequences sorted into length batches together (a budget cut still samples all)

__all__ = ["DistillError", "DistillReport", "Shard", "Trainer", "chat_ids", "distill", "eos_ids_of",
           "generate_replies", "label_sequences", "pad_id", "read_prompts", "reply_counts", "split_positions"]


class DistillError(ValueError):
    """A distillation input that cannot be used (one clear line for the user)."""


def read_prompts(path) -> list[str]:
    """Prompts from a Spec-Bench JSONL file (every ``turns[0]``) or a text file (one per line)."""
    path = Path(path)
    if not path.is_file():
        raise DistillError(f"--prompts: file not found: {path}")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as err:
        raise DistillError(f"--prompts {path}: not UTF-8 text (byte {err.start})") from None
    prompts = []
    for line_no, line in enumerate(lines, start=1):
        line = line.strip()
        if not line:
            continue
        if line.startswith("{"):
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise DistillError(f"--prompts {path}:{line_no}: not valid JSON ({err.msg})") from None
            turns = row.get("turns") if isinstance(row, dict) else None
            if not isinstance(turns, list) or not turns or not isinstance(turns[0], str) or not turns[0].strip():
                raise DistillError(f"--prompts {path}:{line_no}: a JSON line needs 'turns': [non-empty text, ...]")
            prompts.append(turns[0])
        else:
            prompts.append(line)
    if not prompts:
        raise DistillError(f"--prompts {path}: no prompts")
    return prompts



def chat_ids(tokenizer, prompt: str) -> list[int]:
    """Prompt ids of one user message through the chat template (`specdec.models.prompts.encode_chat`)."""
    return encode_chat(tokenizer, [{"role": "user", "content": prompt}])[0].tolist()


def self_prompts(model, tokenizer, count: int, batch_size: int, max_tokens: int = 48, seed: int = 0) -> list[str]:
    """``count`` prompts the target writes itself (Magpie): sampled at temperature 1 after the chat
    template's text up to the user message; too short or templated ones are dropped."""
    if count <= 0 or not getattr(tokenizer, "chat_template", None):
        return []
    marker = "\u2063PROMPT\u2063"
    text = tokenizer.apply_chat_template([{"role": "user", "content": marker}], tokenize=False,
                                         add_generation_prompt=False)
    prefix = tokenizer(text[: text.index(marker)], add_special_tokens=False)["input_ids"]
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    prompts: list[str] = []
    try:
        for _ in range(math.ceil(count / batch_size) * 2):
            if len(prompts) >= count:
                break
            ids = torch.tensor([prefix] * batch_size, device=model.device)
            out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True, temperature=1.0, top_p=1.0,
                                 top_k=0, max_new_tokens=max_tokens, pad_token_id=pad_id(tokenizer))
            for row in out[:, len(prefix):].tolist():
                words = tokenizer.decode(row, skip_special_tokens=True).strip()
                if len(words.split()) >= 4 and "<|" not in words and len(prompts) < count:
                    prompts.append(words)
    finally:
        torch.random.set_rng_state(generator_state)
    return prompts


def pad_id(tokenizer) -> int:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return int(pad if pad is not None else 0)


def eos_ids_of(model, tokenizer=None) -> list[int]:
    eos = model.generation_config.eos_token_id if model.generation_config is not None else None
    eos = tokenizer.eos_token_id if eos is None and tokenizer is not None else eos
    return [int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos]) if e is not None]


def batch_order(tokenizer, prompts: list[str], batch_size: int, max_prompt_tokens: int, seed: int) -> list[str]:
    """Prompts of at most ``max_prompt_tokens`` tokens, batched by length (little padding), the
    batches in random order (a budget that ends early still sees every kind of prompt)."""
    lengths = [len(chat_ids(tokenizer, p)) for p in prompts]
    kept = sorted((n, p) for n, p in zip(lengths, prompts) if n <= max_prompt_tokens)
    batches = [kept[i : i + batch_size] for i in range(0, len(kept), batch_size)]
    np.random.default_rng(seed).shuffle(batches)
    return [p for batch in batches for _, p in batch]


@dataclass
class DistillReport:
    """What a distillation did (printed by the CLI, stored in the head file)."""

    prompts: int = 0
    reply_tokens: int = 0
    text_tokens: int = 0
    sequences: int = 0
    tokens: int = 0
    data_seconds: float = 0.0
    train_seconds: float = 0.0
    train_steps: int = 0
    readout_size: int = 0
    readout_coverage: dict = field(default_factory=dict)
    final_loss: float = float("nan")
    held_out: dict = field(default_factory=dict)
    file_mb: float = 0.0


def chat_pieces(tokenizer) -> tuple[list[int], list[int], list[int]]:
    """Token ids around one user turn and the assistant's reply in the chat template: before the
    request, between request and reply, after the reply (a template-free tokenizer: none,
    a blank line, none)."""
    if not getattr(tokenizer, "chat_template", None):
        return [], tokenizer("\n\n", add_special_tokens=False)["input_ids"], []
    user, reply = "\u2063USER\u2063", "\u2063REPLY\u2063"
    text = tokenizer.apply_chat_template([{"role": "user", "content": user}, {"role": "assistant", "content": reply}],
                                         tokenize=False)
    before, rest = text.split(user)
    middle, after = rest.split(reply)
    encode = lambda piece: tokenizer(piece, add_special_tokens=False)["input_ids"] if piece else []  # noqa: E731
    return encode(before), encode(middle), encode(after)


def text_sequences(tokenizer, texts: list[Text]) -> list[tuple[list[int], int]]:
    """``(ids, reply_start)`` chat sequences of ``texts``, replies cut into `PIECE_TOKENS` pieces."""
    before, middle, after = chat_pieces(tokenizer)
    requests = tokenizer([t.request for t in texts], add_special_tokens=False)["input_ids"]
    replies = tokenizer([t.reply for t in texts], add_special_tokens=False)["input_ids"]
    sequences = []
    for request, reply in zip(requests, replies):
        prompt = before + list(request) + middle
        for start in range(0, len(reply), PIECE_TOKENS):
            piece = list(reply[start : start + PIECE_TOKENS])
            sequences.append((prompt + piece + (after if start + PIECE_TOKENS >= len(reply) else []), len(prompt)))
    return sequences


def label_plan(lengths: list[int]) -> list[list[int]]:
    """Labelling batches (indices into the sequences) in order, length-sorted within chunks."""
    plan = []
    for first in range(0, len(lengths), PLAN_CHUNK):
        chunk = lengths[first : first + PLAN_CHUNK]
        plan += [[first + i for i in batch] for batch in batches_by_length(chunk)]
    return plan


def reply_counts(sequences: list[tuple[list[int], int]], vocab: int) -> np.ndarray:
    """Frequencies (summing to 1) of the reply tokens of ``sequences`` over ``vocab`` ids."""
    ids = [t for seq, start in sequences for t in seq[start:]]
    counts = np.bincount(np.asarray(ids, dtype=np.int64), minlength=vocab)[:vocab].astype(np.float64)
    return counts / max(counts.sum(), 1.0)


class Workspace:
    """The resumable state of one distillation: ``<out>.work`` with ``manifest.json``; every file
    is written whole (a temporary file renamed over it), so an interruption leaves no torn file."""

    FORMAT = 2  # the layout of the manifest and shards

    def __init__(self, out: Path, config_hash: str) -> None:
        self.dir = out.with_name(out.name + ".work")
        self.dir.mkdir(parents=True, exist_ok=True)
        self.path = self.dir / "manifest.json"
        try:
            self.manifest = json.loads(self.path.read_text()) if self.path.is_file() else {}
        except json.JSONDecodeError:
            raise DistillError(f"{self.path} is not valid JSON; remove {self.dir} to start over") from None
        if self.manifest and self.manifest.get("format") != self.FORMAT:
            raise DistillError(f"{self.dir} was written by another version of specdec distill; remove it to start over")
        if self.manifest and self.manifest.get("config_hash") != config_hash:
            raise DistillError(f"{self.dir} holds data of another model; remove it or choose another --out")
        self.manifest.setdefault("format", self.FORMAT)
        self.manifest.setdefault("config_hash", config_hash)
        self.manifest.setdefault("spent_seconds", 0.0)

    def write(self, name: str, save: Callable[[Path], None]) -> None:
        """``save(path)`` to a temporary file, then renamed to ``name`` in the work directory."""
        temporary = self.dir / (name + ".tmp")
        save(temporary)
        os.replace(temporary, self.dir / name)

    def save(self) -> None:
        self.write("manifest.json", lambda path: path.write_text(json.dumps(self.manifest)))

    def remove(self) -> None:
        for path in self.dir.iterdir():
            path.unlink()
        self.dir.rmdir()


def distill(model, tokenizer, out: Path, minutes: float, prompts: list[str], self_prompt_count: int = 256,
            batch_size: int = 64, max_new_tokens: int = 128, max_prompt_tokens: int = 1024,
            inner: int | None = None, text_chars: int = TEXT_CHARS, seed: int = 0,
            progress: Callable[[str, float], None] | None = None, clock=time.monotonic) -> DistillReport:
    """Train and save a head for ``model`` within about ``minutes`` (resumable; see the module doc).

    ``progress(phase, fraction)`` is called as work advances (phases ``"data"``, ``"train"``).
    Returns the report (also stored in the head file's ``info``).
    """
    if not minutes > 0:
        raise DistillError(f"--minutes must be > 0, got {minutes}")
    if batch_size < 1 or max_new_tokens < 1:
        raise DistillError("batch size and max_new_tokens must be >= 1")
    report = DistillReport()
    identity = model_identity(model)
    work = Workspace(out, identity["config_hash"])
    manifest = work.manifest
    started = clock() - manifest["spent_seconds"]  # a resumed run continues the same budget
    deadline = started + 60 * minutes
    vocab = int(model.get_output_embeddings().weight.shape[0])
    pad, eos = pad_id(tokenizer), eos_ids_of(model, tokenizer)
    data_until = started + 60 * minutes * DATA_SHARE

    def tell(phase: str, fraction: float) -> None:
        manifest["spent_seconds"] = clock() - started
        if progress:
            progress(phase, min(1.0, max(0.0, fraction)))

    def data_fraction() -> float:
        return (clock() - started) / max(data_until - started, 1e-9)

    # 1. documentation text (material for requests and text to label)
    texts_path = work.dir / "texts.json"
    if not texts_path.is_file():
        found = packaged_texts(text_chars, seed) if text_chars > 0 else []
        rows = [[t.request, t.reply, t.source] for t in found]
        work.write("texts.json", lambda path: path.write_text(json.dumps(rows)))
    texts = [Text(*row) for row in json.loads(texts_path.read_text())]

    # 2. the target's own replies: to the user's prompts, its own (Magpie), requests about the text
    if "prompts" not in manifest:
        own = self_prompts(model, tokenizer, self_prompt_count, batch_size, seed=seed)
        asked = list(prompts) + own + task_prompts(texts, TASK_PROMPTS)
        manifest.update(prompts=batch_order(tokenizer, asked, batch_size, max_prompt_tokens, seed),
                        replies=[], data_seconds=0.0)
        work.save()
    all_prompts = manifest["prompts"]
    replies_until = started + 60 * minutes * REPLY_SHARE
    batch_seconds = 0.0
    while "readout" not in manifest and len(manifest["replies"]) < len(all_prompts) \
            and (not manifest["replies"] or clock() + batch_seconds < replies_until):
        began = clock()
        encoded = [chat_ids(tokenizer, p) for p in all_prompts[len(manifest["replies"]):][:batch_size]]
        replies = generate_replies(model, encoded, max_new_tokens, pad, eos)
        manifest["replies"] += [[prompt, reply] for prompt, reply in zip(encoded, replies)]
        batch_seconds = clock() - began
        manifest["data_seconds"] += batch_seconds
        work.save()
        tell("data", data_fraction())
    reply_sequences = [(prompt + reply, len(prompt)) for prompt, reply in manifest["replies"] if reply]
    report.prompts = len(manifest["replies"])

    # 3. the readout
    pieces = text_sequences(tokenizer, texts) if texts else []
    text_pieces = [(ids, start) for ids, start in pieces if len(ids) > start]
    sequences = reply_sequences + text_pieces
    if not sequences:
        raise DistillError("no replies and no text to distil: give --prompts FILE or use an instruct model")
    if "readout" not in manifest:
        counts = reply_counts(reply_sequences, vocab) + reply_counts(text_pieces, vocab)
        readout_ids = choose_readout(counts, eos, COVERAGE)
        manifest.update(readout=readout_ids.tolist(), batches_done=0, coverage={
            str(k): round(v, 4) for k, v in readout_coverage(counts, [1024, 2048, 4096, 8192, 16384]).items()})
        work.save()
    readout_ids = torch.tensor(manifest["readout"], dtype=torch.long)

    # 4. labels
    reply_plan = label_plan([len(ids) for ids, _ in reply_sequences])  # the replies first
    plan = reply_plan + [[len(reply_sequences) + i for i in batch]
                         for batch in label_plan([len(ids) for ids, _ in text_pieces])]
    batch_seconds = 0.0
    while manifest["batches_done"] < len(plan) and (manifest["batches_done"] == 0
                                                     or clock() + batch_seconds < data_until):
        began = clock()
        batch = plan[manifest["batches_done"]]
        shard = label_sequences(model, [sequences[i] for i in batch], readout_ids, WINDOW, pad)
        work.write(f"shard-{manifest['batches_done']:06d}.pt", lambda path: torch.save(shard.to_dict(), path))
        manifest["batches_done"] += 1
        batch_seconds = clock() - began
        manifest["data_seconds"] += batch_seconds
        work.save()
        tell("data", max(data_fraction(), manifest["batches_done"] / len(plan)))
    tell("data", 1.0)
    shards = [Shard.from_dict(torch.load(work.dir / f"shard-{i:06d}.pt", weights_only=True))
              for i in range(manifest["batches_done"])]
    reply_positions = sum(len(shard) for shard in shards[: len(reply_plan)])  # the replies' positions come first
    data = Shard.cat(shards)
    labelled_sequences = [i for batch in plan[: manifest["batches_done"]] for i in batch]
    report.sequences = len(labelled_sequences)
    report.reply_tokens = sum(len(sequences[i][0]) - sequences[i][1] for i in labelled_sequences
                              if i < len(reply_sequences))
    report.tokens = int(data.labelled.sum())
    report.text_tokens = report.tokens - report.reply_tokens
    report.data_seconds = manifest["data_seconds"]
    report.readout_size = len(readout_ids)
    report.readout_coverage = manifest["coverage"]

    # 5. training
    hidden = data.features.shape[1]
    trainer = Trainer(model, data, readout_ids, inner or 2 * hidden, head_heads(hidden), WINDOW, seed=seed)
    train_positions, held_positions = split_positions(data)
    train_starts = trainer.usable_starts(train_positions)
    if len(held_positions):  # a training chunk must not run into the held-out sequences
        train_starts = train_starts[train_starts < held_positions[0] - trainer.chunk_len]
    train_starts = oversample(train_starts, train_starts < reply_positions, REPLY_WEIGHT)
    held_out = trainer.usable_starts(held_positions)
    held_out = held_out[torch.randperm(len(held_out), generator=torch.Generator().manual_seed(seed))[:1024]]
    checkpoint = work.dir / "train.pt"
    total_steps = None
    if checkpoint.is_file():
        saved = torch.load(checkpoint, weights_only=True)
        trainer.head.load_state_dict(saved["head"])
        trainer.optimizer.load_state_dict(saved["optimizer"])
        trainer.steps, total_steps = int(saved["steps"]), int(saved["total_steps"])
    train_started = clock()
    if total_steps is None:
        seconds_per_step = _time_steps(trainer, train_starts, clock)
        total_steps = max(1, int((deadline - clock()) / seconds_per_step))
    next_save = clock() + 60

    def step_done(step: int, loss: float) -> None:
        nonlocal next_save
        tell("train", step / total_steps)
        if clock() >= next_save:
            state = {"head": trainer.head.state_dict(), "optimizer": trainer.optimizer.state_dict(), "steps": step,
                     "total_steps": total_steps}
            work.write("train.pt", lambda path: torch.save(state, path))
            work.save()
            next_save = clock() + 60

    report.final_loss = trainer.train(train_starts, deadline, total_steps, clock, step_done)
    report.train_seconds = clock() - train_started
    report.train_steps = trainer.steps
    report.held_out = trainer.evaluate(held_out)
    head_file = HeadFile(trainer.head, readout_ids, identity, {k: v for k, v in vars(report).items()})
    head_file.save(out)
    report.file_mb = out.stat().st_size / 1e6
    work.remove()
    return report


def oversample(starts: torch.Tensor, preferred: torch.Tensor, share: float) -> torch.Tensor:
    """``starts`` with the ``preferred`` ones repeated so that they make about ``share`` of a
    uniform draw (unchanged when either kind is missing or already that common)."""
    chosen, others = starts[preferred], starts[~preferred]
    if not len(chosen) or not len(others):
        return starts
    repeats = math.ceil(share / (1 - share) * len(others) / len(chosen))
    return torch.cat([chosen.repeat(max(repeats, 1)), others])


def _time_steps(trainer: Trainer, starts: torch.Tensor, clock) -> float:
    """Seconds per training step, from two measured forward-backward passes (gradients discarded)."""
    began = clock()
    for _ in range(2):
        trainer.loss(starts[torch.randint(len(starts), (trainer.chunks,), generator=trainer.generator)])[0].backward()
    trainer.head.zero_grad(set_to_none=True)
    return max((clock() - began) / 2 * 1.15, 1e-4)  # the optimiser step adds a little
