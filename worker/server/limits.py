"""Input limits shared by the router and the worker, and the bounded JSON decoder both use.

One module so that the two sides agree: a body the router accepts is never one the worker refuses for
its size, and the worker's limits hold even when it is reached directly. Kept free of heavy imports
(no aiohttp, no torch): the router imports it.

Why these numbers:
  * MAX_BODY_BYTES, 10 MiB: a 128k-token prompt is about 0.5 MB of text or 0.9 MB as a JSON array
    of token ids, so 10 MiB is over ten times any real request, and it bounds the worst case of
    tokenizing one body (a 10 MB prompt takes seconds, off the event loop).
  * MAX_JSON_DEPTH, 64: OpenAI bodies nest a handful of levels (tool schemas a few more); Python's
    recursive JSON decoder and the chat template's walk over tools fail near 1,000.
  * MAX_INT_DIGITS, 20: the largest field we accept is a 64-bit seed (19 digits and a sign);
    longer integers cost quadratic time to convert (CPython refuses beyond 4,300 digits).
"""

from __future__ import annotations

import json
import re
from typing import Any

MAX_BODY_BYTES = 10 * 1024 * 1024
MAX_JSON_DEPTH = 64
MAX_INT_DIGITS = 20
MAX_STOP_STRING_CHARS = 1024  # each stop string; the count limit lives in SamplingParams
MAX_STOP_TOKEN_IDS = 1024
MAX_TOKEN_ID = 2**31 - 1  # token ids and token counts are 32-bit on the engine side
MAX_PRIORITY = 2**31 - 1
# n * max_tokens of one request beyond its context length: n=128 choices of 4k tokens each would hold
# a worker for minutes. A request with n=1 is bounded by the context length alone.
DEFAULT_MAX_GENERATED_TOKENS = 131072
# Above this many characters, tokenization and chat templating run in a thread so /health keeps answering.
OFFLOAD_CHARS = 64 * 1024


class InputRejected(ValueError):
    """A body that breaks a limit or is not valid JSON; `message` is for the client."""

    def __init__(self, message: str, status: int = 400, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.code = code


# A JSON string (escapes included) or a bracket: scanning with this regex skips string contents in C,
# so a 10 MB prompt string is one match and the depth check costs next to nothing.
_TOKEN = re.compile(rb'"(?:[^"\\]|\\.)*"|[\[\]{}]', re.DOTALL)
# \uD800-\uDFFF written as an escape: the only way a lone surrogate gets into a decoded string
# (raw UTF-8 cannot encode one, and a decoder would reject it).
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")


def json_depth_exceeds(raw: bytes, max_depth: int = MAX_JSON_DEPTH) -> bool:
    """True when arrays/objects in `raw` nest deeper than `max_depth` (raw need not be valid JSON)."""
    if raw.count(b"[") + raw.count(b"{") <= max_depth:
        return False  # cannot nest deeper than the number of openers
    depth = 0
    for match in _TOKEN.finditer(raw):
        token = match.group()
        if token in (b"[", b"{"):
            depth += 1
            if depth > max_depth:
                return True
        elif token in (b"]", b"}"):
            depth -= 1
    return False


def _parse_int(text: str) -> int:
    if len(text.lstrip("-")) > MAX_INT_DIGITS:
        raise InputRejected(f"integer with {len(text.lstrip('-'))} digits in the request body: at most "
                            f"{MAX_INT_DIGITS} are accepted")
    return int(text)


def _parse_constant(name: str) -> Any:
    raise InputRejected(f"{name} is not valid JSON: send a finite number")


def _find_lone_surrogate(value: Any) -> bool:
    """Recursion is safe here: the depth was checked before decoding."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return True
        return False
    if isinstance(value, dict):
        return any(_find_lone_surrogate(k) or _find_lone_surrogate(v) for k, v in value.items())
    if isinstance(value, list):
        return any(_find_lone_surrogate(v) for v in value)
    return False


def contains_lone_surrogate(raw: bytes, body: Any) -> bool:
    """True when the decoded `body` of `raw` holds a lone surrogate (the walk runs only if `raw` has
    a surrogate escape at all, so ordinary bodies cost one regex search)."""
    return _SURROGATE_ESCAPE.search(raw) is not None and _find_lone_surrogate(body)


def decode_json_body(raw: bytes, max_bytes: int = MAX_BODY_BYTES, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """Decode a request body within the limits; raises InputRejected with a client-facing message."""
    if len(raw) > max_bytes:
        raise InputRejected(f"the request body is {len(raw)} bytes, over the limit of {max_bytes}",
                            status=413, code="request_too_large")
    if not raw.strip():
        raise InputRejected("the request body is empty: send a JSON object")
    if json_depth_exceeds(raw, max_depth):
        raise InputRejected(f"the request body nests arrays/objects deeper than {max_depth} levels")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise InputRejected(f"the request body is not valid UTF-8: {error}") from None
    try:
        body = json.loads(text, parse_int=_parse_int, parse_constant=_parse_constant)
    except InputRejected:
        raise
    except (ValueError, RecursionError) as error:
        raise InputRejected(f"the request body is not valid JSON: {error}") from None
    if contains_lone_surrogate(raw, body):
        raise InputRejected("the request body contains a lone UTF-16 surrogate (\\ud800-\\udfff without its "
                            "pair): send valid Unicode")
    return body


def header_value_ok(value: str) -> bool:
    """A header value the router may pass on: latin-1 encodable, no control characters but tab."""
    try:
        encoded = value.encode("latin-1")
    except UnicodeEncodeError:
        return False
    return not any(b < 0x20 and b != 0x09 or b == 0x7F for b in encoded)
