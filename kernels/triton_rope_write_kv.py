"""One Triton launch for the step between the QKV projection and attention: RoPE on q and k, K/V into the cache.

The separate ops take three launches per layer (RoPE on q, RoPE on k, write_kv); at decode batch 1 each
is a few microseconds of mostly fixed cost, so fusing them saves two launches per layer. One program
handles one token: it rotates that token's q heads into a new q tensor and stores its rotated k and its
v straight into the paged cache at the token's slot (the rotated k never goes through memory).

The rounding is the separate kernels' (kernels/triton_norm_rope_act.py, which reproduce torch_ref's):
cos/sin rounded to the activation dtype, each product rounded before the add, the sum rounded, then the
cast to the cache dtype as write_kv does; so results are bit-identical to apply_rope followed by write_kv.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from kernels.pdl import pdl_enabled
from kernels.triton_norm_rope_act import _round_to


@triton.jit
def _rotate_heads(x_ptr, out_ptr, cos, sin, num_heads, stride_x_head, stride_o_head, dtype: tl.constexpr,
                  HALF: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr):
    """Rotate-half RoPE of one token's heads: x_ptr/out_ptr point at the token's first head."""
    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_HALF)
    mask = (offs_h[:, None] < num_heads) & (offs_d[None, :] < HALF)
    base = x_ptr + offs_h[:, None] * stride_x_head + offs_d[None, :]
    x1 = tl.load(base, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(base + HALF, mask=mask, other=0.0).to(tl.float32)
    a1 = _round_to(x1 * cos[None, :], dtype)
    b1 = _round_to(x2 * sin[None, :], dtype)
    a2 = _round_to(x2 * cos[None, :], dtype)
    b2 = _round_to(x1 * sin[None, :], dtype)
    out_dtype = out_ptr.dtype.element_ty
    obase = out_ptr + offs_h[:, None] * stride_o_head + offs_d[None, :]
    # Rounded in the activation dtype first (as apply_rope's output), then cast to the destination's.
    tl.store(obase, _round_to(a1 - b1, dtype).to(dtype).to(out_dtype), mask=mask)
    tl.store(obase + HALF, _round_to(a2 + b2, dtype).to(dtype).to(out_dtype), mask=mask)


@triton.jit
def _rope_and_write_kv_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    q_out_ptr,
    k_cache_ptr,
    v_cache_ptr,
    positions_ptr,
    slots_ptr,
    rope_cache_ptr,
    num_heads,
    num_kv_heads,
    stride_q_tok,
    stride_q_head,
    stride_k_tok,
    stride_k_head,
    stride_v_tok,
    stride_v_head,
    stride_qo_tok,
    stride_qo_head,
    stride_kc_slot,
    stride_kc_head,
    stride_vc_slot,
    stride_vc_head,
    stride_rope,
    HALF: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_KH: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
    USE_PDL: tl.constexpr,  # launched as a programmatic dependent of the previous kernel (see pdl.py)
):
    tok = tl.program_id(0).to(tl.int64)
    if USE_PDL:
        gdc_wait()  # the QKV projection has completed
        gdc_launch_dependents()  # the attention kernel may get scheduled now (it waits for us to finish)
    pos = tl.load(positions_ptr + tok).to(tl.int64)
    slot = tl.load(slots_ptr + tok).to(tl.int64)
    dtype = q_ptr.dtype.element_ty
    offs_d = tl.arange(0, BLOCK_HALF)
    d_mask = offs_d < HALF
    # apply_rope casts cos/sin to the activation dtype before multiplying.
    cos = _round_to(tl.load(rope_cache_ptr + pos * stride_rope + offs_d, mask=d_mask, other=0.0), dtype)
    sin = _round_to(tl.load(rope_cache_ptr + pos * stride_rope + HALF + offs_d, mask=d_mask, other=0.0), dtype)

    _rotate_heads(q_ptr + tok * stride_q_tok, q_out_ptr + tok * stride_qo_tok, cos, sin, num_heads,
                  stride_q_head, stride_qo_head, dtype, HALF, BLOCK_H, BLOCK_HALF)
    _rotate_heads(k_ptr + tok * stride_k_tok, k_cache_ptr + slot * stride_kc_slot, cos, sin, num_kv_heads,
                  stride_k_head, stride_kc_head, dtype, HALF, BLOCK_KH, BLOCK_HALF)

    # v is copied as write_kv does (a cast to the cache dtype), as two halves to reuse the same tiles.
    offs_h = tl.arange(0, BLOCK_KH)
    mask = (offs_h[:, None] < num_kv_heads) & d_mask[None, :]
    v_src = v_ptr + tok * stride_v_tok + offs_h[:, None] * stride_v_head + offs_d[None, :]
    v_dst = v_cache_ptr + slot * stride_vc_slot + offs_h[:, None] * stride_vc_head + offs_d[None, :]
    cache_dtype = v_cache_ptr.dtype.element_ty
    tl.store(v_dst, tl.load(v_src, mask=mask).to(cache_dtype), mask=mask)
    tl.store(v_dst + HALF, tl.load(v_src + HALF, mask=mask).to(cache_dtype), mask=mask)


def _check_inputs(q, k, v, positions, rope_cache, k_cache, v_cache, out_slots) -> None:
    if q.dim() != 3 or k.dim() != 3 or k.shape != v.shape:
        raise ValueError(
            f"rope_and_write_kv: expected q [T, H, D] and k, v [T, KH, D], got {tuple(q.shape)}, "
            f"{tuple(k.shape)}, {tuple(v.shape)}"
        )
    tokens, _, head_dim = q.shape
    if k.shape[0] != tokens or k.shape[2] != head_dim:
        raise ValueError(f"rope_and_write_kv: k {tuple(k.shape)} does not match q {tuple(q.shape)} in tokens/head_dim")
    if head_dim % 2 or rope_cache.shape[-1] != head_dim:
        raise ValueError(f"rope_and_write_kv: rope_cache last dim {rope_cache.shape[-1]} must equal the even head_dim {head_dim}")
    if positions.shape != (tokens,) or out_slots.shape != (tokens,):
        raise ValueError(
            f"rope_and_write_kv: positions {tuple(positions.shape)} and out_slots {tuple(out_slots.shape)} must be [T] = [{tokens}]"
        )
    if k.shape[1:] != k_cache.shape[1:] or v_cache.shape != k_cache.shape:
        raise ValueError(
            f"rope_and_write_kv: new K/V heads/dims {tuple(k.shape[1:])} do not match caches "
            f"{tuple(k_cache.shape)} / {tuple(v_cache.shape)}"
        )
    if k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        raise ValueError("rope_and_write_kv: the caches' head_dim must be contiguous")


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
    """Same contract as torch_ref.rope_and_write_kv: returns rotated q [T, H, D] (a new tensor) and stores
    rotated k and v [T, KH, D] at cache rows `out_slots` [T], in place, in one launch."""
    _check_inputs(q, k, v, positions, rope_cache, k_cache, v_cache, out_slots)
    q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
    if rope_cache.stride(-1) != 1:
        rope_cache = rope_cache.contiguous()
    tokens, num_heads, head_dim = q.shape
    num_kv_heads = k.shape[1]
    q_out = torch.empty((tokens, num_heads, head_dim), dtype=q.dtype, device=q.device)
    if tokens == 0:
        return q_out
    half = head_dim // 2
    use_pdl = pdl_enabled(q.device)
    _rope_and_write_kv_kernel[(tokens,)](
        q,
        k,
        v,
        q_out,
        k_cache,
        v_cache,
        positions,
        out_slots,
        rope_cache,
        num_heads,
        num_kv_heads,
        q.stride(0),
        q.stride(1),
        k.stride(0),
        k.stride(1),
        v.stride(0),
        v.stride(1),
        q_out.stride(0),
        q_out.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        v_cache.stride(0),
        v_cache.stride(1),
        rope_cache.stride(0),
        HALF=half,
        BLOCK_H=triton.next_power_of_2(num_heads),
        BLOCK_KH=triton.next_power_of_2(num_kv_heads),
        BLOCK_HALF=triton.next_power_of_2(half),
        USE_PDL=use_pdl,
        num_warps=4,
        launch_pdl=use_pdl,
    )
    return q_out
