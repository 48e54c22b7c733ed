"""Tool-call parsers, one per model family format, chosen by `--tool-call-parser` or from the chat template.

| name | format | families |
|---|---|---|
| `hermes` | `<tool_call>{json}</tool_call>` | Qwen2.5, Qwen3, Hermes |
| `llama3_json` | `{"name": ..., "parameters": {...}}` (after `<|python_tag|>` or alone) | Llama 3.1 / 3.2 |
| `mistral` | `[TOOL_CALLS][{...}, ...]` or `[TOOL_CALLS]name[ARGS]{...}` | Mistral |
"""

from __future__ import annotations

from worker.server.tool_parsers.base import ScanResult, ToolCall, ToolCallStream, ToolParser
from worker.server.tool_parsers.hermes import HermesToolParser
from worker.server.tool_parsers.llama3_json import Llama3JsonToolParser
from worker.server.tool_parsers.mistral import MistralToolParser

PARSERS: dict[str, type[ToolParser]] = {
    cls.name: cls for cls in (HermesToolParser, Llama3JsonToolParser, MistralToolParser)
}
TOOL_CALL_PARSER_CHOICES = ("auto", "none", *PARSERS)


def parser_for_template(chat_template: str | None) -> str | None:
    """The parser a chat template's tool format calls for (None: the template shows no tool format)."""
    if not chat_template:
        return None
    if "<tool_call>" in chat_template:
        return "hermes"
    if "[TOOL_CALLS]" in chat_template:
        return "mistral"
    if "<|start_header_id|>" in chat_template and ('"parameters"' in chat_template or "<|python_tag|>" in chat_template):
        return "llama3_json"
    return None


def make_tool_parser(setting: str, chat_template: str | None) -> ToolParser | None:
    """The parser for `--tool-call-parser` (auto: from the chat template; none: no parsing)."""
    if setting == "none":
        return None
    name = parser_for_template(chat_template) if setting == "auto" else setting
    if name is None:
        return None
    if name not in PARSERS:
        raise ValueError(f"unknown tool-call parser {name!r}; choose one of {', '.join(TOOL_CALL_PARSER_CHOICES)}")
    return PARSERS[name]()


__all__ = ["PARSERS", "TOOL_CALL_PARSER_CHOICES", "ScanResult", "ToolCall", "ToolCallStream", "ToolParser",
           "make_tool_parser", "parser_for_template"]
