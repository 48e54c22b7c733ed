"""Forward one request to a worker chosen by the policy; stream the answer back byte for byte.

Retry rule: an attempt that fails before the client has received any byte is retried on another
worker, at most `max_retries` times, when the failure says something about the worker rather than the
request. What each failure means (`_AttemptFailed`):

  connection refused, first-byte timeout     the worker is down or hung: a hard breaker failure, retried
  cut connection, bad HTTP, 502/503/504      the worker is unwell: a breaker failure, retried
  429/503 with Retry-After (queue full)      the worker is busy, not broken: no breaker failure, retried
                                             on one other worker at most, then relayed with Retry-After
  500                                        this request made the worker fail: relayed, not retried,
                                             no breaker failure (one bad prompt must not close a worker)
  4xx                                        the client's mistake: relayed as it is
  the worker marked down (hung), mid-wait    retried elsewhere; the health monitor already counted it

Once a byte has gone to the client, a failure ends the stream with a clean SSE error event and
`[DONE]`, including a stream cut by the router shutting down. Whatever happens, `release_attempt`
gives back the load the attempt added (in flight, outstanding prompt tokens).

A client that goes away aborts its request on the worker at once: the router runs with aiohttp's
handler cancellation, and every path here closes the worker connection when it is cancelled.

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

from router.metrics import OVERHEAD_KEY
from router.policies import Decision, NoWorkerAvailable, RouteRequest
from router.responses import json_error
from router.upstream import (
    UpstreamAborted,
    UpstreamConnectError,
    UpstreamError,
    UpstreamFirstByteTimeout,
    UpstreamPool,
    UpstreamResponse,
)
from router.usage import prompt_tokens_in
from router.request_id import tracing_header_lines
from worker.contracts import SSE_DONE, error_json, sse_error_event

if TYPE_CHECKING:  # pragma: no cover
    from router.app import RouterState
    from router.worker_pool import PendingPrefill, WorkerState

log = logging.getLogger("radixfleet.router.proxy")

WORKER_HEADER = "X-Radixfleet-Worker"
# worker headers an error answer keeps on its way out (upstream names are lower-case; these go out as written)
_RELAYED_HEADERS = {"retry-after": "Retry-After", "x-request-id": "X-Request-ID"}
# worker headers a successful answer keeps: the request fields the worker accepted but ignored
_SUCCESS_HEADERS = {"x-ignored-fields": "X-Ignored-Fields"}


def _kept_headers(upstream: UpstreamResponse, table: dict[str, str]) -> dict[str, str]:
    """The worker's headers named in `table` (lower-case upstream name -> name as sent on)."""
    return {out: upstream.headers[name] for name, out in table.items() if name in upstream.headers}


NO_WORKER_RETRY_AFTER_S = 1  # what a client is told to wait when no worker is routable


@dataclass(slots=True)
class _Relay:
    """A worker's own error answer, kept to pass on if no other worker does better."""

    status: int
    body: bytes
    content_type: str
    headers: dict[str, str]


class _AttemptFailed(Exception):
    """This worker failed before the first byte reached the client.

    counts: a failure of the worker (its breaker hears of it); retry: another worker may serve it;
    shed: the worker refused for overload (retried on one other worker at most);
    response: the worker's answer, relayed if no retry is left."""

    def __init__(self, reason: str, *, hard: bool = False, counts: bool = True, retry: bool = True,
                 shed: bool = False, response: _Relay | None = None):
        super().__init__(reason)
        self.reason = reason
        self.hard = hard
        self.counts = counts
        self.retry = retry
        self.shed = shed
        self.response = response


def _failure_of(exc: UpstreamError, when: str = "") -> _AttemptFailed:
    """What an upstream error before the first byte means for the worker and for a retry."""
    reason = f"{exc} {when}".strip()
    if isinstance(exc, UpstreamAborted):  # marked down (health monitor counted it) or the router stops
        return _AttemptFailed(reason, counts=False, retry=exc.retryable)
    if isinstance(exc, (UpstreamConnectError, UpstreamFirstByteTimeout)):
        return _AttemptFailed(reason, hard=True)  # down, or accepted and silent: hung
    return _AttemptFailed(reason)


def _error_answer_failure(relay: _Relay) -> _AttemptFailed | None:
    """How a worker's 4xx/5xx answer is handled: None to relay it at once, else the failure to record."""
    status = relay.status
    if status in (429, 503) and "Retry-After" in relay.headers:
        return _AttemptFailed(f"worker overloaded (status {status})", counts=False, shed=True, response=relay)
    if status == 500:  # the worker's handler raised on this input: another worker would too
        return _AttemptFailed("status 500", counts=False, retry=False, response=relay)
    if status >= 500:  # 502/503/504 without Retry-After: draining, engine dead
        return _AttemptFailed(f"status {status}", response=relay)
    return None


@dataclass(slots=True)
class _Timing:
    """What an attempt needs to account for its first byte."""

    pending: "PendingPrefill"  # the prompt tokens the worker must prefill (its outstanding_tokens share)
    endpoint: str
    started: float
    first_byte: bool = False  # on_first_byte ran: the outstanding share is given back already
    text_chars: int = 0  # routing characters, set against the worker's usage.prompt_tokens
    waited: float = 0.0  # seconds earlier failed attempts spent on their workers: not the router's own time
    attempt_at: float = 0.0  # when this attempt called the upstream (a failure's wait starts there)


def release_attempt(worker: "WorkerState", timing: _Timing) -> None:
    """Give back what dispatching one attempt added to the worker's load, however the attempt ended.

    The one place that undoes `worker.on_dispatch`: a placement change to the load signals changes this
    function and `Proxy._first_byte`, nothing else in the proxy."""
    worker.on_finish(timing.pending)  # also gives back a prefill share not released yet


class Proxy:
    def __init__(self, state: "RouterState", session: aiohttp.ClientSession, upstream: UpstreamPool) -> None:
        self.state = state
        self.session = session  # for the rare GETs (/v1/models)
        self.upstream = upstream  # the hot path
        cfg = state.config
        # /v1/models is answered at once by a healthy worker: no generation-length read timeout
        get_timeout = max(cfg.health_timeout_s, 5.0)
        self.timeout = aiohttp.ClientTimeout(total=cfg.connect_timeout_s + get_timeout,
                                             sock_connect=cfg.connect_timeout_s, sock_read=get_timeout)

    def _upstream_headers(self, request: web.Request) -> str:
        """Request headers worth passing on (tracing ids), as raw header lines, and the workers' key."""
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
        retries_left = state.config.max_retries
        shed_retries_left = 1  # an overloaded fleet is not made busier by asking every worker in turn
        waited = 0.0
        while True:
            workers = state.pool.routable(time.monotonic(), tried)
            if not workers:
                break
            try:
                decision = policy.choose(workers, route)
            except NoWorkerAvailable:
                break
            worker = decision.worker
            self._record_decision(decision, route, endpoint)
            if tried:
                metrics.retries += 1
            pending = worker.on_dispatch(worker.uncached_tokens(route.text_chars, decision.match_chars),
                                         stream, route.text_chars)
            timing = _Timing(pending, endpoint, started, text_chars=route.text_chars, waited=waited)
            try:
                return await self._attempt(request, worker, path, raw, headers, stream, timing)
            except _AttemptFailed as failure:
                last_failure = failure
                waited += time.monotonic() - timing.attempt_at
                tried.append(worker)
                if failure.counts:
                    worker.breaker.record_failure(time.monotonic(), hard=failure.hard)
                retry = failure.retry and retries_left > 0 and (not failure.shed or shed_retries_left > 0)
                log.warning("worker %s failed before first byte (%s); %s", worker.worker_id, failure.reason,
                            "retrying" if retry else "not retried")
                if not retry:
                    break
                retries_left -= 1
                shed_retries_left -= failure.shed
            finally:
                release_attempt(worker, timing)
        return self._final_answer(last_failure)

    def _final_answer(self, failure: _AttemptFailed | None) -> web.Response:
        """The answer when no attempt succeeded: the last worker's own, or the router's."""
        metrics = self.state.metrics
        if failure is None:
            metrics.errors["no_worker"] += 1
            response = json_error(503, "no healthy worker is available; retry shortly", "server_error",
                                  code="no_healthy_worker")
            response.headers["Retry-After"] = str(NO_WORKER_RETRY_AFTER_S)
            return response
        metrics.errors["shed" if failure.shed else "upstream"] += 1
        if failure.response is not None:
            return self._relayed(failure.response, None)
        if not failure.retry and not failure.counts:  # aborted by the router's shutdown
            return json_error(503, "the router is shutting down; retry on another replica", "server_error",
                              code="draining")
        return json_error(502, f"the worker failed and no other worker could serve the request "
                               f"({failure.reason})", "server_error", code="worker_failed")

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
        timing.first_byte = True
        worker.breaker.record_success()
        self.state.metrics.first_byte[timing.endpoint].observe(time.monotonic() - timing.started)

    def _overhead(self, request: web.Request, upstream: UpstreamResponse, timing: "_Timing") -> None:
        """The router's own seconds, once the answer's first byte is handed on: arrival to the upstream request
        sent (less failed attempts' waits), plus the worker's first body byte arriving to its relay."""
        now = time.monotonic()
        seconds = upstream.sent_at - timing.started - timing.waited + now - (upstream.body_at or now)
        self.state.metrics.overhead[timing.endpoint].observe(seconds)
        request[OVERHEAD_KEY] = seconds

    async def _attempt(self, request: web.Request, worker: "WorkerState", path: str, raw: bytes,
                       headers: str, stream: bool, timing: "_Timing") -> web.StreamResponse:
        try:
            cfg = self.state.config  # a non-streamed answer's head comes when it is complete: read timeout
            timing.attempt_at = time.monotonic()
            upstream = await self.upstream.post(
                worker.url, path, raw, headers,
                first_byte_timeout_s=cfg.first_byte_timeout_s if stream else cfg.read_timeout_s,
                idle_timeout_s=cfg.inter_chunk_timeout_s if stream else cfg.read_timeout_s)
        except UpstreamError as exc:
            raise _failure_of(exc) from None
        try:
            status = upstream.status
            content_type = upstream.headers.get("content-type", "application/json")
            if status >= 400:
                relay = await self._read_error_answer(upstream, content_type)
                failure = _error_answer_failure(relay)
                if failure is not None:
                    raise failure
                self._first_byte(worker, timing)  # a 4xx: the worker is fine, the request is not
                self._overhead(request, upstream, timing)
                return self._relayed(relay, worker)
            if not stream or status != 200:
                try:
                    body = await upstream.read()
                except UpstreamError as exc:
                    raise _failure_of(exc, "while reading the answer") from None
                self._first_byte(worker, timing)
                self._usage(worker, timing, body)
                response = web.Response(status=status, body=body)
                response.headers["Content-Type"] = content_type
                response.headers[WORKER_HEADER] = worker.worker_id
                response.headers.update(_kept_headers(upstream, _SUCCESS_HEADERS))
                self._overhead(request, upstream, timing)  # relay ends where aiohttp takes the answer to send
                return response
            return await self._pipe_stream(request, worker, upstream, content_type, timing)
        finally:
            if not upstream.done:  # failed, cancelled (client left) or abandoned: the worker must stop
                upstream.close()

    @staticmethod
    def _usage(worker: "WorkerState", timing: "_Timing", data: bytes) -> None:
        tokens = prompt_tokens_in(data)
        if tokens:
            worker.on_prompt_tokens(timing.text_chars, tokens)

    @staticmethod
    async def _read_error_answer(upstream: UpstreamResponse, content_type: str) -> _Relay:
        try:
            body = await upstream.read()
        except UpstreamError:
            body, content_type = error_json(f"worker answered {upstream.status}", "server_error"), "application/json"
        return _Relay(upstream.status, body, content_type.split(";")[0], _kept_headers(upstream, _RELAYED_HEADERS))

    @staticmethod
    def _relayed(relay: _Relay, worker: "WorkerState | None") -> web.Response:
        response = web.Response(status=relay.status, body=relay.body, content_type=relay.content_type)
        for name, value in relay.headers.items():
            response.headers[name] = value
        if worker is not None:
            response.headers[WORKER_HEADER] = worker.worker_id
        return response

    async def _pipe_stream(self, request: web.Request, worker: "WorkerState", upstream: UpstreamResponse,
                           content_type: str, timing: "_Timing") -> web.StreamResponse:
        # Hold the client response until the worker's first chunk: until then a failure can still be retried.
        try:
            first = await upstream.read_chunk()
        except UpstreamError as exc:
            raise _failure_of(exc, "before the first chunk") from None
        if not first:
            raise _AttemptFailed("stream ended before its first chunk")
        self._first_byte(worker, timing)
        response = web.StreamResponse(status=upstream.status)
        response.headers["Content-Type"] = content_type
        response.headers["Cache-Control"] = "no-cache"
        response.headers["X-Accel-Buffering"] = "no"
        response.headers[WORKER_HEADER] = worker.worker_id
        response.headers.update(_kept_headers(upstream, _SUCCESS_HEADERS))
        try:
            await response.prepare(request)
            await response.write(first)
            self._overhead(request, upstream, timing)
        except (ConnectionError, aiohttp.ClientError):
            upstream.close()  # client left: drop the worker connection so it stops generating
            return response
        while True:
            try:
                chunk = await upstream.read_chunk()
            except UpstreamError as exc:
                # The stream broke after bytes went out: end it with a clean error event and [DONE].
                chunk = self._mid_stream_failure(worker, exc)
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

    def _mid_stream_failure(self, worker: "WorkerState", exc: UpstreamError) -> bytes:
        """Count a stream that broke after its first byte; the events that end it for the client."""
        self.state.metrics.errors["mid_stream"] += 1
        log.warning("worker %s failed mid-stream: %s", worker.worker_id, exc)
        if isinstance(exc, UpstreamAborted) and not exc.retryable:
            return sse_error_event("the router is shutting down; retry the request", code="router_shutdown") + SSE_DONE
        if not isinstance(exc, UpstreamAborted):  # a worker marked down was counted by the health monitor
            worker.breaker.record_failure(time.monotonic())
        return sse_error_event("the worker serving this stream failed; retry the request",
                               code="worker_failed") + SSE_DONE

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
