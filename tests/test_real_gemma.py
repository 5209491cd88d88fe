"""End to end on Gemma 3 270M (base; sliding-window layers of 512 and a 262k vocabulary): greedy
equality with model.generate in fp32 on dev prompts longer than the window."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from specdec import SpeculativeDecoder, load_model

pytestmark = pytest.mark.real_model

DEV = Path(__file__).resolve().parents[2] / "shared" / "data" / "spec_bench" / "dev.jsonl"
NEW_TOKENS = 128


@pytest.fixture(scope="module")
def gemma():
    try:
        return load_model("gemma3-270m", dtype="fp32")
    except RuntimeError as err:  # the packages are part of the README set-up; say what is missing
        pytest.fail(str(err))


def long_prompts(tokenizer, count: int = 8) -> list[torch.Tensor]:
    """The ``count`` shortest dev first turns longer than the 512-token window (about 540-630 tokens,
    so prompt plus answer spans well past one window while the test stays short)."""
    encoded = [tokenizer(json.loads(line)["turns"][0], return_tensors="pt").input_ids
               for line in DEV.read_text(encoding="utf-8").splitlines()]
    return sorted((ids for ids in encoded if ids.shape[1] > 512), key=lambda ids: ids.shape[1])[:count]


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
