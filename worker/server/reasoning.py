"""Reasoning parsers: split `<think>...</think>` off a model's output into `reasoning_content`.

`--reasoning-parser qwen3`: Qwen3 writes `<think>` itself; an output that does not start with it has no
reasoning (thinking switched off: the template then put an empty think block in the prompt), and an
output cut off before `</think>` is all reasoning.
`--reasoning-parser deepseek_r1`: DeepSeek-R1's template ends the prompt with `<think>`, so the output
starts inside the reasoning; everything up to `</think>` is reasoning (all of it if `</think>` never comes).

`ReasoningStream` gives the same split as deltas: each piece of text is scanned with the text before it,
and only the settled part of each field is sent (a partial `</think>` at the end is held back), so the
deltas reassemble to the non-streamed result.
"""

from __future__ import annotations

from worker.server.tool_parsers.base import partial_marker_length

START, END = "<think>", "</think>"


class ReasoningParser:
    name = ""
    starts_in_reasoning = False  # deepseek_r1: the prompt opened the think block

    def split(self, text: str, final: bool = True) -> tuple[str, str]:
        """(reasoning, content) of `text`; with final=False only the parts that cannot change any more."""
        if not self.starts_in_reasoning:
            stripped = text.lstrip()
            if not stripped.startswith(START):
                if not final and START.startswith(stripped):
                    return "", ""  # could still become "<think>"
                return "", text
            text = stripped[len(START):]
        elif text.lstrip().startswith(START):
            text = text.lstrip()[len(START):]
        elif not final and START.startswith(text.lstrip()) and text.strip():
            return "", ""
        end = text.find(END)
        if end < 0:
            if final:
                return text, ""
            return text[: len(text) - partial_marker_length(text, END)], ""
        return text[:end], text[end + len(END):]

    def parse(self, text: str) -> tuple[str | None, str | None]:
        """(reasoning_content, content) of a finished output, None for an empty part."""
        reasoning, content = self.split(text, final=True)
        return (reasoning.strip() or None), (content.lstrip() or None)


class Qwen3ReasoningParser(ReasoningParser):
    name = "qwen3"


class DeepSeekR1ReasoningParser(ReasoningParser):
    name = "deepseek_r1"
    starts_in_reasoning = True


REASONING_PARSERS: dict[str, type[ReasoningParser]] = {
    cls.name: cls for cls in (Qwen3ReasoningParser, DeepSeekR1ReasoningParser)
}


def make_reasoning_parser(name: str | None) -> ReasoningParser | None:
    if not name or name == "none":
        return None
    if name not in REASONING_PARSERS:
        raise ValueError(f"unknown reasoning parser {name!r}; choose one of {', '.join(REASONING_PARSERS)}")
    return REASONING_PARSERS[name]()


class ReasoningStream:
    """Streamed split of one choice: `feed(delta)` / `finish()` -> (reasoning delta, content delta).

    Reasoning is sent stripped of leading whitespace with trailing whitespace held back, content with
    its leading whitespace dropped, matching `ReasoningParser.parse`.
    """

    def __init__(self, parser: ReasoningParser):
        self.parser = parser
        self._text = ""
        self._sent_reasoning = 0
        self._sent_content = 0

    def feed(self, delta: str) -> tuple[str, str]:
        self._text += delta
        return self._emit(final=False)

    def finish(self) -> tuple[str, str]:
        return self._emit(final=True)

    def _emit(self, final: bool) -> tuple[str, str]:
        reasoning, content = self.parser.split(self._text, final)
        reasoning = reasoning.lstrip()
        reasoning = reasoning.rstrip() if (final or content) else reasoning[: len(reasoning.rstrip())]
        content = content.lstrip()
        new_reasoning = reasoning[self._sent_reasoning:]
        new_content = content[self._sent_content:]
        self._sent_reasoning = max(self._sent_reasoning, len(reasoning))
        self._sent_content = max(self._sent_content, len(content))
        return new_reasoning, new_content
