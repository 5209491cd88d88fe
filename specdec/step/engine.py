"""The decode loop: propose -> verify -> accept -> compact -> observe -> schedule, one target
forward and one device-to-host read per step.

Where data lives (the README's "How it works"): the KV cache, the committed ids the processors read, the
tree tensors, the logits and the acceptance stay on the model's device; the host proposes trees
(one copy up per step) and reads back one packed tensor per step (the accepted tokens and the
top-k ids the drafters learn from), from which stop rules, streamers and drafters work.
"""

from __future__ import annotations

import copy
import itertools
import time
from collections.abc import Iterator

import numpy as np
import torch

from drafters import (
    DraftContext,
    Drafter,
    DraftSampling,
    HybridDrafter,
    VerifyFeedback,
    default_head_path,
    make_drafter,
)
from drafters.modeling import SlotCache, forward_with_cache, position_limit
from drafters.state import StateError, check_vocab_size, field, read_state_file
from specdec.device import kv
from specdec.device.reductions import row_topk_ids
from specdec.device.tree import TreeUploader
from specdec.models import distributed
from specdec.schedule.scheduler import Scheduler
from specdec.step.accept import Outcome, read_outcome
from specdec.step.features import FeatureTap
from specdec.step.request import DecodeRequest, DecodeResult, SpecStats, check_tree_budget
from specdec.step.sequence import SequenceState, common_prefix_len, model_lock
from specdec.step.support import UnsupportedGeneration, support_for, vocab_size_of
from specdec.step.timing import StepTimer
from specdec.step.verify import verify_forward
from trees import TokenTree

AUTO = "auto"


def cut_at_stop(block: list[int], room: int, eos_ids: frozenset[int]) -> tuple[list[int], bool]:
    """Truncate a committed block at the first EOS (kept) and at ``room`` tokens.

    Returns the tokens to emit and whether generation is finished.
    """
    for i, token in enumerate(block[:room]):
        if token in eos_ids:
            return block[: i + 1], True
    return block[:room], len(block) >= room


def resolve_drafter_name(drafter: str | Drafter, draft_model=None, model=None, draft_head=None) -> str | Drafter:
    """``"auto"`` means every available drafter: recycling and n-gram, plus the model drafter
    when a draft model is given and the head drafter when a head is given or `specdec distill`
    saved one for ``model`` (`drafters.default_head_path`)."""
    if drafter == AUTO:
        has_head = draft_head is not None or (model is not None and default_head_path(model).is_file())
        return "recycling+ngram" + ("+model" if draft_model is not None else "") + ("+head" if has_head else "")
    return drafter


class Engine:
    """The decode loop of one model with its drafter, scheduler and kernel, drafter state kept
    across calls; the public `specdec.SpeculativeDecoder` (its arguments) adds ``generate``."""

    def __init__(
        self,
        model,
        tokenizer=None,
        drafter: str | Drafter = AUTO,
        tree_budget: int | None = None,
        draft_model=None,
        draft_head=None,
        scheduler: Scheduler | None = None,
        clock=time.perf_counter,
        tree_kernel: bool | None = None,
    ) -> None:
        if tree_kernel not in (None, True, False):
            raise TypeError(f"tree_kernel must be None, True or False, got {tree_kernel!r}")
        self.model = model
        self.tokenizer = tokenizer
        self.tree_kernel = tree_kernel
        if tree_kernel:
            self.kernel  # required: probe now, so an unusable kernel is an error here
        self.vocab_size = vocab_size_of(model)
        self.logits_size = int(model.get_output_embeddings().weight.shape[0])
        self.drafter = make_drafter(resolve_drafter_name(drafter, draft_model, model, draft_head), self.logits_size,
                                    draft_model=draft_model, target=model, draft_head=draft_head)
        self.tree_budget = None if tree_budget is None else check_tree_budget(tree_budget)
        self.scheduler = scheduler if scheduler is not None else Scheduler()
        members = self.drafter.members if isinstance(self.drafter, HybridDrafter) else [self.drafter]
        self.source_names = {m.source_id: m.name for m in members}
        self.sharded = distributed.is_sharded(model)  # tensor parallel: ranks must verify the same nodes
        self.clock = clock
        self.position_limit = position_limit(model)
        self.uploader = TreeUploader(model.device)
        self.features = FeatureTap(model, self.drafter.needs_features)
        self._drafter_spec, self._draft_model, self._draft_head = drafter, draft_model, draft_head
        self.last_stats: SpecStats | None = None
        self.batcher = None  # the shared `specdec.batch.batcher.Batcher`, made on first batched use
        self._sequences = itertools.count()

    def fork(self) -> "Engine":
        """A decoder on the same model, tokenizer, scheduler and kernel with a fresh drafter of the
        same kind (private drafter state)."""
        spec = self._drafter_spec
        if isinstance(spec, Drafter):
            spec = copy.deepcopy(spec)
            spec.reset()
        return type(self)(self.model, self.tokenizer, drafter=spec, tree_budget=self.tree_budget,
                                  draft_model=self._draft_model, draft_head=self._draft_head,
                                  scheduler=self.scheduler, clock=self.clock,
                                  tree_kernel=self.tree_kernel)

    @property
    def unsupported(self) -> str | None:
        """Why this model cannot be decoded speculatively (None when it can); decided once per
        model, before any generation, by `specdec.step.support.support_for`."""
        return support_for(self.model, self.tree_kernel).reason

    @property
    def kernel(self):
        """The tree-attention kernel verify forwards use (None: the model's attention with a mask)."""
        return support_for(self.model, self.tree_kernel).kernel

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
        self.load_state_dict(read_state_file(path, "specdec-decoder"))

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
        if self.unsupported:
            raise UnsupportedGeneration(self.unsupported)
        if request.on_start is not None:
            request.on_start()
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

    def _step(self, run: SequenceState, request: DecodeRequest, result: DecodeResult) -> tuple[list[int], bool]:
        """propose -> verify -> accept -> compact -> observe -> schedule. Returns (new tokens, finished)."""
        timer = StepTimer(self.clock, self.model.device)
        timer.begin()
        tree = self._propose(run, request)  # host
        slots = self.uploader.upload(tree, run.root, *self._uniforms(run, request, tree))  # one host-to-device copy
        timer.verify_begins()
        with self.features.capture():
            logits = verify_forward(self.model, run.cache, slots, run.prefix_len, self.kernel)  # [n+1, V] device
        timer.verify_ends()
        scores = request.rule.scores(logits, slots, run.history_device[: run.n_committed])
        accepted = request.rule.accept(slots, scores)  # device
        outcome = read_outcome(accepted, self._topk(logits))  # the step's one device-to-host read
        emitted, finished = self._emit(run, request, result, outcome, logits, scores, accepted.path)
        kv.compact(run.cache, run.prefix_len, accepted.path[: len(emitted)], outcome.path_slots[: len(emitted)])
        self._observe(tree, run, outcome, self.features.rows(accepted.path[: len(emitted)]))
        times = timer.end()
        self.scheduler.record(tree, run.prefix_len, times.verify, times.overhead, outcome.accepted_nodes)
        run.advance(emitted, accepted.block[: len(emitted)])
        self._count(result.stats, tree, outcome, emitted, times)
        return emitted, finished

    def _propose(self, run: SequenceState, request: DecodeRequest) -> TokenTree:
        """The drafter's tree (`_draft`), pruned to the request's budget or to the size the scheduler picks."""
        budget = request.tree_budget
        sampling = None if request.draws is None else DraftSampling(request.rule.draft_warp(),
                                                                    request.draws.draft_seed(run.n_committed))
        tree = self._draft(run, budget, sampling)
        if budget is None:
            selected = self.scheduler.select(tree, run.prefix_len)
            return distributed.agree_on_selection(selected) if self.sharded else selected  # timings are rank-local
        return tree.prune(budget) if len(tree) > budget else tree

    def _draft(self, run: SequenceState, budget: int | None, sampling: DraftSampling | None = None) -> TokenTree:
        """The drafter's tree for ``run`` (asked for ``budget`` nodes, or for the scheduler's draft
        budget), checked against the vocabulary and cut to the model's learned positions (a node
        at depth d sits at position ``prefix_len + d``)."""
        context_len = run.prefix_len
        if self.position_limit is not None and context_len >= self.position_limit:
            raise ValueError(f"the next token would sit at position {context_len}, past the model's "
                             f"{self.position_limit} learned positions: prompt + max_new_tokens is too long "
                             "for this model (transformers fails there too)")
        ask = self.scheduler.draft_budget() if budget is None else budget
        ctx = DraftContext(run.history[: run.n_committed], run.sequence_id, run.prompt_len, sampling)
        tree = self.drafter.propose(ctx, ask) if ask else TokenTree.empty()
        if len(tree) and int(tree.tokens.max()) >= self.vocab_size:  # host-born tree: no device read
            raise ValueError(f"drafter {self.drafter.name!r} proposed token id {int(tree.tokens.max())}, outside "
                             f"the model's vocabulary [0, {self.vocab_size})")
        if self.position_limit is not None and len(tree) and context_len + tree.max_depth >= self.position_limit:
            tree = tree.select(tree.depths < self.position_limit - context_len)
        return tree

    @staticmethod
    def _uniforms(run: SequenceState, request: DecodeRequest, tree: TokenTree) -> tuple:
        """The sampling uniforms of the tree's positions (host; None for greedy decoding): one per
        depth for the delta rule and, for a tree with draws, the rejection sampler's per sibling."""
        if request.draws is None:
            return None, None
        first, width = run.n_committed, tree.max_depth + 1
        return (request.draws.uniforms(first, width),
                lambda siblings: request.draws.stage_uniforms(first, width, siblings + 1))

    def _topk(self, logits: torch.Tensor) -> torch.Tensor | None:
        """``[n+1, k]`` the target's top-k ids at every slot, when the drafter learns from them."""
        k = self.drafter.feedback_topk
        return row_topk_ids(logits, k) if k else None

    def _emit(self, run: SequenceState, request: DecodeRequest, result: DecodeResult, outcome: Outcome,
              logits: torch.Tensor, scores: torch.Tensor, path: torch.Tensor) -> tuple[list[int], bool]:
        """The accepted block cut where plain decoding would stop (EOS, length, stop criteria)."""
        emitted, finished = cut_at_stop(outcome.tokens, request.max_new_tokens - len(result.tokens),
                                        request.eos_ids)
        if request.stop is not None:
            emitted, stopped = self._cut_at_criteria(request.stop, run, emitted, scores, outcome.path_slots)
            finished = finished or stopped
        result.tokens.extend(emitted)
        chose = path[: len(emitted)]  # device: the slot whose scores chose each emitted token
        if request.keep_scores:
            result.scores.extend(scores.float()[chose].unbind())
        if request.keep_logits:
            result.logits.extend(logits.float()[chose].unbind())
        return emitted, finished

    @staticmethod
    def _cut_at_criteria(stop, run: SequenceState, emitted: list[int], scores: torch.Tensor,
                         path_slots: list[int]) -> tuple[list[int], bool]:
        """Check ``stop`` after every emitted token, as plain decoding would; cut after the first hit."""
        ids = torch.from_numpy(np.concatenate([run.history[: run.n_committed], emitted]))[None]  # [1, L + e] host
        for i, slot in enumerate(path_slots[: len(emitted)]):
            if stop(ids[:, : run.n_committed + i + 1], scores[slot : slot + 1].float()):
                return emitted[: i + 1], True
        return emitted, False

    def _observe(self, tree: TokenTree, run: SequenceState, outcome: Outcome, features: torch.Tensor | None) -> None:
        """Tell the drafter what the target predicted at every slot of ``run``'s step (committed
        slots last) and its ``features`` (``[e, h]`` device) at the slots that chose the ``e``
        emitted tokens."""
        kept = outcome.path_slots
        rejected = sorted(set(range(len(tree) + 1)) - set(kept))
        order = np.asarray(rejected + kept, dtype=np.int64)
        slot_tokens = np.concatenate([[run.root], tree.tokens.numpy()])  # [n+1]
        committed = np.zeros(order.size, dtype=bool)
        committed[len(rejected) :] = True
        self.drafter.observe(VerifyFeedback(
            tokens=slot_tokens[order],
            topk_ids=outcome.topk_ids[order] if outcome.topk_ids.size else np.zeros((order.size, 0), np.int64),
            committed=committed, tree=tree, accepted_nodes=outcome.accepted_nodes, bonus_token=outcome.bonus_token,
            features=features, sequence_id=run.sequence_id,
        ))

    def _count(self, stats: SpecStats, tree: TokenTree, outcome: Outcome, emitted: list[int], times) -> None:
        stats.steps += 1
        stats.tree_sizes.append(len(tree))
        stats.max_tree_width = max(stats.max_tree_width, max(map(len, tree.children())))
        stats.accepted_lengths.append(len(emitted))
        stats.drafted_tokens += len(tree)
        stats.draft_seconds += times.draft
        stats.verify_seconds += times.verify
        stats.host_seconds += times.overhead
        sources = tree.sources.numpy()
        proposed = np.bincount(sources, minlength=len(self.source_names))
        accepted = np.bincount(sources[list(outcome.accepted_nodes)], minlength=len(proposed))
        for source in np.flatnonzero(proposed):
            entry = stats.per_drafter.setdefault(self.source_names.get(int(source), str(source)),
                                                 {"proposed": 0, "accepted": 0})
            entry["proposed"] += int(proposed[source])
            entry["accepted"] += int(accepted[source])

    # ------------------------------------------------------------------ start and finish
    def _start(self, request: DecodeRequest, stats: SpecStats) -> SequenceState:
        """Reuse the longest cached prefix of what the model sees (``request.kv``) and prefill the
        rest, all but the last token, which becomes the first root."""
        prompt = request.prompt
        seen = (prompt if request.attended is None else prompt[request.attended]).tolist()
        largest_tree = request.tree_budget if request.tree_budget is not None else self.scheduler.max_budget
        capacity = len(seen) + request.max_new_tokens + largest_tree + 1
        kv_state, reused, cache = request.kv, 0, None
        if kv_state is not None and isinstance(kv_state.cache, SlotCache):
            reused = common_prefix_len(kv_state.token_ids, seen[:-1])
            cache = kv_state.cache
            cache.truncate(reused)
            cache.reserve(capacity)
            kv_state.token_ids = kv_state.token_ids[:reused]  # true even if the prefill below fails
        if cache is None:
            cache = SlotCache.for_model(self.model, capacity)
        sequence_id = next(self._sequences)
        prefix_len = self._prefill(cache, torch.tensor(seen[reused:-1], dtype=torch.long), reused, sequence_id)
        stats.reused_prefix_tokens, stats.prefilled_tokens = reused, len(seen) - 1 - reused
        history = np.empty(prompt.numel() + request.max_new_tokens + 1, dtype=np.int64)
        history[: prompt.numel()] = prompt.numpy()
        history_device = torch.from_numpy(history).to(self.model.device)  # the prompt, copied up once
        return SequenceState(cache, history, history_device, prompt.numel(), prefix_len, seen[-1], sequence_id,
                    prompt.numel(), seen)

    def _prefill(self, cache: SlotCache, context: torch.Tensor, cached: int, sequence_id: int) -> int:
        """Cache ``context`` (``[m]`` host ids after the ``cached`` positions already in ``cache``)
        and show the drafter what the target predicted there (its features at the last
        ``needs_features`` positions). Returns the cache length."""
        if context.numel() == 0:
            return cached
        k = self.drafter.feedback_topk
        featured = min(context.numel(), self.drafter.needs_features)
        with self.features.capture():
            out = forward_with_cache(self.model, cache, input_ids=context[None].to(self.model.device),
                                     logits_to_keep=0 if k else max(featured, 1))
        kept = context.numel() if k else max(featured, 1)  # positions the LM head read, the last ones
        features = self.features.rows(torch.arange(kept - featured, kept, device=self.model.device))
        if k or features is not None:
            self.drafter.observe(VerifyFeedback(
                tokens=context.numpy(),
                topk_ids=(row_topk_ids(out.logits[0], k).cpu().numpy() if k  # [m, k]: once per generation
                          else np.zeros((context.numel(), 0), dtype=np.int64)),
                committed=np.ones(context.numel(), dtype=bool), features=features, sequence_id=sequence_id,
            ))
        return cached + context.numel()

    def _finish(self, run: SequenceState, request: DecodeRequest, result: DecodeResult, started: float,
                consistent: bool) -> None:
        """Final statistics; leave ``request.kv`` holding exactly what the model saw but its last token."""
        stats = result.stats
        stats.new_tokens = len(result.tokens)
        stats.decode_seconds = self.clock() - started - stats.prefill_seconds
        stats.scheduler = self.scheduler.explain(run.prefix_len, self.source_names)
        self.drafter.end_sequence(run.sequence_id)
        if request.kv is None:
            return
        if not consistent:  # an error inside a step: the cache may hold a half-verified tree
            request.kv.clear()
            return
        request.kv.cache = run.cache
        request.kv.token_ids = run.seen[:-1]
