"""Routing policies: pure objects that pick a worker for a request. No I/O; time and randomness injected.

Every policy gets the routable workers (healthy, not excluded by a retry) and a `RouteRequest`, and
returns a `Decision` naming the worker and the reason (exported as a metric label). When the proxy
sends the request on, it calls `dispatched(decision, request)`: a policy that keeps state about what
each worker holds (cache_aware's prefix trees) records it there, so the code that reads a worker's
tree is the code that writes it.

cache_aware, the default, in order:
1. A session pin wins unless its worker is not routable or above the high watermark.
2. Load imbalance (max - min in-flight > balance_abs AND max > balance_rel * min; entered at those
   thresholds and left only below half of them: hysteresis) -> least loaded (longest match breaks ties).
3. Best predicted match ratio below cache_threshold -> a cache miss: the worker with the least queue
   plus re-used prefixes the copy would evict there (its tree's reload share: a worker whose evictions
   come back is thrashing; router/placement.py miss_costs), ties broken by load and then the fewest
   requests ever sent, so misses never herd onto one worker.
4. Otherwise the request goes to the worker where it costs least: the queue it joins, plus the
   prompt tokens it must prefill there, plus the cached tokens a new copy would evict there
   (router/placement.py has the arithmetic and why). A worker holding a shared system prompt wins
   only while the prefill it saves is worth more than its extra queue, and equally good matches go to
   the least loaded. This is the failure SGLang-router users report (one worker holding the shared
   system prompt takes all traffic until a 64-request gap opens), avoided; and under eviction
   pressure a copy elsewhere is made only when the holder's queue is worth the copy and what it evicts.
5. Warm-up: a worker that joined (or restarted) under traffic and is still short of its share takes
   the requests whose chosen worker is busier than the mean ("warm"; router/placement.py WarmUp).

Reasons (the `reason` label of radixfleet_router_routing_decisions_total): session, imbalance,
cache_miss, cache_hit (the longest match won), load_over_cache (a shorter match won on cost: a new
copy of a hot prefix), warm, only_worker.
"""

from __future__ import annotations

import random as _random
from dataclasses import dataclass
from typing import Sequence

import xxhash

from router.placement import DEFAULT_EVICT_WEIGHT, WarmUp, miss_costs, placement_costs
from router.sessions import SessionTable
from router.worker_pool import WorkerState

# SGLang router defaults: a starting point, changed only where measurement says so.
DEFAULT_CACHE_THRESHOLD = 0.3
DEFAULT_BALANCE_ABS = 64
DEFAULT_BALANCE_REL = 1.5
# What one in-flight request costs a newcomer, in prefill-token equivalents (see module docstring).
# In a continuous-batching worker a running decode slows a newcomer a little, a pending prefill a
# lot; pending prefill is counted separately (outstanding_tokens), so this stays well below a
# prompt's size. It is also what keeps requests spread when pending prefill is near zero (fast
# GPU prefill: on the H200 sim profile a 400-token prefill takes 8 ms of a 90 ms request), so
# it must outweigh a copy of a shared system prompt once a worker is a few requests busier.
# At 32, a new conversation followed its system prompt's holder until that holder was 12-24
# requests busier (the copy's prefill, doubled by the eviction term once the trees are full of
# finished conversations), and multi-turn chat over 8 system prompts ended at busiest/mean
# 1.05-1.13 on 4 sim workers. At 96: 1.02 in the sim bench's run beside the peers, <= 1.05 in the
# deterministic chat loop of tests/test_placement_balance.py; doc-QA under eviction pressure, where
# each copy evicts a live document, kept its hit rate above sglang-router's (77.7% against 76.9%),
# and the hot prompt stayed spread (1.06). With the sim workers in one process (equal speed), chat
# gave 1.03 and 1.05 at 96 against 1.09 and 1.28 at 32; with a process per worker on the shared
# 2-core box, 1.02-1.12 either way: the speed of the worker processes decides there
# (bench/reports/placement_sim/README.md).
DEFAULT_REQUEST_COST_TOKENS = 96


@dataclass(slots=True)
class RouteRequest:
    """What a policy sees of a request."""

    hashes: list[int]  # chunk-prefix names of the routing text (router.tree.chunk_hashes)
    text_chars: int
    session_key: str | None = None
    chars_per_token: float = 4.0  # the configured default; placement uses each worker's measured figure


@dataclass(slots=True)
class Decision:
    worker: WorkerState
    reason: str
    match_chars: int = 0  # predicted cached prefix on the chosen worker
    match_ratio: float = 0.0


class NoWorkerAvailable(Exception):
    """No routable worker: every worker is unhealthy, removed, or already tried."""


def _least_loaded(workers: Sequence[WorkerState], rotation: int = 0) -> WorkerState:
    """Lowest load; ties go to the worker sent the fewest requests, then rotate (no fixed favourite)."""
    n = len(workers)
    best = None
    best_key = None
    for i, w in enumerate(workers):
        key = (w.load, w.outstanding_tokens, w.processed, (i - rotation) % n)
        if best_key is None or key < best_key:
            best, best_key = w, key
    assert best is not None
    return best


class Policy:
    """Base class. `uses_tree`: whether the router must keep per-worker prefix trees for it."""

    name = "policy"
    uses_tree = False

    def choose(self, workers: Sequence[WorkerState], request: RouteRequest) -> Decision:
        raise NotImplementedError

    def dispatched(self, decision: Decision, request: RouteRequest) -> None:
        """The request was sent to `decision.worker` (once per attempt: a retry is a new decision)."""

    def forget_worker(self, worker: WorkerState) -> None:
        """A worker left the pool."""


class RoundRobin(Policy):
    name = "round_robin"

    def __init__(self) -> None:
        self._next = 0

    def choose(self, workers, request):
        if not workers:
            raise NoWorkerAvailable
        # Order by id, not by list position, so membership changes do not reshuffle the cycle.
        ordered = sorted(workers, key=lambda w: (len(w.worker_id), w.worker_id))
        worker = ordered[self._next % len(ordered)]
        self._next += 1
        return Decision(worker, "round_robin")


class Random(Policy):
    name = "random"

    def __init__(self, rng: _random.Random | None = None) -> None:
        self._rng = rng or _random.Random()

    def choose(self, workers, request):
        if not workers:
            raise NoWorkerAvailable
        return Decision(workers[self._rng.randrange(len(workers))], "random")


class PowerOfTwo(Policy):
    """Sample two workers, take the less loaded (load from /load, or this router's count if higher)."""

    name = "power_of_two"

    def __init__(self, rng: _random.Random | None = None) -> None:
        self._rng = rng or _random.Random()

    def choose(self, workers, request):
        if not workers:
            raise NoWorkerAvailable
        if len(workers) == 1:
            return Decision(workers[0], "only_worker")
        a, b = self._rng.sample(range(len(workers)), 2)
        wa, wb = workers[a], workers[b]
        return Decision(wa if (wa.load, wa.processed) <= (wb.load, wb.processed) else wb, "power_of_two")


class LeastLoad(Policy):
    name = "least_load"

    def __init__(self) -> None:
        self._rotation = 0

    def choose(self, workers, request):
        if not workers:
            raise NoWorkerAvailable
        self._rotation += 1
        return Decision(_least_loaded(workers, self._rotation), "least_load")


class Watermarks:
    """The balance test shared by the policies, with hysteresis.

    Imbalanced when max - min > abs AND max > rel * min. Once imbalanced, stays so until the gap
    falls to abs/2 or the ratio to 1 + (rel - 1)/2, so routing does not flap at the boundary.
    """

    def __init__(self, balance_abs: int = DEFAULT_BALANCE_ABS, balance_rel: float = DEFAULT_BALANCE_REL) -> None:
        if balance_abs < 0 or balance_rel < 1.0:
            raise ValueError("balance_abs must be >= 0 and balance_rel >= 1.0")
        self.balance_abs = balance_abs
        self.balance_rel = balance_rel
        self.low_abs = balance_abs / 2
        self.low_rel = 1.0 + (balance_rel - 1.0) / 2
        self.imbalanced = False

    @staticmethod
    def over(load: float, min_load: float, abs_gap: float, rel: float) -> bool:
        return load - min_load > abs_gap and load > rel * min_load

    def update(self, workers: Sequence[WorkerState]) -> bool:
        loads = [w.load for w in workers]
        return self.update_range(min(loads), max(loads))

    def update_range(self, lo: float, hi: float) -> bool:
        """Same as update(), given the least and greatest load (the hot path has them already)."""
        if self.imbalanced:
            self.imbalanced = self.over(hi, lo, self.low_abs, self.low_rel)
        else:
            self.imbalanced = self.over(hi, lo, self.balance_abs, self.balance_rel)
        return self.imbalanced


class SessionAffinity(Policy):
    """Rendezvous (highest random weight) hashing of the session key over worker urls.

    Stable across router restarts and replicas (depends only on key and urls); when a worker leaves,
    only its sessions move; when one joins, only the sessions it now wins move. A worker that is not
    routable or above the high watermark is skipped for the next-highest. No key: least loaded.
    """

    name = "session"

    def __init__(self, balance_abs: int = DEFAULT_BALANCE_ABS, balance_rel: float = DEFAULT_BALANCE_REL) -> None:
        self.watermarks = Watermarks(balance_abs, balance_rel)
        self._rotation = 0

    @staticmethod
    def weight(session_key: str, url: str) -> int:
        return xxhash.xxh3_64_intdigest(url.encode(), xxhash.xxh3_64_intdigest(session_key.encode()))

    def choose(self, workers, request):
        if not workers:
            raise NoWorkerAvailable
        key = request.session_key
        if not key:
            self._rotation += 1
            return Decision(_least_loaded(workers, self._rotation), "no_session_key")
        ranked = sorted(workers, key=lambda w: self.weight(key, w.url), reverse=True)
        min_load = min(w.load for w in workers)
        marks = self.watermarks
        for worker in ranked:
            if not marks.over(worker.load, min_load, marks.balance_abs, marks.balance_rel):
                return Decision(worker, "session")
        return Decision(ranked[0], "session")


class CacheAware(Policy):
    """Longest predicted prefix match, weighed against load. See the module docstring."""

    name = "cache_aware"
    uses_tree = True

    def __init__(
        self,
        cache_threshold: float = DEFAULT_CACHE_THRESHOLD,
        balance_abs: int = DEFAULT_BALANCE_ABS,
        balance_rel: float = DEFAULT_BALANCE_REL,
        request_cost_tokens: float = DEFAULT_REQUEST_COST_TOKENS,
        sessions: SessionTable | None = None,
        evict_weight: float = DEFAULT_EVICT_WEIGHT,
        warm_up: WarmUp | None = None,
    ) -> None:
        if not 0.0 <= cache_threshold <= 1.0:
            raise ValueError(f"cache_threshold must be in [0, 1], got {cache_threshold}")
        if request_cost_tokens < 0:
            raise ValueError("request_cost_tokens must be >= 0")
        self.cache_threshold = cache_threshold
        if evict_weight < 0:
            raise ValueError("evict_weight must be >= 0")
        self.request_cost_tokens = request_cost_tokens
        self.evict_weight = evict_weight
        self.warm_up = warm_up if warm_up is not None else WarmUp()
        self.watermarks = Watermarks(balance_abs, balance_rel)
        self.sessions = sessions
        self._rotation = 0

    def forget_worker(self, worker):
        if self.sessions is not None:
            self.sessions.unpin_worker(worker.url)

    def dispatched(self, decision, request):
        # The worker will hold this prompt once it has prefilled it: record it now, at dispatch, so the
        # next request sharing the prefix is routed here even before this one finishes.
        decision.worker.tree.insert(request.hashes)

    def choose(self, workers, request):
        if not workers:
            raise NoWorkerAvailable
        self._rotation += 1
        coldest = self.warm_up.tick(workers)
        loads = [w.load for w in workers]  # read once: `load` is a property
        min_load = min(loads)
        imbalanced = self.watermarks.update_range(min_load, max(loads))
        marks = self.watermarks

        sessions = self.sessions
        key = request.session_key
        chosen = None
        if sessions is not None and key:
            pinned_url = sessions.get(key)
            if pinned_url is not None:
                for i, w in enumerate(workers):
                    if w.url == pinned_url:
                        if not marks.over(loads[i], min_load, marks.balance_abs, marks.balance_rel):
                            chosen = (w, "session", w.tree.match_chars(request.hashes))
                        break
        if chosen is None:
            chosen = self._choose_by_cache_and_load(workers, loads, min_load, request, imbalanced)
            if coldest is not None and chosen[0] is not coldest:
                chosen = self._warm(workers, loads, coldest, chosen, request)
        worker, reason, match_chars = chosen
        if sessions is not None and key:
            sessions.pin(key, worker.url)  # a new pin, or the old one's expiry refreshed
        return Decision(worker, reason, match_chars, min(1.0, match_chars / max(request.text_chars, 1)))

    @staticmethod
    def _warm(workers, loads, coldest, chosen, request) -> tuple[WorkerState, str, int]:
        """Move the request to the worker warming up if its chosen worker is at least as busy as the mean."""
        i = workers.index(chosen[0])
        if loads[i] * len(loads) < sum(loads) or not loads[i]:
            return chosen
        return coldest, "warm", coldest.tree.match_chars(request.hashes)

    def _choose_by_cache_and_load(self, workers, loads, min_load, request,
                                  imbalanced) -> tuple[WorkerState, str, int]:
        """(worker, reason, predicted match in characters) by the rules 2-4 of the module docstring."""
        hashes = request.hashes
        n = len(workers)
        if hashes:  # PrefixTree.match_chars, one call per worker instead of two
            matches = [w.tree.match_chunks(hashes) * w.tree.chunk_chars for w in workers]
        else:
            matches = [0] * n
        if n == 1:
            return workers[0], "only_worker", matches[0]
        rotation = self._rotation
        if imbalanced:
            best_i = min(
                (i for i in range(n) if loads[i] == min_load),
                key=lambda i: (-matches[i], workers[i].outstanding_tokens, workers[i].processed, (i - rotation) % n),
            )
            return workers[best_i], "imbalance", matches[best_i]

        best_match = max(matches)
        costs = placement_costs(workers, loads, matches, request.text_chars, self.request_cost_tokens,
                                self.evict_weight)
        if best_match / max(request.text_chars, 1) < self.cache_threshold:
            # A miss: the least queue plus re-used prefixes evicted (router/placement.py miss_costs), then
            # the least loaded, the one where a partial match saves most, the fewest sent.
            missed = miss_costs(workers, loads, request.text_chars, self.request_cost_tokens, self.evict_weight)
            best_i = min(range(n), key=lambda i: (missed[i], loads[i], costs[i], workers[i].processed,
                                                  (i - rotation) % n))
            return workers[best_i], "cache_miss", matches[best_i]
        # The least (cost, load, processed, rotation) in order; the tail is built only on a tie of cost.
        best_i = 0
        best_cost = costs[0]
        for i in range(1, n):
            cost = costs[i]
            if cost < best_cost or (cost == best_cost and (loads[i], workers[i].processed, (i - rotation) % n)
                                    < (loads[best_i], workers[best_i].processed, (best_i - rotation) % n)):
                best_i, best_cost = i, cost
        chars = matches[best_i]
        return workers[best_i], ("cache_hit" if chars == best_match else "load_over_cache"), chars


POLICY_NAMES = ("cache_aware", "round_robin", "random", "power_of_two", "least_load", "session")


def make_policy(name: str, *, cache_threshold: float = DEFAULT_CACHE_THRESHOLD,
                balance_abs: int = DEFAULT_BALANCE_ABS, balance_rel: float = DEFAULT_BALANCE_REL,
                request_cost_tokens: float = DEFAULT_REQUEST_COST_TOKENS,
                sessions: SessionTable | None = None, rng: _random.Random | None = None) -> Policy:
    """Build a policy by name (the --policy values)."""
    if name == "cache_aware":
        return CacheAware(cache_threshold, balance_abs, balance_rel, request_cost_tokens, sessions)
    if name == "round_robin":
        return RoundRobin()
    if name == "random":
        return Random(rng)
    if name == "power_of_two":
        return PowerOfTwo(rng)
    if name == "least_load":
        return LeastLoad()
    if name == "session":
        return SessionAffinity(balance_abs, balance_rel)
    raise ValueError(f"unknown policy {name!r}: choose one of {', '.join(POLICY_NAMES)}")

