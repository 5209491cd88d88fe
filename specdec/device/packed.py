"""Linear layers on oneDNN-prepacked weights for the engine's CPU forwards.

On CPU, a bf16 ``F.linear`` re-lays its weight out for oneDNN on every call; a weight packed once
into oneDNN's blocked layout (``torch.ops.mkldnn._reorder_linear_weight``) skips that and reads
memory in the kernel's order: on SmolLM2-135M (2-core AVX-512 host) the 211 linear layers of one
forward took 17-19 ms packed against 23-35 ms eager at 2 to 8 rows (the layers alone, weights
streamed from memory), and whole forwards gave the same logits bit for bit. A single row gains
most: one layer 1.8-2.4x faster than eager, a plain one-row verify 37.3 -> 31.4 ms. fp32 gains
more: MKL's fp32 ``F.linear`` at 2 to 8 rows takes 2-3x its one-row time, which made any tree
verify 45% dearer than a plain step in fp32; packed, one layer took 0.043-0.09 ms at 1-8 rows
against 0.07-0.18 ms (a 1536x576 layer), and the price of a tree over a plain step vanished. Packed
fp32 products differ from ``F.linear``'s in summation order only (about 1e-6 relative), as the
tree attention kernel's already do: greedy output stays the target's (tested token for token).
The packed product is the csrc ``specdec::packed_linear`` operator (`specdec.device.ops`), opaque
to ``torch.compile`` (`specdec.device.compiled` compiles around it) and a C++ call: it was a Python
custom operator, whose dispatch cost ~16 us a call (about 2.5 ms of a one-row forward of 211 layers).

The user's model is never changed: `packed_view` returns a *view* of it, a tree of shallow module
copies sharing every parameter, buffer and hook dictionary with the model, in which each
``nn.Linear`` also holds its packed weight. A weight changed in place after packing (fine-tuning
between calls) or replaced (``model.to(...)``) is packed again at its next call, and a weight no
longer in a packed dtype (fp16) runs eager, so the view never computes with stale weights.
The packed copy costs the linear weights' bytes once more: the view is only made when they fit
in a quarter of the memory available.
"""

from __future__ import annotations

import copy
import functools

import torch
from torch import nn

from specdec.device.ops import packed_linear

PACKED_DTYPES = (torch.bfloat16, torch.float32)
MEMORY_SHARE = 0.25  # the packed copy may take at most this share of the memory available now


class PackedLinear(nn.Linear):
    """An ``nn.Linear`` (a shallow copy of the model's, sharing its parameters and hooks) computing
    with its weight prepacked for oneDNN."""

    packed: torch.Tensor  # the weight in oneDNN's blocked layout
    packed_from: tuple[int, int]  # the weight's (data_ptr, _version) when it was packed

    def pack(self) -> None:
        """(Re)pack the weight as it is now."""
        with torch.inference_mode(False), torch.no_grad():
            self.packed = torch.ops.mkldnn._reorder_linear_weight(self.weight.detach())
        self.packed_from = (self.weight.data_ptr(), self.weight._version)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // self.in_features
        weight = self.weight
        if rows == 0 or weight.dtype not in PACKED_DTYPES or x.dtype != weight.dtype or weight.device.type != "cpu":
            return super().forward(x)
        if not torch.compiler.is_compiling():  # a compiled forward refreshes before it runs
            self.refresh()
        out = packed_linear(x.reshape(rows, self.in_features), self.packed, self.bias, self.out_features)
        return out.view(*x.shape[:-1], self.out_features)

    def refresh(self) -> None:
        """Pack again if the weight changed in place or was replaced since it was packed."""
        if (self.weight.data_ptr(), self.weight._version) != self.packed_from:
            self.pack()


def can_pack(model: nn.Module) -> str | None:
    """Why ``model``'s linear layers are not packed (None when they are): the device, the dtype,
    a build without oneDNN, a CPU oneDNN cannot pack that dtype on, or too little memory for the
    packed copy."""
    weight = model.get_output_embeddings().weight
    if weight.device.type != "cpu":
        return f"the model is on {weight.device.type}"
    if weight.dtype not in PACKED_DTYPES:
        return f"the model is in {weight.dtype}"
    if not (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")):
        return "this torch build has no oneDNN linear"
    if (unsupported := _unpackable(weight.dtype)) is not None:
        return unsupported
    needed = sum(m.weight.numel() * m.weight.element_size() for m in model.modules() if type(m) is nn.Linear)
    available = _available_bytes()
    if available is None or needed > MEMORY_SHARE * available:
        return f"the packed copy ({needed >> 20} MiB) does not fit in a quarter of the memory available"
    return None


@functools.lru_cache(maxsize=None)
def _unpackable(dtype: torch.dtype) -> str | None:
    """Why oneDNN cannot pack ``dtype`` weights on this CPU (its bf16 path needs AVX-512 or
    AVX-NE-CONVERT; an AVX2 host has neither), or None: one small weight packed and used once."""
    try:
        with torch.inference_mode(False), torch.no_grad():
            weight = torch.ones(16, 16, dtype=dtype)
            packed_linear(torch.ones(1, 16, dtype=dtype), torch.ops.mkldnn._reorder_linear_weight(weight), None, 16)
    except RuntimeError as err:
        return f"oneDNN cannot pack {dtype} weights on this CPU ({str(err).splitlines()[0][:120]})"
    return None


def packed_view(model: nn.Module) -> nn.Module:
    """A view of ``model`` (same parameters, buffers and hooks) whose ``nn.Linear`` layers run on
    prepacked weights; see the module docstring. Call only when `can_pack` says None."""
    def view(module: nn.Module) -> nn.Module:
        clone = copy.copy(module)  # shares _parameters, _buffers and the hook dictionaries
        clone._modules = {name: None if child is None else view(child) for name, child in module._modules.items()}
        if type(module) is nn.Linear:
            clone.__class__ = PackedLinear
            clone.pack()
        return clone

    return view(model)


def _available_bytes() -> int | None:
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None
