"""Fuzzed bodies at a real CPU worker (demo model) and at the router in front of it.

Hypothesis draws request bodies from the same space as `radixfleet bench fuzz` (bench/fuzz_soak.py):
edge values in every field, broken serialisations (nested 990 deep, 5,000-digit integers, NaN, lone
surrogates, not UTF-8), headers a proxy must not pass on. Every answer must be a 2xx, or a 4xx with an
OpenAI error body; never a 5xx; and both must still serve a plain request afterwards. Bounded: 200
examples per endpoint, a fixed seed, loopback only.

Also here: the worker keeps answering /health while it tokenizes a 6 MB prompt, and the router's own
input checks (request_parsing) answer bad bodies and headers with 400s.
"""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bench.fuzz_soak import kind_and_path, make_request, problem, send
from worker.server.launcher import WorkerProcess, free_port

ROOT = Path(__file__).parent.parent
pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

FUZZ = settings(max_examples=200, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@pytest.fixture(scope="module")
def worker():
    with WorkerProcess(["--model", "demo", "--device", "cpu", "--no-progress", "--log-level", "warning"],
                       env={"OMP_NUM_THREADS": "1"}) as process:
        yield process


@pytest.fixture(scope="module")
def router_url(worker, tmp_path_factory):
    port = free_port()
    log = (tmp_path_factory.mktemp("router") / "router.log").open("wb")
    proc = subprocess.Popen([sys.executable, "-m", "worker.cli", "router", "--worker-urls", worker.url,
                             "--port", str(port), "--host", "127.0.0.1"], cwd=ROOT, stdout=log,
                            stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while not _healthy(url):
            assert proc.poll() is None and time.monotonic() < deadline, "the router did not start"
            time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        proc.wait(30)
        log.close()


def _healthy(url: str, timeout_s: float = 2.0) -> bool:
    import urllib.request

    try:
        with urllib.request.urlopen(url + "/health", timeout=timeout_s) as response:
            return response.status == 200
    except OSError:
        return False


def _draw_request(data, allow_bad_encoding: bool):
    def choose(options):
        return data.draw(st.sampled_from(list(options)))

    kind, path = kind_and_path(choose)
    raw, headers = make_request(choose, kind, allow_bad_encoding)
    return path, raw, headers


def _assert_serves(url: str) -> None:
    status, body, _ = send(url, "/v1/completions", json.dumps({"prompt": "Hello", "max_tokens": 2}).encode(), {})
    assert status == 200 and json.loads(body)["choices"][0]["text"] is not None
    assert _healthy(url)


def _assert_clean(status: int, body: bytes, path: str, raw: bytes, headers: dict) -> None:
    issue = problem(status, body)
    assert issue is None, f"{issue} for POST {path} {headers} {raw[:300]!r}: {body[:300]!r}"


def test_fuzzed_bodies_at_the_worker(worker):
    @FUZZ
    @given(st.data())
    def one(data):
        path, raw, headers = _draw_request(data, allow_bad_encoding=True)
        status, body, _ = send(worker.url, path, raw, headers)
        _assert_clean(status, body, path, raw, headers)

    one()
    _assert_serves(worker.url)


def test_fuzzed_bodies_through_the_router(router_url):
    @FUZZ
    @given(st.data())
    def one(data):
        path, raw, headers = _draw_request(data, allow_bad_encoding=True)
        status, body, _ = send(router_url, path, raw, headers)
        _assert_clean(status, body, path, raw, headers)

    one()
    _assert_serves(router_url)


@pytest.mark.parametrize("raw", [
    b'{"prompt": ' + b"[" * 990 + b"]" * 990 + b"}",
    b'{"prompt": "x", "max_tokens": ' + b"9" * 5000 + b"}",
    b'{"prompt": "a\\ud800b", "max_tokens": 1}',
    b'{"messages": [{"role": "user", "content": "\\udfff"}], "max_tokens": 1}',
])
def test_issue_cases_are_400_with_an_error_body(worker, router_url, raw):
    path = "/v1/chat/completions" if b"messages" in raw else "/v1/completions"
    for url in (worker.url, router_url):
        status, body, _ = send(url, path, raw, {})
        assert status == 400, (url, body[:200])
        assert json.loads(body)["error"]["type"] == "invalid_request_error"


def test_n_times_max_tokens_is_bounded(worker):
    status, body, _ = send(worker.url, "/v1/completions",
                           json.dumps({"prompt": "x", "n": 128, "max_tokens": 2000}).encode(), {})
    assert status == 400 and json.loads(body)["error"]["param"] == "n"


def test_worker_answers_health_while_tokenizing_a_huge_prompt(worker):
    # 6 MB: tokenizing it takes this 2-core box about 25 s, long enough that a blocked loop misses probes.
    prompt = ("The river runs past the old mill and into the sea. " * 120_000)[:6_000_000]
    raw = json.dumps({"prompt": prompt, "max_tokens": 1}).encode()
    answer: dict = {}

    def big_request():
        answer["status"], answer["body"], _ = send(worker.url, "/v1/completions", raw, {}, timeout_s=300)

    thread = threading.Thread(target=big_request)
    thread.start()
    probes = []
    while thread.is_alive():
        probes.append(_healthy(worker.url, timeout_s=5))  # generous: a blocked loop misses it by far more
        time.sleep(0.2)
    thread.join()
    assert answer["status"] == 400, answer["body"][:300]
    assert json.loads(answer["body"])["error"]["code"] == "context_length_exceeded"
    assert probes and all(probes), f"/health missed {probes.count(False)} of {len(probes)} probes"
    _assert_serves(worker.url)


# ---------------------------------------------------------------------- router input checks
def _tiny_app_answer(handler_body, request_headers: dict, data: bytes):
    """Serve one request with a handler built from request_parsing helpers; (status, json body)."""
    import asyncio

    import aiohttp
    from aiohttp import web

    from router.request_parsing import BadRequest
    from helpers_http import serve
    from router.responses import json_error

    async def handler(request):
        try:
            return await handler_body(request)
        except BadRequest as exc:
            return json_error(exc.status, exc.message, param=exc.param, code=exc.code)

    async def main():
        app = web.Application(client_max_size=1024)
        app.router.add_post("/", handler)
        runner, base = await serve(app)
        try:
            async with aiohttp.ClientSession(auto_decompress=False) as session:
                async with session.post(f"{base}/", data=data, headers=request_headers,
                                        skip_auto_headers=["Content-Type"]) as response:
                    return response.status, await response.json(content_type=None)
        finally:
            await runner.cleanup()

    return asyncio.run(main())


async def _read_and_parse(request):
    from aiohttp import web

    from router.request_parsing import check_passthrough_headers, parse_request, read_body

    check_passthrough_headers(request.headers)
    raw = await read_body(request, 1024)
    parse_request(raw, "completion", None)
    return web.json_response({"ok": True})


def test_router_read_body_refuses_a_gzip_body_that_is_not_gzip():
    status, body = _tiny_app_answer(_read_and_parse, {"Content-Encoding": "gzip"}, b'{"prompt": "x"}')
    assert status == 400 and "Content-Encoding" in body["error"]["message"]
    status, body = _tiny_app_answer(_read_and_parse, {"Content-Encoding": "gzip"}, gzip.compress(b'{"prompt": "x"}'))
    assert status == 200


def test_router_read_body_refuses_an_oversized_body_with_413():
    status, body = _tiny_app_answer(_read_and_parse, {}, b'{"prompt": "' + b"x" * 2000 + b'"}')
    assert status == 413 and body["error"]["code"] == "request_too_large"


def test_router_refuses_headers_it_cannot_pass_on():
    from router.request_parsing import BadRequest, check_passthrough_headers

    check_passthrough_headers({"X-Request-ID": "req-1", "traceparent": "00-abc-01"})
    for headers in ({"X-Request-ID": "caf\u00e9\u2603"}, {"traceparent": "00-\x01-01"}):
        with pytest.raises(BadRequest) as caught:
            check_passthrough_headers(headers)
        assert caught.value.status == 400 and caught.value.param in headers
