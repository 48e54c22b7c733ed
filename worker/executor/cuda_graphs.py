"""CUDA graphs for decode steps: captured once at start, replayed with the step's inputs copied in.

A decode-only step launches a few hundred small kernels (about a dozen per layer); launched from
Python each costs more CPU time than the GPU needs to run it. A CUDA graph records the whole forward
once per batch size and replays it with one launch.

A graph reads its inputs from fixed device addresses, so every captured forward is built over the
same static buffers (token ids, positions, KV slots, page tables, context lengths); a step copies its
values into them from pinned host memory and replays. A batch of `bs` sequences replays the graph of
the smallest captured size >= bs; the padding rows get context length 0 (the decode kernel returns
zeros for them), position 0 and KV slot 0, which lies in the scratch page no request ever owns.

Only the decode kernels' fields of the metadata are live in a graph (page tables, context lengths,
KV slots): mixed and prefill steps, whose kernels size their launch grids from host-side lengths,
always run eagerly.
"""

from __future__ import annotations

import bisect
import logging
from typing import Callable

import torch
from tqdm.auto import tqdm

from kernels.attention_metadata import AttentionMetadata
from worker.engine.forward_batch import ForwardBatch
from worker.executor.base import resolve_future_tokens

log = logging.getLogger(__name__)

# (ForwardBatch, AttentionMetadata) -> float32 logits [B, vocab]
ForwardFn = Callable[[ForwardBatch, AttentionMetadata], torch.Tensor]


def graph_batch_sizes(max_batch_size: int) -> list[int]:
    """The decode batch sizes to capture: 1, 2, 4, 8, then steps of 8 up to 64, then steps of 16,
    and `max_batch_size` itself, so padding never costs more than 16 rows (or 2x at tiny sizes)."""
    if max_batch_size < 1:
        return []
    sizes = [1, 2, 4] + list(range(8, 65, 8)) + list(range(80, max_batch_size + 1, 16))
    sizes = sorted({s for s in sizes if s <= max_batch_size} | {max_batch_size})
    return sizes


class DecodeGraphRunner:
    """Captures and replays one CUDA graph per decode batch size (see the module docstring)."""

    def __init__(
        self,
        forward: ForwardFn,
        page_size: int,
        max_batch_size: int,
        max_pages_per_seq: int,
        device: torch.device,
    ):
        if device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA device, got {device}")
        self.forward = forward
        self.page_size = page_size
        self.max_batch_size = max_batch_size
        self.max_pages_per_seq = max_pages_per_seq
        self.device = device
        self.batch_sizes: list[int] = []
        self._graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self._logits: torch.Tensor | None = None  # [max_batch_size, vocab] float32, written by every graph

        n = max_batch_size
        # Static device inputs. Rows of one int64 block: token ids, positions, KV slots.
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
        self._copied = torch.cuda.Event()
        self._copied.record()

    # ------------------------------------------------------------------ capture
    def _static_step(self, bs: int) -> tuple[ForwardBatch, AttentionMetadata]:
        """The ForwardBatch and metadata of a `bs`-row decode step, as views of the static buffers."""
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

    def capture(self, progress: bool = True) -> None:
        """Capture a graph for every size of graph_batch_sizes(max_batch_size), largest first, so the
        smaller ones reuse the largest one's memory pool."""
        sizes = graph_batch_sizes(self.max_batch_size)
        self._tokens.zero_()
        self._seq_lens.zero_()  # every row is padding while capturing: context 0, slot 0 (scratch page)
        self._page_tables.zero_()
        pool = None
        stream = torch.cuda.Stream(self.device)
        with tqdm(total=len(sizes), desc="Capturing CUDA graphs", unit="graph", disable=not progress) as bar:
            for bs in reversed(sizes):
                batch, meta = self._static_step(bs)
                # Warm up on a side stream (Triton compiles, cuBLAS picks its kernels) outside the capture.
                stream.wait_stream(torch.cuda.current_stream(self.device))
                with torch.cuda.stream(stream):
                    warm = self.forward(batch, meta)
                torch.cuda.current_stream(self.device).wait_stream(stream)
                if self._logits is None:
                    # Every graph leaves its logits in this one buffer: a graph's own output would stay
                    # allocated for its lifetime, and ~25 of them add up to GiBs at a 150k vocabulary.
                    self._logits = torch.empty(
                        (self.max_batch_size, warm.shape[1]), dtype=warm.dtype, device=self.device
                    )
                del warm
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    self._logits[:bs].copy_(self.forward(batch, meta))
                pool = graph.pool()
                self._graphs[bs] = graph
                bar.set_postfix_str(f"bs={bs}")
                bar.update()
        torch.cuda.synchronize(self.device)
        self.batch_sizes = sizes

    # ------------------------------------------------------------------ replay
    def can_run(self, batch: ForwardBatch) -> bool:
        """True for a decode-only step that fits the captured sizes and the static page-table width."""
        bs = batch.batch_size
        return (
            bool(self.batch_sizes)
            and 0 < bs <= self.batch_sizes[-1]
            and batch.num_decodes == bs
            and batch.num_tokens == bs
            and batch.logits_indices.shape[0] == bs
            and batch.page_tables.shape[1] <= self.max_pages_per_seq
        )

    def padded_size(self, bs: int) -> int:
        """The captured batch size a `bs`-row step replays."""
        return self.batch_sizes[bisect.bisect_left(self.batch_sizes, bs)]

    def run(self, batch: ForwardBatch, future_tokens: torch.Tensor | None = None) -> torch.Tensor:
        """Copy the step's inputs into the static buffers and replay; returns logits [bs, vocab].

        `future_tokens`: see Executor.forward; references in the token ids are resolved on the device,
        in the static buffer, before the replay. The result is a view of the graph's output buffer: the
        next replay overwrites it.
        """
        bs = batch.batch_size
        graph_bs = self.padded_size(bs)
        width = batch.page_tables.shape[1]
        self._copied.synchronize()  # the previous step's copies have read the host mirrors

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
        self._copied.record()
        if future_tokens is not None:
            ids = self._tokens[0, :bs]
            ids.copy_(resolve_future_tokens(ids, future_tokens))
        self._graphs[graph_bs].replay()
        return self._logits[:bs]
