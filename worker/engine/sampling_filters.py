"""Logit filters for sampling (pure functions on float32 logits [R, V]): top_k, top_p, min_p.

Per-row settings arrive as host lists; `device_tensor` uploads them through pinned memory without
waiting for the device, since a plain `torch.tensor(list, device="cuda")` drains the GPU queue first.
"""

from __future__ import annotations

import math

import torch


def device_tensor(values: list, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A 1-D tensor of `values` on `device`; on CUDA the copy is queued, the host does not wait."""
    if device.type != "cuda":
        return torch.tensor(values, dtype=dtype, device=device)
    return torch.tensor(values, dtype=dtype, pin_memory=True).to(device, non_blocking=True)


def apply_top_k(logits: torch.Tensor, top_k: list[int]) -> torch.Tensor:
    """Mask (to -inf) all but each row's `top_k` best tokens (`top_k[r] >= V` disables it for row r).

    Cheaper than a full sort when top_p is not in play: one topk of the largest k. Tokens tied with the
    k-th best are kept too.
    """
    vocab = logits.shape[1]
    largest = max(k for k in top_k if k < vocab)
    best = logits.topk(largest, dim=-1).values
    k = device_tensor([min(k, largest) for k in top_k], torch.long, logits.device).unsqueeze(1)
    threshold = best.gather(1, k - 1)
    disabled = device_tensor([k >= vocab for k in top_k], torch.bool, logits.device).unsqueeze(1)
    threshold = threshold.masked_fill(disabled, float("-inf"))
    return logits.masked_fill(logits < threshold, float("-inf"))


def apply_top_k_top_p(logits: torch.Tensor, top_k: list[int], top_p: list[float]) -> torch.Tensor:
    """Mask (to -inf) all but each row's `top_k` best tokens, then all but its top_p nucleus.

    One descending sort serves every row. `top_k[r] >= V` disables top_k for row r and `top_p[r] = inf`
    disables top_p. The nucleus keeps a token while the probability mass of the tokens ranked strictly above
    it is below top_p (so the best token is always kept), computed after top_k, as in vLLM.
    """
    vocab = logits.shape[1]
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    k = device_tensor(top_k, torch.long, logits.device).unsqueeze(1)
    if any(value < vocab for value in top_k):  # decided from the host lists: no device sync
        ranks = torch.arange(vocab, device=logits.device).unsqueeze(0)
        sorted_logits = sorted_logits.masked_fill(ranks >= k, float("-inf"))
    p = device_tensor(top_p, torch.float32, logits.device).unsqueeze(1)
    if any(math.isfinite(value) for value in top_p):
        probs = torch.softmax(sorted_logits, dim=-1)
        mass_above = probs.cumsum(dim=-1) - probs
        outside = mass_above >= p
        outside[:, 0] = False
        sorted_logits = sorted_logits.masked_fill(outside, float("-inf"))
    return torch.empty_like(logits).scatter_(1, order, sorted_logits)


def apply_min_p(logits: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Mask tokens whose probability is below `min_p` (a [R, 1] column) times their row's best probability."""
    probs = torch.softmax(logits, dim=-1)
    threshold = probs.amax(dim=-1, keepdim=True) * min_p
    return logits.masked_fill(probs < threshold, float("-inf"))
