"""The aiohttp application: routes, the error middleware, and the small endpoints.

Generation endpoints live in `chat.py` and `completions.py`; this module serves `/v1/models`,
`/health`, `/load`, `/metrics`, `/tokenize`, `/detokenize` and `/version`, and turns every error into an
OpenAI error object (never an HTML page, never a 500 for bad input).

Protection: a POST body must arrive within `ServerLimits.body_timeout_s` (408), and at most
`ServerLimits.max_active_requests` generation requests are in the frontend at once (tokenizing,
queued in the engine or running); past that a request gets 503 + Retry-After before any work is done,
as the engine itself answers when its waiting queue is full.
"""

from __future__ import annotations

import importlib.metadata
import logging
from dataclasses import dataclass

from aiohttp import web

from worker.contracts import LoadReport
from worker.server.access_log import access_log_middlewares, configured_mode
from worker.server.api_key import api_key_middleware
from worker.server.chat import chat_completions
from worker.server.completions import completions
from worker.server.context import CTX_KEY, ServerContext, read_json
from worker.server.connection_guard import body_timeout_middleware
from worker.server.engine_client import RETRY_AFTER_S
from worker.server.errors import ApiError, internal_error, overloaded
from worker.server.extra_fields import ignored_fields_header
from worker.server.limits import MAX_BODY_BYTES  # the router imports the same limit
from worker.server.metrics import CONTENT_TYPE
from worker.server.request_id import echo_request_id, request_id_middleware
from worker.server.protocol import parse_detokenize_request, parse_tokenize_request
from worker.server.streaming import json_response

log = logging.getLogger("radixfleet.worker")


@dataclass(frozen=True)
class ServerLimits:
    """The HTTP side's bounds (the engine has its own: --max-waiting-requests)."""

    body_timeout_s: float = 60.0
    max_active_requests: int | None = None  # None: the engine's running + waiting bounds together

    def active_bound(self, ctx: ServerContext) -> int:
        if self.max_active_requests is not None:
            return self.max_active_requests
        return ctx.config.max_running_requests + ctx.config.max_waiting_requests


@web.middleware
async def error_middleware(request: web.Request, handler):
    try:
        return await handler(request)
    except ApiError as error:
        return error.response()
    except web.HTTPException as error:  # aiohttp's own 404 / 405 / 413, as OpenAI error objects
        if error.status < 400:
            raise
        message = {404: f"Not found: {request.method} {request.path}",
                   405: f"Method {request.method} not allowed on {request.path}",
                   413: "The request body is too large."}.get(error.status, error.reason)
        return ApiError(error.status, message, code=error.reason.lower().replace(" ", "_")).response()
    except Exception as error:  # noqa: BLE001 - a bug: answer 500 with a message, keep serving
        log.exception("unhandled error in %s %s", request.method, request.path)
        return internal_error(f"Internal error: {type(error).__name__}: {error}").response()


def track_active(bound: int):
    """Count generation requests in flight (a shutdown waits for them); shed past `bound`."""

    @web.middleware
    async def track(request: web.Request, handler):
        if request.method != "POST" or not request.path.startswith("/v1/"):
            return await handler(request)
        ctx: ServerContext = request.app[CTX_KEY]
        if ctx.active_handlers >= bound:
            raise overloaded(RETRY_AFTER_S, ctx.active_handlers)
        ctx.active_handlers += 1
        try:
            return await handler(request)
        finally:
            ctx.active_handlers -= 1

    return track


def _error_answer(status: int, message: str, code: str) -> web.Response:
    return ApiError(status, message, code=code).response()


async def models(request: web.Request) -> web.Response:
    ctx: ServerContext = request.app[CTX_KEY]
    data = [
        {"id": name, "object": "model", "created": ctx.created, "owned_by": "radixfleet",
         "root": ctx.client.info.model_name, "max_model_len": ctx.max_model_len}
        for name in ctx.served_model_names
    ]
    return json_response({"object": "list", "data": data})


async def health(request: web.Request) -> web.Response:
    """200 only while the engine process is alive and this worker accepts requests."""
    ctx: ServerContext = request.app[CTX_KEY]
    if ctx.draining:
        return json_response({"status": "shutting down"}, status=503)
    if not ctx.client.healthy:
        return json_response({"status": "unhealthy", "reason": ctx.client.dead_reason}, status=503)
    return json_response({"status": "ok"})


async def load(request: web.Request) -> web.Response:
    """The figures the router balances on (the keys of `worker.contracts.LoadReport`)."""
    ctx: ServerContext = request.app[CTX_KEY]
    stats = ctx.client.stats
    if stats is None:
        raise ApiError(503, "no engine statistics yet", type="server_error", code="engine_unavailable")
    report = LoadReport(
        running=stats.num_running,
        waiting=stats.num_waiting,
        kv_tokens_used=stats.kv_tokens_used,
        kv_tokens_total=stats.kv_tokens_total,
        cache_hit_tokens=stats.cache_hit_tokens,
        cache_query_tokens=stats.cache_query_tokens,
        num_preemptions=stats.num_preemptions,
    )
    return json_response(report.to_json())


async def metrics(request: web.Request) -> web.Response:
    ctx: ServerContext = request.app[CTX_KEY]
    return web.Response(body=ctx.metrics.render(), headers={"Content-Type": CONTENT_TYPE})


async def tokenize(request: web.Request) -> web.Response:
    ctx: ServerContext = request.app[CTX_KEY]
    body = parse_tokenize_request(await read_json(request), strict=ctx.strict_fields)
    ctx.check_model(body.model)
    if body.messages is not None:
        text = await ctx.render_chat_off_loop(body.messages, body.tools,
                                              body.add_generation_prompt and not body.continue_final_message,
                                              body.chat_template_kwargs, body.chat_template,
                                              body.continue_final_message)
    else:
        text = body.prompt
    tokens = await ctx.encode_off_loop(text, add_special_tokens=body.add_special_tokens)
    answer = {"count": len(tokens), "max_model_len": ctx.max_model_len, "tokens": tokens}
    if body.return_token_strs:
        answer["token_strs"] = [ctx.token_texts(t) for t in tokens]
    response = json_response(answer)
    response.headers.update(ignored_fields_header(body.ignored_fields))
    return response


async def detokenize(request: web.Request) -> web.Response:
    ctx: ServerContext = request.app[CTX_KEY]
    body = parse_detokenize_request(await read_json(request))
    ctx.check_model(body.model)
    return json_response({"prompt": ctx.tokenizer.decode(body.tokens, skip_special_tokens=False)})


def package_version() -> str:
    """The installed radixfleet version (pyproject's), or "unknown" when run from a bare source tree."""
    try:
        return importlib.metadata.version("radixfleet")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


async def version(request: web.Request) -> web.Response:
    return json_response({"version": package_version()})


def build_app(ctx: ServerContext, api_key: str | None = None, limits: ServerLimits = ServerLimits()) -> web.Application:
    auth = [api_key_middleware(api_key)] if api_key else []
    middlewares = [request_id_middleware, *access_log_middlewares(configured_mode()), error_middleware, *auth,
                   track_active(limits.active_bound(ctx)), body_timeout_middleware(limits.body_timeout_s, _error_answer)]
    app = web.Application(middlewares=middlewares, client_max_size=MAX_BODY_BYTES)
    app.on_response_prepare.append(echo_request_id)
    app[CTX_KEY] = ctx
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_post("/v1/completions", completions)
    app.router.add_get("/v1/models", models)
    app.router.add_get("/health", health)
    app.router.add_get("/load", load)
    app.router.add_get("/metrics", metrics)
    app.router.add_post("/tokenize", tokenize)
    app.router.add_post("/detokenize", detokenize)
    app.router.add_get("/version", version)
    return app
