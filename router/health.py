"""Worker health: a per-worker circuit breaker (pure) and the active poller of /health and /load (I/O).

Passive detection: the proxy reports each failed attempt (connection refused, timeout, 5xx before
the first byte) to the breaker. Active detection: the monitor polls every worker's /health and
/load; a poll is one more success or failure, and /load refreshes the worker's load and KV capacity.
Hung workers (accept connections, answer nothing): a /health poll that times out takes the worker out
of rotation at once ("suspect"); `down_after` timeouts in a row mark it down, and the monitor's
`on_down` callback gives up its unfinished requests so the proxy retries the unstarted ones elsewhere.
A worker marked down for silence comes back only after `readmit_after` good polls in a row, so a
worker that stalls now and then does not flap in and out of rotation. Polls of different workers run
concurrently: one hung worker does not delay the polls of the others.
Every change of a worker's poll result is logged with its URL and the reason ("connection refused",
"/health answered 503: loading", ...), so an operator sees why a worker gets no traffic.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING, Callable

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
    A poll that times out makes the worker "suspect" (not routable until a good poll); enough of them
    in a row mark it down, and then `readmit_after` good polls in a row are needed to come back.
    """

    __slots__ = ("failure_threshold", "base_cooldown_s", "max_cooldown_s", "readmit_after", "_failures",
                 "_open_until", "_cooldown_s", "_opened", "_down", "_suspect", "_poll_timeouts", "_hung",
                 "_good_polls")

    def __init__(self, failure_threshold: int = 3, base_cooldown_s: float = 2.0,
                 max_cooldown_s: float = 30.0, readmit_after: int = 2) -> None:
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
        self.readmit_after = readmit_after
        self._suspect = False  # the last poll timed out
        self._poll_timeouts = 0  # poll timeouts in a row
        self._hung = False  # marked down for silence: needs readmit_after good polls
        self._good_polls = 0

    def state(self, now: float) -> str:
        if self._down:
            return "down"
        if self._suspect:
            return "suspect"
        if not self._opened:
            return CLOSED
        return OPEN if now < self._open_until else HALF_OPEN

    def allows(self, now: float) -> bool:
        """May requests be routed to this worker now? (Half-open lets traffic probe it.)"""
        return not self._down and not self._suspect and (not self._opened or now >= self._open_until)

    def record_poll(self, ok: bool, now: float, hard: bool = False) -> None:
        """Result of an active health poll: a failure marks the worker down until a poll succeeds."""
        self._poll_timeouts = 0
        self._suspect = False
        if ok:
            self._good_polls += 1
            if self._hung and self._good_polls < self.readmit_after:
                return  # it was silent: one good answer is not enough to trust it again
            self._hung = False
            self._down = False
            self.record_success()
        else:
            self._good_polls = 0
            self._hung = False  # it answers now: its next good poll is authoritative
            self._down = True
            self.record_failure(now, hard=hard)

    def record_poll_timeout(self, now: float, down_after: int = 2) -> bool:
        """A poll got no answer in time. True when this marks the worker down (it was not down before)."""
        self._good_polls = 0
        self._poll_timeouts += 1
        self._suspect = True
        if self._poll_timeouts < down_after or self._down:
            return False
        self._down = True
        self._hung = True
        self.record_failure(now, hard=True)
        return True

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
                 timeout_s: float = 2.0, down_after: int = 2,
                 on_down: "Callable[[WorkerState], None] | None" = None) -> None:
        self.pool = pool
        self.session = session
        self.interval_s = interval_s
        self.timeout_s = timeout_s
        self.down_after = down_after
        self.on_down = on_down  # called when poll timeouts mark a worker down (the proxy's requests move)
        self._polling: dict[str, asyncio.Task] = {}  # url -> its poll in progress
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
                if not worker.removed and worker.url not in self._polling:  # a slow poll is not doubled
                    task = asyncio.get_running_loop().create_task(self._poll(worker))
                    self._polling[worker.url] = task
                await asyncio.sleep(gap)

    async def _poll(self, worker: "WorkerState") -> None:
        try:
            await self.check(worker)
        except Exception:  # noqa: BLE001 - a poll must never kill the monitor
            log.exception("health poll of %s failed unexpectedly", worker.worker_id)
        finally:
            self._polling.pop(worker.url, None)

    async def stop(self) -> None:
        for task in list(self._polling.values()):
            task.cancel()
        await super().stop()

    def _timed_out(self, worker: "WorkerState", now: float) -> None:
        marked_down = worker.breaker.record_poll_timeout(now, self.down_after)
        self.health_log.observe(worker, f"/health gave no answer in {self.timeout_s:g} s"
                                + (" (marked down)" if worker.breaker.state(now) == "down" else ""))
        if marked_down and self.on_down is not None:
            self.on_down(worker)

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
            elif isinstance(exc, asyncio.TimeoutError):  # accepted, silent: hung (or far too busy)
                self._timed_out(worker, now)
            else:  # cut: count it toward the breaker only
                worker.breaker.record_failure(now)
                self.health_log.observe(worker, f"/health failed: {exc}")
            return False
        if not healthy:  # 503: loading or draining. Not routable until it says ready.
            worker.breaker.record_poll(False, now, hard=True)
            said = _health_body_reason(body)
            self.health_log.observe(worker, f"/health answered {resp.status}" + (f" ({said})" if said else ""))
            return False
        worker.breaker.record_poll(True, now)
        self.health_log.observe(worker, None if worker.breaker.state(now) != "down"
                                else "answering again after going silent; waiting for more good polls")
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
