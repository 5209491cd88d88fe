"""Distillation data: the target's own labels for every position of a text, at prefill speed.

One teacher-forced forward of the target's body over a batch of chat sequences (prompt + reply)
gives, at every position, the target's feature (what its LM head reads) and, through the LM head
rows of the readout tokens, its next-token distribution there, top-`TOP_K` truncated: soft labels
of what the target would say, whoever wrote the text. The replies may be the target's own
(`generate_replies`, generation speed) or text that ships with installed packages
(`specdec.distill.corpus`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

TOP_K = 8  # target probabilities kept per position (soft labels)
BATCH_TOKENS = 4096  # padded positions per labelling forward


@dataclass
class Shard:
    """Labelled positions of some sequences, concatenated in order.

    A sequence contributes its last ``context`` prompt positions (attended to, not trained on)
    and every position from its last prompt token on.

    Attributes:
        tokens: ``[N]`` int64 the token at each position.
        features: ``[N, h]`` bfloat16 the target's feature there.
        top_ids: ``[N, TOP_K]`` int64 readout indices of the target's most likely next tokens.
        top_probs: ``[N, TOP_K]`` float16 their probabilities (over the readout tokens).
        room: ``[N]`` int64 positions after this one in the same sequence.
        labelled: ``[N]`` bool, whether the next token is the reply's (trained on).
    """

    tokens: torch.Tensor
    features: torch.Tensor
    top_ids: torch.Tensor
    top_probs: torch.Tensor
    room: torch.Tensor
    labelled: torch.Tensor

    FIELDS = ("tokens", "features", "top_ids", "top_probs", "room", "labelled")

    @staticmethod
    def cat(shards: list["Shard"]) -> "Shard":
        return Shard(*(torch.cat([getattr(s, name) for s in shards]) for name in Shard.FIELDS))

    def to_dict(self) -> dict:
        return {name: getattr(self, name) for name in self.FIELDS}

    @staticmethod
    def from_dict(saved: dict) -> "Shard":
        return Shard(*(saved[name] for name in Shard.FIELDS))

    def __len__(self) -> int:
        return len(self.tokens)


@torch.inference_mode()
def generate_replies(model, encoded: list[list[int]], max_new_tokens: int, pad: int, eos_ids) -> list[list[int]]:
    """The target's greedy replies (token ids, EOS kept) to prompts ``encoded`` (one batch)."""
    eos = set(eos_ids)
    width = max(map(len, encoded))
    ids = torch.tensor([[pad] * (width - len(e)) + e for e in encoded], device=model.device)  # left padded
    mask = torch.tensor([[0] * (width - len(e)) + [1] * len(e) for e in encoded], device=model.device)
    out = model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=max_new_tokens,
                         pad_token_id=pad, temperature=None, top_p=None, top_k=None)
    replies = []
    for row in out[:, width:].tolist():
        n = next((i + 1 for i, token in enumerate(row) if token in eos), len(row))
        replies.append(row[:n])
    return replies


def batches_by_length(lengths: list[int], batch_tokens: int = BATCH_TOKENS) -> list[list[int]]:
    """Indices of sequences grouped by similar length, at most ``batch_tokens`` padded positions
    per group (a longer sequence alone)."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    groups, current = [], []
    for i in order:
        if current and lengths[i] * (len(current) + 1) > batch_tokens:
            groups.append(current)
            current = []
        current.append(i)
    return groups + ([current] if current else [])


@torch.inference_mode()
def label_sequences(model, sequences: list[tuple[list[int], int]], readout_ids: torch.Tensor, context: int,
                    pad: int) -> Shard:
    """Teacher-forced labels of ``sequences`` (``(ids, reply_start)``: prompt + reply ids and the
    index of the first reply token), in one batched forward of the target's body.

    ``readout_ids`` ``[K]``: the tokens the soft labels are over; ``context``: prompt positions
    kept before the last prompt token (attended to by the head, not trained on).
    """
    device = model.device
    width = max(len(ids) for ids, _ in sequences)
    ids = torch.tensor([list(s) + [pad] * (width - len(s)) for s, _ in sequences], device=device)  # right padded
    mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s, _ in sequences], device=device)
    hidden = model.get_decoder()(input_ids=ids, attention_mask=mask).last_hidden_state  # [B, W, h] post-norm
    readout = model.get_output_embeddings().weight[readout_ids.to(device)]  # [K, h]
    parts = []
    for row, (seq, reply_start) in enumerate(sequences):
        first = max(0, reply_start - 1 - context)
        features = hidden[row, first : len(seq)]  # [n, h]
        labelled = torch.arange(first, len(seq)) >= reply_start - 1
        k = min(TOP_K, len(readout))
        top = torch.softmax((features[labelled.to(device)] @ readout.T).float(), dim=-1).topk(k, dim=-1)
        top_ids = torch.zeros(len(features), TOP_K, dtype=torch.long)  # a readout under TOP_K: zero-padded
        top_probs = torch.zeros(len(features), TOP_K, dtype=torch.float16)
        top_ids[labelled, :k], top_probs[labelled, :k] = top.indices.cpu(), top.values.to(torch.float16).cpu()
        parts.append(Shard(torch.tensor(seq[first:]), features.to(torch.bfloat16).cpu(), top_ids, top_probs,
                           torch.arange(len(seq) - 1 - first, -1, -1), labelled))
    return Shard.cat(parts)
