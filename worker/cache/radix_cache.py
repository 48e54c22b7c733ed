"""Radix-tree prefix cache over token ids, sharing KV pages between requests.

Shape
-----
A compressed radix tree. Every non-root node holds

* ``key``: a tuple of token ids whose length is a positive multiple of ``page_size``;
* ``pages``: one KV page id per ``page_size`` tokens of ``key`` (``len(pages) * page_size == len(key)``);
* ``children``: a dict from the tuple of a child's first ``page_size`` tokens to the child;
* ``ref``: the number of live locks on this node or on any node below it (so a node with ``ref == 0`` has a
  whole subtree with ``ref == 0``, and a node with ``ref > 0`` is never evicted);
* ``last_access``: a logical clock (one tick per match / insert), so LRU order is deterministic.

Only whole pages are ever cached: an unaligned tail of a sequence stays private to its request. Nodes are
split only at page boundaries, so page ids always stay aligned with their tokens.

Eviction takes unreferenced leaves, least recently used first, from a heap with lazy deletion: an entry is
``(last_access, seq, node)`` and is honoured only if the node is still in the tree, still a leaf, still
unreferenced and still carries that ``last_access``. Whenever a node becomes an evictable leaf (new leaf,
unlock to 0, child evicted, touched), a fresh entry is pushed. When only part of a leaf is needed, the leaf
is split and only its tail is evicted, so ``evict(n)`` never frees more than ``n`` pages.

Complexity (``L`` = query tokens, ``P`` = page_size, ``d`` = nodes on the matched path, ``N`` = nodes)
------------------------------------------------------------------------------------------------------
* ``match_prefix``: O(L) token comparisons, all done in C on tuple slices (one dict lookup hashing ``P``
  tokens per node, one slice comparison per node); only the node where the match ends is scanned page by
  page, O(len(node) / P) Python steps. Plus O(d) to touch the path and concatenate page lists.
* ``insert``: as ``match_prefix``, plus O(pages) to compare the caller's page ids with the tree's.
* ``lock`` / ``unlock``: O(depth).
* ``evict(n)``: O((k + s) log H) for k evicted nodes and s stale heap entries skipped (H = heap size; the
  heap is rebuilt when it grows past twice the node count, so H stays O(N), amortised).
* ``num_evictable_pages``, ``num_locked_pages``, ``num_cached_pages``: O(1) counters.
* ``reset``: O(N). ``check_invariants``: O(N + num_pages), for tests.
"""

from __future__ import annotations

import heapq
import itertools
from dataclasses import dataclass
from typing import Iterable, Sequence

from worker.cache.page_pool import PagePool


class TreeNode:
    """One edge of the radix tree: a run of whole pages of tokens. See the module docstring."""

    __slots__ = ("key", "pages", "children", "parent", "ref", "last_access")

    def __init__(self, key: tuple[int, ...], pages: list[int], parent: "TreeNode | None", last_access: int):
        self.key = key
        self.pages = pages
        self.children: dict[tuple[int, ...], TreeNode] = {}
        self.parent = parent
        self.ref = 0
        self.last_access = last_access

    @property
    def is_leaf(self) -> bool:
        return not self.children

    def __repr__(self) -> str:
        head = self.key[:8]
        more = "..." if len(self.key) > 8 else ""
        return f"TreeNode(key={head}{more} len={len(self.key)}, pages={self.pages[:8]}, ref={self.ref})"


@dataclass
class MatchResult:
    """A cached prefix: the node where it ends, its page ids, and its length in tokens."""

    node: TreeNode
    pages: list[int]
    num_tokens: int  # == len(pages) * page_size


class RadixCache:
    """Prefix cache of whole KV pages keyed by token ids, with reference counts and LRU eviction.

    Typical use by a scheduler::

        m = cache.match_prefix(prompt)        # reuse m.pages for the first m.num_tokens tokens
        cache.lock(m.node)                    # lock BEFORE alloc, or alloc may evict what was matched
        private = cache.alloc(pages_needed)   # None: not enough KV even after eviction
        ...
        r = cache.insert(tokens[:aligned], page_table[: aligned // page_size])  # progress or finish
        page_table[: len(r.pages)] = r.pages  # duplicates were freed; use the tree's pages
        cache.lock(r.node); cache.unlock(m.node)
    """

    def __init__(self, pool: PagePool, enabled: bool = True):
        self.pool = pool
        self.page_size = pool.page_size
        self.enabled = enabled
        self.root = TreeNode((), [], None, 0)
        self.hit_tokens = 0
        self.query_tokens = 0
        self._clock = 0
        self._num_evictable = 0  # pages in non-root nodes with ref == 0
        self._num_locked = 0  # pages in non-root nodes with ref > 0
        self._num_nodes = 0  # non-root nodes
        self._heap: list[tuple[int, int, TreeNode]] = []
        self._seq = itertools.count()

    # ------------------------------------------------------------------ counters

    @property
    def num_evictable_pages(self) -> int:
        """Pages held only by the cache (ref 0): ``alloc`` can reclaim all of them."""
        return self._num_evictable

    @property
    def num_locked_pages(self) -> int:
        """Cached pages some live request depends on (ref > 0)."""
        return self._num_locked

    @property
    def num_cached_pages(self) -> int:
        return self._num_evictable + self._num_locked

    @property
    def num_nodes(self) -> int:
        """Nodes in the tree, root excluded."""
        return self._num_nodes

    # ------------------------------------------------------------------ matching

    def match_prefix(self, token_ids: Sequence[int], record: bool = True) -> MatchResult:
        """Longest page-aligned prefix of ``token_ids`` in the tree. Touches it (LRU); does not lock it.

        A match ending inside a node splits that node, so the returned node covers exactly the match.
        ``record=True`` adds ``len(token_ids)`` to ``query_tokens`` and the match to ``hit_tokens``.
        """
        if not self.enabled:
            if record:
                self.query_tokens += len(token_ids)
            return MatchResult(self.root, [], 0)
        node, pages = self._walk(self._aligned_tuple(token_ids))
        num_tokens = len(pages) * self.page_size
        if record:
            self.query_tokens += len(token_ids)
            self.hit_tokens += num_tokens
        return MatchResult(node, pages, num_tokens)

    def _aligned_tuple(self, token_ids: Sequence[int]) -> tuple[int, ...]:
        aligned = len(token_ids) - len(token_ids) % self.page_size
        return tuple(token_ids[:aligned])

    def _walk(self, tokens: tuple[int, ...]) -> tuple[TreeNode, list[int]]:
        """Follow ``tokens`` (page-aligned) down the tree, splitting where the match ends mid-node.

        Returns the deepest matched node and the concatenated pages of the path; touches the path.
        """
        self._clock += 1
        now = self._clock
        ps = self.page_size
        node = self.root
        pages: list[int] = []
        pos = 0
        end = len(tokens)
        while pos < end:
            child = node.children.get(tokens[pos : pos + ps])
            if child is None:
                break
            key = child.key
            klen = len(key)
            if tokens[pos : pos + klen] == key:  # whole node matches: one C-level comparison
                matched = klen
            else:
                # The first page is known to match (it was the dict key); find the first differing page.
                matched = ps
                limit = min(klen, end - pos)
                while matched < limit and key[matched : matched + ps] == tokens[pos + matched : pos + matched + ps]:
                    matched += ps
                if matched < klen:
                    child = self._split(child, matched // ps)
            self._touch(child, now)
            pages.extend(child.pages)
            pos += matched
            node = child
            if matched < klen:
                break
        return node, pages

    def _touch(self, node: TreeNode, now: int) -> None:
        node.last_access = now
        if node.ref == 0 and not node.children:
            self._push(node)

    def _split(self, node: TreeNode, num_pages: int) -> TreeNode:
        """Cut ``node`` after ``num_pages`` pages; return the new upper node. ``node`` keeps the lower part.

        The original object stays the lower part on purpose: a caller holding it still holds the node that
        ends where its prefix ends. The new upper node inherits ``ref`` (the same locks lie below it) and
        ``last_access``; counters are unchanged because no page changes its ref class.
        """
        assert 0 < num_pages < len(node.pages), f"_split: cannot cut {len(node.pages)} pages at {num_pages}"
        cut = num_pages * self.page_size
        parent = node.parent
        upper = TreeNode(node.key[:cut], node.pages[:num_pages], parent, node.last_access)
        upper.ref = node.ref
        node.key = node.key[cut:]
        node.pages = node.pages[num_pages:]
        node.parent = upper
        upper.children[node.key[: self.page_size]] = node
        parent.children[upper.key[: self.page_size]] = upper  # replaces node under the same first page
        self._num_nodes += 1
        return upper

    # ------------------------------------------------------------------ locking

    def lock(self, node: TreeNode) -> None:
        """+1 ref on ``node`` and every ancestor: none of them can be evicted until unlocked."""
        assert node is self.root or node.parent is not None, f"lock: {node!r} is no longer in the tree (evicted)"
        while node is not None:
            if node.ref == 0 and node is not self.root:
                self._num_evictable -= len(node.pages)
                self._num_locked += len(node.pages)
            node.ref += 1
            node = node.parent

    def unlock(self, node: TreeNode) -> None:
        """-1 ref on ``node`` and every ancestor; a node whose ref drops to 0 becomes evictable again."""
        assert node is self.root or node.parent is not None, f"unlock: {node!r} is not in the tree"
        # Check the whole path first so a bad unlock raises without changing anything.
        probe: TreeNode | None = node
        while probe is not None:
            assert probe.ref > 0, f"unlock: ref of {probe!r} would drop below 0 (unlock without lock?)"
            probe = probe.parent
        while node is not None:
            node.ref -= 1
            if node.ref == 0 and node is not self.root:
                self._num_locked -= len(node.pages)
                self._num_evictable += len(node.pages)
                if not node.children:
                    self._push(node)
            node = node.parent

    # ------------------------------------------------------------------ insertion

    def insert(self, token_ids: Sequence[int], pages: list[int]) -> MatchResult:
        """Cache ``pages`` as the KV of ``token_ids`` (page-aligned); return the tree's node and pages for it.

        Where the tree already holds a page position under another page id, the caller's duplicate page is
        freed and the tree's id is returned in its place (the caller must swap to the returned pages). The
        inserted path is touched (LRU) but not locked. With the cache disabled, all ``pages`` are freed and
        an empty match at the root is returned: a scheduler running without the cache must not insert
        chunked-prefill progress (it would free pages the request still uses), only finished sequences.
        """
        ps = self.page_size
        if len(token_ids) % ps:
            raise ValueError(
                f"RadixCache.insert: token_ids must be page-aligned (a multiple of page_size={ps}), "
                f"got {len(token_ids)} tokens; insert only the whole pages and keep the tail private"
            )
        if len(pages) != len(token_ids) // ps:
            raise ValueError(
                f"RadixCache.insert: need one page id per {ps} tokens: {len(token_ids)} tokens take "
                f"{len(token_ids) // ps} pages, got {len(pages)}"
            )
        if not self.enabled:
            self.pool.free(pages)
            return MatchResult(self.root, [], 0)
        tokens = tuple(token_ids)
        node, tree_pages = self._walk(tokens)
        matched_pages = len(tree_pages)
        duplicates = [mine for mine, theirs in zip(pages, tree_pages) if mine != theirs]
        if matched_pages < len(pages):
            leaf = TreeNode(tokens[matched_pages * ps :], list(pages[matched_pages:]), node, self._clock)
            node.children[leaf.key[:ps]] = leaf
            self._num_nodes += 1
            self._num_evictable += len(leaf.pages)
            self._push(leaf)
            tree_pages.extend(leaf.pages)
            node = leaf
        if duplicates:
            self.pool.free(duplicates)
        return MatchResult(node, tree_pages, len(tree_pages) * ps)

    # ------------------------------------------------------------------ allocation and eviction

    def alloc(self, n: int) -> list[int] | None:
        """``n`` free pages, evicting LRU unreferenced leaves first if the pool is short.

        Returns ``None`` without evicting anything when even evicting every unreferenced page cannot help.
        """
        if not isinstance(n, int) or n < 0:
            raise ValueError(f"RadixCache.alloc: n must be a non-negative int, got {n!r}")
        short = n - self.pool.num_free
        if short > 0:
            if short > self._num_evictable:
                return None
            self.evict(short)
        return self.pool.alloc(n)

    def evict(self, num_pages: int) -> int:
        """Free up to ``num_pages`` pages from unreferenced leaves, least recently used first.

        Splits the last leaf when only part of it is needed. Returns how many pages were freed.
        """
        freed = 0
        ps = self.page_size
        while freed < num_pages and self._heap:
            last_access, _, node = heapq.heappop(self._heap)
            if not self._is_evictable_leaf(node, last_access):
                continue  # a stale entry (lazy deletion)
            need = num_pages - freed
            if len(node.pages) > need:
                # Keep the head as a new leaf (same last_access; it is pushed as the parent below) and
                # evict only the tail.
                self._split(node, len(node.pages) - need)
            parent = node.parent
            del parent.children[node.key[:ps]]
            node.parent = None
            self._num_nodes -= 1
            self._num_evictable -= len(node.pages)
            freed += len(node.pages)
            self.pool.free(node.pages)
            if parent is not self.root and parent.ref == 0 and not parent.children:
                self._push(parent)
        return freed

    def _is_evictable_leaf(self, node: TreeNode, last_access: int) -> bool:
        return (
            node.parent is not None
            and not node.children
            and node.ref == 0
            and node.last_access == last_access
        )

    def _push(self, node: TreeNode) -> None:
        heapq.heappush(self._heap, (node.last_access, next(self._seq), node))
        # Touching an evictable leaf over and over leaves stale entries behind; rebuild when they dominate.
        if len(self._heap) > 2 * self._num_nodes + 64:
            self._heap = [entry for entry in self._heap if self._is_evictable_leaf(entry[2], entry[0])]
            heapq.heapify(self._heap)

    def reset(self) -> None:
        """Flush: drop (and free the pages of) every unreferenced node. Locked paths stay.

        The hit/query counters are monotonic and are not reset.
        """
        stack = [self.root]
        while stack:
            node = stack.pop()
            for first, child in list(node.children.items()):
                if child.ref == 0:
                    del node.children[first]
                    self._drop_subtree(child)
                else:
                    stack.append(child)
        # Every node left has ref > 0, so no heap entry can be valid.
        self._heap = []

    def _drop_subtree(self, top: TreeNode) -> None:
        stack = [top]
        while stack:
            node = stack.pop()
            stack.extend(node.children.values())
            node.children = {}
            node.parent = None
            self._num_nodes -= 1
            self._num_evictable -= len(node.pages)
            self.pool.free(node.pages)

    # ------------------------------------------------------------------ checks

    def check_invariants(
        self, private_pages: Iterable[int] = (), locked_nodes: Iterable[TreeNode] = ()
    ) -> None:
        """Raise ``AssertionError`` with a precise message unless the cache and its pool are consistent.

        ``private_pages``: pages live requests hold outside the tree (their unaligned tails, uncached parts).
        ``locked_nodes``: one entry per outstanding ``lock`` (a node may appear several times).
        """
        ps = self.page_size
        pool = self.pool
        pool.check_invariants()
        owner: dict[int, str] = {}

        def claim(page: int, who: str) -> None:
            assert isinstance(page, int) and 1 <= page <= pool.num_pages, (
                f"page {page!r} ({who}) is not a page of the pool (1..{pool.num_pages})"
            )
            assert page not in owner, f"page {page} is owned twice: by {owner[page]} and by {who}"
            owner[page] = who

        for page in pool.free_pages():
            claim(page, "the free list")
        for page in private_pages:
            claim(page, "a request (private)")

        root = self.root
        assert root.parent is None and root.key == () and root.pages == [], "root must be empty and parentless"
        expected_ref: dict[int, int] = {}
        for node in locked_nodes:
            assert node is root or node.parent is not None, f"locked node {node!r} is not in the tree"
            expected_ref[id(node)] = expected_ref.get(id(node), 0) + 1

        heap_entries = {(id(entry[2]), entry[0]) for entry in self._heap}
        evictable = locked = num_nodes = 0
        # Post-order walk to sum refs of subtrees.
        order: list[TreeNode] = []
        stack = [root]
        while stack:
            node = stack.pop()
            order.append(node)
            for first, child in node.children.items():
                assert child.parent is node, f"{child!r} has a wrong parent pointer"
                assert first == child.key[:ps], f"{child!r} is filed under {first}, not under its first page"
                stack.append(child)
        live_ids = {id(node) for node in order}
        for node_id in expected_ref:
            assert node_id in live_ids, "a locked node is unreachable from the root"
        subtree_locks: dict[int, int] = {}
        for node in reversed(order):  # children before parents
            total = expected_ref.get(id(node), 0) + sum(subtree_locks[id(c)] for c in node.children.values())
            subtree_locks[id(node)] = total
            assert node.ref == total, f"{node!r} has ref {node.ref} but {total} lock(s) in its subtree"
            if node is root:
                continue
            num_nodes += 1
            assert node.key and len(node.key) % ps == 0, f"{node!r}: key length not a positive multiple of {ps}"
            assert len(node.pages) * ps == len(node.key), f"{node!r}: {len(node.pages)} pages for {len(node.key)} tokens"
            assert node.last_access <= self._clock, f"{node!r}: last_access in the future"
            for page in node.pages:
                claim(page, f"tree node {node!r}")
            if node.ref == 0:
                evictable += len(node.pages)
                if not node.children:
                    assert (id(node), node.last_access) in heap_entries, (
                        f"evictable leaf {node!r} has no eviction-heap entry: it could never be evicted"
                    )
            else:
                locked += len(node.pages)

        assert num_nodes == self._num_nodes, f"node counter {self._num_nodes} != {num_nodes} nodes in the tree"
        assert evictable == self._num_evictable, f"evictable counter {self._num_evictable} != {evictable} pages"
        assert locked == self._num_locked, f"locked counter {self._num_locked} != {locked} pages"
        num_private = len(owner) - pool.num_free - evictable - locked
        missing = [p for p in range(1, pool.num_pages + 1) if p not in owner]
        assert not missing, f"{len(missing)} page(s) leaked (owned by nobody): {missing[:10]}"
        assert pool.num_free + evictable + locked + num_private == pool.num_pages, (
            f"free {pool.num_free} + evictable {evictable} + locked {locked} + private {num_private} "
            f"!= {pool.num_pages} pages"
        )
        assert self.enabled or not root.children, "a disabled cache must hold nothing"
