"""Iteration-level continuous batching over a paged radix KV cache. Pure Python, no I/O.

Each call to `schedule()` builds one step under a single token budget (`max_num_batched_tokens`):
1. every running decode gets its one token first, so long prompts can never starve decodes;
2. what is left of the budget goes to prefill chunks: first sequences already part-way through their
   prompt, then waiting sequences in policy order (chunked prefill: a long prompt spreads over steps).

KV memory: a decode that needs a new page and cannot get one (even after evicting unreferenced cache
leaves) preempts a victim by recompute — lowest priority first, then the latest arrival. The victim's
computed prefix is given to the radix cache before its pages are released, so when it is re-admitted it
recomputes only what was evicted meanwhile. Admission of new prompts keeps room for the expected decode
growth of the running batch (`new_token_ratio` of their remaining budget, a ratio that decays while things
go well and jumps back up after a preemption, as SGLang does), so preemptions stay rare.

`update()` applies the sampled tokens, decides which sequences finished, and hands finished sequences'
KV to the radix cache. It is `launch()` (the step is on its way: computed positions advance, each sampling
row gets a placeholder output token) followed by `resolve()` (the sampled tokens fill the placeholders,
stop conditions are checked). Overlap scheduling calls the two separately, one step apart, so the next
step is scheduled while the device still runs this one; see worker.engine.llm_engine.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable

from worker.cache.radix_cache import RadixCache
from worker.engine.protocol import FinishReason
from worker.engine.sequence import PLACEHOLDER_TOKEN, Sequence, SeqStatus

# A running sequence's decode growth is counted up to this many tokens when reserving room for it.
_RESERVE_CLIP_TOKENS = 4096
# `lpm` looks at most this many waiting sequences per step (prefix matching is not free).
_LPM_WINDOW = 128


@dataclass
class SchedulerConfig:
    max_num_batched_tokens: int = 2048
    max_running_requests: int = 256
    max_model_len: int = 4096
    policy: str = "fcfs"  # fcfs | priority | lpm
    priority_aging_s: float = 5.0
    new_token_ratio_init: float = 0.7
    new_token_ratio_min: float = 0.1
    new_token_ratio_decay: float = 0.002  # per step


@dataclass
class ScheduledBatch:
    """One step: `num_new_tokens[i]` tokens of `seqs[i]`, decodes first."""

    seqs: list[Sequence] = field(default_factory=list)
    num_new_tokens: list[int] = field(default_factory=list)
    num_decodes: int = 0

    def __len__(self) -> int:
        return len(self.seqs)

    @property
    def num_tokens(self) -> int:
        return sum(self.num_new_tokens)

    def sampling_rows(self) -> list[int]:
        """The rows that sample this step, in batch order (the order of the step's logits)."""
        return [i for i in range(len(self.seqs)) if self.samples(i)]

    def samples(self, i: int) -> bool:
        """Whether seqs[i] reaches its last token this step, so a new token is sampled for it."""
        seq = self.seqs[i]
        return seq.num_computed + self.num_new_tokens[i] == seq.num_tokens


class Scheduler:
    def __init__(self, config: SchedulerConfig, cache: RadixCache, clock: Callable[[], float] = time.monotonic):
        self.config = config
        self.cache = cache
        self.page_size = cache.page_size
        self.clock = clock
        self.waiting: list[Sequence] = []
        self.running: list[Sequence] = []
        self.new_token_ratio = config.new_token_ratio_init
        self.num_preemptions = 0
        # sequences cut off during schedule() (they outgrew the whole pool); reported by the next update()
        self._cut_off: list[Sequence] = []
        self._preempted_this_step = False

    # ------------------------------------------------------------------ queue management
    def add(self, seq: Sequence) -> None:
        seq.status = SeqStatus.WAITING
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def abort(self, request_id: str, index: int | None = None) -> list[Sequence]:
        """Remove the request's unfinished choices (all, or just `index`) and free their KV at once."""
        aborted = []
        for queue in (self.running, self.waiting):
            for seq in list(queue):
                if seq.request_id != request_id or (index is not None and seq.index != index):
                    continue
                queue.remove(seq)
                aborted.append(seq)
                aborted.extend(self._pop_held(seq, index))
        for seq in list(aborted):
            seq.drop_pending_tokens()  # their step still runs; its tokens are discarded when it resolves
            self._release(seq)
            seq.status = SeqStatus.FINISHED
            seq.finish_reason = FinishReason.ABORT
        return aborted

    def _pop_held(self, seq: Sequence, index: int | None) -> list[Sequence]:
        """Choices still held back behind `seq` (choice 0) that the abort also covers."""
        if index is None:
            held, seq.held_choices = seq.held_choices, []
            return held
        return []

    # ------------------------------------------------------------------ scheduling
    def schedule(self) -> ScheduledBatch:
        batch = ScheduledBatch()
        budget = self.config.max_num_batched_tokens
        self._preempted_this_step = False

        # 1. decodes of running sequences (oldest first; victims are taken from the back)
        self._sort_running()
        for seq in list(self.running):
            if budget <= 0:
                break
            if seq.status is not SeqStatus.RUNNING or not seq.is_decoding:
                continue
            if seq.num_pending_tokens and self._reached_length_limit(seq):
                continue  # its last token is still on the device; resolving it will finish the sequence
            if not self._ensure_pages(seq, seq.num_computed + 1, batch):
                continue  # seq itself was preempted or finished for lack of memory
            batch.seqs.append(seq)
            batch.num_new_tokens.append(1)
            budget -= 1
        batch.num_decodes = len(batch.seqs)

        # 2. prefill chunks: sequences part-way through their prompt, then new ones
        for seq in [s for s in self.running if s.status is SeqStatus.RUNNING and not s.is_decoding]:
            if budget <= 0:
                break
            if seq.status is not SeqStatus.RUNNING:
                continue  # preempted by an earlier sequence of this loop
            chunk = self._fit_chunk(seq, budget, admitting=False)
            if chunk == 0:
                # Out of KV: take memory from a later arrival (or step back itself) so part-done prompts
                # cannot hold each other's pages forever.
                if not self._ensure_pages(seq, seq.num_computed + 1, batch):
                    continue
                chunk = self._fit_chunk(seq, budget, admitting=False)
            batch.seqs.append(seq)
            batch.num_new_tokens.append(chunk)
            budget -= chunk

        for seq in self._waiting_in_policy_order():
            if self._preempted_this_step:
                break  # memory is short: admitting now would only preempt again
            if budget <= 0 or len(self.running) >= self.config.max_running_requests:
                break
            if seq.num_pending_tokens:
                continue  # preempted with a token still on the device: it may be prefilled once that is known
            chunk = self._admit(seq, budget)
            if chunk == 0:
                break  # head-of-line: keep the policy's order instead of letting smaller requests jump ahead
            batch.seqs.append(seq)
            batch.num_new_tokens.append(chunk)
            budget -= chunk

        if batch.num_decodes == len(batch.seqs):
            # decode-only steps mean the batch is stable: trust decode growth estimates a bit more
            self.new_token_ratio = max(
                self.config.new_token_ratio_min, self.new_token_ratio - self.config.new_token_ratio_decay
            )
        return batch

    def _sort_running(self) -> None:
        self.running.sort(key=lambda s: (s.params.priority, s.arrival_order))

    def _waiting_in_policy_order(self) -> list[Sequence]:
        policy = self.config.policy
        if policy == "fcfs":
            self.waiting.sort(key=lambda s: s.arrival_order)
        elif policy == "priority":
            now = self.clock()
            aging = self.config.priority_aging_s

            def effective(s: Sequence) -> tuple[float, int]:
                # every `aging` seconds waited is worth one priority level, so nothing starves
                return (s.params.priority - (now - s.arrival_time) / aging, s.arrival_order)

            self.waiting.sort(key=effective)
        elif policy == "lpm":
            self.waiting.sort(key=lambda s: s.arrival_order)
            window = self.waiting[:_LPM_WINDOW]
            matched = {
                id(s): self.cache.match_prefix(self._matchable(s), record=False).num_tokens for s in window
            }
            window.sort(key=lambda s: (-matched[id(s)], s.arrival_order))
            self.waiting[:_LPM_WINDOW] = window
        else:  # validated in EngineConfig; keep the failure loud if someone bypasses it
            raise ValueError(f"unknown scheduling policy {policy!r}")
        return list(self.waiting)

    @staticmethod
    def _matchable(seq: Sequence) -> list[int]:
        # The last token is always recomputed: its logits are needed to sample the next token.
        return seq.token_ids()[:-1]

    def _admit(self, seq: Sequence, budget: int) -> int:
        """Match the cache, reserve KV and move `seq` to running. Returns the chunk size (0: not admitted)."""
        match = self.cache.match_prefix(self._matchable(seq), record=seq.num_cached_tokens < 0)
        self.cache.lock(match.node)
        seq.tree_node = match.node
        seq.pages = list(match.pages)
        seq.num_computed = seq.num_tree_tokens = match.num_tokens
        chunk = self._fit_chunk(seq, budget, admitting=True)
        if chunk == 0:
            self.cache.unlock(match.node)
            seq.tree_node, seq.pages, seq.num_computed, seq.num_tree_tokens = None, [], 0, 0
            return 0
        if seq.num_cached_tokens < 0:
            seq.num_cached_tokens = match.num_tokens
        self.waiting.remove(seq)
        seq.status = SeqStatus.RUNNING
        self.running.append(seq)
        return chunk

    def _fit_chunk(self, seq: Sequence, budget: int, admitting: bool) -> int:
        """Largest prefill chunk of `seq` that fits the token budget and the KV pool; allocates its pages."""
        chunk = min(seq.num_uncomputed, budget)
        ps = self.page_size
        available = self.cache.pool.num_free + self.cache.num_evictable_pages
        if admitting:
            # keep room for the running batch's decode growth and this sequence's own
            reserve = self._decode_reserve_pages() + self._pages_for(
                math.ceil(min(seq.remaining_output_budget(self.config.max_model_len), _RESERVE_CLIP_TOKENS)
                          * self.new_token_ratio)
            )
            available -= reserve
        room_tokens = (len(seq.pages) + max(available, 0)) * ps - seq.num_computed
        chunk = min(chunk, room_tokens)
        if chunk <= 0:
            return 0
        needed = self._pages_for(seq.num_computed + chunk) - len(seq.pages)
        if needed > 0:
            pages = self.cache.alloc(needed)
            if pages is None:
                return 0
            seq.pages.extend(pages)
        return chunk

    def _decode_reserve_pages(self) -> int:
        tokens = sum(
            min(s.remaining_output_budget(self.config.max_model_len), _RESERVE_CLIP_TOKENS) for s in self.running
        )
        return self._pages_for(math.ceil(tokens * self.new_token_ratio))

    def _pages_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.page_size)

    def _ensure_pages(self, seq: Sequence, num_tokens: int, batch: ScheduledBatch) -> bool:
        """Make sure `seq` has pages for `num_tokens` tokens, preempting others if memory is short."""
        if self._pages_for(num_tokens) > self.cache.pool.num_pages:
            # This sequence alone outgrew the whole pool: end it rather than preempt it forever.
            self._finish(seq, FinishReason.LENGTH)
            self._cut_off.append(seq)
            return False
        needed = self._pages_for(num_tokens) - len(seq.pages)
        while needed > 0:
            pages = self.cache.alloc(needed)
            if pages is not None:
                seq.pages.extend(pages)
                return True
            # `seq` itself is always a candidate, so a victim exists; it may be `seq`.
            victim = self._pick_victim(exclude=batch.seqs)
            self.preempt(victim)
            if victim is seq:
                return False
        return True

    def _pick_victim(self, exclude: list[Sequence]) -> Sequence:
        """Lowest priority (largest value) first, then the latest arrival; never one already in the batch."""
        scheduled = {id(s) for s in exclude}
        candidates = [s for s in self.running if id(s) not in scheduled]
        return max(candidates, key=lambda s: (s.params.priority, s.arrival_order))

    def preempt(self, seq: Sequence) -> None:
        """Preempt by recompute: cache what was computed, free the rest, and queue `seq` again."""
        self.running.remove(seq)
        self._release(seq)
        seq.num_preemptions += 1
        self.num_preemptions += 1
        seq.status = SeqStatus.WAITING
        self.waiting.append(seq)
        self._preempted_this_step = True
        # memory was tighter than estimated: reserve more for decode growth for a while
        self.new_token_ratio = min(1.0, max(self.new_token_ratio, self.config.new_token_ratio_init) + 0.1)

    # ------------------------------------------------------------------ KV bookkeeping
    def _cache_computed_prefix(self, seq: Sequence) -> None:
        """Give the page-aligned computed prefix of `seq` to the radix tree and lock it there instead."""
        aligned = (seq.num_computed // self.page_size) * self.page_size
        if aligned <= seq.num_tree_tokens or not self.cache.enabled:
            return
        num_pages = aligned // self.page_size
        result = self.cache.insert(seq.token_ids()[:aligned], seq.pages[:num_pages])
        # insert() freed any of our pages the tree already had under other ids; use the tree's
        seq.pages[:num_pages] = result.pages
        self.cache.lock(result.node)
        if seq.tree_node is not None:
            self.cache.unlock(seq.tree_node)
        seq.tree_node = result.node
        seq.num_tree_tokens = aligned

    def _release(self, seq: Sequence) -> None:
        """Cache what `seq` computed and free everything else it held."""
        if seq.tree_node is not None or seq.pages:
            self._cache_computed_prefix(seq)
            private = seq.pages[seq.num_tree_tokens // self.page_size :]
            if private:
                self.cache.pool.free(private)
            if seq.tree_node is not None:
                self.cache.unlock(seq.tree_node)
        seq.pages, seq.tree_node, seq.num_computed, seq.num_tree_tokens = [], None, 0, 0

    def _finish(self, seq: Sequence, reason: str, stop_token_id: int | None = None) -> None:
        if seq.status is SeqStatus.RUNNING:
            self.running.remove(seq)
        elif seq.status is SeqStatus.WAITING and seq in self.waiting:
            self.waiting.remove(seq)  # preempted while its last token was on the device
        # An eos found one step late: the step after it ran on its token; forget that step's placeholder,
        # and count as computed only what the synchronous engine would have (never a placeholder's slot).
        seq.drop_pending_tokens()
        seq.num_computed = min(seq.num_computed, seq.num_tokens - 1)
        self._release(seq)
        seq.status = SeqStatus.FINISHED
        seq.finish_reason = reason
        seq.stop_token_id = stop_token_id

    # ------------------------------------------------------------------ applying a step's results
    def update(
        self, batch: ScheduledBatch, sampled: dict[int, int], eos_token_ids: frozenset[int] = frozenset()
    ) -> tuple[list[Sequence], list[Sequence]]:
        """Apply one step. `sampled` maps batch row -> new token for rows where `batch.samples(row)`.

        Returns (sequences that got a new token, sequences that finished this step, including any that
        had to be cut off for lack of memory during schedule()).
        """
        rows = sorted(sampled)
        launched = self.launch(batch, rows)
        finished = self.take_cut_off()
        advanced_rows, resolved_finished = self.resolve(launched, [sampled[r] for r in rows], eos_token_ids)
        return [launched[j] for j in advanced_rows], finished + resolved_finished

    def take_cut_off(self) -> list[Sequence]:
        """Sequences schedule() had to end (they outgrew the whole pool) since the last call."""
        cut_off, self._cut_off = self._cut_off, []
        return cut_off

    def launch(self, batch: ScheduledBatch, sampling_rows: list[int]) -> list[Sequence]:
        """The step is on its way to the device: advance computed positions, make prefill progress
        shareable, and give each row of `sampling_rows` a placeholder output token.

        Returns the sequence of each sampling row (None where it was aborted after schedule()), in the
        order of `sampling_rows`, which is the order of the step's sampled tokens; pass it to `resolve()`.
        """
        sampling = set(sampling_rows)
        launched: list[Sequence | None] = []
        for row, (seq, n_new) in enumerate(zip(batch.seqs, batch.num_new_tokens)):
            if seq.status is not SeqStatus.RUNNING:
                if row in sampling:
                    launched.append(None)  # aborted between schedule() and launch()
                continue
            seq.num_computed += n_new
            if row not in sampling:
                self._cache_computed_prefix(seq)  # chunked-prefill progress becomes shareable at once
                continue
            if seq.held_choices and len(seq.output_token_ids) == 0:
                # choice 0 finished its prompt: cache it so the other choices start from it
                self._cache_computed_prefix(seq)
                for held in seq.held_choices:
                    held.arrival_order = seq.arrival_order
                    self.add(held)
                seq.held_choices = []
            seq.future_row = len(launched)
            seq.output_token_ids.append(PLACEHOLDER_TOKEN)
            seq.num_pending_tokens += 1
            launched.append(seq)
        return launched

    def resolve(
        self, launched: list[Sequence | None], tokens: list[int], eos_token_ids: frozenset[int] = frozenset()
    ) -> tuple[list[int], list[Sequence]]:
        """Fill the placeholders of a launched step with its sampled `tokens` (same order) and apply stops.

        Returns (indices into `launched` of the sequences that got their token, sequences that finished).
        Tokens of sequences that ended in the meantime (aborted, or stopped by an eos one step earlier) are
        discarded.
        """
        advanced: list[int] = []
        finished: list[Sequence] = []
        for j, (seq, token) in enumerate(zip(launched, tokens)):
            if seq is None or seq.status is SeqStatus.FINISHED or not seq.num_pending_tokens:
                continue
            n_out = len(seq.output_token_ids) - seq.num_pending_tokens + 1  # outputs once this one is real
            seq.output_token_ids[n_out - 1] = token
            seq.num_pending_tokens -= 1
            advanced.append(j)
            reason, stop_id = self._stop_reason(seq, token, eos_token_ids, n_out)
            if reason is not None:
                self._finish(seq, reason, stop_id)
                finished.append(seq)
        return advanced, finished

    def _reached_length_limit(self, seq: Sequence) -> bool:
        """max_tokens or the context length reached, counting outputs still on the device."""
        max_tokens = seq.params.max_tokens
        return (max_tokens is not None and len(seq.output_token_ids) >= max_tokens) or (
            seq.num_tokens >= self.config.max_model_len
        )

    def _stop_reason(
        self, seq: Sequence, token: int, eos_token_ids: frozenset[int], n_out: int
    ) -> tuple[str | None, int | None]:
        """Why `seq` stops at its `n_out`-th output token `token` (None: it goes on)."""
        p = seq.params
        if n_out >= p.min_tokens:
            if not p.ignore_eos and token in eos_token_ids:
                return FinishReason.STOP, token
            if token in p.stop_token_ids:
                return FinishReason.STOP, token
        if p.max_tokens is not None and n_out >= p.max_tokens:
            return FinishReason.LENGTH, None
        if len(seq.prompt_token_ids) + n_out >= self.config.max_model_len:
            return FinishReason.LENGTH, None
        return None, None

    # ------------------------------------------------------------------ introspection
    def private_pages(self) -> list[int]:
        return [p for s in self.running for p in s.pages[s.num_tree_tokens // self.page_size :]]

    def locked_nodes(self) -> list[object]:
        return [s.tree_node for s in self.running if s.tree_node is not None]

    def check_invariants(self) -> None:
        """No leaked, double-owned or wrongly-referenced page (tests call this after every scenario)."""
        self.cache.check_invariants(private_pages=self.private_pages(), locked_nodes=self.locked_nodes())
        for seq in self.waiting:
            assert not seq.pages and seq.tree_node is None, f"waiting sequence {seq.seq_id} holds KV"
        for seq in self.running:
            assert len(seq.pages) * self.page_size >= seq.num_computed, f"{seq.seq_id} lacks pages"

    def kv_tokens_in_use(self) -> int:
        """Tokens of KV that cannot be reclaimed now: locked tree pages plus private pages. O(running)."""
        private = sum(len(s.pages) - s.num_tree_tokens // self.page_size for s in self.running)
        return (self.cache.num_locked_pages + private) * self.page_size
