"""``model.generate``'s arguments and return types over a `SpeculativeDecoder`.

Arguments are merged exactly as transformers merges them (kwargs > ``generation_config`` > the
model's generation config > defaults), and the logits processors and stopping criteria are the
ones transformers itself builds from them, so every option that applies to one sequence behaves
as in ``model.generate``: processors run per tree node with that node's history, and stopping
criteria are checked after every accepted token. The ``generate`` driver over them is
`specdec.api.generation`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from transformers.generation.configuration_utils import GenerationMode
from transformers.generation.logits_process import LogitsProcessorList
from transformers.generation.stopping_criteria import EosTokenCriteria, MaxLengthCriteria, StoppingCriteriaList
from transformers.generation.utils import GenerateDecoderOnlyOutput

from specdec.api.validation import (
    check_attention_mask,
    check_eos_token_id,
    check_generator,
    check_input_ids,
    check_max_new_tokens,
    check_sampling_values,
)
from specdec.constrain import Constraint, ConstraintLogitsProcessor, TokenConstraint
from specdec.step.request import DecodeRequest, SpecStats, check_tree_budget
from specdec.step.sampling import ConstraintMask, NodeRule, PositionDraws, sampling_key
from specdec.step.support import UnsupportedGeneration

if TYPE_CHECKING:
    from specdec.step.engine import Engine


@dataclass
class SpeculativeGenerateOutput(GenerateDecoderOnlyOutput):
    """``GenerateDecoderOnlyOutput`` plus ``spec_stats`` (steps, new tokens, mean accepted tokens)."""

    spec_stats: SpecStats | None = None


def prepare_request(decoder: Engine, inputs, generation_config, logits_processor, stopping_criteria,
                    prefix_allowed_tokens_fn, tree_budget, generator, tokenizer, kwargs: dict):
    """Validate the arguments and build the `DecodeRequest` and the merged ``GenerationConfig``,
    the way ``model.generate`` merges them. Raises before any model work."""
    model = decoder.model
    input_ids = kwargs.pop("input_ids", None)
    if inputs is not None and input_ids is not None:
        raise ValueError("pass the prompt once: as inputs or as input_ids, not both")
    if "inputs_embeds" in kwargs:
        raise UnsupportedGeneration("inputs_embeds is not supported: pass input_ids")
    source = inputs if inputs is not None else input_ids
    if source is None:
        raise ValueError("input_ids is required: specdec needs a prompt of at least one token")
    prompt = check_input_ids(source, decoder.vocab_size)
    attention_mask = kwargs.pop("attention_mask", None)
    attended = check_attention_mask(attention_mask, prompt.numel())
    processors, constraint = constraint_position(list(logits_processor or []), kwargs.pop("constraint", None))
    constraint = bound_constraint(constraint, tokenizer, decoder.logits_size)
    if kwargs.get("max_new_tokens") is not None:
        check_max_new_tokens(kwargs["max_new_tokens"])
    no_new_tokens = kwargs.get("max_new_tokens") == 0
    if no_new_tokens:  # transformers rejects 0; specdec returns the prompt unchanged
        kwargs["max_new_tokens"] = 1
    if "eos_token_id" in kwargs:
        check_eos_token_id(kwargs["eos_token_id"], decoder.vocab_size)

    has_default_max_length = (kwargs.get("max_length") is None
                              and (generation_config is None or generation_config.max_length is None)
                              and model.generation_config.max_length is None)
    has_default_min_length = (kwargs.get("min_length") is None
                              and (generation_config is None or generation_config.min_length is None)
                              and model.generation_config.min_length is None)
    config, model_kwargs = model._prepare_generation_config(generation_config, **kwargs)
    for name in ("output_attentions", "output_hidden_states"):
        if model_kwargs.pop(name, None):
            raise UnsupportedGeneration(f"{name} is not supported by specdec's generate")
    if model_kwargs:
        raise TypeError(f"generate() got an unexpected keyword argument {next(iter(model_kwargs))!r}")
    check_single_sequence_mode(config)

    model._prepare_special_tokens(config, attention_mask is not None, device=prompt.device, batch_size=1)
    attended = attended_tokens(model, prompt, attended, config)
    eos_ids = check_eos_token_id(config.eos_token_id, decoder.vocab_size)
    prompt_len = prompt.numel()
    model._prepare_generated_length(config, has_default_max_length, has_default_min_length, "input_ids",
                                    prompt_len, prompt[None])
    model._validate_generated_length(config, prompt_len, has_default_max_length)
    max_new_tokens = 0 if no_new_tokens else config.max_length - prompt_len
    check_sampling_values(config)

    processors = model._get_logits_processor(
        generation_config=config, input_ids_seq_length=prompt_len, encoder_input_ids=prompt[None],
        prefix_allowed_tokens_fn=prefix_allowed_tokens_fn, logits_processor=LogitsProcessorList(processors),
        device=model.device, model_kwargs={},
    )
    criteria = [c for c in model._get_stopping_criteria(config, stopping_criteria or StoppingCriteriaList(), tokenizer)
                if not isinstance(c, (MaxLengthCriteria, EosTokenCriteria))]  # both handled exactly by the loop
    return DecodeRequest(
        prompt=prompt,
        max_new_tokens=max_new_tokens,
        eos_ids=eos_ids,
        tree_budget=decoder.tree_budget if tree_budget is None else check_tree_budget(tree_budget),
        rule=NodeRule(list(processors), bool(config.do_sample)),
        draws=PositionDraws(sampling_key(check_generator(generator))) if config.do_sample else None,
        stop=_any_criterion(criteria) if criteria else None,
        keep_scores=bool(config.return_dict_in_generate and config.output_scores),
        keep_logits=bool(config.return_dict_in_generate and config.output_logits),
        constraint=constraint,
        attended=attended,
    ), config


def constraint_position(processors: list, constraint) -> tuple[list, object]:
    """The request's ``logits_processor`` list with its constraint's `ConstraintMask` where the
    constraint applies, and the constraint: ``constraint=`` masks first among the given processors;
    a `specdec.ConstraintLogitsProcessor` among them is replaced by the mask at its own place (the
    engine checks every tree node against it along the node's own path)."""
    if constraint is not None:
        constraint = Constraint.from_response_format(constraint, "constraint")  # None: {"type": "text"}
    given = [i for i, processor in enumerate(processors) if isinstance(processor, ConstraintLogitsProcessor)]
    if len(given) + (constraint is not None) > 1:
        raise ValueError("one constraint per generation: pass constraint= or one ConstraintLogitsProcessor in "
                         "logits_processor, not both")
    if given:
        constraint = processors[given[0]].constraint
        processors[given[0]] = ConstraintMask()
    elif constraint is not None:
        processors.insert(0, ConstraintMask())
    return processors, constraint


def bound_constraint(constraint, tokenizer, vocab_size: int) -> TokenConstraint | None:
    """``constraint=`` (a `specdec.Constraint`, an OpenAI ``response_format`` dict, or None) bound to
    the model's tokenizer."""
    if constraint is not None:
        constraint = Constraint.from_response_format(constraint, "constraint")
    return None if constraint is None else TokenConstraint(constraint, tokenizer, vocab_size)


def attended_tokens(model, prompt: torch.Tensor, attended: torch.Tensor | None, config) -> torch.Tensor | None:
    """The prompt tokens ``model.generate`` attends to (``None`` = all): the given mask, or the one
    transformers infers when ``pad_token_id`` occurs in an unmasked prompt. Padding is dropped
    from what the model sees (positions then count attended tokens only, as transformers' own
    position ids do) and kept in the history."""
    if attended is None:
        inferred = model._prepare_attention_mask_for_generation(prompt[None], config, {})  # [1, L]
        attended = inferred[0].bool()
    if bool(attended.all()):
        return None
    if not bool(attended[-1]):
        raise UnsupportedGeneration(
            "the prompt's last token is masked as padding (attention_mask 0, or pad_token_id "
            f"{config.pad_token_id} with no attention_mask): specdec continues from an attended last token; "
            "pass the prompt without trailing padding, or attention_mask=ones to attend to every token")
    return attended


def check_single_sequence_mode(config) -> None:
    """Only greedy decoding and multinomial sampling of one sequence run speculatively."""
    mode = config.get_generation_mode()
    if mode not in (GenerationMode.GREEDY_SEARCH, GenerationMode.SAMPLE):
        culprit = {
            GenerationMode.CONTRASTIVE_SEARCH: "penalty_alpha", GenerationMode.ASSISTED_GENERATION:
            "prompt_lookup_num_tokens / assistant_early_exit", GenerationMode.CONSTRAINED_BEAM_SEARCH:
            "constraints / force_words_ids",
        }.get(mode, "num_beams")
        raise UnsupportedGeneration(f"{mode.value.replace('_', ' ')} ({culprit}) is not supported by specdec; "
                                    "it runs greedy decoding or sampling of one sequence")
    if config.num_return_sequences not in (None, 1):
        raise UnsupportedGeneration(f"num_return_sequences={config.num_return_sequences} is not supported: "
                                    "specdec generates one sequence per call")
    if config.guidance_scale not in (None, 1, 1.0):
        raise UnsupportedGeneration("guidance_scale (classifier-free guidance) is not supported by specdec")
    if getattr(config, "dola_layers", None) is not None:
        raise UnsupportedGeneration("dola_layers (DoLa decoding) is not supported by specdec")
    if config.token_healing:
        raise UnsupportedGeneration("token_healing is not supported by specdec")
    if config.use_cache is False:
        raise UnsupportedGeneration("use_cache=False is not supported: speculative decoding needs the KV cache")


def _any_criterion(criteria):
    def stop(input_ids: torch.Tensor, scores: torch.Tensor) -> bool:
        return any(bool(criterion(input_ids, scores).any()) for criterion in criteria)

    return stop
