"""Drafters propose token trees; the verifier tells them what the target saw."""

from __future__ import annotations

from typing import Callable

from drafters.base import DraftContext, Drafter, VerifyFeedback
from drafters.recycling import TokenRecycling

DRAFTERS: dict[str, Callable[..., Drafter]] = {
    "recycling": lambda vocab_size, **options: TokenRecycling(vocab_size, **options),
}


def make_drafter(drafter: str | Drafter, vocab_size: int, **options) -> Drafter:
    """A drafter from its registered name (see `DRAFTERS`), or ``drafter`` itself if already one."""
    if isinstance(drafter, Drafter):
        return drafter
    if not isinstance(drafter, str) or drafter not in DRAFTERS:
        raise ValueError(f"drafter must be one of {sorted(DRAFTERS)} or a Drafter instance, got {drafter!r}")
    return DRAFTERS[drafter](vocab_size, **options)


__all__ = ["DRAFTERS", "DraftContext", "Drafter", "TokenRecycling", "VerifyFeedback", "make_drafter"]
