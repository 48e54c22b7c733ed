"""When a sequence stops generating: eos / stop tokens (after `min_tokens`), `max_tokens`, the context length.

Stop *strings* are text, matched after detokenization in worker.engine.output; these checks see token ids.
"""

from __future__ import annotations

from worker.engine.protocol import FinishReason
from worker.engine.sequence import Sequence


def reached_length_limit(seq: Sequence, max_model_len: int) -> bool:
    """max_tokens or the context length reached, counting outputs still on the device."""
    max_tokens = seq.params.max_tokens
    return (max_tokens is not None and len(seq.output_token_ids) >= max_tokens) or seq.num_tokens >= max_model_len


def stop_reason(
    seq: Sequence, token: int, n_out: int, max_model_len: int, eos_token_ids: frozenset[int]
) -> tuple[str | None, int | None]:
    """Why `seq` stops at its `n_out`-th output token `token`: (finish reason, stop token id or None).

    (None, None): it goes on.
    """
    p = seq.params
    if n_out >= p.min_tokens:
        if not p.ignore_eos and token in eos_token_ids:
            return FinishReason.STOP, token
        if token in p.stop_token_ids:
            return FinishReason.STOP, token
    if p.max_tokens is not None and n_out >= p.max_tokens:
        return FinishReason.LENGTH, None
    if len(seq.prompt_token_ids) + n_out >= max_model_len:
        return FinishReason.LENGTH, None
    return None, None
