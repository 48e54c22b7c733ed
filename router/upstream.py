"""A lean HTTP/1.1 client for the router's hot path: keep-alive connection pools, one write per request.

Why not aiohttp's client: profiling the router at a few thousand requests/s on one core showed the
aiohttp client (URL objects, header merging, cookie jar, tracing hooks, timers) costing about half
of each request's CPU time. The router only ever sends one kind of request, a POST of a JSON body to
a known worker, and relays the answer, so this module does exactly that: it writes the request in
one `transport.write` and hands back the body as it arrives, de-chunked, for byte-for-byte relaying.

Responses are parsed by httptools (llhttp, the parser of Node.js and uvicorn) in its strict mode, so
a worker that answers malformed HTTP gets a clean error instead of a short body or a hang: negative,
duplicate or conflicting Content-Length, Content-Length with Transfer-Encoding, bare LF line endings,
CR or LF inside a header value, bad chunk sizes. On top of llhttp this module refuses response heads
over 64 KB, status codes outside 100-599, and a Transfer-Encoding other than chunked.

Two timeouts: the first byte (until the response head arrives: queueing and prefill for a stream,
the whole generation for a non-streamed answer) and the inter-chunk silence once the body flows.

Errors, all `UpstreamError` (the proxy handles that one type):
  UpstreamConnectError     could not connect: the worker is down
  UpstreamTimeout          silent too long; `UpstreamFirstByteTimeout` when no head came at all
  UpstreamProtocolError    the worker answered something that is not valid HTTP/1.1
  UpstreamAborted          the router gave the answer up: the worker was marked down, or the router stops
A request on a reused keep-alive connection that the worker had already closed is retried once on a
fresh connection, as every HTTP client does.
"""

from __future__ import annotations

import asyncio
import re
import ssl
import time
from collections import deque
from urllib.parse import urlsplit

import httptools

_MAX_HEAD_BYTES = 64 * 1024
_HIGH_WATER = 1 << 20  # pause reading a worker while this much body is queued for a slow client
_LOW_WATER = 1 << 18


class UpstreamError(Exception):
    """The worker connection failed or answered something that is not HTTP/1.1."""


class UpstreamConnectError(UpstreamError):
    """Could not open a connection to the worker."""


class UpstreamTimeout(UpstreamError):
    """The worker stayed silent longer than the timeout."""


class UpstreamFirstByteTimeout(UpstreamTimeout):
    """No response head within the first-byte timeout: the worker accepted but does not answer."""


class UpstreamProtocolError(UpstreamError):
    """The worker's answer breaks HTTP/1.1 framing; the connection is dropped."""


class UpstreamAborted(UpstreamError):
    """The router abandoned this answer (`UpstreamPool.abort_worker` / `abort_all`).

    retryable: whether a request that had no first byte yet may go to another worker (a hung worker:
    yes; the router shutting down: no)."""

    def __init__(self, reason: str, retryable: bool) -> None:
        super().__init__(reason)
        self.retryable = retryable


class _Connection(asyncio.Protocol):
    """One keep-alive connection; parses one response at a time with a fresh llhttp parser."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.response: "UpstreamResponse | None" = None
        self.parser: httptools.HttpResponseParser | None = None
        self.head_done = False
        self.head_bytes = 0  # bytes received while the head was incomplete (the 64 KB limit)
        self.header_bytes = 0  # bytes of the header lines parsed so far (the same limit, exactly)
        self.received_any = False
        self.framed = False  # Content-Length or chunked; False: the body ends when the worker closes
        self.keep_alive = True
        self.paused = False
        self.key: tuple[str, int, bool] | None = None
        self._header_names: list[bytes] = []
        self._headers: dict[str, str] = {}

    # --- protocol callbacks --------------------------------------------------------------------
    def connection_made(self, transport):
        self.transport = transport

    def connection_lost(self, exc):
        self.closed = True
        resp = self.response
        if resp is not None and not resp.done:
            if self.head_done and not self.framed:
                resp._finish()
            else:
                resp._fail(UpstreamError("connection closed by the worker" if exc is None else f"connection lost: {exc}"))

    def data_received(self, data):
        resp = self.response
        if resp is None or self.parser is None:  # bytes with no request outstanding: the connection is unusable
            self._drop()
            return
        self.received_any = True
        if not self.head_done:
            self.head_bytes += len(data)
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            if self.response is None:  # bytes beyond a complete answer: finished, but not reusable
                self._drop()
                return
            cause = exc.__cause__ if isinstance(exc, httptools.HttpParserCallbackError) else None
            error = cause if isinstance(cause, UpstreamError) else UpstreamProtocolError(f"not an HTTP/1.1 answer the router accepts: {exc}")
            self._fail(error)
            return
        if not self.head_done and self.head_bytes > _MAX_HEAD_BYTES:
            self._fail(UpstreamProtocolError(f"response head over {_MAX_HEAD_BYTES} bytes"))
            return
        resp = self.response
        if resp is not None and not self.paused and resp.queued_bytes > _HIGH_WATER and self.transport is not None:
            self.paused = True
            self.transport.pause_reading()

    def _fail(self, error: UpstreamError) -> None:
        if self.response is not None:
            self.response._fail(error)
        self._drop()

    def _drop(self) -> None:
        self.closed = True
        self.response = None
        if self.transport is not None:
            self.transport.close()

    def pause_writing(self):  # pragma: no cover - requests are small
        pass

    def resume_writing(self):  # pragma: no cover
        pass

    # --- llhttp callbacks (the parser calls these from feed_data) --------------------------------
    def on_message_begin(self) -> None:
        if self.response is None:
            raise UpstreamProtocolError("bytes beyond the end of the answer")
        self._header_names = []
        self._headers = {}

    def on_header(self, name: bytes, value: bytes) -> None:
        # Counted here, not from data_received: one segment may carry the head and a large body.
        self.header_bytes += len(name) + len(value) + 4
        if self.header_bytes > _MAX_HEAD_BYTES:
            raise UpstreamProtocolError(f"response head over {_MAX_HEAD_BYTES} bytes")
        key = name.decode("latin-1").lower()
        self._header_names.append(name)
        text = value.decode("latin-1").strip()
        # A repeated header becomes one comma-joined value (RFC 9110 5.3); llhttp already refused
        # duplicate Content-Length.
        self._headers[key] = f"{self._headers[key]}, {text}" if key in self._headers else text

    def on_headers_complete(self) -> None:
        status = self.parser.get_status_code()
        if not 100 <= status <= 599:
            raise UpstreamProtocolError(f"status {status} is outside 100-599")
        if status < 200:
            if status == 101:
                raise UpstreamProtocolError("the worker tried to switch protocols (101)")
            return  # an interim answer (100 Continue, 103): wait for the real one
        headers = self._headers
        te = headers.get("transfer-encoding")
        if te is not None and te.lower() != "chunked":
            raise UpstreamProtocolError(f"unsupported Transfer-Encoding {te[:40]!r}")
        self.framed = te is not None or "content-length" in headers or status in (204, 304)
        self.keep_alive = self.framed and self.parser.should_keep_alive()
        self.head_done = True
        resp = self.response
        resp.status = status
        resp.headers = headers
        resp._head_ready()

    def on_body(self, body: bytes) -> None:
        if self.head_done:
            self.response._feed(bytes(body))

    def on_message_complete(self) -> None:
        if not self.head_done:
            return  # the end of an interim 1xx answer
        resp = self.response
        self.response = None  # anything after this is beyond the answer
        resp._finish()

    # --- request -------------------------------------------------------------------------------
    def start(self, request_bytes: bytes, response: "UpstreamResponse") -> None:
        self.response = response
        self.parser = httptools.HttpResponseParser(self)
        self.head_done = False
        self.head_bytes = 0
        self.header_bytes = 0
        self.received_any = False
        self.keep_alive = True
        self.framed = False
        response._conn = self
        self.transport.write(request_bytes)
        response.sent_at = time.monotonic()

    def resume(self) -> None:
        if self.paused and self.transport is not None and not self.closed:
            self.paused = False
            self.transport.resume_reading()


class UpstreamResponse:
    """A worker's answer: `status`, `headers` (lower-case names), body via `read_chunk()` / `read()`."""

    __slots__ = ("status", "headers", "done", "_chunks", "queued_bytes", "_waiter", "_error",
                 "_conn", "_loop", "_first_byte_s", "_idle_s", "_head", "_pool", "_live",
                 "sent_at", "body_at")

    def __init__(self, loop: asyncio.AbstractEventLoop, first_byte_s: float, idle_s: float,
                 pool: "UpstreamPool", live: "set[UpstreamResponse] | None" = None) -> None:
        self.status = 0
        self.headers: dict[str, str] = {}
        self.done = False
        self._chunks: deque[bytes] = deque()
        self.queued_bytes = 0
        self._waiter: asyncio.Future | None = None
        self._error: Exception | None = None
        self._conn: _Connection | None = None
        self._loop = loop
        self._first_byte_s = first_byte_s  # until the head arrives
        self._idle_s = idle_s  # between pieces of body
        self._head = False
        self._pool = pool
        self._live = live  # the pool's set of unfinished answers from this worker (for abort_worker)
        self.sent_at = self.body_at = 0.0  # time.monotonic() of the request sent, of the first body byte in
        if live is not None:
            live.add(self)

    def _unlist(self) -> None:
        if self._live is not None:
            self._live.discard(self)
            self._live = None

    # called by the connection
    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _head_ready(self) -> None:
        self._head = True
        self._wake()

    def _feed(self, data: bytes) -> None:
        if not self.body_at:
            self.body_at = time.monotonic()
        self._chunks.append(data)
        self.queued_bytes += len(data)
        self._wake()

    def _finish(self) -> None:
        self.done = True
        self._unlist()
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
        self._unlist()
        self._wake()
        if self._conn is not None:
            self._conn.response = None

    async def _wait(self, timeout_s: float, error: UpstreamTimeout) -> None:
        waiter = self._loop.create_future()
        self._waiter = waiter
        timer = self._loop.call_later(timeout_s, self._on_timeout, waiter, error)
        try:
            await waiter
        finally:
            timer.cancel()
            self._waiter = None

    @staticmethod
    def _on_timeout(waiter: asyncio.Future, error: UpstreamTimeout) -> None:
        if not waiter.done():
            waiter.set_exception(error)

    async def wait_head(self) -> None:
        """Until the response head arrives; UpstreamFirstByteTimeout after the first-byte timeout."""
        deadline = self._loop.time() + self._first_byte_s
        while not self._head:
            if self._error is not None:
                raise self._error
            left = deadline - self._loop.time()
            if left <= 0:
                raise UpstreamFirstByteTimeout(f"no answer from the worker within {self._first_byte_s:g}s")
            await self._wait(left, UpstreamFirstByteTimeout(
                f"no answer from the worker within {self._first_byte_s:g}s"))

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
            await self._wait(self._idle_s, UpstreamTimeout(f"the worker sent nothing for {self._idle_s:g}s"))

    async def read(self) -> bytes:
        parts = []
        while True:
            data = await self.read_chunk()
            if not data:
                return b"".join(parts)
            parts.append(data)

    def close(self) -> None:
        """Abandon the answer (client left): drop the connection so the worker stops generating."""
        self.abort(UpstreamError("abandoned"))

    def abort(self, error: UpstreamError) -> None:
        """Fail whoever waits on this answer with `error` and drop the connection (the worker aborts)."""
        if not self.done:
            conn = self._conn
            self._fail(error)
            if conn is not None:
                self._pool._discard(conn)


def _header_block(lines: str) -> bytes:
    """The extra header lines as bytes, without any line that would make the request invalid HTTP."""
    if not lines:
        return b""
    if lines.isascii() and lines.replace("\r\n", "").isprintable():
        return lines.encode("ascii")  # printable ASCII lines (ids, keys): nothing to leave out
    try:
        block = lines.encode("latin-1")
    except UnicodeEncodeError:
        block = None
    if block is not None and not _has_controls(block.replace(b"\r\n", b"")):
        return block
    kept = []
    for line in lines.split("\r\n"):
        try:
            encoded = line.encode("latin-1")
        except UnicodeEncodeError:
            continue
        if encoded and not _has_controls(encoded):
            kept.append(encoded + b"\r\n")
    return b"".join(kept)


_CONTROL_BYTES = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")  # not allowed in a header value (tab is)


def _has_controls(data: bytes) -> bool:
    return _CONTROL_BYTES.search(data) is not None


class UpstreamPool:
    """Keep-alive connections to every worker, opened on demand and reused LIFO."""

    def __init__(self, connect_timeout_s: float = 5.0, read_timeout_s: float = 600.0,
                 max_idle_per_worker: int = 512, first_byte_timeout_s: float | None = None) -> None:
        """read_timeout_s: longest silence between pieces of body; first_byte_timeout_s: longest wait for
        the response head (defaults to read_timeout_s). `post` can override both per request."""
        self.connect_timeout_s = connect_timeout_s
        self.read_timeout_s = read_timeout_s
        self.first_byte_timeout_s = read_timeout_s if first_byte_timeout_s is None else first_byte_timeout_s
        self.max_idle_per_worker = max_idle_per_worker
        self._idle: dict[tuple[str, int, bool], list[_Connection]] = {}
        self._targets: dict[str, tuple[str, int, bool, str]] = {}
        self._ssl: ssl.SSLContext | None = None
        self._live: dict[str, set[UpstreamResponse]] = {}  # base url -> answers not finished yet
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

    async def post(self, base_url: str, path: str, body: bytes, extra_headers: str = "", *,
                   first_byte_timeout_s: float | None = None, idle_timeout_s: float | None = None) -> UpstreamResponse:
        """Send a JSON POST and return once the response head has arrived.

        extra_headers: already formatted "Name: value\\r\\n" lines; a line that is not valid in HTTP
        (not latin-1, or with control characters) is left out rather than sent.
        first_byte_timeout_s / idle_timeout_s: this request's timeouts (default: the pool's).
        """
        host, port, tls, host_header = self._target(base_url)
        head = (f"POST {path} HTTP/1.1\r\nHost: {host_header}\r\nContent-Type: application/json\r\n"
                f"Accept-Encoding: identity\r\nContent-Length: {len(body)}\r\n").encode("latin-1")
        request = b"".join((head, _header_block(extra_headers), b"\r\n", body))  # the body is copied once
        first_byte_s = self.first_byte_timeout_s if first_byte_timeout_s is None else first_byte_timeout_s
        idle_s = self.read_timeout_s if idle_timeout_s is None else idle_timeout_s
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
            live = self._live.get(base_url)
            if live is None:  # (setdefault would build an empty set on every request)
                live = self._live[base_url] = set()
            response = UpstreamResponse(loop, first_byte_s, idle_s, self, live)
            conn.start(request, response)
            try:
                await response.wait_head()
                return response
            except asyncio.CancelledError:  # the client left while we waited: the worker must stop too
                response.close()
                raise
            except UpstreamAborted:
                raise  # abort() dropped the connection already; never retried on the same worker
            except UpstreamTimeout:
                self._discard(conn)
                raise
            except UpstreamError:
                self._discard(conn)
                if reused and not conn.received_any:
                    continue  # a stale keep-alive connection: retry once on a fresh one
                raise
        raise UpstreamError("the worker closed two connections in a row")  # pragma: no cover

    def live(self, base_url: str) -> int:
        """How many answers from this worker are unfinished (waiting for their head or streaming)."""
        return len(self._live.get(base_url, ()))

    def abort_worker(self, base_url: str, reason: str, retryable: bool = True) -> int:
        """Give up every unfinished answer from one worker (it was marked down). Returns how many."""
        answers = list(self._live.get(base_url, ()))
        for answer in answers:
            answer.abort(UpstreamAborted(reason, retryable))
        return len(answers)

    def abort_all(self, reason: str) -> int:
        """Give up every unfinished answer (the router stops); none of them is retried."""
        return sum(self.abort_worker(url, reason, retryable=False) for url in list(self._live))

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
