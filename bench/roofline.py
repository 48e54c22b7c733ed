"""Roofline floors for LLM inference figures, from the model's shape and ceilings measured on the GPU.

Two ceilings are measured once per run (`measure_ceilings`): memory bandwidth (a large device-to-device
copy, counting bytes read plus bytes written) and the bf16 matrix rate (a large square matmul). A step
that moves B bytes and does F FLOPs cannot take less than max(B / bandwidth, F / rate); a workload's
floor sums its bytes and FLOPs (an optimistic bound: real steps cannot overlap one step's memory-bound
part with another's compute-bound part).

Counting, per forward step of a dense decoder (bf16 weights and KV):
- bytes: every weight matrix read once (the embedding table only for the rows looked up; a tied LM
  head reads it whole), every context token's K and V read once per query sequence, new K/V written;
- FLOPs: 2 per weight per token for the matmuls, and 4 * layers * heads * head_dim per (query, key)
  pair for attention (QK^T and PV).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch


@dataclass(frozen=True)
class Ceilings:
    """What the GPU reached on this run's probes."""

    gpu: str
    bandwidth_bytes_per_s: float  # device copy, bytes read + written
    bf16_flops_per_s: float  # dense bf16 matmul

    def as_dict(self) -> dict:
        return {
            "gpu": self.gpu,
            "bandwidth_TBps": self.bandwidth_bytes_per_s / 1e12,
            "bf16_TFLOPs": self.bf16_flops_per_s / 1e12,
        }


def _median_ms(fn, repeats: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    times.sort()
    return times[len(times) // 2]


def measure_ceilings(device: torch.device | str = "cuda", copy_gib: float = 2.0, matmul_size: int = 8192) -> Ceilings:
    """Measure the copy bandwidth and the bf16 matmul rate (random data, median of timed repeats)."""
    device = torch.device(device)
    n = int(copy_gib * 1024**3) // 2
    src = torch.randn(n, dtype=torch.bfloat16, device=device)
    dst = torch.empty_like(src)
    copy_ms = _median_ms(lambda: dst.copy_(src), repeats=20)
    bandwidth = 2 * src.numel() * src.element_size() / (copy_ms / 1e3)
    del src, dst
    a = torch.randn(matmul_size, matmul_size, dtype=torch.bfloat16, device=device)
    b = torch.randn(matmul_size, matmul_size, dtype=torch.bfloat16, device=device)
    mm_ms = _median_ms(lambda: torch.mm(a, b), repeats=20)
    flops = 2 * matmul_size**3 / (mm_ms / 1e3)
    del a, b
    torch.cuda.empty_cache()
    return Ceilings(torch.cuda.get_device_name(device), bandwidth, flops)


@dataclass(frozen=True)
class ModelCost:
    """The shape numbers a roofline needs, from a worker.models.config.ModelConfig."""

    matmul_params: int  # weights multiplied per token: all linear layers and the LM head
    weight_bytes_per_step: int  # bytes of weights one forward step reads
    kv_bytes_per_token: int  # K and V of one token, all layers
    attention_flops_per_pair: int  # FLOPs per (query token, context token) pair, all layers
    embedding_bytes_per_token: int

    @classmethod
    def from_config(cls, cfg, dtype_bytes: int = 2) -> "ModelCost":
        h, layers = cfg.hidden_size, cfg.num_hidden_layers
        per_layer = (
            h * (cfg.q_size + 2 * cfg.kv_size)  # qkv
            + cfg.q_size * h  # o_proj
            + 3 * h * cfg.intermediate_size  # gate, up, down
        )
        lm_head = cfg.vocab_size * h
        matmul_params = layers * per_layer + lm_head
        norms = (2 * layers + 1) * h
        return cls(
            matmul_params=matmul_params,
            weight_bytes_per_step=(matmul_params + norms) * dtype_bytes,
            kv_bytes_per_token=2 * layers * cfg.num_key_value_heads * cfg.head_dim * dtype_bytes,
            attention_flops_per_pair=4 * layers * cfg.num_attention_heads * cfg.head_dim,
            embedding_bytes_per_token=h * dtype_bytes,
        )

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class Floor:
    """Lower bound on time for some work, and which ceiling sets it."""

    seconds: float
    bytes: float
    flops: float
    bound: str  # "memory" or "compute"

    def as_dict(self) -> dict:
        return asdict(self)


def floor(bytes_moved: float, flops: float, ceilings: Ceilings) -> Floor:
    t_mem = bytes_moved / ceilings.bandwidth_bytes_per_s
    t_compute = flops / ceilings.bf16_flops_per_s
    return Floor(max(t_mem, t_compute), bytes_moved, flops, "memory" if t_mem >= t_compute else "compute")


def causal_pairs(prefix: int, new: int) -> int:
    """(query, key) pairs when `new` tokens follow a cached `prefix`: each sees the prefix and itself."""
    return new * prefix + new * (new + 1) // 2


def step_cost(cost: ModelCost, new_tokens: list[int], prefixes: list[int]) -> tuple[float, float]:
    """(bytes, FLOPs) of one forward step computing new_tokens[i] tokens of sequence i after prefixes[i]."""
    total_new = sum(new_tokens)
    pairs = sum(causal_pairs(p, n) for p, n in zip(prefixes, new_tokens))
    context_reads = sum(p + n for p, n in zip(prefixes, new_tokens))  # each sequence's K/V read once
    bytes_moved = (
        cost.weight_bytes_per_step
        + total_new * (cost.embedding_bytes_per_token + cost.kv_bytes_per_token)
        + context_reads * cost.kv_bytes_per_token
    )
    flops = 2 * cost.matmul_params * total_new + cost.attention_flops_per_pair * pairs
    return bytes_moved, flops


def decode_step_floor(cost: ModelCost, ceilings: Ceilings, batch: int, context: int) -> Floor:
    """One decode step of `batch` sequences, each with `context` tokens before the new one."""
    return floor(*step_cost(cost, [1] * batch, [context] * batch), ceilings)


def prefill_floor(cost: ModelCost, ceilings: Ceilings, new_tokens: int, prefix: int = 0) -> Floor:
    """One prompt of `new_tokens` after a cached `prefix`, as one step."""
    return floor(*step_cost(cost, [new_tokens], [prefix]), ceilings)


def workload_floor(
    cost: ModelCost, ceilings: Ceilings, requests: list[tuple[int, int]], max_concurrency: int
) -> Floor:
    """Offline workload of (input_len, output_len) requests, with at most `max_concurrency` running.

    FLOPs: every prompt token and every decoded token once, plus attention. Bytes: each request's
    prefill and decode context reads, KV writes, and the weights once per step, where the number of
    steps is at least the longest output and at least total output / max_concurrency.
    """
    flops = 0.0
    kv_bytes = 0.0
    total_tokens = 0
    for prompt, output in requests:
        decoded = output - 1  # the first output token comes from the prefill step
        flops += 2 * cost.matmul_params * (prompt + decoded)
        flops += cost.attention_flops_per_pair * (causal_pairs(0, prompt) + causal_pairs(prompt, decoded))
        # decode step j reads prompt + j + 1 tokens of K/V
        kv_bytes += cost.kv_bytes_per_token * (decoded * prompt + decoded * (decoded + 1) // 2 + prompt)
        total_tokens += prompt + decoded
    longest = max((o for _, o in requests), default=0)
    steps = max(longest, -(-sum(o for _, o in requests) // max_concurrency))
    bytes_moved = (
        steps * cost.weight_bytes_per_step
        + kv_bytes
        + total_tokens * (cost.kv_bytes_per_token + cost.embedding_bytes_per_token)
    )
    return floor(bytes_moved, flops, ceilings)
