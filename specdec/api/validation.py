"""Argument checks with errors that name the argument, raised before any model work starts."""

from __future__ import annotations

from typing import Sequence

import torch

from specdec.step.support import UnsupportedGeneration


def check_input_ids(input_ids, vocab_size: int) -> torch.Tensor:
    """``[L]`` int64 prompt ids from a ``[1, L]``/``[L]`` tensor or a list of ints."""
    if isinstance(input_ids, (list, tuple)):
        if not all(isinstance(t, int) and not isinstance(t, bool) for t in _flatten(input_ids)):
            raise TypeError("input_ids must hold integer token ids")
        input_ids = torch.tensor(input_ids, dtype=torch.long)
    if not isinstance(input_ids, torch.Tensor):
        raise TypeError(f"input_ids must be a LongTensor or a list of ints, got {type(input_ids).__name__}")
    if input_ids.is_floating_point() or input_ids.is_complex() or input_ids.dtype == torch.bool:
        raise TypeError(f"input_ids must hold integer token ids, got dtype {input_ids.dtype}")
    if input_ids.dim() == 2:
        if input_ids.shape[0] != 1:
            raise UnsupportedGeneration(
                f"input_ids has batch size {input_ids.shape[0]}; this path takes one sequence (batches go "
                "through specdec.api.batch_generate)"
            )
        input_ids = input_ids[0]
    elif input_ids.dim() != 1:
        raise ValueError(f"input_ids must have shape [1, L] or [L], got {tuple(input_ids.shape)}")
    if input_ids.numel() == 0:
        raise ValueError("input_ids is empty: the prompt needs at least one token")
    input_ids = input_ids.to(device="cpu", dtype=torch.long)
    low, high = int(input_ids.min()), int(input_ids.max())
    if low < 0 or high >= vocab_size:
        bad = low if low < 0 else high
        raise ValueError(f"input_ids holds token id {bad}, outside the model's vocabulary [0, {vocab_size})")
    return input_ids


def _flatten(values):
    for v in values:
        if isinstance(v, (list, tuple)):
            yield from _flatten(v)
        else:
            yield v


def check_attention_mask(attention_mask, prompt_len: int) -> torch.Tensor | None:
    """``[L]`` bool of the attended prompt tokens from a ``[1, L]`` / ``[L]`` 0/1 mask (``None`` if
    none was given). Masked tokens are padding, which `model.generate` never attends to."""
    if attention_mask is None:
        return None
    mask = torch.as_tensor(attention_mask)
    if mask.is_floating_point() or mask.is_complex():
        raise TypeError(f"attention_mask must hold 0/1 integers or booleans, got dtype {mask.dtype}")
    if mask.numel() != prompt_len or mask.dim() > 2 or (mask.dim() == 2 and mask.shape[0] != 1):
        raise ValueError(f"attention_mask has shape {tuple(mask.shape)} but the prompt has {prompt_len} tokens "
                         f"(expected [1, {prompt_len}])")
    mask = mask.reshape(-1).cpu()
    if not bool(((mask == 0) | (mask == 1)).all()):
        raise ValueError("attention_mask must hold only 0 and 1")
    return mask.bool()


def check_max_new_tokens(max_new_tokens) -> int:
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int):
        raise TypeError(f"max_new_tokens must be an int, got {type(max_new_tokens).__name__}")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    return max_new_tokens


def check_eos_token_id(eos_token_id, vocab_size: int) -> frozenset[int]:
    """The set of end-of-sequence ids from ``None``, an int or a list of ints."""
    if eos_token_id is None:
        return frozenset()
    ids: Sequence = [eos_token_id] if isinstance(eos_token_id, int) else eos_token_id
    if isinstance(ids, torch.Tensor):
        ids = ids.flatten().tolist()
    if not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
        raise TypeError(f"eos_token_id must be an int or a list of ints, got {eos_token_id!r}")
    return frozenset(i for i in ids if 0 <= i < vocab_size)


def check_generator(generator) -> torch.Generator | int | None:
    """A ``torch.Generator`` or an int seed, as given (sampling draws its key from it)."""
    if generator is None or isinstance(generator, torch.Generator):
        return generator
    if isinstance(generator, int) and not isinstance(generator, bool):
        return generator
    raise TypeError(f"generator must be a torch.Generator or an int seed, got {type(generator).__name__}")


def check_sampling_values(config) -> None:
    """Range checks on a merged ``GenerationConfig``, for the values its mode uses: the sampling
    values only when ``do_sample`` (transformers ignores them, with a warning, under greedy)."""
    if config.do_sample:
        if config.temperature is not None and not config.temperature > 0:
            raise ValueError(f"temperature must be > 0 when sampling, got {config.temperature}")
        if config.top_k is not None and (isinstance(config.top_k, bool) or not isinstance(config.top_k, int)
                                         or config.top_k < 0):
            raise ValueError(f"top_k must be a non-negative int, got {config.top_k!r}")
        if config.top_p is not None and not 0 < config.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {config.top_p}")
        if config.min_p is not None and not 0 <= config.min_p <= 1:
            raise ValueError(f"min_p must be in [0, 1], got {config.min_p}")
    if config.repetition_penalty is not None and not config.repetition_penalty > 0:
        raise ValueError(f"repetition_penalty must be > 0, got {config.repetition_penalty}")
