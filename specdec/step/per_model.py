"""Everything specdec keeps per model object, in one registry: the lock every forward holds, the
support verdicts (`specdec.step.support.support_for`), the decoders `specdec.generate` reuses and
the module the engine's forwards run (`forward_module`). Keys are weak, so a model that is
garbage-collected takes its entry with it."""

from __future__ import annotations

import threading
import weakref
from dataclasses import dataclass, field


@dataclass
class ModelEntry:
    """What specdec holds for one model.

    Attributes:
        lock: held for every forward on the model (a decode step, a prefill chunk, a support
            probe) and for changes of learned state: one at a time across the engine loops of all
            decoders of the model. A plain lock: nothing that holds it takes it again.
        support: `Support` verdicts by (tree_kernel setting, dtype, device).
        decoders: `specdec.generate`'s decoders by (drafter, draft model, head), under ``guard``.
        forward: what verify and prefill forwards call (`forward_module`), made once, under
            ``forward_guard`` (``guard`` is held while `specdec.generate` builds a decoder).
        compiled: ``forward`` compiled for verify steps (`compiled_forward`), made once, under
            ``forward_guard``.
    """

    lock: threading.Lock = field(default_factory=threading.Lock)
    support: dict = field(default_factory=dict)
    decoders: dict = field(default_factory=dict)
    forward: object = None
    compiled: object = None
    guard: threading.Lock = field(default_factory=threading.Lock)
    forward_guard: threading.Lock = field(default_factory=threading.Lock)


_ENTRIES: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
_GUARD = threading.Lock()


def entry_for(model) -> ModelEntry:
    """The registry entry of ``model`` (made on first use)."""
    with _GUARD:
        entry = _ENTRIES.get(model)
        if entry is None:
            entry = _ENTRIES[model] = ModelEntry()
        return entry


def forward_module(model, sharded: bool = False):
    """The module the engine's verify and prefill forwards run for ``model``: a view of it on
    prepacked linear weights where `specdec.device.packed.can_pack` allows (one per model, shared
    by its decoders), else ``model`` itself (always for a tensor-parallel ``sharded`` model)."""
    from specdec.device.packed import can_pack, packed_view

    entry = entry_for(model)
    with entry.forward_guard:
        if entry.forward is None:
            entry.forward = model if sharded or can_pack(model) is not None else packed_view(model)
        return entry.forward


def compiled_forward(model):
    """`specdec.device.compiled.CompiledForward` of ``model``'s `forward_module` (one per model,
    shared by its decoders, so each graph is compiled once)."""
    from specdec.device.compiled import CompiledForward

    module = forward_module(model)
    entry = entry_for(model)
    with entry.forward_guard:
        if entry.compiled is None:
            entry.compiled = CompiledForward(module)
        return entry.compiled
