"""The contracts router and worker share (worker/contracts.py): what one side writes, the other reads."""

import asyncio
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from aiohttp import web
from aiohttp.test_utils import make_mocked_request

from router.request_parsing import BadRequest, parse_request
from router.responses import json_error
from router.worker_pool import WorkerPool
from worker.contracts import LOAD_KEYS, LoadReport, dumps, error_body, loads, sse_error_event
from worker.engine.protocol import EngineStats
from worker.server import app as worker_app
from worker.server.context import CTX_KEY
from worker.server.errors import ApiError, bad_request, overloaded

ROOT = Path(__file__).parent.parent
ERROR_KEYS = {"message", "type", "param", "code"}


def _worker_load_answer(stats: EngineStats) -> web.Response:
    """GET /load as the worker's own handler answers it, for an engine reporting `stats`."""
    app = web.Application()
    app[CTX_KEY] = SimpleNamespace(client=SimpleNamespace(stats=stats))
    return asyncio.run(worker_app.load(make_mocked_request("GET", "/load", app=app)))


def test_the_workers_load_answer_is_read_back_whole_by_the_router():
    stats = EngineStats(num_running=3, num_waiting=2, kv_tokens_used=1500, kv_tokens_total=65536,
                        cache_hit_tokens=700, cache_query_tokens=1000, num_preemptions=1)
    response = _worker_load_answer(stats)
    assert response.status == 200 and response.content_type == "application/json"
    body = loads(response.body)
    assert tuple(body) == LOAD_KEYS, "the worker serves exactly the keys the router reads"
    report = LoadReport.from_json(body)
    assert report == LoadReport(running=3, waiting=2, kv_tokens_used=1500, kv_tokens_total=65536,
                                cache_hit_tokens=700, cache_query_tokens=1000, num_preemptions=1)
    worker = WorkerPool().add("http://127.0.0.1:1")
    worker.report = report
    assert worker.load == 5, "running + waiting from /load is what the policies balance on"
    assert worker.describe(0.0)["load"] == body, "the admin view shows the report as the worker sent it"


def test_a_load_report_from_an_older_worker_or_a_broken_one():
    assert LoadReport.from_json({"running": 1}) == LoadReport(running=1), "missing keys count as 0"
    assert LoadReport.from_json({"running": 2.0, "extra": "ignored"}).running == 2
    for bad, name in (({"waiting": "7"}, "waiting"), ({"kv_tokens_total": None}, "kv_tokens_total"),
                      ({"running": True}, "running")):
        with pytest.raises(ValueError, match=name):
            LoadReport.from_json(bad)
    with pytest.raises(ValueError, match="JSON object"):
        LoadReport.from_json([1, 2])


def test_worker_and_router_errors_have_one_openai_shape():
    worker_errors = [bad_request("temperature", "temperature must be >= 0"), overloaded(2, 9),
                     ApiError(404, "no such model", param="model", code="model_not_found")]
    for error in worker_errors:
        response = error.response()
        body = loads(response.body)
        assert set(body) == {"error"} and set(body["error"]) == ERROR_KEYS
        assert body == error.body() == error_body(error.message, error.type, error.param, error.code)
        assert response.status == error.status and response.content_type == "application/json"
    assert overloaded(2, 9).response().headers["Retry-After"] == "2"

    with pytest.raises(BadRequest) as info:
        parse_request(b'{"prompt": 5}', "completion", None)
    router_response = json_error(info.value.status, info.value.message, param=info.value.param)
    body = loads(router_response.body)
    assert set(body["error"]) == ERROR_KEYS and body["error"]["param"] == "prompt"
    assert body["error"]["type"] == "invalid_request_error" and router_response.status == 400


def test_a_stream_error_is_one_sse_event_with_the_same_body():
    event = sse_error_event("the worker failed", code="worker_failed")
    assert event.startswith(b"data: ") and event.endswith(b"\n\n") and event.count(b"\n\n") == 1
    assert loads(event[len(b"data: "):]) == error_body("the worker failed", "server_error", None, "worker_failed")


def test_json_codec_round_trips_unicode_and_rejects_garbage():
    obj = {"text": "naïve — 日本語 \U0001f600", "n": [1, 2.5, None, True]}
    raw = dumps(obj)
    assert isinstance(raw, bytes) and loads(raw) == obj and "日本語".encode() in raw, "UTF-8, not \\u escapes"
    assert b" " not in dumps({"a": [1, 2]}), "compact separators"
    for garbage in (b"{", b"\xff\xfe", b"", b"[1,]"):
        with pytest.raises(ValueError):
            loads(garbage)


def test_the_router_imports_no_torch():
    code = "import sys, router.app, router.cli, worker.contracts; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"
