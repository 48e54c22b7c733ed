"""Steps that touch no request's KV: every write lands in the scratch page 0 and every page table points at it.

The CUDA executor runs them before serving: one step of the full token budget to measure peak activation
memory (`profile_step`), and a few representative shapes to compile the Triton kernels (`warm_up_steps`).
"""

from __future__ import annotations

import torch

from worker.engine.forward_batch import ForwardBatch


def scratch_step(extends: list[int], prefixes: list[int], num_decodes: int, page_size: int,
                 logits_per_seq: int = 1) -> ForwardBatch:
    """`extends[b]` new tokens after a (pretend) cached prefix of `prefixes[b]` for each sequence b; logits
    for the last `logits_per_seq` new tokens of each."""
    seq_lens = [p + e for p, e in zip(prefixes, extends)]
    positions = torch.cat([torch.arange(p, p + e, dtype=torch.int64) for p, e in zip(prefixes, extends)])
    ends = torch.tensor(extends, dtype=torch.int64).cumsum(0)
    rows = torch.cat([torch.arange(end - min(logits_per_seq, e), end) for end, e in zip(ends.tolist(), extends)])
    width = max(-(-s // page_size) for s in seq_lens)
    return ForwardBatch(
        input_ids=torch.zeros(len(positions), dtype=torch.int64),
        positions=positions,
        out_slots=positions % page_size,  # the scratch page
        page_tables=torch.zeros(len(seq_lens), width, dtype=torch.int32),
        seq_lens=seq_lens,
        extend_lens=extends,
        logits_indices=rows.to(torch.int64),
        num_decodes=num_decodes,
        page_size=page_size,
    )


def profile_step(tokens: int, num_logits: int, page_size: int) -> ForwardBatch:
    """One fresh prefill of `tokens` tokens returning `num_logits` rows of logits: the peak-memory step."""
    return scratch_step([tokens], [0], 0, page_size, logits_per_seq=num_logits)


def warm_up_steps(budget: int, max_seqs: int, page_size: int) -> list[ForwardBatch]:
    """Representative eager steps: fresh prefills, extends over a cached prefix, decodes mixed with a
    chunk (their metadata views start at unaligned offsets), and decode-only batches small enough for
    the fused split merge and large enough for a single split. `budget`: the most tokens a step may have."""

    def step(extends: list[int], prefixes: list[int], num_decodes: int) -> ForwardBatch:
        return scratch_step(extends, prefixes, num_decodes, page_size)

    shapes = [step([n], [0], 0) for n in sorted({1, 7, min(64, budget), min(333, budget)})]
    chunk = min(40, budget)
    shapes.append(step([chunk], [max(0, min(100, budget - chunk))], 0))  # a chunk on a cached prefix
    if budget < 40:  # a tiny context: the prefills above are all there is room for
        return shapes
    for decodes in (1, 3):  # decodes first, then a chunk: views of the metadata start mid-buffer
        if decodes + 1 <= max_seqs:
            shapes.append(step([1] * decodes + [20], [32] * decodes + [16], decodes))
    for batch in sorted({1, min(max_seqs, 64)}):  # fused split merge / one split
        shapes.append(step([1] * batch, [32] * batch, batch))
    return shapes
