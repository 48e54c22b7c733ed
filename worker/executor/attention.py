"""Attention backends: the one object per executor that turns a step into what attention reads.

An executor hands every step's ForwardBatch (built on the host, worker.engine.forward_batch) to its
backend and gets back the batch and its `AttentionMetadata` on the executor's device; the model's
layers all read that one metadata object. Three entry points, after mini-sglang's attention backends:

- `prepare(batch)`: an eager step;
- `prepare_for_capture(batch_size)`: the batch and metadata of a CUDA-graph capture, as views of
  fixed device buffers (a graph reads its inputs from fixed addresses);
- `prepare_for_replay(batch, graph_batch_size, future_tokens)`: copy a step's values into those buffers
  before the graph of `graph_batch_size` rows is replayed.

Backends without graphs implement only `prepare`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch

from kernels.attention_metadata import AttentionMetadata
from worker.engine.forward_batch import ForwardBatch


class AttentionBackend(ABC):
    @abstractmethod
    def prepare(self, batch: ForwardBatch) -> tuple[ForwardBatch, AttentionMetadata]:
        """The step on the executor's device, and its metadata."""

    def prepare_for_capture(self, batch_size: int) -> tuple[ForwardBatch, AttentionMetadata]:
        raise NotImplementedError(f"{type(self).__name__} does not capture CUDA graphs")

    def prepare_for_replay(
        self, batch: ForwardBatch, graph_batch_size: int, future_tokens: torch.Tensor | None = None
    ) -> None:
        raise NotImplementedError(f"{type(self).__name__} does not replay CUDA graphs")


class HostAttentionBackend(AttentionBackend):
    """For a batch already on its device (the CPU executor): metadata from the batch's host lengths."""

    def prepare(self, batch: ForwardBatch) -> tuple[ForwardBatch, AttentionMetadata]:
        return batch, AttentionMetadata.from_batch(batch)
