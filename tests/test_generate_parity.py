"""generate() parity with model.generate (fp32 greedy), streamers, stop conditions inside accepted
blocks, unsupported modes, and specdec.patch on an unmodified HF snippet."""

from __future__ import annotations

import threading

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GenerationConfig,
    LogitsProcessor,
    LogitsProcessorList,
    StoppingCriteria,
    StoppingCriteriaList,
    TextIteratorStreamer,
    TextStreamer,
)

import specdec
from specdec import SpeculativeDecoder, UnsupportedGeneration
from tests.conftest import ScriptedDrafter, tiny_llama

PROMPT = torch.tensor([[5, 17, 33, 8, 41, 17, 33]])
NEW = 30


class OddTokensPenalty(LogitsProcessor):
    """A user processor that depends on the history (not one of transformers' own classes)."""

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        scores = scores.clone()
        last = input_ids[:, -1]
        scores[:, 1::2] -= 2.0 * (last % 3 == 0).float()[:, None]
        return scores


class StopAfterToken(StoppingCriteria):
    def __init__(self, token: int):
        self.token = token

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs) -> torch.BoolTensor:
        return input_ids[:, -1] == self.token


BASE = {"max_new_tokens": NEW, "eos_token_id": -1, "pad_token_id": 0}


def with_base(kwargs: dict) -> dict:
    """BASE overridden by ``kwargs``; a None value removes the key."""
    return {k: v for k, v in (BASE | kwargs).items() if v is not None}


def hf(model, prompt=PROMPT, **kwargs):
    return model.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False, **with_base(kwargs))


# Each case: kwargs for both generate()s. Token choices come from the tiny model's plain greedy
# output [45, 29, 45, 85, 23, 45, 85, 23, ...] so that every option changes the result.
CASES = {
    "defaults": {},
    "repetition_penalty": {"repetition_penalty": 1.4},
    "no_repeat_ngram_size": {"no_repeat_ngram_size": 2},
    "bad_words_ids": {"bad_words_ids": [[85], [45, 29]]},
    "eos_list": {"eos_token_id": [90, 23]},
    "min_new_tokens": {"eos_token_id": 23, "min_new_tokens": 9},
    "max_length": {"max_length": PROMPT.shape[1] + 13, "max_new_tokens": None},
    "sequence_bias": {"sequence_bias": {(45,): -4.0, (85, 23): -6.0}},
    "suppress_tokens": {"suppress_tokens": [23, 29]},
    "logits_processor": {"logits_processor": LogitsProcessorList([OddTokensPenalty()])},
    "stopping_criteria": {"stopping_criteria": StoppingCriteriaList([StopAfterToken(23)])},
    "prefix_allowed_tokens_fn": {"prefix_allowed_tokens_fn": lambda batch_id, ids: list(range(40, 96))},
    "generation_config": {"generation_config": GenerationConfig(max_new_tokens=17, no_repeat_ngram_size=3,
                                                                 eos_token_id=-1, pad_token_id=0)},
}


def drafters_for(reference: torch.Tensor):
    """Learned drafters plus an oracle that drafts HF's own continuation (blocks fully accepted, so
    stops land inside accepted blocks) and a half-wrong oracle (mixed acceptance)."""
    return {
        "recycling": "recycling",
        "ngram": "ngram",
        "oracle": ScriptedDrafter(reference[0], depth=6),
        "mixed": ScriptedDrafter(reference[0], depth=6, corrupt=lambda step, d: (step + d) % 3 == 0),
    }


@pytest.mark.parametrize("case", list(CASES))
def test_greedy_parity_with_hf_for_every_kwarg(model, case):
    kwargs = CASES[case] if "generation_config" in CASES[case] else with_base(CASES[case])
    reference = model.generate(PROMPT, attention_mask=torch.ones_like(PROMPT), **kwargs)
    for name, drafter in drafters_for(reference).items():
        decoder = SpeculativeDecoder(model, drafter=drafter, tree_budget=8)
        ours = decoder.generate(PROMPT, **kwargs)
        assert ours.tolist() == reference.tolist(), f"{case} with drafter {name}"
        if name == "oracle" and reference.shape[1] - PROMPT.shape[1] > 4:
            assert decoder.last_stats.mean_accepted_tokens > 2  # blocks really were multi-token


def test_options_change_the_output(model):
    """Guards the parity table: each option must matter on this model and prompt."""
    plain = hf(model).tolist()
    for case, kwargs in CASES.items():
        if case == "defaults" or "generation_config" in kwargs:
            continue
        assert hf(model, **kwargs).tolist() != plain, case


def test_stop_inside_an_accepted_block_ends_exactly_where_hf_does(model):
    reference_plain = hf(model, max_new_tokens=NEW)
    for kwargs in ({"eos_token_id": 85}, {"stopping_criteria": StoppingCriteriaList([StopAfterToken(85)])}):
        reference = hf(model, **kwargs)
        assert reference.shape[1] == PROMPT.shape[1] + 4  # 85 is the 4th new token
        decoder = SpeculativeDecoder(model, drafter=ScriptedDrafter(reference_plain[0], depth=8), tree_budget=8)
        out = decoder.generate(PROMPT, **with_base(kwargs))
        assert out.tolist() == reference.tolist()
        assert decoder.last_stats.steps == 1  # the stop fell inside the first, fully accepted block


@pytest.fixture(scope="module")
def bpe_pair():
    """A byte-level BPE tokenizer (what stop strings are written for) and a tiny model over its vocabulary."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    corpus = ["the cat sat on the mat", "a dog ran to the park", "stop here and there", "hello world again"] * 20
    backend.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=320, special_tokens=["<pad>", "<eos>"],
                                                            initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>", pad_token="<pad>")
    return tiny_llama(vocab_size=len(tokenizer), seed=9), tokenizer


def test_stop_strings_with_tokenizer(bpe_pair):
    model, tokenizer = bpe_pair
    prompt = tokenizer("the cat sat on", return_tensors="pt").input_ids
    plain = hf(model, prompt, max_new_tokens=20)[0, prompt.shape[1]:]
    text = tokenizer.decode(plain)
    stop = text[len(tokenizer.decode(plain[:6])) - 2 : len(tokenizer.decode(plain[:6]))]  # ends inside token 6
    assert stop and stop in text
    reference = hf(model, prompt, max_new_tokens=20, stop_strings=[stop], tokenizer=tokenizer)
    assert prompt.shape[1] < reference.shape[1] < prompt.shape[1] + 20, (stop, text)
    for drafter in ("recycling", ScriptedDrafter(torch.cat([prompt[0], plain]), depth=8)):
        out = specdec.generate(model, prompt, drafter=drafter, max_new_tokens=20, eos_token_id=-1,
                               stop_strings=[stop], tokenizer=tokenizer, tree_budget=8)
        assert out.tolist() == reference.tolist()
    with pytest.raises(ValueError, match="tokenizer"):
        specdec.generate(model, prompt, max_new_tokens=5, stop_strings=["x"])


def test_max_time_stops_after_the_first_token(model):
    reference = hf(model, max_time=0.0)
    out = specdec.generate(model, PROMPT, max_new_tokens=NEW, eos_token_id=-1, max_time=0.0)
    assert out.shape == reference.shape == (1, PROMPT.shape[1] + 1)


def test_output_scores_and_logits_match_hf(model):
    kwargs = dict(repetition_penalty=1.3, return_dict_in_generate=True, output_scores=True, output_logits=True)
    reference = hf(model, **kwargs)
    ours = specdec.generate(model, PROMPT, drafter=ScriptedDrafter(reference.sequences[0], depth=5),
                            max_new_tokens=NEW, eos_token_id=-1, **kwargs)
    assert torch.equal(ours.sequences, reference.sequences)
    assert len(ours.scores) == len(reference.scores) == len(ours.logits) == NEW
    for mine, theirs in zip(ours.scores + ours.logits, reference.scores + reference.logits):
        assert mine.shape == theirs.shape and mine.dtype == theirs.dtype == torch.float32
        torch.testing.assert_close(mine, theirs, atol=2e-4, rtol=1e-4)
    assert ours.spec_stats.mean_accepted_tokens > 2
    assert specdec.generate(model, PROMPT, max_new_tokens=4, return_dict_in_generate=True).scores is None


class RecordingStreamer:
    def __init__(self):
        self.puts: list[torch.Tensor] = []
        self.ended = 0

    def put(self, value):
        self.puts.append(value.clone())

    def end(self):
        self.ended += 1


def test_streamer_receives_exactly_the_returned_tokens(model):
    reference = hf(model)
    streamer = RecordingStreamer()
    out = specdec.generate(model, PROMPT, drafter=ScriptedDrafter(reference[0], depth=4), max_new_tokens=NEW,
                           eos_token_id=-1, streamer=streamer, tree_budget=6)
    assert torch.equal(streamer.puts[0], PROMPT) and streamer.ended == 1
    streamed = torch.cat([p.reshape(-1) for p in streamer.puts[1:]])
    assert streamed.tolist() == out[0, PROMPT.shape[1]:].tolist()
    assert len(streamer.puts) - 1 < NEW  # tokens arrive in accepted blocks


def test_text_streamers_print_the_answer(tiny_model_dir, capsys):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    prompt = tokenizer("hello there", return_tensors="pt").input_ids
    out = specdec.generate(model, prompt, max_new_tokens=15, eos_token_id=-1,
                           streamer=TextStreamer(tokenizer, skip_prompt=True))
    text = tokenizer.decode(out[0, prompt.shape[1]:])
    assert capsys.readouterr().out.strip() == text.strip() and text

    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True)
    worker = threading.Thread(target=specdec.generate, args=(model, prompt),
                              kwargs=dict(max_new_tokens=15, eos_token_id=-1, streamer=streamer))
    worker.start()
    chunks = list(streamer)
    worker.join()
    assert "".join(chunks).strip() == text.strip()


@pytest.mark.parametrize("kwargs, message", [
    ({"num_beams": 2}, "num_beams"),
    ({"num_return_sequences": 2, "do_sample": True}, "num_return_sequences"),
    ({"penalty_alpha": 0.6, "top_k": 4}, "penalty_alpha"),
    ({"prompt_lookup_num_tokens": 3}, "prompt_lookup_num_tokens"),
    ({"guidance_scale": 1.5}, "guidance_scale"),
    ({"output_attentions": True, "return_dict_in_generate": True}, "output_attentions"),
])
def test_unsupported_modes_raise_clear_errors(model, kwargs, message):
    with pytest.raises(UnsupportedGeneration, match=message):
        specdec.generate(model, PROMPT, max_new_tokens=4, **kwargs)
    with pytest.raises(UnsupportedGeneration, match="assistant_model"):
        specdec.generate(model, PROMPT, max_new_tokens=4, assistant_model=model)
    batch = PROMPT.repeat(2, 1)  # batches are supported now (tests/test_batch.py): HF's own output
    assert torch.equal(specdec.generate(model, batch, max_new_tokens=4, eos_token_id=-1),
                       model.generate(batch, attention_mask=torch.ones_like(batch), do_sample=False,
                                      max_new_tokens=4, eos_token_id=-1, pad_token_id=0))


def test_patch_runs_an_unmodified_hf_snippet(tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    greedy_before = model.generate(**tokenizer("hello there", return_tensors="pt"), max_new_tokens=12,
                                   do_sample=False)
    decoder = specdec.patch(model)
    assert specdec.is_patched(model)

    # --- the snippet, as written for transformers ---
    inputs = tokenizer("hello there and again", return_tensors="pt")
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    worker = threading.Thread(target=lambda: result.append(model.generate(
        **inputs, max_new_tokens=24, do_sample=True, temperature=0.7, top_p=0.9, streamer=streamer)))
    result: list = []
    torch.manual_seed(0)
    worker.start()
    text = "".join(streamer)
    worker.join()
    # ---
    output = result[0]
    assert isinstance(output, torch.Tensor) and output.shape[0] == 1
    assert torch.equal(output[:, : inputs.input_ids.shape[1]], inputs.input_ids)
    assert text.strip() == tokenizer.decode(output[0, inputs.input_ids.shape[1]:], skip_special_tokens=True).strip()
    assert decoder.last_stats.new_tokens == output.shape[1] - inputs.input_ids.shape[1]  # went through specdec

    greedy_patched = model.generate(**tokenizer("hello there", return_tensors="pt"), max_new_tokens=12,
                                    do_sample=False)
    assert torch.equal(greedy_patched, greedy_before)
    with pytest.raises(UnsupportedGeneration, match="num_beams"):
        model.generate(**inputs, max_new_tokens=4, num_beams=2)

    specdec.unpatch(model)
    assert not specdec.is_patched(model)
    steps = decoder.last_stats.steps
    model.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert decoder.last_stats.steps == steps  # transformers' own generate again
    with pytest.raises(ValueError, match="not patched"):
        specdec.unpatch(model)


def test_patched_context_and_fallback(model):
    beams = model.generate(PROMPT, attention_mask=torch.ones_like(PROMPT), max_new_tokens=6, num_beams=2,
                           pad_token_id=0, eos_token_id=-1)
    with specdec.patched(model, fallback=True):
        with pytest.warns(UserWarning, match="num_beams"):
            out = model.generate(PROMPT, max_new_tokens=6, num_beams=2, pad_token_id=0, eos_token_id=-1)
        assert torch.equal(out, beams)
        assert torch.equal(model.generate(PROMPT, max_new_tokens=NEW, eos_token_id=-1, pad_token_id=0), hf(model))
    assert not specdec.is_patched(model)


def test_seed_as_generator(model):
    def run(seed):
        return specdec.generate(model, PROMPT, max_new_tokens=12, eos_token_id=-1, do_sample=True, generator=seed)

    assert torch.equal(run(11), run(11))
