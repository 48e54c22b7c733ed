"""One chat choice's text -> content, reasoning_content and tool_calls, whole and streamed."""

from __future__ import annotations

import json
import random

import pytest

from worker.server.chat_output import ChoiceOutput, finish_reason_with_calls
from worker.server.reasoning import make_reasoning_parser
from worker.server.structured import ToolChoice
from worker.server.tool_parsers import PARSERS


def _streamed(output: ChoiceOutput, text: str, seed: int) -> dict:
    rng = random.Random(seed)
    message = {"content": "", "reasoning_content": "", "tool_calls": []}
    deltas = []
    position = 0
    while position < len(text):
        step = rng.randint(1, 6)
        deltas += output.feed(text[position:position + step])
        position += step
    deltas += output.finish()
    for delta in deltas:
        message["content"] += delta.get("content", "")
        message["reasoning_content"] += delta.get("reasoning_content", "")
        for call in delta.get("tool_calls", []):
            assert call["index"] == len(message["tool_calls"])
            message["tool_calls"].append(call)
    return message


def _comparable(message: dict) -> tuple:
    calls = [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in message.get("tool_calls") or []]
    return (message.get("content") or None, message.get("reasoning_content") or None, calls)


CASES = [
    ("qwen3", "hermes", ToolChoice("auto"),
     '<think>\nI should look it up.\n</think>\n\nChecking.\n<tool_call>\n{"name": "w", "arguments": {"c": "P"}}\n</tool_call>'),
    (None, "hermes", ToolChoice("auto"), 'a <tool_call>{"name": "x", "arguments": {}}</tool_call> b'),
    ("qwen3", None, ToolChoice("none"), "<think>hmm</think>The answer."),
    (None, "mistral", ToolChoice("required"), '[{"name": "x", "parameters": {"k": 1}}, {"name": "y", "parameters": {}}]'),
    ("qwen3", "hermes", ToolChoice("named", "w"), '{"c": "Paris"}'),
]


@pytest.mark.parametrize("reasoning,parser,choice,text", CASES)
def test_streamed_message_equals_the_whole_one(reasoning, parser, choice, text):
    def output():
        return ChoiceOutput(make_reasoning_parser(reasoning), choice, PARSERS[parser]() if parser else None)

    whole = output().message(text)
    for seed in range(4):
        assert _comparable(_streamed(output(), text, seed)) == _comparable(whole)


def test_whole_message_shapes():
    message = ChoiceOutput(make_reasoning_parser("qwen3"), ToolChoice("auto"), PARSERS["hermes"]()).message(CASES[0][3])
    assert message["reasoning_content"] == "I should look it up."
    assert message["content"] == "Checking."
    assert message["tool_calls"][0]["function"] == {"name": "w", "arguments": '{"c": "P"}'}
    named = ChoiceOutput(None, ToolChoice("named", "w"), None).message('{"c": "Paris"}')
    assert named["content"] is None and named["tool_calls"][0]["function"]["name"] == "w"
    cut = ChoiceOutput(None, ToolChoice("required"), None).message('[{"name": "x", "param')
    assert "tool_calls" not in cut and cut["content"] == '[{"name": "x", "param'
    plain = ChoiceOutput(None, ToolChoice("none"), PARSERS["hermes"]()).message('<tool_call>{"name": "x"}</tool_call>')
    assert "tool_calls" not in plain  # tool_choice none: the text is left alone


def test_finish_reason_with_calls():
    assert finish_reason_with_calls("stop", [1], ToolChoice("auto")) == "tool_calls"
    assert finish_reason_with_calls("stop", [1], ToolChoice("named", "f")) == "stop"
    assert finish_reason_with_calls("length", [1], ToolChoice("auto")) == "length"
    assert finish_reason_with_calls("stop", [], ToolChoice("auto")) == "stop"


def test_parallel_tool_calls_false_keeps_the_first_call():
    text = '<tool_call>{"name": "a", "arguments": {}}</tool_call><tool_call>{"name": "b", "arguments": {}}</tool_call>'

    def output():
        return ChoiceOutput(None, ToolChoice("auto"), PARSERS["hermes"](), parallel_tool_calls=False)

    assert [c["function"]["name"] for c in output().message(text)["tool_calls"]] == ["a"]
    assert _comparable(_streamed(output(), text, 0)) == (None, None, [("a", {})])
