"""What a new user meets first: busy ports, an unreachable worker, API keys, bad model folders,
and the demo model's short default answer."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from router.app import build_app as build_router_app
from router.config import RouterConfig
from router.health import HealthLog
from worker.models.config import CheckpointError
from worker.models.loader import find_tensor_files
from worker.models.registry import resolve_model
from worker.server.api_key import api_key_middleware
from worker.server.launcher import WorkerProcess, free_port

ROOT = Path(__file__).parent.parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _radixfleet(*argv: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "worker.cli", *argv], cwd=ROOT, env=ENV, capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture
def busy_port():
    """A port something listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


def test_worker_on_a_busy_port_stops_before_loading_anything(busy_port):
    done = _radixfleet("worker", "--model", "demo", "--device", "cpu", "--port", str(busy_port))
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [
        f"radixfleet worker: cannot listen on 127.0.0.1:{busy_port}: Address already in use. "
        "Pick another --port or stop the process using it."]
    assert "engine" not in done.stdout + done.stderr


def test_up_names_the_flag_of_the_busy_port_and_starts_nothing(busy_port):
    free = free_port()
    done = _radixfleet("up", "--device", "cpu", "--num-workers", "1", "--host", "127.0.0.1", "--port", str(free),
                       "--worker-base-port", str(busy_port))
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [
        f"radixfleet up: port {busy_port} on 127.0.0.1 is not available (Address already in use): "
        "pick another --worker-base-port or stop the process using it"]
    assert "started" not in done.stdout
    done = _radixfleet("up", "--device", "cpu", "--num-workers", "1", "--host", "127.0.0.1", "--port",
                       str(busy_port), "--worker-base-port", str(free))
    assert "pick another --port or stop" in done.stderr and "started" not in done.stdout


def test_the_router_logs_an_unreachable_worker_with_its_url():
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    proc = subprocess.Popen([sys.executable, "-m", "worker.cli", "router", "--worker-urls", dead, "--host",
                             "127.0.0.1", "--port", str(free_port())], cwd=ROOT, env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        for line in proc.stdout:
            if "not routable" in line:
                assert f"worker w0 ({dead}) is not routable: cannot connect" in line
                break
        else:
            pytest.fail("the router exited without logging the unreachable worker")
    finally:
        proc.terminate()
        proc.wait(30)


class _Worker:
    __slots__ = ("worker_id", "url")

    def __init__(self) -> None:
        self.worker_id, self.url = "w0", "http://127.0.0.1:1"


def test_health_log_reports_each_change_once(caplog):
    health_log, worker = HealthLog(), _Worker()
    with caplog.at_level(logging.INFO, logger="radixfleet.router.health"):
        for reason in ["cannot connect (Connection refused)", "cannot connect (Connection refused)",
                       "/health answered 503 (loading)", None, None]:
            health_log.observe(worker, reason)
    assert [r.getMessage() for r in caplog.records] == [
        "worker w0 (http://127.0.0.1:1) is not routable: cannot connect (Connection refused)",
        "worker w0 (http://127.0.0.1:1) is not routable: /health answered 503 (loading)",
        "worker w0 (http://127.0.0.1:1) is healthy again",
    ]


def _keyed_app(key: str) -> web.Application:
    async def ok(request: web.Request) -> web.Response:
        return web.json_response({"ok": True})

    app = web.Application(middlewares=[api_key_middleware(key)])
    for path in ("/health", "/metrics", "/load", "/v1/models"):
        app.router.add_get(path, ok)
    return app


def test_worker_api_key_guards_everything_but_health_and_metrics():
    async def check() -> dict:
        async with TestClient(TestServer(_keyed_app("s3cret"))) as client:
            out = {}
            for path in ("/health", "/metrics", "/load", "/v1/models"):
                out[path] = (await client.get(path)).status
            wrong = await client.get("/v1/models", headers={"Authorization": "Bearer nope"})
            out["wrong"] = (wrong.status, (await wrong.json())["error"]["code"])
            out["right"] = (await client.get("/v1/models", headers={"Authorization": "Bearer s3cret"})).status
            return out

    out = asyncio.run(check())
    assert out == {"/health": 200, "/metrics": 200, "/load": 401, "/v1/models": 401,
                   "wrong": (401, "invalid_api_key"), "right": 200}


def test_the_router_sends_the_worker_key_on_requests_polls_and_model_lists():
    seen: dict[str, str | None] = {}

    async def record(request: web.Request) -> web.Response:
        seen[request.path] = request.headers.get("Authorization")
        if request.path == "/load":
            return web.json_response({"running": 0, "waiting": 0, "kv_tokens_used": 0, "kv_tokens_total": 1000})
        if request.path == "/v1/models":
            return web.json_response({"object": "list", "data": []})
        if request.path == "/health":
            return web.json_response({"status": "ok"})
        return web.json_response({"choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}}]})

    async def scenario() -> None:
        worker_app = web.Application()
        worker_app.router.add_route("*", "/{tail:.*}", record)
        async with TestServer(worker_app, host="127.0.0.1") as worker:
            config = RouterConfig(worker_urls=[str(worker.make_url("")).rstrip("/")], worker_api_key="wk",
                                  api_key="client-key")
            async with TestClient(TestServer(build_router_app(config))) as router:
                headers = {"Authorization": "Bearer client-key"}
                body = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
                assert (await router.post("/v1/chat/completions", json=body, headers=headers)).status == 200
                assert (await router.get("/v1/models", headers=headers)).status == 200

    asyncio.run(scenario())
    assert {path: seen.get(path) for path in ("/health", "/load", "/v1/chat/completions", "/v1/models")} == \
        dict.fromkeys(("/health", "/load", "/v1/chat/completions", "/v1/models"), "Bearer wk")


def test_a_corrupt_safetensors_file_is_named(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not a header")
    with pytest.raises(CheckpointError, match="model.safetensors is not a readable safetensors file"):
        find_tensor_files(tmp_path)


def test_a_hub_id_is_looked_up_in_the_local_cache_only(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(ValueError, match="must already be in the local Hugging Face cache"):
        resolve_model("SomeOrg/some-model")
    snapshot = tmp_path / "models--SomeOrg--some-model" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (snapshot.parent.parent / "refs").mkdir()
    (snapshot.parent.parent / "refs" / "main").write_text("abc123")
    assert resolve_model("SomeOrg/some-model") == snapshot


def _post(url: str, body: dict, key: str | None = None) -> tuple[int, dict]:
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as error:
        return error.code, json.load(error)


@pytest.mark.timeout(300)
def test_a_demo_worker_with_a_key_answers_chat_briefly_by_default():
    args = ["--model", "demo", "--device", "cpu", "--kv-cache-tokens", "2048", "--default-max-tokens", "5",
            "--api-key", "k1", "--cpu-threads", "1"]
    with WorkerProcess(args, env={"OMP_NUM_THREADS": "1"}) as worker:
        assert worker.health_status() == 200  # /health needs no key
        chat = {"model": "demo", "ignore_eos": True, "messages": [{"role": "user", "content": "Hello"}]}
        status, body = _post(worker.url + "/v1/chat/completions", chat)
        assert status == 401 and body["error"]["code"] == "invalid_api_key"
        status, body = _post(worker.url + "/v1/chat/completions", chat, key="k1")
        assert status == 200 and body["usage"]["completion_tokens"] == 5  # --default-max-tokens
        status, body = _post(worker.url + "/v1/chat/completions", {**chat, "max_tokens": 7}, key="k1")
        assert body["usage"]["completion_tokens"] == 7  # a request's own max_tokens wins
