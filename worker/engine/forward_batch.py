"""The plain-data description of one model step, handed from the model runner to an executor.

A step computes `extend_lens[b]` new tokens for each sequence b (a chunk of prompt, or one decode
token). Sequences are ordered decodes first (extend_len == 1 and already holding KV), then prefill
chunks. New tokens of all sequences are concatenated into flat [T] tensors.

KV addressing: the pool holds `num_pages` pages of `page_size` slots; slot = page * page_size + offset.
Page 0 is a scratch page that is never handed to a request (padding writes may land there).
`page_tables[b, i]` is the page holding positions [i*page_size, (i+1)*page_size) of sequence b.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


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

    @property
    def prefix_lens(self) -> list[int]:
        return [s - e for s, e in zip(self.seq_lens, self.extend_lens)]

    def to(self, device: torch.device | str) -> "ForwardBatch":
        return ForwardBatch(
            input_ids=self.input_ids.to(device, non_blocking=True),
            positions=self.positions.to(device, non_blocking=True),
            out_slots=self.out_slots.to(device, non_blocking=True),
            page_tables=self.page_tables.to(device, non_blocking=True),
            seq_lens=self.seq_lens,
            extend_lens=self.extend_lens,
            logits_indices=self.logits_indices.to(device, non_blocking=True),
            num_decodes=self.num_decodes,
            page_size=self.page_size,
        )
