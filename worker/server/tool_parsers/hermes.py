"""Hermes-style calls, as Qwen2.5 and Qwen3 write them: `<tool_call>\n{"name": ..., "arguments": {...}}\n</tool_call>`.

Several calls are several blocks; text may come before, between and after them. A block the model did
not close is a call if its JSON is complete at the end of the output (generation often stops right
after the object); a block whose JSON does not parse stays in the content as written.
"""

from __future__ import annotations

import json

from worker.server.tool_parsers.base import ScanResult, ToolParser, call_from_json, partial_marker_length

START, END = "<tool_call>", "</tool_call>"


class HermesToolParser(ToolParser):
    name = "hermes"

    def scan(self, text: str, final: bool) -> ScanResult:
        content: list[str] = []
        calls = []
        position = 0
        while True:
            start = text.find(START, position)
            if start < 0:
                tail = text[position:]
                if not final:
                    tail = tail[: len(tail) - partial_marker_length(tail, START)]
                content.append(tail)
                break
            content.append(text[position:start])
            body_start = start + len(START)
            end = text.find(END, body_start)
            if end < 0:  # an open block: still being written, or the model stopped without closing it
                if final:
                    call = _parse_block(text[body_start:])
                    if call is None:
                        content.append(text[start:])
                    else:
                        calls.append(call)
                break
            call = _parse_block(text[body_start:end])
            if call is None:
                content.append(text[start:end + len(END)])
            else:
                calls.append(call)
            position = end + len(END)
        return ScanResult("".join(content), calls)


def _parse_block(body: str):
    try:
        return call_from_json(json.loads(body))
    except json.JSONDecodeError:
        return None
