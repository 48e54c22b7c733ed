"""Radix-tree prefix cache over token ids, sharing KV pages between requests.

The tree itself (node shape, splits, locks) is worker.cache.radix_tree; this module adds the page pool.

Eviction takes unreferenced leaves, least recently used first, from a lazy-deletion heap
(``worker.cache.radix_node.EvictionHeap``): whenever a node becomes an evictable leaf (new leaf, unlock to 0,
child evicted, touched), a fresh entry is pushed. When only part of a leaf is needed, the leaf is split and
only its tail is evicted, so ``evict(n)`` never frees more than ``n`` pages.

Complexity (``L`` = query tokens, ``P`` = page_size, ``d`` = nodes on the matched path, ``N`` = nodes)
------------------------------------------------------------------------------------------------------
* ``match_length``: as ``match_prefix`` without touching or splitting anything (read-only).
* ``match_prefix``: O(L) token comparisons, all done in C on tuple slices (one dict lookup hashing ``P``
  tokens per node, one slice comparison per node); the node where the match ends is binary-searched,
  O(log(len(node) / P)) slice comparisons. Plus O(d) to touch the path and concatenate page lists.
* ``insert``: as ``match_prefix``, plus O(pages) to compare the caller's page ids with the tree's.
* ``lock`` / ``unlock``: O(depth).
* ``evict(n)``: O((k + s) log H) for k evicted nodes and s stale heap entries skipped (H = heap size; the
  heap is rebuilt when it grows past twice the node count, so H stays O(N), amortised).
* ``num_evictable_pages``, ``num_locked_pages``, ``num_cached_pages``: O(1) counters.
* ``reset``: O(N). ``check_invariants``: O(N + num_pages), for tests.
"""

from __future__ import annotations

from typing import Iterable, Sequence

from worker.cache.page_pool import PagePool
from worker.cache.radix_invariants import check_radix_invariants
from worker.cache.radix_node import MatchResult, TreeNode
from worker.cache.radix_tree import RadixTree

__all__ = ["MatchResult", "RadixCache", "TreeNode"]


class RadixCache(RadixTree):
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
        super().__init__(pool.page_size)
        self.pool = pool
        self.enabled = enabled
        self.hit_tokens = 0
        self.query_tokens = 0

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

    def match_length(self, token_ids: Sequence[int]) -> int:
        """Tokens of ``token_ids`` that ``match_prefix`` would find cached, without changing anything.

        A read-only query for ordering decisions (the ``lpm`` policy): no node is split, no LRU time is
        touched, the hit / query counters stay as they are.
        """
        if not self.enabled:
            return 0
        return self._match_length(self._aligned_tuple(token_ids))

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
        while freed < num_pages:
            node = self._heap.pop_evictable()
            if node is None:
                break
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
        self._heap.clear()

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
        """Raise ``AssertionError`` unless the cache and its pool are consistent; see
        worker.cache.radix_invariants (``private_pages``: pages requests hold outside the tree;
        ``locked_nodes``: one entry per outstanding ``lock``)."""
        check_radix_invariants(self, self.pool, self.enabled, private_pages, locked_nodes)
