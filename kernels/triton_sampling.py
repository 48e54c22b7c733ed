"""Fused sampling: one pass over the logits picks each row's token, greedy or random, with no host sync.

Sampling from softmax(logits / T) is the Gumbel-max race: the token with the largest
`logits / T + G`, where G = -log(-log(U)) and U ~ Uniform(0, 1) i.i.d. per token, is an exact draw
(the same race as argmax(probs / E) with E ~ Exponential(1), written in log space, so the softmax and
its normaliser are never computed). Greedy rows take the plain argmax in the same launch.

The noise of a row comes from Philox keyed by that row's 64-bit `seed` and the token id alone, so a
row's draw does not depend on the batch it is in, on its position in the batch or on the vocabulary
split. The caller supplies one key per row per step: derived from the request's seed, choice index and
output position for seeded requests, fresh random bits otherwise.

The vocabulary is split across programs (a 2-D grid) so that a small batch still fills the GPU; each
program writes its block's best score and index, and a tiny reduction picks the winner per row.
Masked tokens (logit -inf, from top-k / top-p / min-p filters) can never win, since -inf + G = -inf.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# Columns handled by one program of the split-vocabulary grid.
_BLOCK = 2048
# Aim for at least this many programs in the grid, so a batch of 1 still spreads over the SMs.
_TARGET_PROGRAMS = 512


@triton.jit
def _gumbel_argmax_kernel(
    logits_ptr, stride_row, inv_temperature_ptr, seeds_ptr, random_ptr,
    best_value_ptr, best_index_ptr, vocab_size, cols_per_split,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0)
    split = tl.program_id(1)
    inv_temperature = tl.load(inv_temperature_ptr + row)
    seed = tl.load(seeds_ptr + row)
    is_random = tl.load(random_ptr + row) != 0
    start = split * cols_per_split
    best_value = float("-inf")
    best_index = start
    for offset in range(0, cols_per_split, BLOCK):
        cols = start + offset + tl.arange(0, BLOCK)
        in_range = (cols < vocab_size) & (cols < start + cols_per_split)
        x = tl.load(logits_ptr + row * stride_row + cols, mask=in_range, other=float("-inf")).to(tl.float32)
        uniform = tl.rand(seed, cols)
        # U = 0 would give G = -inf (never chosen) and U -> 1 a large G: both fine, but keep the logs finite.
        uniform = tl.minimum(tl.maximum(uniform, 1e-12), 1.0 - 1e-7)
        gumbel = -tl.log(-tl.log(uniform))
        score = tl.where(is_random, x * inv_temperature + gumbel, x)
        score = tl.where(in_range, score, float("-inf"))
        block_best = tl.max(score, axis=0)
        block_index = tl.argmax(score, axis=0) + start + offset
        better = block_best > best_value
        best_index = tl.where(better, block_index, best_index)
        best_value = tl.where(better, block_best, best_value)
    num_splits = tl.num_programs(1)
    tl.store(best_value_ptr + row * num_splits + split, best_value)
    tl.store(best_index_ptr + row * num_splits + split, best_index)


def _splits_for(batch: int, vocab_size: int) -> tuple[int, int]:
    """(number of vocabulary splits, columns per split, a multiple of the block)."""
    max_splits = triton.cdiv(vocab_size, _BLOCK)
    splits = max(1, min(max_splits, triton.cdiv(_TARGET_PROGRAMS, max(batch, 1))))
    cols = triton.cdiv(triton.cdiv(vocab_size, splits), _BLOCK) * _BLOCK
    return triton.cdiv(vocab_size, cols), cols


def gumbel_argmax(
    logits: torch.Tensor, inv_temperature: torch.Tensor, seeds: torch.Tensor, is_random: torch.Tensor
) -> torch.Tensor:
    """One token per row of `logits` [B, V] (any float dtype, row-strided): int64 [B] on the same device.

    `inv_temperature` float32 [B] (1 / T; ignored on greedy rows), `seeds` int64 [B] (the row's noise key),
    `is_random` bool or int [B] (False: greedy argmax). The lowest index wins ties on greedy rows within a
    block; across blocks the first block with the best value wins.
    """
    if logits.dim() != 2 or logits.stride(1) != 1:
        raise ValueError(f"logits must be 2-D with contiguous rows, got shape {tuple(logits.shape)}")
    batch, vocab_size = logits.shape
    if batch == 0:
        return torch.empty(0, dtype=torch.long, device=logits.device)
    num_splits, cols_per_split = _splits_for(batch, vocab_size)
    best_value = torch.empty(batch, num_splits, dtype=torch.float32, device=logits.device)
    best_index = torch.empty(batch, num_splits, dtype=torch.int32, device=logits.device)
    _gumbel_argmax_kernel[(batch, num_splits)](
        logits, logits.stride(0), inv_temperature, seeds, is_random.to(torch.int8),
        best_value, best_index, vocab_size, cols_per_split, BLOCK=_BLOCK,
    )
    winner = best_value.argmax(dim=1, keepdim=True)
    return best_index.gather(1, winner).squeeze(1).long()
