"""The KV manager: a sequence's pages from the pool and the radix cache, and back, with nothing leaked."""

from __future__ import annotations

import pytest

from test_scheduler import make_seq
from worker.cache.kv_manager import KVManager
from worker.cache.page_pool import PagePool
from worker.cache.radix_cache import RadixCache
from worker.engine.sequence import Sequence


def make_kv(num_pages=16, page_size=4, enabled=True) -> KVManager:
    return KVManager(RadixCache(PagePool(num_pages, page_size), enabled=enabled))


def computed(kv: KVManager, prompt: list[int], rid: str = "r") -> Sequence:
    """A running sequence whose whole prompt was computed into private pages."""
    seq = make_seq(rid, prompt)
    kv.attach_cached_prefix(seq, record=True)
    assert kv.grow(seq, len(prompt))
    seq.num_computed = len(prompt)
    return seq


def test_grow_allocates_whole_pages_and_fails_without_allocating_when_the_pool_is_short():
    kv = make_kv(num_pages=4, page_size=4)
    seq = make_seq("a", list(range(9)))
    assert kv.grow(seq, 9) and len(seq.pages) == 3
    assert kv.grow(seq, 12) and len(seq.pages) == 3  # still fits the third page
    other = make_seq("b", list(range(20)))
    assert not kv.grow(other, 8) and other.pages == []
    assert kv.available_pages() == 1
    assert kv.total_tokens == 16
    assert kv.outgrows_pool(17) and not kv.outgrows_pool(16)
    kv.check_invariants([seq], [other])


def test_a_released_prompt_is_cached_and_reused_by_the_next_sequence():
    kv = make_kv(page_size=4)
    prompt = list(range(10, 20))  # 10 tokens: 2 whole pages cached, the 3rd page stays private
    first = computed(kv, prompt, "first")
    assert kv.kv_tokens_in_use([first]) == 12
    kv.release(first)
    assert first.pages == [] and first.tree_node is None
    assert kv.kv_tokens_in_use([]) == 0 and kv.cache.num_evictable_pages == 2
    kv.check_invariants([], [first])

    second = make_seq("second", prompt + [1, 2])
    assert kv.cached_prefix_length(second) == 8  # read-only look first
    assert kv.attach_cached_prefix(second, record=True) == 8
    assert second.num_computed == second.num_tree_tokens == 8 and len(second.pages) == 2
    assert kv.cache.num_locked_pages == 2 and kv.kv_tokens_in_use([second]) == 8
    kv.check_invariants([second], [])
    kv.detach_cached_prefix(second)  # not admitted after all
    assert kv.cache.num_locked_pages == 0 and second.pages == []
    kv.check_invariants([], [second])


def test_caching_a_computed_prefix_swaps_duplicate_pages_for_the_trees():
    kv = make_kv(page_size=4)
    prompt = list(range(30, 38))
    a = computed(kv, prompt, "a")
    kv.cache_computed_prefix(a)  # a's 2 pages now belong to the tree, locked by a
    b = make_seq("b", prompt + [9])
    assert kv.grow(b, 9)  # b computed the same prompt into its own pages (it started before a cached it)
    b.num_computed = 8
    mine = list(b.pages[:2])
    kv.cache_computed_prefix(b)
    assert b.pages[:2] == a.pages[:2] and all(kv.cache.pool.is_free(p) for p in mine)
    assert b.num_tree_tokens == 8
    kv.check_invariants([a, b], [])
    for seq in (a, b):
        kv.release(seq)
    kv.check_invariants([], [a, b])
    assert kv.kv_tokens_in_use([]) == 0


def test_without_the_cache_release_frees_every_page():
    kv = make_kv(num_pages=8, page_size=4, enabled=False)
    seq = computed(kv, list(range(12)))
    kv.cache_computed_prefix(seq)
    assert seq.num_tree_tokens == 0  # nothing goes to a disabled cache
    kv.release(seq)
    assert kv.cache.pool.num_free == 8
    kv.check_invariants([], [seq])


def test_invariant_check_catches_a_waiting_sequence_that_holds_pages():
    kv = make_kv()
    seq = computed(kv, list(range(6)))
    kv.check_invariants([seq], [])
    with pytest.raises(AssertionError, match="waiting sequence .* holds KV"):
        kv.check_invariants([seq], [seq])  # counted as running for the pages, but it also waits
