"""The router's aiohttp application: endpoints, auth, admin API, lifecycle and graceful drain.

Client endpoints (behind --api-key when set): POST /v1/chat/completions, POST /v1/completions,
GET /v1/models, and the worker endpoints forwarded to any worker: POST /tokenize, POST /detokenize, GET /version. Open: GET /health (200 while a worker is routable and the router is not draining),
GET /metrics. Admin (behind --admin-key; disabled without it): GET/POST/DELETE /workers.
`ACCESS` says which key each route needs; handlers never check. Each route is served through `_served`
(request id, then the key check) rather than a chain of middlewares: fewer frames a request, no
partials, no `_fix_request_current_app` (aiohttp adds it to every app with middlewares), and the key a
route needs looked up once. With `--access-log` on, the same steps run as middlewares
(request id, access log, `auth_middleware`) so the access log sits between them and sees every answer.

Protection (issue 15): generation requests pass an `AdmissionGate` (bounded in flight, bounded queue,
503 + Retry-After beyond); `make_runner` / `make_site` give the server its header timeout, handler
cancellation (a client that leaves aborts its request on the worker) and a connection bound; the body
must arrive within `body_timeout_s`; admin URLs pass `router.admin_url`. Every generation answer,
the router's own errors included, is counted in `radixfleet_router_responses_total`.
"""

from __future__ import annotations

import asyncio
import gc
import hmac
import logging
import signal
import time

import aiohttp
from aiohttp import web

from router.access_log import router_access_log
from router.admin_url import BadWorkerUrl, validate_worker_url
from router.admission import AdmissionGate, Shed
from router.config import RouterConfig
from router.discovery import DnsDiscovery
from router.health import CircuitBreaker, HealthMonitor
from router.listen import ListenError, bind_error_line
from router.metrics import CONTENT_TYPE, RouterMetrics, make_registry, render
from router.policies import RouteRequest, make_policy
from router.proxy import Proxy
from router.request_id import echo_request_id, request_id_middleware
from router.request_parsing import BadRequest, check_passthrough_headers, parse_request, read_body, read_body_within
from router.responses import json_error, json_response
from router.sessions import SessionTable
from router.tree import chunk_hashes
from router.upstream import UpstreamPool
from router.worker_pool import WorkerPool, normalize_url
from worker.contracts import loads
from worker.server.connection_guard import GuardedSite, connection_limit

log = logging.getLogger("radixfleet.router")

STATE_KEY = web.AppKey("router_state", object)


class RouterState:
    """Everything one router process holds (pool, policy, sessions, metrics) and its background tasks."""

    def __init__(self, config: RouterConfig) -> None:
        config.validate()
        self.config = config
        self.pool = WorkerPool(
            chunk_chars=config.chunk_chars,
            chars_per_token=config.chars_per_token,
            default_kv_tokens=config.default_kv_tokens,
            breaker_factory=lambda: CircuitBreaker(config.failure_threshold, config.breaker_cooldown_s,
                                                   readmit_after=config.health_readmit_after),
        )
        for url in config.worker_urls:
            self.pool.add(url, source="static")
        self.sessions = SessionTable(config.session_ttl_s, config.max_sessions)
        self.policy = make_policy(
            config.policy,
            cache_threshold=config.cache_threshold,
            balance_abs=config.balance_abs_threshold,
            balance_rel=config.balance_rel_threshold,
            request_cost_tokens=config.request_cost_tokens,
            sessions=self.sessions,
        )
        self.metrics = RouterMetrics()
        self.registry = make_registry(self)  # read at scrape time only
        self.gate = AdmissionGate(config.max_active_requests, config.max_queued_requests, config.queue_timeout_s)
        self.draining = False
        self.active_requests = 0
        self.session: aiohttp.ClientSession | None = None
        self.proxy: Proxy | None = None
        self.upstream: UpstreamPool | None = None
        self.monitor: HealthMonitor | None = None
        self.discovery: DnsDiscovery | None = None
        self._tasks: list[asyncio.Task] = []
        self._probes: set[asyncio.Task] = set()

    async def start(self) -> None:
        connector = aiohttp.TCPConnector(limit=0, ttl_dns_cache=60, keepalive_timeout=60)
        worker_auth = {"Authorization": f"Bearer {self.config.worker_api_key}"} if self.config.worker_api_key else {}
        self.session = aiohttp.ClientSession(connector=connector, auto_decompress=False, headers=worker_auth)
        self.upstream = UpstreamPool(self.config.connect_timeout_s, self.config.read_timeout_s)
        self.proxy = Proxy(self, self.session, self.upstream)
        self.monitor = HealthMonitor(self.pool, self.session, self.config.health_interval_s,
                                     self.config.health_timeout_s, down_after=self.config.health_down_after,
                                     on_down=self._worker_marked_down)
        await self.monitor.check_all()  # know who is up before the first request
        self.monitor.start()
        if self.config.worker_dns:
            self.discovery = DnsDiscovery(self, self.config.worker_dns, self.config.dns_interval_s,
                                          self.config.worker_scheme)
            await self.discovery.refresh()
            self.discovery.start()
        self._tasks.append(asyncio.get_running_loop().create_task(self._expire_sessions()))

    def _worker_marked_down(self, worker) -> None:
        """A hung worker: give up its unfinished answers so the proxy retries the unstarted ones elsewhere."""
        if self.upstream is not None:
            cut = self.upstream.abort_worker(worker.url, f"worker {worker.worker_id} stopped answering")
            if cut:
                log.warning("worker %s marked down: %d unfinished requests moved or ended", worker.worker_id, cut)

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        if self.discovery is not None:
            await self.discovery.stop()
        if self.monitor is not None:
            await self.monitor.stop()
        if self.upstream is not None:
            self.upstream.close()
        if self.session is not None:
            await self.session.close()

    async def _expire_sessions(self) -> None:
        while True:
            await asyncio.sleep(30)
            self.sessions.expire()

    def add_worker(self, url: str, source: str):
        worker = self.pool.add(url, source)
        if self.monitor is not None:  # check it at once rather than at the next poll
            task = asyncio.get_running_loop().create_task(self.monitor.check(worker))
            self._probes.add(task)  # keep a reference until it is done
            task.add_done_callback(self._probes.discard)
        return worker

    def remove_worker(self, url: str):
        worker = self.pool.remove(url)
        if worker is not None:
            self.policy.forget_worker(worker)
            if self.upstream is not None:
                self.upstream.forget(worker.url)
        return worker


CLIENT, ADMIN = "client", "admin"
# Which key each route needs, by its path as registered; a path not listed is open (/health, /metrics, 404s).
ACCESS = {
    "/v1/chat/completions": CLIENT,
    "/v1/completions": CLIENT,
    "/v1/models": CLIENT,
    "/tokenize": CLIENT,
    "/detokenize": CLIENT,
    "/version": CLIENT,
    "/workers": ADMIN,
}


def _bearer(request: web.Request) -> str | None:
    value = request.headers.get("Authorization")
    if not value or not value.startswith("Bearer "):
        return None
    return value[7:].strip()


def _key_matches(provided: str | None, expected: str) -> bool:
    if provided is None:
        return False
    return hmac.compare_digest(provided.encode(), expected.encode())


def _unauthorized(message: str) -> web.Response:
    return json_error(401, message, "invalid_request_error", code="invalid_api_key")


def _access_denied(config: RouterConfig, access: str, request: web.Request) -> web.Response | None:
    """The 401/403 answer to a request without the key its route needs, or None to let it through."""
    if access == CLIENT:
        key = config.api_key
        if key is None or _key_matches(_bearer(request), key):
            return None
        return _unauthorized("missing or invalid API key: send 'Authorization: Bearer <key>'")
    key = config.admin_key
    if key is None:
        return json_error(403, "the admin API is disabled: start the router with --admin-key", code="admin_disabled")
    if _key_matches(_bearer(request), key):
        return None
    return _unauthorized("missing or invalid admin key: send 'Authorization: Bearer <admin key>'")


@web.middleware
async def auth_middleware(request: web.Request, handler):
    resource = request.match_info.route.resource
    access = ACCESS.get(resource.canonical) if resource is not None else None
    if access is not None:
        denied = _access_denied(request.app[STATE_KEY].config, access, request)
        if denied is not None:
            return denied
    return await handler(request)


def _guarded(handler, access: str | None):
    """`handler` behind the key its route needs (what `auth_middleware` does, decided once per route)."""
    if access is None:
        return handler

    async def guarded(request: web.Request) -> web.StreamResponse:
        denied = _access_denied(request.app[STATE_KEY].config, access, request)
        if denied is not None:
            return denied
        return await handler(request)

    return guarded


def _served(handler, access: str | None):
    """A route's handler with the request id and the key check around it: the middleware chain's work
    (`request_id_middleware` outside, `auth_middleware` inside) without aiohttp's middleware frames."""
    inner = _guarded(handler, access)

    async def served(request: web.Request) -> web.StreamResponse:
        return await request_id_middleware(request, inner)

    return served


_STATUS_CLASSES = tuple(f"{n}xx" for n in range(10))  # status // 100 -> the responses_total label


def _generation_handler(path: str, kind: str, endpoint: str):
    async def handler(request: web.Request) -> web.StreamResponse:
        started = time.monotonic()
        state: RouterState = request.app[STATE_KEY]
        response = None
        try:
            response = await _generate(state, request, path, kind, endpoint, started)
            return response
        except asyncio.CancelledError:  # the client went away (handler cancellation)
            state.metrics.errors["client_disconnect"] += 1
            raise
        finally:
            if response is not None:
                state.metrics.responses[_STATUS_CLASSES[response.status // 100]] += 1
            state.metrics.duration[endpoint].observe(time.monotonic() - started)

    return handler


def _shed(message: str, retry_after_s: int, code: str) -> web.Response:
    response = json_error(503, message, "server_error", code=code)
    response.headers["Retry-After"] = str(retry_after_s)
    return response


async def _generate(state: RouterState, request: web.Request, path: str, kind: str, endpoint: str,
                    started: float) -> web.StreamResponse:
    if state.draining:
        return _shed("the router is shutting down; retry on another replica", 1, "draining")
    config = state.config
    try:
        check_passthrough_headers(request.headers)
        raw = await read_body_within(request, config.max_body_bytes, config.body_timeout_s)
        parsed = parse_request(raw, kind, request.headers.get(config.session_header))
    except BadRequest as exc:
        state.metrics.errors["too_large" if exc.status == 413 else "bad_request"] += 1
        return json_error(exc.status, exc.message, param=exc.param, code=exc.code)
    text = parsed.routing_text
    hashes = chunk_hashes(text, config.chunk_chars) if state.policy.uses_tree else []
    route = RouteRequest(hashes, len(text), parsed.session_key, config.chars_per_token)
    if not state.gate.try_acquire():
        try:
            await state.gate.acquire()
        except Shed as shed:
            state.metrics.errors["shed"] += 1
            return _shed(f"{shed.reason}; retry in {shed.retry_after_s} s", shed.retry_after_s, "router_overloaded")
    state.active_requests += 1
    try:
        return await state.proxy.forward(request, path, raw, route, parsed.stream, endpoint, started)
    finally:
        state.active_requests -= 1
        state.gate.release()


async def models_handler(request: web.Request) -> web.Response:
    state: RouterState = request.app[STATE_KEY]
    return await state.proxy.forward_get("/v1/models")


def _worker_post_handler(path: str, endpoint: str):
    """A worker endpoint that generates nothing (/tokenize, /detokenize): any routable worker answers, through
    the same forwarding and retries as generation, with nothing to match in the prefix trees."""
    async def handler(request: web.Request) -> web.StreamResponse:
        started = time.monotonic()
        state: RouterState = request.app[STATE_KEY]
        try:
            check_passthrough_headers(request.headers)
            raw = await read_body(request, state.config.max_body_bytes)
        except BadRequest as exc:
            return json_error(exc.status, exc.message, param=exc.param, code=exc.code)
        route = RouteRequest([], 0, None, state.config.chars_per_token)
        return await state.proxy.forward(request, path, raw, route, False, endpoint, started)

    return handler


async def version_handler(request: web.Request) -> web.Response:
    state: RouterState = request.app[STATE_KEY]
    return await state.proxy.forward_get("/version")


async def health_handler(request: web.Request) -> web.Response:
    state: RouterState = request.app[STATE_KEY]
    now = time.monotonic()
    healthy = sum(1 for w in state.pool if w.routable(now))
    if state.draining:
        return web.json_response({"status": "draining", "healthy_workers": healthy}, status=503)
    if healthy == 0:
        return web.json_response({"status": "no healthy worker", "healthy_workers": 0}, status=503)
    return web.json_response({"status": "ok", "healthy_workers": healthy})


async def metrics_handler(request: web.Request) -> web.Response:
    state: RouterState = request.app[STATE_KEY]
    return web.Response(body=render(state.registry),
                        headers={"Content-Type": CONTENT_TYPE, "X-Content-Type-Options": "nosniff"})


async def _admin_url(request: web.Request) -> str:
    """The worker url of a POST/DELETE /workers call: JSON body {"url": ...} or ?url=..."""
    url = request.query.get("url")
    if url is None:
        raw = await request.read()
        try:
            body = loads(raw) if raw else {}
        except ValueError:
            raise BadRequest("body must be JSON like {\"url\": \"http://host:port\"}") from None
        url = body.get("url") if isinstance(body, dict) else None
    if not isinstance(url, str):
        raise BadRequest("missing 'url': send {\"url\": \"http://host:port\"}", param="url")
    try:
        return normalize_url(validate_worker_url(url))
    except (BadWorkerUrl, ValueError) as exc:
        raise BadRequest(str(exc), param="url") from None


async def _admin_target(request: web.Request) -> tuple[RouterState, str] | web.Response:
    """The worker url of a POST/DELETE /workers body, or the error to answer."""
    state: RouterState = request.app[STATE_KEY]
    try:
        return state, await _admin_url(request)
    except BadRequest as exc:
        return json_error(400, exc.message, param=exc.param)


async def workers_get(request: web.Request) -> web.Response:
    state: RouterState = request.app[STATE_KEY]
    now = time.monotonic()
    return json_response({"policy": state.policy.name, "workers": [w.describe(now) for w in state.pool]})


async def workers_post(request: web.Request) -> web.Response:
    target = await _admin_target(request)
    if isinstance(target, web.Response):
        return target
    state, url = target
    existed = url in state.pool
    worker = state.add_worker(url, source="admin")
    log.info("worker %s added (%s)", worker.worker_id, "already present" if existed else "new")
    return json_response({"id": worker.worker_id, "url": url}, status=200 if existed else 201)


async def workers_delete(request: web.Request) -> web.Response:
    target = await _admin_target(request)
    if isinstance(target, web.Response):
        return target
    state, url = target
    worker = state.remove_worker(url)
    if worker is None:
        return json_error(404, f"no worker with url {url}", param="url", code="worker_not_found")
    log.info("worker %s removed", worker.worker_id)
    return json_response({"id": worker.worker_id, "removed": True})


async def not_found(request: web.Request) -> web.Response:
    return json_error(404, f"unknown endpoint {request.method} {request.path}", code="not_found")


class _Routes:
    """`app.router`'s add_get/add_post/add_delete/add_route; with `wrap`, each handler is `_served`, the key
    its path needs (`ACCESS`) decided here once."""

    def __init__(self, app: web.Application, wrap: bool) -> None:
        self.router = app.router
        self.wrap = wrap

    def _handler(self, path: str, handler):
        return _served(handler, ACCESS.get(path)) if self.wrap else handler

    def add_get(self, path: str, handler) -> None:  # GET and HEAD, as aiohttp's add_get
        self.router.add_get(path, self._handler(path, handler))

    def add_post(self, path: str, handler) -> None:
        self.router.add_post(path, self._handler(path, handler))

    def add_delete(self, path: str, handler) -> None:
        self.router.add_delete(path, self._handler(path, handler))

    def add_route(self, method: str, path: str, handler) -> None:
        self.router.add_route(method, path, self._handler(path, handler))


def build_app(config: RouterConfig) -> web.Application:
    """The aiohttp application. Its startup connects to the workers; cleanup closes everything."""
    state = RouterState(config)
    access_log = router_access_log(config.access_log)
    # No access log (the default): no middlewares at all, each route wraps its own handler (`_served`).
    middlewares = [request_id_middleware, *access_log, auth_middleware] if access_log else []
    app = web.Application(client_max_size=config.max_body_bytes, handler_args={"max_field_size": 16384},
                          middlewares=middlewares)
    app.on_response_prepare.append(echo_request_id)
    app[STATE_KEY] = state

    routes = _Routes(app, wrap=not middlewares)
    routes.add_post("/v1/chat/completions", _generation_handler("/v1/chat/completions", "chat", "chat"))
    routes.add_post("/v1/completions", _generation_handler("/v1/completions", "completion", "completions"))
    routes.add_get("/v1/models", models_handler)
    routes.add_post("/tokenize", _worker_post_handler("/tokenize", "tokenize"))
    routes.add_post("/detokenize", _worker_post_handler("/detokenize", "detokenize"))
    routes.add_get("/version", version_handler)
    routes.add_get("/health", health_handler)
    routes.add_get("/metrics", metrics_handler)
    routes.add_get("/workers", workers_get)
    routes.add_post("/workers", workers_post)
    routes.add_delete("/workers", workers_delete)
    routes.add_route("*", "/{tail:.*}", not_found)

    async def on_startup(_app: web.Application) -> None:
        await state.start()

    async def on_cleanup(_app: web.Application) -> None:
        await state.stop()

    app.on_startup.append(on_startup)
    app.on_cleanup.append(on_cleanup)
    return app


# A client connection uses one descriptor, and one more toward a worker while its request is proxied.
_FDS_PER_CLIENT = 2


def make_runner(app: web.Application) -> web.AppRunner:
    """The server settings the router runs with (tests use them too).

    handler_cancellation: a client that disconnects cancels its handler, and the proxy's cleanup closes
    the worker connection, so the worker aborts at once, streamed or not. keepalive_timeout: aiohttp's
    timer from a connection's opening (or its last answer) to a complete request head: the header timeout.
    """
    config: RouterConfig = app[STATE_KEY].config
    return web.AppRunner(app, access_log=None, shutdown_timeout=config.drain_timeout_s,
                         handler_cancellation=True, keepalive_timeout=config.header_timeout_s)


def make_site(runner: web.AppRunner, config: RouterConfig, port: int | None = None) -> GuardedSite:
    """A listening site with the connection bound (`max_connections`, or what the fd limit allows)."""
    return GuardedSite(runner, config.host, config.port if port is None else port,
                       max_connections=connection_limit(config.max_connections, _FDS_PER_CLIENT))


async def serve(config: RouterConfig, ready: asyncio.Event | None = None) -> None:
    """Run the router until SIGTERM/SIGINT, then drain: stop accepting, finish in-flight, exit."""
    app = build_app(config)
    state: RouterState = app[STATE_KEY]
    runner = make_runner(app)
    await runner.setup()
    site = make_site(runner, config)
    try:
        await site.start()
    except OSError as exc:  # taken since `radixfleet router` checked it
        await runner.cleanup()
        raise ListenError(bind_error_line(config.host, config.port, exc)) from None
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        try:
            loop.add_signal_handler(sig, stop.set)
        except (NotImplementedError, RuntimeError):  # pragma: no cover - non-main thread / Windows
            pass
    log.info("router listening on http://%s:%d (policy %s, %d workers)", config.host, config.port,
             config.policy, len(state.pool))
    # Everything allocated so far lives for the whole run: keep it out of the collector's scans, and
    # collect the young generation less often. Full collections are what shows up in p99 latency.
    gc.collect()
    gc.freeze()
    gc.set_threshold(20_000, 50, 100)
    if ready is not None:
        ready.set()
    await stop.wait()
    await drain(state, site, config.drain_timeout_s)
    await runner.cleanup()


async def drain(state: RouterState, site: web.BaseSite | None, timeout_s: float) -> None:
    """Refuse new work, stop listening, and wait (bounded) for in-flight requests to finish."""
    state.draining = True
    log.info("draining: %d requests in flight", state.active_requests)
    if site is not None:
        await site.stop()
    deadline = time.monotonic() + timeout_s
    while state.active_requests > 0 and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    if state.active_requests:
        log.warning("drain timeout: %d requests still in flight are cut", state.active_requests)
        if state.upstream is not None:  # streams end with an error event and [DONE], the rest with 503
            state.upstream.abort_all("the router is shutting down")
        deadline = time.monotonic() + 2.0
        while state.active_requests > 0 and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
