"""Tool-call parsers on scripted model outputs: one call, several, text around them, malformed calls,
and streaming (deltas reassemble to the non-streamed result, however the text is cut into pieces)."""

from __future__ import annotations

import json
import random

import pytest

from worker.models.chat_templates import CHATML_TEMPLATE, LLAMA3_TEMPLATE, MISTRAL_TEMPLATE
from worker.server.tool_parsers import PARSERS, ToolCallStream, make_tool_parser, parser_for_template


def calls_of(calls):
    return [(c.name, json.loads(c.arguments)) for c in calls]


def parse(name, text):
    return PARSERS[name]().parse(text)


# ------------------------------------------------------------------ hermes (Qwen)
def test_hermes_single_call():
    content, calls = parse("hermes", '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>')
    assert content is None
    assert calls_of(calls) == [("get_weather", {"city": "Paris"})]
    assert calls[0].id.startswith("call_") and calls[0].to_openai()["type"] == "function"


def test_hermes_several_calls_and_text_around():
    text = ('Let me check.\n<tool_call>\n{"name": "a", "arguments": {"x": 1}}\n</tool_call>\n'
            '<tool_call>\n{"name": "b", "arguments": {"y": [1, 2]}}\n</tool_call>\nDone.')
    content, calls = parse("hermes", text)
    assert calls_of(calls) == [("a", {"x": 1}), ("b", {"y": [1, 2]})]
    assert content == "Let me check.\n\n\nDone."


def test_hermes_malformed_call_stays_in_content():
    text = 'ok <tool_call>{"name": "a", "arguments": {"x": </tool_call> <tool_call>{"name": "b", "arguments": {}}</tool_call>'
    content, calls = parse("hermes", text)
    assert calls_of(calls) == [("b", {})]
    assert content == 'ok <tool_call>{"name": "a", "arguments": {"x": </tool_call>'


def test_hermes_unclosed_block_with_complete_json_is_a_call():
    content, calls = parse("hermes", '<tool_call>\n{"name": "a", "arguments": {"q": "}"}}\n')
    assert content is None and calls_of(calls) == [("a", {"q": "}"})]


def test_hermes_arguments_given_as_a_json_string():
    _, calls = parse("hermes", '<tool_call>{"name": "a", "arguments": "{\\"k\\": 2}"}</tool_call>')
    assert calls_of(calls) == [("a", {"k": 2})]


def test_hermes_plain_text_is_content():
    assert parse("hermes", "no tools here") == ("no tools here", [])


# ------------------------------------------------------------------ llama3_json
def test_llama3_single_call_with_python_tag():
    content, calls = parse("llama3_json", '<|python_tag|>{"name": "search", "parameters": {"query": "radix"}}')
    assert content is None and calls_of(calls) == [("search", {"query": "radix"})]


def test_llama3_several_calls_separated_by_semicolons():
    content, calls = parse("llama3_json", '{"name": "a", "parameters": {"x": 1}}; {"name": "b", "parameters": {}}')
    assert content is None and calls_of(calls) == [("a", {"x": 1}), ("b", {})]


def test_llama3_text_around_and_non_call_braces():
    content, calls = parse("llama3_json", 'Here {not json} and {"k": 1} then {"name": "f", "parameters": {"z": true}} end')
    assert calls_of(calls) == [("f", {"z": True})]
    assert content == 'Here {not json} and {"k": 1} then  end'


def test_llama3_malformed_and_unclosed():
    assert parse("llama3_json", '{"name": "a", "parameters": {"x": 1') == ('{"name": "a", "parameters": {"x": 1', [])
    content, calls = parse("llama3_json", '{"name": "a", "parameters": [1]}')
    assert calls == [] and content == '{"name": "a", "parameters": [1]}'


# ------------------------------------------------------------------ mistral
def test_mistral_single_call_array_format():
    content, calls = parse("mistral", '[TOOL_CALLS] [{"name": "add", "arguments": {"a": 1, "b": 2}}]')
    assert content is None and calls_of(calls) == [("add", {"a": 1, "b": 2})]


def test_mistral_several_calls_and_leading_text():
    content, calls = parse("mistral", 'Sure.[TOOL_CALLS][{"name": "a", "arguments": {}}, {"name": "b", "arguments": {"q": "x"}}]')
    assert content == "Sure." and calls_of(calls) == [("a", {}), ("b", {"q": "x"})]


def test_mistral_name_args_format():
    content, calls = parse("mistral", '[TOOL_CALLS]get_time[ARGS]{"tz": "UTC"}[TOOL_CALLS]ping[ARGS]{}')
    assert content is None and calls_of(calls) == [("get_time", {"tz": "UTC"}), ("ping", {})]


def test_mistral_malformed_call_stays_in_content():
    content, calls = parse("mistral", 'x [TOOL_CALLS] [{"name": 3, "arguments": {}}]')
    assert calls == [] and content == 'x [TOOL_CALLS] [{"name": 3, "arguments": {}}]'
    assert parse("mistral", "[TOOL_CALLS] [{") == ("[TOOL_CALLS] [{", [])


# ------------------------------------------------------------------ streaming
SCRIPTS = {
    "hermes": [
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>',
        'Let me check.\n<tool_call>\n{"name": "a", "arguments": {"x": "<tool_call>"}}\n</tool_call>\n'
        '<tool_call>{"name": "b", "arguments": {}}</tool_call> Done <tool',
        'ok <tool_call>{"name": "a", "arguments": {"x": </tool_call> tail',
        "  plain text only  ",
    ],
    "llama3_json": [
        '<|python_tag|>{"name": "search", "parameters": {"query": "a;b}"}}',
        'Here {not json} and {"name": "a", "parameters": {}}; {"name": "b", "parameters": {"n": 2}}',
        '{"name": "a", "parameters": {"x": 1',
    ],
    "mistral": [
        'Sure.[TOOL_CALLS][{"name": "a", "arguments": {}}, {"name": "b", "arguments": {"q": "]"}}]',
        '[TOOL_CALLS]get_time[ARGS]{"tz": "UTC"}',
        "text [TOOL_CALL",
    ],
}


def _stream(name: str, text: str, rng: random.Random) -> tuple[str | None, list]:
    stream = ToolCallStream(PARSERS[name]())
    content, calls = "", []
    position = 0
    while position < len(text):
        step = rng.randint(1, 7)
        delta, new = stream.feed(text[position:position + step])
        content += delta
        calls += new
        position += step
    delta, new = stream.finish()
    return (content + delta) or None, calls + new


@pytest.mark.parametrize("name,text", [(n, t) for n, texts in SCRIPTS.items() for t in texts])
def test_streamed_deltas_reassemble_to_the_non_streamed_result(name, text):
    expected_content, expected_calls = parse(name, text)
    for seed in range(5):
        content, calls = _stream(name, text, random.Random(seed))
        assert content == expected_content
        assert calls_of(calls) == calls_of(expected_calls)


def test_streaming_sends_a_call_as_soon_as_it_closes_and_holds_partial_markers():
    stream = ToolCallStream(PARSERS["hermes"]())
    assert stream.feed("Hello <tool_c") == ("Hello", [])  # the partial marker and the space are held
    assert stream.feed('all>{"name": "f", "arguments": {}}') == ("", [])
    content, calls = stream.feed("</tool_call>")
    assert content == "" and calls_of(calls) == [("f", {})]


# ------------------------------------------------------------------ choosing a parser
def test_parser_chosen_from_the_chat_template():
    assert parser_for_template(CHATML_TEMPLATE) == "hermes"
    assert parser_for_template(LLAMA3_TEMPLATE) == "llama3_json"
    assert parser_for_template(MISTRAL_TEMPLATE) == "mistral"
    assert parser_for_template("{{ messages }}") is None
    assert make_tool_parser("auto", CHATML_TEMPLATE).name == "hermes"
    assert make_tool_parser("mistral", CHATML_TEMPLATE).name == "mistral"
    assert make_tool_parser("none", CHATML_TEMPLATE) is None
    with pytest.raises(ValueError, match="unknown tool-call parser"):
        make_tool_parser("nope", None)
