"""Tensor parallelism: specdec on a target sharded by transformers' own tensor parallelism.

The target is loaded with ``from_pretrained(..., tp_plan="auto")`` across the ranks of the
current ``torchrun`` job (gloo on CPU, NCCL on GPUs). transformers shards attention heads and
MLPs, and gathers the LM head's output, so every rank holds the same full-vocabulary logits.
The decode loop runs on every rank on identical inputs: drafters are deterministic given the same
history, so every rank proposes the same tree; acceptance reads the replicated logits, so every
rank commits the same tokens and the drafters learn the same things. Only the scheduler depends
on rank-local timings, so rank 0's selection is broadcast (`agree_on_selections`): one small
collective per step, and every rank verifies the same nodes.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

from trees import TokenTree


class TensorParallelError(ValueError):
    """Tensor parallelism asked for where it cannot run (no torchrun job, heads not divisible)."""


def tp_world() -> tuple[int, int]:
    """``(rank, world size)`` of the current ``torchrun`` job; raises `TensorParallelError` outside one."""
    if "WORLD_SIZE" not in os.environ or "RANK" not in os.environ:
        raise TensorParallelError("tensor_parallel=True needs a torchrun job (e.g. torchrun --nproc-per-node 2 ...): "
                                  "RANK and WORLD_SIZE are not set")
    return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])


def init_group(device: str | torch.device) -> None:
    """Join the job's process group (NCCL for CUDA devices, gloo otherwise) unless already joined."""
    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.device(device).type == "cuda" else "gloo")


def check_shardable(config, world: int) -> None:
    """Raise `TensorParallelError` unless ``world`` divides the query and key-value head counts."""
    text = config.get_text_config(decoder=True)
    heads = getattr(text, "num_attention_heads", None)
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    if heads is None or heads % world or kv_heads % world:
        fitting = [n for n in range(1, 9) if heads and not heads % n and not kv_heads % n]
        raise TensorParallelError(f"cannot shard {type(text).__name__} across {world} ranks: the rank count must "
                                  f"divide the {heads} query heads and the {kv_heads} key-value heads "
                                  f"(try one of {fitting})")


def is_sharded(model) -> bool:
    """Whether ``model`` was loaded across several ranks (transformers' tensor parallelism)."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1 and \
        getattr(model, "tp_size", None) not in (None, 1)


def agree_on_selections(trees: list[TokenTree]) -> list[TokenTree]:
    """Rank 0's ``trees`` on every rank (the scheduler's choice depends on rank-local timings)."""
    fields = [[t.tokens, t.parents, t.scores, t.sources, t.ranks] for t in trees] if dist.get_rank() == 0 else None
    box = [fields]
    dist.broadcast_object_list(box, src=0)
    return [TokenTree(tokens, parents, scores, sources, ranks) for tokens, parents, scores, sources, ranks in box[0]]
