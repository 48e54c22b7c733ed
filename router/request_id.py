"""Request ids and trace context through the router.

The router keeps a sane `X-Request-ID` from the client or makes one, echoes it on every answer
(errors and streams too), writes it in its log lines for the request, and sends it to the worker it
chooses, so the worker's lines and answer carry the same id. A well-formed W3C `traceparent` goes to
the worker unchanged; a malformed one is dropped rather than passed on.

What a sane id and a well-formed traceparent are, the log prefix and the middleware itself are the
worker's (worker/server/request_id.py): one rule on both sides of the hop.
"""

from __future__ import annotations

from aiohttp import web

from worker.server.request_id import (  # noqa: F401 - re-exported for router/app.py
    HEADER,
    TRACEPARENT,
    echo_request_id,
    request_id_middleware,
    request_id_of,
    valid_traceparent,
)


def tracing_header_lines(request: web.Request) -> str:
    """Raw header lines for the upstream request: the request's id, and its traceparent when well-formed."""
    lines = f"{HEADER}: {request_id_of(request)}\r\n"
    traceparent = request.headers.get(TRACEPARENT)
    if valid_traceparent(traceparent):
        lines += f"{TRACEPARENT}: {traceparent}\r\n"
    return lines
