"""From generated token ids to the text a client sees: incremental detokenization and stop strings.

Pure Python, shared by the HTTP frontend and the offline `LLM` API. The engine only speaks token ids;
for each choice of a request the caller keeps one `ChoiceTextState`, feeds it the new token ids of every
engine event, and forwards the text deltas it returns. When it reports a stop string, the caller aborts
that choice in the engine and reports finish_reason "stop".

The tokenizer is duck-typed: anything with `decode(ids, skip_special_tokens=bool) -> str`.
"""

from __future__ import annotations

from typing import Protocol, Sequence

from worker.sampling_params import SamplingParams

REPLACEMENT_CHAR = "\ufffd"  # what a byte-level decode yields for an incomplete UTF-8 sequence


class Decoder(Protocol):
    def decode(self, ids: Sequence[int], skip_special_tokens: bool = ...) -> str: ...


class IncrementalDetokenizer:
    """Decodes a growing token sequence into text deltas, decoding only a short window of recent tokens.

    The window technique (as in vLLM and TGI): `prefix_offset` and `read_offset` delimit the tokens whose
    text was already emitted but that still give the next token its left context (a space before a word,
    the rest of a character). Each step decodes `tokens[prefix_offset:read_offset]` and
    `tokens[prefix_offset:]`; the new text is what the second adds to the first. While that ends in U+FFFD,
    a character is still split over tokens, so nothing is emitted until a later token completes it.

    The last few prompt tokens seed the window, so the first output token's leading space is decided
    as in the full text (sentencepiece-style decoders drop the leading space of a decode's first token).
    Concatenating all deltas (and the flush) gives `tokenizer.decode(output_ids)`, except that a leading
    space which decode would drop at the start of a text is kept after a prompt. `flush()` releases a character left incomplete when the stream ends (as U+FFFD,
    as a full decode would show it).
    """

    PROMPT_CONTEXT_TOKENS = 5  # prompt tokens kept as left context of the first output token

    def __init__(self, tokenizer: Decoder, prompt_token_ids: Sequence[int], skip_special_tokens: bool = True):
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        context_start = max(0, len(prompt_token_ids) - self.PROMPT_CONTEXT_TOKENS)
        context = list(prompt_token_ids[context_start:])
        if context and tokenizer.decode(context, skip_special_tokens=skip_special_tokens).endswith(REPLACEMENT_CHAR):
            # The prompt ends inside a character: its bytes would merge with the output's first bytes and
            # the output's text would no longer be its own decode. Byte-level tokenizers need no context.
            context = []
        self._tokens: list[int] = context
        self._prefix_offset = 0
        self._read_offset = len(self._tokens)
        self._pieces: list[str] = []
        self.num_tokens = 0  # output tokens added so far

    @property
    def text(self) -> str:
        """All output text emitted so far."""
        return "".join(self._pieces)

    def add(self, new_token_ids: Sequence[int]) -> str:
        """Append output tokens; return the text they complete (possibly empty)."""
        if not new_token_ids:
            return ""
        self._tokens.extend(new_token_ids)
        self.num_tokens += len(new_token_ids)
        prefix_text, full_text = self._decode_window()
        if len(full_text) <= len(prefix_text) or full_text.endswith(REPLACEMENT_CHAR):
            return ""  # a character is still incomplete (or the tokens added no text yet)
        delta = full_text[len(prefix_text) :]
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._tokens)
        self._drop_consumed_tokens()
        self._pieces.append(delta)
        return delta

    def flush(self) -> str:
        """End of the stream: return the held-back text of incomplete characters, as U+FFFD."""
        if self._read_offset == len(self._tokens):
            return ""
        prefix_text, full_text = self._decode_window()
        delta = full_text[len(prefix_text) :]
        self._prefix_offset = self._read_offset = len(self._tokens)
        self._drop_consumed_tokens()
        if delta:
            self._pieces.append(delta)
        return delta

    def _decode_window(self) -> tuple[str, str]:
        decode = self._tokenizer.decode
        window = self._tokens[self._prefix_offset :]
        read = self._read_offset - self._prefix_offset
        prefix_text = decode(window[:read], skip_special_tokens=self._skip_special_tokens)
        full_text = decode(window, skip_special_tokens=self._skip_special_tokens)
        return prefix_text, full_text

    def _drop_consumed_tokens(self) -> None:
        """Forget tokens left of the window so memory stays bounded on long outputs."""
        if self._prefix_offset:
            del self._tokens[: self._prefix_offset]
            self._read_offset -= self._prefix_offset
            self._prefix_offset = 0


class StopStringMatcher:
    """Finds stop strings in streamed text, holding back text that may be the start of one.

    `process(delta)` returns (text safe to emit now, the matched stop string or None). A stop string may span
    any number of deltas. On a match the emitted text ends right before the stop string (right after it with
    `include_stop_str_in_output`), and everything after is dropped. When several stop strings occur, the one
    that is complete first in the text wins (on a tie, the one that starts first): the result depends only on
    the text, never on how it was split into deltas. `flush()` releases held-back text at the end of a stream.
    """

    def __init__(self, stop: Sequence[str], include_stop_str_in_output: bool = False):
        if any(not s for s in stop):
            raise ValueError("stop strings must not be empty")
        self._stop = list(dict.fromkeys(stop))  # unique, in order
        self._include = include_stop_str_in_output
        self._longest = max((len(s) for s in self._stop), default=0)
        self._held = ""
        self.matched: str | None = None

    @property
    def finished(self) -> bool:
        return self.matched is not None

    def process(self, delta: str, allow_match: bool = True) -> tuple[str, str | None]:
        """Take new text; return (text to emit now, stop string matched in it or None).

        With `allow_match=False` (min_tokens not reached yet) stop strings completed by this text do not count,
        but a stop string that starts here and is completed by later text still does.
        After a match, further text is ignored: ("", None).
        """
        if self.finished:
            return "", None
        if not self._stop:
            return delta, None
        buffer = self._held + delta
        if allow_match:
            # Matches that ended inside the held-back text were ruled out when it arrived.
            match = self._earliest_match(buffer, min_end=len(self._held) + 1)
            if match is not None:
                start, stop = match
                self.matched = stop
                self._held = ""
                end = start + len(stop) if self._include else start
                return buffer[:end], stop
        keep = self._undecided_suffix_length(buffer)
        self._held = buffer[len(buffer) - keep :] if keep else ""
        return buffer[: len(buffer) - keep], None

    def flush(self) -> str:
        """End of the stream: release the held-back text (it can no longer become a stop string)."""
        held, self._held = self._held, ""
        return "" if self.finished else held

    def _earliest_match(self, text: str, min_end: int) -> tuple[int, str] | None:
        """(start, stop string) of the match that ends first at or after `min_end`; ties: earliest start."""
        best: tuple[int, int, str] | None = None  # (end, start, stop)
        for stop in self._stop:
            start = text.find(stop, max(0, min_end - len(stop)))
            if start == -1:
                continue
            candidate = (start + len(stop), start, stop)
            if best is None or candidate < best:
                best = candidate
        return None if best is None else (best[1], best[2])

    def _undecided_suffix_length(self, text: str) -> int:
        """Length of the longest suffix of `text` that is a proper prefix of some stop string."""
        for length in range(min(len(text), self._longest - 1), 0, -1):
            suffix = text[len(text) - length :]
            if any(len(stop) > length and stop.startswith(suffix) for stop in self._stop):
                return length
        return 0


class ChoiceTextState:
    """The text side of one choice: detokenizes its tokens and applies its stop strings.

    `feed(new_token_ids)` returns (text delta to send, stop string or None). When a stop string is returned,
    the choice is over: the caller aborts it in the engine and reports finish_reason "stop". Stop strings do
    not end a choice before `min_tokens` tokens were generated. `flush()` at the end of the stream returns the
    last held-back text.
    """

    def __init__(self, tokenizer: Decoder, prompt_token_ids: Sequence[int], params: SamplingParams):
        self.params = params
        self._detokenizer = IncrementalDetokenizer(tokenizer, prompt_token_ids, params.skip_special_tokens)
        self._matcher = StopStringMatcher(params.stop, params.include_stop_str_in_output)
        self._pieces: list[str] = []
        self.num_tokens = 0

    @property
    def text(self) -> str:
        """All text sent for this choice so far."""
        return "".join(self._pieces)

    @property
    def stop_str(self) -> str | None:
        """The stop string that ended this choice, if any."""
        return self._matcher.matched

    @property
    def finished(self) -> bool:
        return self._matcher.finished

    def feed(self, new_token_ids: Sequence[int], stop_token_id: int | None = None) -> tuple[str, str | None]:
        """Take the new tokens of one engine event.

        `stop_token_id`: the eos / stop token that ended the choice (EngineOutput.stop_token_id). It is the last
        of `new_token_ids`; its text is left out unless `include_stop_str_in_output`, as in vLLM.
        """
        if self.finished:
            return "", None
        new_token_ids = list(new_token_ids)
        tokens_before = self.num_tokens
        self.num_tokens += len(new_token_ids)
        if stop_token_id is not None and not self.params.include_stop_str_in_output:
            if new_token_ids and new_token_ids[-1] == stop_token_id:
                new_token_ids.pop()
        min_tokens = self.params.min_tokens
        # Index in this event of the first token whose text may complete a stop string: as in vLLM, the
        # min_tokens-th token of the choice is the first (the output then holds min_tokens tokens).
        first_allowed = max(0, min_tokens - 1 - tokens_before)
        if self.params.stop and 0 < first_allowed < len(new_token_ids):
            # The event crosses min_tokens: text before the boundary may not complete a stop string.
            early, stop = self._feed_tokens(new_token_ids[:first_allowed], allow_match=False)
            late, stop = self._feed_tokens(new_token_ids[first_allowed:], allow_match=True)
            return early + late, stop
        return self._feed_tokens(new_token_ids, allow_match=first_allowed == 0)

    def flush(self) -> tuple[str, str | None]:
        """End of the stream: release held-back text. A stop string completed only now is still honoured."""
        if self.finished:
            return "", None
        tail = self._detokenizer.flush()
        text, stop = self._matcher.process(tail, allow_match=self.num_tokens >= self.params.min_tokens)
        if stop is None:
            text += self._matcher.flush()
        self._pieces.append(text)
        return text, stop

    def _feed_tokens(self, token_ids: list[int], allow_match: bool) -> tuple[str, str | None]:
        text, stop = self._matcher.process(self._detokenizer.add(token_ids), allow_match=allow_match)
        self._pieces.append(text)
        return text, stop
