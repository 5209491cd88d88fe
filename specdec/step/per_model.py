"""Everything specdec keeps per model object, in one registry: the lock every step holds, the
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
        lock: held for every forward on the model (a step, a prefill, a support probe): one at a
            time across all decoders and threads; re-entrant.
        support: `Support` verdicts by (tree_kernel setting, dtype, device).
        decoders: `specdec.generate`'s decoders by (drafter, draft model, head).
    """

    lock: threading.RLock = field(default_factory=threading.RLock)
    support: dict = field(default_factory=dict)
    decoders: dict = field(default_factory=dict)


_ENTRIES: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
_GUARD = threading.Lock()


def entry_for(model) -> ModelEntry:
    """The registry entry of ``model`` (made on first use)."""
    with _GUARD:
        entry = _ENTRIES.get(model)
        if entry is None:
            entry = _ENTRIES[model] = ModelEntry()
        return entry
