"""The router's lean HTTP/1.1 client against a scripted raw server: framing, keep-alive, failures."""

from __future__ import annotations

import asyncio

import pytest

from router.upstream import (
    UpstreamConnectError,
    UpstreamError,
    UpstreamFirstByteTimeout,
    UpstreamPool,
    UpstreamProtocolError,
    UpstreamTimeout,
)


class ScriptedServer:
    """Answers each request on a connection with the next scripted reply (a list of byte writes)."""

    def __init__(self, replies):
        self.replies = list(replies)
        self.requests: list[bytes] = []
        self.connections = 0
        self.close_after_reply = False

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":")[1])
                body = await reader.readexactly(length)
                self.requests.append(head + body)
                reply = self.replies.pop(0)
                if reply == "hang":
                    await asyncio.sleep(10)
                    return
                for part in reply:
                    if isinstance(part, float):  # a pause in the script
                        await asyncio.sleep(part)
                        continue
                    writer.write(part)
                    await writer.drain()
                    await asyncio.sleep(0.005)
                if self.close_after_reply or reply and reply[-1] == b"":
                    writer.close()
                    return
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    async def __aenter__(self):
        self.server = await asyncio.start_server(self.handle, "127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"
        return self

    async def __aexit__(self, *exc):
        self.server.close()


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 20))


def test_content_length_and_keep_alive_reuse():
    async def main():
        body = b'{"ok": true}'
        reply = [b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body) + body]
        async with ScriptedServer([reply, reply]) as server:
            pool = UpstreamPool()
            for _ in range(2):
                resp = await pool.post(server.url, "/v1/x", b'{"a":1}', "X-Request-ID: r1\r\n")
                assert resp.status == 200 and resp.headers["content-type"] == "application/json"
                assert await resp.read() == body
            assert server.connections == 1, "the second request reuses the keep-alive connection"
            first = server.requests[0]
            assert first.startswith(b"POST /v1/x HTTP/1.1\r\n") and b"X-Request-ID: r1\r\n" in first
            assert first.endswith(b'\r\n\r\n{"a":1}')
            pool.close()

    run(main())


def test_chunked_body_is_dechunked_across_arbitrary_splits():
    async def main():
        payload = b"data: one\n\ndata: [DONE]\n\n"
        wire = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Type: text/event-stream\r\n\r\n"
        wire += b"b\r\n" + payload[:11] + b"\r\n" + b"%x;ext=1\r\n" % (len(payload) - 11) + payload[11:] + b"\r\n0\r\n\r\n"
        parts = [wire[i:i + 7] for i in range(0, len(wire), 7)]  # splits land inside sizes and CRLFs
        async with ScriptedServer([parts, parts]) as server:
            pool = UpstreamPool()
            for _ in range(2):
                resp = await pool.post(server.url, "/s", b"{}")
                assert await resp.read() == payload
            assert server.connections == 1
            pool.close()

    run(main())


def test_close_delimited_body_and_no_reuse():
    async def main():
        reply = [b"HTTP/1.1 200 OK\r\n\r\n", b"partial ", b"then all", b""]
        async with ScriptedServer([reply, reply]) as server:
            pool = UpstreamPool()
            for _ in range(2):
                resp = await pool.post(server.url, "/", b"{}")
                assert await resp.read() == b"partial then all"
            assert server.connections == 2
            pool.close()

    run(main())


def test_stale_keep_alive_connection_is_retried_on_a_fresh_one():
    async def main():
        reply = [b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"]
        async with ScriptedServer([reply, reply]) as server:
            server.close_after_reply = True  # the worker closes idle connections right after answering
            pool = UpstreamPool()
            assert await (await pool.post(server.url, "/", b"{}")).read() == b"ok"
            await asyncio.sleep(0.05)
            assert await (await pool.post(server.url, "/", b"{}")).read() == b"ok"
            assert server.connections == 2
            pool.close()

    run(main())


def test_failures_are_typed():
    async def main():
        pool = UpstreamPool(connect_timeout_s=2, read_timeout_s=0.3)
        async with ScriptedServer([]) as server:
            dead_url = server.url
        with pytest.raises(UpstreamConnectError):
            await pool.post(dead_url, "/", b"{}")
        async with ScriptedServer(["hang"]) as server:
            with pytest.raises(UpstreamTimeout):
                await pool.post(server.url, "/", b"{}")
        async with ScriptedServer([[b"SMTP ready\r\n\r\n"]]) as server:
            with pytest.raises(UpstreamError, match="not an HTTP"):
                await pool.post(server.url, "/", b"{}")
        cut = [b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nshort", b""]
        async with ScriptedServer([cut]) as server:
            resp = await pool.post(server.url, "/", b"{}")
            assert await resp.read_chunk() == b"short"
            with pytest.raises(UpstreamError):
                await resp.read_chunk()
        pool.close()

    run(main())


# Each reply breaks HTTP/1.1 framing; the client must raise UpstreamProtocolError promptly: never return a
# short or spliced body, never wait for a timeout (the pool's timeouts here are far beyond the test's).
_BIG_HEAD = b"HTTP/1.1 200 OK\r\n" + b"".join(b"X-Pad-%d: %s\r\n" % (i, b"a" * 1000) for i in range(70))
MALFORMED = {
    "negative content-length": [b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\nbody"],
    "conflicting content-length": [b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 4\r\n\r\nbody"],
    "content-length with chunked": [b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n"
                                    b"4\r\nbody\r\n0\r\n\r\n"],
    "bare LF line endings": [b"HTTP/1.1 200 OK\nContent-Length: 4\n\nbody"],
    "bare LF inside a header value": [b"HTTP/1.1 200 OK\r\nX-Evil: a\nSet-Cookie: b\r\nContent-Length: 4\r\n\r\nbody"],
    "bare CR inside a header value": [b"HTTP/1.1 200 OK\r\nX-Evil: a\rb\r\nContent-Length: 4\r\n\r\nbody"],
    "response head over 64 KB": [_BIG_HEAD[:40000], _BIG_HEAD[40000:], b"Content-Length: 4\r\n\r\nbody"],
    "endless head": [_BIG_HEAD],
    "status 999": [b"HTTP/1.1 999 Odd\r\nContent-Length: 4\r\n\r\nbody"],
    "status 099": [b"HTTP/1.1 099 Odd\r\nContent-Length: 4\r\n\r\nbody"],
    "transfer-encoding other than chunked": [b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\nbody"],
    "bad chunk size": [b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nbody\r\n0\r\n\r\n"],
    "chunk longer than its size": [b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nbody\r\n0\r\n\r\n"],
    "not HTTP at all": [b"SMTP ready\r\n\r\n"],
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_framing_is_a_protocol_error(case):
    async def main():
        async with ScriptedServer([MALFORMED[case]]) as server:
            pool = UpstreamPool(connect_timeout_s=2, read_timeout_s=60)
            with pytest.raises(UpstreamProtocolError):
                resp = await pool.post(server.url, "/", b"{}")
                await resp.read()  # some errors only show in the body; none may return a short body
            pool.close()

    run(main())


def test_a_large_body_in_the_same_segment_as_the_head_is_not_a_large_head():
    async def main():
        body = b"x" * 200_000
        reply = [b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body) + body]
        async with ScriptedServer([reply]) as server:
            pool = UpstreamPool()
            assert await (await pool.post(server.url, "/", b"{}")).read() == body
            pool.close()

    run(main())


def test_bytes_beyond_the_body_are_not_read_as_the_next_answer():
    async def main():
        spliced = [b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nokHTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nbad"]
        clean = [b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\ngood"]
        async with ScriptedServer([spliced, clean]) as server:
            pool = UpstreamPool()
            assert await (await pool.post(server.url, "/", b"{}")).read() == b"ok"
            await asyncio.sleep(0.05)
            assert await (await pool.post(server.url, "/", b"{}")).read() == b"good"
            assert server.connections == 2, "a connection with stray bytes is never reused"
            pool.close()

    run(main())


def test_first_byte_timeout_is_separate_from_the_inter_chunk_timeout():
    async def main():
        # A slow head (prefill under load) within the first-byte timeout is fine even when it is longer
        # than the inter-chunk timeout.
        slow_head = [0.5, b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"]
        async with ScriptedServer([slow_head]) as server:
            pool = UpstreamPool(read_timeout_s=0.2, first_byte_timeout_s=10)
            assert await (await pool.post(server.url, "/", b"{}")).read() == b"ok"
            pool.close()
        # No head at all: the first-byte timeout, typed as such.
        async with ScriptedServer(["hang"]) as server:
            pool = UpstreamPool(read_timeout_s=10, first_byte_timeout_s=0.2)
            with pytest.raises(UpstreamFirstByteTimeout):
                await pool.post(server.url, "/", b"{}")
            pool.close()
        # A head, then silence mid-body: the inter-chunk timeout (per request here, overriding the pool's).
        stalled = [b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nhi\r\n", 5.0]
        async with ScriptedServer([stalled]) as server:
            pool = UpstreamPool(read_timeout_s=10, first_byte_timeout_s=10)
            resp = await pool.post(server.url, "/", b"{}", idle_timeout_s=0.2)
            assert await resp.read_chunk() == b"hi"
            with pytest.raises(UpstreamTimeout) as caught:
                await resp.read_chunk()
            assert not isinstance(caught.value, UpstreamFirstByteTimeout)
            pool.close()

    run(main())


def test_header_lines_that_are_not_valid_http_are_left_out():
    async def main():
        reply = [b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"]
        async with ScriptedServer([reply]) as server:
            pool = UpstreamPool()
            lines = "X-Request-ID: caf\u00e9-\u2603\r\ntraceparent: 00-abc\x01-01\r\nX-Keep: yes\r\n"
            assert await (await pool.post(server.url, "/", b"{}", lines)).read() == b"ok"
            sent = server.requests[0]
            assert b"X-Keep: yes\r\n" in sent and b"X-Request-ID" not in sent and b"traceparent" not in sent
            pool.close()

    run(main())


def test_interim_100_continue_is_skipped():
    async def main():
        reply = [b"HTTP/1.1 100 Continue\r\n\r\n", b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"]
        async with ScriptedServer([reply]) as server:
            pool = UpstreamPool()
            resp = await pool.post(server.url, "/", b"{}")
            assert resp.status == 200 and await resp.read() == b"ok"
            pool.close()

    run(main())
