"""A lean HTTP/1.1 client for the router's hot path: keep-alive connection pools, one write per request.

Why not aiohttp's client: profiling the router at a few thousand requests/s on one core showed the
aiohttp client (URL objects, header merging, cookie jar, tracing hooks, timers) costing about half
of each request's CPU time. The router only ever sends one kind of request, a POST of a JSON body to
a known worker, and relays the answer, so this module does exactly that: it writes the request in
one `transport.write`, parses the response head itself, and hands back the body as it arrives
(Content-Length, chunked, or until close), de-chunked, for byte-for-byte relaying.

Errors: `UpstreamConnectError` (could not connect: the worker is down) and `UpstreamError`
(reset, timeout, malformed answer). A request on a reused keep-alive connection that the worker had
already closed is retried once on a fresh connection, as every HTTP client does.
"""

from __future__ import annotations

import asyncio
import ssl
from collections import deque
from urllib.parse import urlsplit

_MAX_HEAD_BYTES = 64 * 1024
_HIGH_WATER = 1 << 20  # pause reading a worker while this much body is queued for a slow client
_LOW_WATER = 1 << 18


class UpstreamError(Exception):
    """The worker connection failed or answered something that is not HTTP/1.1."""


class UpstreamConnectError(UpstreamError):
    """Could not open a connection to the worker."""


class UpstreamTimeout(UpstreamError):
    """The worker stayed silent longer than the read timeout."""


class _Connection(asyncio.Protocol):
    """One keep-alive connection; parses one response at a time."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.buf = bytearray()
        self.response: "UpstreamResponse | None" = None
        self.head_done = False
        self.received_any = False
        # body framing of the current response
        self.mode = ""  # "length" | "chunked" | "close"
        self.remaining = 0
        self.chunk_state = 0  # 0: expect size line, 1: in data, 2: expect CRLF after data, 3: trailers
        self.keep_alive = True
        self.paused = False
        self.key: tuple[str, int, bool] | None = None

    # --- protocol callbacks --------------------------------------------------------------------
    def connection_made(self, transport):
        self.transport = transport

    def connection_lost(self, exc):
        self.closed = True
        resp = self.response
        if resp is not None and not resp.done:
            if self.head_done and self.mode == "close":
                resp._finish()
            else:
                resp._fail(UpstreamError("connection closed by the worker" if exc is None else f"connection lost: {exc}"))

    def data_received(self, data):
        resp = self.response
        if resp is None:  # bytes with no request outstanding: the connection is unusable
            self.closed = True
            self.transport.close()
            return
        self.received_any = True
        self.buf += data
        try:
            self._parse()
        except UpstreamError as exc:
            resp._fail(exc)
            self.closed = True
            self.transport.close()

    def pause_writing(self):  # pragma: no cover - requests are small
        pass

    def resume_writing(self):  # pragma: no cover
        pass

    # --- parsing -------------------------------------------------------------------------------
    def _parse(self) -> None:
        resp = self.response
        if not self.head_done:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                if len(self.buf) > _MAX_HEAD_BYTES:
                    raise UpstreamError("response head too large")
                return
            head = bytes(self.buf[:end])
            del self.buf[: end + 4]
            self._parse_head(head)
            if resp.status < 200:  # 1xx interim answer: skip it, wait for the real one
                self.head_done = False
                return self._parse()
            self.head_done = True
            resp._head_ready()
            if self.mode == "length" and self.remaining == 0:
                resp._finish()
                return
        if self.mode == "length":
            if self.buf:
                take = min(len(self.buf), self.remaining)
                resp._feed(bytes(self.buf[:take]))
                del self.buf[:take]
                self.remaining -= take
            if self.remaining == 0:
                if self.buf:  # bytes beyond the body: not something we can trust for the next request
                    self.keep_alive = False
                resp._finish()
        elif self.mode == "chunked":
            self._parse_chunked(resp)
        else:  # until close
            if self.buf:
                resp._feed(bytes(self.buf))
                self.buf.clear()
        if not self.paused and resp.queued_bytes > _HIGH_WATER and self.transport is not None:
            self.paused = True
            self.transport.pause_reading()

    def _parse_head(self, head: bytes) -> None:
        resp = self.response
        lines = head.split(b"\r\n")
        status_line = lines[0]
        if not status_line.startswith(b"HTTP/1."):
            raise UpstreamError(f"not an HTTP/1.x answer: {status_line[:40]!r}")
        try:
            resp.status = int(status_line[9:12])
        except ValueError:
            raise UpstreamError(f"bad status line: {status_line[:40]!r}") from None
        headers = {}
        for line in lines[1:]:
            name, sep, value = line.partition(b":")
            if not sep:
                raise UpstreamError("malformed response header")
            headers[name.strip().lower().decode("latin-1")] = value.strip().decode("latin-1")
        resp.headers = headers
        if status_line.startswith(b"HTTP/1.0"):
            self.keep_alive = headers.get("connection", "").lower() == "keep-alive"
        elif headers.get("connection", "").lower() == "close":
            self.keep_alive = False
        te = headers.get("transfer-encoding")
        if te is not None and "chunked" in te.lower():
            self.mode = "chunked"
            self.chunk_state = 0
        elif "content-length" in headers:
            try:
                self.remaining = int(headers["content-length"])
            except ValueError:
                raise UpstreamError("bad Content-Length") from None
            self.mode = "length"
        elif resp.status in (204, 304) or resp.method_head:
            self.mode = "length"
            self.remaining = 0
        else:
            self.mode = "close"
            self.keep_alive = False

    def _parse_chunked(self, resp: "UpstreamResponse") -> None:
        buf = self.buf
        while True:
            if self.chunk_state == 0:
                end = buf.find(b"\r\n")
                if end < 0:
                    if len(buf) > 4096:
                        raise UpstreamError("chunk size line too long")
                    return
                size_field = bytes(buf[:end]).split(b";", 1)[0].strip()
                del buf[: end + 2]
                try:
                    size = int(size_field, 16)
                except ValueError:
                    raise UpstreamError(f"bad chunk size {size_field[:20]!r}") from None
                if size == 0:
                    self.chunk_state = 3
                else:
                    self.remaining = size
                    self.chunk_state = 1
            elif self.chunk_state == 1:
                if not buf:
                    return
                take = min(len(buf), self.remaining)
                resp._feed(bytes(buf[:take]))
                del buf[:take]
                self.remaining -= take
                if self.remaining == 0:
                    self.chunk_state = 2
            elif self.chunk_state == 2:
                if len(buf) < 2:
                    return
                if buf[:2] != b"\r\n":
                    raise UpstreamError("chunk not followed by CRLF")
                del buf[:2]
                self.chunk_state = 0
            else:  # trailers: lines until an empty one
                end = buf.find(b"\r\n")
                if end < 0:
                    return
                del buf[: end + 2]
                if end == 0:
                    if buf:
                        self.keep_alive = False
                    resp._finish()
                    return

    # --- request -------------------------------------------------------------------------------
    def start(self, request_bytes: bytes, response: "UpstreamResponse") -> None:
        self.response = response
        self.head_done = False
        self.received_any = False
        self.keep_alive = True
        self.mode = ""
        self.buf.clear()
        response._conn = self
        self.transport.write(request_bytes)

    def resume(self) -> None:
        if self.paused and self.transport is not None and not self.closed:
            self.paused = False
            self.transport.resume_reading()


class UpstreamResponse:
    """A worker's answer: `status`, `headers` (lower-case names), body via `read_chunk()` / `read()`."""

    __slots__ = ("status", "headers", "done", "method_head", "_chunks", "queued_bytes", "_waiter", "_error",
                 "_conn", "_loop", "_timeout_s", "_head", "_pool")

    def __init__(self, loop: asyncio.AbstractEventLoop, timeout_s: float, pool: "UpstreamPool") -> None:
        self.status = 0
        self.headers: dict[str, str] = {}
        self.done = False
        self.method_head = False
        self._chunks: deque[bytes] = deque()
        self.queued_bytes = 0
        self._waiter: asyncio.Future | None = None
        self._error: Exception | None = None
        self._conn: _Connection | None = None
        self._loop = loop
        self._timeout_s = timeout_s
        self._head = False
        self._pool = pool

    # called by the connection
    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _head_ready(self) -> None:
        self._head = True
        self._wake()

    def _feed(self, data: bytes) -> None:
        self._chunks.append(data)
        self.queued_bytes += len(data)
        self._wake()

    def _finish(self) -> None:
        self.done = True
        self._wake()
        conn = self._conn
        if conn is not None:
            self._conn = None
            conn.response = None
            conn.resume()
            if conn.keep_alive and not conn.closed and not self._error:
                self._pool._give_back(conn)
            else:
                self._pool._discard(conn)

    def _fail(self, exc: Exception) -> None:
        if self.done:
            return
        self._error = exc
        self.done = True
        self._wake()
        if self._conn is not None:
            self._conn.response = None

    async def _wait(self) -> None:
        waiter = self._loop.create_future()
        self._waiter = waiter
        timer = self._loop.call_later(self._timeout_s, self._on_timeout, waiter)
        try:
            await waiter
        finally:
            timer.cancel()
            self._waiter = None

    def _on_timeout(self, waiter: asyncio.Future) -> None:
        if not waiter.done():
            waiter.set_exception(UpstreamTimeout(f"no answer from the worker for {self._timeout_s:.0f}s"))

    async def wait_head(self) -> None:
        while not self._head:
            if self._error is not None:
                raise self._error
            await self._wait()

    async def read_chunk(self) -> bytes:
        """The next piece of body, b"" at its end. Raises UpstreamError if the worker fails first."""
        while True:
            if self._chunks:
                data = self._chunks.popleft()
                self.queued_bytes -= len(data)
                conn = self._conn
                if conn is not None and conn.paused and self.queued_bytes < _LOW_WATER:
                    conn.resume()
                return data
            if self._error is not None:
                raise self._error
            if self.done:
                return b""
            await self._wait()

    async def read(self) -> bytes:
        parts = []
        while True:
            data = await self.read_chunk()
            if not data:
                return b"".join(parts)
            parts.append(data)

    def close(self) -> None:
        """Abandon the answer (client left): drop the connection so the worker stops generating."""
        if not self.done:
            self._fail(UpstreamError("abandoned"))
            conn = self._conn
            if conn is not None:
                self._pool._discard(conn)


class UpstreamPool:
    """Keep-alive connections to every worker, opened on demand and reused LIFO."""

    def __init__(self, connect_timeout_s: float = 5.0, read_timeout_s: float = 600.0,
                 max_idle_per_worker: int = 512) -> None:
        self.connect_timeout_s = connect_timeout_s
        self.read_timeout_s = read_timeout_s
        self.max_idle_per_worker = max_idle_per_worker
        self._idle: dict[tuple[str, int, bool], list[_Connection]] = {}
        self._targets: dict[str, tuple[str, int, bool, str]] = {}
        self._ssl: ssl.SSLContext | None = None
        self.connections_opened = 0  # a steadily growing count means keep-alive is not working

    def _target(self, base_url: str) -> tuple[str, int, bool, str]:
        target = self._targets.get(base_url)
        if target is None:
            parts = urlsplit(base_url)
            tls = parts.scheme == "https"
            port = parts.port or (443 if tls else 80)
            host = parts.hostname or ""
            host_header = parts.netloc
            target = (host, port, tls, host_header)
            self._targets[base_url] = target
        return target

    async def _connect(self, host: str, port: int, tls: bool) -> _Connection:
        loop = asyncio.get_running_loop()
        if tls and self._ssl is None:
            self._ssl = ssl.create_default_context()
        try:
            _, conn = await asyncio.wait_for(
                loop.create_connection(lambda: _Connection(loop), host, port, ssl=self._ssl if tls else None),
                self.connect_timeout_s)
        except asyncio.TimeoutError:
            raise UpstreamConnectError(f"connect timeout after {self.connect_timeout_s:.0f}s") from None
        except OSError as exc:
            raise UpstreamConnectError(f"cannot connect: {exc.__class__.__name__}") from None
        self.connections_opened += 1
        return conn

    def _give_back(self, conn: _Connection) -> None:
        key = conn.key
        idle = self._idle.setdefault(key, [])
        if len(idle) < self.max_idle_per_worker:
            idle.append(conn)
        else:
            conn.transport.close()

    def _discard(self, conn: _Connection) -> None:
        conn.closed = True
        if conn.transport is not None:
            conn.transport.close()

    async def post(self, base_url: str, path: str, body: bytes, extra_headers: str = "") -> UpstreamResponse:
        """Send a JSON POST and return once the response head has arrived.

        extra_headers: already formatted "Name: value\\r\\n" lines.
        """
        host, port, tls, host_header = self._target(base_url)
        request = (f"POST {path} HTTP/1.1\r\nHost: {host_header}\r\nContent-Type: application/json\r\n"
                   f"Accept-Encoding: identity\r\nContent-Length: {len(body)}\r\n{extra_headers}\r\n").encode(
            "latin-1") + body
        key = (host, port, tls)
        loop = asyncio.get_running_loop()
        for _ in range(2):
            idle = self._idle.get(key)
            conn = None
            while idle:
                candidate = idle.pop()
                if not candidate.closed:
                    conn = candidate
                    break
            reused = conn is not None
            if conn is None:
                conn = await self._connect(host, port, tls)
                conn.key = key
            response = UpstreamResponse(loop, self.read_timeout_s, self)
            conn.start(request, response)
            try:
                await response.wait_head()
                return response
            except UpstreamTimeout:
                self._discard(conn)
                raise
            except UpstreamError:
                self._discard(conn)
                if reused and not conn.received_any:
                    continue  # a stale keep-alive connection: retry once on a fresh one
                raise
        raise UpstreamError("the worker closed two connections in a row")  # pragma: no cover

    def forget(self, base_url: str) -> None:
        """Close the idle connections to a worker that left the pool."""
        target = self._targets.pop(base_url, None)
        if target is None:
            return
        for conn in self._idle.pop(target[:3], []):
            self._discard(conn)

    def close(self) -> None:
        for idle in self._idle.values():
            for conn in idle:
                if conn.transport is not None:
                    conn.transport.close()
        self._idle.clear()
