"""cache_aware's placement arithmetic: what sending a request to each worker costs, in prefill tokens.

Pure functions and one small pure object, no I/O; `router.policies.CacheAware` calls them.

The cost of sending a request to worker i, in the time it takes to prefill one token (prefill time is
close to linear in uncached tokens on one kind of worker, so tokens are the unit of time here):

    cost_i = queue_i + uncached_i + evict_weight * evicted_i

* `queue_i`: the work already ahead of it there: uncached prompt tokens dispatched and not yet
  prefilled (`outstanding_tokens`) plus `request_cost_tokens` per request in flight (a running decode
  slows a newcomer's prefill a little, see DEFAULT_REQUEST_COST_TOKENS).
* `uncached_i`: the prompt tokens worker i must compute, i.e. the prompt less its predicted cached
  prefix there. A cached prefix is thus worth exactly the prefill time it saves, against the queue.
* `evicted_i`: the cached tokens a new copy pushes out of worker i's KV cache (what its tree holds
  plus the uncached part, beyond its capacity from /load). Those are the prefixes other requests
  would have hit: losing them costs about their own prefill again later. Without this term, a busy
  holder sends a popular document to another worker, which evicts one of its own documents for it,
  and under eviction pressure every worker's cache churns (issue 11: 37% hit rate against 55-57% for
  routers that give every document one home).

A miss (no worker holds enough of the prompt) costs every worker the whole prefill, so what tells them
apart is the queue and what the new copy pushes out (`miss_costs`). Every full tree "evicts" the copy's
size, but most of what a worker evicts may be one-off tails (a question asked once) that cost nothing to
lose; the tree's `reload_share` says how much of what it evicts is wanted again. So a miss costs
`queue_i + evict_weight * reload_share_i * prompt_tokens`. Without it, misses follow the least loaded
worker, which under skewed popularity is the one holding the many cold documents: it evicts one of them
for every new one, sends it back to itself on the next miss, and thrashes while other workers' caches
hold only tails (issue 11, doc-QA on 4 sim workers: 81.2% -> 81.8% hit rate, mean of 3 repeats).
Copies of a held prefix keep the plainer eviction term above: priced by reload share, copies were cheap on
workers that evict only tails and doc-QA fell to 75% (every copy kept alive by traffic squeezes the
worker's own documents).

Replication follows from the same sum: a hot prefix gets a second copy only when its holder's queue
exceeds the copy's prefill and what it evicts, a third when both holders are that busy, and so on,
so a prefix is held by as many workers as its load needs and no more.

Warm-up (`WarmUp`): a worker that joins (or restarts) while traffic runs holds nothing, so every
request matches elsewhere and no cost rule ever picks it; SGLang-router and the others leave it idle
until a gap opens. Here, until it has received `WARM_SHARE` of its fair share since it joined, a
request whose best worker is busier than the fleet's mean moves to it instead: the prefixes of the
busiest holders move first, and once it holds them, the ordinary rule keeps sending them there
(equal match, lower load).
"""

from __future__ import annotations

from typing import Sequence

from router.worker_pool import WorkerState

# What one token a new copy evicts costs, against one token of prefill now. 1.0: the evicted prefix
# is worth one future prefill of itself. 0 gives back the rule without the eviction term.
DEFAULT_EVICT_WEIGHT = 1.0
# A newly joined worker is fed until it has had this fraction of its fair share since joining...
WARM_SHARE = 0.75
# ...for at most this many decisions per worker in the pool after it joined; later the ordinary rule
# alone decides (a worker that is slow to take traffic then is slow, not cold).
WARM_DECISIONS_PER_WORKER = 64


def tokens(chars: float, worker: WorkerState) -> float:
    """Characters of routing text as that worker's prompt tokens."""
    return chars * worker.tree.tokens_per_chunk / worker.tree.chunk_chars


def evicted_tokens(worker: WorkerState, uncached_tokens: float) -> float:
    """Cached tokens that a new copy of `uncached_tokens` pushes out of the worker's KV cache."""
    return max(0.0, uncached_tokens - worker.tree.tokens_free())


def placement_costs(workers: Sequence[WorkerState], loads: Sequence[int], matches: Sequence[int],
                    text_chars: int, request_cost_tokens: float, evict_weight: float) -> list[float]:
    """cost_i of the module docstring for every worker, in prefill tokens (lower is better).

    On the hot path (every request, every worker): `tokens` and `evicted_tokens` are inlined, the
    tree's free tokens too (`PrefixTree.tokens_free`'s expression, without the call).
    """
    costs = []
    append = costs.append
    for w, load, match in zip(workers, loads, matches):
        tree = w.tree
        per_chunk = tree.tokens_per_chunk
        uncached = (text_chars - match) * per_chunk / tree.chunk_chars
        if uncached < 0:
            uncached = 0.0
        cost = w.outstanding_tokens + request_cost_tokens * load + uncached
        if evict_weight:
            over = uncached - (tree.capacity_tokens - len(tree._nodes) * per_chunk)
            if over > 0:
                cost += evict_weight * over
        append(cost)
    return costs


def miss_costs(workers: Sequence[WorkerState], loads: Sequence[int], prompt_chars: int,
               request_cost_tokens: float, evict_weight: float) -> list[float]:
    """A cache miss's cost on every worker, in prefill tokens: queue plus the re-used prefixes it evicts."""
    return [w.outstanding_tokens + request_cost_tokens * load + evict_weight * w.tree.reload_share * tokens(prompt_chars, w)
            for w, load in zip(workers, loads)]


class WarmUp:
    """Which workers joined while traffic ran and are still short of their share (pure bookkeeping).

    `decisions` counts the policy's decisions; a worker is registered the first time the policy sees
    it (`WorkerState.joined_at` is None: new, or reset by a restart seen in /load).
    """

    __slots__ = ("decisions", "share", "window_per_worker")

    def __init__(self, share: float = WARM_SHARE, window_per_worker: int = WARM_DECISIONS_PER_WORKER) -> None:
        if not 0.0 <= share <= 1.0 or window_per_worker < 0:
            raise ValueError("warm share must be in [0, 1] and the window >= 0")
        self.decisions = 0
        self.share = share
        self.window_per_worker = window_per_worker

    def tick(self, workers: Sequence[WorkerState]) -> WorkerState | None:
        """Count one decision; return the routable worker most short of its warm-up share, if any."""
        self.decisions += 1
        now = self.decisions
        n = len(workers)
        coldest = None
        worst = 0.0
        for w in workers:
            joined = w.joined_at
            if joined is None:
                # Seen for the first time. A worker present from the first decision needs no warm-up:
                # it starts as cold as every other.
                w.joined_at = joined = now - 1 if now > 1 else -1
                w.processed_at_join = w.processed
            if joined < 0:
                continue
            since = now - joined
            if since > self.window_per_worker * n:
                w.joined_at = -1  # warm-up over: stop looking at it
                continue
            deficit = self.share * since / n - (w.processed - w.processed_at_join)
            if deficit > worst:
                coldest, worst = w, deficit
        return coldest
