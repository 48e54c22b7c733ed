"""Paged extend (prefill) attention in Triton: new tokens over their cached prefix and themselves.

Sequence b contributes extend_len new tokens at positions prefix_len .. seq_len-1; their K/V are
already written into the paged cache. One program handles BLOCK_M new tokens of one sequence for one
query head and runs a single online softmax over every key it may see, all read through the page
table, in two phases:
  1. keys below the program's first query position (prefix and earlier new tokens): visible to every
     row, so no mask at all;
  2. the diagonal band: keys up to the program's last query position, causally masked.
Query heads of one KV group are launch-adjacent (head is the fastest grid axis), so the group's
programs read the same K/V tiles at about the same time and mostly hit L2.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634


@dataclass(frozen=True)
class ExtendConfig:
    """Launch parameters of the extend kernel (defaults: the fastest of a sweep on an H200)."""

    block_m: int = 64  # new tokens per program
    block_n: int = 64  # context tokens per K/V tile
    num_warps: int = 4
    num_stages: int = 2



# Integers that change with the batch (query-block count, page-table width) are not specialised on, nor
# is the alignment of the per-sequence metadata pointers (views that start after the batch's decodes):
# a new batch shape must never mean a new compile (a stall of hundreds of ms in live traffic).
@triton.jit(
    do_not_specialize=["num_m_blocks", "stride_pt_row"],
    do_not_specialize_on_alignment=["page_table_ptr", "seq_lens_ptr", "extend_lens_ptr", "extend_starts_ptr"],
)
def _extend_kernel(
    q_ptr,
    k_cache_ptr,
    v_cache_ptr,
    out_ptr,
    page_table_ptr,
    seq_lens_ptr,
    extend_lens_ptr,
    extend_starts_ptr,
    scale_log2,
    num_m_blocks,
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
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    PAGE_SIZE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,  # "ieee" for float32 inputs (no tf32 rounding), else the default
):
    head = tl.program_id(0)
    # Causal work grows with the query block index: launch the heaviest blocks first.
    m_block = num_m_blocks - 1 - tl.program_id(1)
    seq = tl.program_id(2)

    extend_len = tl.load(extend_lens_ptr + seq)
    m_start = m_block * BLOCK_M
    if m_start >= extend_len:
        return
    seq_len = tl.load(seq_lens_ptr + seq)
    prefix_len = seq_len - extend_len
    tok_start = tl.load(extend_starts_ptr + seq).to(tl.int64)
    kv_head = head // GROUP

    offs_m = m_start + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_mask = offs_m < extend_len
    d_mask = offs_d < HEAD_DIM
    q_rows = tok_start + offs_m
    q = tl.load(
        q_ptr + q_rows[:, None] * stride_q_tok + head * stride_q_head + offs_d[None, :],
        mask=m_mask[:, None] & d_mask[None, :],
        other=0.0,
    )
    q_pos = prefix_len + offs_m

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    page_row = page_table_ptr + seq.to(tl.int64) * stride_pt_row
    k_base = k_cache_ptr + kv_head * stride_k_head
    v_base = v_cache_ptr + kv_head * stride_v_head

    # Phase 1: whole tiles strictly below the first query position; every key is visible to every row.
    first_q_pos = prefix_len + m_start
    full_end = (first_q_pos // BLOCK_N) * BLOCK_N
    for tile_start in range(0, full_end, BLOCK_N):
        pos = tile_start + tl.arange(0, BLOCK_N)
        page = tl.load(page_row + pos // PAGE_SIZE).to(tl.int64)
        slot = page * PAGE_SIZE + pos % PAGE_SIZE
        if BLOCK_D == HEAD_DIM:
            k = tl.load(k_base + slot[:, None] * stride_k_slot + offs_d[None, :])
            v = tl.load(v_base + slot[:, None] * stride_v_slot + offs_d[None, :])
        else:
            k = tl.load(k_base + slot[:, None] * stride_k_slot + offs_d[None, :], mask=d_mask[None, :], other=0.0)
            v = tl.load(v_base + slot[:, None] * stride_v_slot + offs_d[None, :], mask=d_mask[None, :], other=0.0)
        scores = tl.dot(q, tl.trans(k.to(q.dtype)), input_precision=DOT_PRECISION) * scale_log2
        m_new = tl.maximum(m_i, tl.max(scores, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(scores - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(q.dtype), v.to(q.dtype), input_precision=DOT_PRECISION)
        m_i = m_new

    # Phase 2: the band from there to this block's last query position (capped at seq_len), masked.
    band_end = tl.minimum(prefix_len + m_start + BLOCK_M, seq_len)
    for tile_start in range(full_end, band_end, BLOCK_N):
        pos = tile_start + tl.arange(0, BLOCK_N)
        n_mask = pos < band_end
        page = tl.load(page_row + pos // PAGE_SIZE, mask=n_mask, other=0).to(tl.int64)
        slot = page * PAGE_SIZE + pos % PAGE_SIZE
        kv_mask = n_mask[:, None] & d_mask[None, :]
        k = tl.load(k_base + slot[:, None] * stride_k_slot + offs_d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(v_base + slot[:, None] * stride_v_slot + offs_d[None, :], mask=kv_mask, other=0.0)
        scores = tl.dot(q, tl.trans(k.to(q.dtype)), input_precision=DOT_PRECISION) * scale_log2
        visible = (pos[None, :] <= q_pos[:, None]) & n_mask[None, :]
        scores = tl.where(visible, scores, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(scores - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(q.dtype), v.to(q.dtype), input_precision=DOT_PRECISION)
        m_i = m_new

    # Every valid row sees at least its own key, so l_i > 0 there; padded rows are not stored.
    out = acc / tl.where(l_i > 0.0, l_i, 1.0)[:, None]
    tl.store(
        out_ptr + q_rows[:, None] * stride_o_tok + head * stride_o_head + offs_d[None, :],
        out.to(out_ptr.dtype.element_ty),
        mask=m_mask[:, None] & d_mask[None, :],
    )


def extend_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    page_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    extend_lens: torch.Tensor,
    extend_starts: torch.Tensor,
    page_size: int,
    max_extend_len: int,
    scale: float,
    out: torch.Tensor,
    config: ExtendConfig | None = None,
) -> torch.Tensor:
    """Causal attention of each sequence's new tokens over its paged context, written into `out`.

    q, out: [T, H, D] flat new tokens; sequence b's rows start at extend_starts[b]. page_tables,
    seq_lens, extend_lens, extend_starts cover the same B sequences (device int32 tensors);
    max_extend_len is a host int bounding extend_lens (it sizes the grid, so no host sync is needed).
    """
    num_seqs = seq_lens.shape[0]
    if num_seqs == 0 or max_extend_len <= 0:
        return out
    num_heads, head_dim = q.shape[1], q.shape[2]
    group = num_heads // k_cache.shape[1]
    block_d = triton.next_power_of_2(head_dim)
    config = config or ExtendConfig()
    block_m, block_n = config.block_m, config.block_n
    num_m_blocks = triton.cdiv(max_extend_len, block_m)
    _extend_kernel[(num_heads, num_m_blocks, num_seqs)](
        q,
        k_cache,
        v_cache,
        out,
        page_tables,
        seq_lens,
        extend_lens,
        extend_starts,
        scale * LOG2E,
        num_m_blocks,
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
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        PAGE_SIZE=page_size,
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        num_warps=config.num_warps,
        num_stages=config.num_stages,
    )
    return out
