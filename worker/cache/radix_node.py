"""The radix tree's building blocks: a node, a match result, and the LRU heap of evictable leaves.

`worker.cache.radix_cache` explains the tree's shape and uses these; nothing here touches the page pool.
"""

from __future__ import annotations

import heapq
import itertools
from dataclasses import dataclass


class TreeNode:
    """One edge of the radix tree: a run of whole pages of tokens. See worker.cache.radix_cache."""

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


def is_evictable_leaf(node: TreeNode, last_access: int) -> bool:
    """Whether a heap entry ``(last_access, node)`` still stands for an evictable leaf."""
    return node.parent is not None and not node.children and node.ref == 0 and node.last_access == last_access


class EvictionHeap:
    """Unreferenced leaves, least recently used first, with lazy deletion.

    An entry is ``(last_access, seq, node)`` and is honoured only if the node is still in the tree, still a
    leaf, still unreferenced and still carries that ``last_access``; the tree pushes a fresh entry whenever a
    node becomes an evictable leaf, and stale ones are skipped when popped.
    """

    def __init__(self) -> None:
        self._entries: list[tuple[int, int, TreeNode]] = []
        self._seq = itertools.count()

    def __len__(self) -> int:
        return len(self._entries)

    def push(self, node: TreeNode, num_nodes: int) -> None:
        heapq.heappush(self._entries, (node.last_access, next(self._seq), node))
        # Touching an evictable leaf over and over leaves stale entries behind; rebuild when they dominate,
        # so the heap stays O(num_nodes), amortised.
        if len(self._entries) > 2 * num_nodes + 64:
            self._entries = [entry for entry in self._entries if is_evictable_leaf(entry[2], entry[0])]
            heapq.heapify(self._entries)

    def pop_evictable(self) -> TreeNode | None:
        """The least recently used evictable leaf (removed from the heap), or None when there is none."""
        while self._entries:
            last_access, _, node = heapq.heappop(self._entries)
            if is_evictable_leaf(node, last_access):
                return node
        return None

    def clear(self) -> None:
        self._entries = []

    def entries(self) -> set[tuple[int, int]]:
        """``(id(node), last_access)`` of every entry, for invariant checks."""
        return {(id(entry[2]), entry[0]) for entry in self._entries}
