"""Paged decode attention in Triton: split-KV flash-decoding, grouped by KV head.

Each decode sequence has one new query token per head. One program handles one (sequence, KV head,
split): it loads the whole group of query heads that share that KV head as a [BLOCK_H, D] tile, walks
its share of the context in BLOCK_N-token tiles read through the page table, and multiplies each K/V
tile with `tl.dot` for the whole group at once, so every K/V byte is read from memory once per group.
A second kernel merges the splits' partial results with their log-sum-exp weights. (Merging inside
the split kernel instead, by the last split to finish, measured ~2.5 us slower per call on an H200.)

On Hopper and newer both kernels launch as programmatic dependents of the kernel before them
(kernels/pdl.py), which hides part of their launch latency at small batch.

Graph safety: the grid is (batch, kv_heads, num_splits) and num_splits depends only on the batch size,
the head count and the GPU (never on the sequence lengths); each program derives its token range from
the device-side `seq_lens`, so the launch needs no host sync and can be captured in a CUDA graph.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from kernels.pdl import pdl_enabled

LOG2E = 1.4426950408889634


@dataclass(frozen=True)
class DecodeConfig:
    """Launch parameters of the split kernel (defaults: the fastest of a sweep on an H200)."""

    block_n: int = 64  # context tokens per K/V tile
    num_warps: int = 4
    num_stages: int = 3  # H200, Llama-3-8B shapes: 3 stages read ~9% faster than 2 at batch 256


# Upper bound for the split count; the reduction kernel loads all splits of a head at once.
MAX_SPLITS = 32


# Integers that change with the batch (the split count, the page-table width) are not specialised on:
# a new value must never mean a new compile (a stall of hundreds of ms in live traffic).
@triton.jit(do_not_specialize=["num_splits", "stride_pt_row"])
def _decode_split_kernel(
    q_ptr,
    k_cache_ptr,
    v_cache_ptr,
    page_table_ptr,
    seq_lens_ptr,
    out_ptr,
    part_out_ptr,
    part_lse_ptr,
    scale_log2,
    num_splits,
    stride_q_tok,
    stride_q_head,
    stride_k_slot,
    stride_k_head,
    stride_v_slot,
    stride_v_head,
    stride_pt_row,
    stride_o_tok,
    stride_o_head,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_N: tl.constexpr,
    PAGE_SIZE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,  # "ieee" for float32 inputs (no tf32 rounding), else the default
    SINGLE_SPLIT: tl.constexpr,
    USE_PDL: tl.constexpr,  # launched as a programmatic dependent of the previous kernel (see pdl.py)
):
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    if USE_PDL:
        gdc_wait()  # the previous kernel (RoPE + K/V write) has completed and its writes are visible

    seq_len = tl.load(seq_lens_ptr + seq)
    # Every split gets an equal, BLOCK_N-aligned share of this sequence's context.
    chunk = tl.cdiv(tl.cdiv(seq_len, num_splits), BLOCK_N) * BLOCK_N
    start = split * chunk
    end = tl.minimum(start + chunk, seq_len)

    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    heads = kv_head * GROUP + offs_h
    h_mask = offs_h < GROUP
    d_mask = offs_d < HEAD_DIM

    q = tl.load(
        q_ptr + seq * stride_q_tok + heads[:, None] * stride_q_head + offs_d[None, :],
        mask=h_mask[:, None] & d_mask[None, :],
        other=0.0,
    )

    m_i = tl.full([BLOCK_H], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_H], dtype=tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_D], dtype=tl.float32)
    page_row = page_table_ptr + seq.to(tl.int64) * stride_pt_row

    for tile_start in range(start, end, BLOCK_N):
        pos = tile_start + tl.arange(0, BLOCK_N)
        n_mask = pos < end
        page = tl.load(page_row + pos // PAGE_SIZE, mask=n_mask, other=0).to(tl.int64)
        slot = page * PAGE_SIZE + pos % PAGE_SIZE
        kv_mask = n_mask[:, None] & d_mask[None, :]
        k = tl.load(
            k_cache_ptr + slot[:, None] * stride_k_slot + kv_head * stride_k_head + offs_d[None, :],
            mask=kv_mask,
            other=0.0,
        ).to(q.dtype)
        v = tl.load(
            v_cache_ptr + slot[:, None] * stride_v_slot + kv_head * stride_v_head + offs_d[None, :],
            mask=kv_mask,
            other=0.0,
        ).to(q.dtype)

        scores = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale_log2  # [BLOCK_H, BLOCK_N], log2 domain
        scores = tl.where(n_mask[None, :], scores, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(scores - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new

    if USE_PDL:
        gdc_launch_dependents()  # the merge kernel may get scheduled now (it waits for our stores)
    has_keys = l_i > 0.0
    out = acc / tl.where(has_keys, l_i, 1.0)[:, None]
    if SINGLE_SPLIT:
        tl.store(
            out_ptr + seq * stride_o_tok + heads[:, None] * stride_o_head + offs_d[None, :],
            out.to(out_ptr.dtype.element_ty),
            mask=h_mask[:, None] & d_mask[None, :],
        )
    else:
        # Partial buffers are contiguous [B, H, num_splits, (BLOCK_D)]; an empty split stores lse = -inf.
        row = (seq * tl.num_programs(1) * GROUP + heads) * num_splits + split
        lse = tl.where(has_keys, m_i + tl.log2(tl.where(has_keys, l_i, 1.0)), float("-inf"))
        tl.store(part_lse_ptr + row, lse, mask=h_mask)
        tl.store(part_out_ptr + row[:, None] * BLOCK_D + offs_d[None, :], out, mask=h_mask[:, None])


@triton.jit
def _merge_splits(part_out_ptr, part_lse_ptr, out_row_ptr, first_row, offs_s, s_mask, offs_d,
                  HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    """Merge one head's split results [num_splits, D] by their log-sum-exp weights into out_row_ptr."""
    row = first_row + offs_s
    lse = tl.load(part_lse_ptr + row, mask=s_mask, other=float("-inf"))
    lse_max = tl.max(lse, axis=0)
    # A sequence with no context at all (seq_len 0, e.g. CUDA-graph padding) yields zeros, not NaN.
    safe_max = tl.where(lse_max == float("-inf"), 0.0, lse_max)
    weights = tl.exp2(lse - safe_max)
    parts = tl.load(part_out_ptr + row[:, None] * BLOCK_D + offs_d[None, :], mask=s_mask[:, None], other=0.0)
    total = tl.sum(weights, axis=0)
    out = tl.sum(parts * weights[:, None], axis=0) / tl.where(total > 0.0, total, 1.0)
    tl.store(out_row_ptr + offs_d, out.to(out_row_ptr.dtype.element_ty), mask=offs_d < HEAD_DIM)


@triton.jit(do_not_specialize=["num_splits"])
def _decode_reduce_kernel(
    part_out_ptr,
    part_lse_ptr,
    out_ptr,
    num_splits,
    num_heads,
    stride_o_tok,
    stride_o_head,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_S: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    seq = tl.program_id(0)
    head = tl.program_id(1)
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    if USE_PDL:
        gdc_wait()  # the split kernel's partials are complete and visible
    _merge_splits(part_out_ptr, part_lse_ptr, out_ptr + seq * stride_o_tok + head * stride_o_head,
                  (seq * num_heads + head) * num_splits, offs_s, offs_s < num_splits, offs_d, HEAD_DIM, BLOCK_D)


@functools.lru_cache(maxsize=None)
def _multiprocessor_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def choose_num_splits(batch_size: int, num_kv_heads: int, device: torch.device) -> int:
    """Split count that fills the GPU: about two programs per multiprocessor, a power of two.

    Depends only on the batch size, head count and device, so a captured CUDA graph stays valid for
    any sequence lengths.
    """
    if device.type == "cuda":
        sms = _multiprocessor_count(device.index if device.index is not None else torch.cuda.current_device())
    else:  # Triton interpreter: a few splits so that the reduction path is exercised
        sms = 2
    programs = max(1, batch_size * num_kv_heads)
    wanted = max(1, math.ceil(2 * sms / programs))
    return min(MAX_SPLITS, triton.next_power_of_2(wanted))


def decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    page_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    page_size: int,
    scale: float,
    out: torch.Tensor,
    num_splits: int | None = None,
    config: DecodeConfig | None = None,
    scratch=None,
) -> torch.Tensor:
    """Attention of one new token per sequence over its paged context, written into `out`.

    q, out: [B, H, D] (row b is sequence b's token); k_cache, v_cache: [num_slots, KH, D];
    page_tables: [B, max_pages] int32; seq_lens: [B] int32 on the device (context incl. the new token).
    `scratch(shape, dtype, device)` (AttentionMetadata.scratch) may supply the split partials' buffers, so the
    layers of one step share them instead of allocating two tensors each.
    """
    batch, num_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[1]
    if batch == 0:
        return out
    group = num_heads // num_kv_heads
    if num_splits is None:
        num_splits = choose_num_splits(batch, num_kv_heads, q.device)
    if not 1 <= num_splits <= MAX_SPLITS:
        raise ValueError(f"num_splits must be in [1, {MAX_SPLITS}], got {num_splits}")
    block_d = triton.next_power_of_2(head_dim)
    block_h = max(16, triton.next_power_of_2(group))  # tl.dot needs at least 16 rows
    config = config or DecodeConfig()
    block_n = config.block_n if block_d <= 128 else min(config.block_n, 32)
    single = num_splits == 1
    if single:
        part_out = part_lse = out  # unused placeholders
    else:
        allocate = scratch or (lambda shape, dtype, device: torch.empty(shape, dtype=dtype, device=device))
        part_out = allocate((batch, num_heads, num_splits, block_d), torch.float32, q.device)
        part_lse = allocate((batch, num_heads, num_splits), torch.float32, q.device)
    use_pdl = pdl_enabled(q.device)
    _decode_split_kernel[(batch, num_kv_heads, num_splits)](
        q,
        k_cache,
        v_cache,
        page_tables,
        seq_lens,
        out,
        part_out,
        part_lse,
        scale * LOG2E,
        num_splits,
        q.stride(0),
        q.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        v_cache.stride(0),
        v_cache.stride(1),
        page_tables.stride(0),
        out.stride(0),
        out.stride(1),
        GROUP=group,
        HEAD_DIM=head_dim,
        BLOCK_D=block_d,
        BLOCK_H=block_h,
        BLOCK_N=block_n,
        PAGE_SIZE=page_size,
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        SINGLE_SPLIT=single,
        USE_PDL=use_pdl,
        num_warps=config.num_warps,
        num_stages=config.num_stages,
        launch_pdl=use_pdl,
    )
    if not single:
        _decode_reduce_kernel[(batch, num_heads)](
            part_out,
            part_lse,
            out,
            num_splits,
            num_heads,
            out.stride(0),
            out.stride(1),
            HEAD_DIM=head_dim,
            BLOCK_D=block_d,
            BLOCK_S=MAX_SPLITS,  # fixed: one compiled variant for every split count
            USE_PDL=use_pdl,
            num_warps=4,
            launch_pdl=use_pdl,
        )
    return out
