"""The radix tree's structure: nodes, matching walks, splits, locks and the eviction-heap bookkeeping.

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

``RadixTree`` keeps this structure and its counters consistent; it never touches the page pool. The cache
API over it (matching with hit counters, insertion, allocation, eviction) is worker.cache.radix_cache.
"""

from __future__ import annotations

from typing import Iterator, Sequence

from worker.cache.radix_node import EvictionHeap, TreeNode


class RadixTree:
    """A compressed radix tree of whole pages with reference counts and LRU times. See the module docstring."""

    def __init__(self, page_size: int):
        self.page_size = page_size
        self.root = TreeNode((), [], None, 0)
        self._clock = 0
        self._num_evictable = 0  # pages in non-root nodes with ref == 0
        self._num_locked = 0  # pages in non-root nodes with ref > 0
        self._num_nodes = 0  # non-root nodes
        self._heap = EvictionHeap()

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

    # ------------------------------------------------------------------ walking

    def _match_length(self, tokens: tuple[int, ...]) -> int:
        """Length of the longest match of ``tokens`` (page-aligned) in the tree; reads, never writes."""
        return sum(matched for _, matched in self._descend(tokens))

    def _descend(self, tokens: tuple[int, ...]) -> Iterator[tuple[TreeNode, int]]:
        """``(node, tokens of its key matched)`` along the path ``tokens`` (page-aligned) follows from the
        root; the last one may be a partial match. Changes nothing (a caller may split the last node)."""
        ps = self.page_size
        node = self.root
        pos = 0
        while pos < len(tokens):
            child = node.children.get(tokens[pos : pos + ps])
            if child is None:
                return
            matched = self._matched_in(child, tokens, pos)
            partial = matched < len(child.key)  # decided before the caller may split `child`
            yield child, matched
            if partial:
                return
            pos += matched
            node = child

    def _matched_in(self, child: TreeNode, tokens: tuple[int, ...], pos: int) -> int:
        """Tokens of ``child``'s key that ``tokens[pos:]`` matches, in whole pages (at least its first page,
        which is how ``child`` was found)."""
        key = child.key
        klen = len(key)
        if tokens[pos : pos + klen] == key:  # whole node matches: one C-level comparison
            return klen
        # Prefix equality is monotone in its length: binary-search the number of matching pages, each probe
        # one C-level slice comparison (a long node is not walked page by page in Python).
        ps = self.page_size
        lo, hi = 1, min(klen, len(tokens) - pos) // ps  # pages known to match, most pages that can
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if key[: mid * ps] == tokens[pos : pos + mid * ps]:
                lo = mid
            else:
                hi = mid - 1
        return lo * ps

    def _aligned_tuple(self, token_ids: Sequence[int]) -> tuple[int, ...]:
        aligned = len(token_ids) - len(token_ids) % self.page_size
        return tuple(token_ids[:aligned])

    def _walk(self, tokens: tuple[int, ...]) -> tuple[TreeNode, list[int]]:
        """Follow ``tokens`` (page-aligned) down the tree, splitting where the match ends mid-node.

        Returns the deepest matched node and the concatenated pages of the path; touches the path.
        """
        self._clock += 1
        now = self._clock
        node = self.root
        pages: list[int] = []
        for child, matched in self._descend(tokens):
            if matched < len(child.key):
                child = self._split(child, matched // self.page_size)
            self._touch(child, now)
            pages.extend(child.pages)
            node = child
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

    def _push(self, node: TreeNode) -> None:
        self._heap.push(node, self._num_nodes)
