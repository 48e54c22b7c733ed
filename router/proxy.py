"""Forward one request to a worker chosen by the policy; stream the answer back byte for byte.

Retry rule: an attempt that fails before the client has received any byte (connection refused,
timeout, 5xx, a stream that ends before its first chunk) is retried on another worker, at most
`max_retries` times. Once a byte has gone to the client, a failure ends the stream with a clean SSE
error event instead. The worker's load count drops when its response ends, however it ends.

Every attempt is one policy decision: the proxy tells the policy where the request went
(`policy.dispatched`), and the policy updates what it keeps about that worker.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import aiohttp
from aiohttp import web

from router.policies import Decision, NoWorkerAvailable, RouteRequest
from router.responses import json_error
from router.upstream import UpstreamConnectError, UpstreamError, UpstreamPool, UpstreamResponse
from router.usage import prompt_tokens_in
from worker.contracts import SSE_DONE, error_json, sse_error_event

if TYPE_CHECKING:  # pragma: no cover
    from router.app import RouterState
    from router.worker_pool import PendingPrefill, WorkerState

log = logging.getLogger("radixfleet.router.proxy")

WORKER_HEADER = "X-Radixfleet-Worker"


class _AttemptFailed(Exception):
    """This worker failed before the first byte reached the client; try another."""

    def __init__(self, reason: str, hard: bool = False, response: tuple[int, bytes, str] | None = None):
        super().__init__(reason)
        self.reason = reason
        self.hard = hard
        self.response = response  # the worker's own error answer, used if no retry is left


@dataclass(slots=True)
class _Timing:
    """What an attempt needs to account for its first byte."""

    pending: "PendingPrefill"  # the prompt tokens the worker must prefill (its outstanding_tokens share)
    endpoint: str
    started: float
    text_chars: int  # routing characters, set against the worker's usage.prompt_tokens


class Proxy:
    def __init__(self, state: "RouterState", session: aiohttp.ClientSession, upstream: UpstreamPool) -> None:
        self.state = state
        self.session = session  # for the rare GETs (/v1/models)
        self.upstream = upstream  # the hot path
        cfg = state.config
        self.timeout = aiohttp.ClientTimeout(total=None, connect=cfg.connect_timeout_s,
                                             sock_connect=cfg.connect_timeout_s,
                                             sock_read=cfg.read_timeout_s)

    def _upstream_headers(self, request: web.Request) -> str:
        """Request headers worth passing on (tracing ids), as raw header lines, and the workers' key."""
        from router.request_id import tracing_header_lines
        key = self.state.config.worker_api_key
        lines = f"Authorization: Bearer {key}\r\n" if key else ""
        # The id the router serves the request under (the client's when sane) and a well-formed traceparent.
        return lines + tracing_header_lines(request)

    async def forward(self, request: web.Request, path: str, raw: bytes, route: RouteRequest,
                      stream: bool, endpoint: str, started: float) -> web.StreamResponse:
        """Route and forward a generation request, retrying before the first byte.

        `started`: when the request arrived (time.monotonic()), for the time-to-first-byte histogram.
        """
        state = self.state
        metrics = state.metrics
        policy = state.policy
        headers = self._upstream_headers(request)
        tried: list["WorkerState"] = []
        last_failure: _AttemptFailed | None = None
        for attempt in range(state.config.max_retries + 1):
            workers = state.pool.routable(time.monotonic(), tried)
            if not workers:
                break
            try:
                decision = policy.choose(workers, route)
            except NoWorkerAvailable:
                break
            worker = decision.worker
            self._record_decision(decision, route, endpoint)
            if attempt:
                metrics.retries += 1
            pending = worker.on_dispatch(worker.uncached_tokens(route.text_chars, decision.match_chars),
                                         stream, route.text_chars)
            try:
                return await self._attempt(request, worker, path, raw, headers, stream,
                                           _Timing(pending, endpoint, started, route.text_chars))
            except _AttemptFailed as failure:
                last_failure = failure
                tried.append(worker)
                worker.breaker.record_failure(time.monotonic(), hard=failure.hard)
                log.warning("worker %s failed before first byte (%s); %s", worker.worker_id, failure.reason,
                            "retrying" if attempt < state.config.max_retries else "no retries left")
            finally:
                worker.on_finish(pending)
        if last_failure is not None and last_failure.response is not None:
            status, body, content_type = last_failure.response
            metrics.errors["upstream"] += 1
            return web.Response(status=status, body=body, content_type=content_type)
        if last_failure is not None:
            metrics.errors["upstream"] += 1
            return json_error(502, f"the worker failed and no other worker could serve the request "
                                   f"({last_failure.reason})", "server_error", code="worker_failed")
        metrics.errors["no_worker"] += 1
        return json_error(503, "no healthy worker is available; retry shortly", "server_error",
                          code="no_healthy_worker")

    def _record_decision(self, decision: Decision, route: RouteRequest, endpoint: str) -> None:
        state = self.state
        metrics = state.metrics
        worker = decision.worker
        metrics.decisions[(state.policy.name, decision.reason)] += 1
        metrics.requests[(worker.worker_id, endpoint)] += 1
        if state.policy.uses_tree:
            metrics.observe_match_ratio(decision.match_ratio)
        state.policy.dispatched(decision, route)

    def _first_byte(self, worker: "WorkerState", timing: "_Timing") -> None:
        """The worker answered: its prompt is prefilled, it is healthy, and the client's wait is known."""
        worker.on_first_byte(timing.pending)
        worker.breaker.record_success()
        self.state.metrics.first_byte[timing.endpoint].observe(time.monotonic() - timing.started)

    @staticmethod
    def _usage(worker: "WorkerState", timing: "_Timing", data: bytes) -> None:
        tokens = prompt_tokens_in(data)
        if tokens:
            worker.on_prompt_tokens(timing.text_chars, tokens)

    async def _attempt(self, request: web.Request, worker: "WorkerState", path: str, raw: bytes,
                       headers: str, stream: bool, timing: "_Timing") -> web.StreamResponse:
        try:
            cfg = self.state.config  # a non-streamed answer's head comes when it is complete: read timeout
            upstream = await self.upstream.post(
                worker.url, path, raw, headers,
                first_byte_timeout_s=cfg.first_byte_timeout_s if stream else cfg.read_timeout_s,
                idle_timeout_s=cfg.inter_chunk_timeout_s if stream else cfg.read_timeout_s)
        except UpstreamConnectError as exc:
            raise _AttemptFailed(str(exc), hard=True) from None
        except UpstreamError as exc:
            raise _AttemptFailed(str(exc)) from None
        try:
            status = upstream.status
            content_type = upstream.headers.get("content-type", "application/json")
            if status >= 500:
                try:
                    body = await upstream.read()
                except UpstreamError:
                    body = error_json(f"worker answered {status}", "server_error")
                raise _AttemptFailed(f"status {status}", response=(status, body, content_type.split(";")[0]))
            if not stream or status != 200:
                try:
                    body = await upstream.read()
                except UpstreamError as exc:
                    raise _AttemptFailed(f"{exc} while reading the answer") from None
                self._first_byte(worker, timing)
                self._usage(worker, timing, body)
                self.state.metrics.responses[f"{status // 100}xx"] += 1
                response = web.Response(status=status, body=body)
                response.headers["Content-Type"] = content_type
                response.headers[WORKER_HEADER] = worker.worker_id
                return response
            return await self._pipe_stream(request, worker, upstream, content_type, timing)
        finally:
            if not upstream.done:
                upstream.close()

    async def _pipe_stream(self, request: web.Request, worker: "WorkerState", upstream: UpstreamResponse,
                           content_type: str, timing: "_Timing") -> web.StreamResponse:
        # Hold the client response until the worker's first chunk: until then a failure can still be retried.
        try:
            first = await upstream.read_chunk()
        except UpstreamError as exc:
            raise _AttemptFailed(f"{exc} before the first chunk") from None
        if not first:
            raise _AttemptFailed("stream ended before its first chunk")
        self._first_byte(worker, timing)
        response = web.StreamResponse(status=upstream.status)
        response.headers["Content-Type"] = content_type
        response.headers["Cache-Control"] = "no-cache"
        response.headers["X-Accel-Buffering"] = "no"
        response.headers[WORKER_HEADER] = worker.worker_id
        self.state.metrics.responses["2xx"] += 1
        try:
            await response.prepare(request)
            await response.write(first)
        except (ConnectionError, aiohttp.ClientError):
            upstream.close()  # client left: drop the worker connection so it stops generating
            return response
        while True:
            try:
                chunk = await upstream.read_chunk()
            except UpstreamError as exc:
                # The worker failed mid-stream: the client already has bytes, so end with a clean error event.
                self.state.metrics.errors["mid_stream"] += 1
                worker.breaker.record_failure(time.monotonic())
                log.warning("worker %s failed mid-stream: %s", worker.worker_id, exc)
                chunk = (sse_error_event("the worker serving this stream failed; retry the request",
                                         code="worker_failed") + SSE_DONE)
                try:
                    await response.write(chunk)
                except (ConnectionError, aiohttp.ClientError):
                    return response
                break
            if not chunk:
                break
            if b'"prompt_tokens"' in chunk:  # the usage event (stream_options.include_usage)
                self._usage(worker, timing, chunk)
            try:
                await response.write(chunk)
            except (ConnectionError, aiohttp.ClientError):
                upstream.close()  # client left: drop the worker connection so it stops generating
                self.state.metrics.errors["client_disconnect"] += 1
                return response
        try:
            await response.write_eof()
        except (ConnectionError, aiohttp.ClientError):
            pass
        return response

    async def forward_get(self, path: str) -> web.Response:
        """GET passthrough (e.g. /v1/models) to any routable worker, retrying on failure."""
        tried: list["WorkerState"] = []
        for _ in range(self.state.config.max_retries + 1):
            workers = self.state.pool.routable(time.monotonic(), tried)
            if not workers:
                break
            worker = min(workers, key=lambda w: (w.load, w.processed))
            tried.append(worker)
            try:
                async with self.session.get(worker.url + path, timeout=self.timeout,
                                            headers={"Accept-Encoding": "identity"}) as upstream:
                    body = await upstream.read()
                    if upstream.status >= 500:
                        continue
                    return web.Response(status=upstream.status, body=body,
                                        content_type=upstream.headers.get("Content-Type", "application/json")
                                        .split(";")[0])
            except (aiohttp.ClientError, asyncio.TimeoutError, OSError):
                worker.breaker.record_failure(time.monotonic())
                continue
        return json_error(503, "no healthy worker is available; retry shortly", "server_error",
                          code="no_healthy_worker")
