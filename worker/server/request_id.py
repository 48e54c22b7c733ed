"""Request ids: `X-Request-ID` from the client (or the router, or an ingress) is kept for the request,
echoed in the response header, and added to every log line written while the request is served.

A request without the header gets a fresh id, so every response carries one a user can quote. The
id lives in a context variable: the log record factory installed here reads it, so log calls
anywhere in the frontend need no change.

The router imports this module too (router/request_id.py): one rule for what a sane id is, one for a
well-formed W3C `traceparent`, and the same log prefix on both sides. Nothing here imports torch.
"""

from __future__ import annotations

import contextvars
import logging
import os
import re

from aiohttp import web

HEADER = "X-Request-ID"
TRACEPARENT = "traceparent"
MAX_LENGTH = 128
# Where the middleware leaves the id on the request, for code that has the request but not the context.
# (web.RequestKey where this aiohttp has it, which keeps its typed-key warning quiet; a string before.)
REQUEST_ID_KEY = (web.RequestKey("radixfleet_request_id", str) if hasattr(web, "RequestKey")
                  else "radixfleet_request_id")
# Loggers under this name write whole lines of their own (access logs, JSON): no request prefix there.
ACCESS_LOGGER = "radixfleet.access"
# Printable ASCII without spaces: an id lands in headers and log lines, so nothing that could split them.
_VALID = re.compile(r"[\x21-\x7e]{1,%d}" % MAX_LENGTH)
# W3C trace context: version-traceid-parentid-flags, lowercase hex. A later version may append fields.
_TRACEPARENT = re.compile(r"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(-[\x21-\x7e]*)?")
_MAX_TRACEPARENT = 512

current_request_id: contextvars.ContextVar[str | None] = contextvars.ContextVar("request_id", default=None)


# Fresh ids are `uuid.uuid4().hex` in form (version 4, RFC 4122 variant), drawn _ID_BATCH at a time from
# one os.urandom call: uuid4() pays a system call and a UUID object for every request.
_ID_BATCH = 64
_UUID4_CLEAR = ~((0xF000 << 64) | (0xC000 << 48)) & ((1 << 128) - 1)  # the version and variant bits
_UUID4_SET = (0x4000 << 64) | (0x8000 << 48)
_fresh_ids: list[str] = []
os.register_at_fork(after_in_child=_fresh_ids.clear)  # a forked child must not hand out the parent's ids


def new_request_id() -> str:
    """A fresh random id (safe from any thread: each caller pops its own, a refill keeps one for itself)."""
    try:
        return _fresh_ids.pop()
    except IndexError:
        pass
    raw = os.urandom(16 * _ID_BATCH)
    batch = [f"{(int.from_bytes(raw[i:i + 16], 'big') & _UUID4_CLEAR) | _UUID4_SET:032x}"
             for i in range(0, len(raw), 16)]
    mine = batch.pop()
    _fresh_ids.extend(batch)
    return mine


def accept_request_id(given: str | None) -> str:
    """`given` when it is a sane id (1-128 printable ASCII characters, no spaces), else a new one."""
    return given if given is not None and _VALID.fullmatch(given) else new_request_id()


def request_id_of(request: web.Request) -> str:
    """The id this request is served under: the middleware's when it ran, else the client's when sane."""
    return request.get(REQUEST_ID_KEY) or accept_request_id(request.headers.get(HEADER))


def valid_traceparent(value: str | None) -> bool:
    """True for a well-formed W3C `traceparent` (version 00 exactly; later versions may add fields)."""
    if value is None or len(value) > _MAX_TRACEPARENT:
        return False
    match = _TRACEPARENT.fullmatch(value)
    if match is None:
        return False
    version, trace_id, parent_id, _flags, rest = match.groups()
    if version == "ff" or (version == "00" and rest):
        return False
    return trace_id != "0" * 32 and parent_id != "0" * 16  # all-zero ids are invalid by the spec


def _install_log_field() -> None:
    """Give every log record `request_id` and prefix its message with it while a request is served."""
    previous = logging.getLogRecordFactory()
    if getattr(previous, "_radixfleet_request_id", False):
        return

    def factory(*args, **kwargs):
        record = previous(*args, **kwargs)
        request_id = current_request_id.get()
        record.request_id = request_id or "-"
        if (request_id is not None and isinstance(record.msg, str)
                and not record.name.startswith(ACCESS_LOGGER)):
            record.msg = f"[request {request_id}] {record.msg}"
        return record

    factory._radixfleet_request_id = True
    logging.setLogRecordFactory(factory)


@web.middleware
async def request_id_middleware(request: web.Request, handler):
    """Decide the request's id and keep it in the log context while the handler runs.

    The header is set here on answers that are returned whole; a streamed answer sends its headers
    inside the handler, so `echo_request_id` (an on_response_prepare signal) sets it there."""
    request_id = accept_request_id(request.headers.get(HEADER))
    request[REQUEST_ID_KEY] = request_id
    token = current_request_id.set(request_id)
    try:
        try:
            response = await handler(request)
        except web.HTTPException as error:  # aiohttp's own answers carry the id too
            error.headers[HEADER] = request_id
            raise
        if not response.prepared:
            response.headers[HEADER] = request_id
        return response
    finally:
        current_request_id.reset(token)


async def echo_request_id(request: web.Request, response: web.StreamResponse) -> None:
    """on_response_prepare: every response, streamed ones included, carries the request's id."""
    request_id = request.get(REQUEST_ID_KEY)
    if request_id is not None:
        response.headers[HEADER] = request_id


_install_log_field()
