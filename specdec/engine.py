"""The decode loop: propose -> verify -> accept -> compact -> observe, one target forward per step."""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from transformers import DynamicCache

from drafters import DraftContext, Drafter, HybridDrafter, VerifyFeedback, make_drafter
from specdec import kv
from specdec.scheduler import Scheduler
from specdec.sampling import NodeRule, choose
from specdec.verify import Acceptance, tree_forward
from trees import TokenTree

AUTO = "auto"


@dataclass
class SpecStats:
    """What one generation did.

    ``mean_accepted_tokens`` (MAT) is the mean number of tokens committed per verify forward,
    bonus token included (plain decoding scores 1.0). ``max_tree_width`` is the most children any
    slot of a verified tree had.
    """

    steps: int = 0
    new_tokens: int = 0
    drafted_tokens: int = 0
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    draft_seconds: float = 0.0
    verify_seconds: float = 0.0
    tree_sizes: list[int] = field(default_factory=list)
    max_tree_width: int = 0
    accepted_lengths: list[int] = field(default_factory=list)
    per_drafter: dict[str, dict[str, int]] = field(default_factory=dict)
    scheduler: dict | None = None

    @property
    def mean_accepted_tokens(self) -> float:
        return self.new_tokens / self.steps if self.steps else 0.0

    def as_dict(self) -> dict:
        return {
            "steps": self.steps,
            "new_tokens": self.new_tokens,
            "mean_accepted_tokens": self.mean_accepted_tokens,
            "drafted_tokens": self.drafted_tokens,
            "prefill_seconds": self.prefill_seconds,
            "decode_seconds": self.decode_seconds,
            "draft_ms_per_step": 1e3 * self.draft_seconds / self.steps if self.steps else 0.0,
            "verify_ms_per_step": 1e3 * self.verify_seconds / self.steps if self.steps else 0.0,
            "mean_tree_size": sum(self.tree_sizes) / self.steps if self.steps else 0.0,
            "max_tree_width": self.max_tree_width,
            "per_drafter": self.per_drafter,
            "scheduler": self.scheduler,
        }


@dataclass
class DecodeRequest:
    """One generation for `SpeculativeDecoder.decode`.

    Attributes:
        prompt: ``[L]`` int64 prompt ids (L >= 1).
        max_new_tokens: tokens to generate at most.
        eos_ids: token ids that end generation (the EOS token is emitted).
        tree_budget: draft nodes per step; ``None`` lets the scheduler choose.
        rule: per-node logits processors and greedy/sampled choice; ``None`` is plain argmax.
        generator: RNG for sampling.
        stop: ``stop(ids [1, L + i], scores [1, V]) -> bool`` checked after every new token
            (HF stopping-criteria protocol); generation ends after the first token where it is true.
        on_tokens: called with each step's new tokens as soon as they are accepted (streaming).
        keep_scores / keep_logits: collect the processed scores / raw logits ``[V]`` that chose
            each new token (``output_scores`` / ``output_logits``).
    """

    prompt: torch.Tensor
    max_new_tokens: int
    eos_ids: frozenset[int] = frozenset()
    tree_budget: int | None = None
    rule: NodeRule | None = None
    generator: torch.Generator | None = None
    stop: Callable[[torch.Tensor, torch.Tensor], bool] | None = None
    on_tokens: Callable[[list[int]], None] | None = None
    keep_scores: bool = False
    keep_logits: bool = False


@dataclass
class DecodeResult:
    """New tokens, statistics, and (when asked) the per-token scores and logits (float32 ``[V]``)."""

    tokens: list[int]
    stats: SpecStats
    scores: list[torch.Tensor] = field(default_factory=list)
    logits: list[torch.Tensor] = field(default_factory=list)


def cut_at_stop(block: list[int], room: int, eos_ids: frozenset[int]) -> tuple[list[int], bool]:
    """Truncate a committed block at the first EOS (kept) and at ``room`` tokens.

    Returns the tokens to emit and whether generation is finished.
    """
    for i, token in enumerate(block[:room]):
        if token in eos_ids:
            return block[: i + 1], True
    return block[:room], len(block) >= room


def resolve_drafter_name(drafter: str | Drafter, draft_model=None) -> str | Drafter:
    """``"auto"`` means every available drafter: recycling and n-gram, plus the model drafter
    when a draft model is given."""
    if drafter == AUTO:
        return "recycling+ngram" + ("+model" if draft_model is not None else "")
    return drafter


class SpeculativeDecoder:
    """Speculative greedy decoding for one HF causal LM, with drafter state kept across calls.

    Args:
        model: a transformers causal LM (batch size 1, CPU).
        tokenizer: optional, used by callers that pass text.
        drafter: ``"auto"`` (every available drafter, merged), a registered drafter name
            (``"recycling"``, ``"ngram"``, ``"model"``), several joined by ``+`` for a hybrid
            (``"recycling+ngram"``), or a `Drafter` instance.
        tree_budget: draft nodes verified per step; ``None`` lets the `Scheduler` choose each step
            from measured costs and learned acceptance (0 = plain decoding).
        draft_model: the small causal LM used by the ``model`` drafter (same vocabulary).
        scheduler: a `Scheduler` to use (and share); a new one by default.
        clock: the time source for step timings (seconds; tests inject a fake one).
        tree_kernel: run verify attention through the csrc ``tree_attention`` operator: ``None``
            (default) when the extension builds and the model has plain full attention, ``True``
            to require it, ``False`` for the model's own attention with an additive tree mask.
    """

    def __init__(
        self,
        model,
        tokenizer=None,
        drafter: str | Drafter = AUTO,
        tree_budget: int | None = None,
        draft_model=None,
        scheduler: Scheduler | None = None,
        clock=time.perf_counter,
        tree_kernel: bool | None = None,
    ) -> None:
        from specdec.attention import tree_kernel_for
        from specdec.validation import check_tree_budget, vocab_size_of

        self.model = model
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size_of(model)
        self.logits_size = int(model.get_output_embeddings().weight.shape[0])
        self.drafter = make_drafter(resolve_drafter_name(drafter, draft_model), self.logits_size,
                                    draft_model=draft_model)
        self.tree_budget = None if tree_budget is None else check_tree_budget(tree_budget)
        self.scheduler = scheduler if scheduler is not None else Scheduler()
        members = self.drafter.members if isinstance(self.drafter, HybridDrafter) else [self.drafter]
        self._source_names = {getattr(m, "source_id", 0): m.name for m in members}
        self.clock = clock
        self.kernel = tree_kernel_for(model, tree_kernel)
        self.last_stats: SpecStats | None = None
        self._lock = threading.Lock()
        self._sequences = itertools.count()

    def reset(self) -> None:
        """Forget what the drafter learned (the scheduler's cost measurements are kept)."""
        self.drafter.reset()

    def state_dict(self) -> dict:
        """Everything learned: the drafters' state and the scheduler's statistics."""
        return {"drafter": self.drafter.name, "drafter_state": self.drafter.state_dict(),
                "scheduler": self.scheduler.state_dict(), "vocab_size": self.logits_size}

    def load_state_dict(self, state: dict) -> None:
        if state.get("vocab_size") != self.logits_size or state.get("drafter") != self.drafter.name:
            raise ValueError(
                f"state was saved for drafter {state.get('drafter')!r} with a vocabulary of "
                f"{state.get('vocab_size')} tokens; this decoder has {self.drafter.name!r} and {self.logits_size}"
            )
        self.drafter.load_state_dict(state["drafter_state"])
        self.scheduler.load_state_dict(state["scheduler"])

    def save(self, path) -> None:
        """Write `state_dict` to ``path`` (``torch.save``)."""
        torch.save(self.state_dict(), path)

    def load(self, path) -> None:
        """Read a file written by `save`."""
        self.load_state_dict(torch.load(path, weights_only=True))

    def generate(self, inputs=None, *args, **kwargs):
        """Generation with ``model.generate``'s semantics: greedy output is token-identical to
        ``do_sample=False``; ``do_sample=True`` samples exactly the target's distribution.

        Takes the arguments of `specdec.generate` except ``model``, ``drafter`` and ``draft_model``;
        the statistics of the last call are also kept in ``last_stats``.
        """
        from specdec.generate import run_generate

        return run_generate(self, inputs, *args, **kwargs)

    # ------------------------------------------------------------------ the loop
    @torch.inference_mode()
    def decode(self, request: DecodeRequest) -> DecodeResult:
        """Generate after ``request.prompt``: one target forward per step, until EOS, a stop
        criterion or ``max_new_tokens``."""
        with self._lock:
            prompt = request.prompt
            result = DecodeResult(tokens=[], stats=SpecStats())
            stats = result.stats
            committed = np.empty(prompt.numel() + request.max_new_tokens + 1, dtype=np.int64)
            committed[: prompt.numel()] = prompt.numpy()
            n_committed = prompt.numel()
            if request.max_new_tokens == 0:
                return result

            started = self.clock()
            cache = DynamicCache(config=self.model.config)
            prefix_len = self._prefill(cache, prompt)
            root = int(prompt[-1])
            stats.prefill_seconds = self.clock() - started

            sequence_id = next(self._sequences)
            finished = False
            while not finished:
                step_started = self.clock()
                ctx = DraftContext(committed[:n_committed], sequence_id, prompt.numel())
                tree = self._propose(ctx, prefix_len, request.tree_budget)
                drafted = self.clock()
                logits = tree_forward(self.model, cache, root, tree, prefix_len, self.kernel)  # [n+1, V]
                verified = self.clock()
                acceptance, scores = choose(tree, logits, torch.from_numpy(committed[:n_committed]),
                                            request.rule, request.generator)
                emitted, finished = cut_at_stop(
                    acceptance.tokens(tree), request.max_new_tokens - len(result.tokens), request.eos_ids
                )
                committed[n_committed : n_committed + len(emitted)] = emitted
                path_slots = acceptance.kept_slots[: len(emitted)]  # slot whose scores chose each token
                if request.stop is not None:
                    emitted, stopped = self._cut_at_criteria(request.stop, committed, n_committed, emitted,
                                                             logits if scores is None else scores, path_slots)
                    finished = finished or stopped
                    path_slots = path_slots[: len(emitted)]
                kv.compact(cache, prefix_len, acceptance.kept_slots)
                self._observe(tree, root, logits, acceptance)
                self.scheduler.record(
                    len(tree), prefix_len, verified - drafted,
                    (drafted - step_started) + (self.clock() - verified),
                    float(torch.exp(tree.scores).sum()), len(acceptance.accepted_nodes),
                )
                prefix_len += len(acceptance.kept_slots)

                n_committed += len(emitted)
                result.tokens.extend(emitted)
                root = acceptance.bonus_token
                if request.keep_scores:
                    result.scores.extend((logits if scores is None else scores).float()[path_slots].unbind())
                if request.keep_logits:
                    result.logits.extend(logits.float()[path_slots].unbind())
                self._count(stats, tree, acceptance, emitted, drafted - step_started, verified - drafted)
                if request.on_tokens is not None:
                    request.on_tokens(emitted)
            stats.new_tokens = len(result.tokens)
            stats.decode_seconds = self.clock() - started - stats.prefill_seconds
            stats.scheduler = self.scheduler.explain(prefix_len)
            return result

    @staticmethod
    def _cut_at_criteria(stop, committed: np.ndarray, n_committed: int, emitted: list[int],
                         scores: torch.Tensor, path_slots: list[int]) -> tuple[list[int], bool]:
        """Check ``stop`` after every emitted token, as plain decoding would; cut after the first hit."""
        for i, slot in enumerate(path_slots):
            ids = torch.from_numpy(committed[: n_committed + i + 1])[None]  # [1, L + i + 1]
            if stop(ids, scores[slot : slot + 1].float()):
                return emitted[: i + 1], True
        return emitted, False

    def _count(self, stats: SpecStats, tree: TokenTree, acceptance: Acceptance, emitted: list[int],
               draft_seconds: float, verify_seconds: float) -> None:
        stats.steps += 1
        stats.tree_sizes.append(len(tree))
        stats.max_tree_width = max(stats.max_tree_width, max(map(len, tree.children())))
        stats.accepted_lengths.append(len(emitted))
        stats.drafted_tokens += len(tree)
        stats.draft_seconds += draft_seconds
        stats.verify_seconds += verify_seconds
        sources = tree.sources.numpy()
        proposed = np.bincount(sources, minlength=len(self._source_names))
        accepted = np.bincount(sources[list(acceptance.accepted_nodes)], minlength=len(proposed))
        for source in np.flatnonzero(proposed):
            entry = stats.per_drafter.setdefault(self._source_names.get(int(source), str(source)),
                                                 {"proposed": 0, "accepted": 0})
            entry["proposed"] += int(proposed[source])
            entry["accepted"] += int(accepted[source])

    def _prefill(self, cache, prompt: torch.Tensor) -> int:
        """Cache all prompt tokens but the last (the first root); seed the drafter. Returns the cache length."""
        context = prompt[:-1]
        if context.numel() == 0:
            return 0
        k = self.drafter.feedback_topk
        out = self.model(
            input_ids=context[None], past_key_values=cache, use_cache=True, logits_to_keep=0 if k else 1
        )
        if k:
            n = context.numel()
            self.drafter.observe(
                VerifyFeedback(
                    tokens=context.numpy(),
                    topk_ids=out.logits[0].topk(k, dim=-1).indices.numpy(),  # [L-1, k]
                    committed=np.ones(n, dtype=bool),
                )
            )
        return context.numel()

    def _propose(self, ctx: DraftContext, context_len: int, budget: int | None) -> TokenTree:
        """The drafter's tree, pruned to ``budget`` or to the size the scheduler picks."""
        ask = self.scheduler.draft_budget() if budget is None else budget
        tree = self.drafter.propose(ctx, ask) if ask else TokenTree.empty()
        if budget is None:
            size = self.scheduler.choose_size(torch.exp(tree.scores).numpy(), context_len)
        else:
            size = budget
        return tree.prune(size) if len(tree) > size else tree

    def _observe(self, tree: TokenTree, root: int, logits: torch.Tensor, acceptance: Acceptance) -> None:
        """Tell the drafter what the target predicted at every slot; committed slots last."""
        k = self.drafter.feedback_topk
        kept = acceptance.kept_slots
        rejected = sorted(set(range(len(tree) + 1)) - set(kept))
        order = torch.tensor(rejected + kept, dtype=torch.long)
        slot_tokens = torch.cat([torch.tensor([root]), tree.tokens])  # [n+1]
        committed = np.zeros(order.numel(), dtype=bool)
        committed[len(rejected) :] = True
        self.drafter.observe(
            VerifyFeedback(
                tokens=slot_tokens[order].numpy(),
                topk_ids=logits.index_select(0, order).topk(k, dim=-1).indices.numpy()  # [n+1, k]
                if k else np.zeros((order.numel(), 0), dtype=np.int64),
                committed=committed,
                tree=tree,
                accepted_nodes=acceptance.accepted_nodes,
                bonus_token=acceptance.bonus_token,
            )
        )
