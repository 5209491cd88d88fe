"""``model.generate`` over a `SpeculativeDecoder`: one prompt, or a batch of prompts
(`specdec.api.batch_generate`), submitted to the decoder's engine loop."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from specdec.api.arguments import SpeculativeGenerateOutput, prepare_request
from specdec.api.batch_generate import generate_batch, is_batch
from specdec.step.support import UnsupportedGeneration

if TYPE_CHECKING:
    from specdec.step.engine import Engine


def run_generate(
    decoder: Engine,
    inputs=None,
    generation_config=None,
    logits_processor=None,
    stopping_criteria=None,
    prefix_allowed_tokens_fn=None,
    synced_gpus=None,
    assistant_model=None,
    streamer=None,
    negative_prompt_ids=None,
    negative_prompt_attention_mask=None,
    custom_generate=None,
    *,
    tree_budget: int | None = None,
    generator: torch.Generator | int | None = None,
    tokenizer=None,
    **kwargs,
):
    """``model.generate``'s signature over ``decoder`` (see `specdec.generate`).

    Returns what ``model.generate`` returns, on the prompt's device (scores and logits on the
    model's)."""
    for name, value in (("assistant_model", assistant_model), ("negative_prompt_ids", negative_prompt_ids),
                        ("negative_prompt_attention_mask", negative_prompt_attention_mask),
                        ("custom_generate", custom_generate), ("synced_gpus", synced_gpus or None)):
        if value is not None:
            raise UnsupportedGeneration(f"{name} is not supported by specdec's generate")
    source = inputs if inputs is not None else kwargs.get("input_ids")
    if is_batch(source):
        if inputs is not None and "input_ids" in kwargs:
            raise ValueError("pass the prompt once: as inputs or as input_ids, not both")
        kwargs.pop("input_ids", None)
        return generate_batch(decoder, source, generation_config, logits_processor, stopping_criteria,
                              prefix_allowed_tokens_fn, streamer, tree_budget, generator,
                              tokenizer if tokenizer is not None else decoder.tokenizer, kwargs)
    device = source.device if isinstance(source, torch.Tensor) else torch.device("cpu")
    request, config = prepare_request(
        decoder, inputs, generation_config, logits_processor, stopping_criteria, prefix_allowed_tokens_fn,
        tree_budget, generator, tokenizer if tokenizer is not None else decoder.tokenizer, kwargs,
    )
    def on_tokens(tokens: list[int]) -> None:
        streamer.put(torch.tensor([tokens], dtype=torch.long))  # [1, k]

    try:
        if streamer is not None:
            if decoder.unsupported:  # refused before the streamer sees anything
                raise UnsupportedGeneration(decoder.unsupported)
            streamer.put(request.prompt[None])  # [1, L], as model.generate does first
        result = decoder.decode(request, None if streamer is None else on_tokens)
    finally:
        if streamer is not None:
            streamer.end()
    decoder.last_stats = result.stats
    new_tokens = torch.tensor(result.tokens, dtype=torch.long)
    sequences = torch.cat([request.prompt, new_tokens])[None].to(device)  # [1, L + new]
    if not config.return_dict_in_generate:
        return sequences
    return SpeculativeGenerateOutput(
        sequences=sequences,
        scores=tuple(row[None] for row in result.scores) if config.output_scores else None,  # [1, V] each
        logits=tuple(row[None] for row in result.logits) if config.output_logits else None,
        spec_stats=result.stats,
    )
