"""cache_aware's placement rule (router.placement): cost in prefill tokens, eviction, replicas, warm-up."""

from collections import Counter

import pytest

from router.placement import WarmUp, evicted_tokens, placement_costs, tokens
from router.policies import CacheAware, RouteRequest
from router.tree import chunk_hashes
from router.worker_pool import WorkerPool

DOC = "The quarterly report covers revenue, margins and the outlook for every region. " * 26  # ~2000 chars


def make_pool(n: int, kv_tokens: int) -> WorkerPool:
    pool = WorkerPool(default_kv_tokens=kv_tokens)
    for i in range(n):
        pool.add(f"http://10.0.0.{i + 1}:8000")
    return pool


def route(text: str) -> RouteRequest:
    return RouteRequest(chunk_hashes(text), len(text))


def fill(worker, tag: str) -> None:
    """Fill the worker's tree to capacity with prompts nobody asks for again."""
    i = 0
    while worker.tree.tokens_free() > 0:
        worker.tree.insert(chunk_hashes(f"{tag} filler {i} " * 40))
        i += 1


def send(policy, pool, text: str, finish: bool = True):
    r = route(text)
    d = policy.choose(pool.routable(0.0), r)
    pending = d.worker.on_dispatch(d.worker.uncached_tokens(r.text_chars, d.match_chars), True, r.text_chars)
    policy.dispatched(d, r)
    if finish:
        d.worker.on_first_byte(pending)
        d.worker.on_finish(pending)
    return d


def test_a_cold_prefill_on_the_holder_does_not_outweigh_a_cached_document_under_eviction_pressure():
    pool = make_pool(2, kv_tokens=4096)
    holder, other = list(pool)
    fill(holder, "h")
    fill(other, "o")
    holder.tree.insert(chunk_hashes(DOC))
    holder.on_dispatch(500)  # one cold request in flight there, not yet prefilled
    d = CacheAware().choose(pool.routable(0.0), route(DOC + " What were the margins?"))
    assert d.worker is holder and d.reason == "cache_hit"
    # Without the eviction term the old failure comes back: the copy on `other` looks cheaper.
    d = CacheAware(evict_weight=0).choose(pool.routable(0.0), route(DOC + " What were the margins?"))
    assert d.worker is other and d.reason == "load_over_cache"


def test_a_copy_costs_its_eviction_only_where_the_cache_is_full():
    pool = make_pool(3, kv_tokens=4096)
    holder, empty, full = list(pool)
    fill(full, "f")
    holder.tree.insert(chunk_hashes(DOC))
    holder.outstanding_tokens = 800  # busy enough to be worth a copy, not a copy plus an eviction
    d = CacheAware().choose(pool.routable(0.0), route(DOC + " Outlook?"))
    assert d.worker is empty and d.reason == "load_over_cache"
    r = route(DOC + " Outlook?")
    matches = [w.tree.match_chars(r.hashes) for w in pool]
    costs = placement_costs(list(pool), [0, 0, 0], matches, r.text_chars, 32, 1.0)
    uncached = tokens(r.text_chars, full)  # neither holds any of it
    assert evicted_tokens(full, uncached) > 0 and evicted_tokens(empty, uncached) == 0
    assert costs[2] - costs[1] == pytest.approx(evicted_tokens(full, uncached))


def thrash(worker, tag: str) -> None:
    """Make the worker's tree evict documents that are then asked for again (more documents than its KV)."""
    docs = [chunk_hashes(f"{tag} document {d} " * 120) for d in range(4)]
    for _ in range(3):
        for doc in docs:
            worker.tree.insert(doc)
    assert worker.tree.reload_share > 0.5


def test_a_miss_goes_where_evicting_costs_nothing_not_to_the_thrashing_worker():
    pool = make_pool(2, kv_tokens=1024)
    thrashing, calm = list(pool)
    thrash(thrashing, "t")
    fill(calm, "c")  # as full, but of one-off prompts
    assert calm.tree.reload_share == 0.0
    calm.on_dispatch(0)  # one more request in flight: least loaded is the thrashing worker
    d = CacheAware().choose(pool.routable(0.0), route("A new document nobody holds. " * 70))
    assert d.worker is calm and d.reason == "cache_miss"
    # ...until the calm worker's queue is worth more than the re-used prefixes the copy would evict.
    calm.outstanding_tokens = 2000
    d = CacheAware().choose(pool.routable(0.0), route("A new document nobody holds. " * 70))
    assert d.worker is thrashing


def test_a_popular_document_keeps_one_home_while_its_holder_keeps_up():
    pool = make_pool(4, kv_tokens=4096)
    for i, w in enumerate(pool):
        fill(w, str(i))
    policy = CacheAware()
    homes = Counter(send(policy, pool, DOC + f" question {q}").worker.worker_id for q in range(50))
    assert len(homes) == 1, f"one copy is enough at this load: {homes}"


def test_a_hot_prefix_is_replicated_as_its_load_grows():
    pool = make_pool(4, kv_tokens=1_000_000)
    policy = CacheAware()
    holders = []
    for q in range(64):  # 64 requests in flight at once: one worker cannot take them all
        send(policy, pool, DOC + f" question {q}", finish=False)
        holders.append(sum(1 for w in pool if w.tree.match_chars(chunk_hashes(DOC)) > 0))
    assert holders[0] == 1 and holders[-1] == 4
    assert holders == sorted(holders), "copies are only added"
    assert max(w.in_flight for w in pool) <= 1.25 * 64 / 4


def test_a_worker_that_joins_under_load_is_warmed_at_once_and_to_its_share():
    pool = make_pool(3, kv_tokens=1_000_000)
    policy = CacheAware()
    docs = [DOC + f" appendix {i}" * 20 for i in range(6)]
    for q in range(60):
        d = send(policy, pool, docs[q % 6] + f" q{q}", finish=False)
        assert d.reason != "warm", "the workers present from the start need no warm-up"
        if q >= 12:  # keep ~12 in flight
            oldest = min(pool, key=lambda w: -w.in_flight)
            oldest.on_finish()
            oldest.outstanding_tokens = 0
    new = pool.add("http://10.0.0.9:8000")
    got = []
    for q in range(40):
        d = send(policy, pool, docs[q % 6] + f" r{q}")
        got.append(d.worker is new)
    assert got[0], "the new worker gets traffic at once"
    assert sum(got) >= 0.5 * 40 / 4, f"at least half its fair share: {sum(got)} of 40"


def test_warm_up_stops_at_its_share_and_after_its_window():
    pool = make_pool(2, kv_tokens=1_000_000)
    a, b = list(pool)
    warm = WarmUp(share=0.5, window_per_worker=4)
    assert warm.tick(list(pool)) is None  # first decision: everyone starts cold together
    c = pool.add("http://10.0.0.9:8000")
    workers = list(pool)
    assert warm.tick(workers) is c
    assert c.describe(0.0)["warming_up"] and not a.describe(0.0)["warming_up"]
    c.processed += 1  # it got one request: 0.5 * 2 / 3 is covered
    assert warm.tick(workers) is None
    for _ in range(20):
        warm.tick(workers)
    assert c.joined_at == -1 and not c.describe(0.0)["warming_up"], "after the window it is an ordinary worker"


def test_warm_up_does_not_move_requests_off_an_idle_worker():
    pool = make_pool(2, kv_tokens=1_000_000)
    policy = CacheAware()
    send(policy, pool, DOC + " first")
    new = pool.add("http://10.0.0.9:8000")
    d = send(policy, pool, DOC + " second")  # its holder is idle: no reason to move it
    assert d.worker is not new and d.reason == "cache_hit"
    for w in pool:
        if w is not new:
            w.on_dispatch(0)
            w.on_dispatch(0)
    d = send(policy, pool, DOC + " third")
    assert d.worker is new and d.reason == "warm"


def test_negative_evict_weight_is_refused():
    with pytest.raises(ValueError, match="evict_weight"):
        CacheAware(evict_weight=-1)
