"""Elementwise-style Triton kernels: fused RMSNorm(+residual), rotate-half RoPE, SiLU-and-mul.

Each kernel reproduces kernels/torch_ref.py's rounding, not only its math: where the reference
computes a step in the activation dtype (bf16/fp16), the kernel rounds to that dtype at the same
point, so the two agree bit for bit or within one ulp, which keeps greedy decoding close to HF.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


# --------------------------------------------------------------------------- rounding
@triton.jit
def _round_to(x, DTYPE: tl.constexpr):
    """Round float32 `x` to DTYPE's precision, returned as float32, in a way the compiler keeps.

    `x.to(bf16).to(fp32)` is not enough: LLVM narrows the surrounding float32 math to bf16 and then
    contracts a multiply and an add into one fma, which skips the product's rounding that torch does.
    For bf16 the rounding (to nearest, ties to even) is done on the bits instead; this is also right
    in Triton's interpreter, whose float32 -> bf16 cast truncates.
    """
    if DTYPE == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + (0x7FFF + ((bits >> 16) & 1))) & 0xFFFF0000
        return bits.to(tl.float32, bitcast=True)
    else:
        return x.to(DTYPE).to(tl.float32)


# --------------------------------------------------------------------------- RMSNorm
@triton.jit
def _rms_norm_kernel(
    x_ptr,
    residual_ptr,
    weight_ptr,
    out_ptr,
    new_residual_ptr,
    hidden,
    eps,
    stride_x,
    stride_r,
    stride_o,
    stride_nr,
    HAS_RESIDUAL: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < hidden
    x = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(residual_ptr + row * stride_r + offs, mask=mask, other=0.0)
        x32 = _round_to(x.to(tl.float32) + r.to(tl.float32), x.dtype)  # the add happens in x's dtype
        tl.store(new_residual_ptr + row * stride_nr + offs, x32.to(x.dtype), mask=mask)
    else:
        x32 = x.to(tl.float32)
    variance = tl.sum(x32 * x32, axis=0) / hidden
    normed = _round_to(x32 * tl.rsqrt(variance + eps), x.dtype)
    w = tl.load(weight_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    out_dtype = out_ptr.dtype.element_ty
    tl.store(out_ptr + row * stride_o + offs, _round_to(w * normed, out_dtype).to(out_dtype), mask=mask)


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Same contract as torch_ref.rms_norm: returns (norm(x [+ residual]), x + residual or None)."""
    hidden = x.shape[-1]
    if weight.shape != (hidden,):
        raise ValueError(f"rms_norm: weight shape {tuple(weight.shape)} does not match hidden size {hidden}")
    if residual is not None and residual.shape != x.shape:
        raise ValueError(f"rms_norm: residual shape {tuple(residual.shape)} != x shape {tuple(x.shape)}")
    x2 = x.reshape(-1, hidden)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    out = torch.empty(x.shape, dtype=torch.promote_types(weight.dtype, x.dtype), device=x.device)
    out2 = out.view(-1, hidden)
    if residual is not None:
        r2 = residual.reshape(-1, hidden)
        if r2.stride(-1) != 1:
            r2 = r2.contiguous()
        new_residual = torch.empty_like(x, memory_format=torch.contiguous_format)
        nr2 = new_residual.view(-1, hidden)
    else:
        r2 = nr2 = x2  # unused placeholders
        new_residual = None
    rows = x2.shape[0]
    if rows == 0:
        return out, new_residual
    block = triton.next_power_of_2(hidden)
    _rms_norm_kernel[(rows,)](
        x2,
        r2,
        weight,
        out2,
        nr2,
        hidden,
        eps,
        x2.stride(0),
        r2.stride(0),
        out2.stride(0),
        nr2.stride(0),
        HAS_RESIDUAL=residual is not None,
        BLOCK=block,
        num_warps=min(16, max(1, block // 512)),
    )
    return out, new_residual


# --------------------------------------------------------------------------- RoPE
@triton.jit
def _rope_kernel(
    x_ptr,
    out_ptr,
    positions_ptr,
    cache_ptr,
    num_heads,
    stride_x_tok,
    stride_x_head,
    stride_o_tok,
    stride_o_head,
    stride_cache,
    HALF: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
):
    tok = tl.program_id(0).to(tl.int64)
    pos = tl.load(positions_ptr + tok).to(tl.int64)
    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_HALF)
    d_mask = offs_d < HALF
    mask = (offs_h[:, None] < num_heads) & d_mask[None, :]
    # The reference casts cos/sin to the activation dtype before multiplying.
    dtype = x_ptr.dtype.element_ty
    cos = _round_to(tl.load(cache_ptr + pos * stride_cache + offs_d, mask=d_mask, other=0.0), dtype)
    sin = _round_to(tl.load(cache_ptr + pos * stride_cache + HALF + offs_d, mask=d_mask, other=0.0), dtype)
    base = x_ptr + tok * stride_x_tok + offs_h[:, None] * stride_x_head + offs_d[None, :]
    x1 = tl.load(base, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(base + HALF, mask=mask, other=0.0).to(tl.float32)
    # Each product is rounded to the activation dtype before the add, as torch does elementwise.
    a1 = _round_to(x1 * cos[None, :], dtype)
    b1 = _round_to(x2 * sin[None, :], dtype)
    a2 = _round_to(x2 * cos[None, :], dtype)
    b2 = _round_to(x1 * sin[None, :], dtype)
    obase = out_ptr + tok * stride_o_tok + offs_h[:, None] * stride_o_head + offs_d[None, :]
    # Round explicitly, then convert exactly (Triton's interpreter truncates in float32 -> bf16 casts).
    tl.store(obase, _round_to(a1 - b1, dtype).to(dtype), mask=mask)
    tl.store(obase + HALF, _round_to(a2 + b2, dtype).to(dtype), mask=mask)


def _rope_one(x: torch.Tensor, positions: torch.Tensor, rope_cache: torch.Tensor) -> torch.Tensor:
    tokens, heads, head_dim = x.shape
    if x.stride(-1) != 1:
        x = x.contiguous()
    out = torch.empty((tokens, heads, head_dim), dtype=x.dtype, device=x.device)
    if tokens == 0:
        return out
    half = head_dim // 2
    _rope_kernel[(tokens,)](
        x,
        out,
        positions,
        rope_cache,
        heads,
        x.stride(0),
        x.stride(1),
        out.stride(0),
        out.stride(1),
        rope_cache.stride(0),
        HALF=half,
        BLOCK_H=triton.next_power_of_2(heads),
        BLOCK_HALF=triton.next_power_of_2(half),
        num_warps=4,
    )
    return out


def apply_rope(
    q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, rope_cache: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Same contract as torch_ref.apply_rope: rotate-half RoPE, q [T, H, D], k [T, KH, D] -> new tensors."""
    if q.dim() != 3 or k.dim() != 3 or q.shape[-1] != k.shape[-1] or q.shape[0] != k.shape[0]:
        raise ValueError(f"apply_rope: expected q [T, H, D] and k [T, KH, D], got {tuple(q.shape)} and {tuple(k.shape)}")
    head_dim = q.shape[-1]
    if head_dim % 2 or rope_cache.shape[-1] != head_dim:
        raise ValueError(f"apply_rope: rope_cache last dim {rope_cache.shape[-1]} must equal the even head_dim {head_dim}")
    if positions.shape != (q.shape[0],):
        raise ValueError(f"apply_rope: positions shape {tuple(positions.shape)} must be [T] = [{q.shape[0]}]")
    if rope_cache.stride(-1) != 1:
        rope_cache = rope_cache.contiguous()
    return _rope_one(q, positions, rope_cache), _rope_one(k, positions, rope_cache)


# --------------------------------------------------------------------------- SiLU-and-mul
@triton.jit
def _silu_and_mul_kernel(x_ptr, out_ptr, inter, stride_x, stride_o, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < inter
    gate = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0)
    up = tl.load(x_ptr + row * stride_x + inter + offs, mask=mask, other=0.0).to(tl.float32)
    g32 = gate.to(tl.float32)
    silu = _round_to(g32 / (1.0 + tl.exp(-g32)), gate.dtype)  # F.silu rounds to the dtype
    tl.store(out_ptr + row * stride_o + offs, _round_to(silu * up, gate.dtype).to(gate.dtype), mask=mask)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """Same contract as torch_ref.silu_and_mul: [T, 2*I] = [gate | up] -> silu(gate) * up, [T, I]."""
    if x.shape[-1] % 2:
        raise ValueError(f"silu_and_mul: last dim must be even ([gate | up]), got {x.shape[-1]}")
    inter = x.shape[-1] // 2
    x2 = x.reshape(-1, x.shape[-1])
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    out = torch.empty((*x.shape[:-1], inter), dtype=x.dtype, device=x.device)
    out2 = out.view(-1, inter)
    if x2.shape[0] == 0 or inter == 0:
        return out
    block = min(4096, triton.next_power_of_2(inter))
    _silu_and_mul_kernel[(x2.shape[0], triton.cdiv(inter, block))](
        x2, out2, inter, x2.stride(0), out2.stride(0), BLOCK=block, num_warps=min(8, max(1, block // 256))
    )
    return out
