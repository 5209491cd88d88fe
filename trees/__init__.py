"""Token trees: pure data structures for speculative decoding (no model state)."""

from trees.bits import pack_rows, unpack_rows
from trees.masks import additive_mask
from trees.shapes import DEFAULT_RANK_PRIOR, TreeShape, best_first, chain, expected_accepted, sequoia, wide_shallow
from trees.tree import ROOT, TokenTree, merge

__all__ = [
    "DEFAULT_RANK_PRIOR",
    "ROOT",
    "additive_mask",
    "TokenTree",
    "TreeShape",
    "best_first",
    "chain",
    "expected_accepted",
    "sequoia",
    "merge",
    "pack_rows",
    "unpack_rows",
    "wide_shallow",
]
