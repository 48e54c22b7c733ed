"""Penalties and masks applied to logits before sampling: repetition / frequency / presence, and min_tokens.

Per-row token counts come from one flat bincount on the device; the host lists are uploaded through
pinned memory (a pageable source would make the copy wait for the device to drain).
"""

from __future__ import annotations

from itertools import chain
from typing import TYPE_CHECKING

import numpy as np
import torch

from worker.engine.sampling_filters import device_tensor

if TYPE_CHECKING:
    from worker.engine.sampler import SamplingState


def token_counts(id_lists: list[list[int]], vocab: int, device: torch.device) -> torch.Tensor:
    """[R, V] float32: how often each token id occurs in each row's list (ids outside the vocab ignored).

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
    return counts.view(len(id_lists), vocab + 1)[:, :vocab].float()


def apply_penalties(logits: torch.Tensor, rows: list[int], states: list[SamplingState], vocab: int) -> None:
    """In place on `logits` rows `rows`: repetition (prompt + output, HF style), then frequency and presence
    (output only, OpenAI style)."""
    device = logits.device
    index = device_tensor(rows, torch.long, device)
    params = [states[i].params for i in rows]
    sub = logits.index_select(0, index)
    output_counts = token_counts([states[i].output_token_ids for i in rows], vocab, device)

    def column(values: list[float]) -> torch.Tensor:
        return device_tensor(values, torch.float32, device).unsqueeze(1)

    repetition = [p.repetition_penalty for p in params]
    if any(r != 1.0 for r in repetition):
        seen = (token_counts([states[i].prompt_token_ids for i in rows], vocab, device) > 0) | (output_counts > 0)
        penalty = column(repetition)
        penalised = torch.where(sub > 0, sub / penalty, sub * penalty)
        sub = torch.where(seen, penalised, sub)

    frequency = [p.frequency_penalty for p in params]
    if any(f != 0.0 for f in frequency):
        sub = sub - column(frequency) * output_counts
    presence = [p.presence_penalty for p in params]
    if any(p != 0.0 for p in presence):
        sub = sub - column(presence) * (output_counts > 0).float()
    logits.index_copy_(0, index, sub)


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
