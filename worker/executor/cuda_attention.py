"""The CUDA executor's attention backend: every step's batch and metadata, eager or in a CUDA graph.

Eager steps (`prepare`): the host batch is packed into two pinned host buffers (int64, int32) and moved
with one non_blocking copy per dtype, and the metadata is made of views of the device copies, so the
model never makes its own small synchronous copies. The device buffers are reused from step to step;
that is safe because every step runs on one stream, so a copy into them is ordered after the previous
step's kernels. The host buffers are rewritten only after the previous step's copies completed (an event).

Graph steps: a graph reads its inputs from fixed device addresses, so every captured forward is built
over the same static buffers (token ids, positions, KV slots, page tables, context lengths), allocated
by `allocate_graph_inputs`. `prepare_for_capture` returns views of them; `prepare_for_replay` copies a
step's values into them from pinned host memory. Padding rows (a batch of `bs` rows replays the graph of
the smallest captured size >= bs) get context length 0 (the decode kernel returns zeros for them),
position 0 and KV slot 0, which lies in the scratch page no request ever owns. Only the decode kernels'
fields of the metadata are live in a graph (page tables, context lengths, KV slots).
"""

from __future__ import annotations

import torch

from kernels.attention_metadata import AttentionMetadata, host_lengths
from worker.engine.forward_batch import ForwardBatch
from worker.executor.attention import AttentionBackend
from worker.executor.base import resolve_future_tokens

_ALIGN = 16  # elements


def _offsets(sizes: list[int]) -> list[int]:
    """Start offsets of consecutive fields, each rounded up to _ALIGN elements; the last entry is the total."""
    offsets, at = [], 0
    for size in sizes:
        offsets.append(at)
        at += -(-size // _ALIGN) * _ALIGN
    offsets.append(at)
    return offsets


class CudaAttentionBackend(AttentionBackend):
    """See the module docstring. On a non-CUDA device (tests) the host buffers are not pinned."""

    def __init__(self, device: torch.device):
        self.device = device
        self.page_size = 0  # of the graphs' static step, set by allocate_graph_inputs
        self.pin = device.type == "cuda"
        self._host_i64 = self._dev_i64 = None
        self._host_i32 = self._dev_i32 = None
        self._copied = torch.cuda.Event() if self.pin else None
        self.max_graph_batch_size = 0
        self.max_pages_per_seq = 0

    # ------------------------------------------------------------------ eager steps
    def _buffers(self, attr: str, size: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        host, dev = getattr(self, f"_host_{attr}"), getattr(self, f"_dev_{attr}")
        if host is None or host.numel() < size:
            capacity = 1 << max(12, (size - 1).bit_length())  # grow by powers of two
            host = torch.empty(capacity, dtype=dtype, pin_memory=self.pin)
            dev = torch.empty(capacity, dtype=dtype, device=self.device)
            setattr(self, f"_host_{attr}", host)
            setattr(self, f"_dev_{attr}", dev)
        return host, dev

    def prepare(self, batch: ForwardBatch) -> tuple[ForwardBatch, AttentionMetadata]:
        num_tokens, batch_size = batch.num_tokens, batch.batch_size
        num_logits = int(batch.logits_indices.shape[0])
        width = int(batch.page_tables.shape[1])
        lengths = host_lengths(batch.seq_lens, batch.extend_lens)

        if self._copied is not None:
            self._copied.synchronize()
        # Each field starts at a multiple of 16 elements: every device view is then 64-byte aligned, so
        # Triton compiles one (vectorised) variant per kernel instead of one per alignment it meets.
        o64 = _offsets([num_tokens, num_tokens, num_tokens, num_logits])
        host64, dev64 = self._buffers("i64", o64[-1], torch.int64)
        h64 = host64.numpy()
        h64[o64[0] : o64[0] + num_tokens] = batch.input_ids.numpy()
        h64[o64[1] : o64[1] + num_tokens] = batch.positions.numpy()
        h64[o64[2] : o64[2] + num_tokens] = batch.out_slots.numpy()
        h64[o64[3] : o64[3] + num_logits] = batch.logits_indices.numpy()

        o32 = _offsets([batch_size, batch_size, batch_size, batch_size, batch_size * width])
        host32, dev32 = self._buffers("i32", o32[-1], torch.int32)
        h32 = host32.numpy()
        h32[o32[0] : o32[0] + batch_size] = lengths.seq_lens
        h32[o32[1] : o32[1] + batch_size] = lengths.extend_lens
        h32[o32[2] : o32[2] + batch_size] = lengths.prefix_lens
        h32[o32[3] : o32[3] + batch_size] = lengths.extend_starts
        h32[o32[4] : o32[4] + batch_size * width] = batch.page_tables.numpy().reshape(-1)

        d64 = dev64[: o64[-1]]
        d64.copy_(host64[: o64[-1]], non_blocking=True)
        d32 = dev32[: o32[-1]]
        d32.copy_(host32[: o32[-1]], non_blocking=True)
        if self._copied is not None:
            self._copied.record()

        page_tables = d32[o32[4] : o32[4] + batch_size * width].view(batch_size, width)
        out_slots = d64[o64[2] : o64[2] + num_tokens]
        on_device = ForwardBatch(
            input_ids=d64[o64[0] : o64[0] + num_tokens],
            positions=d64[o64[1] : o64[1] + num_tokens],
            out_slots=out_slots,
            page_tables=page_tables,
            seq_lens=batch.seq_lens,
            extend_lens=batch.extend_lens,
            logits_indices=d64[o64[3] : o64[3] + num_logits],
            num_decodes=batch.num_decodes,
            page_size=batch.page_size,
        )
        meta = AttentionMetadata(
            page_tables=page_tables,
            seq_lens=d32[o32[0] : o32[0] + batch_size],
            extend_lens=d32[o32[1] : o32[1] + batch_size],
            prefix_lens=d32[o32[2] : o32[2] + batch_size],
            extend_starts=d32[o32[3] : o32[3] + batch_size],
            out_slots=out_slots,
            page_size=batch.page_size,
            num_decodes=batch.num_decodes,
            max_extend_len=lengths.max_extend_len,
            max_seq_len=lengths.max_seq_len,
            seq_lens_list=list(batch.seq_lens),
            extend_lens_list=list(batch.extend_lens),
        )
        return on_device, meta

    # ------------------------------------------------------------------ CUDA graphs
    def allocate_graph_inputs(self, max_batch_size: int, max_pages_per_seq: int, page_size: int) -> None:
        """The static device buffers every captured graph reads, and their pinned host mirrors."""
        n, device = max_batch_size, self.device
        self.page_size = page_size
        self.max_graph_batch_size = n
        self.max_pages_per_seq = max_pages_per_seq
        # Rows of one int64 block: token ids, positions, KV slots.
        self._tokens = torch.zeros(3, n, dtype=torch.int64, device=device)
        self._seq_lens = torch.zeros(n, dtype=torch.int32, device=device)
        self._page_tables = torch.zeros(n, max_pages_per_seq, dtype=torch.int32, device=device)
        self._page_table_stage = torch.zeros(n * max_pages_per_seq, dtype=torch.int32, device=device)
        # Constant per-row fields of a decode step.
        self._rows = torch.arange(n, dtype=torch.int64, device=device)
        self._ones = torch.ones(n, dtype=torch.int32, device=device)
        self._starts = torch.arange(n, dtype=torch.int32, device=device)
        self._zeros = torch.zeros(n, dtype=torch.int32, device=device)
        # Pinned host mirrors: a step fills these, then copies them in with non_blocking copies.
        self._host_tokens = torch.zeros(3, n, dtype=torch.int64, pin_memory=True)
        self._host_seq_lens = torch.zeros(n, dtype=torch.int32, pin_memory=True)
        self._host_page_tables = torch.zeros(n * max_pages_per_seq, dtype=torch.int32, pin_memory=True)
        self._np_tokens = self._host_tokens.numpy()
        self._np_seq_lens = self._host_seq_lens.numpy()
        self._np_page_tables = self._host_page_tables.numpy()
        # Set after the copies of a step are queued: the host mirrors are rewritten only once it completed.
        self._graph_copied = torch.cuda.Event()
        self._graph_copied.record()

    def clear_graph_inputs(self) -> None:
        """Every row padding (context 0, slot 0 in the scratch page): the state graphs are captured in."""
        self._tokens.zero_()
        self._seq_lens.zero_()
        self._page_tables.zero_()

    def prepare_for_capture(self, batch_size: int) -> tuple[ForwardBatch, AttentionMetadata]:
        """The ForwardBatch and metadata of a `batch_size`-row decode step, as views of the static buffers."""
        bs = batch_size
        page_tables = self._page_tables[:bs]
        batch = ForwardBatch(
            input_ids=self._tokens[0, :bs],
            positions=self._tokens[1, :bs],
            out_slots=self._tokens[2, :bs],
            page_tables=page_tables,
            seq_lens=[1] * bs,  # host lists are never read on the graph path
            extend_lens=[1] * bs,
            logits_indices=self._rows[:bs],
            num_decodes=bs,
            page_size=self.page_size,
        )
        meta = AttentionMetadata(
            page_tables=page_tables,
            seq_lens=self._seq_lens[:bs],
            extend_lens=self._ones[:bs],
            prefix_lens=self._zeros[:bs],  # not read by the decode kernels
            extend_starts=self._starts[:bs],
            out_slots=self._tokens[2, :bs],
            page_size=self.page_size,
            num_decodes=bs,
            max_extend_len=1,
            max_seq_len=self.max_pages_per_seq * self.page_size,
            seq_lens_list=[1] * bs,
            extend_lens_list=[1] * bs,
        )
        return batch, meta

    def prepare_for_replay(
        self, batch: ForwardBatch, graph_batch_size: int, future_tokens: torch.Tensor | None = None
    ) -> None:
        """Copy a decode step's inputs into the static buffers; rows bs..graph_batch_size-1 become padding.

        `future_tokens`: see Executor.forward; references in the token ids are resolved on the device,
        in the static buffer, before the replay."""
        bs = batch.batch_size
        graph_bs = graph_batch_size
        width = batch.page_tables.shape[1]
        self._graph_copied.synchronize()  # the previous step's copies have read the host mirrors

        # numpy views of the pinned mirrors: an assignment costs ~1 us, a torch op ~5 us (this is per step).
        tokens = self._np_tokens
        positions = batch.positions.numpy()
        tokens[0, :bs] = batch.input_ids.numpy()
        tokens[1, :bs] = positions
        tokens[2, :bs] = batch.out_slots.numpy()
        seq_lens = self._np_seq_lens
        seq_lens[:bs] = positions + 1  # a decode row's context ends with its new token
        if graph_bs > bs:
            tokens[:, bs:graph_bs] = 0
            seq_lens[bs:graph_bs] = 0
        self._np_page_tables[: bs * width] = batch.page_tables.numpy().reshape(-1)

        # Whole dense blocks (a few KB): a strided host slice would go through a pageable temporary.
        self._tokens.copy_(self._host_tokens, non_blocking=True)
        self._seq_lens.copy_(self._host_seq_lens, non_blocking=True)
        staged = self._page_table_stage[: bs * width]
        staged.copy_(self._host_page_tables[: bs * width], non_blocking=True)
        # Columns past `width` keep stale page ids: the kernel reads only the pages below seq_len.
        self._page_tables[:bs, :width].copy_(staged.view(bs, width))
        self._graph_copied.record()
        if future_tokens is not None:
            ids = self._tokens[0, :bs]
            ids.copy_(resolve_future_tokens(ids, future_tokens))
