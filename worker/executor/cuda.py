"""The CUDA executor: the Llama-family model in bf16 on one GPU, Triton kernels, CUDA graphs for decode.

What it adds to the model code:
- weights loaded straight onto the GPU in config.dtype ("auto": bfloat16), ops = kernels.triton_ops;
- a KV pool sized like vLLM's gpu_memory_utilization: the process may use `mem_fraction` of the GPU's
  total memory; the pool gets what is left after the weights, everything else already in use on the
  device, the peak activations of a `max_num_batched_tokens` step (measured by running one) and a
  reserve for the CUDA graphs;
- one attention backend (worker.executor.cuda_attention) that packs each step into pinned host buffers,
  moves it with one non_blocking copy per dtype and builds its attention metadata on the device (so the
  model never makes its own small synchronous copies), and holds the CUDA graphs' static inputs;
- decode steps replayed from CUDA graphs (worker.executor.cuda_graphs); prefill, extend and mixed steps up
  to --piecewise-cuda-graph-max-tokens from piecewise graphs (worker.executor.piecewise_graphs: all but
  attention in graphs of token-count buckets, attention eager between them); larger steps eager;
- a short kernel warm-up at start (prefill, extend, mixed and decode shapes) so Triton compiles before
  the first request rather than in the middle of live traffic.

forward() returns float32 logits on the GPU; the sampler runs there too.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from types import ModuleType

import torch
from tqdm.auto import tqdm

from kernels.attention_metadata import AttentionMetadata
from worker.config import ConfigError, EngineConfig
from worker.engine.forward_batch import ForwardBatch
from worker.engine.step_budget import with_step_token_budget
from worker.executor.base import Executor, resolve_future_tokens
from worker.executor.cuda_attention import CudaAttentionBackend
from worker.executor.cuda_graphs import DecodeGraphRunner
from worker.executor.piecewise_graphs import PiecewiseGraphRunner
from worker.executor.scratch_steps import profile_step, warm_up_steps
from worker.models.config import ModelConfig, parse_dtype
from worker.models.loader import load_model

log = logging.getLogger(__name__)

MiB = 1024**2
# Kept free beyond the measured peak: allocator fragmentation, cuBLAS workspaces, NCCL-free slack.
_FIXED_RESERVE_BYTES = 256 * MiB
# The sampler's temporaries per logits element (probabilities, noise, sort), beyond the logits themselves.
_SAMPLER_COPIES = 3


def _triton_ops() -> ModuleType:
    import kernels.triton_ops as triton_ops

    return triton_ops


class CUDAExecutor(Executor):
    """See the module docstring. `device` and `ops` are for tests (another GPU, or torch_ref ops)."""

    name = "cuda"
    supports_future_tokens = True
    overlap_by_default = True  # the host prepares the next step while the GPU runs this one

    def __init__(
        self,
        model_path: str | Path,
        config: EngineConfig,
        device: torch.device | str | None = None,
        ops: ModuleType | None = None,
    ):
        # the engine fills in the step budget (max_num_batched_tokens) it leaves to the default; so do we
        self.config = config = with_step_token_budget(config, Path(model_path))
        if device is None and not torch.cuda.is_available():
            raise ConfigError("--device cuda was asked for but no CUDA GPU is visible; use --device cpu")
        self._device = torch.device(device) if device is not None else torch.device("cuda", torch.cuda.current_device())
        if self._device.type == "cuda" and self._device.index is None:
            self._device = torch.device("cuda", torch.cuda.current_device())
        self.dtype = torch.bfloat16 if config.dtype == "auto" else parse_dtype(config.dtype)
        self.ops = ops if ops is not None else _triton_ops()
        self.model, self.model_config = load_model(
            model_path, self._device, self.dtype, progress=config.progress, ops=self.ops
        )
        cfg: ModelConfig = self.model_config
        self.max_model_len = config.context_length(cfg.max_model_len)
        self.kv_caches: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.page_size: int | None = None
        self.graphs: DecodeGraphRunner | None = None
        self.piecewise: PiecewiseGraphRunner | None = None
        self.attention = CudaAttentionBackend(self._device)
        self._kv_pool: torch.Tensor | None = None
        self.memory_report: dict[str, float] = {}

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def uses_cuda_graphs(self) -> bool:
        return self.graphs is not None

    @property
    def uses_piecewise_graphs(self) -> bool:
        return self.piecewise is not None

    # ------------------------------------------------------------------ memory
    def kv_bytes_per_token(self) -> int:
        cfg = self.model_config
        element = torch.empty((), dtype=self.dtype).element_size()
        return 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * element

    def _graphs_wanted(self) -> bool:
        return (
            self.config.enable_cuda_graphs
            and self._device.type == "cuda"
            and self.config.cuda_graph_max_bs > 0
            and self.ops.__name__.endswith("triton_ops")  # the reference ops read host lists
        )

    def _piecewise_max_tokens(self) -> int:
        """The largest step the piecewise graphs take (0: none), capped at the step token budget."""
        if not (self.config.enable_cuda_graphs and self._device.type == "cuda"):
            return 0
        return max(0, min(self.config.piecewise_cuda_graph_max_tokens, self.config.max_num_batched_tokens))

    def _profile_peak_activation_bytes(self, page_size: int) -> int:
        """Run one prefill step of max_num_batched_tokens tokens against a one-page scratch cache and
        return the peak memory it allocated (activations, logits and the sampler's temporaries)."""
        cfg = self.model_config
        tokens = min(self.config.max_num_batched_tokens, self.max_model_len)
        num_logits = min(tokens, self.config.max_running_requests)
        scratch = torch.zeros(page_size, cfg.num_key_value_heads, cfg.head_dim, dtype=self.dtype, device=self._device)
        caches = [(scratch, scratch)] * cfg.num_hidden_layers
        batch = profile_step(tokens, num_logits, page_size)
        torch.cuda.synchronize(self._device)
        torch.cuda.reset_peak_memory_stats(self._device)
        before = torch.cuda.memory_allocated(self._device)
        on_device, meta = self.attention.prepare(batch)
        with torch.inference_mode():
            logits = self.model(on_device, caches, meta)
        torch.cuda.synchronize(self._device)
        peak = torch.cuda.max_memory_allocated(self._device) - before
        del logits, caches, scratch
        sampler_bytes = _SAMPLER_COPIES * num_logits * cfg.vocab_size * 4
        return peak + sampler_bytes

    def _graph_reserve_bytes(self) -> int:
        """Decode graphs: static logits and inputs of the largest, plus its (small) activations; piecewise
        graphs: their pool and static buffers (PiecewiseGraphRunner.reserve_bytes)."""
        cfg = self.model_config
        reserve = 0
        if self._graphs_wanted():
            max_bs = self.config.cuda_graph_max_bs
            logits = max_bs * cfg.vocab_size * 4
            activations = max_bs * (cfg.q_size + 2 * cfg.kv_size + 2 * cfg.intermediate_size + 4 * cfg.hidden_size) * 4
            reserve += logits + activations + 128 * MiB
        if self._piecewise_max_tokens() > 0:
            element = torch.empty((), dtype=self.dtype).element_size()
            reserve += PiecewiseGraphRunner.reserve_bytes(cfg, self._piecewise_max_tokens(), element)
        return reserve

    def num_kv_pages(self, page_size: int) -> int:
        if page_size <= 0:
            raise ValueError(f"page_size must be positive, got {page_size}")
        if self._device.type != "cuda":
            return self.config.kv_cache_tokens // page_size
        activations = self._profile_peak_activation_bytes(page_size)
        torch.cuda.empty_cache()
        free, total = torch.cuda.mem_get_info(self._device)
        in_use = total - free  # our weights, the CUDA context, and anything else on this GPU
        graphs = self._graph_reserve_bytes()
        budget = int(total * self.config.mem_fraction) - in_use - activations - graphs - _FIXED_RESERVE_BYTES
        page_bytes = page_size * self.kv_bytes_per_token()
        num_pages = budget // page_bytes - 1  # page 0 is the scratch page
        self.memory_report = {
            "total_gib": total / 1024**3,
            "in_use_before_kv_gib": in_use / 1024**3,
            "weights_gib": sum(p.numel() * p.element_size() for p in self.model.parameters()) / 1024**3,
            "activation_peak_gib": activations / 1024**3,
            "graph_reserve_gib": graphs / 1024**3,
            "kv_cache_gib": max(num_pages + 1, 0) * page_bytes / 1024**3,
            "kv_cache_tokens": max(num_pages, 0) * page_size,
        }
        log.info("CUDA memory plan: %s", {k: round(v, 2) for k, v in self.memory_report.items()})
        if num_pages < 2:
            raise ConfigError(
                f"no room for a KV cache: the GPU has {total / 1024**3:.1f} GiB, {in_use / 1024**3:.1f} GiB are in use "
                f"(weights and other processes), activations need {activations / 1024**3:.2f} GiB and CUDA graphs "
                f"{graphs / 1024**3:.2f} GiB at --mem-fraction {self.config.mem_fraction}; raise --mem-fraction, "
                "lower --max-num-batched-tokens / --cuda-graph-max-bs / --piecewise-cuda-graph-max-tokens, or free the GPU"
            )
        return int(num_pages)

    def init_kv_cache(self, num_pages: int, page_size: int) -> None:
        """One zeroed [layers, 2, slots, kv_heads, head_dim] tensor; page 0 is the scratch page. Then, if
        enabled, capture the decode and the piecewise CUDA graphs over it."""
        if num_pages <= 0 or page_size <= 0:
            raise ValueError(f"num_pages and page_size must be positive, got {num_pages}, {page_size}")
        cfg = self.model_config
        slots = (num_pages + 1) * page_size
        self._kv_pool = None
        self.kv_caches = []
        self.graphs = self.piecewise = None
        pool = torch.zeros(
            cfg.num_hidden_layers, 2, slots, cfg.num_key_value_heads, cfg.head_dim, dtype=self.dtype, device=self._device
        )
        self._kv_pool = pool
        self.kv_caches = [(pool[layer, 0], pool[layer, 1]) for layer in range(cfg.num_hidden_layers)]
        self.page_size = page_size
        self._warm_up_kernels(page_size)
        if self._graphs_wanted():
            self._capture_graphs(page_size)
        if self._piecewise_max_tokens() > 0:
            self._capture_piecewise_graphs()

    # ------------------------------------------------------------------ warm-up
    def _warm_up_kernels(self, page_size: int) -> None:
        """Compile the Triton kernel variants live traffic meets (prefill, extend, mixed, eager decode) now,
        with a progress line, instead of stalling the first request of each new shape. Integers that vary
        with the batch are not specialised on (kernels/), so these few shapes cover the rest."""
        if self._device.type != "cuda" or not self.ops.__name__.endswith("triton_ops"):
            return
        budget = min(self.config.max_num_batched_tokens, self.max_model_len - 1)
        shapes = warm_up_steps(budget, self.config.max_running_requests, page_size)
        start = time.perf_counter()
        with tqdm(total=len(shapes), desc="Compiling kernels", unit="step", disable=not self.config.progress) as bar:
            for batch in shapes:
                self.forward_eager(batch)
                bar.update()
        torch.cuda.synchronize(self._device)
        log.info("kernel warm-up: %d steps in %.1f s", len(shapes), time.perf_counter() - start)

    def _capture_graphs(self, page_size: int) -> None:
        max_bs = min(self.config.cuda_graph_max_bs, self.config.max_running_requests)
        runner = DecodeGraphRunner(
            forward=self._forward_on_device,
            attention=self.attention,
            page_size=page_size,
            max_batch_size=max_bs,
            max_pages_per_seq=-(-self.max_model_len // page_size),
            device=self._device,
        )
        before = torch.cuda.memory_allocated(self._device)
        runner.capture(progress=self.config.progress)
        self.memory_report["graph_memory_gib"] = (torch.cuda.memory_allocated(self._device) - before) / 1024**3
        self.graphs = runner

    def _capture_piecewise_graphs(self) -> None:
        runner = PiecewiseGraphRunner(
            self.model, self.kv_caches, self.attention, self._piecewise_max_tokens(), self._device
        )
        torch.cuda.synchronize(self._device)
        free_before, _ = torch.cuda.mem_get_info(self._device)
        runner.capture(progress=self.config.progress)
        free_after, _ = torch.cuda.mem_get_info(self._device)  # the pool is reserved, not allocated: count it so
        self.memory_report["piecewise_graph_memory_gib"] = (free_before - free_after) / 1024**3
        self.piecewise = runner

    # ------------------------------------------------------------------ running
    def _forward_on_device(self, batch: ForwardBatch, meta: AttentionMetadata) -> torch.Tensor:
        with torch.inference_mode():
            return self.model(batch, self.kv_caches, meta)

    def forward(self, batch: ForwardBatch, future_tokens: torch.Tensor | None = None) -> torch.Tensor:
        if not self.kv_caches:
            raise RuntimeError("CUDAExecutor.forward called before init_kv_cache")
        if batch.page_size != self.page_size:
            raise ValueError(f"batch page_size {batch.page_size} != KV cache page_size {self.page_size}")
        if self.graphs is not None and self.graphs.can_run(batch):
            return self.graphs.run(batch, future_tokens)
        if self.piecewise is not None and self.piecewise.can_run(batch):
            return self.piecewise.run(batch, future_tokens)
        return self.forward_eager(batch, future_tokens)

    def forward_eager(self, batch: ForwardBatch, future_tokens: torch.Tensor | None = None) -> torch.Tensor:
        """Run the step without CUDA graphs (steps larger than every graph)."""
        on_device, meta = self.attention.prepare(batch)
        if future_tokens is not None:
            on_device.input_ids.copy_(resolve_future_tokens(on_device.input_ids, future_tokens))
        return self._forward_on_device(on_device, meta)

    def shutdown(self) -> None:
        self.graphs = self.piecewise = None
        self.kv_caches = []
        self._kv_pool = None
