"""Mistral tool calls: `[TOOL_CALLS]` then a JSON array of `{"name": ..., "arguments": {...}}` (v0.3 format),
or the newer `[TOOL_CALLS]name[ARGS]{...}` per call.

Text before the first `[TOOL_CALLS]` is content. `[TOOL_CALLS]` is a special token, so the request's
text must be decoded with special tokens kept (`needs_special_tokens`).
"""

from __future__ import annotations

import json

from worker.server.tool_parsers.base import (
    ScanResult, ToolCall, ToolParser, call_from_json, json_value_end, scan_marked_blocks,
)

MARKER = "[TOOL_CALLS]"
ARGS = "[ARGS]"


class MistralToolParser(ToolParser):
    name = "mistral"
    needs_special_tokens = True

    def scan(self, text: str, final: bool) -> ScanResult:
        return scan_marked_blocks(text, final, MARKER, lambda text, body, final: _calls_at(text, body))


def _calls_at(text: str, body: int) -> tuple[list[ToolCall] | None, int | None]:
    """Parse the calls after one [TOOL_CALLS]: (calls or None if malformed, end index or None if open)."""
    i = body
    while i < len(text) and text[i].isspace():
        i += 1
    if i == len(text):
        return None, None
    if text[i] in "[{":
        end = json_value_end(text, i)
        if end is None:
            return None, None
        try:
            value = json.loads(text[i:end])
        except json.JSONDecodeError:
            return None, end
        items = value if isinstance(value, list) else [value]
        calls = [call_from_json(item) for item in items]
        return (None if not calls or any(c is None for c in calls) else calls), end
    args = text.find(ARGS, i)  # name[ARGS]{...}
    if args < 0:
        return None, None
    name = text[i:args].strip()
    open_at = args + len(ARGS)
    while open_at < len(text) and text[open_at].isspace():
        open_at += 1
    if open_at == len(text):
        return None, None
    end = json_value_end(text, open_at) if text[open_at] == "{" else open_at
    if end is None:
        return None, None
    try:
        call = call_from_json({"name": name, "arguments": json.loads(text[open_at:end])})
    except json.JSONDecodeError:
        call = None
    return ([call] if call else None), end
