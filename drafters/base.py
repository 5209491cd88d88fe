"""The drafter protocol: what every drafter sees and returns."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from trees import TokenTree


@dataclass(frozen=True)
class DraftSampling:
    """How the target samples the sequence, for drafters that draw their tokens.

    Attributes:
        warp: ``[m, V]`` logits -> ``[m, V]`` scores, the request's history-free processors
            (temperature, top-k, top-p, ...): a drafter draws from ``softmax(warp(logits))``.
        seed: the seed of this proposal's draws (repeatable with the request's seed, independent
            of the target's own draws).
    """

    warp: Callable[[Any], Any]
    seed: int


@dataclass(frozen=True)
class DraftContext:
    """What a drafter may read when proposing.

    Attributes:
        token_ids: ``[L]`` int64 committed token ids (prompt + generated); the last one is the root
            of the tree to propose, i.e. the token whose successors are drafted.
        sequence_id: identifies the sequence being decoded; within one sequence every context
            extends the previous one, so drafters may index it incrementally.
        prompt_len: how many of ``token_ids`` are the prompt.
        sampling: set when the target samples: a drafter with distributions of its own may then
            draw its tokens from them and return them with the tree (`trees.DraftDraws`), which
            is verified by rejection sampling; None for greedy decoding and inside hybrids
            (merged trees are verified by the delta rule).
    """

    token_ids: np.ndarray
    sequence_id: int = 0
    prompt_len: int = 0
    sampling: DraftSampling | None = None

    @property
    def root(self) -> int:
        return int(self.token_ids[-1])


@dataclass(frozen=True)
class VerifyFeedback:
    """What one target forward showed: only verified information may change drafter state.

    Rows are in an order where later rows are more trustworthy (rejected tree nodes first, then
    the committed path in order), so a drafter that overwrites per-token state can simply let
    later rows win.

    Attributes:
        tokens: ``[m]`` int64 tokens whose next-token distribution the target computed.
        topk_ids: ``[m, k]`` int64 the target's top-k successors of each of those tokens, best first.
        committed: ``[m]`` bool, true where the token is now part of the committed sequence.
        tree: the verified tree (``None`` for the prompt prefill).
        accepted_nodes: ``node_idx`` of the accepted draft nodes, root to tip.
        bonus_token: the target's own token after the accepted path (-1 for the prefill).
        features: ``[e, h]`` on the model's device, what the target's LM head read at the latest
            ``e`` committed positions, in order, the last one the position before the next root
            (a step's ``e`` = its emitted tokens; a prefill's = at most ``needs_features``); only
            for drafters that set ``needs_features``, else None.
        sequence_id: the sequence verified (`DraftContext.sequence_id`).
    """

    tokens: np.ndarray
    topk_ids: np.ndarray
    committed: np.ndarray
    tree: TokenTree | None = None
    accepted_nodes: tuple[int, ...] = ()
    bonus_token: int = -1
    features: Any = None
    sequence_id: int = 0


class Drafter(ABC):
    """Proposes token trees and learns from verification.

    Subclasses set ``name``, ``feedback_topk`` (how many of the target's top successors per
    verified token they want in `observe`; 0 when they need none) and ``needs_features`` (how many
    of the latest committed positions' target features `observe` needs after a prefill,
    `VerifyFeedback.features`; 0 for none). ``source_id`` is the id its nodes carry in
    `TokenTree.sources` (0 alone; a `HybridDrafter` numbers its members).
    """

    name: str = "drafter"
    feedback_topk: int = 0
    needs_features: int = 0
    source_id: int = 0

    @abstractmethod
    def propose(self, ctx: DraftContext, budget: int) -> TokenTree:
        """A tree of at most ``budget`` nodes below ``ctx.root``; an empty tree when unsure."""

    def observe(self, feedback: VerifyFeedback) -> None:
        """Learn from a verified forward (default: nothing to learn)."""

    def wants_prompt_topk(self, tokens: np.ndarray) -> np.ndarray:
        """``[m]`` bool: at which of a prompt's ``tokens`` (``[m]`` int64, in order) this drafter
        wants the target's top-k successors in `observe` (asked only when ``feedback_topk`` > 0;
        each position costs the prefill an LM-head row and a top-k over the vocabulary). Default:
        every one."""
        return np.ones(len(tokens), dtype=bool)

    def reset(self) -> None:
        """Forget everything learned."""

    def state_dict(self) -> dict[str, Any]:
        """Learned state as plain tensors / numbers (saved with `torch.save`)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore state produced by `state_dict` (validated: a `drafters.state.StateError` for
        anything malformed, with the drafter unchanged)."""

    def end_sequence(self, sequence_id: int) -> None:
        """The sequence ``sequence_id`` is finished (its last `propose` has happened): drop any
        per-sequence state kept for it (default: nothing kept)."""

    def save(self, path) -> None:
        """Write `state_dict` to ``path`` (a small ``torch.save`` file that `load` reads back)."""
        import torch

        torch.save({"kind": "specdec-drafter", "drafter": self.name, "state": self.state_dict()}, path)

    def load(self, path) -> None:
        """Read a file written by `save` into this drafter; every field is validated first
        (`drafters.state.StateError` for a file of another kind, drafter or vocabulary)."""
        from drafters.state import StateError, field, read_state_file

        payload = read_state_file(path, "specdec-drafter")
        if payload.get("drafter") != self.name:
            raise StateError(f"{path} holds state of drafter {payload.get('drafter')!r}, not {self.name!r}: "
                             f"load it into a {payload.get('drafter')!r} drafter")
        self.load_state_dict(field(payload, "state", str(path)))
