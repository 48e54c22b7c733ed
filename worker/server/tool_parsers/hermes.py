"""Hermes-style calls, as Qwen2.5 and Qwen3 write them: `<tool_call>\n{"name": ..., "arguments": {...}}\n</tool_call>`.

Several calls are several blocks; text may come before, between and after them. A block the model did
not close is a call if its JSON is complete at the end of the output (generation often stops right
after the object); a block whose JSON does not parse stays in the content as written.
"""

from __future__ import annotations

import json

from worker.server.tool_parsers.base import ScanResult, ToolParser, call_from_json, scan_marked_blocks

START, END = "<tool_call>", "</tool_call>"


class HermesToolParser(ToolParser):
    name = "hermes"

    def scan(self, text: str, final: bool) -> ScanResult:
        return scan_marked_blocks(text, final, START, _read_block)


def _read_block(text: str, body: int, final: bool):
    end = text.find(END, body)
    if end < 0:  # an open block: still being written, or the model stopped without closing it
        call = _parse_block(text[body:]) if final else None
        return ([call], len(text)) if call else (None, None)
    call = _parse_block(text[body:end])
    return ([call] if call else None), end + len(END)


def _parse_block(body: str):
    try:
        return call_from_json(json.loads(body))
    except json.JSONDecodeError:
        return None
