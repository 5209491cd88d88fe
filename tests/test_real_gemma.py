"""End to end on Gemma 3 270M (base; sliding-window layers of 512 and a 262k vocabulary): greedy
equality with model.generate in fp32 on prompts longer than the window, built from the
repository's built-in question set."""

from __future__ import annotations

import pytest
import torch

from bench.datasets import BUILTIN_QUESTIONS
from specdec import SpeculativeDecoder, load_model

pytestmark = pytest.mark.real_model

NEW_TOKENS = 128


@pytest.fixture(scope="module")
def gemma():
    try:
        return load_model("gemma3-270m", dtype="fp32")
    except RuntimeError as err:  # the packages are part of the README set-up; say what is missing
        pytest.fail(str(err))


def long_prompts(tokenizer, count: int = 8) -> list[torch.Tensor]:
    """``count`` completion prompts of 536 to about 630 tokens (past the 512-token window, so prompt
    plus answer spans well past one window while the test stays short): the built-in questions'
    turns joined in order and then in reverse order, each prompt starting at another question and
    cut to its own length."""
    turns = [turn for question in BUILTIN_QUESTIONS for turn in question.turns]
    prompts = []
    for i in range(count):
        text = "\n\n".join(turns[i:] + turns[::-1] + turns[:i])
        ids = tokenizer(text, return_tensors="pt").input_ids
        assert ids.shape[1] > 640, "the built-in questions are too short to build a long prompt"
        prompts.append(ids[:, : 536 + 13 * i])
    return prompts


def test_gemma3_greedy_equality_beyond_the_sliding_window(gemma):
    model, tokenizer = gemma
    assert model.config.sliding_window == 512 and model.config.vocab_size == 262144
    prompts = long_prompts(tokenizer)
    assert len(prompts) == 8
    decoder = SpeculativeDecoder(model, tokenizer, drafter="recycling+ngram", tree_budget=8)
    steps = tokens = 0
    for ids in prompts:
        with torch.inference_mode():
            reference = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                       max_new_tokens=NEW_TOKENS)
        out = decoder.generate(ids, max_new_tokens=NEW_TOKENS, return_dict_in_generate=True)
        assert out.sequences.tolist() == reference.tolist()
        steps += out.spec_stats.steps
        tokens += out.spec_stats.new_tokens
    assert tokens / steps > 1.2  # trees were really accepted across the window
