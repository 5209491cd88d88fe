"""``model.generate`` with a batch of prompts: every row a request of the decoder's shared batch.

Each row is prepared exactly as a single prompt is (`specdec.api.arguments.prepare_request`: the same
merged generation config, processors and stopping criteria; its padding, given by the row of
``attention_mask`` or inferred from ``pad_token_id``, never reaches the model), the rows run
together (`specdec.step.engine.Engine.decode_all`), and the output is laid out as transformers lays out a batch: the
prompts as given, then each row's new tokens, rows that ended early filled with ``pad_token_id``.
A right-padded row (padding after its prompt) continues from its last real token, as the row
alone would; transformers itself warns there and continues from the padding.
"""

from __future__ import annotations

import torch

from specdec.api.arguments import SpeculativeGenerateOutput, prepare_request
from specdec.step.support import UnsupportedGeneration

_MASK63 = (1 << 63) - 1


def is_batch(source) -> bool:
    """Whether ``source`` (``input_ids`` as given) holds more than one prompt."""
    if isinstance(source, torch.Tensor):
        return source.dim() == 2 and source.shape[0] > 1
    return isinstance(source, (list, tuple)) and len(source) > 1 and all(isinstance(r, (list, tuple)) for r in source)


def _row_seed(generator, row: int):
    """Row ``row``'s sampling source: an int seed is spread over the rows (each row samples its own
    draws, as transformers' rows do); a ``torch.Generator`` is drawn from once per row."""
    if isinstance(generator, int) and not isinstance(generator, bool):
        return (generator + row * 0x9E3779B97F4A7C15) & _MASK63
    return generator


def generate_batch(decoder, input_ids, generation_config, logits_processor, stopping_criteria,
                   prefix_allowed_tokens_fn, streamer, tree_budget, generator, tokenizer, kwargs: dict):
    """`specdec.generate` for ``input_ids [B, L]`` (B > 1), optionally with ``attention_mask [B, L]``
    in ``kwargs``. Returns ``[B, L + new]`` (or a `SpeculativeGenerateOutput` whose ``spec_stats``
    is a list with one `SpecStats` per row)."""
    if streamer is not None:
        raise UnsupportedGeneration("streamer with a batch of prompts: transformers' streamers take one sequence")
    if not isinstance(input_ids, torch.Tensor):
        if len({len(row) for row in input_ids}) != 1:
            raise ValueError("input_ids rows have different lengths: pad them (with attention_mask) to one length")
        input_ids = torch.tensor(input_ids)
    device = input_ids.device
    attention_mask = kwargs.pop("attention_mask", None)
    if attention_mask is not None:
        attention_mask = torch.as_tensor(attention_mask)
        if attention_mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}; input_ids has "
                             f"{tuple(input_ids.shape)}")
    requests, config = [], None
    for b, row in enumerate(input_ids):
        row_kwargs = dict(kwargs)
        if attention_mask is not None:
            mask = attention_mask[b]
            real = torch.nonzero(mask).flatten()
            if real.numel() and int(real[-1]) < mask.numel() - 1:  # right padding: move it before the prompt
                shift = mask.numel() - 1 - int(real[-1])
                row, mask = row.roll(shift), mask.roll(shift)
            row_kwargs["attention_mask"] = mask[None]
        request, config = prepare_request(decoder, row[None], generation_config, logits_processor, stopping_criteria,
                                          prefix_allowed_tokens_fn, tree_budget, _row_seed(generator, b), tokenizer,
                                          row_kwargs)
        requests.append(request)
    results = decoder.decode_all(requests)
    decoder.last_stats = [result.stats for result in results]
    longest = max(len(result.tokens) for result in results)
    pad = config._pad_token_tensor
    if pad is None and any(len(result.tokens) < longest for result in results):
        raise ValueError("rows ended at different lengths and there is no pad_token_id to fill them with: "
                         "pass pad_token_id")
    new = torch.full((len(results), longest), 0 if pad is None else int(pad), dtype=torch.long)
    for b, result in enumerate(results):
        new[b, : len(result.tokens)] = torch.tensor(result.tokens, dtype=torch.long)
    sequences = torch.cat([input_ids.to("cpu", torch.long), new], dim=1).to(device)  # [B, L + new]
    if not config.return_dict_in_generate:
        return sequences
    return SpeculativeGenerateOutput(
        sequences=sequences,
        scores=per_step([result.scores for result in results], longest) if config.output_scores else None,
        logits=per_step([result.logits for result in results], longest) if config.output_logits else None,
        spec_stats=[result.stats for result in results])


def per_step(rows: list[list[torch.Tensor]], steps: int) -> tuple[torch.Tensor, ...]:
    """transformers' layout of a batch's scores: one ``[B, V]`` tensor per new position; a row that
    had already ended holds -inf there (transformers would hold the scores of its padding)."""
    if not steps:
        return ()
    template = next(row[0] for row in rows if row)
    out = []
    for i in range(steps):
        out.append(torch.stack([row[i] if i < len(row) else torch.full_like(template, float("-inf"))
                                for row in rows]))
    return tuple(out)
