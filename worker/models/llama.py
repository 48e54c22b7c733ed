"""The Llama-family decoder (Llama 2/3, Mistral, Qwen2/2.5, Qwen3) over a paged KV cache.

One module covers the whole family; the differences are switches on `ModelConfig`:
QKV bias (Qwen2), per-head q/k RMSNorm before RoPE (Qwen3), the RoPE table (llama3 scaling), GQA,
tied embeddings. Projections are fused the way serving engines store them: `qkv_proj` = [q; k; v]
rows and `gate_up_proj` = [gate; up] rows (the loader slices Hugging Face tensors into them).

Every non-matmul op goes through `self.ops`, a module with the function names and signatures of
`kernels.torch_ref` (rms_norm, build_rope_cache, apply_rope, write_kv, paged_attention, silu_and_mul),
so the CUDA executor can hand in its Triton ops without touching this file.

Tensors flow flat: hidden states are [T, hidden] for all new tokens of the batch together.

Each layer is a sequence of pieces: DecoderLayer.before_attention, Attention.rope_and_write_kv,
Attention.paged_attention, DecoderLayer.after_attention. All but paged_attention are token-wise (no row
reads another), so a caller may run them on more rows than the step has (worker.executor.piecewise_graphs
replays them as CUDA graphs of fixed row counts) while paged_attention, which reads the step's lengths,
runs on the real rows. `forward` is those same pieces in order, so both paths compute the same thing.
"""

from __future__ import annotations

from types import ModuleType

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import skip_init

import kernels.torch_ref as torch_ref
from kernels.attention_metadata import AttentionMetadata
from worker.engine.forward_batch import ForwardBatch
from worker.models.config import ModelConfig

KVCache = tuple[torch.Tensor, torch.Tensor]  # (k, v), each [num_slots, num_kv_heads, head_dim]


def _linear(in_features: int, out_features: int, bias: bool, dtype, device) -> nn.Linear:
    """An nn.Linear whose weights are left uninitialized: the loader fills them."""
    return skip_init(nn.Linear, in_features, out_features, bias=bias, dtype=dtype, device=device)


class RMSNorm(nn.Module):
    """Holds the norm weight; the math (optionally fused with the residual add) lives in ops.rms_norm."""

    def __init__(self, size: int, eps: float, ops: ModuleType, dtype, device):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size, dtype=dtype, device=device))
        self.eps = eps
        self.ops = ops

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self.ops.rms_norm(x, self.weight, self.eps, residual)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, ops: ModuleType, dtype, device):
        super().__init__()
        self.ops = ops
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.q_size, self.kv_size = config.q_size, config.kv_size
        self.scale = self.head_dim**-0.5
        self.qkv_proj = _linear(
            config.hidden_size, self.q_size + 2 * self.kv_size, config.qkv_bias, dtype, device
        )
        self.o_proj = _linear(self.q_size, config.hidden_size, False, dtype, device)
        if config.qk_norm:  # Qwen3: RMSNorm over head_dim of each q and k head, before RoPE
            self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps, ops, dtype, device)
            self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps, ops, dtype, device)
        else:
            self.q_norm = self.k_norm = None

    def project_qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The token-wise half before attention: QKV projection (+ Qwen3's q/k norms); q [T, H, D], k, v [T, KH, D]."""
        num_tokens = x.shape[0]
        q, k, v = self.qkv_proj(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.reshape(num_tokens, self.num_heads, self.head_dim)
        k = k.reshape(num_tokens, self.num_kv_heads, self.head_dim)
        v = v.reshape(num_tokens, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, _ = self.q_norm(q)
            k, _ = self.k_norm(k)
        return q, k, v

    def attend(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        positions: torch.Tensor,
        meta: AttentionMetadata,
        kv_cache: KVCache,
        rope_cache: torch.Tensor,
    ) -> torch.Tensor:
        """RoPE, the new K/V into the cache, then paged attention: [T, H, D]."""
        q = self.rope_and_write_kv(q, k, v, positions, meta.out_slots, kv_cache, rope_cache)
        return self.paged_attention(q, kv_cache, meta)

    def rope_and_write_kv(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        positions: torch.Tensor,
        out_slots: torch.Tensor,
        kv_cache: KVCache,
        rope_cache: torch.Tensor,
    ) -> torch.Tensor:
        """Rotate q and k, store k and v at `out_slots`; returns rotated q. Token-wise too (each row writes
        only its own slot), so it may run on padded rows whose slots point into the scratch page."""
        k_cache, v_cache = kv_cache
        fused = getattr(self.ops, "rope_and_write_kv", None)
        if fused is not None:  # one launch instead of three (same results as the two ops below)
            return fused(q, k, v, positions, rope_cache, k_cache, v_cache, out_slots)
        q, k = self.ops.apply_rope(q, k, positions, rope_cache)
        self.ops.write_kv(k_cache, v_cache, k, v, out_slots)
        return q

    def paged_attention(self, q: torch.Tensor, kv_cache: KVCache, meta: AttentionMetadata,
                        out: torch.Tensor | None = None) -> torch.Tensor:
        """Attention of rotated q over the paged cache: the one part that reads the step's lengths.
        Returns [T, H, D], written into `out` when given (a CUDA graph's static buffer)."""
        k_cache, v_cache = kv_cache
        if out is None:
            return self.ops.paged_attention(q, k_cache, v_cache, meta, self.scale)
        into = getattr(self.ops, "paged_attention_into", None)
        if into is not None:
            return into(out, q, k_cache, v_cache, meta, self.scale)
        out.copy_(self.ops.paged_attention(q, k_cache, v_cache, meta, self.scale))
        return out

    def project_out(self, attn: torch.Tensor) -> torch.Tensor:
        """o_proj of the attention output [T, H, D] -> [T, hidden]."""
        return self.o_proj(attn.reshape(attn.shape[0], self.q_size))


class MLP(nn.Module):
    def __init__(self, config: ModelConfig, ops: ModuleType, dtype, device):
        super().__init__()
        self.ops = ops
        self.gate_up_proj = _linear(config.hidden_size, 2 * config.intermediate_size, False, dtype, device)
        self.down_proj = _linear(config.intermediate_size, config.hidden_size, False, dtype, device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.ops.silu_and_mul(self.gate_up_proj(x)))


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, ops: ModuleType, dtype, device):
        super().__init__()
        eps = config.rms_norm_eps
        self.input_layernorm = RMSNorm(config.hidden_size, eps, ops, dtype, device)
        self.self_attn = Attention(config, ops, dtype, device)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps, ops, dtype, device)
        self.mlp = MLP(config, ops, dtype, device)

    def forward(
        self,
        hidden: torch.Tensor,
        residual: torch.Tensor | None,
        positions: torch.Tensor,
        meta: AttentionMetadata,
        kv_cache: KVCache,
        rope_cache: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (this layer's MLP output, residual stream before it); the next norm adds them."""
        q, k, v, residual = self.before_attention(hidden, residual)
        attn = self.self_attn.attend(q, k, v, positions, meta, kv_cache, rope_cache)
        return self.after_attention(attn, residual)

    # The layer in three pieces: the two token-wise ones (each row independent of the others, so they may
    # run on a padded row count, e.g. in a CUDA graph of a token-count bucket) around attention.
    def before_attention(
        self, hidden: torch.Tensor, residual: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Input norm (with the residual add) and the QKV projection: (q, k, v, residual)."""
        if residual is None:  # first layer: the residual stream is the embeddings themselves
            residual = hidden
            hidden, _ = self.input_layernorm(hidden)
        else:
            hidden, residual = self.input_layernorm(hidden, residual)
        q, k, v = self.self_attn.project_qkv(hidden)
        return q, k, v, residual

    def after_attention(self, attn: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """o_proj, post-attention norm (with the residual add) and the MLP: (MLP output, residual)."""
        hidden = self.self_attn.project_out(attn)
        hidden, residual = self.post_attention_layernorm(hidden, residual)
        return self.mlp(hidden), residual


class LlamaForCausalLM(nn.Module):
    """Decoder + LM head. Parameters are allocated uninitialized; fill them with worker.models.loader."""

    def __init__(
        self,
        config: ModelConfig,
        ops: ModuleType = torch_ref,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ):
        super().__init__()
        self.config = config
        self.ops = ops
        device = torch.device(device) if device is not None else torch.get_default_device()
        self.embed_tokens = skip_init(
            nn.Embedding, config.vocab_size, config.hidden_size, dtype=dtype, device=device
        )
        self.layers = nn.ModuleList(
            DecoderLayer(config, ops, dtype, device) for _ in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, ops, dtype, device)
        self.lm_head = _linear(config.hidden_size, config.vocab_size, False, dtype, device)
        if config.tie_word_embeddings:
            self.tie_embeddings()
        # cos/sin table for every position the model may see; float32 whatever the weight dtype
        rope_cache = ops.build_rope_cache(
            config.head_dim, config.max_model_len, config.rope_theta, config.rope_scaling, device=device
        )
        self.register_buffer("rope_cache", rope_cache, persistent=False)

    def tie_embeddings(self) -> None:
        """Make lm_head share the input embedding matrix (tied checkpoints store it once)."""
        self.lm_head.weight = self.embed_tokens.weight

    def forward(
        self, batch: ForwardBatch, kv_caches: list[KVCache], meta: AttentionMetadata | None = None
    ) -> torch.Tensor:
        """Run one step; returns float32 logits [len(batch.logits_indices), vocab_size].

        Writes the new tokens' K/V into `kv_caches[layer]` at `batch.out_slots`. The final norm and
        the LM head run only on the rows named by `batch.logits_indices`. `meta` lets a caller pass
        metadata it built itself (e.g. the CUDA executor, from static device buffers a CUDA graph
        replays); by default it is built from `batch`.
        """
        if len(kv_caches) != len(self.layers):
            raise ValueError(f"got {len(kv_caches)} KV caches for {len(self.layers)} layers")
        if meta is None:
            meta = AttentionMetadata.from_batch(batch)
        hidden = self.embed_tokens(batch.input_ids)
        residual = None
        for layer, kv_cache in zip(self.layers, kv_caches):
            hidden, residual = layer(hidden, residual, batch.positions, meta, kv_cache, self.rope_cache)
        return self.compute_logits(hidden, residual, batch.logits_indices)

    def compute_logits(
        self, hidden: torch.Tensor, residual: torch.Tensor | None, rows: torch.Tensor
    ) -> torch.Tensor:
        """Final norm (adding the last layer's residual) and LM head on `rows` only: float32 logits."""
        if residual is None:  # a model with no layers: nothing to add
            hidden, _ = self.norm(hidden[rows])
        else:
            hidden, _ = self.norm(hidden[rows], residual[rows])
        return F.linear(hidden, self.lm_head.weight).float()
