"""Torch reference implementations of every op the model runs.

These are the ground truth the Triton kernels are tested against, and they are what the CPU
executor runs. Numerics follow Hugging Face transformers' Llama code so greedy outputs match it
token for token: RMSNorm in float32, rotate-half RoPE with float32 angles, softmax in float32.

Layouts
- hidden states: [T, hidden] (all new tokens of the batch, flattened)
- q: [T, num_heads, head_dim]; k, v: [T, num_kv_heads, head_dim]
- KV cache of one layer: [num_slots, num_kv_heads, head_dim], slot = page * page_size + offset
- RoPE cache: [max_positions, head_dim] = cat(cos, sin) of the head_dim/2 rotation angles
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from kernels.attention_metadata import AttentionMetadata


# --------------------------------------------------------------------------- norms and activations
def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """RMSNorm, optionally fused with the residual add that precedes it.

    With `residual`: x = x + residual (in x's dtype), returns (rms_norm(x), x) so the caller keeps the
    new residual stream. Without: returns (rms_norm(x), None).
    """
    if residual is not None:
        x = x + residual
        residual = x
    x32 = x.to(torch.float32)
    variance = x32.pow(2).mean(-1, keepdim=True)
    normed = x32 * torch.rsqrt(variance + eps)
    return weight * normed.to(x.dtype), residual


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """x: [T, 2*I] = [gate | up] -> silu(gate) * up, [T, I]."""
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up


# --------------------------------------------------------------------------- rotary embeddings
def rope_inv_freq(head_dim: int, theta: float, scaling: dict | None = None) -> torch.Tensor:
    """Inverse frequencies, including the llama3 long-context rescaling when `scaling` asks for it."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).to(torch.float32) / head_dim))
    if not scaling:
        return inv_freq
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "default":
        return inv_freq
    if kind == "linear":
        return inv_freq / float(scaling["factor"])
    if kind != "llama3":
        raise ValueError(f"unsupported rope_scaling type {kind!r} (supported: default, linear, llama3)")
    factor = float(scaling["factor"])
    low_freq_factor = float(scaling["low_freq_factor"])
    high_freq_factor = float(scaling["high_freq_factor"])
    old_context_len = float(scaling["original_max_position_embeddings"])
    low_freq_wavelen = old_context_len / low_freq_factor
    high_freq_wavelen = old_context_len / high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    # long wavelengths are slowed by `factor`, short ones kept, the band between interpolated smoothly
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def build_rope_cache(
    head_dim: int, max_positions: int, theta: float, scaling: dict | None = None, device=None
) -> torch.Tensor:
    """[max_positions, head_dim] float32 table: cat(cos(angles), sin(angles)) per position."""
    inv_freq = rope_inv_freq(head_dim, theta, scaling)
    positions = torch.arange(max_positions, dtype=torch.int64).to(torch.float32)
    angles = positions[:, None] * inv_freq[None, :]
    return torch.cat([angles.cos(), angles.sin()], dim=-1).to(device)


def apply_rope(
    q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, rope_cache: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate-half RoPE (as HF Llama/Qwen). q: [T, H, D], k: [T, KH, D]; returns new tensors."""
    cos, sin = rope_cache[positions].chunk(2, dim=-1)  # [T, D/2] each, float32
    cos = cos.to(q.dtype)[:, None, :]
    sin = sin.to(q.dtype)[:, None, :]

    def rotate(x: torch.Tensor) -> torch.Tensor:
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)

    return rotate(q), rotate(k)


# --------------------------------------------------------------------------- paged KV cache
def write_kv(
    k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out_slots: torch.Tensor
) -> None:
    """Store the new tokens' K/V (each [T, KH, D]) at their slots, in place."""
    k_cache[out_slots] = k.to(k_cache.dtype)
    v_cache[out_slots] = v.to(v_cache.dtype)


def rope_and_write_kv(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    positions: torch.Tensor,
    rope_cache: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    out_slots: torch.Tensor,
) -> torch.Tensor:
    """apply_rope then write_kv in one call: stores rotated k and v at `out_slots`, returns rotated q.

    Defined as exactly that composition; the Triton op fuses it into one launch with the same rounding.
    """
    q, k = apply_rope(q, k, positions, rope_cache)
    write_kv(k_cache, v_cache, k, v, out_slots)
    return q


def context_slots(page_table_row: torch.Tensor, seq_len: int, page_size: int) -> torch.Tensor:
    """Slots holding positions [0, seq_len) of one sequence, read through its page table."""
    num_pages = -(-seq_len // page_size)
    pages = page_table_row[:num_pages].to(torch.int64)
    offsets = torch.arange(page_size, device=pages.device, dtype=torch.int64)
    return (pages[:, None] * page_size + offsets[None, :]).reshape(-1)[:seq_len]


def paged_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
) -> torch.Tensor:
    """Attention of each sequence's new tokens over its whole context, read through the page table.

    New token i of sequence b sits at position prefix_len[b] + i and attends to positions <= that one
    (its cached prefix plus itself and earlier new tokens). Works for any mix of decodes and prefill
    chunks. Returns [T, H, D] in q's dtype. The new tokens' K/V must already be written.
    """
    out = torch.empty_like(q)
    num_heads, num_kv_heads = q.shape[1], k_cache.shape[1]
    group = num_heads // num_kv_heads
    start = 0
    for b, (seq_len, ext) in enumerate(zip(meta.seq_lens_list, meta.extend_lens_list)):
        prefix = seq_len - ext
        slots = context_slots(meta.page_tables[b], seq_len, meta.page_size)
        k = k_cache[slots].to(q.dtype)  # [S, KH, D]
        v = v_cache[slots].to(q.dtype)
        qb = q[start : start + ext]  # [E, H, D]
        if group > 1:
            k = k.repeat_interleave(group, dim=1)
            v = v.repeat_interleave(group, dim=1)
        scores = torch.einsum("ehd,shd->hes", qb.float(), k.float()) * scale  # [H, E, S]
        query_pos = prefix + torch.arange(ext, device=q.device)
        key_pos = torch.arange(seq_len, device=q.device)
        scores.masked_fill_(key_pos[None, None, :] > query_pos[None, :, None], float("-inf"))
        probs = torch.softmax(scores, dim=-1).to(q.dtype)
        out[start : start + ext] = torch.einsum("hes,shd->ehd", probs, v)
        start += ext
    return out
