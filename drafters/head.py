"""The ``head`` drafter: a small learned head that reads the target's own features.

The head (trained by ``specdec distill``) predicts the target's next feature, what its LM head
reads, from the current feature and the embedding of the next token; read out through the
target's frozen LM head restricted to the ``K`` most frequent tokens of the distilled data
(FR-Spec), it gives a distribution over the next-next token. Applied recurrently to its own
predicted features it drafts deeper (EAGLE's feature recurrence; this head is a residual MLP over
the fused inputs, with no attention and so no draft KV cache to keep in step).

Drafting (EAGLE-2's dynamic tree): from the feature at the slot that chose the root, each depth
runs one batched head forward over the ``beam`` best frontier nodes, each offers its ``top_k``
children scored by cumulative log-probability, and the best ``budget`` nodes overall are kept. It
all runs on the model's device; the finished tree comes to the host in one copy.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from drafters.base import DraftContext, Drafter, VerifyFeedback
from trees import TokenTree

HEAD_KIND = "specdec-head"
HEAD_VERSION = 1
FINGERPRINT_ROWS = 4  # embedding rows whose values identify the target's weights
FINGERPRINT_COLS = 16


class DraftHead(nn.Module):
    """``[m, h]`` feature and ``[m, h]`` next-token embedding -> ``[m, h]`` predicted next feature.

    Both inputs are RMS-normalised, fused by a linear layer, and refined by one residual SiLU MLP.
    """

    def __init__(self, hidden: int, inner: int) -> None:
        super().__init__()
        self.hidden, self.inner = hidden, inner
        self.feature_norm = nn.RMSNorm(hidden, eps=1e-6)
        self.token_norm = nn.RMSNorm(hidden, eps=1e-6)
        self.fuse = nn.Linear(2 * hidden, hidden)
        self.mlp_norm = nn.RMSNorm(hidden, eps=1e-6)
        self.up = nn.Linear(hidden, inner, bias=False)
        self.down = nn.Linear(inner, hidden, bias=False)

    def forward(self, features: torch.Tensor, embeddings: torch.Tensor) -> torch.Tensor:
        fused = self.fuse(torch.cat([self.feature_norm(features), self.token_norm(embeddings)], dim=-1))
        return fused + self.down(F.silu(self.up(self.mlp_norm(fused))))


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
            raise StateError(f"{where}: version {payload['version']} is not {HEAD_VERSION}; retrain with `specdec distill`")
        hidden = int_field(payload, "hidden", where, low=1, high=1 << 16)
        inner = int_field(payload, "inner", where, low=1, high=1 << 18)
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
        head = DraftHead(hidden, inner)
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


class HeadDrafter(Drafter):
    """Drafts with a trained `HeadFile` from the target's feature at the root's slot.

    Args:
        head_file: the trained head (checked against ``model``).
        model: the target (its embeddings and LM head are read, frozen, on its device).
        top_k: children offered by each expanded node.
        beam: frontier nodes expanded per depth.
        max_depth: deepest drafted node.
    """

    name = "head"
    needs_features = True

    def __init__(self, head_file: HeadFile, model, top_k: int = 4, beam: int = 4, max_depth: int = 6) -> None:
        if top_k < 1 or beam < 1 or max_depth < 1:
            raise ValueError("top_k, beam and max_depth must be >= 1")
        head_file.check_target(model)
        device = model.device
        self.head_file = head_file
        self.head = head_file.head.to(device=device, dtype=torch.float32).eval()
        self.embed = model.get_input_embeddings()
        self.readout_ids = head_file.readout_ids.to(device)  # [K]
        self.readout = model.get_output_embeddings().weight.detach()[self.readout_ids].float()  # [K, h]
        self.top_k, self.beam, self.max_depth = top_k, beam, max_depth
        self.source_id = 0
        self._feature: torch.Tensor | None = None  # [1, h] device: the feature at the root's slot

    def observe(self, feedback: VerifyFeedback) -> None:
        if feedback.feature is not None:
            self._feature = feedback.feature.float()

    def end_sequence(self, sequence_id: int) -> None:
        self._feature = None

    def reset(self) -> None:
        self._feature = None

    def log_probs(self, features: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One head step: ``[m, h]`` features and ``[m]`` next tokens (device) -> predicted features
        ``[m, h]`` and log-probabilities ``[m, K]`` over the readout tokens."""
        predicted = self.head(features, self.embed(tokens).float())
        return predicted, torch.log_softmax(predicted @ self.readout.T, dim=-1)

    @torch.inference_mode()
    def propose(self, ctx: DraftContext, budget: int) -> TokenTree:
        if budget <= 0 or self._feature is None:
            return TokenTree.empty()
        device = self.readout.device
        features = self._feature  # [1, h]
        tokens = torch.tensor([ctx.root], device=device)  # [1]
        frontier_nodes = torch.full((1,), -1, dtype=torch.long, device=device)  # node_idx of the frontier
        frontier_scores = torch.zeros(1, device=device)
        parts, drafted = [], 0
        for _ in range(min(self.max_depth, budget)):
            features, logp = self.log_probs(features, tokens)  # [f, h], [f, K]
            k = min(self.top_k, logp.shape[-1])
            top = logp.topk(k, dim=-1)
            scores = (frontier_scores[:, None] + top.values).flatten()  # [f*k]
            child_tokens = self.readout_ids[top.indices].flatten()
            parents = frontier_nodes[:, None].expand(-1, k).flatten()
            ranks = torch.arange(k, device=device).repeat(len(frontier_nodes))
            parts.append(torch.stack([child_tokens.double(), parents.double(), scores.double(), ranks.double()]))
            best = scores.topk(min(self.beam, scores.numel()))
            features = features[best.indices // k]
            tokens, frontier_scores = child_tokens[best.indices], best.values
            frontier_nodes = drafted + best.indices
            drafted += scores.numel()
        packed = np.asarray(torch.cat(parts, dim=1).tolist())  # [4, n]: the tree's one copy to the host
        tree = TokenTree(torch.from_numpy(packed[0].astype(np.int64)), torch.from_numpy(packed[1].astype(np.int64)),
                         torch.from_numpy(packed[2].astype(np.float32)),
                         torch.full((packed.shape[1],), self.source_id, dtype=torch.int8),
                         torch.from_numpy(packed[3].astype(np.int64)))
        return tree.prune(budget) if len(tree) > budget else tree

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

