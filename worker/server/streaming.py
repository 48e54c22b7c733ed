"""Server-sent events, as the OpenAI streaming API sends them: `data: {json}\n\n` ... `data: [DONE]\n\n`."""

from __future__ import annotations

import logging

from aiohttp import web

from worker.contracts import dumps
from worker.server.errors import ApiError, internal_error

log = logging.getLogger("radixfleet.worker")

class ClientGone(Exception):
    """The client closed the connection while we were writing to it."""


def json_response(obj, status: int = 200) -> web.Response:
    return web.Response(body=dumps(obj), status=status, content_type="application/json")


class SSEWriter:
    """Writes SSE events to one client. Several events passed together leave in one write."""

    def __init__(self, request: web.Request, headers: dict[str, str] | None = None):
        self._request = request
        self._response = web.StreamResponse(
            status=200,
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache", "X-Accel-Buffering": "no",
                     **(headers or {})},
        )

    async def prepare(self) -> None:
        try:
            await self._response.prepare(self._request)
        except (ConnectionError, RuntimeError) as error:
            raise ClientGone() from error

    async def send(self, events: list[dict]) -> None:
        if events:
            await self._write(b"".join(b"data: " + dumps(event) + b"\n\n" for event in events))

    async def send_done(self) -> None:
        await self._write(b"data: [DONE]\n\n")
        try:
            await self._response.write_eof()
        except (ConnectionError, RuntimeError):
            pass

    @property
    def response(self) -> web.StreamResponse:
        return self._response

    async def _write(self, data: bytes) -> None:
        transport = self._request.transport
        if transport is None or transport.is_closing():
            raise ClientGone()
        try:
            await self._response.write(data)
        except (ConnectionError, RuntimeError) as error:
            raise ClientGone() from error


async def end_with_error(writer: "SSEWriter", error: Exception) -> None:
    """A stream that already started cannot change its HTTP status: send the error as an event, then end.

    `error` is an ApiError (the engine died, say) or an unexpected exception (a bug: logged, reported as 500).
    """
    if isinstance(error, ApiError):
        payload = error.body()
    else:
        log.error("error while streaming a response", exc_info=error)
        payload = internal_error(f"Internal error: {type(error).__name__}: {error}").body()
    try:
        await writer.send([payload])
        await writer.send_done()
    except ClientGone:
        pass
