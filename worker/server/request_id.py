"""Request ids: `X-Request-ID` from the client (or the router, or an ingress) is kept for the request,
echoed in the response header, and added to every log line written while the request is served.

A request without the header gets a fresh id, so every response carries one a user can quote. The
id lives in a context variable: the log record factory installed here reads it, so log calls
anywhere in the frontend need no change.
"""

from __future__ import annotations

import contextvars
import logging
import re
import uuid

from aiohttp import web

HEADER = "X-Request-ID"
MAX_LENGTH = 128
# Printable ASCII without spaces: an id lands in headers and log lines, so nothing that could split them.
_VALID = re.compile(r"^[\x21-\x7e]{1,%d}$" % MAX_LENGTH)

current_request_id: contextvars.ContextVar[str | None] = contextvars.ContextVar("request_id", default=None)


def request_id_of(request: web.Request) -> str:
    """The client's id when it is a sane header value, else a new one."""
    given = request.headers.get(HEADER, "")
    return given if _VALID.match(given) else uuid.uuid4().hex


def _install_log_field() -> None:
    """Give every log record `request_id` and prefix its message with it while a request is served."""
    previous = logging.getLogRecordFactory()
    if getattr(previous, "_radixfleet_request_id", False):
        return

    def factory(*args, **kwargs):
        record = previous(*args, **kwargs)
        request_id = current_request_id.get()
        record.request_id = request_id or "-"
        if request_id is not None and isinstance(record.msg, str):
            record.msg = f"[request {request_id}] {record.msg}"
        return record

    factory._radixfleet_request_id = True
    logging.setLogRecordFactory(factory)


@web.middleware
async def request_id_middleware(request: web.Request, handler):
    request_id = request_id_of(request)
    token = current_request_id.set(request_id)
    try:
        try:
            response = await handler(request)
        except web.HTTPException as error:  # aiohttp's own answers carry the id too
            error.headers[HEADER] = request_id
            raise
        response.headers[HEADER] = request_id
        return response
    finally:
        current_request_id.reset(token)


_install_log_field()
