"""The public ``generate()``: HF-compatible arguments and return types over `SpeculativeDecoder`."""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
from transformers.generation.utils import GenerateDecoderOnlyOutput

from drafters import Drafter
from specdec.engine import SpeculativeDecoder, SpecStats
from specdec.sampling import SamplingConfig
from specdec.validation import (
    check_attention_mask,
    check_eos_token_id,
    check_input_ids,
    check_max_new_tokens,
    check_tree_budget,
)


@dataclass
class SpeculativeGenerateOutput(GenerateDecoderOnlyOutput):
    """``GenerateDecoderOnlyOutput`` plus ``spec_stats`` (steps, new tokens, mean accepted tokens)."""

    spec_stats: SpecStats | None = None


_DECODERS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def decoder_for(model, drafter: str, draft_model=None) -> SpeculativeDecoder:
    """The decoder cached for ``model`` and drafter name: drafter state persists between calls."""
    per_model = _DECODERS.setdefault(model, {})
    key = (drafter, None if draft_model is None else id(draft_model))
    if key not in per_model:
        per_model[key] = SpeculativeDecoder(model, drafter=drafter, draft_model=draft_model)
    return per_model[key]


def generate(model, input_ids, *, drafter: str | Drafter = "auto", draft_model=None, **kwargs):
    """Speculative generation; returns what ``model.generate`` returns for the same arguments.

    Greedy output is token-identical to ``model.generate(do_sample=False)``; sampled output has
    exactly the target's distribution.

    Args:
        model: a transformers causal LM.
        input_ids: ``[1, L]`` LongTensor (or ``[L]`` / list of ints) holding the prompt.
        drafter: ``"auto"`` (every available drafter under the scheduler), a drafter name
            (``"recycling"``, ``"ngram"``, ``"model"``, or several joined by ``+``) or a
            `Drafter` instance; named drafters keep their state per model across calls
            (use `SpeculativeDecoder` to hold state explicitly).
        draft_model: the small same-vocabulary causal LM for the ``model`` drafter.
        max_new_tokens: tokens to generate at most (default from ``model.generation_config``).
        eos_token_id: int or list of ints ending generation (default from the generation config);
            the EOS token is returned, nothing after it.
        attention_mask: optional all-ones mask (padding is not supported).
        tree_budget: draft nodes per verify step (default the decoder's: ``None`` lets the
            scheduler choose each step).
        return_dict_in_generate: return a `SpeculativeGenerateOutput` with ``.sequences`` and
            ``.spec_stats`` instead of the ``[1, L + new]`` LongTensor.
        do_sample: sample instead of greedy (default ``False``; the model's generation config is not
            consulted for this flag).
        temperature, top_k, top_p, min_p: sampling warpers; unset ones default to the generation
            config's values, as in ``model.generate``.
        repetition_penalty: applied per tree node with that node's own history (greedy or sampled).
        generator: a ``torch.Generator`` for repeatable sampling (default: torch's global RNG).
    """
    if isinstance(drafter, Drafter):
        decoder = SpeculativeDecoder(model, drafter=drafter)
    else:
        decoder = decoder_for(model, drafter, draft_model)
    return run_generate(decoder, input_ids, **kwargs)


def run_generate(
    decoder: SpeculativeDecoder,
    input_ids,
    *,
    max_new_tokens: int | None = None,
    eos_token_id=None,
    attention_mask=None,
    tree_budget: int | None = None,
    return_dict_in_generate: bool = False,
    do_sample: bool = False,
    temperature: float | None = None,
    top_k: int | None = None,
    top_p: float | None = None,
    min_p: float | None = None,
    repetition_penalty: float | None = None,
    generator: torch.Generator | None = None,
    generation_config=None,
    pad_token_id=None,
    use_cache: bool = True,
):
    """Validate HF-style arguments, decode, and package the result (see `generate`)."""
    config = generation_config if generation_config is not None else decoder.model.generation_config
    do_sample = bool(do_sample or (generation_config is not None and generation_config.do_sample))
    sampling = sampling_config(config, do_sample, temperature, top_k, top_p, min_p, repetition_penalty)
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    if not use_cache:
        raise ValueError("use_cache=False is not supported: speculative decoding needs the KV cache")
    prompt = check_input_ids(input_ids, decoder.vocab_size)
    check_attention_mask(attention_mask, prompt.numel())
    if max_new_tokens is None:
        max_new_tokens = config.max_new_tokens
        if max_new_tokens is None:
            max_new_tokens = max(0, (config.max_length or 20) - prompt.numel())
    max_new_tokens = check_max_new_tokens(max_new_tokens)
    eos_ids = check_eos_token_id(config.eos_token_id if eos_token_id is None else eos_token_id, decoder.vocab_size)
    budget = decoder.tree_budget if tree_budget is None else check_tree_budget(tree_budget)  # None: scheduled

    new_tokens, stats = decoder.decode(prompt, max_new_tokens, eos_ids, budget, sampling, generator)
    sequences = torch.cat([prompt, torch.tensor(new_tokens, dtype=torch.long)])[None]  # [1, L + new]
    if return_dict_in_generate:
        return SpeculativeGenerateOutput(sequences=sequences, spec_stats=stats)
    return sequences


def sampling_config(config, do_sample: bool, temperature, top_k, top_p, min_p, repetition_penalty) -> SamplingConfig | None:
    """The per-node decoding rule, or None for plain greedy (no processors at all)."""
    penalty = repetition_penalty if repetition_penalty is not None else getattr(config, "repetition_penalty", None)
    if not do_sample:
        return SamplingConfig(repetition_penalty=penalty) if penalty not in (None, 1.0) else None

    def pick(value, name):
        return value if value is not None else getattr(config, name, None)

    return SamplingConfig(
        do_sample=True,
        temperature=1.0 if pick(temperature, "temperature") is None else pick(temperature, "temperature"),
        top_k=pick(top_k, "top_k"),
        top_p=pick(top_p, "top_p"),
        min_p=pick(min_p, "min_p"),
        repetition_penalty=penalty,
    )
