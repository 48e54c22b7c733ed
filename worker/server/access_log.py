"""Access logs: one line per HTTP request, as JSON or text, or none (`--access-log json|text|off`).

A line has the time the answer ended, method, path (no query string), status, duration, request id,
and the prompt / completion token counts when the answer says them (a non-streamed body's `usage`).
It never holds prompt or completion text. The router adds the worker that served the request
(router/access_log.py). Probe and scrape endpoints (/health, /load, /metrics) get no line.

Lines go to the `radixfleet.access` logger, which writes them to stderr unprefixed and does not pass
them to the root logger: a JSON line stays one parseable object. Off (the default) costs nothing: the
middleware is not installed.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from datetime import datetime, timezone
from typing import Callable

from aiohttp import web

from worker.contracts import dumps, loads
from worker.server.request_id import ACCESS_LOGGER, request_id_of

MODES = ("off", "text", "json")
access_logger = logging.getLogger(ACCESS_LOGGER)
access_logger.propagate = False  # the line is the whole record: no level or logger name before it
# Status written when the client went away before the answer was complete (nginx's convention).
CLIENT_CLOSED = 499
# Probes and scrapes get no line: the router polls each worker's /health and /load every second, and
# a Prometheus scrape or a Kubernetes probe every few; their lines would bury the requests.
UNLOGGED_PATHS = frozenset({"/health", "/load", "/metrics"})
_USAGE_MAX_BODY = 1 << 20  # larger answers are not parsed for their usage

_configured = {"mode": "off"}  # this process's --access-log, for apps built without being told

ExtraFields = Callable[[web.Request, "web.StreamResponse | None"], dict]


def check_mode(mode: str) -> str:
    if mode not in MODES:
        raise ValueError(f"--access-log {mode!r} is unknown: choose one of {', '.join(MODES)}")
    return mode


def configure_access_log(mode: str, stream=None) -> None:
    """Send access lines to `stream` (stderr) when `mode` is text or json; raises ValueError on a bad mode."""
    _configured["mode"] = check_mode(mode)
    for handler in list(access_logger.handlers):
        if getattr(handler, "_radixfleet_access", False):
            access_logger.removeHandler(handler)
    if mode == "off":
        return
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    handler._radixfleet_access = True
    access_logger.addHandler(handler)
    access_logger.setLevel(logging.INFO)


def configured_mode() -> str:
    """The mode `configure_access_log` last set ("off" until then)."""
    return _configured["mode"]


def usage_of(response: web.StreamResponse | None) -> tuple[int | None, int | None]:
    """(prompt_tokens, completion_tokens) of a whole JSON answer with `usage`, else (None, None)."""
    body = getattr(response, "body", None)
    if not isinstance(body, (bytes, bytearray)) or not body or len(body) > _USAGE_MAX_BODY:
        return None, None
    if not response.content_type.endswith("json") or b'"usage"' not in body:
        return None, None
    try:
        usage = loads(body).get("usage")
    except (ValueError, AttributeError):
        return None, None
    if not isinstance(usage, dict):
        return None, None
    prompt, completion = usage.get("prompt_tokens"), usage.get("completion_tokens")
    return (prompt if isinstance(prompt, int) else None, completion if isinstance(completion, int) else None)


def format_line(mode: str, fields: dict) -> str:
    """One access line: a JSON object, or `time method path status duration key=value...` text."""
    if mode == "json":
        return dumps(fields).decode()
    head = f"{fields['time']} {fields['method']} {fields['path']} {fields['status']} {fields['duration_ms']}ms"
    rest = " ".join(f"{key}={'-' if value is None else value}" for key, value in fields.items()
                    if key not in ("time", "method", "path", "status", "duration_ms"))
    return f"{head} {rest}"


def _now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def access_log_middlewares(mode: str, extra_fields: ExtraFields | None = None) -> list:
    """The middleware writing `mode` lines (none when off), for an app's middleware list.

    Place it after the request-id middleware (the id is decided there) and before the one that turns
    errors into answers, so it sees the status the client gets."""
    if check_mode(mode) == "off":
        return []

    def write(request: web.Request, response: web.StreamResponse | None, status: int, started: float) -> None:
        prompt_tokens, completion_tokens = usage_of(response)
        fields = {"time": _now_iso(), "method": request.method, "path": request.path, "status": status,
                  "duration_ms": round((time.monotonic() - started) * 1000, 3),
                  "request_id": request_id_of(request)}
        if extra_fields is not None:
            fields.update(extra_fields(request, response))
        fields["prompt_tokens"] = prompt_tokens
        fields["completion_tokens"] = completion_tokens
        access_logger.info(format_line(mode, fields))

    @web.middleware
    async def access_log_middleware(request: web.Request, handler):
        if request.path in UNLOGGED_PATHS:
            return await handler(request)
        started = time.monotonic()
        try:
            response = await handler(request)
        except web.HTTPException as error:
            write(request, None, error.status, started)
            raise
        except (asyncio.CancelledError, ConnectionResetError):
            write(request, None, CLIENT_CLOSED, started)
            raise
        except Exception:
            write(request, None, 500, started)
            raise
        write(request, response, response.status, started)
        return response

    return [access_log_middleware]
