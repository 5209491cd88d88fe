"""Decoding methods compared by `specdec bench`: HF baselines and specdec drafters."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from drafters import DRAFTERS, drafter_names
from specdec import AUTO, SpecStats, SpeculativeDecoder

HF_METHODS = ("baseline", "hf-pld", "hf-assisted")


class MethodError(ValueError):
    """An unknown or unusable method name."""


@dataclass
class Generation:
    """One generate call: the new token ids and, for specdec, its statistics."""

    new_ids: list[int]
    stats: SpecStats | None = None

    @property
    def steps(self) -> int | None:
        return None if self.stats is None else self.stats.steps


class Method:
    """A named way to generate greedily from a prompt."""

    def __init__(self, name: str, run: Callable[[torch.Tensor, int, int | None], Generation], reset=None) -> None:
        self.name = name
        self._run = run
        self._reset = reset
        self.decoder: SpeculativeDecoder | None = None

    def generate(self, prompt_ids: torch.Tensor, max_new_tokens: int, seed: int | None = None) -> Generation:
        """Continuation of ``prompt_ids`` (``[1, L]``): greedy, or sampled with ``seed`` when the
        method was built with sampling settings."""
        return self._run(prompt_ids, max_new_tokens, seed)

    def reset(self) -> None:
        """Forget learned drafter state (no-op for stateless methods)."""
        if self._reset is not None:
            self._reset()


def known_methods() -> list[str]:
    """HF methods and specdec drafters (drafters also combine with ``+``, e.g. ``recycling+ngram``,
    and take a fixed tree budget with ``@``, e.g. ``ngram@8``)."""
    return list(HF_METHODS) + [AUTO] + sorted(DRAFTERS)


def split_budget(name: str) -> tuple[str, int | None]:
    """``"ngram@8"`` -> ``("ngram", 8)``; ``"ngram"`` -> ``("ngram", None)``. Raises `MethodError`
    for a budget that is not an integer in [0, 64]."""
    base, at, budget = name.partition("@")
    if not at:
        return name, None
    if not budget.isdigit() or not 0 <= int(budget) <= 64:
        raise MethodError(f"method {name!r}: the tree budget after '@' must be an integer in [0, 64]")
    return base, int(budget)


def is_known(name: str) -> bool:
    try:
        base, budget = split_budget(name)
    except MethodError:
        return False
    if base in HF_METHODS:
        return budget is None
    if base == AUTO:
        return True
    try:
        drafter_names(base)
    except ValueError:
        return False
    return True


def _hf_method(name: str, model, sampling: dict | None, **generate_kwargs) -> Method:
    pad = model.generation_config.pad_token_id
    if pad is None:
        pad = model.generation_config.eos_token_id
    if isinstance(pad, list):
        pad = pad[0]

    @torch.inference_mode()
    def run(prompt_ids: torch.Tensor, max_new_tokens: int, seed: int | None) -> Generation:
        if sampling and seed is not None:
            torch.manual_seed(seed)
        out = model.generate(
            prompt_ids,
            attention_mask=torch.ones_like(prompt_ids),
            **(sampling or {"do_sample": False}),
            max_new_tokens=max_new_tokens,
            pad_token_id=pad,
            **generate_kwargs,
        )
        return Generation(out[0, prompt_ids.shape[1] :].tolist())

    return Method(name, run)


def make_method(
    name: str,
    model,
    tokenizer,
    *,
    draft_model=None,
    draft_head=None,
    compile: bool = False,
    pld_tokens: int = 4,
    tree_budget: int | None = None,
    scheduler=None,
    sampling: dict | None = None,
) -> Method:
    """Build the method called ``name`` (see `known_methods`).

    ``sampling`` (e.g. ``{"do_sample": True, "temperature": 0.7}``) makes every method sample with
    those ``generate`` settings; ``None`` is greedy. ``draft_head`` (a path) is the trained head of
    the ``head`` drafter (and of ``auto``); None: the one `specdec distill` saved for the model.
    ``compile``: specdec methods verify through the compiled forward (`specdec.device.compiled`).
    """
    if name == "baseline":
        return _hf_method(name, model, sampling)
    if name == "hf-pld":
        return _hf_method(name, model, sampling, prompt_lookup_num_tokens=pld_tokens)
    if name == "hf-assisted":
        if draft_model is None:
            raise MethodError("method hf-assisted needs --draft-model")
        return _hf_method(name, model, sampling, assistant_model=draft_model)
    if is_known(name):
        drafter, fixed = split_budget(name)
        if drafter != AUTO and {"model", "model-topk"} & set(drafter_names(drafter)) and draft_model is None:
            raise MethodError(f"method {name} needs --draft-model")
        budget = tree_budget if fixed is None else fixed
        options = {} if budget is None else {"tree_budget": budget}
        try:
            decoder = SpeculativeDecoder(model, tokenizer, drafter=drafter, draft_model=draft_model,
                                         draft_head=draft_head, scheduler=scheduler, compile=compile,
                                         **options)
        except FileNotFoundError as err:
            raise MethodError(f"method {name}: {err}") from None

        def run(prompt_ids: torch.Tensor, max_new_tokens: int, seed: int | None) -> Generation:
            options = {"do_sample": False} if not sampling else {**sampling, "generator": seed}
            out = decoder.generate(prompt_ids, max_new_tokens=max_new_tokens, return_dict_in_generate=True,
                                   **options)
            return Generation(out.sequences[0, prompt_ids.shape[1] :].tolist(), out.spec_stats)

        method = Method(name, run, reset=decoder.reset)
        method.decoder = decoder
        return method
    raise MethodError(f"unknown method {name!r}; known methods: {', '.join(known_methods())}")
