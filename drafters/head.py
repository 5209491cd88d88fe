"""The ``head`` drafter: a small learned head that reads the target's own features.

The head (`drafters.head_net.DraftHead`, trained by ``specdec distill``) predicts the target's next
feature, what its LM head reads, from the features of the latest committed positions and the
tokens that followed them (EAGLE's layout: one attention block over a window of past entries);
read out through the target's frozen LM head restricted to the ``K`` most frequent tokens of the
distillation text (FR-Spec), it gives a distribution over the token after next. Fed its own
predicted features it drafts deeper.

Drafting (EAGLE-2's dynamic tree): the first depth reads the entry of the root; each further depth
runs one batched head forward over the ``beam`` best frontier nodes, each offers its ``top_k``
children scored by cumulative log-probability, and the best ``budget`` nodes overall are kept.
Depths stop early (`DepthRule`): a depth is drafted only while its measured acceptance, in
seconds of decoding it saves, exceeds its measured draft time, and the whole draft stays within
`DRAFT_SHARE` of a step; a head whose first depth does not pay drafts only now and then, to
keep measuring. Under sampling the head draws a fixed-shape tree instead (`drafters.drawing`):
each depth's children are drawn without replacement from the head's distribution (zero outside
the readout, after the request's warpers), for the target's rejection sampling. It all runs on
the model's device; the finished tree comes to the host in one copy.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from drafters.base import DraftContext, Drafter, DraftSampling, VerifyFeedback
from drafters.depth_rule import DRAFT_SHARE, DepthRule, own_path_depth
from drafters.drawing import DrawPlan, draft_generator, draw_children
from drafters.head_net import DraftHead, attend
from trees import TokenTree

HEAD_KIND = "specdec-head"
HEAD_VERSION = 2  # 2: the attention head over a window of entries
FINGERPRINT_ROWS = 4  # embedding rows whose values identify the target's weights
FINGERPRINT_COLS = 16
MAX_OPEN_SEQUENCES = 64  # sequences whose windows are kept at once


def model_identity(model) -> dict:
    """What a head file records about its target: vocabulary, feature size, a hash of the
    architecture's config and a few embedding values (which tell fine-tunes of one config apart)."""
    config = model.config.to_dict()
    keys = ("model_type", "hidden_size", "num_hidden_layers", "intermediate_size", "num_attention_heads",
            "num_key_value_heads", "vocab_size", "rope_theta", "tie_word_embeddings")
    canonical = json.dumps({k: config.get(k) for k in keys}, sort_keys=True, default=str)
    weight = model.get_input_embeddings().weight
    rows = weight[:FINGERPRINT_ROWS, :FINGERPRINT_COLS].detach().float().cpu().clone()  # not a view of the table
    return {
        "config_hash": hashlib.sha256(canonical.encode()).hexdigest(),
        "vocab_size": int(model.get_output_embeddings().weight.shape[0]),
        "hidden_size": int(weight.shape[1]),
        "fingerprint": rows,
    }


def default_head_path(model) -> Path:
    """Where ``specdec distill`` saves a model's head by default and ``auto`` looks for it:
    ``$SPECDEC_HOME`` (default ``~/.cache/specdec``) ``/heads/<model type>-<config hash>.pt``."""
    import os

    home = Path(os.environ.get("SPECDEC_HOME") or Path.home() / ".cache" / "specdec")
    identity = model_identity(model)
    return home / "heads" / f"{model.config.model_type}-{identity['config_hash'][:16]}.pt"


@dataclass
class HeadFile:
    """A trained head and what it was trained for.

    Attributes:
        head: the trained `DraftHead` (fp32, CPU).
        readout_ids: ``[K]`` int64 vocabulary ids the head reads out (FR-Spec), EOS included.
        identity: the target's `model_identity`.
        info: training figures (tokens, seconds, ...), for reports.
    """

    head: DraftHead
    readout_ids: torch.Tensor
    identity: dict
    info: dict

    def save(self, path) -> None:
        """Write the head (fp32 weights, ``torch.save``) to ``path``, creating its directory."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"kind": HEAD_KIND, "version": HEAD_VERSION, "hidden": self.head.hidden, "inner": self.head.inner,
                    "heads": self.head.heads, "window": self.head.window,
                    "weights": {k: v.detach().float().cpu() for k, v in self.head.state_dict().items()},
                    "readout_ids": self.readout_ids.cpu(), "identity": self.identity,
                    "info": json.dumps(self.info)}, path)

    @classmethod
    def load(cls, path, model=None) -> "HeadFile":
        """Read and validate a head file; with ``model``, refuse a head trained for another model.

        Raises FileNotFoundError for a missing file and `drafters.state.StateError` (a
        ValueError) for anything malformed or made for another target.
        """
        from drafters.state import StateError, array_field, field, int_field, read_state_file

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"head file {path} does not exist; train one with `specdec distill`")
        payload = read_state_file(path, HEAD_KIND)
        where = f"head file {path}"
        if int_field(payload, "version", where) != HEAD_VERSION:
            raise StateError(f"{where}: version {payload['version']} is not {HEAD_VERSION}; "
                             "retrain with `specdec distill`")
        hidden = int_field(payload, "hidden", where, low=1, high=1 << 16)
        inner = int_field(payload, "inner", where, low=1, high=1 << 18)
        heads = int_field(payload, "heads", where, low=1, high=hidden)
        window = int_field(payload, "window", where, low=1, high=1 << 12)
        if hidden % heads or (hidden // heads) % 2:
            raise StateError(f"{where}: hidden size {hidden} does not split into {heads} heads of an even size")
        identity = field(payload, "identity", where)
        vocab = int_field(identity, "vocab_size", f"{where}: identity", low=1)
        if int_field(identity, "hidden_size", f"{where}: identity", low=1) != hidden:
            raise StateError(f"{where}: identity hidden_size differs from the head's hidden size {hidden}")
        if not isinstance(field(identity, "config_hash", f"{where}: identity"), str):
            raise StateError(f"{where}: identity config_hash must be a string")
        array_field(identity, "fingerprint", f"{where}: identity", shape=(None, None))
        readout = array_field(payload, "readout_ids", where, shape=(None,), kind="int", low=0, high=vocab - 1)
        if readout.size == 0 or len(np.unique(readout)) != readout.size:
            raise StateError(f"{where}: readout_ids must be non-empty and distinct")
        head = DraftHead(hidden, inner, heads, window)
        weights = field(payload, "weights", where)
        expected = head.state_dict()
        if not isinstance(weights, dict) or set(weights) != set(expected):
            raise StateError(f"{where}: weights must hold exactly {sorted(expected)}")
        for name, tensor in expected.items():
            array_field(weights, name, f"{where}: weights", shape=tuple(tensor.shape))
        head.load_state_dict({k: weights[k].float() for k in expected})
        info = payload.get("info", "{}")
        try:
            info = json.loads(info) if isinstance(info, str) else {}
        except json.JSONDecodeError:
            info = {}
        loaded = cls(head.eval(), torch.from_numpy(readout), identity, info if isinstance(info, dict) else {})
        if model is not None:
            loaded.check_target(model, path)
        return loaded

    def check_target(self, model, path="the head") -> None:
        """A `StateError` unless ``model`` is the target this head was trained for."""
        from drafters.state import StateError

        mine = model_identity(model)
        theirs = self.identity
        if mine["vocab_size"] != theirs["vocab_size"] or mine["hidden_size"] != theirs["hidden_size"] \
                or mine["config_hash"] != theirs["config_hash"]:
            raise StateError(f"{path} was trained for another model (vocabulary {theirs['vocab_size']}, features "
                             f"{theirs['hidden_size']}, config {theirs['config_hash'][:12]}); this model has "
                             f"{mine['vocab_size']}, {mine['hidden_size']}, {mine['config_hash'][:12]}: "
                             "train a head for it with `specdec distill`")
        saved = torch.as_tensor(theirs["fingerprint"]).float()
        if saved.shape != mine["fingerprint"].shape or not torch.allclose(saved, mine["fingerprint"], rtol=2e-2,
                                                                          atol=2e-3):
            raise StateError(f"{path} was trained for a model of the same architecture but other weights "
                             "(embedding values differ): train a head for this one with `specdec distill`")


@dataclass
class _Window:
    """One sequence's committed entries as the head sees them (device tensors)."""

    pending: list  # [e, h] features observed since the last draft, oldest first
    keys: torch.Tensor | None = None  # [1, H, <= window, d] rotated keys of the latest entries
    values: torch.Tensor | None = None  # [1, H, <= window, d]
    entries: int = 0  # the next entry's rotary position (entries made so far)
    last: tuple | None = None  # (entry [1, 1, h], query [1, H, 1, d], position) of the latest entry
    proposed: tuple | None = None  # (tokens, parents, drafted depths) of the last tree, host
    observed_at: float | None = None  # clock() of the last verified step's feedback


class HeadDrafter(Drafter):
    """Drafts with a trained `HeadFile` from the target's features at the latest committed slots.

    Args:
        head_file: the trained head (checked against ``model``).
        model: the target (its embeddings and LM head are read, frozen, on its device).
        top_k: children offered by each expanded node.
        beam: frontier nodes expanded per depth.
        max_depth: deepest drafted node.
        draft_share: the most a draft may take of a step (`DepthRule`'s ``share``).
        clock: seconds for the depth rule's measurements (``time.perf_counter``).
    """

    name = "head"

    def __init__(self, head_file: HeadFile, model, top_k: int = 4, beam: int = 4, max_depth: int = 6,
                 draft_share: float = DRAFT_SHARE, clock=None) -> None:
        if top_k < 1 or beam < 1 or max_depth < 1:
            raise ValueError("top_k, beam and max_depth must be >= 1")
        if not 0 < draft_share <= 1:
            raise ValueError(f"draft_share must be in (0, 1], got {draft_share}")
        head_file.check_target(model)
        device = model.device
        self.head_file = head_file
        self.head = head_file.head.to(device=device, dtype=torch.float32).eval()
        self.needs_features = self.head.window
        self.embed = model.get_input_embeddings()
        self.readout_ids = head_file.readout_ids.to(device)  # [K]
        self.readout = model.get_output_embeddings().weight.detach()[self.readout_ids].float()  # [K, h]
        self.top_k, self.beam, self.max_depth = top_k, beam, max_depth
        self.draft_share = draft_share
        self.depths = DepthRule(max_depth, draft_share)
        self.clock = clock or time.perf_counter
        self.logits_size = int(model.get_output_embeddings().weight.shape[0])
        self._windows: dict[int, _Window] = {}
        self._plans: dict[int, DrawPlan] = {}  # by budget: the shapes of drawn trees

    def observe(self, feedback: VerifyFeedback) -> None:
        if feedback.features is None or not len(feedback.features):
            return
        window = self._windows.get(feedback.sequence_id)
        if window is None:
            while len(self._windows) >= MAX_OPEN_SEQUENCES:  # sequences never ended: forget the oldest
                self._windows.pop(next(iter(self._windows)))
            window = self._windows[feedback.sequence_id] = _Window([])
        window.pending.append(feedback.features.float())
        now = self.clock()
        if feedback.tree is not None:
            if window.observed_at is not None:
                self.depths.record_step(now - window.observed_at, len(feedback.features))
            if window.proposed is not None and len(feedback.tree):
                tokens, parents, depth = window.proposed
                accepted = feedback.tree.tokens[list(feedback.accepted_nodes)].tolist()
                verified_depth = min(depth, feedback.tree.max_depth)  # pruning may cut the head's depths
                self.depths.record_outcome(verified_depth, own_path_depth(tokens, parents, accepted))
        window.proposed = None
        window.observed_at = now

    def end_sequence(self, sequence_id: int) -> None:
        self._windows.pop(sequence_id, None)

    def reset(self) -> None:
        self._windows.clear()
        self.depths = DepthRule(self.max_depth, self.draft_share)

    def _extend(self, window: _Window, history: np.ndarray) -> None:
        """Turn the pending features into entries, paired with the tokens that followed them (the
        tail of ``history``, the root last); keep the keys of the latest ``window`` entries."""
        features = torch.cat(window.pending)[-self.head.window :]  # [e, h]
        window.pending = []
        tokens = torch.from_numpy(np.ascontiguousarray(history[-len(features) :])).to(features.device)  # [e]
        entries = self.head.entries(features, self.embed(tokens).float())[None]  # [1, e, h]
        positions = torch.arange(window.entries, window.entries + len(features), device=features.device)
        q, k, v = self.head.project(entries, positions)
        keep = self.head.window
        window.keys = k if window.keys is None else torch.cat([window.keys, k], dim=2)[:, :, -keep:]
        window.values = v if window.values is None else torch.cat([window.values, v], dim=2)[:, :, -keep:]
        window.entries += len(features)
        window.last = (entries[:, -1:], q[:, :, -1:], window.entries - 1)

    def read_out(self, predicted: torch.Tensor) -> torch.Tensor:
        """``[m, K]`` log-probabilities over the readout tokens of predicted features ``[m, h]``."""
        return torch.log_softmax(predicted @ self.readout.T, dim=-1)

    @torch.inference_mode()
    def propose(self, ctx: DraftContext, budget: int) -> TokenTree:
        window = self._windows.get(ctx.sequence_id)
        if budget <= 0 or window is None:
            return TokenTree.empty()
        if window.pending and len(ctx.token_ids) >= sum(len(f) for f in window.pending):
            self._extend(window, ctx.token_ids)
        if window.last is None:
            return TokenTree.empty()
        if ctx.sampling is not None:
            return self._drawn(window, budget, ctx.sampling)
        device = self.readout.device
        entry, query, position = window.last
        empty = window.keys.new_zeros(*query.shape[:3], 0, query.shape[-1])  # [1, H, 1, 0, d]
        chain_k = chain_v = empty  # [f, H, 1, J, d]: the frontier's chain entries
        frontier_nodes = torch.full((1,), -1, dtype=torch.long, device=device)  # node_idx of the frontier
        frontier_scores = torch.zeros(1, device=device)
        positions = torch.arange(position + 1, position + self.max_depth, device=device)  # chain entries'
        parts, drafted, spent, depth = [], 0, 0.0, 0
        width = min(self.top_k, self.readout_ids.numel())  # children drafted per frontier node
        scores = child_tokens = None  # [f*width] device: the candidates of the depth above
        while depth < min(self.max_depth, budget) and self.depths.should_draft(depth + 1, spent):
            depth += 1
            started = self.clock()
            if depth == 1:
                predicted = self.head.finish(entry, attend(query, window.keys, window.values, None, empty, empty))[:, 0]
            else:  # expand the best frontier nodes of the depth above
                best = scores.topk(min(self.beam, scores.numel()))
                parent_of = best.indices // width
                tokens, frontier_scores = child_tokens[best.indices], best.values
                frontier_nodes = drafted + best.indices
                drafted += scores.numel()
                entries = self.head.entries(predicted[parent_of], self.embed(tokens).float())[:, None]  # [f, 1, h]
                q, k_new, v_new = self.head.project(entries, positions[depth - 2 : depth - 1])
                chain_k = torch.cat([chain_k[parent_of], k_new.unsqueeze(3)], dim=3)
                chain_v = torch.cat([chain_v[parent_of], v_new.unsqueeze(3)], dim=3)
                attended = attend(q, window.keys, window.values, None, chain_k, chain_v)
                predicted = self.head.finish(entries, attended)[:, 0]  # [f, h]
            logp = self.read_out(predicted)  # [f, K]
            top = logp.topk(width, dim=-1)
            scores = (frontier_scores[:, None] + top.values).flatten()  # [f*k]
            child_tokens = self.readout_ids[top.indices].flatten()
            parents = frontier_nodes[:, None].expand(-1, width).flatten()
            ranks = torch.arange(width, device=device).repeat(len(frontier_nodes))
            parts.append(torch.stack([child_tokens.double(), parents.double(), scores.double(), ranks.double()]))
            seconds = self.clock() - started
            self.depths.record_depth(depth, seconds)
            spent += seconds
        if not parts:
            return TokenTree.empty()
        packed = np.asarray(torch.cat(parts, dim=1).tolist())  # [4, n]: the tree's one copy to the host
        tree = TokenTree(torch.from_numpy(packed[0].astype(np.int64)), torch.from_numpy(packed[1].astype(np.int64)),
                         torch.from_numpy(packed[2].astype(np.float32)),
                         torch.full((packed.shape[1],), self.source_id, dtype=torch.int8),
                         torch.from_numpy(packed[3].astype(np.int64)))
        window.proposed = (tree.tokens.numpy(), tree.parents.numpy(), depth)
        return tree.prune(budget) if len(tree) > budget else tree

    def _drawn(self, window: _Window, budget: int, sampling: DraftSampling) -> TokenTree:
        """A `DrawPlan` tree (sampling): depth by depth, one head forward over the nodes whose
        children are drawn, while the depth rule lets the head draft that depth."""
        if budget not in self._plans:
            self._plans[budget] = DrawPlan(budget, self.max_depth, self.top_k)
        plan = self._plans[budget]
        device = self.readout.device
        generator = draft_generator(device, sampling.seed)
        arrays = plan.on(device)
        entry, query, position = window.last
        empty = window.keys.new_zeros(*query.shape[:3], 0, query.shape[-1])  # [1, H, 1, 0, d]
        chain_k = chain_v = empty  # [r, H, 1, J, d]: the chain entries of the rows' nodes
        positions = torch.arange(position + 1, position + self.max_depth, device=device)  # chain entries'
        probs: list[torch.Tensor] = []  # [r, V] per depth: the distributions its tokens are drawn from
        drawn: list[torch.Tensor] = []  # each depth's drawn tokens, in node order
        spent, reached = 0.0, 0
        for number, (depth, on) in enumerate(zip(plan.depths, arrays), start=1):
            if not self.depths.should_draft(number, spent):
                break
            started = self.clock()
            if number == 1:
                predicted = self.head.finish(entry, attend(query, window.keys, window.values, None, empty, empty))[:, 0]
            else:  # the nodes whose children are drawn here, as chain entries below their parents
                parent_of = on["expand_parents"]
                tokens = torch.cat(drawn)[on["expand"]]
                entries = self.head.entries(predicted[parent_of], self.embed(tokens).float())[:, None]  # [r, 1, h]
                q, k_new, v_new = self.head.project(entries, positions[number - 2 : number - 1])
                chain_k = torch.cat([chain_k[parent_of], k_new.unsqueeze(3)], dim=3)
                chain_v = torch.cat([chain_v[parent_of], v_new.unsqueeze(3)], dim=3)
                predicted = self.head.finish(entries, attend(q, window.keys, window.values, None, chain_k,
                                                             chain_v))[:, 0]  # [r, h]
            logits = predicted.new_full((len(predicted), self.logits_size), float("-inf"))
            logits[:, self.readout_ids] = predicted @ self.readout.T  # [r, V]: no mass outside the readout
            probs.append(torch.softmax(sampling.warp(logits), dim=-1))
            drawn.append(draw_children(probs[-1], on["local_rows"], on["ranks"], int(plan.ranks(depth).max()) + 1,
                                       generator))
            seconds = self.clock() - started
            self.depths.record_depth(number, seconds)
            spent, reached = spent + seconds, number
        if not drawn:
            return TokenTree.empty()
        tree = plan.tree(drawn, probs, self.source_id)  # the proposal's one copy to the host
        window.proposed = (tree.tokens.numpy(), tree.parents.numpy(), reached)
        return tree

    def explain(self) -> dict:
        """The depth rule's measurements: per-depth reach and draft milliseconds."""
        return self.depths.report()

    def state_dict(self) -> dict:
        return {"vocab_size": int(self.head_file.identity["vocab_size"])}

    def load_state_dict(self, state: dict) -> None:
        from drafters.state import check_vocab_size

        check_vocab_size(state, int(self.head_file.identity["vocab_size"]), "head drafter state")


def readout_coverage(counts: np.ndarray, sizes) -> dict[int, float]:
    """Fraction of ``counts`` (occurrences per vocabulary id) the ``K`` most frequent ids cover, per K."""
    order = np.sort(counts)[::-1]
    total = max(float(order.sum()), 1.0)
    return {int(k): float(order[: int(k)].sum()) / total for k in sizes}


def choose_readout(counts: np.ndarray, eos_ids, coverage: float = 0.95, smallest: int = 1024,
                   largest: int = 16384) -> torch.Tensor:
    """The readout ids: the fewest most-frequent ids (a power of two in [smallest, largest]) that
    cover ``coverage`` of ``counts``, EOS ids always included. ``[K]`` int64, sorted."""
    vocab = len(counts)
    k = min(smallest, vocab)
    while k < min(largest, vocab) and readout_coverage(counts, [k])[k] < coverage:
        k *= 2
    k = min(k, vocab)
    chosen = set(np.argsort(-counts, kind="stable")[:k].tolist())
    for eos in eos_ids:
        if 0 <= eos < vocab and eos not in chosen:
            chosen.discard(min(chosen, key=lambda t: (counts[t], -t)))
            chosen.add(int(eos))
    return torch.tensor(sorted(chosen), dtype=torch.long)

