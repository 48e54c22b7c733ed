"""The CPU executor: the Llama-family model on torch reference ops, KV pool in host memory.

It is the ground-truth path (exact against transformers in float32) and what the engine runs on a
machine without a GPU. The KV budget is a token count, because host memory has no "free fraction".
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from worker.config import EngineConfig
from worker.engine.forward_batch import ForwardBatch
from worker.executor.attention import HostAttentionBackend
from worker.executor.base import Executor, resolve_future_tokens
from worker.models.config import ModelConfig, parse_dtype
from worker.models.loader import load_model


class CPUExecutor(Executor):
    name = "cpu"
    supports_future_tokens = True

    def __init__(self, model_path: str | Path, config: EngineConfig):
        """Reads `config.kv_cache_tokens` (the KV budget), `config.dtype` ("auto": float32) and `config.progress`."""
        if config.kv_cache_tokens <= 0:
            raise ValueError(f"kv_cache_tokens must be positive, got {config.kv_cache_tokens}")
        self.kv_cache_tokens = int(config.kv_cache_tokens)
        self.dtype = torch.float32 if config.dtype == "auto" else parse_dtype(config.dtype)
        self.model, self.model_config = load_model(model_path, "cpu", self.dtype, progress=config.progress)
        self.kv_caches: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.page_size: int | None = None
        self.attention = HostAttentionBackend()

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    def num_kv_pages(self, page_size: int) -> int:
        if page_size <= 0:
            raise ValueError(f"page_size must be positive, got {page_size}")
        return self.kv_cache_tokens // page_size

    def init_kv_cache(self, num_pages: int, page_size: int) -> None:
        """Per layer, K and V of `(num_pages + 1) * page_size` slots; page 0 is the scratch page."""
        if num_pages <= 0 or page_size <= 0:
            raise ValueError(f"num_pages and page_size must be positive, got {num_pages}, {page_size}")
        cfg: ModelConfig = self.model_config
        shape = ((num_pages + 1) * page_size, cfg.num_key_value_heads, cfg.head_dim)
        self.kv_caches = [
            (torch.zeros(shape, dtype=self.dtype), torch.zeros(shape, dtype=self.dtype))
            for _ in range(cfg.num_hidden_layers)
        ]
        self.page_size = page_size

    def forward(self, batch: ForwardBatch, future_tokens: torch.Tensor | None = None) -> torch.Tensor:
        if not self.kv_caches:
            raise RuntimeError("CPUExecutor.forward called before init_kv_cache")
        if batch.page_size != self.page_size:
            raise ValueError(f"batch page_size {batch.page_size} != KV cache page_size {self.page_size}")
        if future_tokens is not None:
            batch = dataclasses.replace(batch, input_ids=resolve_future_tokens(batch.input_ids, future_tokens))
        batch, meta = self.attention.prepare(batch)
        with torch.inference_mode():
            return self.model(batch, self.kv_caches, meta)
