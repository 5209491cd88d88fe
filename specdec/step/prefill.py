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
    there: the top-k successors at every position when it learns from them, and the features at
    those of the prompt's last ``needs_features`` positions this chunk holds. Returns whether the
    prompt is now cached."""
    cache, drafter = engine.cache, engine.drafter
    cached, target = cache.lengths[seq.slot], len(seq.seen) - 1
    end = min(target, cached + limit)
    if end > cached:
        ids = torch.tensor(seq.seen[cached:end], dtype=torch.long)  # [m] host
        k = drafter.feedback_topk
        featured = max(0, min(end - cached, end - (target - drafter.needs_features)))  # the chunk's last ones
        kept = ids.numel() if k else max(featured, 1)  # positions the LM head reads, the last ones
        with engine.features.capture():
            logits = prefill_row(engine.forward_model, cache, seq.slot, ids.to(engine.model.device), 0 if k else kept)
        features = engine.features.rows(torch.arange(kept - featured, kept, device=engine.model.device)) \
            if featured else None
        if k or features is not None:
            drafter.observe(VerifyFeedback(
                tokens=ids.numpy(),
                topk_ids=(row_topk_ids(logits[0], k).cpu().numpy() if k  # [m, k]: once per chunk
                          else np.zeros((ids.numel(), 0), dtype=np.int64)),
                committed=np.ones(ids.numel(), dtype=bool), features=features, sequence_id=seq.sequence_id,
            ))
    return end == target
