"""Constrained decoding and logit processors in the engine, on the random-weight demo model.

Even a model that writes gibberish must return text that matches the schema, regex or choice list,
because every step's logits are masked to what the grammar allows next.
"""

from __future__ import annotations

import json
import re

import jsonschema
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from worker import LLM, SamplingParams
from worker.engine.grammar import InvalidGrammar, check, unpack_bitmask
from worker.engine.logit_processors import banned_next_tokens
from worker.sampling_params import InvalidParameter, StructuredOutput


@pytest.fixture(scope="module")
def llm():
    return LLM("demo", device="cpu", progress=False)


def generate(llm, prompt, **params):
    params.setdefault("max_tokens", 200)
    return llm.generate([prompt], SamplingParams(**params), use_tqdm=False)[0].outputs


def schema_output(schema: dict) -> StructuredOutput:
    return StructuredOutput("json_schema", json.dumps(schema))


FIXED_SCHEMAS = [
    {"type": "object", "properties": {"name": {"type": "string", "maxLength": 10}, "ok": {"type": "boolean"},
                                      "n": {"type": "integer", "minimum": 0, "maximum": 999}},
     "required": ["name", "ok", "n"], "additionalProperties": False},
    {"type": "array", "items": {"enum": ["red", "green", "blue"]}, "minItems": 1, "maxItems": 3},
    {"type": "object", "properties": {"point": {"type": "object", "properties": {
        "x": {"type": "integer", "minimum": -5, "maximum": 5}, "y": {"type": "integer", "minimum": -5, "maximum": 5}},
        "required": ["x", "y"], "additionalProperties": False}, "label": {"type": ["string", "null"], "maxLength": 4}},
     "required": ["point", "label"], "additionalProperties": False},
]


@pytest.mark.parametrize("schema", FIXED_SCHEMAS)
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_json_schema_outputs_validate(llm, schema, temperature):
    for choice in generate(llm, "Describe it as JSON", temperature=temperature, seed=7, n=2,
                           structured_output=schema_output(schema)):
        assert choice.finish_reason == "stop", choice.text
        jsonschema.validate(json.loads(choice.text), schema)


def _leaf():
    return st.one_of(
        st.just({"type": "boolean"}),
        st.just({"type": "null"}),
        st.tuples(st.integers(-50, 50), st.integers(0, 50)).map(
            lambda t: {"type": "integer", "minimum": t[0], "maximum": t[0] + t[1]}),
        st.integers(1, 6).map(lambda k: {"type": "string", "maxLength": k}),
        st.lists(st.text("abcxyz", min_size=1, max_size=4), min_size=1, max_size=3, unique=True).map(
            lambda values: {"enum": values}),
    )


def _container(children):
    keys = st.lists(st.text("abcdefgh", min_size=1, max_size=5), min_size=1, max_size=3, unique=True)
    objects = st.tuples(keys, st.lists(children, min_size=3, max_size=3)).map(lambda t: {
        "type": "object", "properties": dict(zip(t[0], t[1])), "required": list(t[0]), "additionalProperties": False})
    arrays = st.tuples(children, st.integers(0, 3)).map(
        lambda t: {"type": "array", "items": t[0], "maxItems": t[1]})
    return st.one_of(objects, arrays)


SCHEMAS = st.recursive(_leaf(), _container, max_leaves=5)


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(schema=SCHEMAS)
def test_generated_schemas_validate(llm, schema):
    (choice,) = generate(llm, "JSON please", temperature=0.0, structured_output=schema_output(schema))
    assert choice.finish_reason == "stop", choice.text
    jsonschema.validate(json.loads(choice.text), schema)


def test_regex_and_choice(llm):
    for choice in generate(llm, "Code?", temperature=1.0, seed=3, n=3,
                           structured_output=StructuredOutput("regex", r"[A-Z]{2}-\d{3}")):
        assert re.fullmatch(r"[A-Z]{2}-\d{3}", choice.text), choice.text
    options = ["yes", "no", "it depends"]
    texts = {c.text for c in generate(llm, "Well?", temperature=1.0, seed=1, n=6,
                                      structured_output=StructuredOutput("choice", json.dumps(options)))}
    assert texts <= set(options) and texts


def test_json_object_output_is_an_object(llm):
    (choice,) = generate(llm, "Any JSON", temperature=0.0, max_tokens=24, structured_output=StructuredOutput("json_object"))
    assert choice.text.startswith("{")


def test_requests_sharing_one_params_object_keep_their_own_grammar_state(llm):
    params = SamplingParams(temperature=1.0, seed=5, max_tokens=200, structured_output=schema_output(FIXED_SCHEMAS[0]))
    outputs = llm.generate(["first prompt", "a different second prompt", "third"], params, use_tqdm=False)
    for output in outputs:
        jsonschema.validate(json.loads(output.outputs[0].text), FIXED_SCHEMAS[0])


def test_constrained_and_free_requests_share_a_batch(llm):
    free = SamplingParams(temperature=0.0, max_tokens=12)
    constrained = SamplingParams(temperature=0.0, max_tokens=50, structured_output=schema_output(FIXED_SCHEMAS[1]))
    alone = llm.generate(["hello there"], free, use_tqdm=False)[0].outputs[0].text
    outputs = llm.generate(["hello there", "colours"], [free, constrained], use_tqdm=False)
    assert outputs[0].outputs[0].text == alone  # the free row is untouched by its neighbour's mask
    jsonschema.validate(json.loads(outputs[1].outputs[0].text), FIXED_SCHEMAS[1])


@pytest.mark.parametrize("structured,fragment", [
    (StructuredOutput("json_schema", '{"type": "nope"}'), "nope"),
    (StructuredOutput("json_schema", "{not json"), None),
    (StructuredOutput("regex", "a(b"), "parenthesis"),
    (StructuredOutput("grammar", "root ::= missing"), None),
])
def test_invalid_grammars_are_reported(structured, fragment):
    with pytest.raises(InvalidGrammar, match=fragment):
        check(structured)


def test_unpack_bitmask_marks_the_allowed_ids():
    bitmask = torch.tensor([[0b101, -(1 << 31)], [0, 0]], dtype=torch.int32)  # row 0 allows 0, 2 and 63
    allowed = unpack_bitmask(bitmask, 70, torch.device("cpu"))
    assert allowed.shape == (2, 70)
    assert allowed[0].nonzero().flatten().tolist() == [0, 2, 63] and not allowed[1].any()


# ------------------------------------------------------------------ logit processors
def test_logit_bias_forces_a_token(llm):
    token = llm.tokenizer.encode("hello", add_special_tokens=False)[0]
    (choice,) = generate(llm, "anything", temperature=0.0, max_tokens=5, ignore_eos=True, logit_bias={token: 100})
    assert choice.token_ids == [token] * 5


def test_allowed_token_ids_limit_the_output(llm):
    allowed = llm.tokenizer.encode(" the cat sat on mat", add_special_tokens=False)
    (choice,) = generate(llm, "story", temperature=1.0, seed=2, max_tokens=16, ignore_eos=True,
                         allowed_token_ids=allowed)
    assert set(choice.token_ids) <= set(allowed) and len(choice.token_ids) == 16


def test_bad_words_are_never_completed(llm):
    (free,) = generate(llm, "story time", temperature=0.0, max_tokens=12, ignore_eos=True)
    word = free.token_ids[3:5]
    (banned,) = generate(llm, "story time", temperature=0.0, max_tokens=12, ignore_eos=True,
                         bad_words_token_ids=[word])
    pairs = list(zip(banned.token_ids, banned.token_ids[1:]))
    assert tuple(word) not in pairs and banned.token_ids[:3] == free.token_ids[:3]


def test_banned_next_tokens():
    assert banned_next_tokens([[5]], []) == {5}
    assert banned_next_tokens([[1, 2, 3]], [9, 1, 2]) == {3}
    assert banned_next_tokens([[1, 2, 3]], [1, 9]) == set()


def test_logit_processor_values_are_checked():
    with pytest.raises(InvalidParameter, match="logit_bias"):
        SamplingParams(logit_bias={1: 1000})
    with pytest.raises(InvalidParameter, match="allowed_token_ids"):
        SamplingParams(allowed_token_ids=[])
