"""The target's features (what its LM head reads) at chosen slots, taken from the verify forward.

A forward pre-hook on the output embedding keeps the LM head's input ``[1, m, h]`` during a forward
(on the model's device: no copy, no sync); `FeatureTap.rows` then selects slots with a device
index. No modeling file is touched and nothing runs when no drafter needs features.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch


class FeatureTap:
    """Keeps the LM head input of the forwards run inside `capture` (disabled: does nothing).

    Args:
        model: the target causal LM.
        enabled: whether any drafter needs features.
    """

    def __init__(self, model, enabled: bool) -> None:
        self.head = model.get_output_embeddings() if enabled else None
        self._last: torch.Tensor | None = None  # [1, m, h] device

    @contextmanager
    def capture(self):
        """Record the LM head input of the forwards inside this block."""
        if self.head is None:
            yield
            return
        handle = self.head.register_forward_pre_hook(self._keep)
        try:
            yield
        finally:
            handle.remove()

    def _keep(self, module, args) -> None:
        self._last = args[0]

    def rows(self, slot_idx: torch.Tensor) -> torch.Tensor | None:
        """``[len(slot_idx), h]`` features of the last captured forward at ``slot_idx`` (int64, on
        the model's device), then forgotten; None when disabled or nothing was captured."""
        if self.head is None or self._last is None:
            return None
        last, self._last = self._last, None
        return last[0].index_select(0, slot_idx).detach()

    def batch_rows(self, row_idx: torch.Tensor, slot_idx: torch.Tensor) -> torch.Tensor | None:
        """``[m, h]`` features of a batched forward (``[B, q, h]``) at rows ``row_idx`` and slots
        ``slot_idx`` (``[m]`` int64 on the model's device), then forgotten; None as `rows`."""
        if self.head is None or self._last is None:
            return None
        last, self._last = self._last, None
        return last[row_idx, slot_idx].detach()
