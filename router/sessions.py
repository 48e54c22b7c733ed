"""Session pins: which worker a conversation was last sent to, with expiry. Pure, clock injected.

The pin table is bounded (`max_sessions`, least recently used dropped first) so that a flood of
one-off session ids cannot grow the router's memory without limit.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from typing import Callable


class SessionTable:
    """session key -> (worker url, expiry). A pin expires `ttl_s` after it was last used."""

    def __init__(
        self,
        ttl_s: float = 1800.0,
        max_sessions: int = 100_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if ttl_s <= 0:
            raise ValueError(f"session ttl must be positive, got {ttl_s}")
        if max_sessions <= 0:
            raise ValueError(f"max_sessions must be positive, got {max_sessions}")
        self.ttl_s = ttl_s
        self.max_sessions = max_sessions
        self._clock = clock
        self._pins: OrderedDict[str, tuple[str, float]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._pins)

    def get(self, session_key: str) -> str | None:
        """The worker url pinned for this session, or None if there is none or it expired."""
        entry = self._pins.get(session_key)
        if entry is None:
            return None
        url, expires_at = entry
        if self._clock() >= expires_at:
            del self._pins[session_key]
            return None
        return url

    def pin(self, session_key: str, url: str) -> None:
        """Pin (or re-pin) a session to a worker and restart its expiry."""
        pins = self._pins
        pins[session_key] = (url, self._clock() + self.ttl_s)
        pins.move_to_end(session_key)
        while len(pins) > self.max_sessions:
            pins.popitem(last=False)

    def unpin_worker(self, url: str) -> int:
        """Drop every pin to a removed worker; returns how many were dropped."""
        stale = [key for key, (pinned, _) in self._pins.items() if pinned == url]
        for key in stale:
            del self._pins[key]
        return len(stale)

    def expire(self) -> int:
        """Drop expired pins (called periodically); returns how many were dropped."""
        now = self._clock()
        stale = [key for key, (_, expires_at) in self._pins.items() if now >= expires_at]
        for key in stale:
            del self._pins[key]
        return len(stale)
