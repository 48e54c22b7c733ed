"""Tokenization of chat prompts that reuses the token ids of long text segments seen before.

A served workload sends the same long text again and again: a shared system prompt, a document that
many questions are asked about, the earlier turns of a conversation. Tokenizing a 16k-character
document costs milliseconds of the frontend's one event-loop thread on every request, while the
engine then finds the same tokens in its prefix cache. `SegmentCachedEncoder` remembers the ids of
long segments and tokenizes only what is new.

Why the result is exactly `tokenizer.encode(text, add_special_tokens=False)`: the `tokenizers`
pipeline first cuts the raw text at every occurrence of an added token whose `normalized` flag is
off (leftmost-longest over all of them), and then normalizes, pre-tokenizes and runs the model on
each piece between those tokens separately. So cutting the text at the end of such a token and
encoding the parts gives the same ids, concatenated. That holds under conditions this module checks
once, on the tokenizer's own configuration, and otherwise it encodes whole texts as before:
  * none of those added tokens strips whitespace around it or matches single words only
    (lstrip / rstrip / single_word change where the piece boundaries fall);
  * no pre-tokenizer treats the first piece of a text differently (Metaspace's prepend_scheme
    "first"); only pre-tokenizer kinds known to work piece by piece are accepted;
  * no truncation, padding or BPE dropout;
  * no special tokens are added (`add_special_tokens=False`, what chat prompts use: the template
    writes them).
The chat templates of the supported families put such a token (`<|im_end|>`, `<|eot_id|>`, `</s>`,
`[/INST]` ...) after every message, so each message's text becomes one segment.
"""

from __future__ import annotations

import json
import re
from array import array
from collections import OrderedDict
from typing import Awaitable, Callable, Iterator

MIN_SEGMENT_CHARS = 512  # shorter parts are tokenized every time (a lookup would cost about as much)
MAX_CACHED_TOKENS = 2_000_000  # ids kept, LRU; 4 bytes each, plus the segments' text as keys
# A segment not cached yet that is at least this long is tokenized in a thread (the tokenizer's
# GIL-releasing entry point): a 16k-character document costs milliseconds, and at a cold start many
# requests bring new documents at once; a thread hop costs far less than that.
THREAD_SEGMENT_CHARS = 4096

# pre-tokenizers that process every piece of a text alike (no "first piece" rule)
_PIECEWISE_PRE_TOKENIZERS = {"ByteLevel", "Split", "Digits", "Punctuation", "Whitespace", "WhitespaceSplit",
                             "UnicodeScripts", "CharDelimiterSplit", "BertPreTokenizer"}


def _piecewise(pre_tokenizer: dict | None) -> bool:
    if pre_tokenizer is None:
        return True
    kind = pre_tokenizer.get("type")
    if kind == "Sequence":
        return all(_piecewise(p) for p in pre_tokenizer.get("pretokenizers", []))
    if kind == "Metaspace":
        return pre_tokenizer.get("prepend_scheme", "always") in ("always", "never")
    return kind in _PIECEWISE_PRE_TOKENIZERS


def segment_boundary_pattern(backend) -> re.Pattern | None:
    """The added tokens at whose end a text may be cut without changing its ids (None: no safe cut).

    `backend` is a `tokenizers.Tokenizer`; anything else (a test double) gets None."""
    try:
        config = json.loads(backend.to_str())
        added = list(backend.get_added_tokens_decoder().values())
    except (AttributeError, TypeError, ValueError):
        return None
    if backend.truncation is not None or backend.padding is not None:
        return None
    if (config.get("model") or {}).get("dropout") not in (None, 0, 0.0):
        return None
    if not _piecewise(config.get("pre_tokenizer")):
        return None
    raw = [t for t in added if not t.normalized]
    if not raw or any(t.lstrip or t.rstrip or t.single_word for t in raw):
        return None
    # longest first: Python's alternation then picks the longest token at the leftmost position, as the
    # tokenizer's own leftmost-longest matcher does
    contents = sorted({t.content for t in raw if t.content}, key=len, reverse=True)
    return re.compile("|".join(re.escape(c) for c in contents)) if contents else None


class SegmentCachedEncoder:
    """`encode(text, add_special_tokens)` of a tokenizer, reusing the ids of long segments (LRU)."""

    def __init__(self, tokenizer, min_segment_chars: int = MIN_SEGMENT_CHARS,
                 max_cached_tokens: int = MAX_CACHED_TOKENS):
        self.tokenizer = tokenizer
        backend = getattr(tokenizer, "backend", None)
        self._pattern = segment_boundary_pattern(backend) if backend is not None else None
        self.min_segment_chars = min_segment_chars
        self.max_cached_tokens = max_cached_tokens
        self._segments: OrderedDict[str, array] = OrderedDict()
        self._cached_tokens = 0
        self.hits = 0  # segments served from the cache
        self.misses = 0  # long segments tokenized (and remembered)

    @property
    def enabled(self) -> bool:
        return self._pattern is not None

    def applies(self, text: str, add_special_tokens: bool) -> bool:
        """Whether `text` is cut into segments (else it is encoded whole, as the tokenizer does)."""
        return not add_special_tokens and self._pattern is not None and len(text) >= 2 * self.min_segment_chars

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        if not self.applies(text, add_special_tokens):
            return list(self.tokenizer.encode(text, add_special_tokens=add_special_tokens))
        return self._assemble(text, {})

    async def encode_async(self, text: str, offload: Callable[[str], Awaitable[list[int]]],
                           offload_chars: int) -> list[int]:
        """`encode(text, add_special_tokens=False)`, except that a part of at least `offload_chars` that
        is not cached is tokenized by `offload(part)` (in a thread), so the event loop, and the streams
        it serves, run meanwhile; the cache itself is only read and written on the loop. For texts
        that `applies(text, False)` accepts."""
        fresh: dict[str, list[int]] = {}
        for part, cacheable in self._parts(text):
            if len(part) >= offload_chars and part not in fresh and not (cacheable and part in self._segments):
                fresh[part] = list(await offload(part))
        return self._assemble(text, fresh)

    # ------------------------------------------------------------------ internals
    def _assemble(self, text: str, fresh: dict[str, list[int]]) -> list[int]:
        """The ids of `text`, part by part: from the cache, else from `fresh` (parts tokenized already),
        else tokenized here; long segments seen for the first time are remembered."""
        ids: list[int] = []
        for part, cacheable in self._parts(text):
            cached = self._lookup(part) if cacheable else None
            if cached is None:
                cached = fresh[part] if part in fresh else self._plain(part)
                if cacheable:
                    self._remember(part, cached)
            ids.extend(cached)
        return ids

    def _parts(self, text: str) -> Iterator[tuple[str, bool]]:
        """(part, cacheable) covering `text` in order: each long segment alone, the short ones between
        two long ones joined (one tokenizer call)."""
        pending = 0  # text[pending:segment] is short segments not yielded yet
        segment = 0  # where the current segment starts (the end of the previous boundary token)
        for cut in self._cuts(text):
            if cut - segment >= self.min_segment_chars:
                if pending < segment:
                    yield text[pending:segment], False
                yield text[segment:cut], True
                pending = cut
            segment = cut
        if pending < len(text):
            yield text[pending:], False

    def _cuts(self, text: str) -> Iterator[int]:
        """Ends of the boundary tokens in `text`, then the end of the text (the last segment's end)."""
        for match in self._pattern.finditer(text):
            yield match.end()
        yield len(text)

    def _plain(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def _lookup(self, segment: str) -> list[int] | None:
        cached = self._segments.get(segment)
        if cached is None:
            return None
        self._segments.move_to_end(segment)
        self.hits += 1
        return cached.tolist()

    def _remember(self, segment: str, ids: list[int]) -> None:
        self.misses += 1
        if len(ids) > self.max_cached_tokens or segment in self._segments:
            return  # too big to keep; or a concurrent request tokenized it first
        self._segments[segment] = array("i", ids)
        self._cached_tokens += len(ids)
        while self._cached_tokens > self.max_cached_tokens:
            _, evicted = self._segments.popitem(last=False)
            self._cached_tokens -= len(evicted)
