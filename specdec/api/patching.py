"""One line makes existing code fast: ``specdec.patch(model)`` routes ``model.generate`` through specdec.

transformers' ``custom_generate`` hook does not hand the ``streamer`` (or the tokenizer) to a
callable, so the patch replaces the instance's ``generate`` instead: same arguments, same return
types, and `unpatch` restores the original.
"""

from __future__ import annotations

import functools
import warnings
from contextlib import contextmanager

from drafters import Drafter
from specdec.api.decoder import SpeculativeDecoder
from specdec.api.generation import run_generate
from specdec.step.engine import AUTO
from specdec.step.support import UnsupportedGeneration

_MARK = "__specdec_decoder__"
_SPECDEC_ONLY = ("tree_budget", "generator")


def patch(model, drafter: str | Drafter = AUTO, *, tokenizer=None, draft_model=None, draft_head=None,
          tree_budget: int | None = None, fallback: bool = False) -> SpeculativeDecoder:
    """Make ``model.generate(...)`` speculative for this model instance.

    Args:
        model: a transformers causal LM.
        drafter, draft_model, draft_head, tree_budget, tokenizer: as for `SpeculativeDecoder`.
        fallback: when True, a call specdec does not run (beam search, contrastive search, an
            assistant model; see `UnsupportedGeneration`) goes to transformers' own ``generate``
            with a warning instead of raising.

    Returns:
        The `SpeculativeDecoder` behind the patch (drafter state, ``last_stats``, ``save``).
    """
    if is_patched(model):
        raise ValueError("model is already patched by specdec; call specdec.unpatch(model) first")
    decoder = SpeculativeDecoder(model, tokenizer, drafter=drafter, tree_budget=tree_budget, draft_model=draft_model,
                                 draft_head=draft_head)
    original = model.generate

    @functools.wraps(type(model).generate)
    def generate(*args, **kwargs):
        try:
            return run_generate(decoder, *args, **kwargs)
        except UnsupportedGeneration as unsupported:
            if not fallback:
                raise
            warnings.warn(f"specdec: {unsupported}; running transformers' generate instead", stacklevel=2)
            return original(*args, **{k: v for k, v in kwargs.items() if k not in _SPECDEC_ONLY})

    setattr(generate, _MARK, decoder)
    model.generate = generate
    return decoder


def is_patched(model) -> bool:
    """Whether ``model.generate`` is specdec's."""
    return hasattr(model.__dict__.get("generate"), _MARK)


def unpatch(model) -> None:
    """Restore transformers' ``model.generate``."""
    if not is_patched(model):
        raise ValueError("model is not patched by specdec")
    del model.__dict__["generate"]


@contextmanager
def patched(model, drafter: str | Drafter = AUTO, **options):
    """``with specdec.patched(model) as decoder: model.generate(...)``; unpatched on exit."""
    decoder = patch(model, drafter, **options)
    try:
        yield decoder
    finally:
        unpatch(model)
