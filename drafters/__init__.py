"""Drafters propose token trees; the verifier tells them what the target saw."""

from __future__ import annotations

from typing import Callable

from drafters.base import DraftContext, Drafter, DraftSampling, VerifyFeedback
from drafters.head import HeadDrafter, HeadFile, default_head_path
from drafters.hybrid import HybridDrafter
from drafters.model import ModelDrafter
from drafters.ngram import NGramDrafter
from drafters.recycling import TokenRecycling


def head_drafter(target, draft_head=None) -> HeadDrafter:
    """The ``head`` drafter for ``target``: ``draft_head`` is a `HeadFile`, a path, or None for the
    head `specdec distill` saved at `default_head_path` (FileNotFoundError when there is none)."""
    if target is None:
        raise ValueError("the head drafter needs the target model")
    if not isinstance(draft_head, HeadFile):
        draft_head = HeadFile.load(default_head_path(target) if draft_head is None else draft_head, target)
    return HeadDrafter(draft_head, target)


DRAFTERS: dict[str, Callable[..., Drafter]] = {
    "recycling": lambda vocab_size, **_: TokenRecycling(vocab_size),
    "ngram": lambda vocab_size, **_: NGramDrafter(vocab_size),
    "model": lambda vocab_size, draft_model=None, **_: ModelDrafter(draft_model, vocab_size),
    "model-topk": lambda vocab_size, draft_model=None, **_: ModelDrafter(draft_model, vocab_size, draw=False),
    "head": lambda vocab_size, target=None, draft_head=None, **_: head_drafter(target, draft_head),
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


def make_drafter(drafter: str | Drafter, vocab_size: int, draft_model=None, target=None, draft_head=None) -> Drafter:
    """A drafter from its registered name, ``a+b`` for a hybrid, or ``drafter`` itself if already one.

    ``draft_model`` serves the ``model`` drafter; ``target`` and ``draft_head`` (a `HeadFile` or
    path; None: the target's default head) the ``head`` drafter.
    """
    if isinstance(drafter, Drafter):
        return drafter
    parts = drafter_names(drafter)
    members = [DRAFTERS[p](vocab_size, draft_model=draft_model, target=target, draft_head=draft_head) for p in parts]
    return members[0] if len(members) == 1 else HybridDrafter(members)


__all__ = [
    "DRAFTERS",
    "DraftContext",
    "DraftSampling",
    "Drafter",
    "HeadDrafter",
    "HeadFile",
    "HybridDrafter",
    "ModelDrafter",
    "NGramDrafter",
    "TokenRecycling",
    "VerifyFeedback",
    "default_head_path",
    "drafter_names",
    "head_drafter",
    "make_drafter",
]
