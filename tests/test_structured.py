"""Structured output and log-probabilities: constrained greedy decoding equals ``model.generate``
with the same constraint as a logits processor, token for token (fp32); constrained sampling keeps
the constrained distribution (chi-square, with a biased verifier as the negative control); the
grammar's forced tokens are drafted; ``specdec serve`` honours ``response_format`` and returns
OpenAI-shaped log-probabilities equal to HF's own; bad constraints are 400s naming the field."""

from __future__ import annotations

import itertools
import json
import threading

import httpx
import jsonschema
import openai
import pytest
import torch

import specdec
from bench.schema_set import SCHEMA_QUESTIONS, check_schemas
from specdec import Constraint, ConstraintError, ConstraintLogitsProcessor, SpeculativeDecoder
from specdec.api.arguments import bound_constraint
from specdec.models.prompts import encode_chat
from specdec.models.random_models import byte_tokenizer
from specdec.serving.server import build_app
from specdec.step.request import DecodeRequest
from tests.conftest import tiny_llama
from tests.test_sampling import broken_accept, chi_square_p
from tests.test_server import RunningServer

SMALL_SCHEMA = {"type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 99},
                                                 "b": {"enum": ["xy", "zw"]}},
                "required": ["a", "b"], "additionalProperties": False}
BRANCHING = r"a[ab]c|b[a-d]c|c[ad]c"  # the second letter's choices depend on the first
LARK = 'start: "(" start ")" | "x"'
MODEL = "tiny-bytes"


@pytest.fixture(scope="module")
def tiny():
    """A tiny fp32 Llama over one token per byte, sharpened so its greedy text varies."""
    tokenizer = byte_tokenizer()
    model = tiny_llama(vocab_size=len(tokenizer), seed=3)
    with torch.no_grad():
        model.lm_head.weight.mul_(8)
    return model, tokenizer


def prompt_ids(tokenizer, text: str = "give json") -> torch.Tensor:
    return encode_chat(tokenizer, [{"role": "user", "content": text}])  # [1, L]


def hf_constrained(model, tokenizer, ids, constraint, max_new_tokens: int, **options) -> list[int]:
    processor = ConstraintLogitsProcessor(constraint, tokenizer, model.config.vocab_size)
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                         logits_processor=[processor], pad_token_id=0, **options)
    return out[0, ids.shape[1]:].tolist()


# ---------------------------------------------------------------- constraints and their errors
@pytest.mark.parametrize("given, argument, reason", [
    ({"type": "object", "properties": {"a": {"type": "strin"}}}, "constraint", "strin"),
    ({"type": "object", "properties": {"a": {"$ref": "#/nope"}}}, "constraint", "nope"),
    ("{not json", "constraint", "not valid JSON"),
    (7, "constraint", "must be an object"),
])
def test_bad_schemas_are_refused_naming_the_argument(given, argument, reason):
    with pytest.raises(ConstraintError, match=reason) as caught:
        Constraint.json_schema(given)
    assert caught.value.argument == argument and str(caught.value).startswith(argument)


@pytest.mark.parametrize("response_format, argument", [
    ("json", "response_format"),
    ({"type": "xml"}, "response_format.type"),
    ({"type": "json_schema"}, "response_format.json_schema"),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nope"}}},
     "response_format.json_schema.schema"),
    ({"type": "regex", "regex": "(("}, "response_format.regex"),
    ({"type": "grammar", "grammar": "start: undefined_rule"}, "response_format.grammar"),
])
def test_bad_response_formats_name_the_field(response_format, argument):
    with pytest.raises(ConstraintError) as caught:
        Constraint.from_response_format(response_format)
    assert caught.value.argument == argument


def test_response_format_kinds():
    assert Constraint.from_response_format({"type": "text"}) is None
    assert Constraint.from_response_format({"type": "json_object"}).kind == "json_object"
    schema = Constraint.from_response_format({"type": "json_schema", "json_schema": {"name": "s",
                                                                                     "schema": SMALL_SCHEMA}})
    assert schema.kind == "json_schema" and json.loads(schema.source) == SMALL_SCHEMA
    assert Constraint.from_response_format({"type": "regex", "regex": "[ab]+"}).kind == "regex"


def test_the_schema_set_is_valid_json_schema():
    check_schemas()
    assert len(SCHEMA_QUESTIONS) >= 20
    for question in SCHEMA_QUESTIONS:
        Constraint.json_schema(question.schema)


def test_a_constraint_needs_a_fast_tokenizer(tiny):
    model, _ = tiny
    with pytest.raises(ValueError, match="tokenizer"):
        bound_constraint(Constraint.regex("a+"), None, model.config.vocab_size)


# ---------------------------------------------------------------- greedy: equal to the sequential reference
CONSTRAINTS = {
    "schema": lambda: Constraint.json_schema(SMALL_SCHEMA),
    "object": lambda: {"type": "json_object"},
    "regex": lambda: Constraint.regex(BRANCHING),
    "lark": lambda: Constraint.grammar(LARK),
}


@pytest.mark.parametrize("kind", list(CONSTRAINTS))
@pytest.mark.parametrize("drafter, tree_budget", [("recycling+ngram", 8), ("auto", None), ("ngram", 0)])
def test_constrained_greedy_equals_generate_with_the_processor(tiny, kind, drafter, tree_budget):
    model, tokenizer = tiny
    constraint = CONSTRAINTS[kind]()
    for text in ("give json", "another question", "x"):
        ids = prompt_ids(tokenizer, text)
        expected = hf_constrained(model, tokenizer, ids, constraint, 40, do_sample=False)
        out = specdec.generate(model, ids, drafter=drafter, tree_budget=tree_budget, constraint=constraint,
                               tokenizer=tokenizer, max_new_tokens=40, pad_token_id=0)
        assert out[0, ids.shape[1]:].tolist() == expected, (kind, text)


@pytest.mark.parametrize("pattern", [r"[0-9]+", r"(ab|a)+b?"])
def test_grammars_that_may_end_or_go_on_equal_the_reference(tiny, pattern):
    """After an EOS that does not end the generation (``eos_token_id`` set elsewhere), both paths
    allow only EOS again; a grammar that may end or continue decides by the model's choice."""
    model, tokenizer = tiny
    constraint = Constraint.regex(pattern)
    for text, eos in (("digits", 2), ("more", 7)):
        ids = prompt_ids(tokenizer, text)
        expected = hf_constrained(model, tokenizer, ids, constraint, 30, do_sample=False, eos_token_id=eos)
        out = specdec.generate(model, ids, drafter="recycling+ngram", tree_budget=6, constraint=constraint,
                               tokenizer=tokenizer, max_new_tokens=30, eos_token_id=eos, pad_token_id=0)
        assert out[0, ids.shape[1]:].tolist() == expected


def test_the_processor_given_to_specdec_is_the_constraint_at_its_place(tiny):
    """`ConstraintLogitsProcessor` in ``logits_processor`` (as for plain ``model.generate``): specdec
    checks tree nodes against it along their own paths, after transformers' built-in processors
    (here a repetition penalty) exactly where HF applies it; with ``constraint=`` too it is refused."""
    model, tokenizer = tiny
    ids = prompt_ids(tokenizer, "penalised")
    constraint = Constraint.json_schema(SMALL_SCHEMA)
    expected = hf_constrained(model, tokenizer, ids, constraint, 40, do_sample=False, repetition_penalty=1.5)
    for given in ({"logits_processor": [ConstraintLogitsProcessor(constraint, tokenizer)]},
                  {"constraint": constraint}):
        out = specdec.generate(model, ids, drafter="recycling+ngram", tree_budget=6, tokenizer=tokenizer,
                               max_new_tokens=40, repetition_penalty=1.5, pad_token_id=0, **given)
        assert out[0, ids.shape[1]:].tolist() == expected
    with pytest.raises(ValueError, match="one constraint"):
        specdec.generate(model, ids, tokenizer=tokenizer, max_new_tokens=4, constraint=constraint,
                         logits_processor=[ConstraintLogitsProcessor(constraint, tokenizer)])


def test_logprob_requests_are_checked(tiny):
    model, tokenizer = tiny
    decoder = SpeculativeDecoder(model, tokenizer, drafter="ngram")
    prompt = prompt_ids(tokenizer)[0]
    for options, match in (({"logprobs": -1}, "logprobs"), ({"logprobs": 10**6}, "logprobs"),
                           ({"logprobs": 2, "logprobs_mode": "cooked"}, "logprobs_mode")):
        with pytest.raises(ValueError, match=match):
            decoder.submit(DecodeRequest(prompt=prompt, max_new_tokens=4, **options))
    raw = decoder.decode(DecodeRequest(prompt=prompt, max_new_tokens=6, logprobs=3, tree_budget=4,
                                       constraint=bound_constraint(Constraint.regex("[a-c]+"), tokenizer, 259)))
    processed = decoder.decode(DecodeRequest(prompt=prompt, max_new_tokens=6, logprobs=3, logprobs_mode="processed",
                                             tree_budget=4,
                                             constraint=bound_constraint(Constraint.regex("[a-c]+"), tokenizer, 259)))
    assert raw.tokens == processed.tokens and len(raw.logprobs) == len(raw.tokens)
    allowed = set(tokenizer("abc", add_special_tokens=False)["input_ids"]) | {2}
    for r, p in zip(raw.logprobs, processed.logprobs):
        assert p.logprob >= r.logprob  # renormalised over the allowed tokens
        assert {token for token, _ in p.top} <= allowed and len(r.top) == 3


def test_forced_tokens_are_drafted_and_accepted(tiny):
    """With only the n-gram drafter (which finds little in a random model's text), the grammar's own
    nodes make steps of several tokens: the JSON keys and separators the schema forces."""
    model, tokenizer = tiny
    decoder = SpeculativeDecoder(model, tokenizer, drafter="ngram")
    ids = prompt_ids(tokenizer)
    constraint = Constraint.json_schema(SMALL_SCHEMA)
    result = decoder.decode(DecodeRequest(prompt=ids[0], max_new_tokens=40, eos_ids=frozenset({2}), tree_budget=4,
                                          constraint=bound_constraint(constraint, tokenizer, 259)))
    assert result.tokens == hf_constrained(model, tokenizer, ids, constraint, 40, do_sample=False)
    grammar = result.stats.per_drafter["grammar"]
    assert grammar["accepted"] >= 8 and result.stats.mean_accepted_tokens > 1.5
    assert json.loads(tokenizer.decode(result.tokens, skip_special_tokens=True)) is not None


def test_constrained_and_free_rows_in_one_batch_each_equal_alone(tiny):
    model, tokenizer = tiny
    decoder = SpeculativeDecoder(model, tokenizer, drafter="recycling+ngram", tree_budget=6)
    constraints = [Constraint.json_schema(SMALL_SCHEMA), None, Constraint.regex(BRANCHING), None,
                   Constraint.grammar(LARK)]
    prompts = [prompt_ids(tokenizer, f"question {i}")[0] for i in range(len(constraints))]
    requests = [DecodeRequest(prompt=p, max_new_tokens=30, eos_ids=frozenset({2}),
                              constraint=None if c is None else bound_constraint(c, tokenizer, 259))
                for p, c in zip(prompts, constraints)]
    results = decoder.decode_all(requests)
    for prompt, constraint, result in zip(prompts, constraints, results):
        if constraint is None:
            out = model.generate(prompt[None], attention_mask=torch.ones_like(prompt[None]), do_sample=False,
                                 max_new_tokens=30, eos_token_id=2, pad_token_id=0)[0, prompt.numel():].tolist()
        else:
            out = hf_constrained(model, tokenizer, prompt[None], constraint, 30, do_sample=False, eos_token_id=2)
        assert result.tokens == out


def test_batched_generate_returns_scores_and_logits_for_every_row(tiny):
    model, tokenizer = tiny
    batch = torch.cat([prompt_ids(tokenizer, "first one"), prompt_ids(tokenizer, "other 2!!")])
    options = dict(max_new_tokens=8, return_dict_in_generate=True, output_scores=True, output_logits=True,
                   pad_token_id=0, do_sample=False, repetition_penalty=1.3)
    ours = specdec.generate(model, batch, drafter="recycling+ngram", tree_budget=4, **options)
    theirs = model.generate(batch, attention_mask=torch.ones_like(batch), **options)
    assert ours.sequences.tolist() == theirs.sequences.tolist()
    assert len(ours.scores) == len(theirs.scores) and len(ours.logits) == len(theirs.logits)
    for a, b in itertools.chain(zip(ours.scores, theirs.scores), zip(ours.logits, theirs.logits)):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    none = specdec.generate(model, batch, **(options | {"max_new_tokens": 0}))
    assert none.scores == () and none.logits == ()


# ---------------------------------------------------------------- sampling keeps the constrained distribution
def exact_constrained_pairs(model, tokenizer, ids) -> dict:
    """P(first two tokens) under `BRANCHING` from the model's own logits, masked and renormalised."""
    processor = ConstraintLogitsProcessor(Constraint.regex(BRANCHING), tokenizer, model.config.vocab_size)
    with torch.no_grad():
        first = torch.softmax(processor(ids, model(ids).logits[:, -1]), -1)[0]
        expected = {}
        for a in torch.nonzero(first).flatten().tolist():
            longer = torch.cat([ids, torch.tensor([[a]])], dim=1)
            second = torch.softmax(processor(longer, model(longer).logits[:, -1]), -1)[0]
            processor.rows[0].matcher.rollback(1)
            processor.rows[0].consumed -= 1
            for b in torch.nonzero(second).flatten().tolist():
                expected[(a, b)] = float(first[a] * second[b])
    return expected


def sample_pairs(decoder, tokenizer, ids, trials: int, seed: int) -> tuple[dict, int]:
    counts, drafted = {}, 0
    for trial in range(trials):
        out = decoder.generate(ids, max_new_tokens=3, do_sample=True, top_k=0, temperature=1.0,
                               constraint=Constraint.regex(BRANCHING), generator=seed * 100_000 + trial,
                               return_dict_in_generate=True)
        key = tuple(out.sequences[0, ids.shape[1]: ids.shape[1] + 2].tolist())
        counts[key] = counts.get(key, 0) + 1
        drafted += out.spec_stats.drafted_tokens
    return counts, drafted


def test_constrained_sampling_keeps_the_constrained_distribution(tiny, monkeypatch):
    model, tokenizer = tiny
    soft = tiny_llama(vocab_size=len(tokenizer), seed=3)  # unsharpened: a spread distribution
    ids = prompt_ids(tokenizer, "pick")
    expected = exact_constrained_pairs(soft, tokenizer, ids)
    assert sum(p > 0.02 for p in expected.values()) >= 6
    decoder = SpeculativeDecoder(soft, tokenizer, drafter="recycling+ngram", tree_budget=6)
    trials = 1000
    counts, drafted = sample_pairs(decoder, tokenizer, ids, trials, seed=1)
    assert drafted > trials  # trees were verified, not plain steps
    assert chi_square_p(counts, expected, trials) > 1e-3
    monkeypatch.setattr("specdec.step.sampling.accept_sampled",
                        lambda tree, probs, uniforms: broken_accept(tree, probs, uniforms, threshold=0.05))
    broken, _ = sample_pairs(decoder, tokenizer, ids, trials // 2, seed=2)
    assert chi_square_p(broken, expected, trials // 2) < 1e-6


# ---------------------------------------------------------------- specdec serve
@pytest.fixture(scope="module")
def served(tiny):
    model, tokenizer = tiny
    running = RunningServer(build_app(SpeculativeDecoder(model, tokenizer, drafter="recycling+ngram"), MODEL,
                                      max_tokens_limit=64))
    yield running
    running.stop()


@pytest.fixture(scope="module")
def client(served):
    return served.client()


def chat(client, question: str, **options):
    options.setdefault("max_tokens", 40)
    options.setdefault("temperature", 0)
    return client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": question}], **options)


def schema_format(schema: dict) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema, "strict": True}}


def hf_logprobs(model, ids: torch.Tensor, tokens: list[int]) -> torch.Tensor:
    """``[len(tokens), V]`` log_softmax of HF's own logits at each new token's position."""
    full = torch.cat([ids, torch.tensor([tokens])], dim=1)
    with torch.no_grad():
        logits = model(full).logits[0, ids.shape[1] - 1 : full.shape[1] - 1]
    return torch.log_softmax(logits.float(), dim=-1)


@pytest.mark.parametrize("stream", [False, True])
def test_served_json_schema_matches_the_reference_and_validates(tiny, client, stream):
    model, tokenizer = tiny
    question = "give json"
    expected = hf_constrained(model, tokenizer, prompt_ids(tokenizer, question), Constraint.json_schema(SMALL_SCHEMA),
                              40, do_sample=False)
    if stream:
        chunks = list(chat(client, question, response_format=schema_format(SMALL_SCHEMA), stream=True))
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    else:
        text = chat(client, question, response_format=schema_format(SMALL_SCHEMA)).choices[0].message.content
    assert text == tokenizer.decode(expected, skip_special_tokens=True)
    jsonschema.validate(json.loads(text), SMALL_SCHEMA)


def test_served_json_object_is_a_json_object(tiny, client):
    model, tokenizer = tiny
    for question in ("give json", "an object"):
        reply = chat(client, question, response_format={"type": "json_object"})
        expected = hf_constrained(model, tokenizer, prompt_ids(tokenizer, question), {"type": "json_object"}, 40,
                                  do_sample=False)
        assert reply.choices[0].message.content == tokenizer.decode(expected, skip_special_tokens=True)
        if reply.choices[0].finish_reason == "stop":
            assert isinstance(json.loads(reply.choices[0].message.content), dict)


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("constrained", [False, True])
def test_served_logprobs_equal_hfs_own(tiny, client, stream, constrained):
    """Chat ``logprobs`` with ``top_logprobs=5``: one entry per token of the answer (bytes joining to
    its text), each equal to log_softmax of HF's logits for the same prefix (raw, before the
    constraint), and its top five the five largest of them."""
    model, tokenizer = tiny
    question = "tell me"
    options = dict(logprobs=True, top_logprobs=5, max_tokens=24)
    if constrained:
        options["response_format"] = schema_format(SMALL_SCHEMA)
    if stream:
        chunks = list(chat(client, question, stream=True, **options))
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        content = [entry for c in chunks if c.choices and c.choices[0].logprobs
                   for entry in c.choices[0].logprobs.content]
    else:
        reply = chat(client, question, **options)
        text, content = reply.choices[0].message.content, reply.choices[0].logprobs.content
    ids = prompt_ids(tokenizer, question)
    if constrained:
        tokens = hf_constrained(model, tokenizer, ids, Constraint.json_schema(SMALL_SCHEMA), 24, do_sample=False)
    else:
        tokens = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=24,
                                pad_token_id=0)[0, ids.shape[1]:].tolist()
    tokens = [t for t in tokens if t != tokenizer.eos_token_id]
    assert len(content) == len(tokens)
    assert bytes(b for entry in content for b in entry.bytes).decode(errors="replace") == text
    reference = hf_logprobs(model, ids, tokens)
    for i, (entry, token) in enumerate(zip(content, tokens)):
        assert abs(entry.logprob - float(reference[i, token])) < 1e-4
        assert len(entry.top_logprobs) == 5
        best = reference[i].topk(5).values
        for top, value in zip(entry.top_logprobs, best.tolist()):
            assert abs(top.logprob - value) < 1e-4


def test_completions_logprobs(tiny, client):
    model, tokenizer = tiny
    reply = client.completions.create(model=MODEL, prompt="abc", max_tokens=12, temperature=0, logprobs=3)
    logprobs = reply.choices[0].logprobs
    ids = torch.tensor([tokenizer("abc")["input_ids"]])
    tokens = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=12,
                            pad_token_id=0)[0, ids.shape[1]:].tolist()
    tokens = [t for t in tokens if t != tokenizer.eos_token_id]
    reference = hf_logprobs(model, ids, tokens)
    assert len(logprobs.tokens) == len(tokens) and "".join(logprobs.tokens) == reply.choices[0].text
    assert logprobs.text_offset == [len("".join(logprobs.tokens[:i])) for i in range(len(tokens))]
    for i, token in enumerate(tokens):
        assert abs(logprobs.token_logprobs[i] - float(reference[i, token])) < 1e-4
        assert len(logprobs.top_logprobs[i]) <= 3


@pytest.mark.parametrize("options, param", [
    ({"response_format": schema_format({"type": "object", "properties": {"a": {"type": "strin"}}})},
     "response_format"),
    ({"response_format": {"type": "xml"}}, "response_format"),
    ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ({"top_logprobs": 3}, None),
])
def test_bad_structured_requests_are_400s_naming_the_field(client, options, param):
    with pytest.raises(openai.BadRequestError) as caught:
        chat(client, "hello", **options)
    error = caught.value.response.json()["error"]
    assert caught.value.status_code == 400
    if param is not None:
        assert error["param"] == param
    assert "top_logprobs" in error["message"] or "response_format" in error["message"]


def test_completions_logprobs_above_five_is_a_400(served):
    response = httpx.post(f"{served.url}/v1/completions", json={"model": MODEL, "prompt": "a", "logprobs": 6},
                          timeout=30)
    assert response.status_code == 400 and response.json()["error"]["param"] == "logprobs"


def test_concurrent_constrained_and_free_requests_each_get_their_own_answer(tiny, client):
    model, tokenizer = tiny
    asks = [("q one", schema_format(SMALL_SCHEMA)), ("q two", None), ("q three", {"type": "json_object"}),
            ("q four", None), ("q five", schema_format(SMALL_SCHEMA)), ("q six", None)] * 2
    answers = [None] * len(asks)

    def run(i: int) -> None:
        question, response_format = asks[i]
        options = {} if response_format is None else {"response_format": response_format}
        answers[i] = chat(client, question, max_tokens=24, **options).choices[0].message.content

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(asks))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for (question, response_format), answer in zip(asks, answers):
        ids = prompt_ids(tokenizer, question)
        if response_format is None:
            expected = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=24,
                                      pad_token_id=0)[0, ids.shape[1]:].tolist()
        else:
            constraint = Constraint.from_response_format(response_format)
            expected = hf_constrained(model, tokenizer, ids, constraint, 24, do_sample=False)
        assert answer == tokenizer.decode(expected, skip_special_tokens=True)


# ---------------------------------------------------------------- the default model, every schema of the set
@pytest.mark.real_model
def test_real_model_schemas_equal_generate_and_validate():
    """SmolLM2-135M-Instruct, fp32: every schema of the set, constrained greedy output token for token
    HF's with the same constraint as a logits processor, parsed and validated by jsonschema."""
    model, tokenizer = specdec.load_default_model(dtype=torch.float32)
    decoder = SpeculativeDecoder(model, tokenizer)
    failures = []
    for question in SCHEMA_QUESTIONS:
        ids = prompt_ids(tokenizer, question.prompt)
        constraint = Constraint.json_schema(question.schema)
        expected = hf_constrained(model, tokenizer, ids, constraint, 200, do_sample=False)
        out = decoder.generate(ids, max_new_tokens=200, do_sample=False, constraint=constraint)
        tokens = out[0, ids.shape[1]:].tolist()
        if tokens != expected:
            failures.append(question.name)
            continue
        jsonschema.validate(json.loads(tokenizer.decode(tokens, skip_special_tokens=True)), question.schema)
    assert not failures
