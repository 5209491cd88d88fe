"""Which attention masks a model's layers need for tree queries (full, sliding window, or both)."""

from __future__ import annotations

from collections.abc import Callable

import torch


def sliding_window_of(model) -> tuple[int | None, bool]:
    """``(window, hybrid)``: the sliding window of a model with sliding-window layers (else None),
    and whether it also has full-attention layers (Gemma 3 style, one mask per layer type)."""
    config = model.config.get_text_config(decoder=True)
    window = getattr(config, "sliding_window", None)
    if not window or getattr(config, "use_sliding_window", True) is False:
        return None, False
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None and "sliding_attention" not in layer_types:
        return None, False
    return int(window), layer_types is not None and "full_attention" in layer_types


def masks_for(model, mask: Callable[[int | None], torch.Tensor]):
    """The ``attention_mask`` argument for ``model``: ``mask(None)`` for full attention,
    ``mask(window)`` when every layer slides, a dict by layer type for hybrid models."""
    window, hybrid = sliding_window_of(model)
    if window is None:
        return mask(None).to(model.device)
    sliding = mask(window).to(model.device)
    return {"full_attention": mask(None).to(model.device), "sliding_attention": sliding} if hybrid else sliding
