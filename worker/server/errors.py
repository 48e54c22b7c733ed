"""OpenAI-style error objects for the worker's HTTP API.

Every failure a client can see is an `ApiError`: an HTTP status plus the body OpenAI returns,
`{"error": {"message", "type", "param", "code"}}` (built by `worker.contracts`, which the router
shares), so SDKs raise their usual exception classes (`BadRequestError`, `NotFoundError`, ...) with a
message that names the field to fix.
"""

from __future__ import annotations

from aiohttp import web

from worker.contracts import dumps, error_body


class ApiError(Exception):
    """An error answered to the client as an OpenAI error object."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict:
        return error_body(self.message, self.type, self.param, self.code)

    def response(self) -> web.Response:
        return web.Response(status=self.status, body=dumps(self.body()), content_type="application/json",
                            headers=self.headers)


def bad_request(param: str | None, message: str, code: str | None = None) -> ApiError:
    """HTTP 400: the request is malformed; `param` names the field to fix."""
    return ApiError(400, message, param=param, code=code)


def model_not_found(model: str, served: list[str]) -> ApiError:
    names = ", ".join(repr(name) for name in served)
    return ApiError(
        404,
        f"The model {model!r} does not exist on this worker; it serves {names}.",
        param="model",
        code="model_not_found",
    )


def overloaded(retry_after_s: int, waiting: int) -> ApiError:
    """HTTP 503: the waiting queue is full; the client should retry later (or elsewhere)."""
    return ApiError(
        503,
        f"The worker is overloaded: {waiting} requests are already waiting. Retry in {retry_after_s} s.",
        type="server_overloaded",
        code="queue_full",
        headers={"Retry-After": str(retry_after_s)},
    )


def engine_unavailable(reason: str) -> ApiError:
    """HTTP 503: the engine process is not serving (starting, shutting down, or dead)."""
    return ApiError(503, f"The engine is not available: {reason}", type="server_error", code="engine_unavailable")


def internal_error(message: str) -> ApiError:
    return ApiError(500, message, type="server_error", code="internal_error")
