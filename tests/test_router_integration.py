"""The router end to end, through the `openai` package, in front of instant stand-in workers.

The router and in-process stand-ins run on an event loop in a background thread; the tests drive
them with the synchronous OpenAI client like any user would. The kill test uses stand-ins in
subprocesses so a worker can really die (SIGKILL) mid-run.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai
import pytest

from router.app import STATE_KEY, build_app, drain, make_runner, make_site
from router.config import RouterConfig
from router.discovery import DnsDiscovery, diff_members

sys.path.insert(0, str(Path(__file__).parent))
from standin_worker import FIXED_STREAM_PARTS, StandinWorker  # noqa: E402

pytestmark = pytest.mark.timeout(60)

LONG_DOC = "The quick brown fox jumps over the lazy dog while the router keeps counting. "


class LoopThread:
    """An asyncio loop in a daemon thread; `run` executes a coroutine there and waits for it."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro, timeout: float = 30):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


class Fleet:
    """A router and its stand-in workers on one background loop."""

    def __init__(self, loop: LoopThread, n_workers: int, **router_options) -> None:
        self.loop = loop
        self.workers = [loop.run(StandinWorker(name=f"s{i}").start()) for i in range(n_workers)]
        options = dict(health_interval_s=0.2, breaker_cooldown_s=0.5, read_timeout_s=5.0, drain_timeout_s=1.0)
        options["worker_urls"] = [w.url for w in self.workers]
        options.update(router_options)
        self.config = RouterConfig(host="127.0.0.1", port=0, **options)
        self.app = build_app(self.config)
        self.state = self.app[STATE_KEY]
        self.runner = make_runner(self.app)  # the server settings `radixfleet router` runs with

        async def start():
            await self.runner.setup()
            site = make_site(self.runner, self.config)
            await site.start()
            return site._server.sockets[0].getsockname()[1]

        self.port = loop.run(start())
        self.base = f"http://127.0.0.1:{self.port}"

    def client(self, api_key: str = "unused", **kwargs) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.base + "/v1", api_key=api_key, max_retries=0, timeout=20, **kwargs)

    def worker_named(self, worker_id: str) -> StandinWorker:
        state_worker = next(w for w in self.state.pool if w.worker_id == worker_id)
        return next(w for w in self.workers if w.url == state_worker.url)

    def close(self) -> None:
        self.loop.run(self.runner.cleanup())
        for w in self.workers:
            self.loop.run(w.stop())


@pytest.fixture(scope="module")
def loop():
    lt = LoopThread()
    yield lt
    lt.close()


@pytest.fixture
def fleet_factory(loop):
    made = []

    def make(n_workers=2, **options) -> Fleet:
        fleet = Fleet(loop, n_workers, **options)
        made.append(fleet)
        return fleet

    yield make
    for fleet in made:
        fleet.close()


def http(method: str, url: str, body: bytes | dict | None = None, headers: dict | None = None):
    """(status, headers, body bytes) without raising on 4xx/5xx."""
    data = json.dumps(body).encode() if isinstance(body, dict) else body
    req = urllib.request.Request(url, data=data, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=20) as resp:
            return resp.status, dict(resp.headers), resp.read()
    except urllib.error.HTTPError as err:
        return err.code, dict(err.headers), err.read()


def chat(client, content: str, **kwargs):
    return client.chat.completions.with_raw_response.create(
        model="m", messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": content}],
        **kwargs)


# --- passthrough --------------------------------------------------------------------------------------

def test_chat_and_completions_pass_through_streaming_and_not(fleet_factory):
    fleet = fleet_factory(2)
    client = fleet.client()
    reply = client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])
    assert reply.choices[0].message.content.startswith("Hello from s")
    assert reply.usage.prompt_tokens_details.cached_tokens == 0

    stream = client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}], stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text.startswith("Hello from s") and chunks[-1].usage.prompt_tokens > 0

    completion = client.completions.create(model="m", prompt="Once upon a time", max_tokens=2)
    assert completion.choices[0].text == "Hello from"
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="m", prompt="Once upon a time", max_tokens=3, stream=True))
    assert streamed == "Hello from " + streamed.split()[-1]
    assert [m.id for m in client.models.list().data] == ["standin-model"]


def test_streams_are_relayed_byte_for_byte(fleet_factory, loop):
    fleet = fleet_factory(1)
    fleet.workers[0].mode = "fixed_stream"
    status, headers, body = http("POST", fleet.base + "/v1/chat/completions",
                                 {"model": "m", "stream": True, "messages": [{"role": "user", "content": "x"}]})
    assert status == 200 and headers["Content-Type"].startswith("text/event-stream")
    assert body == b"".join(FIXED_STREAM_PARTS)


# --- placement -----------------------------------------------------------------------------------------

def test_repeated_prefixes_land_on_the_worker_that_has_them(fleet_factory):
    fleet = fleet_factory(4)
    client = fleet.client()
    docs = [f"Document {i}. " + LONG_DOC * (8 + i) for i in range(4)]
    homes = {}
    for turn in range(3):
        for i, doc in enumerate(docs):
            raw = chat(client, doc + f" Question {turn}?")
            worker_id = raw.headers["x-radixfleet-worker"]
            cached = raw.parse().usage.prompt_tokens_details.cached_tokens
            if turn == 0:
                homes[i] = worker_id
                assert cached == 0
            else:
                assert worker_id == homes[i], "a repeated prefix must go back to its worker"
                assert cached > 100, "the worker reports the prefix as cached"
    assert len(set(homes.values())) == 4, "distinct documents are spread over the workers"
    assert "127.0.0.1" not in json.dumps(homes)


def test_sessions_stick_by_header_and_by_user_field(fleet_factory):
    fleet = fleet_factory(3)
    client = fleet.client()
    for session in ("alpha", "beta", "gamma"):
        first = chat(client, f"{session} opening {session}", extra_headers={"X-Session-ID": session})
        home = first.headers["x-radixfleet-worker"]
        for i in range(4):  # unrelated prompts: without the pin they would be routed by load
            raw = chat(client, f"unrelated prompt {i} " * 3, extra_headers={"X-Session-ID": session})
            assert raw.headers["x-radixfleet-worker"] == home
    home = chat(client, "by user field", user="carol").headers["x-radixfleet-worker"]
    for i in range(3):
        assert chat(client, f"other {i}", user="carol").headers["x-radixfleet-worker"] == home


def test_session_policy_sticks(fleet_factory):
    fleet = fleet_factory(3, policy="session")
    client = fleet.client()
    homes = {chat(client, "x", user=f"u{i}").headers["x-radixfleet-worker"] for i in range(12)}
    assert len(homes) > 1
    for i in range(12):
        home = chat(client, "a", user=f"u{i}").headers["x-radixfleet-worker"]
        assert chat(client, "b", user=f"u{i}").headers["x-radixfleet-worker"] == home


# --- failures ------------------------------------------------------------------------------------------

def test_failing_and_hanging_workers_are_retried_elsewhere(fleet_factory):
    fleet = fleet_factory(2, read_timeout_s=0.5, policy="round_robin")
    client = fleet.client()
    fleet.workers[0].mode = "unavailable"  # a worker-wide 503 (a 500 is the request's: not retried)
    replies = [client.chat.completions.create(model="m", messages=[{"role": "user", "content": str(i)}])
               for i in range(6)]
    assert all(r.choices[0].message.content == "Hello from s1 ." for r in replies)
    fleet.state.pool.get(fleet.workers[0].url).breaker.record_success()  # back in rotation
    streamed = ["".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model="m", messages=[{"role": "user", "content": f"s{i}"}], stream=True) if c.choices) for i in range(2)]
    assert streamed == ["Hello from s1 ."] * 2, "a stream failing before its first byte is retried too"
    fleet.workers[0].mode = "ok"
    fleet.workers[1].mode = "hang"
    fleet.state.pool.get(fleet.workers[1].url).breaker.record_success()
    replies = [client.chat.completions.create(model="m", messages=[{"role": "user", "content": str(i)}])
               for i in range(3)]
    assert all(r.choices[0].message.content == "Hello from s0 ." for r in replies)
    assert fleet.state.metrics.retries >= 1


def test_all_workers_down_gives_a_clean_error_without_urls(fleet_factory):
    fleet = fleet_factory(2, max_retries=1)
    for w in fleet.workers:
        w.mode = "fail"
    status, headers, body = http("POST", fleet.base + "/v1/chat/completions",
                                 {"model": "m", "messages": [{"role": "user", "content": "x"}]})
    assert status == 500 and json.loads(body)["error"]["message"]
    for w in fleet.workers:
        w.mode = "unhealthy"
    time.sleep(0.6)  # health polls mark them down
    status, headers, body = http("POST", fleet.base + "/v1/chat/completions",
                                 {"model": "m", "messages": [{"role": "user", "content": "x"}]})
    assert status == 503 and json.loads(body)["error"]["code"] == "no_healthy_worker"
    assert b"127.0.0.1" not in body and "127.0.0.1" not in json.dumps(headers)
    assert http("GET", fleet.base + "/health")[0] == 503


def test_mid_stream_failure_ends_with_an_error_event(fleet_factory):
    fleet = fleet_factory(1)
    fleet.workers[0].mode = "die_mid_stream"
    client = fleet.client()
    received = []
    with pytest.raises(openai.APIError, match="worker serving this stream failed"):
        for chunk in client.chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}],
                                                    stream=True):
            received.append(chunk)
    assert received, "the failure came after the first chunk"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_http(url: str, deadline_s: float = 20) -> None:
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        try:
            with urllib.request.urlopen(url, timeout=1):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(url)


def test_worker_killed_mid_run_is_routed_around(fleet_factory, loop):
    script = str(Path(__file__).parent / "standin_worker.py")
    ports = [_free_port() for _ in range(3)]
    procs = [subprocess.Popen([sys.executable, script, "--port", str(p), "--name", f"p{i}"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
             for i, p in enumerate(ports)]
    try:
        for p in ports:
            _wait_http(f"http://127.0.0.1:{p}/health")
        for p in ports:  # slow answers keep requests in flight when the worker dies
            http("POST", f"http://127.0.0.1:{p}/control", {"response_delay_s": 0.02, "chunk_delay_s": 0.02})
        fleet = fleet_factory(0, worker_urls=[f"http://127.0.0.1:{p}" for p in ports], policy="round_robin")
        client = fleet.client()
        failures_before_first_byte = []
        stream_failures_after_start = []
        done = []

        def one(i: int) -> None:
            try:
                _one(i)
            finally:
                done.append(i)

        def _one(i: int) -> None:
            messages = [{"role": "user", "content": f"request {i}"}]
            if i % 3 == 0:
                got = 0
                try:
                    for _ in client.chat.completions.create(model="m", messages=messages, stream=True):
                        got += 1
                except openai.APIError:
                    (stream_failures_after_start if got else failures_before_first_byte).append(i)
                except Exception:  # noqa: BLE001 - any other failure is one the router should have prevented
                    failures_before_first_byte.append(i)
            else:
                try:
                    client.chat.completions.create(model="m", messages=messages)
                except Exception:  # noqa: BLE001
                    failures_before_first_byte.append(i)

        with ThreadPoolExecutor(8) as pool:
            futures = [pool.submit(one, i) for i in range(120)]
            while len(done) < 30:
                time.sleep(0.01)
            procs[1].send_signal(signal.SIGKILL)
            killed_after = len(done)
            for f in futures:
                f.result()
        assert killed_after < 100, "the worker died while most of the run was still ahead"
        assert failures_before_first_byte == [], "requests that had not started streaming must not fail"
        assert fleet.state.metrics.retries + len(stream_failures_after_start) >= 1, "the kill hit live traffic"
        assert len(stream_failures_after_start) <= 8
        # The dead worker is now out of rotation.
        after = {chat(client, f"after {i}").parse().choices[0].message.content for i in range(6)}
        assert after == {"Hello from p0 .", "Hello from p2 ."}
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait()


# --- admin, auth, validation -----------------------------------------------------------------------------

def test_workers_added_and_removed_live(fleet_factory, loop):
    fleet = fleet_factory(1, admin_key="admin-secret", policy="round_robin")
    extra = loop.run(StandinWorker(name="late").start())
    fleet.workers.append(extra)
    admin = {"Authorization": "Bearer admin-secret", "Content-Type": "application/json"}
    assert http("POST", fleet.base + "/workers", {"url": extra.url})[0] == 401
    assert http("POST", fleet.base + "/workers", {"url": "not a url"}, admin)[0] == 400
    status, _, body = http("POST", fleet.base + "/workers", {"url": extra.url}, admin)
    assert status == 201 and json.loads(body)["id"] == "w1"
    client = fleet.client()
    served = {client.chat.completions.create(model="m", messages=[{"role": "user", "content": str(i)}])
              .choices[0].message.content for i in range(4)}
    assert served == {"Hello from s0 .", "Hello from late ."}
    status, _, body = http("GET", fleet.base + "/workers", headers=admin)
    assert status == 200 and {w["url"] for w in json.loads(body)["workers"]} == {fleet.workers[0].url, extra.url}
    status, _, _ = http("DELETE", fleet.base + f"/workers?url={fleet.workers[0].url}", headers=admin)
    assert status == 200
    served = {client.chat.completions.create(model="m", messages=[{"role": "user", "content": str(i)}])
              .choices[0].message.content for i in range(4)}
    assert served == {"Hello from late ."}
    assert http("DELETE", fleet.base + "/workers", {"url": fleet.workers[0].url}, admin)[0] == 404


def test_admin_api_is_disabled_without_an_admin_key(fleet_factory):
    fleet = fleet_factory(1, api_key="client-key")
    status, _, body = http("GET", fleet.base + "/workers", headers={"Authorization": "Bearer client-key"})
    assert status == 403 and b"--admin-key" in body


def test_api_key_is_enforced(fleet_factory):
    fleet = fleet_factory(1, api_key="sk-right", admin_key="adm")
    with pytest.raises(openai.AuthenticationError):
        fleet.client("sk-wrong").chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}])
    with pytest.raises(openai.AuthenticationError):
        fleet.client("sk-wrong").models.list()
    ok = fleet.client("sk-right").chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}])
    assert ok.choices[0].message.content
    # The admin key is not a client key, nor the client key an admin key.
    assert http("GET", fleet.base + "/workers", headers={"Authorization": "Bearer sk-right"})[0] == 401
    assert http("GET", fleet.base + "/health")[0] == 200, "health stays open for load balancers"
    assert fleet.workers[0].served == 1


@pytest.mark.parametrize("body, param", [
    (b"{not json", None),
    (b"[1, 2]", None),
    (b'{"model": "m"}', "messages"),
    (b'{"model": "m", "messages": []}', "messages"),
    (b'{"model": "m", "messages": [{"content": "no role"}]}', "messages[0].role"),
    (b'{"model": "m", "messages": [{"role": "user", "content": 5}]}', "messages[0].content"),
    (b'{"model": "m", "messages": [{"role": "user", "content": "x"}], "stream": "yes"}', "stream"),
    (b'{"model": "m", "messages": [{"role": "user", "content": "x"}], "max_tokens": -1}', "max_tokens"),
])
def test_bad_requests_are_answered_400_by_the_router(fleet_factory, body, param):
    fleet = fleet_factory(1)
    status, _, answer = http("POST", fleet.base + "/v1/chat/completions", body,
                             {"Content-Type": "application/json"})
    assert status == 400
    error = json.loads(answer)["error"]
    assert error["type"] == "invalid_request_error" and error["message"] and error["param"] == param
    assert fleet.workers[0].served == 0, "a bad request never reaches a worker"


def test_missing_prompt_and_oversized_bodies_are_rejected(fleet_factory):
    fleet = fleet_factory(1, max_body_bytes=4096)
    status, _, answer = http("POST", fleet.base + "/v1/completions", {"model": "m"})
    assert status == 400 and json.loads(answer)["error"]["param"] == "prompt"
    status, _, answer = http("POST", fleet.base + "/v1/completions", {"model": "m", "prompt": "x" * 10000})
    assert status == 413 and "4096" in json.loads(answer)["error"]["message"]
    status, _, answer = http("GET", fleet.base + "/v1/nothing")
    assert status == 404 and json.loads(answer)["error"]


def test_metrics_report_routing(fleet_factory):
    fleet = fleet_factory(2)
    client = fleet.client()
    for i in range(3):
        client.chat.completions.create(model="m", messages=[{"role": "user", "content": LONG_DOC * 3}])
    status, _, body = http("GET", fleet.base + "/metrics")
    text = body.decode()
    assert status == 200
    for name in ("radixfleet_router_requests_total{worker=", 'reason="cache_miss"', 'reason="cache_hit"',
                 "radixfleet_router_predicted_match_ratio_count 3", "radixfleet_router_tree_size_tokens",
                 "radixfleet_router_retries_total 0", 'radixfleet_router_worker_healthy{worker="w1"} 1',
                 # the tree is bounded by the worker's KV capacity as reported by its /load
                 'radixfleet_router_tree_capacity_tokens{worker="w0"} 65536'):
        assert name in text
    assert "127.0.0.1" not in text


def test_drain_finishes_in_flight_requests_and_refuses_new_ones(fleet_factory, loop):
    fleet = fleet_factory(1)
    fleet.workers[0].response_delay_s = 0.5
    client = fleet.client()
    with ThreadPoolExecutor(1) as pool:
        slow = pool.submit(client.chat.completions.create, model="m",
                           messages=[{"role": "user", "content": "slow"}])
        time.sleep(0.2)
        draining = asyncio.run_coroutine_threadsafe(drain(fleet.state, None, 5.0), loop.loop)
        time.sleep(0.05)
        assert http("GET", fleet.base + "/health")[0] == 503
        status, _, body = http("POST", fleet.base + "/v1/chat/completions",
                               {"model": "m", "messages": [{"role": "user", "content": "late"}]})
        assert status == 503 and json.loads(body)["error"]["code"] == "draining"
        assert slow.result(10).choices[0].message.content == "Hello from s0 ."
        draining.result(10)
    assert fleet.state.active_requests == 0


def test_dns_discovery_adds_and_removes_workers(fleet_factory, loop):
    fleet = fleet_factory(0, admin_key="k")  # no static worker: DNS is the only source here
    answers = {"now": ["10.1.0.1", "10.1.0.2"]}

    async def resolver(host, port):
        if answers["now"] is None:
            raise OSError("SERVFAIL")
        return answers["now"]

    discovery = DnsDiscovery(fleet.state, "workers.internal:8000", resolver=resolver)
    added, removed = loop.run(discovery.refresh())
    assert added == ["http://10.1.0.1:8000", "http://10.1.0.2:8000"] and removed == []
    answers["now"] = None  # a failed lookup keeps the fleet
    assert loop.run(discovery.refresh()) == ([], [])
    assert len(fleet.state.pool) == 2
    answers["now"] = ["10.1.0.2", "10.1.0.3"]
    added, removed = loop.run(discovery.refresh())
    assert added == ["http://10.1.0.3:8000"] and removed == ["http://10.1.0.1:8000"]
    assert diff_members(["a", "b"], ["b", "c"]) == (["c"], ["a"])


def test_router_cli_rejects_bad_settings():
    proc = subprocess.run([sys.executable, "-m", "worker.cli", "router", "--port", "0"],
                          capture_output=True, text=True, timeout=30, cwd=Path(__file__).parent.parent,
                          env={**os.environ, "RADIXFLEET_API_KEY": "", "RADIXFLEET_ADMIN_KEY": ""})
    assert proc.returncode == 2 and "--worker-urls" in proc.stderr


def test_request_latency_and_time_to_first_byte_are_exported(fleet_factory):
    fleet = fleet_factory(1)
    fleet.workers[0].response_delay_s = 0.05
    client = fleet.client()
    client.chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}])
    list(client.chat.completions.create(model="m", messages=[{"role": "user", "content": "y"}], stream=True))
    client.completions.create(model="m", prompt="z", max_tokens=1)
    text = http("GET", fleet.base + "/metrics")[2].decode()
    for name in ('radixfleet_router_request_duration_seconds_count{endpoint="chat"} 2.0',
                 'radixfleet_router_request_duration_seconds_count{endpoint="completions"} 1.0',
                 'radixfleet_router_time_to_first_byte_seconds_count{endpoint="chat"} 2.0',
                 # the worker waited 50 ms before answering: no request was faster than that
                 'radixfleet_router_time_to_first_byte_seconds_bucket{endpoint="chat",le="0.025"} 0.0'):
        assert name in text
