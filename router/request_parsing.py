"""Read a client request once: validate the fields the router needs, derive routing text and session key.

Bad input is answered by the router itself (HTTP 400, OpenAI error body, see router.responses) without
reaching a worker.
The router checks only what it must to route; the worker validates everything else.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any, Mapping

from aiohttp import web
from aiohttp.web_protocol import RequestPayloadError

from worker.contracts import loads
from worker.server.limits import (
    MAX_JSON_DEPTH,
    contains_lone_surrogate,
    header_value_ok,
    json_depth_exceeds,
)


class BadRequest(Exception):
    """A client error the router answers itself. `param` names the offending field."""

    def __init__(self, message: str, param: str | None = None, status: int = 400,
                 code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.status = status
        self.code = code


@dataclass(slots=True)
class ParsedRequest:
    """What the router needs from a request body."""

    routing_text: str
    stream: bool
    session_key: str | None


# Separators unlikely in real text keep "user: ab" + "c" distinct from "user: a" + "bc" across messages.
_ROLE_SEP = "\x1f"
_MSG_SEP = "\x1e"


def _message_text(content: Any, index: int) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # multi-part content: keep the text parts, in order
        parts = []
        for part in content:
            if isinstance(part, Mapping):
                text = part.get("text")
                if isinstance(text, str):
                    parts.append(text)
                elif part.get("type") == "image_url":
                    url = part.get("image_url")
                    if isinstance(url, Mapping) and isinstance(url.get("url"), str):
                        parts.append(url["url"][:256])
            elif isinstance(part, str):
                parts.append(part)
        return "".join(parts)
    raise BadRequest(f"messages[{index}].content must be a string or a list of content parts",
                     param=f"messages[{index}].content")


def chat_routing_text(messages: Any) -> str:
    """The chat messages, in order, as one string (the prefix the worker's chat template will cache)."""
    if not isinstance(messages, list) or not messages:
        raise BadRequest("'messages' must be a non-empty list of {role, content} objects", param="messages")
    pieces = []
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise BadRequest(f"messages[{i}] must be an object with 'role' and 'content'", param=f"messages[{i}]")
        role = message.get("role")
        if not isinstance(role, str) or not role:
            raise BadRequest(f"messages[{i}].role must be a non-empty string", param=f"messages[{i}].role")
        pieces.append(role)
        pieces.append(_ROLE_SEP)
        pieces.append(_message_text(message.get("content"), i))
        pieces.append(_MSG_SEP)
    return "".join(pieces)


def completion_routing_text(prompt: Any) -> str:
    """The prompt as routing text: a string, a list of strings (batch: first one), or token ids."""
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list) and prompt:
        first = prompt[0]
        if isinstance(first, str) and all(isinstance(p, str) for p in prompt):
            return first
        if isinstance(first, int) and all(isinstance(t, int) for t in prompt):
            # Token ids: a stable text form; 5 characters a token keeps chunk sizes comparable.
            return "".join(f"{t:05x}"[-5:] for t in prompt)
        if isinstance(first, list) and all(isinstance(t, int) for t in first):
            return "".join(f"{t:05x}"[-5:] for t in first)
    raise BadRequest("'prompt' must be a non-empty string, a list of strings, or a list of token ids",
                     param="prompt")


# Request headers the router passes on to the worker: they must be valid in the request it writes.
PASSTHROUGH_HEADERS = ("X-Request-ID", "traceparent")


async def read_body(request: web.Request, max_bytes: int) -> bytes:
    """The request body; BadRequest 413 over `max_bytes`, 400 when it cannot be read or decoded
    (a `Content-Encoding: gzip` body that is not gzip, a body cut short)."""
    try:
        return await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise BadRequest(f"request body is larger than the limit of {max_bytes} bytes", status=413,
                         code="request_too_large") from None
    except RequestPayloadError as exc:
        reason = str(exc).replace("\n", " ").strip()
        raise BadRequest(f"request body could not be read ({reason}): send it uncompressed or as valid "
                         f"gzip/deflate matching its Content-Encoding") from None


async def read_body_within(request: web.Request, max_bytes: int, timeout_s: float) -> bytes:
    """`read_body`, and BadRequest 408 when the body has not arrived within `timeout_s`.

    Most bodies are in the buffer whole before the handler runs (the parser saw their end): reading
    them cannot wait, so they skip the timeout, which on Python 3.11 costs a task and a loop pass."""
    if request.content.is_eof():
        return await read_body(request, max_bytes)
    try:
        return await asyncio.wait_for(read_body(request, max_bytes), timeout_s)
    except asyncio.TimeoutError:
        raise BadRequest(f"the request body did not arrive within {timeout_s:g} s",
                         status=408, code="request_timeout") from None


def check_passthrough_headers(headers: Mapping[str, str]) -> None:
    """BadRequest when a header the router forwards (X-Request-ID, traceparent) is not valid HTTP."""
    for name in PASSTHROUGH_HEADERS:
        value = headers.get(name)
        # Printable ASCII (the usual id) is valid: the byte-by-byte check runs only for anything else.
        if value is not None and not (value.isascii() and value.isprintable()) and not header_value_ok(value):
            raise BadRequest(f"header {name} must be printable latin-1 text (no control characters); "
                             f"send an ASCII id", param=name)


def parse_request(raw: bytes, kind: str, session_header_value: str | None) -> ParsedRequest:
    """Parse and minimally validate an OpenAI request body. kind: 'chat' or 'completion'."""
    if not raw:
        raise BadRequest("request body is empty: send a JSON object", param=None)
    if json_depth_exceeds(raw):
        raise BadRequest(f"request body nests arrays/objects deeper than {MAX_JSON_DEPTH} levels")
    try:
        body = loads(raw)
    except (ValueError, RecursionError) as exc:  # ValueError: also UnicodeDecodeError, integers over 4,300 digits
        raise BadRequest(f"request body is not valid JSON: {exc}") from None
    if contains_lone_surrogate(raw, body):
        raise BadRequest("request body contains a lone UTF-16 surrogate (\\ud800-\\udfff without its pair): "
                         "send valid Unicode")
    if not isinstance(body, dict):
        raise BadRequest("request body must be a JSON object")
    if kind == "chat":
        if "messages" not in body:
            raise BadRequest("missing required field 'messages'", param="messages")
        text = chat_routing_text(body["messages"])
    else:
        if "prompt" not in body:
            raise BadRequest("missing required field 'prompt'", param="prompt")
        text = completion_routing_text(body["prompt"])
    stream = body.get("stream")
    if stream is None:  # absent or null: the worker's default (not streamed)
        stream = False
    if not isinstance(stream, bool):
        raise BadRequest("'stream' must be true or false", param="stream")
    max_tokens = body.get("max_tokens", body.get("max_completion_tokens"))
    if max_tokens is not None and (not isinstance(max_tokens, int) or isinstance(max_tokens, bool)
                                   or max_tokens < 0):
        raise BadRequest("'max_tokens' must be a non-negative integer", param="max_tokens")
    session = session_header_value or None
    if session is None:
        user = body.get("user")
        if isinstance(user, str) and user:
            session = user
    return ParsedRequest(routing_text=text, stream=stream, session_key=session)
