"""The paged KV pool's bookkeeping: which page ids are free.

The KV tensors themselves live in the executor, shaped ``[num_pages + 1, page_size, ...]``; this module
only hands out and takes back page *ids*. Page 0 is a scratch page that is never handed out: padded slots
of a batch (for example CUDA-graph padding) may point at it and write garbage there harmlessly.

Every operation is O(n) in the number of pages it moves, O(1) otherwise.
"""

from __future__ import annotations

from typing import Iterable

SCRATCH_PAGE = 0


class PagePool:
    """Free list of KV page ids ``1..num_pages`` (page 0 is the scratch page, never handed out).

    ``alloc`` is all-or-nothing; ``free`` checks every id before it takes any back, so a double free or a
    foreign id raises ``AssertionError`` and leaves the pool unchanged.
    """

    def __init__(self, num_pages: int, page_size: int):
        if not isinstance(num_pages, int) or num_pages < 0:
            raise ValueError(f"PagePool num_pages must be a non-negative int, got {num_pages!r}")
        if not isinstance(page_size, int) or page_size < 1:
            raise ValueError(f"PagePool page_size must be a positive int (tokens per page), got {page_size!r}")
        self.num_pages = num_pages
        self.page_size = page_size
        # A stack: popping from the end hands out low ids first on a fresh pool (1, 2, 3, ...), which keeps
        # logs and tests readable. The set mirrors the list for O(1) double-free checks.
        self._free_stack: list[int] = list(range(num_pages, 0, -1))
        self._free_set: set[int] = set(self._free_stack)

    @property
    def num_free(self) -> int:
        """Pages that can be handed out right now."""
        return len(self._free_stack)

    @property
    def num_used(self) -> int:
        """Pages handed out and not yet given back."""
        return self.num_pages - len(self._free_stack)

    def alloc(self, n: int) -> list[int] | None:
        """Hand out ``n`` page ids, or ``None`` (and nothing) when fewer than ``n`` are free."""
        if not isinstance(n, int) or n < 0:
            raise ValueError(f"PagePool.alloc: n must be a non-negative int, got {n!r}")
        if n > len(self._free_stack):
            return None
        if n == 0:
            return []
        pages = self._free_stack[-n:]
        del self._free_stack[-n:]
        pages.reverse()
        self._free_set.difference_update(pages)
        return pages

    def free(self, pages: Iterable[int]) -> None:
        """Take back page ids. A double free, the scratch page or an id out of range -> ``AssertionError``."""
        pages = list(pages)
        if not pages:
            return
        seen: set[int] = set()
        for page in pages:
            assert isinstance(page, int) and 1 <= page <= self.num_pages, (
                f"PagePool.free: page {page!r} is not a page of this pool (valid ids: 1..{self.num_pages}; "
                f"{SCRATCH_PAGE} is the scratch page)"
            )
            assert page not in self._free_set, f"PagePool.free: page {page} is already free (double free)"
            assert page not in seen, f"PagePool.free: page {page} appears twice in one free() call"
            seen.add(page)
        self._free_stack.extend(pages)
        self._free_set.update(pages)

    def is_free(self, page: int) -> bool:
        return page in self._free_set

    def free_pages(self) -> list[int]:
        """A copy of the free list (for invariant checks and debugging)."""
        return list(self._free_stack)

    def check_invariants(self) -> None:
        """The free list and its mirror set agree, hold no duplicate and no out-of-range id."""
        assert len(self._free_stack) == len(self._free_set), (
            f"PagePool: free list has {len(self._free_stack)} entries but {len(self._free_set)} distinct pages"
        )
        assert self._free_set == set(self._free_stack), "PagePool: free list and free set disagree"
        bad = [p for p in self._free_set if not 1 <= p <= self.num_pages]
        assert not bad, f"PagePool: out-of-range pages on the free list: {sorted(bad)[:10]}"

    def __repr__(self) -> str:
        return f"PagePool(num_pages={self.num_pages}, page_size={self.page_size}, num_free={self.num_free})"
