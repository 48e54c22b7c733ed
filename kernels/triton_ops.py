"""The Triton op set: same names and signatures as kernels/torch_ref.py, so model code takes either as `ops`.

    from kernels import torch_ref, triton_ops
    ops = triton_ops if device.type == "cuda" else torch_ref

paged_attention sends the first meta.num_decodes sequences (one new token each) to the split-KV decode
kernel and the rest to the extend kernel. It never reads a device tensor on the host, and on a
decode-only batch its launch grid depends only on the batch size, so it can be captured in a CUDA graph.
"""

from __future__ import annotations

import torch

from kernels.attention_metadata import AttentionMetadata
from kernels.torch_ref import build_rope_cache, context_slots, rope_inv_freq  # noqa: F401  (same table)
from kernels.triton_attention_decode import decode_attention
from kernels.triton_attention_extend import extend_attention
from kernels.triton_norm_rope_act import apply_rope, rms_norm, silu_and_mul  # noqa: F401
from kernels.triton_rope_write_kv import rope_and_write_kv  # noqa: F401
from kernels.triton_write_kv import write_kv  # noqa: F401

__all__ = [
    "apply_rope",
    "build_rope_cache",
    "context_slots",
    "paged_attention",
    "paged_attention_into",
    "rms_norm",
    "rope_and_write_kv",
    "rope_inv_freq",
    "silu_and_mul",
    "write_kv",
]

_SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _check_attention_inputs(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata):
    if q.dim() != 3 or k_cache.dim() != 3 or v_cache.shape != k_cache.shape:
        raise ValueError(
            "paged_attention: expected q [T, H, D] and caches [num_slots, KH, D], got "
            f"{tuple(q.shape)}, {tuple(k_cache.shape)}, {tuple(v_cache.shape)}"
        )
    num_heads, head_dim = q.shape[1], q.shape[2]
    num_kv_heads = k_cache.shape[1]
    if k_cache.shape[2] != head_dim:
        raise ValueError(f"paged_attention: cache head_dim {k_cache.shape[2]} != q head_dim {head_dim}")
    if num_heads % num_kv_heads:
        raise ValueError(f"paged_attention: num_heads {num_heads} is not a multiple of num_kv_heads {num_kv_heads}")
    if q.dtype not in _SUPPORTED_DTYPES:
        raise ValueError(f"paged_attention: q dtype {q.dtype} unsupported (use float16, bfloat16 or float32)")
    if q.stride(-1) != 1 or k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        raise ValueError("paged_attention: q and the caches need a contiguous head_dim (last) axis")
    if not 1 <= meta.page_size <= 1024:
        raise ValueError(f"paged_attention: meta.page_size must be in [1, 1024], got {meta.page_size}")
    if not 0 <= meta.num_decodes <= meta.seq_lens.shape[0]:
        raise ValueError(f"paged_attention: meta.num_decodes {meta.num_decodes} is outside [0, batch size]")


def paged_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
) -> torch.Tensor:
    """Same contract as torch_ref.paged_attention; returns [T, H, D] in q's dtype.

    Decode sequences must come first (their tokens are rows 0 .. num_decodes-1 of q), as
    AttentionMetadata.from_batch lays them out. The new tokens' K/V must already be written.
    """
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    return paged_attention_into(out, q, k_cache, v_cache, meta, scale)


def paged_attention_into(
    out: torch.Tensor,
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
) -> torch.Tensor:
    """paged_attention writing into a caller-owned `out` ([T, H, D], q's dtype; e.g. a CUDA-graph buffer)."""
    _check_attention_inputs(q, k_cache, v_cache, meta)
    if out.shape != q.shape or out.dtype != q.dtype or out.stride(-1) != 1:
        raise ValueError(f"paged_attention: out must be {tuple(q.shape)} {q.dtype} with a contiguous last axis")
    num_decodes = meta.num_decodes
    batch = meta.seq_lens.shape[0]
    views = meta.split()  # made once per step, shared by every layer
    if num_decodes > 0:
        decode_attention(
            q[:num_decodes],
            k_cache,
            v_cache,
            views.decode_page_tables,
            views.decode_seq_lens,
            meta.page_size,
            scale,
            out[:num_decodes],
            scratch=meta.scratch,
        )
    if batch > num_decodes:
        extend_attention(
            q,
            k_cache,
            v_cache,
            views.extend_page_tables,
            views.extend_seq_lens,
            views.extend_lens,
            views.extend_starts,
            meta.page_size,
            views.max_extend_len,
            scale,
            out,
        )
    return out
