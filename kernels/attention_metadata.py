"""Per-step attention metadata, built once per forward and shared by every layer.

Both the torch reference ops and the Triton kernels take this same object, so an executor can swap
one for the other without touching the model code.

How the per-sequence fields follow from the step's lengths is written once, in `host_lengths`; every
builder (`from_lists` here, the CUDA executor's packed upload, the kernel tests' cases) starts from it.
Who builds the metadata for a running engine is the executor's attention backend
(worker.executor.attention).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch


@dataclass
class HostLengths:
    """The step's per-sequence lengths as int32 arrays, and their maxima (host ints)."""

    seq_lens: np.ndarray  # context length after this step
    extend_lens: np.ndarray  # new tokens per sequence
    prefix_lens: np.ndarray  # tokens already in the KV cache: seq_lens - extend_lens
    extend_starts: np.ndarray  # offset of each sequence's first new token in the flat [T] arrays
    max_extend_len: int
    max_seq_len: int


def host_lengths(seq_lens: list[int], extend_lens: list[int]) -> HostLengths:
    seq = np.asarray(seq_lens, dtype=np.int32)
    ext = np.asarray(extend_lens, dtype=np.int32)
    starts = np.zeros(len(ext), dtype=np.int32)
    if len(ext) > 1:
        np.cumsum(ext[:-1], out=starts[1:])
    return HostLengths(
        seq_lens=seq,
        extend_lens=ext,
        prefix_lens=seq - ext,
        extend_starts=starts,
        max_extend_len=int(ext.max()) if len(ext) else 0,
        max_seq_len=int(seq.max()) if len(seq) else 0,
    )


@dataclass
class SplitViews:
    """AttentionMetadata's fields cut at num_decodes: decode rows first, then the extend (prefill) rows."""

    decode_page_tables: torch.Tensor
    decode_seq_lens: torch.Tensor
    extend_page_tables: torch.Tensor
    extend_seq_lens: torch.Tensor
    extend_lens: torch.Tensor
    extend_starts: torch.Tensor
    max_extend_len: int


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
    # Per-step views and scratch buffers that every layer would otherwise rebuild (see `split`, `scratch`):
    # on a host-bound eager step each slice or allocation costs several microseconds, times the layers.
    _split: "SplitViews | None" = field(default=None, init=False, repr=False, compare=False)
    _scratch: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def split(self) -> "SplitViews":
        """The decode rows' and the extend rows' views of the per-sequence tensors, made once per step."""
        if self._split is None:
            d = self.num_decodes
            self._split = SplitViews(
                decode_page_tables=self.page_tables[:d],
                decode_seq_lens=self.seq_lens[:d],
                extend_page_tables=self.page_tables[d:],
                extend_seq_lens=self.seq_lens[d:],
                extend_lens=self.extend_lens[d:],
                extend_starts=self.extend_starts[d:],
                max_extend_len=max(self.extend_lens_list[d:], default=0),
            )
        return self._split

    def scratch(self, shape: tuple, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """An uninitialised buffer of this shape shared by every layer of the step (e.g. the decode kernel's
        split partials: each layer writes them and reads them back before the next layer's launch on the same
        stream, so one buffer serves all layers)."""
        key = (shape, dtype, device)
        buffer = self._scratch.get(key)
        if buffer is None:
            buffer = self._scratch[key] = torch.empty(shape, dtype=dtype, device=device)
        return buffer

    @classmethod
    def from_lists(
        cls,
        seq_lens: list[int],
        extend_lens: list[int],
        page_tables: torch.Tensor,
        out_slots: torch.Tensor,
        page_size: int,
        num_decodes: int,
    ) -> "AttentionMetadata":
        """Metadata on `page_tables`' device from the step's host lengths (one small copy per field)."""
        device = page_tables.device
        lengths = host_lengths(seq_lens, extend_lens)

        def as_tensor(values: np.ndarray) -> torch.Tensor:
            return torch.from_numpy(values).to(device, non_blocking=True)

        return cls(
            page_tables=page_tables,
            seq_lens=as_tensor(lengths.seq_lens),
            extend_lens=as_tensor(lengths.extend_lens),
            prefix_lens=as_tensor(lengths.prefix_lens),
            extend_starts=as_tensor(lengths.extend_starts),
            out_slots=out_slots,
            page_size=page_size,
            num_decodes=num_decodes,
            max_extend_len=lengths.max_extend_len,
            max_seq_len=lengths.max_seq_len,
            seq_lens_list=list(seq_lens),
            extend_lens_list=list(extend_lens),
        )

    @classmethod
    def from_batch(cls, batch) -> "AttentionMetadata":
        """Build from a `worker.engine.forward_batch.ForwardBatch` (already on the target device)."""
        return cls.from_lists(
            batch.seq_lens, batch.extend_lens, batch.page_tables, batch.out_slots, batch.page_size, batch.num_decodes
        )
