"""What every tool-call parser shares: the parsed call, the scan result, JSON helpers, and streaming.

A parser's job is one function, `scan(text, final)`: split the model's text into the content outside
tool calls and the calls themselves. With `final=False` (streaming) the text may stop mid-call, so a
parser leaves out (holds back) any trailing part that may still become a call; with `final=True` it
decides everything. A call whose JSON does not parse stays in the content as the model wrote it, so
nothing the model said is lost.

`ToolCallStream` turns that into streamed deltas: after each piece of text it scans the whole text so
far and sends what is new (content that can no longer change, calls that closed). Because content is
only sent once settled and calls only once complete, the deltas always reassemble to exactly what a
non-streamed response carries.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field


@dataclass
class ToolCall:
    name: str
    arguments: str  # a JSON object, serialised (the OpenAI API sends arguments as a string)
    id: str = field(default_factory=lambda: "call_" + uuid.uuid4().hex[:24])

    def to_openai(self) -> dict:
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


@dataclass
class ScanResult:
    content: str  # the text outside tool calls (settled part only when not final)
    calls: list[ToolCall]


class ToolParser:
    """Base class: `scan` is the whole interface; `name` is the --tool-call-parser value."""

    name = ""
    # True when the format's markers are special tokens, which the detokenizer must then keep.
    needs_special_tokens = False

    def scan(self, text: str, final: bool) -> ScanResult:
        raise NotImplementedError

    def parse(self, text: str) -> tuple[str | None, list[ToolCall]]:
        """(content or None when blank, calls) of a finished output."""
        result = self.scan(text, final=True)
        return (result.content.strip() or None), result.calls


def call_from_json(value: object, argument_keys: tuple[str, ...] = ("arguments", "parameters")) -> ToolCall | None:
    """A ToolCall from a decoded `{"name": str, "arguments" | "parameters": object}`; None if not one."""
    if not isinstance(value, dict) or not isinstance(value.get("name"), str) or not value["name"]:
        return None
    arguments: object = {}
    for key in argument_keys:
        if key in value:
            arguments = value[key]
            break
    if isinstance(arguments, str):  # some models write the arguments already serialised
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError:
            return None
    if not isinstance(arguments, dict):
        return None
    return ToolCall(value["name"], json.dumps(arguments, ensure_ascii=False))


def json_value_end(text: str, start: int) -> int | None:
    """The index just past the JSON object or array opening at text[start], or None if it does not close.

    Only brackets outside strings count, so `{"a": "}"}` ends where it should. This decides "complete or
    still being written" for streaming; whether the span is valid JSON is json.loads' call.
    """
    depth = 0
    in_string = False
    escaped = False
    for i in range(start, len(text)):
        char = text[i]
        if in_string:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif char in "{[":
            depth += 1
        elif char in "}]":
            depth -= 1
            if depth == 0:
                return i + 1
    return None


def partial_marker_length(text: str, marker: str) -> int:
    """How many trailing characters of `text` could be the start of `marker` (held back while streaming)."""
    for length in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-length:]):
            return length
    return 0


def scan_marked_blocks(text: str, final: bool, marker: str, read_block) -> ScanResult:
    """The scan of formats whose calls follow a marker (`<tool_call>`, `[TOOL_CALLS]`).

    `read_block(text, body_start, final)` reads what follows one marker: (calls, or None when malformed;
    the index past the block, or None while it is still open). Text outside blocks, and malformed blocks
    as written, is content; an open block is held back, or kept as content once the output is final.
    """
    content: list[str] = []
    calls: list[ToolCall] = []
    position = 0
    while True:
        start = text.find(marker, position)
        if start < 0:
            tail = text[position:]
            if not final:
                tail = tail[: len(tail) - partial_marker_length(tail, marker)]
            content.append(tail)
            break
        content.append(text[position:start])
        found, end = read_block(text, start + len(marker), final)
        if end is None:
            if final:
                content.append(text[start:])
            break
        if found is None:
            content.append(text[start:end])
        else:
            calls.extend(found)
        position = end
    return ScanResult("".join(content), calls)


class ToolCallStream:
    """Incremental tool-call extraction for one streamed choice.

    `feed(delta)` and then `finish()` return (content delta, new calls). Content is sent without leading
    whitespace and with trailing whitespace held back until more text follows, so the sent content equals
    the non-streamed (stripped) content exactly.
    """

    def __init__(self, parser: ToolParser):
        self.parser = parser
        self._text = ""
        self._sent_content = 0  # characters of the stripped content already sent
        self._sent_calls: list[ToolCall] = []

    @property
    def calls(self) -> list[ToolCall]:
        return list(self._sent_calls)

    def feed(self, delta: str) -> tuple[str, list[ToolCall]]:
        self._text += delta
        return self._emit(self.parser.scan(self._text, final=False), final=False)

    def finish(self) -> tuple[str, list[ToolCall]]:
        return self._emit(self.parser.scan(self._text, final=True), final=True)

    def _emit(self, result: ScanResult, final: bool) -> tuple[str, list[ToolCall]]:
        content = result.content.lstrip()
        content = content.rstrip() if final else content[: len(content.rstrip())]
        new_content = content[self._sent_content:]
        self._sent_content = max(self._sent_content, len(content))
        new_calls = result.calls[len(self._sent_calls):]
        self._sent_calls.extend(new_calls)
        return new_content, new_calls
