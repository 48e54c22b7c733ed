"""Tests of the KV page pool and the radix-tree prefix cache (pure Python, no torch).

Unit tests pin down each behaviour the scheduler relies on; a hypothesis state machine then drives the
cache the way a scheduler does (start, chunked-prefill progress, decode, finish, abort, evict, flush, alloc
under pressure) against a naive model: a dict from every cached page-aligned prefix to its page id, with
per-prefix LRU times and lock counts. The model predicts exactly which pages each eviction frees.
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from worker.cache.page_pool import PagePool
from worker.cache.radix_cache import RadixCache


def make_cache(num_pages: int = 16, page_size: int = 4, enabled: bool = True) -> RadixCache:
    return RadixCache(PagePool(num_pages, page_size), enabled=enabled)


def cache_sequence(cache: RadixCache, tokens: list[int]) -> list[int]:
    """Allocate pages for the aligned part of ``tokens``, insert them, return the tree's pages."""
    n = len(tokens) // cache.page_size
    pages = cache.alloc(n)
    assert pages is not None
    result = cache.insert(tokens[: n * cache.page_size], pages)
    return result.pages


# ---------------------------------------------------------------------------------------------- PagePool


def test_pool_hands_out_pages_1_to_n_and_never_the_scratch_page():
    pool = PagePool(5, 4)
    pages = pool.alloc(5)
    assert sorted(pages) == [1, 2, 3, 4, 5]
    assert pool.num_free == 0
    assert pool.alloc(1) is None


def test_pool_alloc_is_all_or_nothing():
    pool = PagePool(3, 2)
    assert pool.alloc(4) is None
    assert pool.num_free == 3
    assert pool.alloc(0) == []


def test_pool_rejects_double_free_foreign_and_scratch_pages_without_changing_state():
    pool = PagePool(4, 2)
    pages = pool.alloc(2)
    pool.free(pages[:1])
    with pytest.raises(AssertionError, match="double free"):
        pool.free(pages)  # pages[0] is already free: nothing of this call may be taken back
    assert pool.num_free == 3
    with pytest.raises(AssertionError, match="twice"):
        pool.free([pages[1], pages[1]])
    with pytest.raises(AssertionError, match="scratch"):
        pool.free([0])
    with pytest.raises(AssertionError, match="not a page"):
        pool.free([5])
    pool.free([pages[1]])
    assert pool.num_free == 4
    pool.check_invariants()


def test_pool_rejects_bad_settings_with_a_message_naming_them():
    with pytest.raises(ValueError, match="page_size"):
        PagePool(4, 0)
    with pytest.raises(ValueError, match="num_pages"):
        PagePool(-1, 4)
    with pytest.raises(ValueError, match="n must be"):
        PagePool(4, 4).alloc(-1)


# ---------------------------------------------------------------------------------------------- matching


def test_match_on_empty_tree_is_empty_at_root():
    cache = make_cache()
    m = cache.match_prefix([1, 2, 3, 4, 5, 6, 7, 8])
    assert m.node is cache.root and m.pages == [] and m.num_tokens == 0
    cache.check_invariants()


@pytest.mark.parametrize("page_size", [1, 4, 16])
def test_insert_then_match_returns_the_inserted_pages(page_size):
    cache = make_cache(num_pages=64, page_size=page_size)
    tokens = list(range(3 * page_size))
    pages = cache_sequence(cache, tokens)
    m = cache.match_prefix(tokens + [999])
    assert m.pages == pages and m.num_tokens == 3 * page_size
    # A query diverging in the second page reuses only the first page.
    other = tokens[:page_size] + [-1] * (2 * page_size)
    m2 = cache.match_prefix(other)
    assert m2.pages == pages[:1] and m2.num_tokens == page_size
    cache.check_invariants()


@pytest.mark.parametrize("page_size", [1, 4, 16])
def test_unaligned_query_tail_is_ignored(page_size):
    cache = make_cache(num_pages=64, page_size=page_size)
    tokens = list(range(2 * page_size))
    pages = cache_sequence(cache, tokens)
    m = cache.match_prefix(tokens[: 2 * page_size - 1])  # the last page is incomplete in the query
    assert m.pages == pages[:1] and m.num_tokens == page_size
    if page_size > 1:
        assert cache.match_prefix(tokens[: page_size - 1]).num_tokens == 0


def test_match_ending_inside_a_node_splits_it_at_the_page_boundary():
    cache = make_cache(page_size=2)
    pages = cache_sequence(cache, [1, 2, 3, 4, 5, 6, 7, 8])
    assert cache.num_nodes == 1
    m = cache.match_prefix([1, 2, 3, 4, 9, 9, 7, 8])
    assert m.pages == pages[:2] and m.num_tokens == 4
    assert cache.num_nodes == 2
    assert m.node.key == (1, 2, 3, 4) and m.node.pages == pages[:2]
    (lower,) = m.node.children.values()
    assert lower.key == (5, 6, 7, 8) and lower.pages == pages[2:]
    # Locking the split node protects exactly the matched pages; the lower half stays evictable.
    cache.lock(m.node)
    assert cache.num_locked_pages == 2 and cache.num_evictable_pages == 2
    cache.check_invariants(locked_nodes=[m.node])
    assert cache.evict(10) == 2
    assert cache.match_prefix([1, 2, 3, 4, 5, 6, 7, 8]).pages == pages[:2]
    cache.unlock(m.node)
    cache.check_invariants()


def test_a_node_held_by_a_caller_still_ends_where_its_prefix_ends_after_a_split():
    cache = make_cache(page_size=1)
    full = cache.insert([1, 2, 3], cache.alloc(3))
    cache.lock(full.node)
    cache.match_prefix([1, 9])  # splits the node holding [1, 2, 3]
    assert cache.num_nodes == 2
    assert full.node.key == (2, 3) and full.node.ref == 1 and full.node.parent.ref == 1
    cache.check_invariants(locked_nodes=[full.node])
    cache.unlock(full.node)
    cache.check_invariants()


def test_match_of_a_long_prompt_through_many_nodes():
    page_size = 16
    cache = make_cache(num_pages=4096, page_size=page_size)
    prompt = [i % 50_000 for i in range(32 * 1024)]
    # Chunked prefill inserts the prompt 512 tokens at a time: one node per chunk.
    pages = cache.alloc(len(prompt) // page_size)
    for end in range(512, len(prompt) + 1, 512):
        result = cache.insert(prompt[:end], pages[: end // page_size])
        assert result.pages == pages[: end // page_size]
    assert cache.num_nodes == len(prompt) // 512
    m = cache.match_prefix(prompt + [1, 2, 3])
    assert m.num_tokens == len(prompt) and m.pages == pages
    cache.check_invariants()


# ---------------------------------------------------------------------------------------------- insertion


def test_insert_frees_the_callers_duplicate_pages_and_returns_the_trees():
    cache = make_cache(num_pages=8, page_size=2)
    tokens = [1, 2, 3, 4, 5, 6]
    first = cache_sequence(cache, tokens[:4])  # another request cached two pages
    mine = cache.alloc(3)
    free_before = cache.pool.num_free
    result = cache.insert(tokens, mine)
    assert result.pages == first + [mine[2]]
    assert result.num_tokens == 6
    assert cache.pool.num_free == free_before + 2  # mine[0], mine[1] went back to the pool
    assert cache.pool.is_free(mine[0]) and cache.pool.is_free(mine[1])
    cache.check_invariants()


def test_insert_keeps_a_page_id_identical_to_the_trees():
    cache = make_cache(num_pages=8, page_size=2)
    m0 = cache.insert([1, 2], cache.alloc(1))
    extra = cache.alloc(1)
    result = cache.insert([1, 2, 3, 4], m0.pages + extra)  # the request reused the tree's first page
    assert result.pages == m0.pages + extra
    assert cache.pool.num_free == 6
    cache.check_invariants()


def test_insert_of_a_prefix_shorter_than_a_node_splits_it_and_returns_its_node():
    cache = make_cache(num_pages=8, page_size=2)
    pages = cache_sequence(cache, [1, 2, 3, 4, 5, 6])
    result = cache.insert([1, 2, 3, 4], pages[:2])
    assert result.node.key == (1, 2, 3, 4) and result.pages == pages[:2]
    cache.check_invariants()


def test_insert_rejects_unaligned_tokens_and_wrong_page_counts():
    cache = make_cache(num_pages=8, page_size=4)
    with pytest.raises(ValueError, match="page-aligned"):
        cache.insert([1, 2, 3], [1])
    with pytest.raises(ValueError, match="one page id per 4 tokens"):
        cache.insert([1, 2, 3, 4], [1, 2])


# ---------------------------------------------------------------------------------------------- locking


def test_unlock_below_zero_and_lock_of_an_evicted_node_are_errors():
    cache = make_cache(page_size=1)
    result = cache.insert([1, 2], cache.alloc(2))
    with pytest.raises(AssertionError, match="below 0"):
        cache.unlock(result.node)
    cache.check_invariants()  # the failed unlock changed nothing
    assert cache.evict(2) == 2
    with pytest.raises(AssertionError, match="no longer in the tree"):
        cache.lock(result.node)


def test_locked_nodes_are_never_evicted():
    cache = make_cache(num_pages=6, page_size=1)
    a = cache.insert([1, 2, 3], cache.alloc(3))
    cache.insert([7, 8], cache.alloc(2))
    cache.lock(a.node)
    assert cache.num_locked_pages == 3 and cache.num_evictable_pages == 2
    assert cache.evict(100) == 2  # only b's pages
    assert cache.match_prefix([1, 2, 3]).pages == a.pages
    assert cache.match_prefix([7, 8]).num_tokens == 0
    assert cache.alloc(5) is None  # one free page + nothing evictable
    cache.check_invariants(locked_nodes=[a.node])
    cache.unlock(a.node)
    assert cache.num_evictable_pages == 3
    assert cache.alloc(4) is not None


def test_lock_counts_nest_and_cover_ancestors():
    cache = make_cache(page_size=1)
    cache.insert([1, 2, 3], cache.alloc(3))
    short = cache.match_prefix([1])
    long = cache.match_prefix([1, 2, 3])
    cache.lock(short.node)
    cache.lock(long.node)
    cache.lock(long.node)
    assert short.node.ref == 3 and long.node.ref == 2
    cache.check_invariants(locked_nodes=[short.node, long.node, long.node])
    with pytest.raises(AssertionError, match="ref"):
        cache.check_invariants(locked_nodes=[short.node, long.node])  # a lock the caller forgot about


# ---------------------------------------------------------------------------------------------- eviction


def test_eviction_takes_least_recently_used_leaves_first():
    cache = make_cache(num_pages=8, page_size=1)
    cache.insert([1], cache.alloc(1))
    cache.insert([2], cache.alloc(1))
    cache.insert([3], cache.alloc(1))
    cache.match_prefix([1])  # 1 is now the most recently used; 2 is the least
    assert cache.evict(1) == 1
    assert cache.match_prefix([2], record=False).num_tokens == 0
    assert cache.evict(1) == 1
    assert cache.match_prefix([3], record=False).num_tokens == 0
    assert cache.match_prefix([1], record=False).num_tokens == 1
    cache.check_invariants()


def test_eviction_frees_a_leaf_tail_first_and_then_its_parent():
    cache = make_cache(num_pages=8, page_size=2)
    pages = cache_sequence(cache, [1, 2, 3, 4, 5, 6])  # one node of three pages
    cache_sequence(cache, [9, 9])
    cache.match_prefix([9, 9])  # [1..6] is LRU
    assert cache.evict(1) == 1  # never more than asked: only the last page of [1..6] goes
    assert cache.pool.is_free(pages[2])
    assert cache.match_prefix([1, 2, 3, 4, 5, 6], record=False).pages == pages[:2]
    cache.check_invariants()
    # The parent of an evicted leaf becomes a leaf and is evicted in its turn.
    cache.insert([1, 2, 3, 4, 7, 7], pages[:2] + cache.alloc(1))
    cache.match_prefix([9, 9])
    assert cache.evict(3) == 3
    assert cache.match_prefix([1, 2], record=False).num_tokens == 0
    assert cache.match_prefix([9, 9], record=False).num_tokens == 2
    cache.check_invariants()


def test_alloc_evicts_when_the_pool_is_short():
    cache = make_cache(num_pages=4, page_size=1)
    cache.insert([1, 2, 3], cache.alloc(3))
    assert cache.pool.num_free == 1
    pages = cache.alloc(3)
    assert pages is not None and len(pages) == 3
    assert cache.num_cached_pages == 1  # two evicted, the rest kept
    assert cache.match_prefix([1, 2, 3], record=False).num_tokens == 1
    cache.check_invariants(private_pages=pages)


def test_alloc_returns_none_and_evicts_nothing_when_eviction_cannot_help():
    cache = make_cache(num_pages=4, page_size=1)
    locked = cache.insert([1, 2], cache.alloc(2))
    cache.lock(locked.node)
    cache.insert([5], cache.alloc(1))
    assert cache.alloc(3) is None  # 1 free + 1 evictable < 3
    assert cache.num_cached_pages == 3 and cache.pool.num_free == 1
    cache.check_invariants(locked_nodes=[locked.node])


def test_repeated_touches_do_not_grow_the_eviction_heap_without_bound():
    cache = make_cache(num_pages=8, page_size=1)
    cache.insert([1, 2], cache.alloc(2))
    for _ in range(1000):
        cache.match_prefix([1, 2])
    assert len(cache._heap) < 100
    cache.check_invariants()
    assert cache.evict(2) == 2


# ---------------------------------------------------------------------------------------------- counters, flush, disabled


def test_hit_and_query_counters():
    cache = make_cache(num_pages=8, page_size=2)
    cache_sequence(cache, [1, 2, 3, 4])
    assert (cache.hit_tokens, cache.query_tokens) == (0, 0)  # insert does not count as a query
    cache.match_prefix([1, 2, 3, 4, 5])
    cache.match_prefix([1, 2, 7])
    assert (cache.hit_tokens, cache.query_tokens) == (6, 8)
    cache.match_prefix([1, 2, 3, 4], record=False)
    assert (cache.hit_tokens, cache.query_tokens) == (6, 8)


def test_reset_drops_every_unlocked_node_and_keeps_locked_paths():
    cache = make_cache(num_pages=8, page_size=1)
    kept = cache.insert([1, 2], cache.alloc(2))
    cache.insert([1, 2, 3, 4], kept.pages + cache.alloc(2))
    cache.insert([7, 7], cache.alloc(2))
    cache.lock(kept.node)
    cache.reset()
    assert cache.num_cached_pages == 2 and cache.pool.num_free == 6
    assert cache.match_prefix([1, 2, 3, 4], record=False).pages == kept.pages
    cache.check_invariants(locked_nodes=[kept.node])
    cache.unlock(kept.node)
    cache.reset()
    assert cache.num_cached_pages == 0 and cache.pool.num_free == 8
    cache.check_invariants()


def test_disabled_cache_matches_nothing_and_insert_frees_the_pages():
    cache = make_cache(num_pages=8, page_size=2, enabled=False)
    pages = cache.alloc(2)
    result = cache.insert([1, 2, 3, 4], pages)
    assert result.node is cache.root and result.pages == [] and result.num_tokens == 0
    assert cache.pool.num_free == 8 and cache.num_cached_pages == 0
    m = cache.match_prefix([1, 2, 3, 4])
    assert m.node is cache.root and m.num_tokens == 0
    assert (cache.hit_tokens, cache.query_tokens) == (0, 4)
    assert cache.alloc(8) is not None and cache.alloc(1) is None
    cache.lock(m.node)
    cache.unlock(m.node)


def test_check_invariants_catches_a_leaked_and_a_doubly_owned_page():
    cache = make_cache(num_pages=4, page_size=1)
    result = cache.insert([1], cache.alloc(1))
    private = cache.alloc(1)
    with pytest.raises(AssertionError, match="leaked"):
        cache.check_invariants()
    with pytest.raises(AssertionError, match="owned twice"):
        cache.check_invariants(private_pages=private + result.pages)
    cache.check_invariants(private_pages=private)


# ---------------------------------------------------------------------------------------------- property-based

# Prompts are built from page-sized blocks so that requests share prefixes often and diverge at page
# boundaries (splitting nodes) as well as inside a page (blocks 0 and 1 differ only in their last token):
# a prefix of one of two base block sequences, a few random blocks, then an unaligned tail.
BASE_BLOCKS = [[0, 2, 1, 3, 0, 2], [2, 2, 0, 1, 3, 1]]
prompt_specs = st.tuples(
    st.integers(0, len(BASE_BLOCKS) - 1),  # base
    st.integers(0, len(BASE_BLOCKS[0])),  # how many base blocks
    st.lists(st.integers(0, 3), max_size=2),  # extra blocks
    st.lists(st.integers(0, 1), max_size=3),  # unaligned tail (cut below a page)
)


def block_tokens(block: int, page_size: int) -> list[int]:
    """One page of tokens; blocks 2k and 2k+1 share all but their last token."""
    if page_size == 1:
        return [block]
    return [block // 2] * (page_size - 1) + [block % 2]


def prompt_tokens(spec, page_size: int) -> list[int]:
    base, cut, extra, tail = spec
    tokens = [t for block in BASE_BLOCKS[base][:cut] + extra for t in block_tokens(block, page_size)]
    tokens += tail[: page_size - 1]
    return tokens or [0]


class Request:
    """What a scheduler keeps per running request: its tokens, page table, and the node it has locked."""

    def __init__(self, tokens: list[int], page_table: list[int], node, cached_pages: int):
        self.tokens = tokens
        self.page_table = page_table  # one page per page_size tokens, ceil(len(tokens) / page_size) pages
        self.node = node  # locked; covers page_table[:cached_pages]
        self.cached_pages = cached_pages

    @property
    def private_pages(self) -> list[int]:
        return self.page_table[self.cached_pages :]


class NaiveCache:
    """Reference model: every cached page-aligned prefix -> its page id, LRU time and lock count."""

    def __init__(self, num_pages: int, page_size: int):
        self.page_size = page_size
        self.pages: dict[tuple[int, ...], int] = {}
        self.last_access: dict[tuple[int, ...], int] = {}
        self.free = set(range(1, num_pages + 1))
        self.clock = 0
        self.hit_tokens = 0
        self.query_tokens = 0

    def prefixes(self, tokens) -> list[tuple[int, ...]]:
        ps = self.page_size
        return [tuple(tokens[: (i + 1) * ps]) for i in range(len(tokens) // ps)]

    def match(self, tokens, record=True) -> list[int]:
        self.clock += 1
        hit = []
        for prefix in self.prefixes(tokens):
            if prefix not in self.pages:
                break
            self.last_access[prefix] = self.clock
            hit.append(self.pages[prefix])
        if record:
            self.query_tokens += len(tokens)
            self.hit_tokens += len(hit) * self.page_size
        return hit

    def insert(self, tokens, pages) -> tuple[list[int], list[int]]:
        """Returns (the cached pages for tokens, the caller's duplicate pages that go back to the pool)."""
        self.clock += 1
        duplicates = []
        for prefix, page in zip(self.prefixes(tokens), pages):
            cached = self.pages.setdefault(prefix, page)
            if cached != page:
                duplicates.append(page)
            self.last_access[prefix] = self.clock
        self.free.update(duplicates)
        return [self.pages[p] for p in self.prefixes(tokens)], duplicates

    def refs(self, requests) -> dict[tuple[int, ...], int]:
        refs: dict[tuple[int, ...], int] = {}
        for req in requests:
            for prefix in self.prefixes(req.tokens[: req.cached_pages * self.page_size]):
                refs[prefix] = refs.get(prefix, 0) + 1
        return refs

    def evictable(self, requests) -> int:
        refs = self.refs(requests)
        return sum(1 for prefix in self.pages if prefix not in refs)

    def evict(self, num_pages, requests) -> set[int]:
        """Evict page by page: the unlocked prefix with no cached extension and the oldest access."""
        refs = self.refs(requests)
        freed = set()
        while len(freed) < num_pages:
            extended = {prefix[: -self.page_size] for prefix in self.pages}
            leaves = [p for p in self.pages if p not in refs and p not in extended]
            if not leaves:
                break
            times = sorted(self.last_access[p] for p in leaves)
            assert len(times) < 2 or times[0] < times[1], "model: two LRU leaves share an access time"
            victim = min(leaves, key=self.last_access.__getitem__)
            freed.add(self.pages.pop(victim))
            del self.last_access[victim]
        self.free |= freed
        return freed

    def alloc_plan(self, n, requests) -> tuple[bool, set[int]]:
        """Can alloc(n) succeed, and which pages does it evict to get there."""
        short = n - len(self.free)
        if short <= 0:
            return True, set()
        if short > self.evictable(requests):
            return False, set()
        return True, self.evict(short, requests)

    def reset(self, requests) -> set[int]:
        refs = self.refs(requests)
        dropped = {prefix for prefix in self.pages if prefix not in refs}
        freed = {self.pages.pop(p) for p in dropped}
        for p in dropped:
            del self.last_access[p]
        self.free |= freed
        return freed


def cached_prefixes(cache: RadixCache) -> dict[tuple[int, ...], int]:
    """The tree's content in the model's terms: every cached page-aligned prefix -> page id."""
    ps = cache.page_size
    out = {}
    stack = [(cache.root, ())]
    while stack:
        node, prefix = stack.pop()
        for i, page in enumerate(node.pages):
            out[prefix + node.key[: (i + 1) * ps]] = page
        full = prefix + node.key
        stack.extend((child, full) for child in node.children.values())
    return out


class RadixCacheMachine(RuleBasedStateMachine):
    """Drives a RadixCache as a scheduler would, against NaiveCache."""

    @initialize(page_size=st.sampled_from([1, 2, 4]), num_pages=st.integers(6, 48))
    def setup(self, page_size, num_pages):
        self.cache = RadixCache(PagePool(num_pages, page_size))
        self.model = NaiveCache(num_pages, page_size)
        self.requests: list[Request] = []
        self.held: list[list[int]] = []  # pages allocated outside any request (pressure)

    # -- helpers

    def pool_free(self) -> set[int]:
        return set(self.cache.pool.free_pages())

    def alloc_checked(self, n: int) -> list[int] | None:
        """cache.alloc(n), checking that exactly the predicted pages were evicted."""
        free_before = self.pool_free()
        ok, evicted = self.model.alloc_plan(n, self.requests)
        pages = self.cache.alloc(n)
        assert (pages is not None) == ok, f"alloc({n}): expected {'success' if ok else 'None'}"
        if pages is None:
            assert self.pool_free() == free_before, "a failed alloc must not evict anything"
            return None
        assert len(pages) == n and len(set(pages)) == n
        assert set(pages) <= self.model.free, "alloc handed out a page the model does not consider free"
        assert (self.pool_free() | set(pages)) - free_before == evicted, "alloc evicted the wrong pages"
        self.model.free -= set(pages)
        if evicted:
            event("alloc evicted cached pages")
        return pages

    def commit_prefix(self, req: Request, num_pages: int) -> None:
        """Insert the first num_pages pages of req, swap to the tree's pages, move the lock."""
        ps = self.cache.page_size
        tokens = req.tokens[: num_pages * ps]
        mine = req.page_table[:num_pages]
        free_before = self.pool_free()
        expected_pages, duplicates = self.model.insert(tokens, mine)
        result = self.cache.insert(tokens, mine)
        assert result.pages == expected_pages and result.num_tokens == len(tokens)
        assert self.pool_free() - free_before == set(duplicates), "insert freed the wrong duplicate pages"
        req.page_table[:num_pages] = result.pages
        if duplicates:
            event("insert freed duplicate pages")
        self.cache.lock(result.node)
        self.cache.unlock(req.node)
        req.node = result.node
        req.cached_pages = num_pages

    def pick(self, index: int) -> Request:
        return self.requests[index % len(self.requests)]

    def release(self, req: Request, free_private: list[int]) -> None:
        self.cache.pool.free(free_private)
        self.model.free.update(free_private)
        self.cache.unlock(req.node)
        self.requests.remove(req)

    # -- what a scheduler does with one request

    def start(self, spec) -> bool:
        """Admit a request: match, lock, allocate private pages for the rest. False: refused, KV is short."""
        ps = self.cache.page_size
        tokens = prompt_tokens(spec, ps)
        nodes_before = self.cache.num_nodes
        m = self.cache.match_prefix(tokens)
        expected = self.model.match(tokens)
        if self.cache.num_nodes > nodes_before:
            event("match split a node")
        assert m.pages == expected and m.num_tokens == len(expected) * ps
        self.cache.lock(m.node)
        need = -(-len(tokens) // ps) - len(m.pages)
        req = Request(list(tokens), list(m.pages), m.node, len(m.pages))
        self.requests.append(req)  # its lock counts while we allocate (the matched pages must survive)
        private = self.alloc_checked(need)
        if private is None:
            event("request refused: no KV even after eviction")
            self.cache.unlock(m.node)
            self.requests.remove(req)
            return False
        req.page_table += private
        return True

    def prefill_progress(self, req: Request, pages_forward: int) -> None:
        """Chunked prefill computed a few more pages: cache them and move the lock down."""
        aligned = len(req.tokens) // self.cache.page_size
        target = min(aligned, req.cached_pages + pages_forward)
        if target > req.cached_pages:
            self.commit_prefix(req, target)

    def decode(self, req: Request, new_tokens: list[int]) -> None:
        """Sampled tokens: allocate pages as the sequence crosses page boundaries; preempt when out of KV."""
        ps = self.cache.page_size
        need = -(-(len(req.tokens) + len(new_tokens)) // ps) - len(req.page_table)
        pages = self.alloc_checked(need)
        if pages is None:  # out of KV: preempt (by recompute), which for the cache is an abort
            event("decode out of KV")
            self.release(req, req.private_pages)
            return
        req.tokens += new_tokens
        req.page_table += pages

    def finish(self, req: Request) -> None:
        """Cache every whole page, free the unaligned tail, unlock."""
        aligned = len(req.tokens) // self.cache.page_size
        if aligned > req.cached_pages:
            self.commit_prefix(req, aligned)
        self.release(req, req.page_table[aligned:])

    def abort(self, req: Request) -> None:
        """Drop the request without caching anything more."""
        self.release(req, req.private_pages)

    # -- rules (few, always enabled and taking arguments, so hypothesis spreads its steps evenly)

    @rule(specs=st.lists(prompt_specs, min_size=1, max_size=3))
    def start_requests(self, specs):
        for spec in specs:
            if not self.start(spec) and self.requests:
                # A full server admits nothing until a running request ends: finish the oldest one, so
                # runs keep turning requests over instead of piling up refusals.
                self.finish(self.requests[0])

    @rule(
        actions=st.lists(
            st.tuples(
                st.integers(0, 50),
                st.sampled_from(["progress", "progress", "decode", "decode", "finish", "finish", "abort"]),
                st.integers(1, 4),
                st.lists(st.integers(0, 3), min_size=1, max_size=5),
            ),
            min_size=1,
            max_size=4,
        )
    )
    def advance_requests(self, actions):
        for index, action, pages_forward, new_tokens in actions:
            if not self.requests:
                return
            req = self.pick(index)
            if action == "progress":
                self.prefill_progress(req, pages_forward)
            elif action == "decode":
                self.decode(req, new_tokens)
            elif action == "finish":
                self.finish(req)
            else:
                self.abort(req)

    @rule(num_pages=st.integers(0, 8))
    def evict(self, num_pages):
        free_before = self.pool_free()
        expected = self.model.evict(num_pages, self.requests)
        freed = self.cache.evict(num_pages)
        assert freed == len(expected) <= num_pages
        if freed:
            event("evict freed pages")
        assert self.pool_free() - free_before == expected, "evict freed other pages than LRU order says"

    @rule(hold=st.booleans(), n=st.integers(1, 6))
    def memory_pressure(self, hold, n):
        """Pages taken outside any request (another consumer of KV), or given back."""
        if hold:
            pages = self.alloc_checked(n)
            if pages is not None:
                self.held.append(pages)
        elif self.held:
            pages = self.held.pop(0)
            self.cache.pool.free(pages)
            self.model.free.update(pages)
            if pages:
                with pytest.raises(AssertionError, match="double free"):
                    self.cache.pool.free(pages[:1])

    @rule(spec=prompt_specs, record=st.booleans())
    def query(self, spec, record):
        tokens = prompt_tokens(spec, self.cache.page_size)
        nodes_before = self.cache.num_nodes
        m = self.cache.match_prefix(tokens, record=record)
        assert m.pages == self.model.match(tokens, record=record)
        if self.cache.num_nodes > nodes_before:
            event("match split a node")
        assert (self.cache.hit_tokens, self.cache.query_tokens) == (self.model.hit_tokens, self.model.query_tokens)

    @rule(dice=st.integers(0, 3))
    def reset(self, dice):
        if dice:  # a flush wipes what the other rules built up: keep it rare
            return
        free_before = self.pool_free()
        expected = self.model.reset(self.requests)
        self.cache.reset()
        assert self.pool_free() - free_before == expected

    # -- after every step

    @invariant()
    def consistent_with_model(self):
        if not hasattr(self, "cache"):
            return
        private = [p for req in self.requests for p in req.private_pages] + [p for h in self.held for p in h]
        self.cache.check_invariants(private_pages=private, locked_nodes=[req.node for req in self.requests])
        assert cached_prefixes(self.cache) == self.model.pages
        assert self.pool_free() == self.model.free
        assert self.cache.num_evictable_pages == self.model.evictable(self.requests)
        for req in self.requests:
            # A request's page table starts with the tree's pages for what it has cached.
            assert req.page_table[: req.cached_pages] == [
                self.model.pages[p] for p in self.model.prefixes(req.tokens[: req.cached_pages * self.cache.page_size])
            ]


RadixCacheMachine.TestCase.settings = settings(
    max_examples=200,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
test_radix_cache_against_naive_model = RadixCacheMachine.TestCase


# ---------------------------------------------------------------------------------------------- read-only match length


def tree_snapshot(cache: RadixCache) -> list[tuple]:
    """Everything a match could change: every node's key, pages, ref and LRU time, plus the counters."""
    nodes = []
    stack = [cache.root]
    while stack:
        node = stack.pop()
        nodes.append((node.key, tuple(node.pages), node.ref, node.last_access))
        stack.extend(node.children.values())
    counters = (cache.num_nodes, cache.num_evictable_pages, cache.num_locked_pages, cache.hit_tokens,
                cache.query_tokens, len(cache._heap))
    return sorted(nodes) + [counters]


@pytest.mark.parametrize("page_size", [1, 2, 4])
def test_match_length_agrees_with_match_prefix(page_size):
    cache = make_cache(num_pages=64, page_size=page_size)
    cache_sequence(cache, list(range(10, 10 + 8 * page_size)))
    cache_sequence(cache, list(range(10, 10 + 3 * page_size)) + [99] * (2 * page_size))
    queries = [
        list(range(10, 10 + 8 * page_size)),  # a whole path
        list(range(10, 10 + 5 * page_size)) + [7] * page_size,  # ends inside a node
        list(range(10, 10 + 3 * page_size)) + [99] * page_size + [1],  # other branch, unaligned tail
        [5] * (3 * page_size),  # nothing cached
        [],
    ]
    for query in queries:
        expected_len = cache.match_length(query)
        assert expected_len == cache.match_prefix(query, record=False).num_tokens, query


def test_match_length_leaves_the_tree_its_lru_order_and_its_counters_unchanged():
    cache = make_cache(num_pages=16, page_size=2)
    old = cache_sequence(cache, [1, 2, 3, 4, 5, 6])
    cache_sequence(cache, [7, 8])  # more recently used than [1..6]
    cache.match_prefix([7, 8, 9])  # some hit / query counts
    before = tree_snapshot(cache)
    assert cache.match_length([1, 2, 3, 4, 0, 0]) == 4  # would split [1..6] and touch it as a match
    assert tree_snapshot(cache) == before
    cache.check_invariants()
    # LRU order unchanged: [1..6] is still the oldest leaf, so it is evicted first (its tail page first).
    assert cache.evict(1) == 1 and cache.pool.is_free(old[2])
    # The same query through match_prefix does change the tree (so the snapshot can tell).
    cache2 = make_cache(num_pages=16, page_size=2)
    cache_sequence(cache2, [1, 2, 3, 4, 5, 6])
    before2 = tree_snapshot(cache2)
    cache2.match_prefix([1, 2, 3, 4, 0, 0], record=False)
    assert tree_snapshot(cache2) != before2


def test_match_length_of_a_disabled_cache_is_zero():
    cache = make_cache(enabled=False)
    assert cache.match_length([1, 2, 3, 4, 5]) == 0
    assert (cache.hit_tokens, cache.query_tokens) == (0, 0)
