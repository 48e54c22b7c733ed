"""Penalties and masks applied to logits before sampling: repetition / frequency / presence, and min_tokens.

Two sources of per-row token counts, one penalty formula (`penalise`):
* `PenaltyCounts` (the engine's path): counts kept on the sampler's device for the life of each penalised
  sequence, built once when it first samples (prompt counted on the device), bumped in place from each
  step's sampled tokens (no host round trip, so penalised steps can overlap), released with its KV.
* `apply_penalties` (rows without a counts key, e.g. a sampler driven directly): counts rebuilt every step
  from the host lists, uploaded through pinned memory (a pageable source would make the copy wait for the
  device to drain).
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import chain
from typing import TYPE_CHECKING, Hashable

import numpy as np
import torch

from worker.engine.sampling_filters import device_tensor

if TYPE_CHECKING:
    from worker.engine.sampler import SamplingState


def token_counts(id_lists: list[list[int]], vocab: int, device: torch.device) -> torch.Tensor:
    """[R, V] int64: how often each token id occurs in each row's list (ids outside the vocab ignored).

    One flat bincount over `row * (V + 1) + id`; the extra column per row collects out-of-vocab ids.
    """
    lengths = [len(ids) for ids in id_lists]
    # numpy.fromiter is several times faster than torch.tensor on long Python lists (prompts re-sent each step)
    flat_ids = np.fromiter(chain.from_iterable(id_lists), dtype=np.int64, count=sum(lengths))
    flat_host = torch.from_numpy(flat_ids)
    if device.type == "cuda":
        flat_host = flat_host.pin_memory()
    flat = flat_host.to(device, non_blocking=True)
    rows = torch.repeat_interleave(torch.arange(len(id_lists), device=device), device_tensor(lengths, torch.long, device))
    flat = torch.where((flat >= 0) & (flat < vocab), flat, vocab)
    counts = torch.bincount(rows * (vocab + 1) + flat, minlength=len(id_lists) * (vocab + 1))
    return counts.view(len(id_lists), vocab + 1)[:, :vocab]


def penalise(sub: torch.Tensor, output_counts: torch.Tensor, prompt_seen: torch.Tensor | None,
             columns: torch.Tensor, which: tuple[bool, bool, bool]) -> torch.Tensor:
    """`sub` [R, V] penalised: repetition (prompt + output, HF style), then frequency and presence (output
    only, OpenAI style). `columns` [R, 3] holds each row's (repetition, frequency, presence); `which` says
    which of the three any row uses (decided on the host, so unused ones cost nothing)."""
    present = output_counts > 0
    if which[0]:
        seen = present if prompt_seen is None else prompt_seen | present
        penalty = columns[:, 0:1]
        sub = torch.where(seen, torch.where(sub > 0, sub / penalty, sub * penalty), sub)
    if which[1]:
        sub = sub - columns[:, 1:2] * output_counts.float()
    if which[2]:
        sub = sub - columns[:, 2:3] * present.float()
    return sub


def _penalise_rows(logits: torch.Tensor, rows: list[int], penalised_rows) -> None:
    """`logits` rows `rows` replaced by `penalised_rows(their logits)`; whole batches need no gather."""
    if rows == list(range(logits.shape[0])):
        logits.copy_(penalised_rows(logits))
        return
    index = device_tensor(rows, torch.long, logits.device)
    logits.index_copy_(0, index, penalised_rows(logits.index_select(0, index)))


def _penalty_values(states: list[SamplingState]) -> tuple[list[float], tuple[bool, bool, bool]]:
    """Rows' (repetition, frequency, presence) flattened, and which of the three any row uses."""
    values = list(chain.from_iterable(
        (s.params.repetition_penalty, s.params.frequency_penalty, s.params.presence_penalty) for s in states))
    return values, (any(r != 1.0 for r in values[0::3]), any(f != 0.0 for f in values[1::3]),
                    any(p != 0.0 for p in values[2::3]))


def apply_penalties(logits: torch.Tensor, rows: list[int], states: list[SamplingState], vocab: int) -> None:
    """In place on `logits` rows `rows`, counting each row's tokens from its host lists (see the module doc)."""
    device = logits.device
    row_states = [states[i] for i in rows]
    values, which = _penalty_values(row_states)
    output_counts = token_counts([s.output_token_ids for s in row_states], vocab, device)
    prompt_seen = token_counts([s.prompt_token_ids for s in row_states], vocab, device) > 0 if which[0] else None
    columns = device_tensor(values, torch.float32, device).view(len(rows), 3)
    _penalise_rows(logits, rows, lambda sub: penalise(sub, output_counts, prompt_seen, columns, which))


def apply_row_penalties(logits: torch.Tensor, rows: list[int], states: list[SamplingState], counts: PenaltyCounts,
                        sampling: bool) -> CountedRows | None:
    """In place on `logits` rows `rows`: rows with a counts key from `counts` on the device (the returned
    rows then take this step's tokens when `sampling`), the others from their host lists."""
    keyed = [i for i in rows if states[i].counts_key is not None]
    if len(keyed) < len(rows):
        apply_penalties(logits, [i for i in rows if states[i].counts_key is None], states, counts.vocab)
    return counts.apply(logits, keyed, states, sampling) if keyed else None


@dataclass
class _Slot:
    index: int  # row of the PenaltyCounts tensors
    num_outputs: int  # output tokens counted into it (incl. the one the launched step samples)


@dataclass
class CountedRows:
    """One step's penalised rows: where their counts live, to add the step's sampled tokens to them."""

    row_index: torch.Tensor  # [R] rows of the step's batch
    slot_index: torch.Tensor  # [R] their PenaltyCounts slots


class PenaltyCounts:
    """Per-sequence token counts of penalised sequences, on the sampler's device, keyed by a sequence key.

    Memory: slots exist only for penalised sequences that are alive (a slot is released with the sequence's
    KV: finish, abort, preemption; see `release`), in a pool grown by doubling from 4, so capacity stays at
    most max(4, twice the most penalised sequences alive at once), itself at most `max_running_requests`
    (the pool is not shrunk). A slot costs 5 bytes per vocabulary id (int32 output counts + bool
    prompt-seen) plus 12 bytes of parameters: 641 KB with Llama 3's 128,256 ids, 160 MB for 256 penalised
    sequences. No penalised request: nothing is allocated.

    A slot remembers how many outputs it counted: a row whose sequence has another number of outputs
    (e.g. resumed after a preemption whose release was missed) gets its counts rebuilt, never stale ones.
    """

    def __init__(self, vocab: int, device: torch.device, initial_capacity: int = 4):
        self.vocab = vocab
        self.device = device
        self._initial_capacity = initial_capacity
        self._slots: dict[Hashable, _Slot] = {}
        self._free: list[int] = []
        self.capacity = 0
        self.output_counts = torch.zeros(0, vocab, dtype=torch.int32, device=device)
        self.prompt_seen = torch.zeros(0, vocab, dtype=torch.bool, device=device)
        self.params = torch.zeros(0, 3, dtype=torch.float32, device=device)  # repetition, frequency, presence
        self._ones = torch.ones(0, dtype=torch.int32, device=device)
        self.num_builds = 0  # slots (re)built from host lists: once per sequence, again after each preemption

    @property
    def num_in_use(self) -> int:
        return len(self._slots)

    def release(self, key: Hashable) -> None:
        """The sequence `key` finished or was preempted: its slot is free (a no-op for unknown keys).

        Safe with a step still in flight: a new owner's counts are written behind it on the same stream."""
        slot = self._slots.pop(key, None)
        if slot is not None:
            self._free.append(slot.index)

    def apply(self, logits: torch.Tensor, rows: list[int], states: list[SamplingState], sampling: bool) -> CountedRows:
        """Penalise `logits` rows `rows` in place from their slots (built first where missing or stale).

        `sampling`: this step samples a token for each row, to be added by `count_sampled`."""
        row_states = [states[i] for i in rows]
        slots = [self._valid_slot(s) for s in row_states]
        fresh = [(slot, state) for slot, state in zip(slots, row_states) if slot.num_outputs < 0]
        if fresh:
            self._build(fresh)
        if sampling:
            for slot in slots:
                slot.num_outputs += 1
        _, which = _penalty_values(row_states)
        row_index = device_tensor(rows, torch.long, self.device)
        slot_index = device_tensor([slot.index for slot in slots], torch.long, self.device)
        prompt_seen = self.prompt_seen.index_select(0, slot_index) if which[0] else None
        counts, columns = self.output_counts.index_select(0, slot_index), self.params.index_select(0, slot_index)
        _penalise_rows(logits, rows, lambda sub: penalise(sub, counts, prompt_seen, columns, which))
        return CountedRows(row_index, slot_index)

    def count_sampled(self, rows: CountedRows, tokens: torch.Tensor) -> None:
        """Add the step's sampled `tokens` ([B] on the device) to the rows' counts, queued behind the sample."""
        chosen = tokens.index_select(0, rows.row_index)
        ones = self._ones[: len(chosen)]
        self.output_counts.index_put_((rows.slot_index, chosen), ones, accumulate=True)

    def _valid_slot(self, state: SamplingState) -> _Slot:
        """The row's slot; num_outputs -1 marks one whose counts must be (re)built from the host lists."""
        key = state.counts_key
        slot = self._slots.get(key)
        if slot is not None and slot.num_outputs == len(state.output_token_ids):
            return slot
        if slot is None:
            slot = self._slots[key] = _Slot(self._take_free_index(), -1)
        slot.num_outputs = -1
        return slot

    def _take_free_index(self) -> int:
        if not self._free:
            self._grow(max(self._initial_capacity, 2 * self.capacity))
        return self._free.pop()

    def _grow(self, capacity: int) -> None:
        def grown(old: torch.Tensor) -> torch.Tensor:
            new = torch.zeros((capacity, *old.shape[1:]), dtype=old.dtype, device=self.device)
            new[: old.shape[0]] = old
            return new

        self.output_counts, self.prompt_seen, self.params = (
            grown(self.output_counts), grown(self.prompt_seen), grown(self.params))
        self._ones = torch.ones(capacity, dtype=torch.int32, device=self.device)
        self._free.extend(range(capacity - 1, self.capacity - 1, -1))  # lowest index popped first
        self.capacity = capacity

    def _build(self, fresh: list[tuple[_Slot, SamplingState]]) -> None:
        """Counts of new (or stale) slots from their sequences' host lists: one upload each, batched."""
        states = [state for _, state in fresh]
        for state in states:
            if any(t < 0 for t in state.output_token_ids):
                # the scheduler never resumes a sequence with a token still on the device
                raise RuntimeError("penalty counts rebuilt for a sequence whose last token is not known yet")
        index = device_tensor([slot.index for slot, _ in fresh], torch.long, self.device)
        values, which = _penalty_values(states)
        self.params[index] = device_tensor(values, torch.float32, self.device).view(len(states), 3)
        outputs = token_counts([s.output_token_ids for s in states], self.vocab, self.device)
        self.output_counts[index] = outputs.to(torch.int32)
        # only repetition reads the prompt: presence / frequency rows skip its upload
        prompts = [s.prompt_token_ids if s.params.repetition_penalty != 1.0 else [] for s in states]
        self.prompt_seen[index] = token_counts(prompts, self.vocab, self.device) > 0
        for slot, state in fresh:
            slot.num_outputs = len(state.output_token_ids)
        self.num_builds += len(fresh)


def mask_stop_tokens(logits: torch.Tensor, rows: list[int], states: list[SamplingState], vocab: int) -> None:
    """min_tokens: forbid eos and stop token ids in the given rows (in place)."""
    row_ids: list[int] = []
    col_ids: list[int] = []
    for row in rows:
        state = states[row]
        banned = {t for t in (*state.eos_token_ids, *state.params.stop_token_ids) if 0 <= t < vocab}
        row_ids.extend([row] * len(banned))
        col_ids.extend(sorted(banned))
    if row_ids:
        device = logits.device
        logits[device_tensor(row_ids, torch.long, device), device_tensor(col_ids, torch.long, device)] = float("-inf")
