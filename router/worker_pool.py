"""The router's view of its workers: per worker, its tree, load counters, last /load report and health.

Pure bookkeeping, no I/O: the proxy and the health monitor update it, the policies read it.
Worker URLs stay inside this module and the admin API; clients and metrics see only worker ids (w0, w1...).
"""

from __future__ import annotations

import itertools
from collections import deque
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


class PendingPrefill:
    """One dispatched request's uncached prompt tokens, until the worker is known to have prefilled them."""

    __slots__ = ("tokens", "done")

    def __init__(self, tokens: int) -> None:
        self.tokens = tokens
        self.done = False


class CharsPerToken:
    """Characters of routing text per prompt token, learned from what the worker reports.

    Each observation is (routing characters sent, prompt tokens the worker counted): from a response's
    `usage.prompt_tokens`, or from the growth of the worker's `cache_query_tokens` between two /load
    polls against the characters dispatched meanwhile. Sums decay so that the estimate follows a model
    change (a restarted worker serving another model) within a few hundred requests.
    """

    __slots__ = ("default", "_chars", "_tokens")

    DECAY = 0.99  # per observation
    MIN_TOKENS = 256  # below this much evidence, the default stands

    def __init__(self, default: float) -> None:
        self.default = default
        self._chars = 0.0
        self._tokens = 0.0

    def observe(self, chars: float, tokens: float) -> None:
        if chars <= 0 or tokens <= 0:
            return
        self._chars = self._chars * self.DECAY + chars
        self._tokens = self._tokens * self.DECAY + tokens

    @property
    def measured(self) -> bool:
        return self._tokens >= self.MIN_TOKENS

    @property
    def value(self) -> float:
        if not self.measured:
            return self.default
        return self._chars / self._tokens


class WorkerState:
    """Everything the router knows about one worker.

    Load signals, kept apart because they cost a newcomer differently:
    * `outstanding_tokens`: uncached prompt tokens dispatched and not yet prefilled. A streamed request
      releases its share at its first chunk (the first token exists, so the prompt is prefilled). A
      non-streamed one cannot be seen prefilling: its share is released when a /load poll shows the
      worker's admission queue shorter than the requests still counted (see `_release_admitted`), or at
      the latest when its answer arrives.
    * `decoding`: requests in flight past their prefill.
    * `in_flight` (and `load`): all of them, plus what the worker's own /load counts from other routers.
    """

    __slots__ = ("url", "worker_id", "tree", "breaker", "in_flight", "outstanding_tokens", "processed",
                 "_report", "removed", "source", "prefilling", "_unseen", "chars_per_token",
                 "chars_since_report", "joined_at", "processed_at_join", "restarts")

    def __init__(self, url: str, worker_id: str, tree: PrefixTree, breaker: CircuitBreaker,
                 source: str = "static", chars_per_token: float = DEFAULT_CHARS_PER_TOKEN) -> None:
        self.url = url
        self.worker_id = worker_id
        self.tree = tree
        self.breaker = breaker
        self.in_flight = 0  # requests dispatched by this router and not finished
        self.outstanding_tokens = 0  # estimated uncached prompt tokens not yet prefilled
        self.prefilling = 0  # requests whose outstanding tokens are still counted
        self.processed = 0  # requests ever dispatched (tie-breaker: spreads equal loads)
        # Non-streamed requests dispatched here, oldest first: /load polls release the admitted ones.
        self._unseen: deque[PendingPrefill] = deque()
        self._report: LoadReport | None = None
        self.removed = False
        self.source = source  # "static", "admin" or "dns"
        self.chars_per_token = CharsPerToken(chars_per_token)
        self.chars_since_report = 0  # routing characters dispatched since the last /load report
        # Warm-up reference, set by the policy when it first sees the worker (None: not seen yet, or
        # restarted): its decision count then, and this worker's `processed` then.
        self.joined_at: int | None = None
        self.processed_at_join = 0
        self.restarts = 0  # restarts seen in /load (its counters went backwards): its cache is gone

    def routable(self, now: float) -> bool:
        return not self.removed and self.breaker.allows(now)

    @property
    def load(self) -> int:
        """In-flight requests: this router's exact count, or the worker's own if other routers feed it."""
        report = self._report
        if report is None:
            return self.in_flight
        return max(self.in_flight, report.running + report.waiting)

    @property
    def decoding(self) -> int:
        """Requests in flight whose prompt is prefilled (this router's)."""
        return max(0, self.in_flight - self.prefilling)

    def uncached_tokens(self, text_chars: int, match_chars: int) -> int:
        """Prompt tokens this worker must prefill for a prompt of which `match_chars` are cached."""
        return max(0, round((text_chars - match_chars) / self.tree.chars_per_token))

    # --- the request path -----------------------------------------------------------------------
    def on_dispatch(self, prompt_tokens_uncached: int, streamed: bool = True,
                    text_chars: int = 0) -> PendingPrefill:
        """A request was sent here. Returns its pending prefill, to hand back at first byte and finish."""
        self.in_flight += 1
        self.processed += 1
        self.outstanding_tokens += prompt_tokens_uncached
        self.prefilling += 1
        self.chars_since_report += text_chars
        pending = PendingPrefill(prompt_tokens_uncached)
        if not streamed:
            self._unseen.append(pending)
        return pending

    def on_first_byte(self, pending: "PendingPrefill | int") -> None:
        """A streamed answer's first chunk: its prompt is prefilled."""
        if isinstance(pending, int):  # older callers pass the token count
            self.outstanding_tokens = max(0, self.outstanding_tokens - pending)
            self.prefilling = max(0, self.prefilling - 1)
            return
        self._release(pending)

    def on_finish(self, pending: PendingPrefill | None = None) -> None:
        self.in_flight = max(0, self.in_flight - 1)
        if pending is not None:
            self._release(pending)
            # Answers mostly come back in the order the requests went out: drop the finished ones
            # from the front at once rather than keeping a second of them until the next /load poll
            # (at thousands of requests a second, objects that live that long make the garbage
            # collector's older generations grow and run more often). The poll skips finished ones
            # anyway, so what it releases is the same.
            unseen = self._unseen
            while unseen and unseen[0].done:
                unseen.popleft()

    def on_prompt_tokens(self, text_chars: int, prompt_tokens: int) -> None:
        """The worker counted `prompt_tokens` for a prompt of `text_chars` routing characters."""
        cpt = self.chars_per_token
        cpt.observe(text_chars, prompt_tokens)
        value = cpt.value
        tree = self.tree
        if abs(value - tree.chars_per_token) > 0.005 * value:  # re-bound the tree only when it moved
            tree.set_chars_per_token(value)

    def _release(self, pending: PendingPrefill) -> None:
        if pending.done:
            return
        pending.done = True
        self.outstanding_tokens = max(0, self.outstanding_tokens - pending.tokens)
        self.prefilling = max(0, self.prefilling - 1)

    # --- /load ------------------------------------------------------------------------------------
    @property
    def report(self) -> LoadReport | None:
        return self._report

    @report.setter
    def report(self, report: LoadReport | None) -> None:
        """A fresh /load answer: release admitted prefills, learn characters per token, spot a restart."""
        previous = self._report
        self._report = report
        if report is None:
            return
        if previous is not None and report.cache_query_tokens < previous.cache_query_tokens:
            # Counters went backwards: the worker restarted and its KV cache is empty.
            self.restarts += 1
            self.tree.clear()
            self.joined_at = None  # warm it up again, like a new worker
        elif previous is not None and not self.chars_per_token.measured:
            # No usage seen yet (non-streamed answers without it, streams without include_usage):
            # learn from the prompt tokens the worker looked up while we dispatched these characters.
            self.chars_per_token.observe(self.chars_since_report,
                                         report.cache_query_tokens - previous.cache_query_tokens)
            self.tree.set_chars_per_token(self.chars_per_token.value)
        self.chars_since_report = 0
        self._release_admitted(report.waiting)

    def _release_admitted(self, waiting: int) -> None:
        """Release non-streamed prefills the worker has admitted: all but the newest `waiting`.

        The worker admits in arrival order, so with `waiting` requests queued, at most the newest
        `waiting` of ours are still unadmitted; the rest are prefilled or prefilling (a chunked prefill
        in progress is counted as done: it is already on the worker's GPU, not in its queue).
        Requests sent while this poll was in flight are kept by the same rule only if `waiting` covers
        them, so a just-sent request may be released one poll early; its answer releases it anyway.
        """
        unseen = deque(p for p in self._unseen if not p.done)
        while len(unseen) > max(0, waiting):
            self._release(unseen.popleft())
        self._unseen = unseen

    def describe(self, now: float) -> dict:
        """Admin view (this one does carry the URL: it is only served behind the admin key)."""
        report = self._report
        tree = self.tree
        return {
            "id": self.worker_id,
            "url": self.url,
            "source": self.source,
            "healthy": self.routable(now),
            "circuit": self.breaker.state(now),
            "in_flight": self.in_flight,
            "outstanding_tokens": self.outstanding_tokens,
            "prefilling": self.prefilling,
            "decoding": self.decoding,
            "processed": self.processed,
            "tree_nodes": len(tree),
            "tree_tokens": tree.size_tokens,
            "tree_capacity_tokens": tree.capacity_tokens,
            "estimated_cached_tokens": min(tree.size_tokens, tree.capacity_tokens),
            "tree_reload_share": round(tree.reload_share, 4),  # what its cache evicts and is asked for again
            "chars_per_token": round(self.chars_per_token.value, 3),
            "chars_per_token_measured": self.chars_per_token.measured,
            "restarts": self.restarts,
            "warming_up": self.joined_at is not None and self.joined_at >= 0,  # cache_aware's warm-up window
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
        # A new worker starts from what the fleet has measured (workers of a pool serve one model).
        chars_per_token = self.fleet_chars_per_token()
        tree = PrefixTree(self.default_kv_tokens, self.chunk_chars, chars_per_token)
        worker = WorkerState(url, f"w{next(self._ids)}", tree, self._breaker_factory(), source, chars_per_token)
        self._by_url[url] = worker
        return worker

    def fleet_chars_per_token(self) -> float:
        """Mean measured characters per token of the workers that have a measurement, else the default."""
        measured = [w.chars_per_token.value for w in self._by_url.values() if w.chars_per_token.measured]
        return sum(measured) / len(measured) if measured else self.chars_per_token

    def remove(self, url: str) -> WorkerState | None:
        """Stop routing to a worker. Requests already on it finish; its tree is dropped."""
        worker = self._by_url.pop(normalize_url(url), None)
        if worker is not None:
            worker.removed = True
            worker.tree.clear()
        return worker

    def routable(self, now: float, exclude: Iterable[WorkerState] = ()) -> list[WorkerState]:
        if not exclude:  # the first attempt of every request
            return [w for w in self._by_url.values() if w.routable(now)]
        excluded = set(id(w) for w in exclude)
        return [w for w in self._by_url.values() if w.routable(now) and id(w) not in excluded]
