"""The router's view of its workers: per worker, its tree, load counters, last /load report and health.

Pure bookkeeping, no I/O: the proxy and the health monitor update it, the policies read it.
Worker URLs stay inside this module and the admin API; clients and metrics see only worker ids (w0, w1...).
"""

from __future__ import annotations

import itertools
from typing import Iterable, Iterator
from urllib.parse import urlsplit

from router.health import CircuitBreaker
from router.tree import DEFAULT_CHARS_PER_TOKEN, DEFAULT_CHUNK_CHARS, PrefixTree
from worker.contracts import LoadReport  # a worker's GET /load answer; the health monitor sets `report`

# Used until a worker's /load has told us its real KV capacity.
DEFAULT_KV_TOKENS = 262_144


def normalize_url(url: str) -> str:
    """Validate a worker base URL and strip a trailing slash. Raises ValueError naming the problem."""
    if not isinstance(url, str) or not url.strip():
        raise ValueError("worker url must be a non-empty string like http://host:port")
    url = url.strip().rstrip("/")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"worker url {url!r} must look like http://host:port")
    if parts.path or parts.query:
        raise ValueError(f"worker url {url!r} must not have a path: give the base url, e.g. http://host:port")
    return url


class WorkerState:
    """Everything the router knows about one worker."""

    __slots__ = ("url", "worker_id", "tree", "breaker", "in_flight", "outstanding_tokens", "processed",
                 "report", "removed", "source")

    def __init__(self, url: str, worker_id: str, tree: PrefixTree, breaker: CircuitBreaker,
                 source: str = "static") -> None:
        self.url = url
        self.worker_id = worker_id
        self.tree = tree
        self.breaker = breaker
        self.in_flight = 0  # requests dispatched by this router and not finished
        self.outstanding_tokens = 0  # estimated uncached prompt tokens not yet prefilled
        self.processed = 0  # requests ever dispatched (tie-breaker: spreads equal loads)
        self.report: LoadReport | None = None
        self.removed = False
        self.source = source  # "static", "admin" or "dns"

    def routable(self, now: float) -> bool:
        return not self.removed and self.breaker.allows(now)

    @property
    def load(self) -> int:
        """In-flight requests: this router's exact count, or the worker's own if other routers feed it."""
        report = self.report
        if report is None:
            return self.in_flight
        return max(self.in_flight, report.running + report.waiting)

    def on_dispatch(self, prompt_tokens_uncached: int) -> None:
        self.in_flight += 1
        self.processed += 1
        self.outstanding_tokens += prompt_tokens_uncached

    def on_first_byte(self, prompt_tokens_uncached: int) -> None:
        self.outstanding_tokens = max(0, self.outstanding_tokens - prompt_tokens_uncached)

    def on_finish(self) -> None:
        self.in_flight = max(0, self.in_flight - 1)

    def describe(self, now: float) -> dict:
        """Admin view (this one does carry the URL: it is only served behind the admin key)."""
        report = self.report
        return {
            "id": self.worker_id,
            "url": self.url,
            "source": self.source,
            "healthy": self.routable(now),
            "circuit": self.breaker.state(now),
            "in_flight": self.in_flight,
            "outstanding_tokens": self.outstanding_tokens,
            "processed": self.processed,
            "tree_tokens": self.tree.size_tokens,
            "tree_capacity_tokens": self.tree.capacity_tokens,
            "load": None if report is None else report.to_json(),
        }


class WorkerPool:
    """The set of workers, addressable by url; new workers get the next free id."""

    def __init__(self, chunk_chars: int = DEFAULT_CHUNK_CHARS,
                 chars_per_token: float = DEFAULT_CHARS_PER_TOKEN,
                 default_kv_tokens: int = DEFAULT_KV_TOKENS,
                 breaker_factory=CircuitBreaker) -> None:
        self.chunk_chars = chunk_chars
        self.chars_per_token = chars_per_token
        self.default_kv_tokens = default_kv_tokens
        self._breaker_factory = breaker_factory
        self._by_url: dict[str, WorkerState] = {}
        self._ids = itertools.count()

    def __len__(self) -> int:
        return len(self._by_url)

    def __iter__(self) -> Iterator[WorkerState]:
        return iter(list(self._by_url.values()))

    def __contains__(self, url: str) -> bool:
        return url in self._by_url

    def get(self, url: str) -> WorkerState | None:
        return self._by_url.get(url)

    def add(self, url: str, source: str = "static") -> WorkerState:
        """Add a worker (idempotent: an existing url is returned unchanged)."""
        url = normalize_url(url)
        existing = self._by_url.get(url)
        if existing is not None:
            return existing
        tree = PrefixTree(self.default_kv_tokens, self.chunk_chars, self.chars_per_token)
        worker = WorkerState(url, f"w{next(self._ids)}", tree, self._breaker_factory(), source)
        self._by_url[url] = worker
        return worker

    def remove(self, url: str) -> WorkerState | None:
        """Stop routing to a worker. Requests already on it finish; its tree is dropped."""
        worker = self._by_url.pop(normalize_url(url), None)
        if worker is not None:
            worker.removed = True
            worker.tree.clear()
        return worker

    def routable(self, now: float, exclude: Iterable[WorkerState] = ()) -> list[WorkerState]:
        excluded = set(id(w) for w in exclude)
        return [w for w in self._by_url.values() if w.routable(now) and id(w) not in excluded]
