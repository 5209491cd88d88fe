"""Tree attention inside any HF model, through transformers' ``AttentionInterface``.

`TreeKernel` registers an attention function named ``specdec_tree:<original>`` (and the original
implementation's mask function under the same name). During a verify forward the attention
modules' configs are switched to that name and the tree metadata travels as the extra forward
kwarg ``specdec_tree``; the function runs ``torch.ops.specdec.tree_attention`` on it, and hands
every call without tree metadata to the original implementation unchanged.
"""

from __future__ import annotations

import sys
import threading
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from transformers import AttentionInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from specdec.device import ops

TREE_KWARG = "specdec_tree"


@dataclass(frozen=True)
class TreeMeta:
    """What the kernel needs about the tree: packed ancestor rows ``[n+1, W]`` and the cache length before it."""

    ancestors: torch.Tensor
    prefix_len: int


@dataclass(frozen=True)
class BatchTreeMeta:
    """The same for a batch (`specdec.device.tree.BatchTree`): ``ancestors [B, q, W]`` and each
    row's cache length (host ints); row b's slots sit right after its own prefix."""

    ancestors: torch.Tensor
    lengths: list[int]
    lengths_tensor: torch.Tensor | None = None  # the same lengths, int64 on the model's device


def _delegate(original: str, module):
    """The original attention function for ``module`` (eager lives in the model's own module)."""
    if original in ALL_ATTENTION_FUNCTIONS:
        return ALL_ATTENTION_FUNCTIONS[original]
    return getattr(sys.modules[type(module).__module__], "eager_attention_forward")


def _register(original: str) -> str:
    name = f"specdec_tree:{original}"
    if name in ALL_ATTENTION_FUNCTIONS:
        return name

    def tree_attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        meta: TreeMeta | BatchTreeMeta | None = kwargs.pop(TREE_KWARG, None)
        if meta is None:
            return _delegate(original, module)(module, query, key, value, attention_mask, scaling=scaling,
                                               dropout=dropout, **kwargs)
        scale = float(scaling if scaling is not None else query.shape[-1] ** -0.5)
        if isinstance(meta, TreeMeta):
            return ops.tree_attention(query, key, value, meta.ancestors, meta.prefix_len, scale), None  # [B, n, Hq, D]
        return ops.tree_attention_rows(query, key, value, meta.ancestors, meta.lengths, scale,
                                       meta.lengths_tensor), None  # [B, q, Hq, D]

    AttentionInterface.register(name, tree_attention_forward)
    mask = ALL_MASK_ATTENTION_FUNCTIONS.get(original if original in ALL_MASK_ATTENTION_FUNCTIONS else "eager")
    AttentionMaskInterface.register(name, mask)
    return name


def supports_tree_kernel(model) -> bool:
    """Full-attention models without logit soft-capping whose attention goes through the interface."""
    config = model.config.get_text_config(decoder=True)
    layer_types = getattr(config, "layer_types", None) or []
    if any(t != "full_attention" for t in layer_types) or getattr(config, "sliding_window", None) and \
            getattr(config, "use_sliding_window", True):
        return False
    if getattr(config, "attn_logit_softcapping", None) is not None:
        return False
    return bool(_attention_configs(model))


def _attention_configs(model) -> list:
    """Distinct configs read by the model's attention modules (they look up the implementation there)."""
    configs = {}
    for module in model.modules():
        if hasattr(module, "layer_idx") and hasattr(module, "config") and type(module).__name__.endswith("Attention"):
            configs[id(module.config)] = module.config
    return list(configs.values())


class TreeKernel:
    """Switches one model's attention to the tree kernel for the duration of a verify forward."""

    def __init__(self, model) -> None:
        self.configs = _attention_configs(model)
        self.original = self.configs[0]._attn_implementation or "sdpa"
        self.name = _register(self.original)
        self._lock = threading.Lock()

    @contextmanager
    def active(self):
        with self._lock:
            for config in self.configs:
                config._attn_implementation_internal = self.name
            try:
                yield
            finally:
                for config in self.configs:
                    config._attn_implementation_internal = self.original


def tree_kernel_for(model, enabled: bool | None) -> TreeKernel | None:
    """The kernel for ``model``: ``None`` = when the extension loads and the model fits, True =
    required (raises if unavailable), False = never (float-mask sdpa path)."""
    if enabled is False:
        return None
    fits = supports_tree_kernel(model)
    if enabled is None:
        return TreeKernel(model) if fits and ops.load() else None
    if not fits:
        raise ValueError("tree_kernel=True: this model's attention (sliding windows, soft-capping, or no "
                         "AttentionInterface dispatch) is not supported by the tree kernel")
    if not ops.load():
        raise RuntimeError(f"tree_kernel=True but the csrc extension is {ops.status()}")
    return TreeKernel(model)
