"""The router's own added latency: `radixfleet_router_overhead_seconds` and the access log's `router_overhead_ms`.

The stand-in worker sleeps 200 ms before its first byte. That wait is the worker's: a measure that
took it in (arrival to first byte, say) would read at least 0.2 s, so each observation must stay below
it, while the request's own duration, which does hold the wait, is above it.
"""

from __future__ import annotations

import asyncio
import json

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from bench.standin_worker import StandinWorker
from helpers_http import serve
from router.app import build_app
from router.config import RouterConfig
from test_request_ids import access_lines, access_log_off_afterwards  # noqa: F401 - fixtures: lines, mode reset

pytestmark = pytest.mark.timeout(60)

WORKER_WAIT_S = 0.2


def chat_body(stream: bool) -> dict:
    return {"model": "m", "messages": [{"role": "user", "content": "hello there"}], "stream": stream}


async def _scenario(requests: list[tuple[str, dict]], **options) -> dict:
    """Send `requests` ((path, body) pairs) through a router to one slow stand-in; the router's /metrics samples."""
    worker = await StandinWorker(name="slow", response_delay_s=WORKER_WAIT_S).start()
    config = RouterConfig(host="127.0.0.1", port=0, worker_urls=[worker.url], health_interval_s=0.2,
                          read_timeout_s=5.0, **options)
    runner, base = await serve(build_app(config))
    try:
        async with aiohttp.ClientSession() as session:
            for path, body in requests:
                async with session.post(base + path, json=body) as r:
                    await r.read()
            async with session.get(base + "/metrics") as r:
                text = await r.text()
    finally:
        await runner.cleanup()
        await worker.stop()
    return {(s.name, s.labels.get("endpoint"), s.labels.get("le")): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def run(requests, **options) -> dict:
    return asyncio.run(_scenario(requests, **options))


@pytest.mark.parametrize("stream", [False, True], ids=["whole answer", "streamed"])
def test_one_observation_per_request_without_the_workers_wait(stream):
    samples = run([("/v1/chat/completions", chat_body(stream)), ("/v1/chat/completions", chat_body(stream))])
    count = samples[("radixfleet_router_overhead_seconds_count", "chat", None)]
    total = samples[("radixfleet_router_overhead_seconds_sum", "chat", None)]
    duration = samples[("radixfleet_router_request_duration_seconds_sum", "chat", None)]
    assert count == 2
    assert duration >= 2 * WORKER_WAIT_S  # the requests did wait on the worker ...
    assert 0 < total < WORKER_WAIT_S  # ... and none of that wait is counted as the router's
    assert total < duration
    # the buckets are cumulative and end where the count does
    assert samples[("radixfleet_router_overhead_seconds_bucket", "chat", "+Inf")] == 2
    assert samples[("radixfleet_router_overhead_seconds_bucket", "chat", "0.1")] == 2


def test_requests_the_router_answers_itself_are_not_observed():
    samples = run([("/v1/chat/completions", {"model": "m", "messages": "not a list"}),
                   ("/v1/completions", {"model": "m", "prompt": "hi", "stream": False})])
    assert ("radixfleet_router_overhead_seconds_count", "chat", None) not in samples  # 400 from the router
    assert samples[("radixfleet_router_overhead_seconds_count", "completions", None)] == 1


def test_json_access_line_carries_the_routers_own_milliseconds(access_lines):
    run([("/v1/chat/completions", chat_body(False)), ("/v1/chat/completions", chat_body(True)),
         ("/v1/chat/completions", {"model": "m", "messages": "not a list"})], access_log="json")
    plain, streamed, refused = [json.loads(line) for line in access_lines]
    for entry in (plain, streamed):
        assert entry["duration_ms"] >= WORKER_WAIT_S * 1000
        assert 0 < entry["router_overhead_ms"] < WORKER_WAIT_S * 1000
    assert refused["status"] == 400 and refused["router_overhead_ms"] is None
