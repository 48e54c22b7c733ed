"""Request ids and traceparent through the router to a worker, and the JSON / text access logs.

The router runs in front of stand-in workers that serve behind the worker's own request-id
middleware, so "the worker saw the id" is what the worker's middleware decided, as in production.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging

import aiohttp
import pytest
from aiohttp import web

from bench.standin_worker import StandinWorker
from helpers_http import serve
from router.app import build_app
from router.cli import add_arguments as add_router_arguments, config_from_args
from router.config import RouterConfig
from worker.server.access_log import access_log_middlewares, access_logger, configure_access_log
from worker.server.cli import add_worker_options
from worker.server.request_id import (
    HEADER,
    echo_request_id,
    request_id_middleware,
    request_id_of,
    valid_traceparent,
)

pytestmark = pytest.mark.timeout(60)

TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
SECRET_PROMPT = "the launch code is 0000"


class SeeingWorker(StandinWorker):
    """A stand-in behind the worker's request-id middleware that remembers what each request came with."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.seen: list[tuple[str, str | None]] = []  # (request id the worker serves under, traceparent)

    def make_app(self) -> web.Application:
        app = super().make_app()

        @web.middleware
        async def remember(request: web.Request, handler):
            if request.path.startswith("/v1/"):
                self.seen.append((request_id_of(request), request.headers.get("traceparent")))
            return await handler(request)

        app.middlewares[:0] = [request_id_middleware, remember]
        app.on_response_prepare.append(echo_request_id)
        return app


@pytest.fixture(autouse=True)
def access_log_off_afterwards():
    """The access-log mode is per process: put it back so other tests' apps log nothing."""
    yield
    configure_access_log("off")


@pytest.fixture
def access_lines():
    lines: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record):
            lines.append(record.getMessage())

    handler = Collect()
    access_logger.addHandler(handler)
    yield lines
    access_logger.removeHandler(handler)


async def _with_router(scenario, workers: int = 1, **options):
    """Run `scenario(session, base_url, workers)` against a router in front of SeeingWorkers."""
    fleet = [await SeeingWorker(name=f"s{i}").start() for i in range(workers)]
    config = RouterConfig(host="127.0.0.1", port=0, worker_urls=[w.url for w in fleet], health_interval_s=0.2,
                          read_timeout_s=5.0, **options)
    runner, base = await serve(build_app(config))
    try:
        async with aiohttp.ClientSession() as session:
            return await scenario(session, base, fleet)
    finally:
        await runner.cleanup()
        for worker in fleet:
            await worker.stop()


def run_router(scenario, **options):
    return asyncio.run(_with_router(scenario, **options))


def chat_body(stream: bool = False) -> dict:
    return {"model": "m", "messages": [{"role": "user", "content": SECRET_PROMPT}], "stream": stream}


async def post_chat(session, base, headers=None, stream=False):
    """(status, echoed id, body) of one chat request through the router."""
    async with session.post(base + "/v1/chat/completions", json=chat_body(stream), headers=headers or {}) as r:
        return r.status, r.headers.get(HEADER), await r.read()


# --- request ids -----------------------------------------------------------------------------------

@pytest.mark.parametrize("stream", [False, True])
def test_a_client_id_comes_back_and_reaches_the_worker(stream):
    async def scenario(session, base, fleet):
        return await post_chat(session, base, {HEADER: "req-abc.123"}, stream=stream), fleet[0].seen

    (status, echoed, body), seen = run_router(scenario)
    assert status == 200 and echoed == "req-abc.123"
    assert seen == [("req-abc.123", None)]
    assert (b"data: [DONE]" in body) == stream


@pytest.mark.parametrize("bad", ["has space", "x" * 129, ""])
def test_a_bad_or_missing_id_is_replaced_by_one_the_worker_gets_too(bad):
    async def scenario(session, base, fleet):
        return await post_chat(session, base, {HEADER: bad} if bad else {}), fleet[0].seen

    (status, echoed, _), seen = run_router(scenario)
    assert status == 200 and echoed != bad and len(echoed) == 32
    assert seen == [(echoed, None)]  # the worker serves under the router's replacement


def test_router_errors_carry_the_id():
    async def scenario(session, base, fleet):
        answers = []
        async with session.get(base + "/nowhere", headers={HEADER: "req-404"}) as r:
            answers.append((r.status, r.headers.get(HEADER)))
        async with session.post(base + "/v1/chat/completions", data=b"{",
                                headers={HEADER: "req-400", "Authorization": "Bearer k"}) as r:
            answers.append((r.status, r.headers.get(HEADER)))
        async with session.post(base + "/v1/chat/completions", json=chat_body(), headers={HEADER: "req-401"}) as r:
            answers.append((r.status, r.headers.get(HEADER)))
        return answers

    assert run_router(scenario, api_key="k") == [(404, "req-404"), (400, "req-400"), (401, "req-401")]


def test_router_log_lines_for_a_request_carry_its_id():
    records: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record):
            records.append(record.getMessage())

    async def scenario(session, base, fleet):
        for worker in fleet:
            worker.mode = "unavailable"  # a worker-wide 503: the router logs each failed attempt and retries
        return await post_chat(session, base, {HEADER: "req-fail"})

    handler = Collect()
    proxy_log = logging.getLogger("radixfleet.router.proxy")
    proxy_log.addHandler(handler)
    try:
        status, echoed, _ = run_router(scenario, workers=2, max_retries=1)
    finally:
        proxy_log.removeHandler(handler)
    assert (status, echoed) == (503, "req-fail")
    failures = [line for line in records if "failed before first byte" in line]
    assert len(failures) == 2 and all(line.startswith("[request req-fail] ") for line in failures)


# --- traceparent -------------------------------------------------------------------------------------

def test_a_well_formed_traceparent_reaches_the_worker_unchanged_and_a_malformed_one_does_not():
    async def scenario(session, base, fleet):
        await post_chat(session, base, {HEADER: "good", "traceparent": TRACEPARENT})
        await post_chat(session, base, {HEADER: "bad", "traceparent": "00-not-a-trace-01"})
        return fleet[0].seen

    assert run_router(scenario) == [("good", TRACEPARENT), ("bad", None)]


def test_traceparent_validation_follows_w3c_trace_context():
    assert valid_traceparent(TRACEPARENT)
    assert valid_traceparent("01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-later-field")
    for bad in (None, "", TRACEPARENT.upper(), TRACEPARENT + "-extra",
                "ff" + TRACEPARENT[2:],  # version ff is forbidden
                "00-" + "0" * 32 + "-00f067aa0ba902b7-01",  # all-zero trace id
                "00-4bf92f3577b34da6a3ce929d0e0e4736-" + "0" * 16 + "-01",  # all-zero parent id
                "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01"):  # short trace id
        assert not valid_traceparent(bad), bad


# --- access logs ----------------------------------------------------------------------------------------

def test_router_json_access_lines_parse_and_carry_the_fields(access_lines):
    async def scenario(session, base, fleet):
        await post_chat(session, base, {HEADER: "req-json"})
        await post_chat(session, base, {HEADER: "req-stream"}, stream=True)
        async with session.get(base + "/nowhere", headers={HEADER: "req-missing"}) as r:
            await r.read()
        for probe in ("/health", "/metrics"):  # probes and scrapes write no line
            async with session.get(base + probe) as r:
                await r.read()

    run_router(scenario, access_log="json")
    entries = [json.loads(line) for line in access_lines]
    assert all(SECRET_PROMPT not in line for line in access_lines)
    plain, streamed, missing = entries
    assert set(plain) == {"time", "method", "path", "status", "duration_ms", "request_id", "worker_id",
                          "router_overhead_ms", "prompt_tokens", "completion_tokens"}
    assert plain["time"].endswith("Z") and plain["duration_ms"] >= 0
    assert (plain["method"], plain["path"], plain["status"], plain["request_id"]) == \
        ("POST", "/v1/chat/completions", 200, "req-json")
    assert plain["worker_id"] is not None
    assert plain["prompt_tokens"] > 0 and plain["completion_tokens"] == 4  # "Hello from s0 ."
    assert (streamed["status"], streamed["request_id"], streamed["prompt_tokens"]) == (200, "req-stream", None)
    assert streamed["worker_id"] == plain["worker_id"]
    assert (missing["status"], missing["request_id"], missing["worker_id"]) == (404, "req-missing", None)


def test_router_text_access_lines_and_off_by_default(access_lines):
    async def scenario(session, base, fleet):
        await post_chat(session, base, {HEADER: "req-text"})

    run_router(scenario)
    assert access_lines == []  # today's behaviour: no access log unless asked
    run_router(scenario, access_log="text")
    (line,) = access_lines
    assert " POST /v1/chat/completions 200 " in line and "request_id=req-text" in line
    assert "worker_id=" in line and "completion_tokens=4" in line and SECRET_PROMPT not in line


def test_worker_access_log_and_id_on_a_streamed_answer(access_lines):
    """The worker's middlewares on a bare app: a streamed answer echoes the id, each request logs a line."""

    async def answer(request: web.Request) -> web.Response:
        return web.json_response({"usage": {"prompt_tokens": 7, "completion_tokens": 3}})

    async def stream(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(b"data: [DONE]\n\n")
        return response

    async def run():
        app = web.Application(middlewares=[request_id_middleware, *access_log_middlewares("json")])
        app.on_response_prepare.append(echo_request_id)
        app.router.add_post("/v1/completions", answer)
        app.router.add_post("/v1/chat/completions", stream)
        runner, base = await serve(app)
        echoed = []
        try:
            async with aiohttp.ClientSession() as session:
                for path, rid in (("/v1/completions", "w-1"), ("/v1/chat/completions", "w-2")):
                    async with session.post(base + path, json={}, headers={HEADER: rid}) as r:
                        await r.read()
                        echoed.append(r.headers.get(HEADER))
        finally:
            await runner.cleanup()
        return echoed

    assert asyncio.run(run()) == ["w-1", "w-2"]
    whole, streamed = (json.loads(line) for line in access_lines)
    assert (whole["request_id"], whole["status"], whole["prompt_tokens"], whole["completion_tokens"]) == \
        ("w-1", 200, 7, 3)
    assert "worker_id" not in whole
    assert (streamed["request_id"], streamed["path"], streamed["completion_tokens"]) == \
        ("w-2", "/v1/chat/completions", None)


# --- flags ---------------------------------------------------------------------------------------------------

def test_access_log_flags_on_router_and_worker():
    router = argparse.ArgumentParser()
    add_router_arguments(router)
    args = router.parse_args(["--worker-urls", "http://127.0.0.1:1", "--access-log", "json"])
    assert config_from_args(args).access_log == "json"
    assert config_from_args(router.parse_args(["--worker-urls", "http://127.0.0.1:1"])).access_log == "off"
    with pytest.raises(ValueError, match="--access-log 'yaml' is unknown: choose one of off, text, json"):
        RouterConfig(worker_urls=["http://127.0.0.1:1"], access_log="yaml").validate()

    worker = argparse.ArgumentParser()
    add_worker_options(worker)
    assert worker.parse_args(["--access-log", "text"]).access_log == "text"
    assert worker.parse_args([]).access_log == "off"
    with pytest.raises(SystemExit):
        worker.parse_args(["--access-log", "yaml"])
