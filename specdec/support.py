"""What a model can do under tree verification, decided before any forward.

specdec verifies a tree in one forward by giving the model ``position_ids`` (depth-based) and a
4D attention mask, and afterwards keeps only the accepted rows of an attention KV cache. A model
qualifies when all three reach its attention unchanged; otherwise `check_model` raises
`UnsupportedGeneration` naming the reason. Models with learned absolute positions also have a
hard position limit, which `position_limit` reports so that deeper draft nodes are pruned.
"""

from __future__ import annotations

import torch


def position_limit(model) -> int | None:
    """The number of learned absolute positions (GPT-2's ``n_positions``), or None when positions
    are computed (RoPE and the like) and the model runs past ``max_position_embeddings``."""
    config = model.config.get_text_config(decoder=True)
    declared = {getattr(config, name, None) for name in ("max_position_embeddings", "n_positions", "n_ctx")}
    declared.discard(None)
    for name, module in model.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if isinstance(module, torch.nn.Embedding) and ("pos" in leaf or leaf == "wpe") \
                and module.num_embeddings in declared:
            return int(module.num_embeddings)
    return None
