"""Token trees: pure data structures for speculative decoding (no model state)."""

from trees.bits import pack_rows, unpack_rows
from trees.masks import masks_by_layer_type, sliding_window_of, tree_attention_mask
from trees.shapes import DEFAULT_RANK_PRIOR, TreeShape, best_first
from trees.tree import ROOT, DraftDraws, TokenTree, merge

__all__ = [
    "DEFAULT_RANK_PRIOR",
    "DraftDraws",
    "ROOT",
    "TokenTree",
    "TreeShape",
    "best_first",
    "sliding_window_of",
    "tree_attention_mask",
    "masks_by_layer_type",
    "merge",
    "pack_rows",
    "unpack_rows",
]
