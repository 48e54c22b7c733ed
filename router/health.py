"""Worker health: a per-worker circuit breaker (pure) and the active poller of /health and /load (I/O).

Passive detection: the proxy reports each failed attempt (connection refused, timeout, 5xx before
the first byte) to the breaker. Active detection: the monitor polls every worker's /health and
/load; a poll is one more success or failure, and /load refreshes the worker's load and KV capacity.
Every change of a worker's poll result is logged with its URL and the reason ("connection refused",
"/health answered 503: loading", ...), so an operator sees why a worker gets no traffic.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING

from router.background import BackgroundLoop

if TYPE_CHECKING:  # pragma: no cover
    import aiohttp

    from router.worker_pool import WorkerPool, WorkerState

log = logging.getLogger("radixfleet.router.health")

CLOSED, OPEN, HALF_OPEN = "closed", "open", "half_open"


class CircuitBreaker:
    """Closed -> (failures in a row) -> open for a cooldown -> half-open -> closed on a success.

    A failure while half-open reopens with a doubled cooldown (capped), so a flapping worker is
    probed less and less often. A hard failure (connection refused) opens at once.
    Separately, a failed active health poll marks the worker down until a poll succeeds: /health
    saying 503 (loading, draining) is an explicit "send nothing", not something to probe with traffic.
    """

    __slots__ = ("failure_threshold", "base_cooldown_s", "max_cooldown_s", "_failures", "_open_until",
                 "_cooldown_s", "_opened", "_down")

    def __init__(self, failure_threshold: int = 3, base_cooldown_s: float = 2.0,
                 max_cooldown_s: float = 30.0) -> None:
        if failure_threshold < 1:
            raise ValueError("failure_threshold must be >= 1")
        self.failure_threshold = failure_threshold
        self.base_cooldown_s = base_cooldown_s
        self.max_cooldown_s = max_cooldown_s
        self._failures = 0
        self._open_until = 0.0
        self._cooldown_s = base_cooldown_s
        self._opened = False
        self._down = False

    def state(self, now: float) -> str:
        if self._down:
            return "down"
        if not self._opened:
            return CLOSED
        return OPEN if now < self._open_until else HALF_OPEN

    def allows(self, now: float) -> bool:
        """May requests be routed to this worker now? (Half-open lets traffic probe it.)"""
        return not self._down and (not self._opened or now >= self._open_until)

    def record_poll(self, ok: bool, now: float, hard: bool = False) -> None:
        """Result of an active health poll: a failure marks the worker down until a poll succeeds."""
        if ok:
            self._down = False
            self.record_success()
        else:
            self._down = True
            self.record_failure(now, hard=hard)

    def record_success(self) -> None:
        self._failures = 0
        self._opened = False
        self._cooldown_s = self.base_cooldown_s

    def record_failure(self, now: float, hard: bool = False) -> None:
        if self._opened and now < self._open_until:
            return  # already open: stray failures of requests sent earlier change nothing
        self._failures += 1
        half_open = self._opened  # opened earlier and the cooldown has run out: this was the probe
        if hard or half_open or self._failures >= self.failure_threshold:
            if half_open:
                self._cooldown_s = min(self._cooldown_s * 2, self.max_cooldown_s)
            self._opened = True
            self._open_until = now + self._cooldown_s

    @property
    def consecutive_failures(self) -> int:
        return self._failures


def _health_body_reason(body: bytes) -> str:
    """The worker's own words from a 503 /health body ({"status": ..., "reason": ...}), if any."""
    import json

    try:
        data = json.loads(body)
    except ValueError:
        return ""
    if not isinstance(data, dict):
        return ""
    return ": ".join(str(data[k]) for k in ("status", "reason") if data.get(k))


class HealthLog:
    """Logs a worker's poll result whenever it changes (healthy, or down for a new reason)."""

    def __init__(self) -> None:
        self._last: dict[str, str | None] = {}  # url -> None (healthy) or the failure reason

    def observe(self, worker: "WorkerState", reason: str | None) -> None:
        known = worker.url in self._last
        if known and self._last[worker.url] == reason:
            return
        self._last[worker.url] = reason
        if reason is None:
            log.info("worker %s (%s) is healthy%s", worker.worker_id, worker.url, " again" if known else "")
        else:
            log.warning("worker %s (%s) is not routable: %s", worker.worker_id, worker.url, reason)

    def forget(self, url: str) -> None:
        self._last.pop(url, None)


class HealthMonitor(BackgroundLoop):
    """Polls every worker's /health and /load every `interval_s` seconds."""

    def __init__(self, pool: "WorkerPool", session: "aiohttp.ClientSession", interval_s: float = 1.0,
                 timeout_s: float = 2.0) -> None:
        self.pool = pool
        self.session = session
        self.interval_s = interval_s
        self.timeout_s = timeout_s
        self.health_log = HealthLog()
        self._load_refused: set[str] = set()  # urls whose /load refused our key (logged once)

    async def _run(self) -> None:
        # Polls are spread over the interval rather than fired together, so the router never spends a
        # burst of CPU on them at once (a burst shows up directly in the p99 latency of client requests).
        while True:
            workers = list(self.pool)
            if not workers:
                await asyncio.sleep(self.interval_s)
                continue
            gap = self.interval_s / len(workers)
            for worker in workers:
                if not worker.removed:
                    try:
                        await self.check(worker)
                    except Exception:  # noqa: BLE001 - a poll must never kill the monitor
                        log.exception("health poll of %s failed unexpectedly", worker.worker_id)
                await asyncio.sleep(gap)

    async def check_all(self) -> None:
        workers = list(self.pool)
        if workers:
            await asyncio.gather(*(self.check(w) for w in workers), return_exceptions=True)

    async def check(self, worker: "WorkerState") -> bool:
        """Poll one worker; update its breaker, load report and tree capacity. Returns healthy."""
        import aiohttp

        from router.worker_pool import LoadReport

        timeout = aiohttp.ClientTimeout(total=self.timeout_s)
        now = time.monotonic()
        try:
            async with self.session.get(worker.url + "/health", timeout=timeout) as resp:
                body = await resp.read()
                healthy = resp.status == 200
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
            if isinstance(exc, aiohttp.ClientConnectorError):  # nothing listens: down
                worker.breaker.record_poll(False, now, hard=True)
                self.health_log.observe(worker, f"cannot connect ({exc.os_error.strerror or exc.os_error})")
            else:  # slow or cut: a busy worker may answer late, so count it toward the breaker only
                worker.breaker.record_failure(now)
                self.health_log.observe(worker, f"/health gave no answer in {self.timeout_s:g} s"
                                        if isinstance(exc, asyncio.TimeoutError) else f"/health failed: {exc}")
            return False
        if not healthy:  # 503: loading or draining. Not routable until it says ready.
            worker.breaker.record_poll(False, now, hard=True)
            said = _health_body_reason(body)
            self.health_log.observe(worker, f"/health answered {resp.status}" + (f" ({said})" if said else ""))
            return False
        worker.breaker.record_poll(True, now)
        self.health_log.observe(worker, None)
        try:
            async with self.session.get(worker.url + "/load", timeout=timeout) as resp:
                if resp.status in (401, 403) and worker.url not in self._load_refused:
                    self._load_refused.add(worker.url)
                    log.warning("worker %s (%s) refused the router's key on /load: give the router the "
                                "workers' key with --worker-api-key", worker.worker_id, worker.url)
                if resp.status == 200:
                    report = LoadReport.from_json(await resp.json(content_type=None))
                    worker.report = report
                    if report.kv_tokens_total > 0 and report.kv_tokens_total != worker.tree.capacity_tokens:
                        worker.tree.set_capacity(report.kv_tokens_total)
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError, ValueError) as exc:
            log.debug("load poll of %s failed: %s", worker.worker_id, exc)
        return True
