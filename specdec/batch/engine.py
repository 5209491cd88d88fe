"""The batched decode step: several sequences, each with its own tree, verified in ONE forward.

A step reads like the single-sequence step (`specdec.step.engine`), once for the whole batch:
propose (a tree per sequence, sizes chosen together by the scheduler from the cost of forwards of
this many rows) -> verify (one forward, rows packed in one `BatchCache`) -> accept (per row, on
the device) -> one host read for the whole batch -> emit, compact (per row), observe -> record.
Sequences join (`admit`: prefilled alone, then copied into a free row) and leave (`release`: the
row is freed at once) between steps. The caller holds the model's lock around each call.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from specdec.batch.cache import BatchCache
from specdec.batch.tree import BatchTree, RowTree, upload_batch
from specdec.batch.verify import verify_batch
from specdec.device.reductions import row_argmax
from specdec.step.accept import accept_rows, read_outcomes
from specdec.step.request import DecodeRequest, DecodeResult
from specdec.step.sequence import SequenceState
from specdec.step.timing import StepTimer
from trees import TokenTree


@dataclass
class Member:
    """One sequence of the batch: its request, result, decoding state and cache row.

    ``finished`` once it emitted its last token; ``consistent`` is False after an error inside a
    step it took part in (its cache row may then hold a half-verified tree)."""

    request: DecodeRequest
    result: DecodeResult
    run: SequenceState
    row: int
    started: float
    final_len: int  # the most positions its sequence reaches (prompt and every new token)
    largest_tree: int  # the most draft nodes one of its trees may have
    finished: bool = False
    consistent: bool = True


class BatchEngine:
    """Admits, steps and releases the sequences of one `SpeculativeDecoder` in batched forwards.

    Args:
        decoder: the decoder whose model, drafter, scheduler and kernel the steps use.
    """

    def __init__(self, decoder) -> None:
        self.decoder = decoder
        self.cache = BatchCache.for_model(decoder.model)
        self.members: list[Member | None] = []  # by cache row

    @property
    def active(self) -> int:
        """Sequences holding a row."""
        return sum(member is not None for member in self.members)

    @torch.inference_mode()
    def admit(self, request: DecodeRequest, result: DecodeResult) -> Member:
        """Prefill ``request`` (reusing ``request.kv`` as a single generation does) and give it a row."""
        decoder = self.decoder
        started = decoder.clock()
        run = decoder._start(request, result.stats)
        result.stats.prefill_seconds = decoder.clock() - started
        largest_tree = request.tree_budget if request.tree_budget is not None else decoder.scheduler.max_budget
        row = next((i for i, member in enumerate(self.members) if member is None), len(self.members))
        member = Member(request, result, run, row, started, run.prefix_len + request.max_new_tokens, largest_tree)
        if row == len(self.members):
            self.members.append(None)
        self.members[row] = member
        self.cache.reserve(len(self.members), self._capacity())
        self.cache.load_row(row, run.cache)
        if request.kv is None:
            run.cache = None  # the row holds it now
        return member

    def _capacity(self) -> int:
        """Positions a row needs: the longest any member reaches, plus the slots of the largest tree
        any member may have (every row of a forward feeds that many slots)."""
        members = [m for m in self.members if m is not None]
        return max(m.final_len for m in members) + max(m.largest_tree for m in members) + 1

    @torch.inference_mode()
    def release(self, member: Member) -> None:
        """Final statistics, ``request.kv`` updated from the row (a conversation), the row freed."""
        if member.request.kv is not None and member.consistent:
            self.cache.store_row(member.row, member.run.cache)
        self.decoder._finish(member.run, member.request, member.result, member.started, member.consistent)
        self.members[member.row] = None
        self.cache.lengths[member.row] = 0
        while self.members and self.members[-1] is None:
            self.members.pop()

    @torch.inference_mode()
    def step(self, members: list[Member]) -> list[list[int]]:
        """propose -> verify -> accept -> read -> emit/compact/observe -> record, for ``members``
        (admitted, unfinished) in one forward. Returns each member's new tokens; sets ``finished``."""
        decoder = self.decoder
        timer = StepTimer(decoder.clock, decoder.model.device)
        timer.begin()
        try:
            trees = self._propose(members)  # host
            batch = self._upload(members, trees)  # one host-to-device copy
            timer.verify_begins()
            with decoder.features.capture():
                logits = verify_batch(decoder.model, self.cache, batch, decoder.kernel)  # [B, q, V] device
            timer.verify_ends()
            choices, scores = self._choose(members, batch, logits)  # [B, q] device
            accepted = accept_rows(batch.tokens, batch.parent_slots, batch.candidates, batch.ancestors, batch.depths,
                                   batch.paths, choices)
            topk = decoder._topk(logits.flatten(0, 1))  # [B * q, k] or None
            slots = [None] * batch.tokens.shape[0]
            for member, tree in zip(members, trees):
                slots[member.row] = len(tree) + 1
            outcomes = read_outcomes(accepted, topk, slots)  # the step's one device-to-host read
            emitted = []
            for member, score in zip(members, scores):
                outcome, run = outcomes[member.row], member.run
                new, member.finished = decoder._emit(run, member.request, member.result, outcome,
                                                     logits[member.row, : slots[member.row]], score,
                                                     accepted.path[member.row])
                self.cache.compact_row(member.row, accepted.path[member.row, : len(new)],
                                       outcome.path_slots[: len(new)], batch.queries)
                emitted.append(new)
            features = self._features(members, accepted.path, emitted)
            for member, tree, new, feature in zip(members, trees, emitted, features):
                decoder._observe(tree, member.run, outcomes[member.row], feature)
            times = timer.end()
            decoder.scheduler.record_batch(trees, max(m.run.prefix_len for m in members), times.verify,
                                           times.overhead, [outcomes[m.row].accepted_nodes for m in members])
        except BaseException:
            for member in members:
                member.consistent = False
            raise
        for member, tree, new in zip(members, trees, emitted):
            member.run.advance(new, accepted.block[member.row, : len(new)])
            decoder._count(member.result.stats, tree, outcomes[member.row], new, times)
        return emitted

    def _propose(self, members: list[Member]) -> list[TokenTree]:
        """Each member's tree: its fixed budget, or the scheduler's choice for the scheduled ones together."""
        decoder = self.decoder
        trees = [decoder._draft(m.run, m.request.tree_budget) for m in members]  # drafts, no draws: delta rule
        trees = [tree.prune(m.request.tree_budget) if m.request.tree_budget is not None
                 and len(tree) > m.request.tree_budget else tree for m, tree in zip(members, trees)]
        scheduled = [i for i, member in enumerate(members) if member.request.tree_budget is None]
        if scheduled:
            context_len = max(members[i].run.prefix_len for i in scheduled)
            chosen = decoder.scheduler.select_batch([trees[i] for i in scheduled], context_len)
            for i, tree in zip(scheduled, chosen):
                trees[i] = tree
        return trees

    def _upload(self, members: list[Member], trees: list[TokenTree]) -> BatchTree:
        rows: list[RowTree | None] = [None] * (1 + max(member.row for member in members))
        for member, tree in zip(members, trees):
            run, draws = member.run, member.request.draws
            uniforms = None if draws is None else draws.uniforms(run.n_committed, tree.max_depth + 1)
            rows[member.row] = RowTree(tree, run.root, uniforms, self.cache.lengths[member.row])
        return upload_batch(rows, self.cache.lengths[: len(rows)], self.decoder.model.device)

    @staticmethod
    def _choose(members: list[Member], batch: BatchTree, logits: torch.Tensor):
        """``([B, q] choices, per-member scores [n+1, V])`` on the device: one argmax over every
        row for plain greedy members, each other member's processors and choice on its own slots."""
        rows, queries = batch.tokens.shape
        plain = [not m.request.rule.processors and not m.request.rule.do_sample for m in members]
        if any(plain):
            choices = row_argmax(logits.flatten(0, 1)).view(rows, queries)
        else:
            choices = torch.zeros(rows, queries, dtype=torch.long, device=logits.device)
        scores = []
        for member, is_plain in zip(members, plain):
            tree, run = batch.rows[member.row], member.run
            row_logits = logits[member.row, : tree.n + 1]
            if is_plain:
                scores.append(row_logits)
                continue
            score = member.request.rule.scores(row_logits, tree, run.history_device[: run.n_committed])
            choices[member.row, : tree.n + 1] = member.request.rule.choose(tree, score)
            scores.append(score)
        return choices, scores

    def _features(self, members: list[Member], paths: torch.Tensor, emitted: list[list[int]]) -> list:
        """Each member's target features (``[e, h]`` device) at the slots that chose its ``e``
        emitted tokens (None without a drafter that reads features)."""
        device = paths.device
        rows = torch.tensor([m.row for m, new in zip(members, emitted) for _ in new], device=device)  # host-built
        depth = torch.tensor([i for new in emitted for i in range(len(new))], device=device)
        features = self.decoder.features.batch_rows(rows, paths[rows, depth])
        return [None] * len(members) if features is None else list(features.split([len(new) for new in emitted]))
