"""KV memory of the scheduler's sequences: the only code that hands a sequence pages or takes them back.

A sequence's page table (`Sequence.pages`) has two parts. Its first `num_tree_tokens // page_size` pages
belong to the radix tree, shared with other requests and kept alive by the lock the sequence holds on
`tree_node`; the rest are private to it. The scheduler decides *who* gets memory (admission reserve,
preemption); this module does the page work: matching a cached prefix, growing a page table, giving a
computed prefix to the tree, releasing everything, and counting and checking what is held.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Iterable

from worker.cache.radix_cache import RadixCache

if TYPE_CHECKING:
    from worker.engine.sequence import Sequence


class KVManager:
    def __init__(self, cache: RadixCache):
        self.cache = cache
        self.page_size = cache.page_size

    # ------------------------------------------------------------------ sizes
    def pages_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.page_size)

    @property
    def total_tokens(self) -> int:
        """Tokens of KV the whole pool holds."""
        return self.cache.pool.num_pages * self.page_size

    def outgrows_pool(self, num_tokens: int) -> bool:
        """Whether `num_tokens` tokens need more pages than the whole pool has."""
        return self.pages_for(num_tokens) > self.cache.pool.num_pages

    def available_pages(self) -> int:
        """Pages an allocation can get now: free ones plus cached ones nobody holds (evictable)."""
        return self.cache.pool.num_free + self.cache.num_evictable_pages

    # ------------------------------------------------------------------ a sequence's pages
    @staticmethod
    def matchable_tokens(seq: "Sequence") -> list[int]:
        # The last token is always recomputed: its logits are needed to sample the next token.
        return seq.token_ids()[:-1]

    def cached_prefix_length(self, seq: "Sequence") -> int:
        """Tokens of `seq` the cache holds now. Read-only: for ordering, it changes no LRU time or node."""
        return self.cache.match_length(self.matchable_tokens(seq))

    def attach_cached_prefix(self, seq: "Sequence", record: bool) -> int:
        """Start `seq` (which holds nothing) from its longest cached prefix, locked; returns its length.

        `record`: count the lookup in the cache's hit / query counters (first admission only).
        """
        match = self.cache.match_prefix(self.matchable_tokens(seq), record=record)
        self.cache.lock(match.node)  # before any allocation, which could otherwise evict it
        seq.tree_node = match.node
        seq.pages = list(match.pages)
        seq.num_computed = seq.num_tree_tokens = match.num_tokens
        return match.num_tokens

    def detach_cached_prefix(self, seq: "Sequence") -> None:
        """Undo `attach_cached_prefix` for a sequence that was not admitted after all (no private pages)."""
        self.cache.unlock(seq.tree_node)
        seq.tree_node, seq.pages, seq.num_computed, seq.num_tree_tokens = None, [], 0, 0

    def grow(self, seq: "Sequence", num_tokens: int) -> bool:
        """Give `seq` pages for its first `num_tokens` tokens (evicting unheld cache if needed).

        False, and nothing allocated, when there is not enough memory even after eviction.
        """
        needed = self.pages_for(num_tokens) - len(seq.pages)
        if needed <= 0:
            return True
        pages = self.cache.alloc(needed)
        if pages is None:
            return False
        seq.pages.extend(pages)
        return True

    def cache_computed_prefix(self, seq: "Sequence") -> None:
        """Give the page-aligned computed prefix of `seq` to the radix tree and lock it there instead."""
        ps = self.page_size
        aligned = (seq.num_computed // ps) * ps
        if aligned <= seq.num_tree_tokens or not self.cache.enabled:
            return
        num_pages = aligned // ps
        result = self.cache.insert(seq.token_ids()[:aligned], seq.pages[:num_pages])
        # insert() freed any of our pages the tree already had under other ids; use the tree's
        seq.pages[:num_pages] = result.pages
        self.cache.lock(result.node)
        if seq.tree_node is not None:
            self.cache.unlock(seq.tree_node)
        seq.tree_node = result.node
        seq.num_tree_tokens = aligned

    def release(self, seq: "Sequence") -> None:
        """Cache what `seq` computed and free everything else it held."""
        if seq.tree_node is not None or seq.pages:
            self.cache_computed_prefix(seq)
            private = self._private(seq)
            if private:
                self.cache.pool.free(private)
            if seq.tree_node is not None:
                self.cache.unlock(seq.tree_node)
        seq.pages, seq.tree_node, seq.num_computed, seq.num_tree_tokens = [], None, 0, 0

    def _private(self, seq: "Sequence") -> list[int]:
        return seq.pages[seq.num_tree_tokens // self.page_size :]

    # ------------------------------------------------------------------ accounting and checks
    def private_pages(self, running: Iterable["Sequence"]) -> list[int]:
        return [p for s in running for p in self._private(s)]

    @staticmethod
    def locked_nodes(running: Iterable["Sequence"]) -> list[object]:
        return [s.tree_node for s in running if s.tree_node is not None]

    def kv_tokens_in_use(self, running: Iterable["Sequence"]) -> int:
        """Tokens of KV that cannot be reclaimed now: locked tree pages plus private pages. O(running)."""
        private = sum(len(s.pages) - s.num_tree_tokens // self.page_size for s in running)
        return (self.cache.num_locked_pages + private) * self.page_size

    def check_invariants(self, running: list["Sequence"], waiting: Iterable["Sequence"]) -> None:
        """No leaked, double-owned or wrongly-referenced page, and no waiting sequence holding KV."""
        self.cache.check_invariants(private_pages=self.private_pages(running), locked_nodes=self.locked_nodes(running))
        for seq in waiting:
            assert not seq.pages and seq.tree_node is None, f"waiting sequence {seq.seq_id} holds KV"
        for seq in running:
            assert len(seq.pages) * self.page_size >= seq.num_computed, f"{seq.seq_id} lacks pages"
