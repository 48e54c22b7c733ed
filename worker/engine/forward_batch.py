"""The plain-data description of one model step (`ForwardBatch`), and the one place it is built from
the scheduler's output (`build_forward_batch`), together with the sampler's per-row states.

This is the only code that knows both the scheduler's view (sequences, pages) and the executor's
(flat token tensors, slots, page tables), so neither has to know the other. Each executor turns a
ForwardBatch into its attention metadata itself (worker.executor.attention).

A step computes `extend_lens[b]` new tokens for each sequence b (a chunk of prompt, or one decode
token). Sequences are ordered decodes first (extend_len == 1 and already holding KV), then prefill
chunks. New tokens of all sequences are concatenated into flat [T] tensors.

KV addressing: the pool holds `num_pages` pages of `page_size` slots; slot = page * page_size + offset.
Page 0 is a scratch page that is never handed to a request (padding writes may land there).
`page_tables[b, i]` is the page holding positions [i*page_size, (i+1)*page_size) of sequence b.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import chain
from typing import TYPE_CHECKING

import numpy as np
import torch

from worker.engine.sampler import SamplingState

if TYPE_CHECKING:  # the scheduler's output type; importing it here would make this contract depend on the scheduler
    from worker.engine.scheduler import ScheduledBatch


@dataclass
class ForwardBatch:
    input_ids: torch.Tensor  # [T] int64: the new tokens, all sequences concatenated
    positions: torch.Tensor  # [T] int64: absolute position of each new token in its sequence
    out_slots: torch.Tensor  # [T] int64: KV slot where each new token's K and V are written
    page_tables: torch.Tensor  # [B, max_pages] int32, padded with 0 (the scratch page)
    seq_lens: list[int]  # [B] context length after this step (cached prefix + new tokens)
    extend_lens: list[int]  # [B] new tokens per sequence
    logits_indices: torch.Tensor  # [L] int64: rows of T whose logits the step returns, in batch order
    num_decodes: int  # the first num_decodes sequences are single-token decodes
    page_size: int

    @property
    def batch_size(self) -> int:
        return len(self.seq_lens)

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[0])


def _token_slice(seq, start: int, end: int) -> list[int]:
    """seq.token_ids()[start:end] without concatenating the whole prompt and output each step."""
    prompt = seq.prompt_token_ids
    n_prompt = len(prompt)
    if end <= n_prompt:
        return prompt[start:end]
    output = seq.output_token_ids
    if start >= n_prompt:
        return output[start - n_prompt : end - n_prompt]
    return prompt[start:] + output[: end - n_prompt]


def build_forward_batch(batch: ScheduledBatch, page_size: int) -> tuple[ForwardBatch, list[int]]:
    """Returns the ForwardBatch (on CPU; the executor moves it) and the batch rows that sample.

    Rows that sample are those whose chunk reaches their last token; their logits come back in that order.
    Per-step host work is on the engine's critical path (every decode step pays it), so single-token
    rows are handled with plain integer arithmetic and only prefill chunks use numpy ranges.

    Overlap scheduling: a decode whose input token is still on the device (a placeholder) gets the input
    id -(r + 1), r being that token's row in the previous step's sampled-token tensor; the executor
    swaps it for the real token on the device (`Executor.forward(..., future_tokens=...)`).
    """
    input_ids: list[int] = []
    positions: list[np.ndarray] = []
    slots: list[np.ndarray] = []
    one_positions: list[int] = []  # rows computing one token (decodes come first in the batch)
    one_slots: list[int] = []
    seq_lens: list[int] = []
    extend_lens: list[int] = []
    logits_indices: list[int] = []
    sampling_rows: list[int] = []
    max_pages = 0
    for row, (seq, n_new) in enumerate(zip(batch.seqs, batch.num_new_tokens)):
        start = seq.num_computed
        end = start + n_new
        if seq.num_pending_tokens and end == seq.num_tokens:
            if n_new != 1:  # the scheduler re-admits a sequence only once its tokens are all known
                raise RuntimeError(f"sequence {seq.seq_id} would prefill a token not sampled yet")
            input_ids.append(-(seq.future_row + 1))
        else:
            input_ids.extend(_token_slice(seq, start, end))
        if n_new == 1 and not positions:
            one_positions.append(start)
            one_slots.append(seq.pages[start // page_size] * page_size + start % page_size)
        else:
            pos = np.arange(start, end, dtype=np.int64)
            pages = np.asarray(seq.pages[: -(-end // page_size)], dtype=np.int64)
            positions.append(pos)
            slots.append(pages[pos // page_size] * page_size + pos % page_size)
        seq_lens.append(end)
        extend_lens.append(n_new)
        max_pages = max(max_pages, -(-end // page_size))
        if end == seq.num_tokens:
            logits_indices.append(len(input_ids) - 1)
            sampling_rows.append(row)
    if one_positions:
        positions.insert(0, np.asarray(one_positions, dtype=np.int64))
        slots.insert(0, np.asarray(one_slots, dtype=np.int64))

    # One conversion of every row's pages, scattered through a mask of each row's first n columns (row-major
    # order is the rows' concatenation): a numpy assignment per row cost ~1 ms a step at 64 rows of 3.6k tokens.
    pages_per_row = [-(-n // page_size) for n in seq_lens]
    page_tables = np.zeros((len(batch.seqs), max(max_pages, 1)), dtype=np.int32)
    flat = np.fromiter(chain.from_iterable(seq.pages[:n] for seq, n in zip(batch.seqs, pages_per_row)),
                       dtype=np.int32, count=sum(pages_per_row))
    page_tables[np.arange(page_tables.shape[1]) < np.asarray(pages_per_row, dtype=np.int64)[:, None]] = flat

    forward_batch = ForwardBatch(
        input_ids=torch.tensor(input_ids, dtype=torch.int64),
        positions=torch.from_numpy(np.concatenate(positions)) if positions else torch.empty(0, dtype=torch.int64),
        out_slots=torch.from_numpy(np.concatenate(slots)) if slots else torch.empty(0, dtype=torch.int64),
        page_tables=torch.from_numpy(page_tables),
        seq_lens=seq_lens,
        extend_lens=extend_lens,
        logits_indices=torch.tensor(logits_indices, dtype=torch.int64),
        num_decodes=batch.num_decodes,
        page_size=page_size,
    )
    return forward_batch, sampling_rows


def sampling_states(batch: ScheduledBatch, rows: list[int], eos_token_ids: tuple[int, ...]) -> list[SamplingState]:
    return [
        SamplingState(
            params=batch.seqs[r].params,
            prompt_token_ids=batch.seqs[r].prompt_token_ids,
            output_token_ids=batch.seqs[r].output_token_ids,
            choice_index=batch.seqs[r].index,
            eos_token_ids=eos_token_ids,
            counts_key=batch.seqs[r].seq_id,
        )
        for r in rows
    ]
