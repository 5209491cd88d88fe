"""The public ``generate()``: ``model.generate``'s arguments and return types, speculative.

One `SpeculativeDecoder` is kept per model and drafter name, so drafter state persists between
calls; argument handling lives in `specdec.api.arguments`.
"""

from __future__ import annotations

from drafters import Drafter, HeadFile
from specdec.api.arguments import SpeculativeGenerateOutput
from specdec.api.decoder import SpeculativeDecoder
from specdec.api.generation import run_generate
from specdec.step.per_model import entry_for

__all__ = ["SpeculativeGenerateOutput", "decoder_for", "generate"]


def decoder_for(model, drafter: str, draft_model=None, draft_head=None, compile: bool = False) -> SpeculativeDecoder:
    """The decoder cached for ``model``, drafter name and ``compile``: drafter state persists between calls."""
    entry = entry_for(model)
    head_key = id(draft_head) if isinstance(draft_head, HeadFile) else (None if draft_head is None else str(draft_head))
    key = (drafter, None if draft_model is None else id(draft_model), head_key, compile)
    with entry.guard:
        if key not in entry.decoders:
            entry.decoders[key] = SpeculativeDecoder(model, drafter=drafter, draft_model=draft_model,
                                                     draft_head=draft_head, compile=compile)
        return entry.decoders[key]


def generate(model, inputs=None, *args, drafter: str | Drafter = "auto", draft_model=None, draft_head=None,
             compile: bool = False, **kwargs):
    """Speculative generation; takes and returns what ``model.generate`` does (one prompt or
    a padded batch).

    Greedy output is token-identical to ``model.generate(do_sample=False)``; sampled output has
    exactly the target's distribution.

    Args:
        model: a transformers causal LM.
        inputs: ``[1, L]`` LongTensor (or ``[L]`` / list of ints) holding the prompt, or ``[B, L]``
            prompts padded to one length (with ``attention_mask``), verified together as one batch;
            ``input_ids=`` works too.
        *args: ``model.generate``'s other positional arguments (``generation_config``,
            ``logits_processor``, ``stopping_criteria``, ...).
        drafter: ``"auto"`` (every available drafter under the scheduler), a drafter name
            (``"recycling"``, ``"ngram"``, ``"model"``, ``"head"``, or several joined by ``+``) or a
            `Drafter` instance; named drafters keep their state per model across calls
            (use `SpeculativeDecoder` to hold state explicitly).
        draft_model: the small same-vocabulary causal LM for the ``model`` drafter.
        draft_head: the ``head`` drafter's trained head (path or `drafters.HeadFile`); default: the
            one ``specdec distill`` saved for this model, which ``auto`` then includes.
        compile: verify through ``torch.compile`` (see `SpeculativeDecoder`); the first calls
            compile (tens of seconds on a small CPU), later ones run faster.
        **kwargs: any ``model.generate`` keyword of greedy decoding or sampling: ``generation_config``,
            ``max_new_tokens``, ``max_length``, ``min_new_tokens``, ``min_length``, ``do_sample``,
            ``temperature``, ``top_k``, ``top_p``, ``min_p``, ``typical_p``, ``repetition_penalty``,
            ``no_repeat_ngram_size``, ``bad_words_ids``, ``sequence_bias``, ``suppress_tokens``,
            ``eos_token_id`` (int or list), ``pad_token_id``, ``stop_strings`` with ``tokenizer=``,
            ``max_time``, ``streamer``, ``logits_processor``, ``stopping_criteria``,
            ``prefix_allowed_tokens_fn``, ``return_dict_in_generate``, ``output_scores``,
            ``output_logits``, ``attention_mask`` (0 marks padding, left or right, which is never
            attended to); plus specdec's ``tree_budget`` (draft
            nodes per step; default: the scheduler chooses), ``generator`` (a
            ``torch.Generator`` or an int seed for repeatable sampling) and ``constraint`` (structured
            output: a `specdec.Constraint`, e.g. ``Constraint.json_schema(schema)``, or an OpenAI
            ``response_format`` dict; needs ``tokenizer=`` unless the decoder has one; it masks
            where `specdec.ConstraintLogitsProcessor` first in ``logits_processor`` would: after
            transformers' built-in processors, before temperature, top-k and top-p).

    Returns:
        ``[1, L + new]`` LongTensor, or with ``return_dict_in_generate=True`` a
        `SpeculativeGenerateOutput` (``sequences``, ``scores``, ``logits``, ``spec_stats``).

    Raises:
        UnsupportedGeneration: (a ``ValueError``) for beam search, contrastive search, an
            assistant model, guidance or other modes that are not greedy decoding or sampling.
    """
    if isinstance(drafter, Drafter):
        decoder = SpeculativeDecoder(model, drafter=drafter, compile=compile)
    else:
        decoder = decoder_for(model, drafter, draft_model, draft_head, compile)
    return run_generate(decoder, inputs, *args, **kwargs)
