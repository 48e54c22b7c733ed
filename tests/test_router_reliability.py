"""The router under bad input, overload, hung workers, disconnects and slow clients (issue 15).

Loopback only, stand-in workers (in process, or in subprocesses where a worker must really stop:
SIGSTOP). Every wait is a bounded poll of a condition, never a timed assertion.
"""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
# the same fleet of in-process stand-ins behind a router (its fixtures are used here as they are)
from test_router_integration import Fleet, _free_port, _wait_http, fleet_factory, http, loop  # noqa: E402,F401

from router.admin_url import BadWorkerUrl, validate_worker_url  # noqa: E402
from router.admission import AdmissionGate, Shed  # noqa: E402
from router.health import CircuitBreaker  # noqa: E402

pytestmark = pytest.mark.timeout(90)


def _chat_body(content: str, **extra) -> dict:
    return {"model": "m", "messages": [{"role": "user", "content": content}], **extra}


def _post_chat(fleet: Fleet, content: str, **extra):
    return http("POST", fleet.base + "/v1/chat/completions", _chat_body(content, **extra))


def _wait_until(condition, timeout_s: float = 20.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def _idle(fleet: Fleet) -> bool:
    """Nothing in flight anywhere: router counters and the workers' own."""
    workers = list(fleet.state.pool)
    return (fleet.state.active_requests == 0 and fleet.state.gate.active == 0
            and all(w.in_flight == 0 and w.outstanding_tokens == 0 for w in workers)
            and all(s.running == 0 for s in fleet.workers))


# --- graceful degradation of the breaker -----------------------------------------------------------

def test_bad_requests_do_not_open_breakers_or_get_retried(fleet_factory):
    fleet = fleet_factory(2, policy="round_robin", failure_threshold=2)
    for worker in fleet.workers:
        worker.mode = "fail_on_boom"  # a prompt that makes every worker raise
    for i in range(10):
        status, _, body = _post_chat(fleet, f"BOOM {i}")
        assert status == 500 and json.loads(body)["error"]["message"] == "simulated worker failure"
        status, _, _ = _post_chat(fleet, "fine", temperature=-1)  # the client's mistake: a 4xx
        assert status == 400
    assert fleet.state.metrics.retries == 0, "a 500 for its input or a 4xx is never retried"
    now = time.monotonic()
    assert [w.breaker.state(now) for w in fleet.state.pool] == ["closed", "closed"]
    served = {json.loads(_post_chat(fleet, f"legit {i}")[2])["choices"][0]["message"]["content"] for i in range(4)}
    assert served == {"Hello from s0 .", "Hello from s1 ."}, "both workers still serve everyone else"
    assert fleet.state.metrics.responses["5xx"] == 10 and fleet.state.metrics.responses["4xx"] == 10
    assert _idle(fleet)


def test_queue_full_is_retried_once_then_relayed_with_retry_after(fleet_factory):
    fleet = fleet_factory(3, policy="round_robin", failure_threshold=1)
    fleet.workers[0].mode = "busy"
    replies = [json.loads(_post_chat(fleet, f"q{i}")[2])["choices"][0]["message"]["content"] for i in range(6)]
    assert "Hello from s0 ." not in replies, "a busy worker's 503 goes to another worker"
    for worker in fleet.workers:
        worker.mode = "busy"
    retries_before = fleet.state.metrics.retries
    status, headers, body = _post_chat(fleet, "all busy")
    assert status == 503 and headers["Retry-After"] == "2", "the worker's Retry-After reaches the client"
    assert json.loads(body)["error"]["message"] == "stand-in queue full"
    assert fleet.state.metrics.retries - retries_before == 1, "retried on one other worker, not on all"
    now = time.monotonic()
    assert all(w.breaker.state(now) == "closed" for w in fleet.state.pool), "busy is not broken"
    assert fleet.state.metrics.responses["5xx"] == 1
    assert _idle(fleet)


def test_worker_wide_503_opens_its_breaker_and_is_retried(fleet_factory):
    fleet = fleet_factory(2, policy="round_robin", failure_threshold=1, breaker_cooldown_s=30)
    fleet.workers[0].mode = "unavailable"
    replies = {json.loads(_post_chat(fleet, f"u{i}")[2])["choices"][0]["message"]["content"] for i in range(4)}
    assert replies == {"Hello from s1 ."}
    assert fleet.state.pool.get(fleet.workers[0].url).breaker.state(time.monotonic()) == "open"


# --- overload ---------------------------------------------------------------------------------------

def test_router_sheds_past_its_queue_with_retry_after(fleet_factory):
    fleet = fleet_factory(1, max_active_requests=2, max_queued_requests=2, queue_timeout_s=30)
    fleet.workers[0].response_delay_s = 0.5
    with ThreadPoolExecutor(12) as pool:
        answers = list(pool.map(lambda i: _post_chat(fleet, f"o{i}"), range(12)))
    statuses = sorted(a[0] for a in answers)
    assert set(statuses) == {200, 503} and statuses.count(200) >= 4, statuses
    for status, headers, body in answers:
        if status == 503:
            assert int(headers["Retry-After"]) >= 1
            assert json.loads(body)["error"]["code"] == "router_overloaded"
    assert fleet.state.metrics.responses["5xx"] == statuses.count(503)
    _wait_until(lambda: _idle(fleet), what="everything released")


def test_admission_gate_queues_in_order_times_out_and_passes_slots_on():
    async def scenario():
        gate = AdmissionGate(max_active=1, max_queued=2, queue_timeout_s=0.2)
        await gate.acquire()
        order = []

        async def waiter(name):
            await gate.acquire()
            order.append(name)

        first = asyncio.ensure_future(waiter("a"))
        second = asyncio.ensure_future(waiter("b"))
        await asyncio.sleep(0)
        with pytest.raises(Shed):  # the queue holds two
            await gate.acquire()
        gate.release()
        await first
        gate.release()
        await second
        assert order == ["a", "b"] and gate.active == 1
        with pytest.raises(Shed) as shed:  # nobody releases: the wait times out
            await gate.acquire()
        assert shed.value.retry_after_s >= 1 and gate.shed_timeout == 1
        cancelled = asyncio.ensure_future(gate.acquire())
        await asyncio.sleep(0)
        cancelled.cancel()
        with pytest.raises(asyncio.CancelledError):
            await cancelled
        gate.release()
        assert gate.active == 0 and gate.queued == 0

    asyncio.run(scenario())


# --- disconnects ------------------------------------------------------------------------------------

def _disconnect_after_sending(port: int, body: dict, wait_s: float) -> None:
    raw = json.dumps(body).encode()
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: " + str(len(raw)).encode() + b"\r\n\r\n" + raw)
        time.sleep(wait_s)


@pytest.mark.parametrize("stream", [False, True])
def test_client_disconnect_aborts_the_request_on_the_worker(fleet_factory, stream):
    fleet = fleet_factory(1)
    worker = fleet.workers[0]
    if stream:
        worker.chunk_delay_s = 5.0  # a slow stream: the client leaves after its first chunk
    else:
        worker.response_delay_s = 30.0  # a long non-streamed generation
    _disconnect_after_sending(fleet.port, _chat_body("leaving", stream=stream), 0.3)
    _wait_until(lambda: _idle(fleet), what="the worker's request to end when its client left")
    assert worker.served <= 1
    assert fleet.state.metrics.errors["client_disconnect"] >= 1


def test_counters_return_to_zero_after_a_mix_of_failures(fleet_factory):
    fleet = fleet_factory(3, policy="round_robin", read_timeout_s=0.3, first_byte_timeout_s=0.3)
    modes = ["fail_on_boom", "busy", "hang"]
    for worker, mode in zip(fleet.workers, modes):
        worker.mode = mode
    with ThreadPoolExecutor(6) as pool:
        list(pool.map(lambda i: _post_chat(fleet, f"BOOM {i}" if i % 2 else f"ok {i}", stream=bool(i % 3)),
                      range(18)))
    for worker in fleet.workers:
        worker.mode = "ok"
    _wait_until(lambda: _idle(fleet), what="all counters released")


def test_router_shutdown_ends_a_stream_with_an_error_event_and_done(fleet_factory, loop):
    from router.app import drain

    fleet = fleet_factory(1)
    fleet.workers[0].chunk_delay_s = 10.0
    got = []

    def read_stream():
        raw = json.dumps(_chat_body("cut me", stream=True)).encode()
        with socket.create_connection(("127.0.0.1", fleet.port), timeout=10) as sock:
            sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Connection: close\r\nContent-Length: " + str(len(raw)).encode() + b"\r\n\r\n" + raw)
            while True:
                data = sock.recv(65536)
                if not data:
                    break
                got.append(data)

    reader = threading.Thread(target=read_stream)
    reader.start()
    _wait_until(lambda: fleet.state.active_requests == 1 and got, what="the stream to start")
    loop.run(drain(fleet.state, None, 0.1))
    reader.join(10)
    text = b"".join(got).decode()
    assert '"code": "router_shutdown"' in text or '"code":"router_shutdown"' in text
    assert text.index("router_shutdown") < text.index("data: [DONE]\n\n"), "the error event, then [DONE]"


# --- hung workers -------------------------------------------------------------------------------------

def test_sigstopped_worker_is_routed_around_and_readmitted(fleet_factory):
    script = str(Path(__file__).parent / "standin_worker.py")
    ports = [_free_port() for _ in range(2)]
    procs = [subprocess.Popen([sys.executable, script, "--port", str(p), "--name", f"p{i}"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for i, p in enumerate(ports)]
    try:
        for p in ports:
            _wait_http(f"http://127.0.0.1:{p}/health")
        fleet = fleet_factory(0, worker_urls=[f"http://127.0.0.1:{p}" for p in ports], policy="round_robin",
                              health_interval_s=0.2, health_timeout_s=0.3, first_byte_timeout_s=60,
                              read_timeout_s=60)
        stopped = fleet.state.pool.get(f"http://127.0.0.1:{ports[1]}")
        procs[1].send_signal(signal.SIGSTOP)
        # Requests sent at once land on the stopped worker too, and wait there until it is marked down.
        with ThreadPoolExecutor(6) as pool:
            answers = list(pool.map(lambda i: _post_chat(fleet, f"h{i}", stream=bool(i % 2)), range(6)))
        assert [a[0] for a in answers] == [200] * 6, "unstarted requests on the hung worker were retried"
        assert all(b"p0" in a[2] and b"p1" not in a[2] for a in answers)
        assert stopped.breaker.state(time.monotonic()) == "down"
        assert {json.loads(_post_chat(fleet, f"after {i}")[2])["choices"][0]["message"]["content"]
                for i in range(4)} == {"Hello from p0 ."}
        procs[1].send_signal(signal.SIGCONT)
        _wait_until(lambda: stopped.routable(time.monotonic()), what="the worker back in rotation")
        assert {json.loads(_post_chat(fleet, f"back {i}")[2])["choices"][0]["message"]["content"]
                for i in range(4)} == {"Hello from p0 .", "Hello from p1 ."}
    finally:
        for proc in procs:
            proc.send_signal(signal.SIGCONT)
            proc.kill()
            proc.wait(5)


def test_breaker_poll_timeouts_suspect_then_down_then_readmit_after_two_good_polls():
    b = CircuitBreaker(readmit_after=2)
    assert not b.record_poll_timeout(0.0, down_after=2)
    assert b.state(0.0) == "suspect" and not b.allows(0.0), "one silent poll: no new traffic"
    b.record_poll(True, 0.5)
    assert b.allows(0.5), "a suspect worker that answers is back at once"
    b.record_poll_timeout(1.0, down_after=2)
    assert b.record_poll_timeout(2.0, down_after=2), "two in a row mark it down (once)"
    assert not b.record_poll_timeout(3.0, down_after=2)
    b.record_poll(True, 4.0)
    assert b.state(4.0) == "down", "one good poll is not enough after going silent"
    b.record_poll(True, 5.0)
    assert b.state(5.0) == "closed" and b.allows(5.0)


# --- slow clients and connection bounds ---------------------------------------------------------------

def test_slow_headers_are_closed_and_connections_past_the_limit_refused(fleet_factory):
    fleet = fleet_factory(1, header_timeout_s=0.5, max_connections=4)
    slow = [socket.create_connection(("127.0.0.1", fleet.port), timeout=10) for _ in range(4)]
    try:
        for sock in slow:
            sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nX-Slow: ")  # never finished
        time.sleep(0.1)
        with socket.create_connection(("127.0.0.1", fleet.port), timeout=10) as extra:
            refused = extra.recv(65536)
        assert refused.startswith(b"HTTP/1.1 503") and b"Retry-After: 1" in refused
        assert b"too_many_connections" in refused
        for sock in slow:  # closed by the server after the header timeout
            assert sock.recv(65536) == b""
    finally:
        for sock in slow:
            sock.close()
    _wait_until(lambda: http("GET", fleet.base + "/health")[0] == 200, what="the router to accept again")


def test_body_that_never_arrives_gets_408(fleet_factory):
    fleet = fleet_factory(1, body_timeout_s=0.5)
    with socket.create_connection(("127.0.0.1", fleet.port), timeout=10) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 100\r\n\r\n{\"model\":")
        answer = sock.recv(65536)
    assert answer.startswith(b"HTTP/1.1 408") and b"request_timeout" in answer


# --- the admin API ------------------------------------------------------------------------------------

@pytest.mark.parametrize("url, problem", [
    ("http://user:pass@127.0.0.1:8000", "credentials"),
    ("http://169.254.169.254", "link-local"),
    ("http://[fe80::1]:8000", "link-local"),
    ("http://metadata.google.internal", "metadata"),
    ("http://127.0.0.1:0", "port"),
    ("http://127.0.0.1:99999", "port"),
    ("http://127.0.0.1:8000#frag", "fragment"),
    ("http://127.0.0.1:8000/\r\nX-Evil: 1", "control"),
    ("http://127.0.0.1:80 00", "spaces"),
    ("ftp://127.0.0.1:8000", "http://"),
    ("file:///etc/passwd", "http://"),
    ("http://0.0.0.0:8000", "0.0.0.0"),
    ("http://127.0.0.1:8000/v1", "path"),
])
def test_admin_url_validation_refuses(url, problem):
    with pytest.raises(BadWorkerUrl) as error:
        validate_worker_url(url)
    assert problem in str(error.value)


def test_admin_url_validation_accepts_plain_worker_urls():
    for url in ("http://127.0.0.1:8100", "https://worker-3.svc:443", "http://[::1]:8000", "http://w0"):
        assert validate_worker_url(url) == url


def test_admin_api_answers_400_naming_the_problem(fleet_factory):
    fleet = fleet_factory(1, admin_key="adm")
    auth = {"Authorization": "Bearer adm", "Content-Type": "application/json"}
    status, _, body = http("POST", fleet.base + "/workers", {"url": "http://u:p@127.0.0.1:1234"}, auth)
    error = json.loads(body)["error"]
    assert status == 400 and "credentials" in error["message"] and error["param"] == "url"
    status, _, body = http("POST", fleet.base + "/workers", {"url": "http://169.254.169.254:80"}, auth)
    assert status == 400 and "link-local" in json.loads(body)["error"]["message"]
    assert len(fleet.state.pool) == 1
