"""What one generation asks for and what it returns (plain data shared by the engine and the API)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from specdec.constrain.matcher import TokenConstraint
from specdec.step.sampling import NodeRule, PositionDraws

# A fixed ``tree_budget`` bypasses the scheduler, so it is bounded only by what one verify forward
# and its masks hold comfortably; the scheduler's own sizes end where its cost curve is measured
# (`specdec.schedule.costs.SIZE_BUCKETS`, 64 nodes).
MAX_TREE_BUDGET = 512


def check_tree_budget(tree_budget) -> int:
    if isinstance(tree_budget, bool) or not isinstance(tree_budget, int):
        raise TypeError(f"tree_budget must be an int, got {type(tree_budget).__name__}")
    if not 0 <= tree_budget <= MAX_TREE_BUDGET:
        raise ValueError(f"tree_budget must be between 0 and {MAX_TREE_BUDGET}, got {tree_budget}")
    return tree_budget


LOGPROBS_MODES = ("raw", "processed")


def check_logprobs(request, vocab_size: int) -> None:
    """A request's ``logprobs`` (None or an int from 0 to ``vocab_size``) and ``logprobs_mode``."""
    count = request.logprobs
    if count is not None and (isinstance(count, bool) or not isinstance(count, int) or not 0 <= count <= vocab_size):
        raise ValueError(f"logprobs must be None or an int from 0 to {vocab_size}, got {count!r}")
    if request.logprobs_mode not in LOGPROBS_MODES:
        raise ValueError(f"logprobs_mode must be one of {LOGPROBS_MODES}, got {request.logprobs_mode!r}")


@dataclass
class SpecStats:
    """What one generation did.

    ``mean_accepted_tokens`` (MAT) is the mean number of tokens committed per verify forward,
    bonus token included (plain decoding scores 1.0). ``max_tree_width`` is the most children any
    slot of a verified tree had. ``host_ms_per_step`` is the time per step outside the verify
    forward (drafting, scheduling, bookkeeping).
    """

    steps: int = 0
    new_tokens: int = 0
    drafted_tokens: int = 0
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    draft_seconds: float = 0.0
    verify_seconds: float = 0.0
    host_seconds: float = 0.0
    tree_sizes: list[int] = field(default_factory=list)
    max_tree_width: int = 0
    accepted_lengths: list[int] = field(default_factory=list)
    per_drafter: dict[str, dict[str, int]] = field(default_factory=dict)
    scheduler: dict | None = None
    reused_prefix_tokens: int = 0
    prefilled_tokens: int = 0

    @property
    def mean_accepted_tokens(self) -> float:
        return self.new_tokens / self.steps if self.steps else 0.0

    def as_dict(self) -> dict:
        """Summary figures as plain numbers (for logs and JSON)."""
        per_step = 1e3 / self.steps if self.steps else 0.0
        return {
            "steps": self.steps,
            "new_tokens": self.new_tokens,
            "mean_accepted_tokens": self.mean_accepted_tokens,
            "drafted_tokens": self.drafted_tokens,
            "prefill_seconds": self.prefill_seconds,
            "prefilled_tokens": self.prefilled_tokens,
            "reused_prefix_tokens": self.reused_prefix_tokens,
            "decode_seconds": self.decode_seconds,
            "draft_ms_per_step": self.draft_seconds * per_step,
            "verify_ms_per_step": self.verify_seconds * per_step,
            "host_ms_per_step": self.host_seconds * per_step,
            "mean_tree_size": sum(self.tree_sizes) / self.steps if self.steps else 0.0,
            "max_tree_width": self.max_tree_width,
            "per_drafter": self.per_drafter,
            "scheduler": self.scheduler,
        }


@dataclass
class KVState:
    """Keys and values kept between generations (a conversation): ``keys`` and ``values`` (one
    ``[H, L, D]`` tensor a layer, on the model's device) hold the ``L`` positions of ``token_ids``;
    for a hybrid model ``states`` hold its recurrent layers' states after all ``L`` of them, so a
    prompt reuses them only when it starts with every one of ``token_ids``. A prompt that starts
    with them is only prefilled past them. The engine reads and writes it while a request that
    carries it is live; its owner touches it only between requests."""

    keys: list[torch.Tensor] = field(default_factory=list)
    values: list[torch.Tensor] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    states: list[dict] = field(default_factory=list)

    def clear(self) -> None:
        self.keys, self.values, self.token_ids, self.states = [], [], [], []


@dataclass
class DecodeRequest:
    """One generation for `SpeculativeDecoder.submit` / `decode`.

    Attributes:
        prompt: ``[L]`` int64 prompt ids on the host (L >= 1).
        max_new_tokens: tokens to generate at most.
        eos_ids: token ids that end generation (the EOS token is emitted).
        tree_budget: draft nodes per step; ``None`` lets the scheduler choose.
        rule: per-node logits processors and greedy/sampled choice.
        draws: the uniform numbers sampling draws from, one per sequence position (``None`` for
            greedy decoding).
        stop: ``stop(ids [1, L + i] host, scores [1, V] device) -> bool`` checked after every new
            token (HF stopping-criteria protocol); generation ends after the first token where it
            is true.
        timeout: seconds from submission after which the request is cancelled at the next step
            boundary (its stream raises `specdec.step.stream.TimedOut`); None: no limit.
        keep_scores / keep_logits: collect the processed scores / raw logits ``[V]`` (on the
            model's device) that chose each new token (``output_scores`` / ``output_logits``).
        constraint: the output constraint every token must satisfy (`specdec.constrain.TokenConstraint`:
            checked at every tree node given its own path; the tokens it forces are drafted). Its
            mask applies where ``rule.processors`` holds a `specdec.step.sampling.ConstraintMask`,
            else before every processor. ``None``: unconstrained.
        logprobs: collect, for every new token, its log-probability and the ``logprobs`` most likely
            tokens' (`TokenLogprob`); ``None``: none.
        logprobs_mode: ``"raw"``: from the target's logits as the model computed them (before the
            constraint, processors and temperature); ``"processed"``: from the scores the token was
            chosen from (after all of them).
        kv: a `KVState` to reuse and update (conversations); ``None`` = a fresh cache.
        attended: ``[L]`` bool, which prompt tokens the model attends to (transformers' attention
            mask; ``None`` = all). Masked tokens never reach the model, and later positions count
            only attended tokens, as in ``model.generate``; they stay in the history that logits
            processors and stop criteria read. The last prompt token must be attended.
    """

    prompt: torch.Tensor
    max_new_tokens: int
    eos_ids: frozenset[int] = frozenset()
    tree_budget: int | None = None
    rule: NodeRule = field(default_factory=NodeRule)
    draws: PositionDraws | None = None
    stop: Callable[[torch.Tensor, torch.Tensor], bool] | None = None
    timeout: float | None = None
    keep_scores: bool = False
    keep_logits: bool = False
    constraint: TokenConstraint | None = None
    logprobs: int | None = None
    logprobs_mode: str = "raw"
    kv: KVState | None = None
    attended: torch.Tensor | None = None


@dataclass(frozen=True)
class TokenLogprob:
    """One new token's log-probability and the most likely tokens' at its position (host numbers)."""

    token: int
    logprob: float
    top: list[tuple[int, float]]  # (token id, log-probability), most likely first


@dataclass
class DecodeResult:
    """New tokens, statistics, and (when asked) the per-token scores and logits (float32 ``[V]``)
    and log-probabilities."""

    tokens: list[int]
    stats: SpecStats
    scores: list[torch.Tensor] = field(default_factory=list)
    logits: list[torch.Tensor] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
