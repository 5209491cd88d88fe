"""Bad input gets a clear error naming the argument."""

from __future__ import annotations

import pytest
import torch

import specdec
from specdec import SpeculativeDecoder


@pytest.mark.parametrize(
    "input_ids, kwargs, error, message",
    [
        (torch.zeros(1, 0, dtype=torch.long), {}, ValueError, "input_ids is empty"),
        ([], {}, ValueError, "input_ids is empty"),
        (torch.tensor([[1, 2, 96]]), {}, ValueError, "input_ids holds token id 96"),
        (torch.tensor([[1, -1]]), {}, ValueError, "input_ids holds token id -1"),
        ([[1, 2], [3]], {}, ValueError, "different lengths"),
        (torch.tensor([[1, 2], [3, 4]]), {"attention_mask": torch.ones(2, 3, dtype=torch.long)}, ValueError,
         "attention_mask has shape"),
        (torch.tensor([[1, 2], [3, 4]]), {"attention_mask": torch.tensor([[1, 1], [0, 0]])}, ValueError,
         "last token is masked"),
        (torch.tensor([[1, 2], [3, 4]]), {"constraint": {"type": "xml"}}, ValueError, "constraint.type"),
        (torch.tensor([[1, 2]]), {"constraint": {"type": "json_schema", "json_schema": {"schema": 5}}}, ValueError,
         "constraint.json_schema.schema"),
        (torch.tensor([[1, 2], [3, 96]]), {}, ValueError, "input_ids holds token id 96"),
        (torch.tensor([[1.0, 2.0]]), {}, TypeError, "input_ids must hold integer"),
        ("hello", {}, TypeError, "input_ids must be"),
        (torch.tensor([[1, 2]]), {"max_new_tokens": -1}, ValueError, "max_new_tokens must be >= 0"),
        (torch.tensor([[1, 2]]), {"max_new_tokens": 2.5}, TypeError, "max_new_tokens must be an int"),
        (torch.tensor([[1, 2]]), {"tree_budget": -3}, ValueError, "tree_budget"),
        (torch.tensor([[1, 2]]), {"tree_budget": 10_000}, ValueError, "tree_budget"),
        (torch.tensor([[1, 2]]), {"attention_mask": torch.tensor([[1, 0]])}, ValueError, "last token is masked"),
        (torch.tensor([[1, 2]]), {"attention_mask": torch.tensor([[1, 2]])}, ValueError, "only 0 and 1"),
        (torch.tensor([[1, 2]]), {"attention_mask": torch.tensor([[1, 1, 1]])}, ValueError, "attention_mask has shape"),
        (torch.tensor([[1, 2]]), {"eos_token_id": "x"}, TypeError, "eos_token_id"),
        (torch.tensor([[1, 2]]), {"do_sample": True, "temperature": 0.0}, ValueError, "temperature"),
        (torch.tensor([[1, 2]]), {"do_sample": True, "top_p": 1.5}, ValueError, "top_p"),
        (torch.tensor([[1, 2]]), {"do_sample": True, "top_k": -1}, ValueError, "top_k"),
        (torch.tensor([[1, 2]]), {"repetition_penalty": 0.0}, ValueError, "repetition_penalty"),
        (torch.tensor([[1, 2]]), {"do_sample": True, "generator": "seed"}, TypeError, "generator"),
        (torch.tensor([[1, 2]]), {"drafter": "nope"}, ValueError, "drafter must be one of"),
    ],
)
def test_bad_arguments_raise_clear_errors(model, input_ids, kwargs, error, message):
    with pytest.raises(error, match=message):
        specdec.generate(model, input_ids, max_new_tokens=kwargs.pop("max_new_tokens", 4), **kwargs)


def test_bad_decoder_arguments(model):
    with pytest.raises(ValueError, match="tree_budget"):
        SpeculativeDecoder(model, tree_budget=-1)
    with pytest.raises(ValueError, match="drafter must be one of"):
        SpeculativeDecoder(model, drafter="unknown")
    with pytest.raises(TypeError, match="unexpected keyword"):
        specdec.generate(model, torch.tensor([[1, 2]]), temperature_typo=0.3)


def test_zero_new_tokens_returns_prompt(model):
    prompt = torch.tensor([[4, 5, 6]])
    assert torch.equal(specdec.generate(model, prompt, max_new_tokens=0), prompt)
    out = specdec.generate(model, prompt, max_new_tokens=0, return_dict_in_generate=True)
    assert out.spec_stats.steps == 0 and torch.equal(out.sequences, prompt)


def test_list_and_1d_prompts(model):
    a = specdec.generate(model, [4, 5, 6], max_new_tokens=5, eos_token_id=-1)
    b = specdec.generate(model, torch.tensor([4, 5, 6]), max_new_tokens=5, eos_token_id=-1)
    assert a.shape == (1, 8) and torch.equal(a, b)
