"""Reasoning parsers: <think> blocks become reasoning_content, streamed or not."""

from __future__ import annotations

import random

import pytest

from worker.server.reasoning import ReasoningStream, make_reasoning_parser


def test_qwen3_splits_the_think_block():
    parser = make_reasoning_parser("qwen3")
    assert parser.parse("<think>\nLet me add 2 and 2.\n</think>\n\nIt is 4.") == ("Let me add 2 and 2.", "It is 4.")
    assert parser.parse("It is 4.") == (None, "It is 4.")  # thinking off: no block in the output
    assert parser.parse("<think>still thinking when max_tokens hit") == ("still thinking when max_tokens hit", None)
    assert parser.parse("<think></think>Answer") == (None, "Answer")


def test_deepseek_r1_output_starts_inside_the_reasoning():
    parser = make_reasoning_parser("deepseek_r1")
    assert parser.parse("First, 2+2.\n</think>\n\n4") == ("First, 2+2.", "4")
    assert parser.parse("<think>x</think>y") == ("x", "y")
    assert parser.parse("no end tag") == ("no end tag", None)


def test_unknown_parser_is_refused():
    assert make_reasoning_parser(None) is None
    with pytest.raises(ValueError, match="unknown reasoning parser"):
        make_reasoning_parser("o1")


TEXTS = ["<think>\nstep one\nstep two\n</think>\n\nfinal answer", "plain answer <think> later", "<think>cut off  ",
         "<thi", "a </think> b"]


@pytest.mark.parametrize("name", ["qwen3", "deepseek_r1"])
@pytest.mark.parametrize("text", TEXTS)
def test_streamed_split_reassembles_to_the_non_streamed_one(name, text):
    parser = make_reasoning_parser(name)
    for seed in range(5):
        rng = random.Random(seed)
        stream = ReasoningStream(parser)
        reasoning = content = ""
        position = 0
        while position < len(text):
            step = rng.randint(1, 5)
            r, c = stream.feed(text[position:position + step])
            reasoning, content, position = reasoning + r, content + c, position + step
        r, c = stream.finish()
        assert ((reasoning + r) or None, (content + c) or None) == parser.parse(text)


def test_stream_holds_a_partial_end_tag():
    stream = ReasoningStream(make_reasoning_parser("qwen3"))
    assert stream.feed("<think>abc</thi") == ("abc", "")
    assert stream.feed("nk>done") == ("", "done")
