"""The trace parser: good lines read back, each malformed line gets one message naming file and line."""

from __future__ import annotations

import json

import pytest

from bench.locust.trace import TraceError, read_trace


def write(tmp_path, lines):
    path = tmp_path / "t.jsonl"
    path.write_text("\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines) + "\n")
    return path


GOOD_CHAT = {"arrival_s": 0.0, "session_id": "s1", "messages": [{"role": "user", "content": "hi"}],
             "output_tokens": 8}
GOOD_PROMPT = {"arrival_s": 0.5, "session_id": 7, "prompt": "Once upon", "output_tokens": 3}


def test_good_lines_read_back_with_their_line_numbers(tmp_path):
    records = read_trace(write(tmp_path, [GOOD_CHAT, "", GOOD_PROMPT]))
    assert [r.line for r in records] == [1, 3]
    assert records[0].messages == GOOD_CHAT["messages"] and records[0].prompt is None
    assert records[1].prompt == "Once upon" and records[1].session_id == "7" and records[1].output_tokens == 3


def test_the_shipped_synthetic_trace_parses():
    records = read_trace("bench/traces/synthetic_chat.jsonl")
    assert len(records) > 20
    assert any(r.prompt for r in records) and any(r.messages for r in records)
    assert len({r.session_id for r in records}) < len(records)  # sessions come back for more turns


@pytest.mark.parametrize("bad, problem", [
    ("{not json", "not valid JSON"),
    ("[1, 2]", "must be a JSON object"),
    ({**GOOD_CHAT, "arrival_s": -1}, "'arrival_s' must be a number"),
    ({**GOOD_CHAT, "arrival_s": "soon"}, "'arrival_s' must be a number"),
    ({**GOOD_CHAT, "session_id": ""}, "'session_id' must be a non-empty string"),
    ({k: v for k, v in GOOD_CHAT.items() if k != "output_tokens"}, "'output_tokens' must be an integer"),
    ({**GOOD_CHAT, "output_tokens": 0}, "'output_tokens' must be an integer >= 1"),
    ({**GOOD_CHAT, "prompt": "x"}, "exactly one of 'messages' or 'prompt'"),
    ({k: v for k, v in GOOD_CHAT.items() if k != "messages"}, "exactly one of 'messages' or 'prompt'"),
    ({**GOOD_CHAT, "messages": [{"role": "robot", "content": "x"}]}, r"messages\[0\] must be an object"),
    ({**GOOD_CHAT, "messages": []}, "'messages' must be a non-empty list"),
    ({**GOOD_PROMPT, "prompt": 5}, "'prompt' must be a non-empty string"),
])
def test_a_malformed_line_names_file_line_and_problem(tmp_path, bad, problem):
    path = write(tmp_path, [GOOD_CHAT, bad])
    with pytest.raises(TraceError, match=problem) as info:
        read_trace(path)
    assert str(info.value).startswith(f"{path}:2: ")


def test_arrivals_out_of_order_are_refused(tmp_path):
    path = write(tmp_path, [GOOD_PROMPT, GOOD_CHAT])
    with pytest.raises(TraceError, match=rf"{path}:2: arrival_s 0.0 is earlier than line 1"):
        read_trace(path)


def test_missing_and_empty_traces(tmp_path):
    with pytest.raises(TraceError, match="cannot read trace"):
        read_trace(tmp_path / "absent.jsonl")
    with pytest.raises(TraceError, match="has no requests"):
        read_trace(write(tmp_path, ["", "  "]))
