"""Worker lifecycle: a full waiting queue (503 + Retry-After), the engine process dying, and SIGTERM.

Tests in this module run in order on one worker limited to one running and one waiting request;
the last one shuts it down. The engine-death test starts a worker of its own.
"""

import json
import os
import signal
import socket
import threading
import time
import urllib.error
import urllib.request

import pytest

from worker.server.launcher import WorkerProcess, WorkerStartError

MODEL = "demo"
ARGS = ["--model", MODEL, "--device", "cpu", "--kv-cache-tokens", "4096", "--no-progress"]


class Stream:
    """A streaming completion read on a background thread, so the test can act while it runs."""

    def __init__(self, url: str, max_tokens: int = 400):
        body = {"model": MODEL, "prompt": "A long story about a mill", "max_tokens": max_tokens, "stream": True,
                "ignore_eos": True}
        request = urllib.request.Request(url + "/v1/completions", data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
        self.events: list = []
        self.error: Exception | None = None
        self.first_event = threading.Event()
        self.done = threading.Event()
        self._thread = threading.Thread(target=self._read, args=(request,), daemon=True)
        self._thread.start()

    def _read(self, request):
        try:
            with urllib.request.urlopen(request, timeout=120) as response:
                for line in response:
                    if line.startswith(b"data: "):
                        payload = line[6:].strip()
                        self.events.append(payload if payload == b"[DONE]" else json.loads(payload))
                        self.first_event.set()
        except Exception as error:  # noqa: BLE001 - recorded for the test to inspect
            self.error = error
        finally:
            self.first_event.set()
            self.done.set()

    def finish_reasons(self) -> list:
        return [e["choices"][0]["finish_reason"] for e in self.events
                if isinstance(e, dict) and e.get("choices") and e["choices"][0]["finish_reason"]]


def post(url: str, body: dict) -> tuple[int, dict, dict]:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, dict(response.headers), json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers), json.loads(error.read())


def get_load(url: str) -> dict:
    with urllib.request.urlopen(url + "/load", timeout=10) as response:
        return json.loads(response.read())


def wait_for(condition, what: str, timeout_s: float = 60.0):
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


@pytest.fixture(scope="module")
def worker():
    process = WorkerProcess(ARGS + ["--max-running-requests", "1", "--max-waiting-requests", "1",
                                    "--shutdown-timeout", "1"], env={"OMP_NUM_THREADS": "1"})
    process.start()
    yield process
    process.kill()


def test_full_waiting_queue_answers_503_with_retry_after(worker):
    running = Stream(worker.url, max_tokens=100)
    assert running.first_event.wait(60) and running.error is None
    queued: dict = {}
    waiter = threading.Thread(target=lambda: queued.update(
        result=post(worker.url + "/v1/completions", {"model": MODEL, "prompt": "queued", "max_tokens": 2})))
    waiter.start()
    wait_for(lambda: get_load(worker.url)["waiting"] == 1, "the second request to wait")
    status, headers, body = post(worker.url + "/v1/completions", {"model": MODEL, "prompt": "refused", "max_tokens": 2})
    assert status == 503 and int(headers["Retry-After"]) >= 1
    assert body["error"]["code"] == "queue_full"
    running_load = get_load(worker.url)
    assert running_load["running"] == 1
    # The queued request still completes once the running one is done.
    waiter.join(120)
    running.done.wait(120)
    assert queued["result"][0] == 200
    assert running.finish_reasons() == ["length"]


def test_sigterm_stops_listening_aborts_in_flight_and_exits_cleanly(worker):
    stream = Stream(worker.url, max_tokens=1000)
    assert stream.first_event.wait(60) and stream.error is None
    engine_pid = worker.engine_pid()
    worker.process.send_signal(signal.SIGTERM)
    assert worker.process.wait(60) == 0
    assert stream.done.wait(30)
    assert stream.finish_reasons() == ["abort"] and stream.events[-1] == b"[DONE]"
    with socket.socket() as sock:  # a new server can listen on the port (closed connections may be in TIME_WAIT)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", worker.port))
        sock.listen()
    wait_for(lambda: not _alive(engine_pid), "the engine process to exit", 30)
    assert "stopped" in worker.log_text()


def test_a_model_that_cannot_load_is_a_clear_error_and_exit_code():
    with pytest.raises(WorkerStartError) as caught:
        WorkerProcess(["--model", "/no/such/checkpoint", "--device", "cpu"], start_timeout_s=120).start()
    assert "failed to start" in str(caught.value) and "/no/such/checkpoint" in str(caught.value)
    assert "exited with code 1" in str(caught.value)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as stat:  # a zombie is dead too
        return stat.read().split(")")[-1].split()[0] != "Z"


def test_engine_death_turns_health_503_and_fails_in_flight_requests():
    with WorkerProcess(ARGS, env={"OMP_NUM_THREADS": "1"}) as worker:
        stream = Stream(worker.url, max_tokens=1000)
        assert stream.first_event.wait(60)
        os.kill(worker.engine_pid(), signal.SIGKILL)
        assert stream.done.wait(30)
        errors = [e for e in stream.events if isinstance(e, dict) and "error" in e]
        assert errors and errors[0]["error"]["code"] == "engine_unavailable"
        wait_for(lambda: worker.health_status() == 503, "/health to report the dead engine", 30)
        status, _, body = post(worker.url + "/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": 2})
        assert status == 503 and body["error"]["code"] == "engine_unavailable"
