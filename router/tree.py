"""Approximate per-worker prefix tree of routing text, keyed by chained xxhash of fixed-size chunks.

The router cannot see a worker's real KV cache, so it keeps, per worker, a model of it: every routing
text (prompt, or chat messages in order) dispatched to the worker is inserted; a new request's longest
prefix present in a worker's tree predicts how much of its prompt that worker still has cached.

Keying (justified by bench/tree_bench.py, which compares it with a character radix tree at 100k+
prompts per worker; figures beside DEFAULT_CHUNK_CHARS): the text is cut into `chunk_chars`-character chunks and each chunk is named by a
64-bit xxhash of the chunk seeded with the name of its parent chunk, so one integer names a whole
prefix. The tree is then a single flat `OrderedDict` of prefix names:

* lookup of a prompt is one hash per chunk (computed once per request, shared by every worker's tree)
  plus one dict probe per chunk, and because the set of prefixes is prefix-closed the probe can be a
  binary search;
* memory is one small dict entry per distinct chunk, not a copy of the text;
* the `OrderedDict` order is the LRU order. Every touch walks a path deepest-first, so a node is
  always more recent than all of its descendants: the oldest entry is always a leaf, and evicting
  from the front removes leaves before their parents, the way the worker's radix cache evicts
  unreferenced leaves LRU. No parent pointers or child counts are needed.

A trailing partial chunk is ignored (prediction granularity is one chunk, like the worker's pages).

Reloads: the tree remembers the names it evicted (ghosts, at most as many as it can hold). A chunk
inserted again while its ghost is remembered is a reload: something this worker's cache could not keep
was wanted again. `reload_share`, reloads over the chunks newly inserted lately, says how much of what
the worker evicts comes back: near 0 when it evicts only one-off tails (a question asked once), high
when it holds more re-used prefixes than its KV keeps and they push each other out.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Sequence

import xxhash

# 128 characters (~32 tokens): bench/tree_bench.py at 100k cached multi-turn prompts per worker
# (mean 1.7k chars, 2-core EPYC) measured 303 bytes/prompt and 7.6 us per lookup against 4 worker
# trees (3.4 us of it hashing, done once per request), vs 607 B and 10.7 us at 64 characters, and
# vs 588 B and 14.3 us for a character radix tree (whose cost also grows per worker, without O(1) LRU).
DEFAULT_CHUNK_CHARS = 128
# Routing works on text, capacity is in tokens: English text and code average ~4 characters per token.
DEFAULT_CHARS_PER_TOKEN = 4.0

_hash = xxhash.xxh3_64_intdigest


def chunk_hashes(text: str, chunk_chars: int = DEFAULT_CHUNK_CHARS) -> list[int]:
    """Names of every full-chunk prefix of `text`: element i names text[: (i + 1) * chunk_chars]."""
    if chunk_chars <= 0:
        raise ValueError(f"chunk_chars must be positive, got {chunk_chars}")
    data = text.encode("utf-8", "surrogatepass")
    # Chunk by characters, not bytes, so the estimate of tokens per chunk stays stable; ASCII is the
    # common case and then bytes == characters, which lets us skip re-slicing the str.
    hashes: list[int] = []
    seed = 0
    if len(data) == len(text):
        for start in range(0, len(data) - chunk_chars + 1, chunk_chars):
            seed = _hash(data[start : start + chunk_chars], seed)
            hashes.append(seed)
    else:
        for start in range(0, len(text) - chunk_chars + 1, chunk_chars):
            seed = _hash(text[start : start + chunk_chars].encode("utf-8", "surrogatepass"), seed)
            hashes.append(seed)
    return hashes


class PrefixTree:
    """One worker's approximate cache: a prefix-closed, LRU-ordered set of chunk-prefix names.

    Pure data structure, no I/O. `capacity_tokens` mirrors the worker's KV capacity (from its /load);
    inserting beyond it evicts least-recently-used leaves.
    """

    __slots__ = ("_nodes", "chunk_chars", "tokens_per_chunk", "capacity_tokens", "evicted_chunks",
                 "reloaded_chunks", "_ghosts", "_recent_new", "_recent_reloaded")

    def __init__(
        self,
        capacity_tokens: int,
        chunk_chars: int = DEFAULT_CHUNK_CHARS,
        chars_per_token: float = DEFAULT_CHARS_PER_TOKEN,
    ) -> None:
        if capacity_tokens < 0:
            raise ValueError(f"capacity_tokens must be >= 0, got {capacity_tokens}")
        if chunk_chars <= 0 or chars_per_token <= 0:
            raise ValueError("chunk_chars and chars_per_token must be positive")
        self._nodes: OrderedDict[int, None] = OrderedDict()
        self.chunk_chars = chunk_chars
        self.tokens_per_chunk = chunk_chars / chars_per_token
        self.capacity_tokens = capacity_tokens
        self.evicted_chunks = 0
        self.reloaded_chunks = 0  # ever (the metric); reload_share reads the recent window below
        self._ghosts: OrderedDict[int, None] = OrderedDict()  # names evicted, oldest first
        # Chunks newly inserted and reloads among them, both halved whenever the first passes twice the
        # tree's size: a window of about the last two to four cachefuls of new text.
        self._recent_new = 0.0
        self._recent_reloaded = 0.0

    # --- queries -------------------------------------------------------------------------------
    def __len__(self) -> int:
        """Number of chunk nodes held."""
        return len(self._nodes)

    def __contains__(self, prefix_hash: int) -> bool:
        return prefix_hash in self._nodes

    @property
    def size_tokens(self) -> int:
        """Estimated KV tokens this tree stands for."""
        return int(len(self._nodes) * self.tokens_per_chunk)

    @property
    def max_chunks(self) -> int:
        return int(self.capacity_tokens // self.tokens_per_chunk)

    def match_chunks(self, hashes: Sequence[int]) -> int:
        """Length, in chunks, of the longest prefix of `hashes` held. Does not touch LRU order.

        The held set is prefix-closed (a node is never held without its ancestors), so presence is
        monotone along the path and a binary search finds the boundary in O(log n) probes.
        """
        nodes = self._nodes
        lo, hi = 0, len(hashes)
        if hi == 0 or hashes[0] not in nodes:
            return 0
        if hashes[hi - 1] in nodes:
            return hi
        lo = 1  # hashes[:lo] held, hashes[hi-1] not held
        hi -= 1
        while lo < hi:
            mid = (lo + hi) // 2
            if hashes[mid] in nodes:
                lo = mid + 1
            else:
                hi = mid
        return lo

    def match_chars(self, hashes: Sequence[int]) -> int:
        return self.match_chunks(hashes) * self.chunk_chars

    @property
    def reload_share(self) -> float:
        """Share of the chunks recently inserted that this tree had evicted before (module docstring)."""
        return self._recent_reloaded / self._recent_new if self._recent_new else 0.0

    # --- updates -------------------------------------------------------------------------------
    def insert(self, hashes: Sequence[int]) -> None:
        """Record that the worker now caches this prefix path (marks it most recently used)."""
        if not hashes:
            return
        max_chunks = self.max_chunks
        if max_chunks <= 0:
            return
        if len(hashes) > max_chunks:
            # A prompt longer than the whole cache: the worker keeps at most its head.
            hashes = hashes[:max_chunks]
        nodes = self._nodes
        ghosts = self._ghosts
        move = nodes.move_to_end
        new = reloaded = 0
        # Deepest first, so that every ancestor ends up more recent than its descendants.
        for h in reversed(hashes):
            if h in nodes:
                move(h)
            else:
                nodes[h] = None
                new += 1
                if h in ghosts:
                    del ghosts[h]
                    reloaded += 1
        if new:
            self.reloaded_chunks += reloaded
            self._recent_reloaded += reloaded
            self._recent_new += new
            if self._recent_new > 2 * max_chunks:
                self._recent_new /= 2
                self._recent_reloaded /= 2
            self._evict_to(max_chunks)

    def set_capacity(self, capacity_tokens: int) -> None:
        """Follow a change in the worker's reported KV capacity, evicting LRU leaves if it shrank."""
        if capacity_tokens < 0:
            raise ValueError(f"capacity_tokens must be >= 0, got {capacity_tokens}")
        self.capacity_tokens = capacity_tokens
        self._evict_to(self.max_chunks)

    def set_chars_per_token(self, chars_per_token: float) -> None:
        """Follow a measured characters-per-token figure (the tree's bound is in the worker's tokens)."""
        if chars_per_token <= 0:
            raise ValueError(f"chars_per_token must be positive, got {chars_per_token}")
        self.tokens_per_chunk = self.chunk_chars / chars_per_token
        self._evict_to(self.max_chunks)

    @property
    def chars_per_token(self) -> float:
        return self.chunk_chars / self.tokens_per_chunk

    def tokens_free(self) -> float:
        """Estimated KV tokens the worker holds free or could take without evicting anything we know of."""
        return self.capacity_tokens - len(self._nodes) * self.tokens_per_chunk

    def clear(self) -> None:
        """Forget everything (the worker restarted or its cache was flushed)."""
        self._nodes.clear()
        self._ghosts.clear()
        self._recent_new = self._recent_reloaded = 0.0

    def _evict_to(self, max_chunks: int) -> None:
        nodes = self._nodes
        excess = len(nodes) - max_chunks
        if excess <= 0:
            return
        pop = nodes.popitem
        ghosts = self._ghosts
        for _ in range(excess):
            ghosts[pop(last=False)[0]] = None  # oldest entry: always a leaf (see module docstring)
        for _ in range(len(ghosts) - max_chunks):
            ghosts.popitem(last=False)
        self.evicted_chunks += excess

    # --- introspection for tests ---------------------------------------------------------------
    def lru_order(self) -> list[int]:
        """Node names from least to most recently used."""
        return list(self._nodes)
