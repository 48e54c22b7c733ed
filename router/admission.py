"""The router's admission gate: a bounded number of requests in flight, a bounded FIFO queue behind them.

A request either gets a slot at once, waits in the queue for one (up to the queue timeout), or is
shed at once when the queue is full. Shedding is an answer (503 + Retry-After), never a dropped
connection, and a queued request that times out is answered the same way. The gate holds no I/O
of its own: the handler asks `try_acquire()`, then `acquire()` when that says no, and always calls
`release()` for a slot it got.
"""

from __future__ import annotations

import asyncio
from collections import deque


class Shed(Exception):
    """No slot: the request is answered 503 with `retry_after_s`."""

    def __init__(self, reason: str, retry_after_s: int) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retry_after_s = retry_after_s


class AdmissionGate:
    def __init__(self, max_active: int, max_queued: int, queue_timeout_s: float) -> None:
        self.max_active = max_active
        self.max_queued = max_queued
        self.queue_timeout_s = queue_timeout_s
        self.active = 0
        self._waiters: deque[asyncio.Future] = deque()
        self.shed_full = 0  # refused at once: the queue was full
        self.shed_timeout = 0  # waited queue_timeout_s without a slot

    @property
    def queued(self) -> int:
        return len(self._waiters)

    def _retry_after_s(self) -> int:
        """A client's fair wait: how long the queue takes to move, at least 1 s."""
        return max(1, min(int(self.queue_timeout_s), 1 + len(self._waiters) // max(1, self.max_active)))

    def try_acquire(self) -> bool:
        """A slot at once when one is free and nobody queues for it; False: `acquire()` waits or sheds.

        The common case, without the coroutine `acquire()` costs a request."""
        if self.active < self.max_active and not self._waiters:
            self.active += 1
            return True
        return False

    async def acquire(self) -> None:
        """A slot, possibly after waiting; Shed when there is none to be had."""
        if self.try_acquire():
            return
        if len(self._waiters) >= self.max_queued:
            self.shed_full += 1
            raise Shed(f"the router is at capacity ({self.active} requests in flight, "
                       f"{len(self._waiters)} queued)", self._retry_after_s())
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await asyncio.wait_for(asyncio.shield(waiter), self.queue_timeout_s)
        except asyncio.TimeoutError:
            if waiter.done() and not waiter.cancelled():
                return  # the slot arrived just as the wait ran out: keep it
            waiter.cancel()
            self.shed_timeout += 1
            raise Shed(f"the router is at capacity: no slot within {self.queue_timeout_s:g} s",
                       self._retry_after_s()) from None
        except asyncio.CancelledError:  # the client left while queued
            if waiter.done() and not waiter.cancelled():
                self.release()  # a slot was handed over: pass it on
            else:
                waiter.cancel()
            raise
        finally:
            try:
                self._waiters.remove(waiter)
            except ValueError:
                pass

    def release(self) -> None:
        """Give a slot back: the oldest waiter still waiting takes it over, else the count drops."""
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)  # the slot passes on; `active` is unchanged
                return
        self.active = max(0, self.active - 1)
