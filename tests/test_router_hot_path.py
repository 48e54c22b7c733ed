"""The router's cheaper request path (issue 11) answers exactly as the middleware chain did.

Without --access-log the routes wrap their own request id and key check instead of aiohttp middlewares;
with it the middlewares run as before. Both must give a client the same answers. Also: a body that
arrives in pieces is still read whole (the fast path is only for bodies already buffered), the
admission gate's synchronous fast path, and fresh request ids in uuid4 form, distinct across a fork.
"""

from __future__ import annotations

import asyncio
import os
import socket
import sys
import time
import uuid
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from test_router_integration import fleet_factory, http, loop  # noqa: E402,F401

from router.admission import AdmissionGate  # noqa: E402
from worker.server.request_id import new_request_id  # noqa: E402

pytestmark = pytest.mark.timeout(90)

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


@pytest.mark.parametrize("access_log", ["off", "json"])
def test_keys_request_ids_and_open_routes_answer_alike_with_and_without_middlewares(fleet_factory, access_log):
    fleet = fleet_factory(1, api_key="client-key", admin_key="admin-key", access_log=access_log)
    assert (len(fleet.app.middlewares) > 0) == (access_log != "off")
    client = {"Authorization": "Bearer client-key"}
    admin = {"Authorization": "Bearer admin-key"}

    status, headers, body = http("POST", fleet.base + "/v1/chat/completions", CHAT, {"X-Request-ID": "no-key-1"})
    assert status == 401 and b"invalid_api_key" in body and headers["X-Request-ID"] == "no-key-1"
    status, headers, _ = http("POST", fleet.base + "/v1/chat/completions", CHAT, {**client, "X-Request-ID": "ok-1"})
    assert status == 200 and headers["X-Request-ID"] == "ok-1"
    status, headers, _ = http("POST", fleet.base + "/v1/chat/completions", CHAT, {**client, "X-Request-ID": "bad id"})
    assert status == 200 and uuid.UUID(hex=headers["X-Request-ID"]).version == 4  # not sane: a fresh one

    assert http("GET", fleet.base + "/workers", None, client)[0] == 401  # the client key is not the admin key
    assert http("GET", fleet.base + "/workers", None, admin)[0] == 200
    assert http("GET", fleet.base + "/v1/models", None, admin)[0] == 401
    for path in ("/health", "/metrics"):  # open
        assert http("GET", fleet.base + path)[0] == 200
    assert http("HEAD", fleet.base + "/health")[0] == 200
    status, headers, body = http("GET", fleet.base + "/nowhere", None, {"X-Request-ID": "lost-1"})
    assert status == 404 and b"not_found" in body and headers["X-Request-ID"] == "lost-1"
    status, _, _ = http("GET", fleet.base + "/v1/chat/completions", None, client)  # a POST route: the catch-all
    assert status == 404


@pytest.mark.parametrize("access_log", ["off", "json"])
def test_an_answer_outside_every_route_still_carries_the_request_id(fleet_factory, access_log):
    fleet = fleet_factory(1, access_log=access_log)
    with socket.create_connection(("127.0.0.1", fleet.port), timeout=20) as sock:
        sock.sendall(b"OPTIONS * HTTP/1.1\r\nHost: x\r\nX-Request-ID: star-1\r\nConnection: close\r\n\r\n")
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    head = answer.split(b"\r\n\r\n")[0].lower()
    assert head.startswith(b"http/1.1 4") and b"\r\nx-request-id: star-1" in head, answer[:300]


def test_a_body_that_arrives_in_pieces_is_read_whole(fleet_factory):
    fleet = fleet_factory(1)
    body = b'{"model": "m", "messages": [{"role": "user", "content": "in two pieces"}]}'
    with socket.create_connection(("127.0.0.1", fleet.port), timeout=20) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(body) + body[:20])
        time.sleep(0.2)  # pacing only: the handler starts with the body incomplete
        sock.sendall(body[20:])
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 200"), answer[:200]
    assert b"Hello from s0" in answer


def test_admission_try_acquire_takes_free_slots_and_never_jumps_the_queue():
    async def scenario():
        gate = AdmissionGate(max_active=2, max_queued=4, queue_timeout_s=5.0)
        assert gate.try_acquire() and gate.try_acquire()
        assert not gate.try_acquire() and gate.active == 2  # full: acquire() must wait or shed
        waiter = asyncio.ensure_future(gate.acquire())
        while gate.queued == 0:
            await asyncio.sleep(0)
        gate.release()  # the slot passes to the queued request
        await waiter
        assert gate.active == 2 and not gate.try_acquire()
        gate.release()
        assert gate.try_acquire()

    asyncio.run(scenario())


def test_fresh_request_ids_are_uuid4_hex_and_unique():
    ids = [new_request_id() for _ in range(1000)]  # several urandom batches
    assert len(set(ids)) == len(ids)
    for value in ids:
        parsed = uuid.UUID(hex=value)
        assert parsed.hex == value and parsed.version == 4 and parsed.variant == uuid.RFC_4122


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_forked_child_does_not_reuse_the_parents_ids():
    new_request_id()  # the parent holds a batch of ids it has not handed out
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: report the next id it would hand out, then leave at once
        try:
            os.write(write_end, new_request_id().encode())
        finally:
            os._exit(0)
    os.close(write_end)
    child_id = os.read(read_end, 64).decode()
    os.close(read_end)
    os.waitpid(pid, 0)
    assert len(child_id) == 32 and child_id != new_request_id()
