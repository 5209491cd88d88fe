"""The csrc operators (``torch.ops.specdec``): lazy JIT build, pure-torch references, fallbacks.

`load` builds ``csrc/specdec_ops.cpp`` (plus ``csrc/specdec_ops_cuda.cu`` when CUDA is usable)
with ``torch.utils.cpp_extension`` on first use, caches the build per torch version, device kind
and source hash, and guards the build with a file lock so that concurrent processes build once.
``SPECDEC_DISABLE_EXT=1`` forces the pure-torch path; a failed build warns once and falls back.
"""

from __future__ import annotations

import hashlib
import os
import threading
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

from trees import unpack_rows

DISABLE_ENV = "SPECDEC_DISABLE_EXT"
BUILD_DIR_ENV = "SPECDEC_EXT_DIR"
CSRC = Path(__file__).resolve().parents[2] / "csrc"
CPU_SOURCES = ("specdec_ops.cpp",)
CUDA_SOURCES = ("specdec_ops_cuda.cu",)

_lock = threading.Lock()
_state: dict = {"tried": False, "loaded": False, "error": None}


def cuda_usable() -> bool:
    """Whether the CUDA sources should be built: a GPU and a CUDA toolkit."""
    from torch.utils.cpp_extension import CUDA_HOME

    return torch.cuda.is_available() and CUDA_HOME is not None


def build_directory(sources: list[Path]) -> Path:
    """``~/.cache/specdec/ext/<torch>-<cpu|cuda>-<source hash>`` (or ``$SPECDEC_EXT_DIR``)."""
    digest = hashlib.sha256()
    for source in sources:
        digest.update(source.read_bytes())
    kind = "cuda" if any(s.suffix == ".cu" for s in sources) else "cpu"
    root = Path(os.environ.get(BUILD_DIR_ENV) or Path.home() / ".cache" / "specdec" / "ext")
    return root / f"torch{torch.__version__}-{kind}-{digest.hexdigest()[:12]}"


def load() -> bool:
    """Build (once) and load the extension; True when ``torch.ops.specdec`` is usable."""
    if _state["tried"]:  # decided: no lock (torch.compile traces through here)
        return _state["loaded"]
    with _lock:
        if _state["tried"]:
            return _state["loaded"]
        _state["tried"] = True
        if os.environ.get(DISABLE_ENV, "") not in ("", "0"):
            _state["error"] = f"disabled by {DISABLE_ENV}"
            return False
        try:
            _build_and_load()
            _state["loaded"] = True
        except Exception as err:  # a compiler problem must not stop generation: fall back to torch
            _state["error"] = f"{type(err).__name__}: {err}".strip().splitlines()[0]
            warnings.warn(f"specdec: the csrc extension could not be built ({_state['error']}); "
                          "using the pure-torch path", RuntimeWarning, stacklevel=3)
        return _state["loaded"]


def status() -> str:
    """One line: whether the extension is loaded, or why not."""
    load()
    return "loaded" if _state["loaded"] else f"not loaded ({_state['error']})"


def _build_and_load() -> None:
    from filelock import FileLock
    from torch.utils.cpp_extension import load as jit_load

    sources = [CSRC / name for name in CPU_SOURCES]
    if cuda_usable():
        sources += [CSRC / name for name in CUDA_SOURCES]
    directory = build_directory(sources)
    directory.mkdir(parents=True, exist_ok=True)
    with FileLock(str(directory / "build.lock")):  # released by the OS even if its holder is killed
        # torch's own build baton is a plain file: one left by a killed build would block every later
        # build forever. Under our lock no other live process is building here, so it is stale.
        (directory / "lock").unlink(missing_ok=True)
        jit_load(
            name="specdec_ops",
            sources=[str(s) for s in sources],
            build_directory=str(directory),
            extra_cflags=["-O3", "-march=native"],
            extra_cuda_cflags=["-O3"],
            is_python_module=False,
            verbose=False,
        )
    _register_fakes()


def _register_fakes() -> None:
    """Shape-only implementations for torch.compile / fake tensors."""

    @torch.library.register_fake("specdec::tree_attention")
    def _tree_attention_fake(q, k, v, ancestors, prefix_len, scale):
        return q.new_empty(q.shape[0], q.shape[2], q.shape[1], q.shape[3])

    @torch.library.register_fake("specdec::tree_attention_rows")
    def _tree_attention_rows_fake(q, k, v, ancestors, lengths, scale):
        return q.new_empty(q.shape[0], q.shape[2], q.shape[1], q.shape[3])

    @torch.library.register_fake("specdec::kv_write")
    def _kv_write_fake(keys, values, key_states, value_states, offsets):
        return None

    @torch.library.register_fake("specdec::kv_compact")
    def _kv_compact_fake(keys, values, prefix_len, keep):
        return None

    @torch.library.register_fake("specdec::packed_linear")
    def _packed_linear_fake(x, packed, bias, out_features):
        return x.new_empty(x.shape[0], out_features)


# ---------------------------------------------------------------------- the operators
def tree_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ancestors: torch.Tensor, prefix_len: int,
                   scale: float) -> torch.Tensor:
    """Attention of the tree queries ``q [B, Hq, n, D]`` over ``k, v [B, Hkv, prefix_len + n, D]``.

    Query i sees every prefix key and tree slot j iff bit j of ``ancestors[i]`` (``[n, ceil(n/64)]``
    int64, `trees.pack_rows`) is set. Returns ``[B, n, Hq, D]`` (transformers' attention layout).
    """
    if load():
        return torch.ops.specdec.tree_attention(q, k, v, ancestors, prefix_len, scale)
    return tree_attention_reference(q, k, v, ancestors, prefix_len, scale)


def tree_attention_rows(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ancestors: torch.Tensor,
                        lengths: list[int], scale: float, lengths_tensor: torch.Tensor | None = None) -> torch.Tensor:
    """`tree_attention` for rows of their own prefix lengths: row b's queries ``q[b]`` (``[B, Hq, n,
    D]``) see its first ``lengths[b]`` keys and, under ``ancestors[b]`` (``[B, n, W]``), its tree
    slots at ``lengths[b] .. lengths[b] + n - 1`` of ``k, v [B, Hkv, S, D]``; nothing past them
    (the CPU operator also takes the cache's whole buffers, ``[R >= B, Hkv, S, D]``).
    Returns ``[B, n, Hq, D]``. One operator call on CPU (``lengths_tensor``: the same lengths as
    an int64 tensor, when the caller holds one); on other devices (and without the extension) the
    rows one by one."""
    if q.device.type == "cpu" and load():
        # a compiled forward always passes the CPU tensor: no host list may enter its graph
        if not torch.compiler.is_compiling() and (lengths_tensor is None or lengths_tensor.device.type != "cpu"):
            lengths_tensor = torch.tensor(lengths, dtype=torch.long)
        return torch.ops.specdec.tree_attention_rows(q, k, v, ancestors, lengths_tensor, scale)
    n = q.shape[2]
    return torch.cat([tree_attention(q[b : b + 1], k[b : b + 1, :, : length + n], v[b : b + 1, :, : length + n],
                                     ancestors[b], length, scale) for b, length in enumerate(lengths)])


def kv_write(keys: torch.Tensor, values: torch.Tensor, key_states: torch.Tensor, value_states: torch.Tensor,
             offsets: torch.Tensor, index: Callable[[], torch.Tensor]) -> None:
    """Write row r's new slots ``key_states[r], value_states[r]`` (``[R, H, q, D]``) into ``keys,
    values`` (``[R, H, C, D]``; on CPU also more rows, the rest untouched) at positions
    ``offsets[r] ..`` (``[R]`` int64, on the cache's device) in place: one memcpy per slot and
    head on CPU; elsewhere (and without the extension) a scatter along ``index()``, the ``[R, 1,
    q, 1]`` int64 device positions."""
    if keys.device.type == "cpu" and load():
        torch.ops.specdec.kv_write(keys, values, key_states, value_states, offsets)
        return
    positions = index()
    keys.scatter_(2, positions.expand(key_states.shape), key_states)
    values.scatter_(2, positions.expand(value_states.shape), value_states)


def kv_compact(keys: list[torch.Tensor], values: list[torch.Tensor], prefix_len: int, keep: torch.Tensor) -> None:
    """In every ``[B, H, S, D]`` tensor, move rows ``prefix_len + keep[i]`` to ``prefix_len + i``
    (``keep`` strictly increasing), in place; narrow the tensors afterwards."""
    if load():
        torch.ops.specdec.kv_compact(keys, values, prefix_len, keep)
    else:
        kv_compact_reference(keys, values, prefix_len, keep)


def tree_attention_reference(q, k, v, ancestors, prefix_len: int, scale: float) -> torch.Tensor:
    """Pure-torch `tree_attention` (float32 math, materialised mask): the test oracle and fallback."""
    n, group = q.shape[2], q.shape[1] // k.shape[1]
    visible = torch.cat([torch.ones(n, prefix_len, dtype=torch.bool), unpack_rows(ancestors.cpu(), n)], dim=1)
    keys = k.float().repeat_interleave(group, dim=1)  # [B, Hq, S, D]
    values = v.float().repeat_interleave(group, dim=1)
    scores = (q.float() @ keys.transpose(-1, -2)) * scale  # [B, Hq, n, S]
    scores = scores.masked_fill(~visible.to(scores.device), float("-inf"))
    out = torch.softmax(scores, dim=-1) @ values  # [B, Hq, n, D]
    return out.transpose(1, 2).to(q.dtype)


def packed_linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None, out_features: int) -> torch.Tensor:
    """``x [rows, in] @ W.T + bias`` (``[rows, out_features]``) with ``W`` prepacked by
    ``torch.ops.mkldnn._reorder_linear_weight``: the csrc operator (a C++ call, fit for compiled
    graphs), or oneDNN's own operator without the extension (eager only: inductor cannot lower it
    on a weight that is not a frozen constant; a compiled forward needs the extension anyway)."""
    if load():
        return torch.ops.specdec.packed_linear(x, packed, bias, out_features)
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


def kv_compact_reference(keys, values, prefix_len: int, keep: torch.Tensor) -> None:
    """Pure-torch `kv_compact`."""
    rows = prefix_len + keep.to(torch.long)
    for tensor in list(keys) + list(values):
        tensor[:, :, prefix_len : prefix_len + keep.numel()] = tensor.index_select(2, rows.to(tensor.device))
