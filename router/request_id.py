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
    REQUEST_ID_KEY,
    TRACEPARENT,
    accept_request_id,
    request_id_middleware,
    request_id_of,
    valid_traceparent,
)


async def echo_request_id(request: web.Request, response: web.StreamResponse) -> None:
    """on_response_prepare: every response carries the request's id, streamed ones included.

    Also an answer no route handler served (aiohttp's own 404 for a target outside every route, such
    as `OPTIONS *`): without middlewares nothing gave that request an id, so it gets the one the
    request id middleware would have given it."""
    request_id = request.get(REQUEST_ID_KEY)
    if request_id is None:
        request_id = request[REQUEST_ID_KEY] = accept_request_id(request.headers.get(HEADER))
    response.headers[HEADER] = request_id


def tracing_header_lines(request: web.Request) -> str:
    """Raw header lines for the upstream request: the request's id, and its traceparent when well-formed."""
    lines = f"{HEADER}: {request_id_of(request)}\r\n"
    traceparent = request.headers.get(TRACEPARENT)
    if valid_traceparent(traceparent):
        lines += f"{TRACEPARENT}: {traceparent}\r\n"
    return lines
