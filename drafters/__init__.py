"""Drafters propose token trees; the verifier tells them what the target saw."""

from __future__ import annotations

from typing import Callable

from drafters.base import DraftContext, Drafter, VerifyFeedback
from drafters.hybrid import HybridDrafter
from drafters.model import ModelDrafter
from drafters.ngram import NGramDrafter
from drafters.recycling import TokenRecycling

DRAFTERS: dict[str, Callable[..., Drafter]] = {
    "recycling": lambda vocab_size, draft_model=None: TokenRecycling(vocab_size),
    "ngram": lambda vocab_size, draft_model=None: NGramDrafter(vocab_size),
    "model": lambda vocab_size, draft_model=None: ModelDrafter(draft_model, vocab_size),
}


def drafter_names(name: str) -> list[str]:
    """The registered drafters in a name such as ``"recycling+ngram"``; ValueError if unknown."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"drafter must be one of {sorted(DRAFTERS)} (or several joined by '+'), got {name!r}")
    parts = name.split("+")
    unknown = [p for p in parts if p not in DRAFTERS]
    if unknown:
        raise ValueError(
            f"drafter must be one of {sorted(DRAFTERS)} (or several joined by '+'), got {name!r}"
        )
    return parts


def make_drafter(drafter: str | Drafter, vocab_size: int, draft_model=None) -> Drafter:
    """A drafter from its registered name, ``a+b`` for a hybrid, or ``drafter`` itself if already one."""
    if isinstance(drafter, Drafter):
        return drafter
    parts = drafter_names(drafter)
    members = [DRAFTERS[p](vocab_size, draft_model=draft_model) for p in parts]
    return members[0] if len(members) == 1 else HybridDrafter(members)


__all__ = [
    "DRAFTERS",
    "DraftContext",
    "Drafter",
    "HybridDrafter",
    "ModelDrafter",
    "NGramDrafter",
    "TokenRecycling",
    "VerifyFeedback",
    "drafter_names",
    "make_drafter",
]
