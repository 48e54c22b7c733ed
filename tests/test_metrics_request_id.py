"""The X-Request-ID middleware on a bare aiohttp app: ids kept or replaced, echoed, and in log lines."""

from __future__ import annotations

import asyncio
import logging

import aiohttp
from aiohttp import web

from helpers_http import serve
from worker.server.request_id import HEADER, request_id_middleware

log = logging.getLogger("radixfleet.worker.test")


async def logging_handler(request: web.Request) -> web.Response:
    log.warning("handling %s", request.path)
    return web.Response(text="ok")


async def missing_handler(request: web.Request) -> web.Response:
    raise web.HTTPNotFound()


def exchange(headers: dict[str, str], path: str = "/x") -> tuple[int, str, list[str]]:
    """(status, echoed id, log messages) of one request to an app with the middleware."""
    records: list[logging.LogRecord] = []

    class Collect(logging.Handler):
        def emit(self, record):
            records.append(record)

    async def run():
        app = web.Application(middlewares=[request_id_middleware])
        app.router.add_get("/x", logging_handler)
        app.router.add_get("/missing", missing_handler)
        runner, base = await serve(app)
        try:
            async with aiohttp.ClientSession() as session:
                async with session.get(f"{base}{path}", headers=headers) as response:
                    return response.status, response.headers.get(HEADER)
        finally:
            await runner.cleanup()

    handler = Collect()
    log.addHandler(handler)
    try:
        status, echoed = asyncio.run(run())
    finally:
        log.removeHandler(handler)
    return status, echoed, [r.getMessage() for r in records]


def test_client_id_is_echoed_and_in_the_log_line():
    status, echoed, messages = exchange({HEADER: "req-42"})
    assert (status, echoed) == (200, "req-42")
    assert messages == ["[request req-42] handling /x"]


def test_missing_or_unsafe_ids_are_replaced():
    for headers in ({}, {HEADER: "has space"}, {HEADER: "x" * 200}):
        status, echoed, messages = exchange(headers)
        assert status == 200 and len(echoed) == 32 and echoed != headers.get(HEADER)
        assert messages == [f"[request {echoed}] handling /x"]


def test_error_responses_carry_the_id():
    status, echoed, _ = exchange({HEADER: "req-404"}, path="/missing")
    assert (status, echoed) == (404, "req-404")


def test_log_lines_outside_a_request_are_unchanged():
    record = logging.getLogger("radixfleet.worker.test").makeRecord("n", logging.INFO, "f", 1, "plain", (), None)
    assert record.getMessage() == "plain" and record.request_id == "-"
