"""Training the draft head on labelled positions: chunks of text, unrolled chains (training-time test).

A batch is ``chunks`` runs of ``chunk_len`` consecutive query entries, each with the ``window``
entries before it as context. Depth 1 is every query entry's prediction of the next feature from
true entries (a band mask: the last ``window`` entries of the same sequence); depth ``d`` feeds
each query's depth ``d-1`` prediction back with the next true token, attending to the same true
window and to its own chain, as drafting does. Loss per depth: soft cross-entropy to the target's
distribution plus a feature regression, weighted `DEPTH_DECAY` ** (d - 1).
"""

from __future__ import annotations

import math
import time
from typing import Callable

import torch
import torch.nn.functional as F

from drafters.head_net import DraftHead, attend
from specdec.distill.labels import Shard

TRAIN_DEPTH = 4  # unrolled head steps in training
DEPTH_DECAY = 0.8  # loss weight of depth d: DEPTH_DECAY ** (d - 1)
FEATURE_WEIGHT = 0.5  # weight of the feature regression (smooth L1) against the soft cross-entropy


def head_heads(hidden: int) -> int:
    """Attention heads for a feature size: heads of size 64, 32, 16 or 8, the first that divides
    it (one head otherwise; `DraftHead` refuses an odd size)."""
    for size in (64, 32, 16, 8):
        if hidden % size == 0 and hidden >= size:
            return hidden // size
    return 1


class Trainer:
    """The head, its optimiser and the frozen target parts it reads (embeddings, readout rows).

    Args:
        model: the target (its input embeddings and LM head rows are read, frozen).
        data: the labelled positions.
        readout_ids: ``[K]`` the readout tokens (``data.top_ids`` index them).
        inner, heads, window: the head's shape (`drafters.head_net.DraftHead`).
        lr: peak learning rate (cosine decay over the planned steps).
        chunks, chunk_len: a batch's runs and query entries per run.
    """

    def __init__(self, model, data: Shard, readout_ids: torch.Tensor, inner: int, heads: int, window: int,
                 lr: float = 1e-3, chunks: int = 16, chunk_len: int = 64, seed: int = 0) -> None:
        torch.manual_seed(seed)
        hidden = data.features.shape[1]
        self.head = DraftHead(hidden, inner, heads, window)
        self.optimizer = torch.optim.AdamW(self.head.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
        self.lr, self.chunks, self.chunk_len, self.steps = lr, chunks, chunk_len, 0
        self.data = data
        self.embedding = model.get_input_embeddings().weight.detach().float().cpu()  # [V, h]
        self.readout = model.get_output_embeddings().weight.detach()[readout_ids].float().cpu()  # [K, h]
        ends = data.room == 0
        self.sequence = torch.cumsum(ends.long(), 0) - ends.long()  # [N] sequence index of each position
        self.generator = torch.Generator().manual_seed(seed)

    def usable_starts(self, positions: torch.Tensor) -> torch.Tensor:
        """Of ``positions``, those whose next position is trained on (chunk starts worth drawing)."""
        data = self.data
        ok = (data.room[positions] >= 1) & data.labelled[(positions + 1).clamp(max=len(data) - 1)]
        return positions[ok]

    def loss(self, starts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Unrolled loss of the chunks beginning at ``starts`` ``[B]``, and per depth the top-1 hits
        and chain hits (every depth so far right) ``[TRAIN_DEPTH]`` and their counts, summed."""
        data, head, n = self.data, self.head, len(self.data)
        window, length = head.window, self.chunk_len
        raw = starts[:, None] - window + torch.arange(window + length)  # [B, C] entry positions
        ctx = raw.clamp(0, n - 1)
        queries = ctx[:, window:]  # [B, L]
        same = self.sequence[ctx][:, None, :] == self.sequence[queries][:, :, None]  # [B, L, C]
        offset = queries[:, :, None] - raw[:, None, :]  # query minus key position
        mask = same & (raw[:, None, :] >= 0) & (offset >= 0) & (offset < window)
        own = torch.arange(length)
        mask[:, own, window + own] = True  # a query always sees itself
        next_token = lambda at: self.embedding[data.tokens[(at).clamp(max=n - 1)]]  # noqa: E731
        with torch.autocast("cpu", dtype=torch.bfloat16):
            entries = head.entries(data.features[ctx].float(), next_token(ctx + 1))  # [B, C, h]
            positions = torch.arange(window + length)
            q, k, v = head.project(entries, positions)
            empty = k.new_zeros(*q[:, :, window:].shape[:3], 0, q.shape[-1])
            predicted = head.finish(entries[:, window:], attend(q[:, :, window:], k, v, mask, empty, empty))
            total, weights = 0.0, 0.0
            hits, chain_hits, counts = (torch.zeros(TRAIN_DEPTH) for _ in range(3))
            chain_ok = torch.ones_like(queries, dtype=torch.bool)
            chain_k, chain_v = empty, empty
            for depth in range(1, TRAIN_DEPTH + 1):
                at = (queries + depth).clamp(max=n - 1)  # the position whose label this depth predicts
                valid = (data.room[queries] >= depth) & data.labelled[at]  # [B, L]
                if depth > 1:
                    step_entries = head.entries(predicted, next_token(queries + depth))
                    q_d, k_d, v_d = head.project(step_entries, positions[window:] + depth - 1)
                    chain_k = torch.cat([chain_k, k_d.unsqueeze(3)], dim=3)
                    chain_v = torch.cat([chain_v, v_d.unsqueeze(3)], dim=3)
                    predicted = head.finish(step_entries, attend(q_d, k, v, mask, chain_k, chain_v))
                logq = torch.log_softmax(predicted.float() @ self.readout.T, dim=-1)  # [B, L, K]
                targets = data.top_ids[at]
                ce = -(data.top_probs[at].float() * logq.gather(-1, targets)).sum(-1)
                regression = F.smooth_l1_loss(predicted.float(), data.features[at].float(), reduction="none").mean(-1)
                per_entry = (ce + FEATURE_WEIGHT * regression) * valid
                weight = DEPTH_DECAY ** (depth - 1)
                total = total + weight * per_entry.sum() / valid.sum().clamp(min=1)
                weights += weight
                right = logq.argmax(-1) == targets[..., 0]
                chain_ok = chain_ok & right
                hits[depth - 1] = (right & valid).sum()
                chain_hits[depth - 1] = (chain_ok & valid).sum()
                counts[depth - 1] = valid.sum()
        return total / weights, hits, chain_hits, counts

    def train(self, starts: torch.Tensor, until: float, total_steps: int, clock=time.monotonic,
              on_step: Callable[[int, float], None] | None = None) -> float:
        """AdamW steps over chunks drawn from ``starts`` until ``clock() >= until`` or
        ``total_steps``; cosine learning rate over ``total_steps``. Returns the last loss."""
        self.head.train()
        last = float("nan")
        while self.steps < total_steps and clock() < until:
            pick = starts[torch.randint(len(starts), (self.chunks,), generator=self.generator)]
            loss = self.loss(pick)[0]
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
    def evaluate(self, starts: torch.Tensor) -> dict:
        """Per-depth top-1 agreement with the target and chain acceptance (all depths so far
        right) on chunks beginning at ``starts``, teacher-forced."""
        self.head.eval()
        hits, chain, counts = torch.zeros(TRAIN_DEPTH), torch.zeros(TRAIN_DEPTH), torch.zeros(TRAIN_DEPTH)
        for batch in starts.split(self.chunks):
            _, h, c, n = self.loss(batch)
            hits, chain, counts = hits + h, chain + c, counts + n
        counts = counts.clamp(min=1)
        return {"top1": [round(float(x), 4) for x in hits / counts],
                "chain": [round(float(x), 4) for x in chain / counts], "entries": int(counts[0])}


def split_positions(data: Shard, held_out: float = 0.05) -> tuple[torch.Tensor, torch.Tensor]:
    """Train and held-out positions, split by sequence (the last sequences held out)."""
    positions = torch.arange(len(data))
    ends = data.room == 0
    sequence_of = torch.cumsum(ends.long(), 0) - ends.long()
    sequences = int(sequence_of[-1]) + 1 if len(data) else 0
    cut = sequences - max(1, int(sequences * held_out)) if sequences > 1 else sequences
    return positions[sequence_of < cut], positions[sequence_of >= cut]
