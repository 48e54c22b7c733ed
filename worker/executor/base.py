"""The executor interface: what the engine needs from whatever runs the model.

The scheduler and the radix cache only ever deal in page ids; the executor owns the model weights
and the KV tensors those page ids point into. Three executors plug in here:
`cpu` (torch reference ops), `cuda` (Triton kernels, CUDA graphs) and `sim` (a cost model, no tensors).

Construction: every executor is built the same way, `ExecutorClass(model_path, config: EngineConfig)`,
and registered by name in worker.executor.registry; `create_executor` (worker.engine.llm_engine) looks
the name up there and knows no executor itself. An executor reads what it needs from `config`
(`kv_cache_tokens`, `dtype` with "auto" meaning its own default, `progress`, and for CUDA the memory and
graph settings); extra keyword arguments after the two are allowed for tests (the CUDA executor's
`device` and `ops`). This is the only change to the interface below, which is otherwise as it was.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch

from worker.engine.forward_batch import ForwardBatch


def resolve_future_tokens(input_ids: torch.Tensor, future_tokens: torch.Tensor) -> torch.Tensor:
    """Input ids with every reference -(r + 1) replaced by `future_tokens[r]`, on the ids' device, no sync."""
    references = (-input_ids - 1).clamp_(min=0)
    return torch.where(input_ids < 0, future_tokens.to(input_ids.device).index_select(0, references), input_ids)


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
    def forward(self, batch: ForwardBatch, future_tokens: torch.Tensor | None = None) -> torch.Tensor:
        """Run one step: write the new tokens' K/V into their slots and return float32 logits
        [len(batch.logits_indices), vocab_size] on `self.device`.

        `future_tokens` (overlap scheduling): the previous step's sampled tokens, still on the device.
        An input id -(r + 1) stands for `future_tokens[r]`; resolve it with `resolve_future_tokens` on
        the device, before the ids are used (and before they are copied into a CUDA graph's inputs).
        """

    supports_future_tokens: bool = False  # whether forward() takes `future_tokens`
    # whether overlap scheduling is on with --overlap-schedule auto (where host and device run concurrently)
    overlap_by_default: bool = False

    def shutdown(self) -> None:  # pragma: no cover - optional hook
        pass
