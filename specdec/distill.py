"""``specdec distill``: train a draft head for a target by self-distillation, on this machine.

1. **Prompts**: the user's files (Spec-Bench JSONL or one prompt per line) and prompts the target
   writes for itself, Magpie-style: sampled after its chat template's user prefix.
2. **Replies and features**: the target answers the prompts greedily in batches; one batched
   teacher-forced forward over prompt + reply records, per reply position, the target's feature
   (what its LM head reads) and its top-`TOP_K` next-token distribution.
3. **Readout**: the fewest most frequent tokens of the replies that cover `COVERAGE` of them
   (FR-Spec), EOS included.
4. **Training**: `drafters.head.DraftHead` unrolled `TRAIN_DEPTH` steps on its own predicted
   features (training-time test): soft cross-entropy to the target's distribution at each depth
   plus a feature regression term, AdamW, for the time left.

Everything is kept in a work directory beside the output (``<out>.work``): generated shards and
training checkpoints, so an interrupted run resumes where it stopped; it is removed once the head
is saved.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from drafters.head import DraftHead, HeadFile, choose_readout, model_identity, readout_coverage
from specdec.prompts import encode_chat

TOP_K = 8  # target probabilities kept per position (soft labels)
COVERAGE = 0.95  # share of reply tokens the readout must cover
TRAIN_DEPTH = 4  # unrolled head steps in training
DEPTH_DECAY = 0.8  # loss weight of depth d: DEPTH_DECAY ** (d - 1)
FEATURE_WEIGHT = 0.5  # weight of the feature regression (smooth L1) against the soft cross-entropy
DATA_SHARE = 0.6  # share of the time budget spent generating data (the rest trains)


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


@dataclass
class Shard:
    """Distillation data of one batch of replies, concatenated over its sequences.

    Attributes:
        tokens: ``[N]`` int64 input token at each position (a sequence's last prompt token, then
            its reply).
        features: ``[N, h]`` bfloat16 the target's feature at each position.
        topk_ids: ``[N, TOP_K]`` int64 the target's most likely next tokens there.
        topk_probs: ``[N, TOP_K]`` float16 their probabilities.
        room: ``[N]`` int64 positions after this one in the same sequence.
    """

    tokens: torch.Tensor
    features: torch.Tensor
    topk_ids: torch.Tensor
    topk_probs: torch.Tensor
    room: torch.Tensor

    @staticmethod
    def cat(shards: list["Shard"]) -> "Shard":
        return Shard(*(torch.cat([getattr(s, name) for s in shards]) for name in
                       ("tokens", "features", "topk_ids", "topk_probs", "room")))


@dataclass
class DistillReport:
    """What a distillation did (printed by the CLI, stored in the head file)."""

    prompts: int = 0
    sequences: int = 0
    tokens: int = 0
    data_seconds: float = 0.0
    train_seconds: float = 0.0
    train_steps: int = 0
    readout_size: int = 0
    readout_coverage: dict = field(default_factory=dict)
    final_loss: float = float("nan")
    held_out_top1: float = float("nan")
    file_mb: float = 0.0


def chat_ids(tokenizer, prompt: str) -> list[int]:
    """Prompt ids of one user message through the chat template (`specdec.prompts.encode_chat`)."""
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


@torch.inference_mode()
def distill_batch(model, encoded: list[list[int]], max_new_tokens: int, pad: int, eos_ids) -> Shard:
    """Greedy replies to the prompts ``encoded`` (token ids, one batch) with, recorded in the same
    forwards (a hook on the LM head), the target's feature and top next-token probabilities at
    each last prompt token and reply token; ``pad`` fills, ``eos_ids`` end a reply."""
    eos = set(eos_ids)
    width = max(map(len, encoded))
    ids = torch.tensor([[pad] * (width - len(e)) + e for e in encoded], device=model.device)  # left padded
    mask = torch.tensor([[0] * (width - len(e)) + [1] * len(e) for e in encoded], device=model.device)
    features, top_ids, top_probs = [], [], []  # per forward: [B, h], [B, TOP_K], [B, TOP_K] (host)

    def record(module, args, output) -> None:
        features.append(args[0][:, -1].to(torch.bfloat16).cpu())
        top = torch.softmax(output[:, -1].float(), dim=-1).topk(TOP_K, dim=-1)
        top_ids.append(top.indices.cpu())
        top_probs.append(top.values.to(torch.float16).cpu())

    handle = model.get_output_embeddings().register_forward_hook(record)
    try:
        out = model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=max_new_tokens,
                             pad_token_id=pad, temperature=None, top_p=None, top_k=None)
    finally:
        handle.remove()
    features, top_ids, top_probs = torch.stack(features, 1), torch.stack(top_ids, 1), torch.stack(top_probs, 1)
    parts = []
    for b, (prompt, row) in enumerate(zip(encoded, out[:, width:].tolist())):
        n = next((i + 1 for i, token in enumerate(row) if token in eos), len(row))  # reply length, EOS kept
        tokens = torch.tensor([prompt[-1]] + row[: n - 1])  # position j's feature predicts reply token j+1
        parts.append(Shard(tokens, features[b, :n], top_ids[b, :n], top_probs[b, :n], torch.arange(n - 1, -1, -1)))
    return Shard.cat(parts)


def eos_ids_of(model, tokenizer=None) -> list[int]:
    eos = model.generation_config.eos_token_id if model.generation_config is not None else None
    eos = tokenizer.eos_token_id if eos is None and tokenizer is not None else eos
    return [int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos]) if e is not None]


class Trainer:
    """The head, its optimiser and the frozen target parts it reads (embeddings, readout rows)."""

    def __init__(self, model, data: Shard, readout_ids: torch.Tensor, inner: int, lr: float = 1e-3,
                 batch_size: int = 256, seed: int = 0) -> None:
        torch.manual_seed(seed)
        hidden = data.features.shape[1]
        self.head = DraftHead(hidden, inner)
        self.optimizer = torch.optim.AdamW(self.head.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
        self.lr, self.batch_size, self.steps = lr, batch_size, 0
        self.data = data
        self.embed = model.get_input_embeddings()
        self.readout = model.get_output_embeddings().weight.detach()[readout_ids].float().cpu()  # [K, h]
        to_readout = torch.full((self.readout_vocab(model),), -1, dtype=torch.long)
        to_readout[readout_ids] = torch.arange(len(readout_ids))
        self.targets = to_readout[data.topk_ids]  # [N, TOP_K] readout index (-1: not read out)
        self.generator = torch.Generator().manual_seed(seed)

    @staticmethod
    def readout_vocab(model) -> int:
        return int(model.get_output_embeddings().weight.shape[0])

    def loss(self, starts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Unrolled loss from ``starts`` (positions with room >= 1) and the depth-1 top-1 hit rate."""
        data = self.data
        features = data.features[starts].float()
        total, weights, hits = 0.0, 0.0, torch.zeros(())
        for depth in range(1, TRAIN_DEPTH + 1):
            valid = data.room[starts] >= depth  # [B]
            if not valid.any():
                break
            at = torch.where(valid, starts + depth, starts)
            with torch.no_grad():
                embedded = self.embed(data.tokens[at].to(self.embed.weight.device)).float().cpu()
            features = self.head(features, embedded)
            logq = torch.log_softmax(features @ self.readout.T, dim=-1)  # [B, K]
            targets = self.targets[at]
            probs = data.topk_probs[at].float() * (targets >= 0)
            ce = -(probs * logq.gather(1, targets.clamp(min=0))).sum(-1)
            regression = F.smooth_l1_loss(features, data.features[at].float(), reduction="none").mean(-1)
            per_row = (ce + FEATURE_WEIGHT * regression) * valid
            weight = DEPTH_DECAY ** (depth - 1)
            total = total + weight * per_row.sum() / valid.sum()
            weights += weight
            if depth == 1:
                hits = ((logq.argmax(-1) == targets[:, 0]) & valid).float().sum() / valid.sum()
        return total / weights, hits

    def train(self, usable: torch.Tensor, until: float, total_steps: int, clock=time.monotonic,
              on_step: Callable[[int, float], None] | None = None) -> float:
        """AdamW steps over random ``usable`` starts until ``clock() >= until`` or ``total_steps``;
        cosine learning rate over ``total_steps``. Returns the last loss."""
        self.head.train()
        last = float("nan")
        while self.steps < total_steps and clock() < until:
            pick = torch.randint(len(usable), (self.batch_size,), generator=self.generator)
            loss, _ = self.loss(usable[pick])
            for group in self.optimizer.param_groups:
                group["lr"] = self.lr * 0.5 * (1 + math.cos(math.pi * self.steps / total_steps))
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.head.parameters(), 0.5)
            self.optimizer.step()
            self.steps += 1
            last = float(loss.detach())
            if on_step is not None:
                on_step(self.steps, last)
        self.head.eval()
        return last

    @torch.no_grad()
    def top1(self, starts: torch.Tensor) -> float:
        """Depth-1 top-1 agreement with the target on ``starts``."""
        self.head.eval()
        return float(self.loss(starts)[1]) if len(starts) else float("nan")


def split_positions(data: Shard, held_out: float = 0.05) -> tuple[torch.Tensor, torch.Tensor]:
    """Train and held-out start positions (room >= 1), split by sequence (the last sequences held out)."""
    starts = torch.nonzero(data.room >= 1).flatten()
    sequence_of = torch.cumsum((data.room == 0).long(), 0) - (data.room == 0).long()  # sequence index per position
    sequences = int(sequence_of[-1]) + 1 if len(data.room) else 0
    cut = sequences - max(1, int(sequences * held_out)) if sequences > 1 else sequences
    train = starts[sequence_of[starts] < cut]
    return train, starts[sequence_of[starts] >= cut]


def batch_order(tokenizer, prompts: list[str], batch_size: int, max_prompt_tokens: int, seed: int) -> list[str]:
    """Prompts of at most ``max_prompt_tokens`` tokens, batched by length (little padding), the
    batches in random order (a budget that ends early still sees every kind of prompt)."""
    lengths = [len(chat_ids(tokenizer, p)) for p in prompts]
    kept = sorted((n, p) for n, p in zip(lengths, prompts) if n <= max_prompt_tokens)
    batches = [kept[i : i + batch_size] for i in range(0, len(kept), batch_size)]
    np.random.default_rng(seed).shuffle(batches)
    return [p for batch in batches for _, p in batch]


def distill(model, tokenizer, out: Path, minutes: float, prompts: list[str], self_prompt_count: int = 64,
            batch_size: int = 16, max_new_tokens: int = 160, max_prompt_tokens: int = 1024,
            inner: int | None = None, seed: int = 0,
            progress: Callable[[str, float], None] | None = None, clock=time.monotonic) -> DistillReport:
    """Train and save a head for ``model`` within about ``minutes`` (resumable; see the module doc).

    ``progress(phase, fraction)`` is called as work advances. Returns the report (also stored in
    the head file's ``info``).
    """
    if not minutes > 0:
        raise DistillError(f"--minutes must be > 0, got {minutes}")
    if batch_size < 1 or max_new_tokens < 1:
        raise DistillError("batch size and max_new_tokens must be >= 1")
    started = clock()
    deadline = started + 60 * minutes
    report = DistillReport()
    work = out.with_name(out.name + ".work")
    work.mkdir(parents=True, exist_ok=True)
    identity = model_identity(model)
    manifest_path = work / "manifest.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {}
    if manifest and manifest.get("config_hash") != identity["config_hash"]:
        raise DistillError(f"{work} holds data of another model; remove it or choose another --out")
    if "prompts" not in manifest:
        own = self_prompts(model, tokenizer, self_prompt_count, batch_size, seed=seed)
        manifest = {"config_hash": identity["config_hash"], "done": 0, "data_seconds": 0.0,
                    "prompts": batch_order(tokenizer, list(prompts) + own, batch_size, max_prompt_tokens, seed)}
        manifest_path.write_text(json.dumps(manifest))
    all_prompts = manifest["prompts"]
    if not all_prompts:
        raise DistillError("no prompts: give --prompts FILE or use an instruct model (it writes its own)")
    report.prompts = len(all_prompts)
    data_until = started + 60 * minutes * DATA_SHARE
    batch_started, batch_seconds = clock(), 0.0
    while manifest["done"] < len(all_prompts) and (manifest["done"] == 0 or clock() + batch_seconds < data_until):
        first = manifest["done"]
        batch = all_prompts[first : first + batch_size]
        shard = distill_batch(model, [chat_ids(tokenizer, p) for p in batch], max_new_tokens, pad_id(tokenizer),
                              eos_ids_of(model, tokenizer))
        torch.save(_shard_dict(shard), work / f"shard-{first:06d}.pt")
        manifest["done"] = first + len(batch)
        batch_seconds = clock() - batch_started
        manifest["data_seconds"] += batch_seconds
        batch_started = clock()
        manifest_path.write_text(json.dumps(manifest))
        if progress:
            progress("data", min(1.0, max(manifest["done"] / len(all_prompts),
                                          (clock() - started) / max(data_until - started, 1e-9))))
    data = Shard.cat([_shard_from(torch.load(p, weights_only=True)) for p in sorted(work.glob("shard-*.pt"))])
    report.sequences = int((data.room == 0).sum())
    report.tokens = len(data.tokens)
    report.data_seconds = manifest["data_seconds"]

    counts = np.bincount(data.topk_ids[:, 0].numpy(), minlength=Trainer.readout_vocab(model)).astype(np.float64)
    readout_ids = choose_readout(counts, eos_ids_of(model, tokenizer), COVERAGE)
    report.readout_size = len(readout_ids)
    report.readout_coverage = {str(k): round(v, 4) for k, v in
                               readout_coverage(counts, [1024, 2048, 4096, 8192, 16384]).items()}
    train_starts, held_out = split_positions(data)
    trainer = Trainer(model, data, readout_ids, inner or 2 * data.features.shape[1], seed=seed)
    checkpoint = work / "train.pt"
    if checkpoint.is_file():
        saved = torch.load(checkpoint, weights_only=True)
        trainer.head.load_state_dict(saved["head"])
        trainer.optimizer.load_state_dict(saved["optimizer"])
        trainer.steps = int(saved["steps"])
    train_started = clock()
    seconds_per_step = _time_steps(trainer, train_starts, clock)
    total_steps = max(trainer.steps + 1, int((deadline - clock()) / seconds_per_step))
    next_save = clock() + 60

    def step_done(step: int, loss: float) -> None:
        nonlocal next_save
        if progress:
            progress("train", step / total_steps)
        if clock() >= next_save:
            torch.save({"head": trainer.head.state_dict(), "optimizer": trainer.optimizer.state_dict(),
                        "steps": step}, checkpoint)
            next_save = clock() + 60

    report.final_loss = trainer.train(train_starts, deadline, total_steps, clock, step_done)
    report.train_seconds = clock() - train_started
    report.train_steps = trainer.steps
    report.held_out_top1 = trainer.top1(held_out[:4096])
    head_file = HeadFile(trainer.head, readout_ids, identity, {k: v for k, v in vars(report).items()})
    head_file.save(out)
    report.file_mb = out.stat().st_size / 1e6
    for path in work.iterdir():
        path.unlink()
    work.rmdir()
    return report


def _time_steps(trainer: Trainer, starts: torch.Tensor, clock) -> float:
    """Seconds per training step, from two measured forward-backward passes (gradients discarded)."""
    began = clock()
    for _ in range(2):
        loss, _ = trainer.loss(starts[torch.randint(len(starts), (trainer.batch_size,), generator=trainer.generator)])
        loss.backward()
    trainer.head.zero_grad(set_to_none=True)
    return max((clock() - began) / 2 * 1.15, 1e-4)  # the optimiser step adds a little


def _shard_dict(shard: Shard) -> dict:
    return {name: getattr(shard, name) for name in ("tokens", "features", "topk_ids", "topk_probs", "room")}


def _shard_from(saved: dict) -> Shard:
    return Shard(saved["tokens"], saved["features"], saved["topk_ids"], saved["topk_probs"], saved["room"])
