"""The decode loop: propose -> verify -> accept -> compact -> observe, one target forward per step."""

from __future__ import annotations

import copy
import itertools
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
from transformers import DynamicCache

from drafters import DraftContext, Drafter, HybridDrafter, VerifyFeedback, make_drafter
from drafters.modeling import forward_with_cache
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
    reused_prefix_tokens: int = 0
    prefilled_tokens: int = 0

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
            "prefilled_tokens": self.prefilled_tokens,
            "reused_prefix_tokens": self.reused_prefix_tokens,
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
    rule: NodeRule | None = None
    generator: torch.Generator | None = None
    stop: Callable[[torch.Tensor, torch.Tensor], bool] | None = None
    on_tokens: Callable[[list[int]], None] | None = None
    keep_scores: bool = False
    keep_logits: bool = False
    kv: KVState | None = None
    attended: torch.Tensor | None = None


@dataclass
class DecodeResult:
    """New tokens, statistics, and (when asked) the per-token scores and logits (float32 ``[V]``)."""

    tokens: list[int]
    stats: SpecStats
    scores: list[torch.Tensor] = field(default_factory=list)
    logits: list[torch.Tensor] = field(default_factory=list)


@dataclass
class KVState:
    """A KV cache kept between generations (a conversation): ``token_ids`` are the ids whose keys
    and values ``cache`` holds. A prompt that starts with them is only prefilled past them."""

    cache: DynamicCache | None = None
    token_ids: list[int] = field(default_factory=list)

    def clear(self) -> None:
        self.cache, self.token_ids = None, []


@dataclass
class _Run:
    """One generation's state between steps: the cache holds ``committed[:n_committed - 1]``
    (``prefix_len`` positions) and ``root`` is the last committed token."""

    cache: DynamicCache
    committed: np.ndarray
    n_committed: int
    prefix_len: int
    root: int
    sequence_id: int
    prompt_len: int

    @property
    def history(self) -> np.ndarray:
        return self.committed[: self.n_committed]

    def advance(self, kept_slots: int, emitted: int, bonus_token: int) -> None:
        self.prefix_len += kept_slots
        self.n_committed += emitted
        self.root = bonus_token


def common_prefix_len(a: list[int], b: list[int]) -> int:
    """Length of the longest common prefix of two id lists."""
    limit = min(len(a), len(b))
    mismatch = np.flatnonzero(np.asarray(a[:limit]) != np.asarray(b[:limit]))
    return int(mismatch[0]) if mismatch.size else limit


_MODEL_LOCKS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
_MODEL_LOCKS_GUARD = threading.Lock()


def model_lock(model) -> threading.RLock:
    """The lock every decoder of ``model`` holds while generating (one forward at a time)."""
    with _MODEL_LOCKS_GUARD:
        return _MODEL_LOCKS.setdefault(model, threading.RLock())


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
        from specdec.support import position_limit
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
        self.position_limit = position_limit(model)
        self._drafter_spec, self._draft_model = drafter, draft_model
        self.last_stats: SpecStats | None = None
        self._sequences = itertools.count()

    def fork(self) -> "SpeculativeDecoder":
        """A decoder on the same model, tokenizer, scheduler and kernel with a fresh drafter of the
        same kind (private drafter state)."""
        spec = self._drafter_spec
        if isinstance(spec, Drafter):
            spec = copy.deepcopy(spec)
            spec.reset()
        twin = SpeculativeDecoder(self.model, self.tokenizer, drafter=spec, tree_budget=self.tree_budget,
                                  draft_model=self._draft_model, scheduler=self.scheduler, clock=self.clock,
                                  tree_kernel=False)
        twin.kernel = self.kernel
        return twin

    def reset(self) -> None:
        """Forget what the drafter learned (the scheduler's cost measurements are kept)."""
        self.drafter.reset()

    def state_dict(self) -> dict:
        """Everything learned: the drafters' state and the scheduler's statistics."""
        return {"kind": "specdec-decoder", "drafter": self.drafter.name, "drafter_state": self.drafter.state_dict(),
                "scheduler": self.scheduler.state_dict(), "vocab_size": self.logits_size}

    def load_state_dict(self, state: dict) -> None:
        """Restore `state_dict` output. Everything is validated first; on any error (another
        drafter or vocabulary, malformed fields) a `drafters.state.StateError` is raised and the
        decoder is unchanged."""
        from drafters.state import StateError, check_vocab_size, field

        check_vocab_size(state, self.logits_size, "decoder state")
        if field(state, "drafter", "decoder state") != self.drafter.name:
            raise StateError(f"decoder state was saved for drafter {state.get('drafter')!r}; this decoder has "
                             f"{self.drafter.name!r}: build SpeculativeDecoder(..., drafter={state.get('drafter')!r})")
        scheduler = Scheduler()
        scheduler.load_state_dict(field(state, "scheduler", "decoder state"))
        self.drafter.load_state_dict(field(state, "drafter_state", "decoder state"))
        self.scheduler.load_state_dict(scheduler.state_dict())

    def save(self, path) -> None:
        """Write `state_dict` to ``path`` (``torch.save``)."""
        torch.save(self.state_dict(), path)

    def load(self, path) -> None:
        """Read a file written by `save` (validated; see `load_state_dict`)."""
        from drafters.state import read_state_file

        self.load_state_dict(read_state_file(path, "specdec-decoder"))

    def generate(self, inputs=None, *args, **kwargs):
        """Generation with ``model.generate``'s semantics: greedy output is token-identical to
        ``do_sample=False``; ``do_sample=True`` samples exactly the target's distribution.

        Takes the arguments of `specdec.generate` except ``model``, ``drafter`` and ``draft_model``;
        the statistics of the last call are also kept in ``last_stats``.
        """
        from specdec.generate import run_generate

        return run_generate(self, inputs, *args, **kwargs)

    # ------------------------------------------------------------------ the loop
    def decode(self, request: DecodeRequest) -> DecodeResult:
        """Generate after ``request.prompt``: one target forward per step, until EOS, a stop
        criterion or ``max_new_tokens``."""
        result = DecodeResult(tokens=[], stats=SpecStats())
        for _ in self.decode_steps(request, result):
            pass
        return result

    @torch.inference_mode()
    def decode_steps(self, request: DecodeRequest, result: DecodeResult) -> Iterator[list[int]]:
        """`decode` one step at a time: yields each step's new tokens as soon as they are accepted.

        ``result`` fills as the steps go. Closing the iterator early (a cancelled stream) ends the
        generation after the last yielded step, with ``result`` and ``request.kv`` consistent.
        Each step holds the model's lock only for its own work (one forward at a time across all
        decoders of this model): no lock is held while the caller has control, so a stream may be
        consumed, closed or abandoned (then garbage-collected) from any thread without blocking
        another thread's generation.
        """
        if request.max_new_tokens == 0:
            return
        lock = model_lock(self.model)
        started = self.clock()
        with lock:
            run = self._start(request, result.stats)
        result.stats.prefill_seconds = self.clock() - started
        finished, mid_step = False, False
        try:
            while not finished:
                mid_step = True
                with lock:
                    emitted, finished = self._step(run, request, result)
                mid_step = False
                if request.on_tokens is not None:
                    request.on_tokens(emitted)
                yield emitted
        finally:
            with lock:
                self._finish(run, request, result, started, consistent=not mid_step)

    def _start(self, request: DecodeRequest, stats: SpecStats) -> _Run:
        """Reuse the longest cached prefix of the prompt (``request.kv``) and prefill the rest,
        all but the last prompt token, which becomes the first root."""
        prompt = request.prompt
        seen = prompt if request.attended is None else prompt[request.attended]  # what the model attends to
        context = seen[:-1].tolist()
        kv_state = request.kv
        reused, cache = 0, None
        if kv_state is not None and kv_state.cache is not None:
            reused = common_prefix_len(kv_state.token_ids, context)
            surplus = kv_state.cache.get_seq_length() - reused
            sliding = any(getattr(layer, "is_sliding", False) for layer in kv_state.cache.layers)
            if surplus and sliding:  # sliding layers have dropped what a rollback would need
                reused = 0
            else:
                if surplus:
                    kv_state.cache.crop(-surplus)
                kv_state.token_ids = kv_state.token_ids[:reused]  # true even if the prefill below fails
                cache = kv_state.cache
        if cache is None:
            cache = DynamicCache(config=self.model.config)
            cache.activate_past_recording()  # sliding-window layers keep verified slots until compaction
        prefix_len = self._prefill(cache, seen[reused:-1], reused)
        stats.reused_prefix_tokens, stats.prefilled_tokens = reused, len(context) - reused
        committed = np.empty(prompt.numel() + request.max_new_tokens + 1, dtype=np.int64)
        committed[: prompt.numel()] = prompt.numpy()
        return _Run(cache, committed, prompt.numel(), prefix_len, int(prompt[-1]), next(self._sequences),
                    prompt.numel())

    def _step(self, run: _Run, request: DecodeRequest, result: DecodeResult) -> tuple[list[int], bool]:
        """propose -> verify -> accept -> compact -> observe -> schedule. Returns (new tokens, finished)."""
        step_started = self.clock()
        tree = self._propose(DraftContext(run.history, run.sequence_id, run.prompt_len), run.prefix_len,
                             request.tree_budget)
        drafted = self.clock()
        logits = tree_forward(self.model, run.cache, run.root, tree, run.prefix_len, self.kernel)  # [n+1, V]
        verified = self.clock()
        acceptance, scores = choose(tree, logits, torch.from_numpy(run.history), request.rule, request.generator)
        emitted, finished = self._emit(run, request, result, tree, acceptance, logits, scores)
        kept_slots = acceptance.kept_slots[: len(emitted)]  # root + accepted nodes up to a stop
        kv.compact(run.cache, run.prefix_len, kept_slots)
        self._observe(tree, run.root, logits, acceptance)
        self.scheduler.record(
            len(tree), run.prefix_len, verified - drafted, (drafted - step_started) + (self.clock() - verified),
            float(torch.exp(tree.scores).sum()), len(acceptance.accepted_nodes),
        )
        run.advance(len(kept_slots), len(emitted), acceptance.bonus_token)
        self._count(result.stats, tree, acceptance, emitted, drafted - step_started, verified - drafted)
        return emitted, finished

    def _emit(self, run: _Run, request: DecodeRequest, result: DecodeResult, tree: TokenTree,
              acceptance: Acceptance, logits: torch.Tensor, scores: torch.Tensor | None) -> tuple[list[int], bool]:
        """The accepted block cut where plain decoding would stop (EOS, length, stop criteria);
        written to the history and the result."""
        emitted, finished = cut_at_stop(
            acceptance.tokens(tree), request.max_new_tokens - len(result.tokens), request.eos_ids
        )
        run.committed[run.n_committed : run.n_committed + len(emitted)] = emitted
        scores = logits if scores is None else scores
        path_slots = acceptance.kept_slots[: len(emitted)]  # the slot whose scores chose each token
        if request.stop is not None:
            emitted, stopped = self._cut_at_criteria(request.stop, run.committed, run.n_committed, emitted,
                                                     scores, path_slots)
            finished = finished or stopped
            path_slots = path_slots[: len(emitted)]
        result.tokens.extend(emitted)
        if request.keep_scores:
            result.scores.extend(scores.float()[path_slots].unbind())
        if request.keep_logits:
            result.logits.extend(logits.float()[path_slots].unbind())
        return emitted, finished

    def _finish(self, run: _Run, request: DecodeRequest, result: DecodeResult, started: float,
                consistent: bool) -> None:
        """Final statistics; leave ``request.kv`` holding exactly the history but its last token."""
        stats = result.stats
        stats.new_tokens = len(result.tokens)
        stats.decode_seconds = self.clock() - started - stats.prefill_seconds
        stats.scheduler = self.scheduler.explain(run.prefix_len)
        self.drafter.end_sequence(run.sequence_id)
        if request.kv is None:
            return
        if not consistent:  # an error inside a step: the cache may hold a half-verified tree
            request.kv.clear()
            return
        request.kv.cache = run.cache
        request.kv.token_ids = run.committed[: run.n_committed - 1].tolist()

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

    def _prefill(self, cache, context: torch.Tensor, cached: int) -> int:
        """Cache ``context`` (``[m]`` ids after the ``cached`` positions already in ``cache``) and
        show the drafter what the target predicted there. Returns the cache length."""
        if context.numel() == 0:
            return cached
        k = self.drafter.feedback_topk
        out = forward_with_cache(self.model, cache, input_ids=context[None].to(self.model.device),
                                 logits_to_keep=0 if k else 1)
        if k:
            self.drafter.observe(
                VerifyFeedback(
                    tokens=context.numpy(),
                    topk_ids=out.logits[0].topk(k, dim=-1).indices.cpu().numpy(),  # [m, k]
                    committed=np.ones(context.numel(), dtype=bool),
                )
            )
        return cached + context.numel()

    def _propose(self, ctx: DraftContext, context_len: int, budget: int | None) -> TokenTree:
        """The drafter's tree, pruned to ``budget`` or to the size the scheduler picks, and to the
        model's learned positions (a node at depth d sits at position ``context_len + d``)."""
        if self.position_limit is not None and context_len >= self.position_limit:
            raise ValueError(f"the next token would sit at position {context_len}, past the model's "
                             f"{self.position_limit} learned positions: prompt + max_new_tokens is too long "
                             "for this model (transformers fails there too)")
        ask = self.scheduler.draft_budget() if budget is None else budget
        tree = self.drafter.propose(ctx, ask) if ask else TokenTree.empty()
        if len(tree) and int(tree.tokens.max()) >= self.vocab_size:  # host-born tree: no device read
            raise ValueError(f"drafter {self.drafter.name!r} proposed token id {int(tree.tokens.max())}, outside "
                             f"the model's vocabulary [0, {self.vocab_size})")
        if self.position_limit is not None and len(tree) and context_len + tree.max_depth >= self.position_limit:
            tree = tree.select(tree.depths < self.position_limit - context_len)
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
                topk_ids=logits.topk(k, dim=-1).indices.cpu()[order].numpy()  # [n+1, k]; no [n+1, V] copy
                if k else np.zeros((order.numel(), 0), dtype=np.int64),
                committed=committed,
                tree=tree,
                accepted_nodes=acceptance.accepted_nodes,
                bonus_token=acceptance.bonus_token,
            )
        )
