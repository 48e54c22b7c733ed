"""Do not prefill the same prefix twice at once: a waiting prompt that shares a long uncached prefix with a
prompt being prefilled right now waits until that prefix is in the radix cache, then starts from it.

Without this, a burst of requests for one uncached document (a cold start, a new system prompt) is
admitted together and every one of them computes the whole document: with a 3.3k-token document and a
few requests for it in the first second, most of the cold phase's prefill work is duplicate. With it, the
first computes the document; each chunk it finishes is cached at launch (Scheduler.launch), and the ones
behind it find the prefix cached a step or two later and compute only their own suffix.

Prompts are compared by chained hashes of fixed-size token blocks, so "how long is the common prefix with
any prompt in flight" is a binary search over set lookups (a chain hash at block i matches only when every
block before it matches too). A prompt is deferred only when the saving is at least MIN_SHARED_TOKENS
beyond what the cache already holds for it.
"""

from __future__ import annotations

from array import array
from typing import Callable

import xxhash

from worker.engine.sequence import Sequence

BLOCK_TOKENS = 64
MIN_SHARED_TOKENS = 256  # below this, waiting a step costs more than computing the tokens again


def prompt_block_hashes(seq: Sequence) -> list[int]:
    """Chained hashes of the prompt's full BLOCK_TOKENS-token blocks (computed once per sequence)."""
    if seq.prompt_block_hashes is None:
        tokens = seq.prompt_token_ids
        hashes, previous = [], 0
        for start in range(0, len(tokens) - BLOCK_TOKENS + 1, BLOCK_TOKENS):
            previous = xxhash.xxh3_64_intdigest(array("q", tokens[start:start + BLOCK_TOKENS]).tobytes(), seed=previous)
            hashes.append(previous)
        seq.prompt_block_hashes = hashes
    return seq.prompt_block_hashes


class PrefillsInFlight:
    """The prompt blocks being prefilled this step: running sequences part-way through their prompt,
    plus those admitted so far in this step."""

    def __init__(self, running: list[Sequence]) -> None:
        self._running = running
        self._blocks: set[int] | None = None  # built on first use: a step with nothing waiting never pays for it

    def _in_flight(self) -> set[int]:
        if self._blocks is None:
            self._blocks = set()
            for seq in self._running:
                if not seq.is_decoding:
                    self._blocks.update(prompt_block_hashes(seq))
        return self._blocks

    def add(self, seq: Sequence) -> None:
        self._in_flight().update(prompt_block_hashes(seq))

    def shared_tokens(self, seq: Sequence) -> int:
        """Length of the longest block-aligned prefix `seq`'s prompt shares with any prompt in flight."""
        hashes, blocks = prompt_block_hashes(seq), self._in_flight()
        low, high = 0, len(hashes)  # the answer, in blocks, lies in [low, high]
        while low < high:
            middle = (low + high + 1) // 2
            if hashes[middle - 1] in blocks:
                low = middle
            else:
                high = middle - 1
        return low * BLOCK_TOKENS

    def would_duplicate(self, seq: Sequence, cached_length: Callable[[Sequence], int]) -> bool:
        """Admitting `seq` now would compute at least MIN_SHARED_TOKENS that a prefill in flight computes.
        `cached_length(seq)`: what the radix cache holds of it now (asked only when something is in flight)."""
        if seq.num_preemptions or seq.output_token_ids or seq.needs_prompt_logits:
            # resumed sequences go first (they hold their place); prompt-logprob ones compute it all anyway
            return False
        if not self._in_flight():
            return False
        shared = self.shared_tokens(seq)
        return shared >= MIN_SHARED_TOKENS and shared - cached_length(seq) >= MIN_SHARED_TOKENS
