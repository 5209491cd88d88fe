"""The decode step: propose -> verify -> accept -> compact -> observe -> schedule, for every running
sequence at once, with ONE target forward and ONE device-to-host read. A single sequence is a batch
of one: there is no other step.

Where data lives (the README's "How it works"): the KV cache, the committed ids the processors
read, the tree tensors, the logits and the acceptance stay on the model's device; the host
proposes trees (one copy up per step) and reads back one packed tensor per step (every row's
accepted tokens and the top-k ids the drafters learn from), from which stop rules and drafters work.

A failure that belongs to one row (its drafter, its logits processors or stopping criteria, its
compaction) fails that sequence alone; the others carry on. A failure of the shared work (the
upload, the forward, the read) propagates: every sequence of the step fails, and every row is
still consistent, since nothing is committed before the read.
"""

from __future__ import annotations

import contextlib

import numpy as np
import torch

from drafters import DraftContext, DraftSampling, HybridDrafter, VerifyFeedback
from specdec.constrain.matcher import unpack_masks
from specdec.device.reductions import row_argmax, row_topk_ids
from specdec.device.tree import BatchTree, RowTree, upload_rows
from specdec.models import distributed
from specdec.step.accept import Accepted, Outcome, accept_rows, read_outcomes
from specdec.step.emit import emit
from specdec.step.sequence import Sequence
from specdec.step.timing import StepTimer
from specdec.step.verify import verify_rows
from trees import TokenTree

Stepped = dict  # Sequence -> its new tokens (list[int]) or its failure (an exception)
FORCED_LIMIT = 16  # grammar-forced draft nodes a constrained row's tree may gain per step


class Step:
    """Runs decode steps over the rows of ``engine``'s cache (a `specdec.step.engine.Engine`: its
    model, drafter, scheduler, kernel and feature tap)."""

    def __init__(self, engine) -> None:
        self.engine = engine
        self.choosing = False  # whether this step's drafters were the scheduler's choice
        self.masks: dict[Sequence, np.ndarray] = {}  # constrained rows: their slots' packed token masks

    @torch.inference_mode()
    def __call__(self, sequences: list[Sequence]) -> Stepped:
        """One step for ``sequences`` (running, each in its cache row). Returns, per sequence, its
        new tokens (``finished`` set when it is done) or the failure that ended it."""
        engine, out = self.engine, {}
        timer = StepTimer(engine.clock, engine.model.device)
        timer.begin()
        trees = self.propose(sequences, out)  # host; a drafter's failure fails its row alone
        rows = [seq for seq in sequences if seq in trees]
        if not rows:
            return out
        batch = self.upload(rows, trees)  # one host-to-device copy
        context_len = max(engine.cache.lengths[seq.slot] for seq in rows)  # the longest row's, before this step
        timer.verify_begins()
        with engine.features.capture():
            logits = verify_rows(engine.forward_model, engine.cache, batch, engine.kernel,
                                 engine.compiled)  # [B, q, V] device
        timer.verify_ends()
        accepted, scores = self.accept(rows, batch, logits, out)  # device
        rows = [seq for seq in rows if seq not in out]
        slots = [None] * batch.tokens.shape[0]
        for seq in rows:
            slots[seq.slot] = len(trees[seq]) + 1
        outcomes = read_outcomes(accepted, self._topk(logits.flatten(0, 1)), slots)  # the step's one read
        for seq in rows:  # stop rules, then compaction next to the row's prefix
            self.commit(seq, outcomes[seq.slot], logits, scores[seq], accepted, batch, out)
        engine.cache.release_tree_states()  # recurrent layers' per-node states: the accepted ones are kept
        self.observe([seq for seq in rows if isinstance(out[seq], list)], trees, outcomes, accepted.path, out)
        times = timer.end()
        verified = [seq for seq in rows if not isinstance(out[seq], BaseException)]
        if verified:
            engine.scheduler.record_batch([trees[seq] for seq in verified], context_len, times.verify, times.overhead,
                                          [outcomes[seq.slot].accepted_nodes for seq in verified])
        self.record_drafters([trees[seq] for seq in verified], context_len, times,
                             sum(len(out[seq]) for seq in verified))
        for seq in verified:
            self._count(seq, trees[seq], outcomes[seq.slot], out[seq], times)
        return out

    # ------------------------------------------------------------------ propose
    def propose(self, sequences: list[Sequence], out: Stepped) -> dict[Sequence, TokenTree]:
        """Each sequence's tree: its fixed budget's, or the scheduler's choice for the scheduled
        ones together (one node count for the batch, from the cost of forwards of this many rows),
        drafted by the drafters the scheduler runs this step; a constrained row's slots' token
        masks go to ``self.masks``."""
        engine, trees = self.engine, {}
        scheduled = [seq for seq in sequences if seq.request.tree_budget is None]
        with self.chosen_drafters(bool(scheduled)):
            for seq in sequences:
                try:
                    trees[seq] = self.draft(seq)
                except Exception as err:  # this row alone fails
                    out[seq] = err
        scheduled = [seq for seq in scheduled if seq in trees]
        if scheduled:
            context_len = max(engine.cache.lengths[seq.slot] for seq in scheduled)
            chosen = engine.scheduler.select_batch([trees[seq] for seq in scheduled], context_len)
            if engine.sharded:  # timings are rank-local: every rank verifies rank 0's choice
                chosen = distributed.agree_on_selections(chosen)
            trees.update(zip(scheduled, chosen))
        self.masks = {}
        for seq in sequences:
            if seq.matcher is not None and seq in trees:
                try:
                    self.masks[seq] = seq.matcher.masks(trees[seq])  # [n+1, W] int32, host
                except Exception as err:  # this row alone fails
                    del trees[seq]
                    out[seq] = err
        return trees

    @contextlib.contextmanager
    def chosen_drafters(self, scheduled: bool):
        """While drafting: a hybrid drafter runs the members the scheduler chooses when it
        schedules a row, and the skipped ones it measures in shadow (every member when every row
        has a fixed budget)."""
        drafter = self.engine.drafter
        self.choosing = isinstance(drafter, HybridDrafter) and scheduled
        if not self.choosing:
            yield
            return
        drafter.take_usage()  # what an earlier step that failed before its record left behind
        drafter.running, drafter.shadowed = self.engine.scheduler.choose_drafters(
            [m.source_id for m in drafter.members])
        try:
            yield
        finally:
            drafter.running, drafter.shadowed = None, frozenset()

    def draft(self, seq: Sequence) -> TokenTree:
        """The drafter's tree for ``seq`` (its fixed budget, or the scheduler's draft budget),
        checked against the vocabulary and cut to the model's learned positions (a node at depth
        d sits at position ``context_len + d``). Under a constraint, nodes it forbids are dropped
        and the tokens it forces are added (the grammar drafter: `RowMatcher.shape`)."""
        engine, request = self.engine, seq.request
        context_len = engine.cache.lengths[seq.slot]
        limit = engine.position_limit
        if limit is not None and context_len >= limit:
            raise ValueError(f"the next token would sit at position {context_len}, past the model's {limit} learned "
                             "positions: prompt + max_new_tokens is too long for this model")
        budget = request.tree_budget
        ask = engine.scheduler.draft_budget() if budget is None else budget
        sampling = None  # a constrained row's trees are not drawn: the constraint prunes and extends them
        if request.draws is not None and seq.matcher is None:
            sampling = DraftSampling(request.rule.draft_warp(), request.draws.draft_seed(seq.n_committed))
        ctx = DraftContext(seq.history[: seq.n_committed], seq.sequence_id, seq.prompt_len, sampling)
        tree = engine.drafter.propose(ctx, ask) if ask else TokenTree.empty()
        if seq.matcher is not None:  # the constraint's own nodes, and none it forbids
            tree = seq.matcher.shape(tree, engine.grammar_source, FORCED_LIMIT)
        if len(tree) and int(tree.tokens.max()) >= engine.vocab_size:  # host-born tree: no device read
            raise ValueError(f"drafter {engine.drafter.name!r} proposed token id {int(tree.tokens.max())}, outside "
                             f"the model's vocabulary [0, {engine.vocab_size})")
        if limit is not None and len(tree) and context_len + tree.max_depth >= limit:
            tree = tree.select(tree.depths < limit - context_len)
        if budget is not None and len(tree) > budget:
            tree = tree.prune(budget)
        return tree

    def upload(self, rows: list[Sequence], trees: dict[Sequence, TokenTree]) -> BatchTree:
        """The rows' trees (and sampling uniforms) on the device in one copy; rows of the cache
        below the last stepped one that are not stepped (prefilling) ride along as padding."""
        cache = self.engine.cache
        width = 1 + max(seq.slot for seq in rows)
        row_trees: list[RowTree | None] = [None] * width
        for seq in rows:
            tree, draws = trees[seq], seq.request.draws
            first, depth = seq.n_committed, tree.max_depth + 1
            row_trees[seq.slot] = RowTree(
                tree, seq.root, None if draws is None else draws.uniforms(first, depth),
                None if draws is None else (lambda siblings, d=draws, f=first, w=depth:
                                            d.stage_uniforms(f, w, siblings + 1)),
                cache.lengths[seq.slot])
        return upload_rows(row_trees, cache.lengths[:width], self.engine.buffer)

    # ------------------------------------------------------------------ accept
    def accept(self, rows: list[Sequence], batch: BatchTree, logits: torch.Tensor,
               out: Stepped) -> tuple[Accepted, dict]:
        """Every row's accepted path on the device: one argmax and one vectorised walk for all plain
        greedy rows; every other row through its rule's own acceptance (processors on its slots,
        then the argmax, the delta rule, or rejection sampling for a tree that carries draws).
        A constrained row's scores are masked (-inf where its slot's state forbids a token) at its
        rule's `ConstraintMask`. Returns (``Accepted`` with ``[B, D]`` paths and blocks and ``[B]``
        counts, each row's scores ``[n+1, V]``)."""
        n_rows, queries = batch.tokens.shape
        plain = [seq for seq in rows if not seq.request.rule.processors and not seq.request.rule.do_sample
                 and seq.matcher is None]
        if plain:
            choices = row_argmax(logits.flatten(0, 1)).view(n_rows, queries)
            accepted = accept_rows(batch.tokens, batch.parent_slots, batch.candidates, batch.ancestors,
                                   batch.depths, batch.paths, choices)
        else:  # every row is written below; made from the logits, on their device
            width = batch.paths.shape[-1]
            accepted = Accepted(path=logits.new_zeros((n_rows, width), dtype=torch.long),
                                block=logits.new_zeros((n_rows, width), dtype=torch.long),
                                count=logits.new_ones(n_rows, dtype=torch.long))
        scores = {}
        for seq in rows:
            tree = batch.rows[seq.slot]
            row_logits = logits[seq.slot, : tree.n + 1]
            if seq in plain:
                scores[seq] = row_logits
                continue
            try:
                rule = seq.request.rule
                allowed = None
                if seq in self.masks:  # host -> device: the constrained row's [n+1, W] packed masks
                    allowed = unpack_masks(torch.from_numpy(self.masks[seq]).to(row_logits.device),
                                           row_logits.shape[-1])  # [n+1, V] bool
                scores[seq] = rule.scores(row_logits, tree, seq.history_device[: seq.n_committed], allowed)
                row = rule.accept(tree, scores[seq])
            except Exception as err:  # a processor of this row failed
                out[seq] = err
                continue
            width = row.path.numel()
            accepted.path[seq.slot, :width] = row.path
            accepted.block[seq.slot, :width] = row.block
            accepted.count[seq.slot] = row.count
        return accepted, scores

    def record_drafters(self, verified: list[TokenTree], context_len: int, times, emitted: int) -> None:
        """Tell the scheduler what a hybrid's members cost and brought this step (when it chose them)."""
        drafter = self.engine.drafter
        if isinstance(drafter, HybridDrafter):
            usage = drafter.take_usage()
            if verified and self.choosing:
                self.engine.scheduler.record_drafters(usage, len(verified), max(map(len, verified)), context_len,
                                                      times.verify + times.overhead, emitted)

    def _topk(self, logits: torch.Tensor) -> torch.Tensor | None:
        """``[m, k]`` the target's top-k ids at every slot, when the drafter learns from them."""
        k = self.engine.drafter.feedback_topk
        return row_topk_ids(logits, k) if k else None

    # ------------------------------------------------------------------ commit and learn
    def commit(self, seq: Sequence, outcome: Outcome, logits: torch.Tensor, scores: torch.Tensor,
               accepted: Accepted, batch: BatchTree, out: Stepped) -> None:
        """Cut ``seq``'s accepted block at its stop rules, then keep its accepted slots' keys and
        values next to its prefix."""
        try:
            new, seq.finished = emit(seq, outcome, logits[seq.slot, : batch.rows[seq.slot].n + 1], scores,
                                     accepted.path[seq.slot])
        except Exception as err:  # a stopping criterion of this row failed
            out[seq] = err
            return
        try:
            self.engine.cache.compact_row(seq.slot, accepted.path[seq.slot, : len(new)],
                                          outcome.path_slots[: len(new)], batch.queries)
        except BaseException as err:
            seq.consistent = False
            out[seq] = err
            if not isinstance(err, Exception):
                raise
            return
        try:
            seq.advance(new, accepted.block[seq.slot, : len(new)])
        except Exception as err:  # its constraint refused a committed token
            out[seq] = err
            return
        out[seq] = new

    def observe(self, rows: list[Sequence], trees: dict, outcomes: list, paths: torch.Tensor, out: Stepped) -> None:
        """Tell the drafter what the target predicted at every slot of each row (committed slots
        last) and its features at the slots that chose the row's emitted tokens."""
        engine = self.engine
        device = paths.device
        emitted = [out[seq] for seq in rows]
        slot_of = torch.tensor([seq.slot for seq, new in zip(rows, emitted) for _ in new], dtype=torch.long,
                               device=device)  # host-built
        depth = torch.tensor([i for new in emitted for i in range(len(new))], dtype=torch.long, device=device)
        features = engine.features.batch_rows(slot_of, paths[slot_of, depth])  # [sum e, h] or None
        features = [None] * len(rows) if features is None else features.split([len(new) for new in emitted])
        for seq, new, feature in zip(rows, emitted, features):
            tree, outcome = trees[seq], outcomes[seq.slot]
            kept = outcome.path_slots
            rejected = sorted(set(range(len(tree) + 1)) - set(kept))
            order = np.asarray(rejected + kept, dtype=np.int64)
            slot_tokens = np.concatenate([[seq.history[seq.n_committed - len(new) - 1]], tree.tokens.numpy()])  # [n+1]
            committed = np.zeros(order.size, dtype=bool)
            committed[len(rejected) :] = True
            try:
                engine.drafter.observe(VerifyFeedback(
                    tokens=slot_tokens[order],
                    topk_ids=outcome.topk_ids[order] if outcome.topk_ids.size else np.zeros((order.size, 0), np.int64),
                    committed=committed, tree=tree, accepted_nodes=outcome.accepted_nodes,
                    bonus_token=outcome.bonus_token, features=feature, sequence_id=seq.sequence_id,
                ))
            except Exception as err:  # this row's feedback failed; its tokens are committed, it ends here
                out[seq] = err

    def _count(self, seq: Sequence, tree: TokenTree, outcome: Outcome, emitted: list[int], times) -> None:
        stats = seq.result.stats
        stats.steps += 1
        stats.tree_sizes.append(len(tree))
        stats.max_tree_width = max(stats.max_tree_width, max(map(len, tree.children())))
        stats.accepted_lengths.append(len(emitted))
        stats.drafted_tokens += len(tree)
        stats.draft_seconds += times.draft
        stats.verify_seconds += times.verify
        stats.host_seconds += times.overhead
        sources = tree.sources.numpy()
        proposed = np.bincount(sources, minlength=len(self.engine.source_names))
        accepted = np.bincount(sources[list(outcome.accepted_nodes)], minlength=len(proposed))
        metrics = self.engine.metrics
        for source in np.flatnonzero(proposed):
            name = self.engine.source_names.get(int(source), str(source))
            entry = stats.per_drafter.setdefault(name, {"proposed": 0, "accepted": 0})
            entry["proposed"] += int(proposed[source])
            entry["accepted"] += int(accepted[source])
            metrics.drafted[name] = metrics.drafted.get(name, 0) + int(proposed[source])
            metrics.accepted[name] = metrics.accepted.get(name, 0) + int(accepted[source])
