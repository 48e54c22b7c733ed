"""The router's lean HTTP/1.1 client against a scripted raw server: framing, keep-alive, failures."""

from __future__ import annotations

import asyncio

import pytest

from router.upstream import UpstreamConnectError, UpstreamError, UpstreamPool, UpstreamTimeout


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
