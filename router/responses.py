"""The router's own answers: JSON bodies and OpenAI error responses (the body is `worker.contracts`')."""

from __future__ import annotations

from aiohttp import web

from worker.contracts import dumps, error_json


def json_response(obj, status: int = 200) -> web.Response:
    return web.Response(status=status, body=dumps(obj), content_type="application/json")


def json_error(status: int, message: str, err_type: str = "invalid_request_error",
               param: str | None = None, code: str | None = None) -> web.Response:
    """An OpenAI-style error answer, so SDK clients raise their usual exception with `message`."""
    return web.Response(status=status, body=error_json(message, err_type, param, code),
                        content_type="application/json")
