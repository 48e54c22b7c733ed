"""Response side of one chat choice: the model's text -> content, reasoning_content and tool_calls.

The text goes through the reasoning parser first (when the server has one), then the content part
through the tool-call parser (tool_choice auto) or, when the call was enforced by a grammar
(tool_choice required / named), is read as the JSON the grammar produced. Streamed, the same split is
made incrementally and sent as OpenAI deltas; the deltas add up to the non-streamed message.
"""

from __future__ import annotations

import json

from worker.server.reasoning import ReasoningParser, ReasoningStream
from worker.server.structured import ToolChoice
from worker.server.tool_parsers import ToolCall, ToolCallStream, ToolParser


def calls_from_constrained_json(text: str, choice: ToolChoice) -> list[ToolCall]:
    """The calls in the JSON that tool_choice required / named made the model write ([] if cut short)."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return []
    if choice.mode == "named":
        return [ToolCall(choice.name, json.dumps(value, ensure_ascii=False))] if isinstance(value, dict) else []
    if not isinstance(value, list):
        return []
    return [ToolCall(item["name"], json.dumps(item.get("parameters", {}), ensure_ascii=False))
            for item in value if isinstance(item, dict) and isinstance(item.get("name"), str)]


def echoed_text(echo: bool, messages: list[dict], add_generation_prompt: bool) -> str:
    """What `echo` puts before a chat response's content ("" when nothing is echoed).

    As vLLM: the last message is echoed when its role is the response's role. vLLM's response role is
    the assistant's when the template adds a generation prompt and the last message's role when it does
    not (the message is being continued: continue_final_message, or add_generation_prompt false), so
    the last message counts when it is the assistant's or when no generation prompt is added.
    """
    if not echo:
        return ""
    last = messages[-1]
    if add_generation_prompt and last.get("role") != "assistant":
        return ""
    return last.get("content") or ""  # parse_messages already joined text parts into one string


def with_echo(message: dict, echo: str) -> dict:
    """A whole chat message with the echoed text before its content (unchanged when there is none)."""
    if echo:
        message["content"] = echo + (message.get("content") or "")
    return message


def finish_reason_with_calls(finish_reason: str | None, calls: list, choice: ToolChoice) -> str | None:
    """"tool_calls" when the model stopped to call tools (OpenAI keeps "stop" for a named function)."""
    if calls and finish_reason == "stop" and choice.mode != "named":
        return "tool_calls"
    return finish_reason


class ChoiceOutput:
    """Splits one choice's text; `message()` for a whole output, `feed()` / `finish()` for a stream."""

    def __init__(self, reasoning: ReasoningParser | None, choice: ToolChoice, tool_parser: ToolParser | None,
                 parallel_tool_calls: bool = True):
        self.choice = choice
        self.max_calls = None if parallel_tool_calls else 1  # auto: later calls are dropped (required: grammar)
        self.constrained = choice.mode in ("required", "named")
        # a grammar-constrained output is the call JSON from its first token: no reasoning block in it
        self.reasoning = None if self.constrained else reasoning
        self.tool_parser = tool_parser if choice.mode == "auto" else None
        self._reasoning_stream = ReasoningStream(self.reasoning) if self.reasoning else None
        self._tool_stream = ToolCallStream(self.tool_parser) if self.tool_parser else None
        self._text = ""
        self.calls: list[ToolCall] = []

    # ------------------------------------------------------------------ whole output
    def message(self, text: str) -> dict:
        reasoning, content = None, text
        if self.reasoning is not None:
            reasoning, content = self.reasoning.parse(text)
            content = content or ""
        if self.constrained:
            self.calls = calls_from_constrained_json(content, self.choice)
            content = "" if self.calls else content
        elif self.tool_parser is not None:
            content, self.calls = self.tool_parser.parse(content)
            self.calls = self.calls[: self.max_calls]
        message: dict = {"role": "assistant", "content": content or (None if self.calls else content)}
        if self.reasoning is not None:
            message["reasoning_content"] = reasoning
        if self.calls:
            message["tool_calls"] = [call.to_openai() for call in self.calls]
        return message

    # ------------------------------------------------------------------ streaming
    def feed(self, text: str) -> list[dict]:
        return self._deltas(text, final=False)

    def finish(self) -> list[dict]:
        return self._deltas("", final=True)

    def _deltas(self, text: str, final: bool) -> list[dict]:
        reasoning, content = "", text
        if self._reasoning_stream is not None:
            reasoning, content = self._reasoning_stream.finish() if final else self._reasoning_stream.feed(text)
        deltas: list[dict] = []
        if reasoning:
            deltas.append({"reasoning_content": reasoning})
        new_calls: list[ToolCall] = []
        if self.constrained:
            self._text += content
            content = ""
            if final:
                new_calls = calls_from_constrained_json(self._text, self.choice)
                content = "" if new_calls else self._text
        elif self._tool_stream is not None:
            if final:
                fed, fed_calls = self._tool_stream.feed(content)
                rest, rest_calls = self._tool_stream.finish()
                content, new_calls = fed + rest, fed_calls + rest_calls
            else:
                content, new_calls = self._tool_stream.feed(content)
        if content:
            deltas.append({"content": content})
        if self.max_calls is not None:
            new_calls = new_calls[: max(0, self.max_calls - len(self.calls))]
        for call in new_calls:
            deltas.append({"tool_calls": [{"index": len(self.calls), **call.to_openai()}]})
            self.calls.append(call)
        return deltas
