"""The verify forward under ``torch.compile`` (inductor), one per model, shared by its decoders.

What compiles: the target's whole forward as the tree kernel runs it on CPU (the engine's packed
view of the model, `specdec.device.packed`): the KV write is the ``specdec::kv_write`` operator at
the rows' offsets (a device tensor), attention the ``specdec::tree_attention_rows`` operator over
the cache's whole buffers with per-row lengths (a device tensor), the packed linear layers the
``specdec::packed_linear`` operator, and a prepared 4-D mask stops transformers from building one.
No host integer that changes from step to step reaches the graph, so steps do not recompile:
rows and query slots are dynamic sizes, the cache's rows and capacity unbacked ones (only the
operators read them: no guard, no 0/1 specialisation), and torch's 0/1 specialisation of rows
and slots leaves at most four graphs (one row or several, one slot or several), each traced once
per process (inductor caches the generated code on disk across processes). The graph's kernels and
operators are launched from C++ (inductor's ``cpp_wrapper``), not from Python.

Falls back to the eager forward for good, with one warning naming the error, when tracing or
compiling fails (``fullgraph``: a graph break is a failure too). ``compile_seconds`` is the time
spent in the calls that compiled a graph; `specdec bench` and `specdec bench-serve` report it.
"""

from __future__ import annotations

import time
import warnings

import torch

from drafters.modeling import cache_keyword
from specdec.device.attention import TREE_KWARG
from specdec.device.packed import PackedLinear

# cpp_wrapper: inductor's launcher of the graph's kernels and operators in C++, not Python; a one-row
# SmolLM2-135M bf16 verify forward took 20.1 against 21.0 ms (alternated in one process, f5c6cfc).
COMPILE_OPTIONS = {"emulate_precision_casts": True, "cpp_wrapper": True}


def compile_unsupported(model, kernel, sharded: bool, needs_features: bool) -> str | None:
    """Why ``model``'s verify forward is not compiled (None when it can be)."""
    if kernel is None:
        return "the tree kernel is not in use for this model"
    if model.device.type != "cpu":
        return f"the compiled step is CPU-only for now (the model is on {model.device.type})"
    if sharded:
        return "a tensor-parallel model runs eager"
    if needs_features:
        return "a drafter reads the target's features through a forward hook"
    return None


def _graphs() -> int:
    return torch._dynamo.utils.counters["stats"]["unique_graphs"]


class CompiledForward:
    """``module``'s forward compiled for verify steps; call as ``compiled(cache, **forward_kwargs)``.

    Attributes:
        failure: why it fell back to eager for good (None while compiled).
        compile_seconds: wall time of the calls that compiled a graph.
        graphs: graphs compiled so far.
    """

    def __init__(self, module: torch.nn.Module) -> None:
        self.module = module
        self.keyword = cache_keyword(module)
        self.packed = [m for m in module.modules() if isinstance(m, PackedLinear)]
        self.failure: str | None = None
        self.compile_seconds = 0.0
        self.graphs = 0
        self._compiled = torch.compile(module, fullgraph=True, dynamic=None, options=COMPILE_OPTIONS)

    def __call__(self, cache, **kwargs):
        """The forward of ``kwargs`` (``input_ids`` and ``position_ids`` ``[B, q]``, the tree
        metadata, the prepared mask) over ``cache``, compiled unless it has failed before."""
        if self.failure is not None:
            return self.module(**{self.keyword: cache}, use_cache=True, **kwargs)
        for linear in self.packed:  # weights changed in place since packing: outside the graph
            linear.refresh()
        _mark_dynamic(cache, kwargs)
        before, start = _graphs(), time.perf_counter()
        try:
            out = self._compiled(**{self.keyword: cache}, use_cache=True, **kwargs)
        except Exception as err:  # noqa: BLE001 - any compiler failure: eager for good, said once
            self.failure = _describe(getattr(err, "inner_exception", None) or err)
            warnings.warn(f"specdec: compiling the verify forward failed ({self.failure}); running it eager",
                          RuntimeWarning, stacklevel=2)
            return self.module(**{self.keyword: cache}, use_cache=True, **kwargs)
        compiled = _graphs() - before
        if compiled:
            self.graphs += compiled
            self.compile_seconds += time.perf_counter() - start
        return out


def _mark_dynamic(cache, kwargs: dict) -> None:
    """Rows and query slots of the inputs, rows and capacity of the cache: sizes that vary."""
    mark = torch._dynamo.maybe_mark_dynamic
    for name in ("input_ids", "position_ids"):
        mark(kwargs[name], 0)
        mark(kwargs[name], 1)
    meta = kwargs.get(TREE_KWARG)
    if meta is not None:
        mark(meta.ancestors, 0)
        mark(meta.ancestors, 1)
        mark(meta.lengths_tensor, 0)
    if cache.forward.offsets is not None:
        mark(cache.forward.offsets, 0)
    for layer in cache.layers:  # only the operators read these sizes: unbacked, not even 0/1-specialised
        for buffer in (layer.keys, layer.values):
            if buffer is not None:
                torch._dynamo.decorators.mark_unbacked(buffer, 0)
                torch._dynamo.decorators.mark_unbacked(buffer, 2)


def _describe(err: BaseException) -> str:
    lines = [line for line in str(err).splitlines() if line.strip()]
    return f"{type(err).__name__}: {lines[0].strip()}" if lines else type(err).__name__
