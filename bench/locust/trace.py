"""Trace files for replay: JSON Lines, one request per line, in arrival order.

    {"arrival_s": 0.0, "session_id": "s1", "messages": [{"role": "user", "content": "hi"}], "output_tokens": 32}
    {"arrival_s": 0.4, "session_id": "s2", "prompt": "Once upon a time", "output_tokens": 16}

arrival_s: seconds from the start of the run (non-decreasing); session_id: a string (sent as the
X-Session-ID header and `user` field); exactly one of messages (a chat history, sent as is) or prompt
(a completion prompt); output_tokens: a positive integer (max_tokens). Blank lines are skipped.
A bad line raises TraceError naming the file, the line number and what is wrong with it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

ROLES = ("system", "user", "assistant", "tool", "developer")


class TraceError(ValueError):
    pass


@dataclass(frozen=True)
class TraceRecord:
    line: int
    arrival_s: float
    session_id: str
    output_tokens: int
    messages: list | None = None
    prompt: str | None = None


def _check_messages(messages: object) -> str | None:
    """None when `messages` is a usable chat history, else what is wrong with it."""
    if not isinstance(messages, list) or not messages:
        return "'messages' must be a non-empty list"
    for k, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            return f"messages[{k}] must be an object with a 'role' ({'/'.join(ROLES)}) and a string 'content'"
    return None


def parse_line(text: str, path: str, line: int) -> TraceRecord:
    where = f"{path}:{line}"
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise TraceError(f"{where}: not valid JSON ({exc.msg} at column {exc.colno})") from None
    if not isinstance(data, dict):
        raise TraceError(f"{where}: each line must be a JSON object, got {type(data).__name__}")
    arrival = data.get("arrival_s")
    if isinstance(arrival, bool) or not isinstance(arrival, (int, float)) or arrival < 0:
        raise TraceError(f"{where}: 'arrival_s' must be a number of seconds >= 0, got {arrival!r}")
    session = data.get("session_id")
    if not isinstance(session, (str, int)) or isinstance(session, bool) or str(session) == "":
        raise TraceError(f"{where}: 'session_id' must be a non-empty string, got {session!r}")
    output = data.get("output_tokens")
    if isinstance(output, bool) or not isinstance(output, int) or output < 1:
        raise TraceError(f"{where}: 'output_tokens' must be an integer >= 1, got {output!r}")
    has_messages, has_prompt = "messages" in data, "prompt" in data
    if has_messages == has_prompt:
        raise TraceError(f"{where}: give exactly one of 'messages' or 'prompt'")
    if has_messages:
        problem = _check_messages(data["messages"])
        if problem:
            raise TraceError(f"{where}: {problem}")
    elif not isinstance(data["prompt"], str) or not data["prompt"]:
        raise TraceError(f"{where}: 'prompt' must be a non-empty string")
    return TraceRecord(line=line, arrival_s=float(arrival), session_id=str(session), output_tokens=output,
                       messages=data.get("messages"), prompt=data.get("prompt"))


def read_trace(path: str | Path) -> list[TraceRecord]:
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise TraceError(f"cannot read trace {path}: {exc.strerror or exc}") from None
    records: list[TraceRecord] = []
    for number, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip():
            continue
        record = parse_line(raw, str(path), number)
        if records and record.arrival_s < records[-1].arrival_s:
            raise TraceError(f"{path}:{number}: arrival_s {record.arrival_s} is earlier than line "
                             f"{records[-1].line}'s {records[-1].arrival_s}: sort the trace by arrival time")
        records.append(record)
    if not records:
        raise TraceError(f"{path}: the trace has no requests")
    return records
