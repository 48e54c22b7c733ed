"""Engine settings, with the checks that turn a bad setting into a message naming the fix."""

from __future__ import annotations

from dataclasses import dataclass

from worker.engine.waiting_queue import POLICIES  # one list of scheduling policies: the queue registry's
from worker.executor.registry import EXECUTOR_CLASSES

DEVICES = ("auto", "cuda", "cpu")
EXECUTORS = ("auto", *EXECUTOR_CLASSES)
OVERLAP_MODES = ("auto", "on", "off")


class ConfigError(ValueError):
    """A setting is invalid; the message says which and what to do."""


@dataclass
class EngineConfig:
    model: str = "demo"  # a local Hugging Face folder or a built-in name (see worker.models.registry)
    device: str = "auto"  # auto: cuda when a GPU is visible, else cpu
    executor: str = "auto"  # auto follows the device; "sim" runs a cost model with no tensors
    sim_profile: str | None = None  # sim: a calibration JSON path or built-in name (worker.executor.sim)
    dtype: str = "auto"  # auto: bfloat16 on cuda, float32 on cpu
    page_size: int = 16
    # KV budget: on CPU (and sim) an explicit token count; on CUDA a fraction of free GPU memory.
    kv_cache_tokens: int = 65536
    mem_fraction: float = 0.85
    # the per-step token budget (decodes + prefill chunks); None: chosen from the model's size when the engine
    # starts (worker.engine.step_budget: 8192 for small models on a GPU, else 2048)
    max_num_batched_tokens: int | None = None
    max_running_requests: int = 256
    max_waiting_requests: int = 4096  # beyond this, new requests are refused (HTTP 503)
    max_model_len: int | None = None  # default: the model's max_position_embeddings
    policy: str = "fcfs"
    priority_aging_s: float = 5.0  # `priority` policy: a waiting request gains one level per this many seconds
    enable_prefix_cache: bool = True
    # Admission keeps room for this fraction of the running batch's remaining decode tokens; the ratio
    # decays towards the minimum while no preemption happens (see worker.engine.scheduler).
    new_token_ratio_init: float = 0.7
    new_token_ratio_min: float = 0.1
    seed: int = 0
    cuda_graph_max_bs: int = 256
    enable_cuda_graphs: bool = True  # False turns off the piecewise graphs too (vLLM's --enforce-eager)
    # Prefill / extend / mixed steps of up to this many tokens (capped at max_num_batched_tokens) replay
    # piecewise CUDA graphs: all but attention, per token-count bucket (worker.executor.piecewise_graphs).
    # 0 disables them. Start-up captures (layers + 1) x ~12 graphs.
    piecewise_cuda_graph_max_tokens: int = 2048
    # Overlap scheduling: prepare step N+1 on the host while the device runs step N (worker.engine.llm_engine).
    # auto: on with the CUDA executor (llama3-8b on an H200: +34% offline throughput), off on the CPU, where
    # nothing runs concurrently. True / False are accepted for on / off.
    overlap_schedule: str = "auto"
    progress: bool = True  # progress bars while loading

    def validate(self) -> "EngineConfig":
        if self.device not in DEVICES:
            raise ConfigError(f"--device must be one of {', '.join(DEVICES)}, got {self.device!r}")
        if self.executor not in EXECUTORS:
            raise ConfigError(f"--executor must be one of {', '.join(EXECUTORS)}, got {self.executor!r}")
        if isinstance(self.overlap_schedule, bool):
            self.overlap_schedule = "on" if self.overlap_schedule else "off"
        if self.overlap_schedule not in OVERLAP_MODES:
            raise ConfigError(
                f"--overlap-schedule must be one of {', '.join(OVERLAP_MODES)}, got {self.overlap_schedule!r}"
            )
        if self.policy not in POLICIES:
            raise ConfigError(f"--policy must be one of {', '.join(POLICIES)}, got {self.policy!r}")
        if self.dtype not in ("auto", "float32", "float16", "bfloat16"):
            raise ConfigError(f"--dtype must be auto, float32, float16 or bfloat16, got {self.dtype!r}")
        if not (1 <= self.page_size <= 256) or self.page_size & (self.page_size - 1):
            raise ConfigError(f"--page-size must be a power of two between 1 and 256, got {self.page_size}")
        if self.max_num_batched_tokens is not None and self.max_num_batched_tokens < 16:
            raise ConfigError(f"--max-num-batched-tokens must be at least 16, got {self.max_num_batched_tokens}")
        if self.piecewise_cuda_graph_max_tokens < 0:
            raise ConfigError(
                "--piecewise-cuda-graph-max-tokens must be 0 (off) or a positive token count, "
                f"got {self.piecewise_cuda_graph_max_tokens}"
            )
        if self.max_running_requests < 1:
            raise ConfigError(f"--max-running-requests must be at least 1, got {self.max_running_requests}")
        if self.kv_cache_tokens < self.page_size * 2:
            raise ConfigError(f"--kv-cache-tokens must hold at least two pages, got {self.kv_cache_tokens}")
        if not (0.05 <= self.mem_fraction <= 0.98):
            raise ConfigError(f"--mem-fraction must be between 0.05 and 0.98, got {self.mem_fraction}")
        return self

    def context_length(self, model_max_len: int) -> int:
        """The engine's max_model_len: the setting, capped at (and by default) the model's own limit."""
        return min(self.max_model_len or model_max_len, model_max_len)

    def resolved_executor(self) -> str:
        """The executor's registry name (worker.executor.registry): `auto` follows the device."""
        return self.executor if self.executor != "auto" else self.resolved_device()

    def resolved_device(self) -> str:
        if self.device != "auto":
            return self.device
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
