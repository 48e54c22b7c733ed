"""The executor interface: what the engine needs from whatever runs the model.

The scheduler and the radix cache only ever deal in page ids; the executor owns the model weights
and the KV tensors those page ids point into. Three executors plug in here:
`cpu` (torch reference ops), `cuda` (Triton kernels, CUDA graphs) and `sim` (a cost model, no tensors).
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch

from worker.engine.forward_batch import ForwardBatch


class Executor(ABC):
    #: "cpu", "cuda" or "sim"
    name: str = "abstract"

    @property
    @abstractmethod
    def device(self) -> torch.device: ...

    @abstractmethod
    def num_kv_pages(self, page_size: int) -> int:
        """How many KV pages (page 0, the scratch page, excluded) fit the configured budget."""

    @abstractmethod
    def init_kv_cache(self, num_pages: int, page_size: int) -> None:
        """Allocate the pool: `num_pages + 1` pages (page 0 is scratch) of `page_size` slots per layer."""

    @abstractmethod
    def forward(self, batch: ForwardBatch) -> torch.Tensor:
        """Run one step: write the new tokens' K/V into their slots and return float32 logits
        [len(batch.logits_indices), vocab_size] on `self.device`."""

    def shutdown(self) -> None:  # pragma: no cover - optional hook
        pass
