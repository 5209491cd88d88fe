"""Prefill in chunks: a joining sequence's prompt goes into its cache row a chunk at a time, between
decode steps, so a long prompt never stops the running rows for its whole prefill."""

from __future__ import annotations

import numpy as np
import torch

from drafters import VerifyFeedback
from specdec.device.reductions import row_topk_ids
from specdec.step.sequence import Sequence
from specdec.step.verify import prefill_row


@torch.inference_mode()
def prefill_chunk(engine, seq: Sequence, limit: int) -> bool:
    """Cache the next ``limit`` (at most) positions of ``seq``'s prompt in its row (everything but
    the root, the prompt's last attended token) and show the drafter what the target predicted
    there: the top-k successors at the positions it asks for (`Drafter.wants_prompt_topk`) when it
    learns from them, and the features at those of the prompt's last ``needs_features`` positions
    this chunk holds. The LM head runs at those positions only. Returns whether the prompt is now
    cached."""
    cache, drafter = engine.cache, engine.drafter
    cached, target = cache.lengths[seq.slot], len(seq.seen) - 1
    end = min(target, cached + limit)
    if end > cached:
        ids = torch.tensor(seq.seen[cached:end], dtype=torch.long)  # [m] host
        k = drafter.feedback_topk
        learned = drafter.wants_prompt_topk(ids.numpy()) if k else np.zeros(ids.numel(), dtype=bool)  # [m]
        featured = max(0, min(end - cached, end - (target - drafter.needs_features)))  # the chunk's last ones
        read = learned.copy()  # [m]: the positions the LM head reads
        read[ids.numel() - max(featured, 1):] = True
        read_idx = np.flatnonzero(read)  # [r] chunk positions, ascending: the last `featured` are the features'
        with engine.features.capture():
            logits = prefill_row(engine.forward_model, cache, seq.slot, ids.to(engine.model.device),
                                 _logits_to_keep(read_idx, ids.numel(), engine.model.device))  # [1, r, V]
        features = engine.features.rows(torch.arange(read_idx.size - featured, read_idx.size,
                                                      device=engine.model.device)) if featured else None
        learned_rows = np.flatnonzero(learned[read_idx])  # [l] into the r rows read
        topk_ids = np.zeros((0, k), dtype=np.int64)  # [l, k]: once per chunk
        if learned_rows.size:
            rows = logits[0].index_select(0, torch.from_numpy(learned_rows).to(logits.device))  # [l, V]
            topk_ids = row_topk_ids(rows, k).cpu().numpy()
        if learned_rows.size or features is not None:
            drafter.observe(VerifyFeedback(
                tokens=ids.numpy()[learned], topk_ids=topk_ids, committed=np.ones(learned_rows.size, dtype=bool),
                features=features, sequence_id=seq.sequence_id,
            ))
    return end == target


def _logits_to_keep(read_idx: np.ndarray, m: int, device) -> int | torch.Tensor:
    """The forward's ``logits_to_keep`` for LM-head rows at ``read_idx`` of ``m`` positions: a
    count for a suffix (the usual case), the positions otherwise."""
    if read_idx.size and read_idx[0] == m - read_idx.size:
        return read_idx.size
    return torch.from_numpy(read_idx).to(device)
