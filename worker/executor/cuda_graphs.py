"""CUDA graphs for decode steps: captured once at start, replayed with the step's inputs copied in.

A decode-only step launches a few hundred small kernels (about a dozen per layer); launched from
Python each costs more CPU time than the GPU needs to run it. A CUDA graph records the whole forward
once per batch size and replays it with one launch.

The graph's inputs live in the attention backend's static buffers (worker.executor.cuda_attention):
`prepare_for_capture` gives the views a graph is captured over, `prepare_for_replay` copies a step's
values into them. A batch of `bs` sequences replays the graph of the smallest captured size >= bs.

Only decode-only steps run here: mixed and prefill steps, whose kernels size their launch grids from
host-side lengths, always run eagerly.
"""

from __future__ import annotations

import bisect
import logging
from typing import Callable

import torch
from tqdm.auto import tqdm

from kernels.attention_metadata import AttentionMetadata
from worker.engine.forward_batch import ForwardBatch
from worker.executor.cuda_attention import CudaAttentionBackend

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
        attention: CudaAttentionBackend,
        page_size: int,
        max_batch_size: int,
        max_pages_per_seq: int,
        device: torch.device,
    ):
        if device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA device, got {device}")
        self.forward = forward
        self.attention = attention
        self.page_size = page_size
        self.max_batch_size = max_batch_size
        self.max_pages_per_seq = max_pages_per_seq
        self.device = device
        self.batch_sizes: list[int] = []
        self._graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self._logits: torch.Tensor | None = None  # [max_batch_size, vocab] float32, written by every graph
        attention.allocate_graph_inputs(max_batch_size, max_pages_per_seq, page_size)

    # ------------------------------------------------------------------ capture
    def capture(self, progress: bool = True) -> None:
        """Capture a graph for every size of graph_batch_sizes(max_batch_size), largest first, so the
        smaller ones reuse the largest one's memory pool."""
        sizes = graph_batch_sizes(self.max_batch_size)
        self.attention.clear_graph_inputs()
        pool = None
        stream = torch.cuda.Stream(self.device)
        with tqdm(total=len(sizes), desc="Capturing CUDA graphs", unit="graph", disable=not progress) as bar:
            for bs in reversed(sizes):
                batch, meta = self.attention.prepare_for_capture(bs)
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
                # Fresh metadata for the capture: the warm-up's holds buffers it made outside any graph pool
                # (its split partials, AttentionMetadata.scratch). A graph captured over them would keep
                # writing into memory the allocator hands to other tensors once they are freed.
                batch, meta = self.attention.prepare_for_capture(bs)
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

        `future_tokens`: see Executor.forward. The result is a view of the graph's output buffer: the
        next replay overwrites it.
        """
        bs = batch.batch_size
        graph_bs = self.padded_size(bs)
        self.attention.prepare_for_replay(batch, graph_bs, future_tokens)
        self._graphs[graph_bs].replay()
        return self._logits[:bs]
