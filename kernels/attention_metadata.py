"""Per-step attention metadata, built once per forward and shared by every layer.

Both the torch reference ops and the Triton kernels take this same object, so an executor can swap
one for the other without touching the model code.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class AttentionMetadata:
    page_tables: torch.Tensor  # [B, max_pages] int32
    seq_lens: torch.Tensor  # [B] int32, context length after this step
    extend_lens: torch.Tensor  # [B] int32, new tokens per sequence
    prefix_lens: torch.Tensor  # [B] int32, tokens already in the KV cache before this step
    extend_starts: torch.Tensor  # [B] int32, offset of each sequence's first new token in the flat [T] arrays
    out_slots: torch.Tensor  # [T] int64, where each new token's K/V is written
    page_size: int
    num_decodes: int  # the first num_decodes sequences have extend_len == 1
    max_extend_len: int
    max_seq_len: int
    seq_lens_list: list[int]
    extend_lens_list: list[int]

    @classmethod
    def from_batch(cls, batch) -> "AttentionMetadata":
        """Build from a `worker.engine.forward_batch.ForwardBatch` (already on the target device)."""
        device = batch.input_ids.device
        seq_lens = list(batch.seq_lens)
        extend_lens = list(batch.extend_lens)
        prefix_lens = [s - e for s, e in zip(seq_lens, extend_lens)]
        starts, acc = [], 0
        for e in extend_lens:
            starts.append(acc)
            acc += e

        def as_tensor(values: list[int]) -> torch.Tensor:
            return torch.tensor(values, dtype=torch.int32).to(device, non_blocking=True)

        return cls(
            page_tables=batch.page_tables,
            seq_lens=as_tensor(seq_lens),
            extend_lens=as_tensor(extend_lens),
            prefix_lens=as_tensor(prefix_lens),
            extend_starts=as_tensor(starts),
            out_slots=batch.out_slots,
            page_size=batch.page_size,
            num_decodes=batch.num_decodes,
            max_extend_len=max(extend_lens, default=0),
            max_seq_len=max(seq_lens, default=0),
            seq_lens_list=seq_lens,
            extend_lens_list=extend_lens,
        )
