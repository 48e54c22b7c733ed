"""Slow and surplus clients, for the aiohttp servers of both the worker and the router.

Three protections aiohttp does not give on its own:
- a bound on open connections: past it a new connection gets an immediate 503 with Retry-After and is
  closed, so a flood of idle or half-sent requests cannot use up the process's file descriptors;
- a header timeout: aiohttp's keep-alive timer also runs from the moment a connection opens and closes
  it if no complete request head arrived, so `keepalive_timeout=header_timeout_s` closes a slowloris
  (headers sent a byte at a time) after that long. (It is the idle timeout between kept-alive requests
  as well, which is the usual meaning of a header timeout.)
- a body timeout: `body_timeout_middleware` reads a POST body within a deadline (408 past it); later
  `request.read()` calls get the body already read.
`GuardedSite` is a TCP site (host/port or an already bound socket) with the connection bound.
"""

from __future__ import annotations

import asyncio
import json
import logging
import resource
import socket
from typing import Awaitable, Callable

from aiohttp import web
from aiohttp.web_runner import BaseSite

log = logging.getLogger("radixfleet.connections")

_RESERVED_FDS = 128  # kept back for logs, upstream pools, the engine's pipes, health polls


def raise_open_file_limit() -> int:
    """Lift the soft open-file limit to the hard one (common Linux defaults: 1024 soft, far more hard)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):  # pragma: no cover - some containers refuse
            pass
    return soft


def connection_limit(configured: int, fds_per_connection: int) -> int:
    """`configured` if set, else what the open-file limit allows with `fds_per_connection` each."""
    if configured > 0:
        return configured
    soft = raise_open_file_limit()
    return max(16, (soft - _RESERVED_FDS) // fds_per_connection)


def _refusal(limit: int) -> bytes:
    body = json.dumps({"error": {
        "message": f"the server is at its limit of {limit} open connections; retry shortly",
        "type": "server_error", "param": None, "code": "too_many_connections"}}).encode()
    return (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nRetry-After: 1\r\n"
            b"Connection: close\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)


class _Refuse(asyncio.Protocol):
    """Answers a connection over the limit with one 503 and closes it."""

    def __init__(self, answer: bytes) -> None:
        self._answer = answer

    def connection_made(self, transport) -> None:
        transport.write(self._answer)
        transport.close()


class ConnectionGuard:
    """A protocol factory around aiohttp's server that refuses connections past `limit`."""

    def __init__(self, server: web.Server, limit: int) -> None:
        self.server = server
        self.limit = limit
        self.refused = 0
        self._answer = _refusal(limit)

    @property
    def open_connections(self) -> int:
        return len(self.server.connections)

    def __call__(self) -> asyncio.Protocol:
        if self.open_connections >= self.limit:
            self.refused += 1
            if self.refused == 1 or self.refused % 1000 == 0:
                log.warning("refused a connection: %d open is the limit (%d refused so far)",
                            self.limit, self.refused)
            return _Refuse(self._answer)
        return self.server()


class GuardedSite(BaseSite):
    """A TCP site whose connections pass through a `ConnectionGuard`."""

    def __init__(self, runner: web.AppRunner, host: str | None = None, port: int | None = None, *,
                 sock: socket.socket | None = None, max_connections: int = 1024, backlog: int = 1024,
                 reuse_address: bool = True) -> None:
        super().__init__(runner, backlog=backlog)
        self._host, self._port, self._sock = host, port, sock
        self._reuse_address = reuse_address
        self.max_connections = max_connections
        self.guard: ConnectionGuard | None = None

    @property
    def name(self) -> str:
        return f"http://{self._host}:{self.port}"

    @property
    def port(self) -> int:
        if self._server is not None and self._server.sockets:
            return self._server.sockets[0].getsockname()[1]
        return self._port or 0

    async def start(self) -> None:
        await super().start()
        loop = asyncio.get_running_loop()
        self.guard = ConnectionGuard(self._runner.server, self.max_connections)
        if self._sock is not None:
            self._server = await loop.create_server(self.guard, sock=self._sock, backlog=self._backlog)
        else:
            self._server = await loop.create_server(self.guard, self._host, self._port, backlog=self._backlog,
                                                    reuse_address=self._reuse_address)


def body_timeout_middleware(timeout_s: float, error: Callable[[int, str, str], web.StreamResponse]):
    """Read every POST body within `timeout_s`; `error(status, message, code)` builds the answers
    (408 too slow, 413 too large, 400 unreadable). Handlers then get the body already read."""
    from aiohttp.web_protocol import RequestPayloadError

    @web.middleware
    async def read_body_in_time(request: web.Request, handler: Callable[[web.Request], Awaitable]):
        if request.method == "POST" and request.body_exists:
            try:
                await asyncio.wait_for(request.read(), timeout_s)
            except asyncio.TimeoutError:
                return error(408, f"The request body did not arrive within {timeout_s:g} s.", "request_timeout")
            except web.HTTPRequestEntityTooLarge:
                return error(413, f"The request body is larger than the limit of {request.client_max_size} "
                                  "bytes.", "request_too_large")
            except RequestPayloadError as exc:  # cut short, or Content-Encoding that does not match
                reason = str(exc).replace("\n", " ").strip()
                return error(400, f"The request body could not be read ({reason}).", "invalid_body")
        return await handler(request)

    return read_body_in_time
