"""`TokenTree`: a draft token tree hanging below an implicit root.

Index spaces used throughout specdec:

* ``node_idx`` (0..n-1) indexes the draft nodes of a tree. ``parents[node_idx]`` is another
  ``node_idx`` or ``-1`` for a child of the root.
* ``slot_idx`` (0..n) indexes the verify forward's query tokens ``[root] + nodes``: slot 0 is the
  root (the last committed token, whose KV is not in the cache yet) and slot ``node_idx + 1`` is
  draft node ``node_idx``.

A tree is pure data (CPU tensors: fields given on another device are copied to the host); it
never holds model state. A tree whose tokens were *drawn* from a drafter's distributions carries
them (`DraftDraws`, the one field that stays on the model's device) for lossless rejection
sampling; transforms that keep a node keep its draw, `merge` drops them (the delta rule needs none).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from trees.bits import pack_rows

ROOT = -1


def _as_long(name: str, values) -> torch.Tensor:
    tensor = torch.as_tensor(values).detach().cpu()
    if tensor.dim() != 1:
        raise ValueError(f"{name} must be one-dimensional, got shape {tuple(tensor.shape)}")
    if tensor.numel() and (tensor.is_floating_point() or tensor.is_complex() or tensor.dtype == torch.bool):
        raise ValueError(f"{name} must hold integers, got dtype {tensor.dtype}")
    return tensor.to(torch.long)


@dataclass(frozen=True)
class DraftDraws:
    """The distributions a drafter drew a tree's tokens from.

    Attributes:
        probs: ``[m, V]`` float32 on the drafter's device: row r is a distribution over the vocabulary.
        rows: ``[n]`` int64 (host) the row of ``probs`` each node's token was drawn from (its parent's),
            the children of one parent drawn in ``rank`` order without replacement.
    """

    probs: torch.Tensor
    rows: torch.Tensor

    def select(self, keep: np.ndarray) -> "DraftDraws":
        return DraftDraws(self.probs, torch.from_numpy(self.rows.numpy()[keep]))


@dataclass(frozen=True)
class TokenTree:
    """A token tree in topological order (every parent precedes its children).

    Attributes:
        tokens: ``[n]`` int64 token ids of the draft nodes.
        parents: ``[n]`` int64 ``node_idx`` of each node's parent, ``-1`` for children of the root.
        scores: ``[n]`` float32 log of the estimated probability that the node is reached and
            accepted (higher is better; a child never scores above its parent when built by
            specdec's drafters).
        sources: ``[n]`` int8 id of the drafter that proposed each node (for statistics).
        ranks: ``[n]`` int64 the node's rank among the candidates its drafter had for that parent
            (Token Recycling: the successor column; default: rank among siblings by score). The
            acceptance statistics are kept per (depth, rank).
        draws: the `DraftDraws` the tokens were drawn from, or None (tokens chosen, not drawn).
    """

    tokens: torch.Tensor
    parents: torch.Tensor
    scores: torch.Tensor = None  # type: ignore[assignment]
    sources: torch.Tensor = None  # type: ignore[assignment]
    ranks: torch.Tensor = None  # type: ignore[assignment]
    draws: DraftDraws | None = None
    _cache: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        tokens = _as_long("tokens", self.tokens)
        parents = _as_long("parents", self.parents)
        n = tokens.numel()
        if parents.numel() != n:
            raise ValueError(f"parents has {parents.numel()} entries but tokens has {n}")
        scores = torch.zeros(n) if self.scores is None else torch.as_tensor(self.scores).detach().cpu().float()
        sources = torch.zeros(n, dtype=torch.int8) if self.sources is None else torch.as_tensor(self.sources).cpu()
        if scores.shape != (n,):
            raise ValueError(f"scores must have shape ({n},), got {tuple(scores.shape)}")
        if sources.shape != (n,):
            raise ValueError(f"sources must have shape ({n},), got {tuple(sources.shape)}")
        if n:  # checked on numpy views: a tree is small, and torch's per-op cost dominates here
            if np.isnan(scores.numpy()).any():
                raise ValueError("scores must not be NaN")
            if (tokens.numpy() < 0).any():
                raise ValueError("tokens must be non-negative token ids")
            parent_idx = parents.numpy()
            if (parent_idx < ROOT).any() or (parent_idx >= np.arange(n)).any():
                raise ValueError("parents[i] must be -1 (root) or the index of an earlier node")
        object.__setattr__(self, "tokens", tokens)
        object.__setattr__(self, "parents", parents)
        object.__setattr__(self, "scores", scores)
        object.__setattr__(self, "sources", sources.to(torch.int8))
        if self.ranks is None:
            ranks = torch.from_numpy(sibling_ranks(parents.numpy(), scores.numpy()))
        else:
            ranks = _as_long("ranks", self.ranks)
            if ranks.shape != (n,):
                raise ValueError(f"ranks must have shape ({n},), got {tuple(ranks.shape)}")
            if n and (ranks.numpy() < 0).any():
                raise ValueError("ranks must be non-negative")
        object.__setattr__(self, "ranks", ranks)
        if self.draws is not None:
            rows = _as_long("draws.rows", self.draws.rows)
            if rows.shape != (n,) or (n and (rows.numpy() < 0).any()):
                raise ValueError(f"draws.rows must hold a row index >= 0 for each of the {n} nodes")
            if n and int(rows.max()) >= self.draws.probs.shape[0]:
                raise ValueError(f"draws.rows points past the {self.draws.probs.shape[0]} rows of draws.probs")
            object.__setattr__(self, "draws", DraftDraws(self.draws.probs, rows))

    @classmethod
    def _derived(cls, tokens: torch.Tensor, parents: torch.Tensor, scores: torch.Tensor, sources: torch.Tensor,
                 ranks: torch.Tensor, draws: DraftDraws | None = None) -> "TokenTree":
        """A tree built by a transform of valid trees (`select`, `merge`): already checked, so the
        field checks of ``__init__`` are skipped (they cost more than the transform)."""
        tree = object.__new__(cls)
        for name, value in (("tokens", tokens), ("parents", parents), ("scores", scores), ("sources", sources),
                            ("ranks", ranks), ("draws", draws), ("_cache", {})):
            object.__setattr__(tree, name, value)
        return tree

    @classmethod
    def empty(cls) -> "TokenTree":
        """A tree with no draft nodes: verifying it is one step of plain decoding."""
        return cls(torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long))

    @classmethod
    def chain(cls, tokens, scores=None, source: int = 0) -> "TokenTree":
        """A single path: node i is the parent of node i+1."""
        tokens = _as_long("tokens", tokens)
        n = tokens.numel()
        return cls(tokens, torch.arange(n) - 1, scores, torch.full((n,), source, dtype=torch.int8))

    def __len__(self) -> int:
        return self.tokens.numel()

    # ------------------------------------------------------------------ structure
    @property
    def depths(self) -> torch.Tensor:
        """``[n]`` depth of each node; children of the root have depth 1."""
        if "depths" not in self._cache:
            parents = self.parents.tolist()
            depths: list[int] = []
            for parent in parents:
                depths.append(1 if parent == ROOT else depths[parent] + 1)
            self._cache["depths"] = torch.tensor(depths, dtype=torch.long)
        return self._cache["depths"]

    @property
    def max_depth(self) -> int:
        return int(self.depths.numpy().max()) if len(self) else 0

    def children(self) -> list[list[int]]:
        """``children()[slot_idx]`` lists the child ``node_idx`` of each slot (slot 0 = root)."""
        if "children" not in self._cache:
            kids: list[list[int]] = [[] for _ in range(len(self) + 1)]
            for node_idx, parent in enumerate(self.parents.tolist()):
                kids[parent + 1].append(node_idx)
            self._cache["children"] = kids
        return self._cache["children"]

    def ancestor_mask(self) -> torch.Tensor:
        """``[n+1, n+1]`` bool over slots: ``mask[i, j]`` iff slot j is slot i or one of its ancestors.

        The root (slot 0) is an ancestor of every slot.
        """
        if "ancestors" not in self._cache:
            n = len(self)
            mask = np.zeros((n + 1, n + 1), dtype=bool)
            mask[:, 0] = True
            for node_idx, parent in enumerate(self.parents.tolist()):
                slot = node_idx + 1
                mask[slot] = mask[parent + 1]
                mask[slot, slot] = True
            self._cache["ancestors"] = torch.from_numpy(mask)
        return self._cache["ancestors"]

    def packed_ancestor_mask(self) -> torch.Tensor:
        """`ancestor_mask` bit-packed: ``[n+1, ceil((n+1) / 64)]`` int64 (see `trees.bits.pack_rows`)."""
        if "packed_ancestors" not in self._cache:
            self._cache["packed_ancestors"] = pack_rows(self.ancestor_mask())
        return self._cache["packed_ancestors"]

    def position_ids(self, prefix_len: int) -> torch.Tensor:
        """``[1, n+1]`` positions of ``[root]+nodes``: ``prefix_len + depth``."""
        return (prefix_len + torch.cat([torch.zeros(1, dtype=torch.long), self.depths]))[None]

    def path_to(self, node_idx: int) -> list[int]:
        """``node_idx`` of the nodes from the root's child down to ``node_idx``."""
        path = [node_idx]
        parents = self.parents.tolist()
        while parents[path[-1]] != ROOT:
            path.append(parents[path[-1]])
        return path[::-1]

    # ------------------------------------------------------------------ transforms
    def select(self, keep) -> "TokenTree":
        """Sub-tree of the nodes where ``keep`` (bool ``[n]``, numpy or torch) is true; must be
        ancestor-closed."""
        keep = np.asarray(keep, dtype=bool)
        if keep.shape != (len(self),):
            raise ValueError(f"keep must have shape ({len(self)},), got {tuple(keep.shape)}")
        parents = self.parents.numpy()
        kept_parents = parents[keep]
        if not keep[kept_parents[kept_parents >= 0]].all():
            raise ValueError("keep is not ancestor-closed: a kept node has a dropped parent")
        new_index = np.cumsum(keep) - 1
        new_parents = np.where(kept_parents >= 0, new_index[np.maximum(kept_parents, 0)], ROOT)
        tokens, scores, sources, ranks = (torch.from_numpy(field.numpy()[keep])
                                          for field in (self.tokens, self.scores, self.sources, self.ranks))
        draws = None if self.draws is None else self.draws.select(keep)
        tree = TokenTree._derived(tokens, torch.from_numpy(new_parents), scores, sources, ranks, draws)
        if "depths" in self._cache:  # an ancestor-closed subset keeps every depth
            tree._cache["depths"] = torch.from_numpy(self._cache["depths"].numpy()[keep])
        return tree

    def with_scores(self, scores: torch.Tensor, source: int | None = None) -> "TokenTree":
        """The same tree with ``scores`` (``[n]`` float32, no NaN) and, if given, every node's
        source set to ``source``. Tokens, parents and ``ranks`` are kept as they are (ranks that
        were derived from the old scores are not re-derived), and so is every structure derived
        from them (depths, children, ancestor masks)."""
        scores = torch.as_tensor(scores).detach().cpu().float()
        if scores.shape != (len(self),):
            raise ValueError(f"scores must have shape ({len(self)},), got {tuple(scores.shape)}")
        if np.isnan(scores.numpy()).any():
            raise ValueError("scores must not be NaN")
        sources = self.sources if source is None else torch.full((len(self),), source, dtype=torch.int8)
        tree = TokenTree._derived(self.tokens, self.parents, scores, sources, self.ranks, self.draws)
        tree._cache.update(self._cache)  # structure only: nothing cached depends on scores
        return tree

    def prune(self, budget: int) -> "TokenTree":
        """Keep the ``budget`` best-scored nodes, ancestor-closed.

        Nodes are taken best score first; a node is only taken after its parent (a node whose score
        exceeds its parent's waits for the parent), so the result is always a valid tree.
        """
        if not isinstance(budget, int) or isinstance(budget, bool) or budget < 0:
            raise ValueError(f"budget must be a non-negative int, got {budget!r}")
        n = len(self)
        if budget >= n:
            return self
        # Ancestor-closed top-N: rank nodes by the minimum score along their root path.
        effective, depths, parents = self.scores.numpy().copy(), self.depths.numpy(), self.parents.numpy()
        for depth in range(2, int(depths.max()) + 1):
            nodes = np.flatnonzero(depths == depth)
            effective[nodes] = np.minimum(effective[nodes], effective[parents[nodes]])
        # higher effective score first, then shallower, then earlier index
        order = np.lexsort((np.arange(n), depths, -effective))
        keep = np.zeros(n, dtype=bool)
        keep[order[:budget]] = True
        return self.select(torch.from_numpy(keep))


def merge(trees: list[TokenTree]) -> TokenTree:
    """Trie union of several trees below the same root.

    Equal tokens under the same parent become one node keeping the best score (and that node's
    source). The result lists nodes in the order they are first met, so parents precede children.
    """
    tokens: list[int] = []
    parents: list[int] = []
    scores: list[float] = []
    sources: list[int] = []
    ranks: list[int] = []
    index: dict[tuple[int, int], int] = {}
    for tree in trees:
        local_to_merged: list[int] = []
        columns = (tree.tokens, tree.parents, tree.scores, tree.sources, tree.ranks)
        for token, parent, score, source, rank in zip(*(column.tolist() for column in columns)):
            merged_parent = ROOT if parent == ROOT else local_to_merged[parent]
            key = (merged_parent, token)
            if key in index:
                merged = index[key]
                if score > scores[merged]:
                    scores[merged], sources[merged], ranks[merged] = score, source, rank
            else:
                merged = len(tokens)
                index[key] = merged
                tokens.append(token)
                parents.append(merged_parent)
                scores.append(score)
                sources.append(source)
                ranks.append(rank)
            local_to_merged.append(merged)
    return TokenTree._derived(
        torch.tensor(tokens, dtype=torch.long),
        torch.tensor(parents, dtype=torch.long),
        torch.tensor(scores, dtype=torch.float32),
        torch.tensor(sources, dtype=torch.int8),
        torch.tensor(ranks, dtype=torch.long),
    )


def sibling_ranks(parents: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """``[n]`` rank of each node among its siblings by score (0 = best; ties by node order)."""
    n = len(parents)
    order = np.lexsort((np.arange(n), -scores, parents))  # grouped by parent, best score first
    grouped = parents[order]
    group_start = np.flatnonzero(np.r_[True, grouped[1:] != grouped[:-1]])  # first position of each parent's group
    positions = np.arange(n)
    ranks = np.empty(n, dtype=np.int64)
    ranks[order] = positions - group_start[np.searchsorted(group_start, positions, side="right") - 1]
    return ranks
