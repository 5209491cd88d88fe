"""Token trees: pure data structures for speculative decoding (no model state)."""

from trees.bits import pack_rows, unpack_rows
from trees.masks import masks_by_layer_type, sliding_window_of, tree_attention_mask
from trees.shapes import DEFAULT_RANK_PRIOR, TreeShape, best_first, chain, expected_accepted, sequoia, wide_shallow
from trees.tree import ROOT, TokenTree, merge

__all__ = [
    "DEFAULT_RANK_PRIOR",
    "ROOT",
    "TokenTree",
    "TreeShape",
    "best_first",
    "chain",
    "expected_accepted",
    "sequoia",
    "sliding_window_of",
    "tree_attention_mask",
    "masks_by_layer_type",
    "merge",
    "pack_rows",
    "unpack_rows",
    "wide_shallow",
]
