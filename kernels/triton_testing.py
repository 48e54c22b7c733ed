"""Random paged-attention cases for the Triton kernel tests and kernel benchmarks.

A case is a ragged batch laid out the way the engine lays it out: decodes first, then extends; pages
assigned from a shuffled pool; the new tokens' K/V already written. Every pool slot no sequence owns
holds NaN, and page-table padding points at a NaN page, so a kernel that reads a position it should not
poisons its output and the comparison fails.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kernels.attention_metadata import AttentionMetadata


@dataclass
class PagedCase:
    q: torch.Tensor  # [T, H, D]
    k_cache: torch.Tensor  # [slots, KH, D]
    v_cache: torch.Tensor
    meta: AttentionMetadata
    scale: float


def make_meta(
    seq_lens: list[int], extend_lens: list[int], page_tables: torch.Tensor, page_size: int, num_decodes: int, device
) -> AttentionMetadata:
    out_slots = torch.zeros(sum(extend_lens), dtype=torch.int64, device=device)  # unused by attention
    table = page_tables.to(device)
    return AttentionMetadata.from_lists(seq_lens, extend_lens, table, out_slots, page_size, num_decodes)


def make_case(
    seq_lens: list[int],
    extend_lens: list[int],
    *,
    num_decodes: int,
    page_size: int,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    dtype: torch.dtype,
    device="cpu",
) -> PagedCase:
    """Build a case on `device` (seed torch's RNG first for a repeatable one).

    Sequence b owns ceil(seq_lens[b] / page_size) pages taken from a shuffled pool.
    """
    if len(seq_lens) != len(extend_lens) or any(e > s for s, e in zip(seq_lens, extend_lens)):
        raise ValueError("make_case: need one extend_len <= seq_len per sequence")
    pages_needed = [-(-s // page_size) for s in seq_lens]
    total_pages = sum(pages_needed) + 2  # one spare page left NaN, one NaN page for table padding
    order = torch.randperm(total_pages).tolist()
    poison_page = order.pop()
    max_pages = max(pages_needed, default=0) + 1
    table = torch.full((len(seq_lens), max_pages), poison_page, dtype=torch.int32)
    owned_slots = []
    next_page = 0
    for b, n in enumerate(pages_needed):
        pages = torch.tensor(order[next_page : next_page + n], dtype=torch.int32)
        next_page += n
        table[b, :n] = pages
        slots = (pages.to(torch.int64)[:, None] * page_size + torch.arange(page_size)[None, :]).reshape(-1)
        owned_slots.append(slots[: seq_lens[b]])
    owned = torch.cat(owned_slots).to(device) if owned_slots else torch.empty(0, dtype=torch.int64, device=device)
    num_slots = total_pages * page_size
    k_cache = torch.full((num_slots, num_kv_heads, head_dim), float("nan"), dtype=dtype, device=device)
    v_cache = torch.full_like(k_cache, float("nan"))
    k_cache[owned] = torch.randn(owned.numel(), num_kv_heads, head_dim, device=device).to(dtype)
    v_cache[owned] = torch.randn(owned.numel(), num_kv_heads, head_dim, device=device).to(dtype)
    q = torch.randn(sum(extend_lens), num_heads, head_dim, device=device).to(dtype)
    meta = make_meta(seq_lens, extend_lens, table.to(device), page_size, num_decodes, device)
    return PagedCase(q, k_cache, v_cache, meta, head_dim**-0.5)


def patch_interpreter_scalar_index() -> None:
    """Let Triton's interpreter use loaded scalars as `range` bounds under numpy >= 2.4.

    The interpreter (triton 3.6) keeps every scalar as a 1-element numpy array and implements
    `__index__` as `int(array)`, which numpy 2.4 refuses for arrays with ndim > 0; so any
    `for i in range(start, end)` with bounds loaded from memory fails there. This converts the
    single element explicitly. Compiled (GPU) kernels are unaffected. Idempotent.
    """
    import triton.runtime.interpreter as interpreter

    original = interpreter._patch_lang_tensor
    if getattr(original, "_radixfleet_patched", False):
        return

    def patch_lang_tensor(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    patch_lang_tensor._radixfleet_patched = True
    interpreter._patch_lang_tensor = patch_lang_tensor
