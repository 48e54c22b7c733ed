"""Iteration-level continuous batching over a paged radix KV cache. Pure Python, no I/O.

The engine (worker.engine.llm_engine) drives each step through four calls:
* `schedule()`: what runs this step, under one token budget (`max_num_batched_tokens`): first one token
  for every running decode (long prompts never starve decodes), then the next chunk of prompts already
  part-way through (chunked prefill), then waiting sequences in policy order (worker.engine.waiting_queue),
  but none that would prefill a long prefix another prompt is prefilling now (worker.engine.shared_prefill),
  while the KV pool keeps room for the running batch's decode growth (worker.engine.decode_reserve).
* `launch()`: the step is on its way to the device: computed positions advance, prefill progress becomes
  shareable, each sampling row gets a placeholder output token.
* `take_cut_off()`: sequences `schedule()` ended because they outgrew the whole pool.
* `resolve()`: sampled tokens replace the placeholders; stops (worker.engine.stop_conditions) are applied.
With overlap scheduling, step N resolves after step N+1 was scheduled and launched.

Pages and the radix tree are worker.cache.kv_manager's job; this module decides who gets them. A sequence
that needs a page when none is left (even after evicting unheld cache) preempts a victim by recompute:
lowest priority first, then the latest arrival. The victim's computed prefix is cached before its pages
are freed, so on re-admission it recomputes only what was evicted meanwhile. Choices 1..n-1 of a request
wait on choice 0 (`Sequence.held_choices`) until its prompt is cached, then start from that prefix.
"""

from __future__ import annotations

import time
from typing import Callable

from worker.cache.kv_manager import KVManager
from worker.cache.radix_cache import RadixCache
from worker.engine.decode_reserve import DecodeReserve
from worker.engine.protocol import FinishReason
from worker.engine.scheduled_batch import ScheduledBatch, SchedulerConfig
from worker.engine.sequence import Sequence, SeqStatus
from worker.engine.shared_prefill import PrefillsInFlight
from worker.engine.stop_conditions import reached_length_limit, stop_reason
from worker.engine.waiting_queue import make_waiting_queue

__all__ = ["ScheduledBatch", "Scheduler", "SchedulerConfig"]  # the first and last live in scheduled_batch.py


class Scheduler:
    def __init__(self, config: SchedulerConfig, cache: RadixCache, clock: Callable[[], float] = time.monotonic):
        self.config = config
        self.kv = KVManager(cache)
        self.clock = clock
        self.waiting = make_waiting_queue(config.policy, config.priority_aging_s, clock, self.kv.cached_prefix_length)
        self.running: list[Sequence] = []
        self.reserve = DecodeReserve(
            config.new_token_ratio_init, config.new_token_ratio_min, config.new_token_ratio_decay,
            config.max_model_len, self.kv.pages_for,
        )
        self.num_preemptions = 0
        # sequences cut off during schedule() (they outgrew the whole pool); handed out by take_cut_off()
        self._cut_off: list[Sequence] = []
        self._preempted_this_step = False
        # called wherever a sequence's KV is freed (finish, abort, preemption): the engine frees its penalty counts
        self.on_release: Callable[[Sequence], None] = lambda seq: None

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
                if index is None:  # the whole request: also the choices still held back behind choice 0
                    aborted.extend(seq.held_choices)
                    seq.held_choices = []
        for seq in aborted:
            seq.drop_pending_tokens()  # their step still runs; its tokens are discarded when it resolves
            self.kv.release(seq)
            self.on_release(seq)
            seq.status = SeqStatus.FINISHED
            seq.finish_reason = FinishReason.ABORT
        return aborted

    # ------------------------------------------------------------------ what runs this step
    def schedule(self) -> ScheduledBatch:
        batch = ScheduledBatch()
        self._preempted_this_step = False
        budget = self.config.max_num_batched_tokens
        budget = self._schedule_decodes(batch, budget)
        batch.num_decodes = len(batch.seqs)
        budget = self._continue_prefills(batch, budget)
        self._admit_waiting(batch, budget)
        if batch.num_decodes == len(batch.seqs):
            self.reserve.after_decode_only_step()  # the batch is stable
        return batch

    def _schedule_decodes(self, batch: ScheduledBatch, budget: int) -> int:
        """One token for each running decode, oldest first (victims are taken from the back)."""
        self.running.sort(key=lambda s: (s.params.priority, s.arrival_order))
        for seq in list(self.running):
            if budget <= 0:
                break
            if seq.status is not SeqStatus.RUNNING or not seq.is_decoding:
                continue
            if seq.num_pending_tokens and reached_length_limit(seq, self.config.max_model_len):
                continue  # its last token is still on the device; resolving it will finish the sequence
            if not self._ensure_pages(seq, seq.num_computed + 1, batch):
                continue  # seq itself was preempted or finished for lack of memory
            batch.add(seq, 1)
            budget -= 1
        return budget

    def _continue_prefills(self, batch: ScheduledBatch, budget: int) -> int:
        """The next chunk of each running sequence part-way through its prompt."""
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
            batch.add(seq, chunk)
            budget -= chunk
        return budget

    def _admit_waiting(self, batch: ScheduledBatch, budget: int) -> None:
        """Waiting sequences in policy order, head-of-line, while the budget and the KV reserve allow."""
        in_flight = PrefillsInFlight(self.running)
        for seq in self.waiting.in_policy_order():
            if self._preempted_this_step:
                break  # memory is short: admitting now would only preempt again
            if budget <= 0 or len(self.running) >= self.config.max_running_requests:
                break
            if seq.num_pending_tokens:
                continue  # preempted with a token still on the device: it may be prefilled once that is known
            if in_flight.would_duplicate(seq, self.kv.cached_prefix_length):
                continue
            chunk = self._admit(seq, budget)
            if chunk == 0:
                break  # head-of-line: keep the policy's order instead of letting smaller requests jump ahead
            batch.add(seq, chunk)
            in_flight.add(seq)
            budget -= chunk

    def _admit(self, seq: Sequence, budget: int) -> int:
        """Start `seq` from its cached prefix, reserve KV and move it to running. Returns the chunk (0: not)."""
        first_admission = seq.num_cached_tokens < 0
        # prompt logprobs need every prompt position's logits: such a prompt is computed whole, not matched
        num_cached = 0 if seq.needs_prompt_logits else self.kv.attach_cached_prefix(seq, record=first_admission)
        chunk = self._fit_chunk(seq, budget, admitting=True)
        if chunk == 0:
            if seq.tree_node is not None:
                self.kv.detach_cached_prefix(seq)
            return 0
        if first_admission:
            seq.num_cached_tokens = num_cached
        self.waiting.remove(seq)
        seq.status = SeqStatus.RUNNING
        self.running.append(seq)
        return chunk

    # ------------------------------------------------------------------ memory: reserve and preemption
    def _fit_chunk(self, seq: Sequence, budget: int, admitting: bool) -> int:
        """Largest prefill chunk of `seq` that fits the token budget and the KV pool; allocates its pages."""
        available = self.kv.available_pages()
        if admitting:
            # keep room for the running batch's decode growth and this sequence's own
            available -= self.reserve.pages(self.running) + self.reserve.pages([seq])
        room_tokens = (len(seq.pages) + max(available, 0)) * self.kv.page_size - seq.num_computed
        chunk = min(seq.num_uncomputed, budget, room_tokens, seq.max_prefill_chunk())
        if chunk <= 0 or not self.kv.grow(seq, seq.num_computed + chunk):
            return 0
        return chunk

    def _ensure_pages(self, seq: Sequence, num_tokens: int, batch: ScheduledBatch) -> bool:
        """Make sure `seq` has pages for `num_tokens` tokens, preempting others if memory is short."""
        if self.kv.outgrows_pool(num_tokens):
            # This sequence alone outgrew the whole pool: end it rather than preempt it forever.
            self._finish(seq, FinishReason.LENGTH)
            self._cut_off.append(seq)
            return False
        while not self.kv.grow(seq, num_tokens):
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
        self.kv.release(seq)
        self.on_release(seq)
        seq.num_preemptions += 1
        self.num_preemptions += 1
        seq.status = SeqStatus.WAITING
        self.waiting.append(seq)
        self._preempted_this_step = True
        self.reserve.after_preemption()  # memory was tighter than estimated

    def _finish(self, seq: Sequence, reason: str, stop_token_id: int | None = None) -> None:
        if seq.status is SeqStatus.RUNNING:
            self.running.remove(seq)
        elif seq.status is SeqStatus.WAITING and seq in self.waiting:
            self.waiting.remove(seq)  # preempted while its last token was on the device
        # An eos found one step late: the step after it ran on its token; forget that step's placeholder,
        # and count as computed only what the synchronous engine would have (never a placeholder's slot).
        seq.drop_pending_tokens()
        seq.num_computed = min(seq.num_computed, seq.num_tokens - 1)
        self.kv.release(seq)
        self.on_release(seq)
        seq.status = SeqStatus.FINISHED
        seq.finish_reason = reason
        seq.stop_token_id = stop_token_id

    # ------------------------------------------------------------------ a step's results
    def take_cut_off(self) -> list[Sequence]:
        """Sequences schedule() had to end (they outgrew the whole pool) since the last call."""
        cut_off, self._cut_off = self._cut_off, []
        return cut_off

    def launch(self, batch: ScheduledBatch, sampling_rows: list[int]) -> list[Sequence | None]:
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
            if row not in sampling or not seq.output_token_ids:
                self.kv.cache_computed_prefix(seq)  # prefill progress, a finished prompt too, is shareable at once
            if row not in sampling:
                continue
            if seq.held_choices and len(seq.output_token_ids) == 0:
                self._release_held_choices(seq)
            seq.add_placeholder(future_row=len(launched))
            launched.append(seq)
        return launched

    def _release_held_choices(self, first: Sequence) -> None:
        """Choice 0 finished its prompt (launch() has just cached it): queue choices 1..n-1 to start from it."""
        for held in first.held_choices:
            held.arrival_order = first.arrival_order
            self.add(held)
        first.held_choices = []

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
            reason, stop_id = stop_reason(seq, token, n_out, self.config.max_model_len, eos_token_ids)
            if reason is not None:
                self._finish(seq, reason, stop_id)
                finished.append(seq)
        return advanced, finished

    def check_invariants(self) -> None:
        """No leaked, double-owned or wrongly-referenced page (tests call this after every scenario)."""
        self.kv.check_invariants(self.running, self.waiting)

    def kv_tokens_in_use(self) -> int:
        """Tokens of KV that cannot be reclaimed now: locked tree pages plus private pages. O(running)."""
        return self.kv.kv_tokens_in_use(self.running)
