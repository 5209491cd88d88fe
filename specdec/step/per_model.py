"""Everything specdec keeps per model object, in one registry: the lock every forward holds, the
support verdicts (`specdec.step.support.support_for`) and the decoders `specdec.generate` reuses.
Keys are weak, so a model that is garbage-collected takes its entry with it."""

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
    """

    lock: threading.Lock = field(default_factory=threading.Lock)
    support: dict = field(default_factory=dict)
    decoders: dict = field(default_factory=dict)
    guard: threading.Lock = field(default_factory=threading.Lock)


_ENTRIES: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
_GUARD = threading.Lock()


def entry_for(model) -> ModelEntry:
    """The registry entry of ``model`` (made on first use)."""
    with _GUARD:
        entry = _ENTRIES.get(model)
        if entry is None:
            entry = _ENTRIES[model] = ModelEntry()
        return entry
