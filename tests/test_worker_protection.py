"""A real worker (demo model, CPU) against slow and surplus clients, and disconnects through the router.

One worker for the module, started with small bounds: --header-timeout 1, --body-timeout 1,
--max-connections 6, --max-active-requests 2. Every wait is a bounded poll of a condition.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from worker.server.launcher import WorkerProcess, free_port

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

ROOT = Path(__file__).parent.parent
ARGS = ["--model", "demo", "--device", "cpu", "--kv-cache-tokens", "4096", "--no-progress",
        "--header-timeout", "1", "--body-timeout", "1", "--max-connections", "6", "--max-active-requests", "2",
        "--max-running-requests", "2"]
LONG = {"model": "demo", "prompt": "A long story about a mill", "max_tokens": 2000, "ignore_eos": True}


@pytest.fixture(scope="module")
def worker():
    process = WorkerProcess(ARGS, env={"OMP_NUM_THREADS": "1"})
    process.start()
    yield process
    process.kill()


def _load(url: str) -> dict:
    with urllib.request.urlopen(url + "/load", timeout=10) as response:
        return json.loads(response.read())


def _wait_until(condition, what: str, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def _idle(url: str) -> bool:
    load = _load(url)
    return load["running"] == 0 and load["waiting"] == 0 and load["kv_tokens_used"] == 0


def _send(port: int, path: str, body: dict, stream: bool) -> socket.socket:
    raw = json.dumps({**body, "stream": stream}).encode()
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    sock.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 f"Content-Length: {len(raw)}\r\n\r\n".encode() + raw)
    return sock


def test_half_sent_headers_are_closed_after_the_header_timeout(worker):
    socks = [socket.create_connection(("127.0.0.1", worker.port), timeout=30) for _ in range(3)]
    for sock in socks:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nX-Slow: ")
    for sock in socks:
        assert sock.recv(65536) == b"", "the worker closes a connection whose head never completes"
        sock.close()


def test_connections_past_the_limit_get_a_clear_503(worker):
    idle = [socket.create_connection(("127.0.0.1", worker.port), timeout=30) for _ in range(6)]
    try:
        time.sleep(0.2)
        with socket.create_connection(("127.0.0.1", worker.port), timeout=30) as extra:
            answer = extra.recv(65536)
        assert answer.startswith(b"HTTP/1.1 503") and b"Retry-After: 1" in answer
        assert b"too_many_connections" in answer
    finally:
        for sock in idle:
            sock.close()
    _wait_until(lambda: _health(worker.port) == 200, "the worker to accept again once they closed")


def test_a_body_that_never_arrives_gets_408(worker):
    with socket.create_connection(("127.0.0.1", worker.port), timeout=30) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 500\r\n\r\n{\"model\": ")
        answer = sock.recv(65536)
    assert answer.startswith(b"HTTP/1.1 408") and b"request_timeout" in answer


def test_past_max_active_requests_the_worker_answers_503_with_retry_after(worker):
    running = [_send(worker.port, "/v1/completions", LONG, stream=True) for _ in range(2)]
    try:
        for sock in running:
            assert sock.recv(65536).startswith(b"HTTP/1.1 200")
        refused = _send(worker.port, "/v1/completions", {**LONG, "max_tokens": 2}, stream=False)
        answer = refused.recv(65536)
        refused.close()
        assert answer.startswith(b"HTTP/1.1 503") and b"Retry-After: " in answer and b"queue_full" in answer
    finally:
        for sock in running:
            sock.close()
    _wait_until(lambda: _idle(worker.url), "the abandoned streams to free their KV")


@pytest.mark.parametrize("stream", [False, True])
def test_client_leaving_the_router_aborts_the_request_on_the_worker(worker, stream):
    port = free_port()
    router = subprocess.Popen([sys.executable, "-m", "worker.cli", "router", "--port", str(port), "--host",
                               "127.0.0.1", "--worker-urls", worker.url], cwd=ROOT,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_until(lambda: _health(port) == 200, "the router to start")
        sock = _send(port, "/v1/completions", LONG, stream=stream)
        _wait_until(lambda: _load(worker.url)["running"] == 1, "the request to run on the worker")
        sock.close()  # the client goes away, mid-generation
        _wait_until(lambda: _idle(worker.url), "the worker to abort the abandoned request")
        metrics = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
        in_flight = [line for line in metrics.splitlines()
                     if line.startswith(("radixfleet_router_worker_in_flight{", "radixfleet_router_worker_outstanding"))]
        assert in_flight and all(line.endswith(" 0.0") or line.endswith(" 0") for line in in_flight), in_flight
    finally:
        router.terminate()
        router.wait(30)


def _health(port: int) -> int:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as response:
            return response.status
    except OSError:
        return 0
