"""Llama 3.1 / 3.2 JSON tool calls: `{"name": ..., "parameters": {...}}`, optionally after `<|python_tag|>`.

Several calls come as several objects (separated by `;` or whitespace). Any JSON object in the text
with a string "name" and an object "parameters" (or "arguments") is a call; other text, and braces that
are not such an object, stay in the content.
"""

from __future__ import annotations

import json

from worker.server.tool_parsers.base import ScanResult, ToolParser, call_from_json, json_value_end, partial_marker_length

PYTHON_TAG = "<|python_tag|>"


class Llama3JsonToolParser(ToolParser):
    name = "llama3_json"
    needs_special_tokens = True  # <|python_tag|> is a special token: keep it so it can be removed here

    def scan(self, text: str, final: bool) -> ScanResult:
        text = text.replace(PYTHON_TAG, "")
        if not final:
            text = text[: len(text) - partial_marker_length(text, PYTHON_TAG)]
        content: list[str] = []
        calls = []
        position = 0
        after_call = False
        while True:
            start = text.find("{", position)
            if start < 0:
                content.append(_separator_stripped(text[position:], after_call))
                break
            end = json_value_end(text, start)
            if end is None:  # an object still open at the end
                content.append(_separator_stripped(text[position:start], after_call))
                if final:
                    content.append(text[start:])
                break
            try:
                call = call_from_json(json.loads(text[start:end]))
            except json.JSONDecodeError:
                call = None
            if call is None:
                content.append(_separator_stripped(text[position:end], after_call))
                after_call = False
            else:
                content.append(_separator_stripped(text[position:start], after_call))
                calls.append(call)
                after_call = True
            position = end
        return ScanResult("".join(content), calls)


def _separator_stripped(text: str, after_call: bool) -> str:
    """Drop the `;` that separates consecutive calls."""
    if after_call:
        stripped = text.lstrip()
        if stripped.startswith(";"):
            return stripped[1:]
    return text
