"""Consistency check of a radix cache and its page pool (tests call it after every scenario)."""

from __future__ import annotations

from typing import Iterable

from worker.cache.page_pool import PagePool
from worker.cache.radix_node import TreeNode
from worker.cache.radix_tree import RadixTree


def check_radix_invariants(
    cache: RadixTree,
    pool: PagePool,
    enabled: bool,
    private_pages: Iterable[int] = (),
    locked_nodes: Iterable[TreeNode] = (),
) -> None:
    """Raise ``AssertionError`` with a precise message unless the tree and its pool are consistent.

    ``enabled``: whether the cache is on (a disabled cache must hold nothing).

    ``private_pages``: pages live requests hold outside the tree (their unaligned tails, uncached parts).
    ``locked_nodes``: one entry per outstanding ``lock`` (a node may appear several times).
    """
    ps = cache.page_size
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

    root = cache.root
    assert root.parent is None and root.key == () and root.pages == [], "root must be empty and parentless"
    expected_ref: dict[int, int] = {}
    for node in locked_nodes:
        assert node is root or node.parent is not None, f"locked node {node!r} is not in the tree"
        expected_ref[id(node)] = expected_ref.get(id(node), 0) + 1

    heap_entries = cache._heap.entries()
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
        assert node.last_access <= cache._clock, f"{node!r}: last_access in the future"
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

    assert num_nodes == cache.num_nodes, f"node counter {cache.num_nodes} != {num_nodes} nodes in the tree"
    assert evictable == cache.num_evictable_pages, (
        f"evictable counter {cache.num_evictable_pages} != {evictable} pages"
    )
    assert locked == cache.num_locked_pages, f"locked counter {cache.num_locked_pages} != {locked} pages"
    num_private = len(owner) - pool.num_free - evictable - locked
    missing = [p for p in range(1, pool.num_pages + 1) if p not in owner]
    assert not missing, f"{len(missing)} page(s) leaked (owned by nobody): {missing[:10]}"
    assert pool.num_free + evictable + locked + num_private == pool.num_pages, (
        f"free {pool.num_free} + evictable {evictable} + locked {locked} + private {num_private} "
        f"!= {pool.num_pages} pages"
    )
    assert enabled or not root.children, "a disabled cache must hold nothing"
