"""A step's sampled tokens (and logprobs) on their way from the device to the host."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from worker.engine.protocol import TokenLogprob


@dataclass
class SampleResult:
    token_ids: list[int]  # one per row
    logprobs: list[TokenLogprob | None]  # one per row; None where the request did not ask for logprobs


class PendingSample:
    """A step's sampled tokens (and logprobs) on their way to the host.

    Built by `Sampler.sample_async` right after the sampling kernels are queued: `token_ids` stays on the
    device (the next step may read it there), and copies into pinned host memory are queued behind it with
    an event. `result()` waits for that event only, so the host can prepare the next step in the meantime.
    On the CPU everything is already done and `result()` just converts.
    """

    def __init__(self, token_ids: torch.Tensor, logprob_parts: tuple | None, logprob_rows: list[int],
                 top_counts: list[int], num_rows: int):
        self.token_ids = token_ids  # [B] int64 on the sampler's device
        self._num_rows = num_rows
        self._logprob_rows = logprob_rows
        self._top_counts = top_counts
        parts = (token_ids,) + (logprob_parts or ())
        if token_ids.device.type == "cuda":
            self._host = tuple(_to_pinned_host(t) for t in parts)
            self._ready: torch.cuda.Event | None = torch.cuda.Event()
            self._ready.record()
        else:
            self._host = parts
            self._ready = None
        self._result: SampleResult | None = None

    def result(self) -> SampleResult:
        """Wait for the copies (not for later work on the device) and return the tokens as Python ints."""
        if self._result is None:
            if self._ready is not None:
                self._ready.synchronize()
            tokens, *logprob_parts = self._host
            logprobs: list[TokenLogprob | None] = [None] * self._num_rows
            if self._logprob_rows:
                entries = _logprob_entries(*logprob_parts, self._top_counts)
                for row, entry in zip(self._logprob_rows, entries):
                    logprobs[row] = entry
            self._result = SampleResult(token_ids=tokens.tolist(), logprobs=logprobs)
        return self._result


def logprob_tensors(
    raw: torch.Tensor, tokens: torch.Tensor, index: torch.Tensor, top_counts: list[int]
) -> tuple[torch.Tensor, ...]:
    """Device tensors (chosen ids, their logprobs, ranks, top values, top ids) of the rows `index` of the
    raw logits `raw` [B, V] and the step's sampled `tokens` [B]; read back by `_logprob_entries`."""
    logprobs = torch.log_softmax(raw.index_select(0, index).float(), dim=-1)
    chosen = tokens.index_select(0, index)
    chosen_logprob = logprobs.gather(1, chosen.unsqueeze(1))
    ranks = (logprobs > chosen_logprob).sum(dim=-1) + 1  # ties share the better rank
    top_values, top_ids = logprobs.topk(max(top_counts), dim=-1)  # k = 0 gives empty [R, 0] tensors
    return chosen, chosen_logprob.squeeze(1), ranks, top_values, top_ids


def _to_pinned_host(tensor: torch.Tensor) -> torch.Tensor:
    host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
    host.copy_(tensor, non_blocking=True)
    return host


def _logprob_entries(
    chosen: torch.Tensor, chosen_logprob: torch.Tensor, ranks: torch.Tensor,
    top_values: torch.Tensor, top_ids: torch.Tensor, top_counts: list[int],
) -> list[TokenLogprob]:
    """Host tensors from `logprob_tensors` -> one TokenLogprob per logprob row."""
    chosen_list = chosen.tolist()
    chosen_logprob_list = chosen_logprob.tolist()
    ranks_list = ranks.tolist()
    top_values_list, top_ids_list = top_values.tolist(), top_ids.tolist()
    entries = []
    for j, k in enumerate(top_counts):
        top = list(zip(top_ids_list[j][:k], top_values_list[j][:k])) if k > 0 else []
        entries.append(
            TokenLogprob(token_id=chosen_list[j], logprob=chosen_logprob_list[j], rank=ranks_list[j], top=top)
        )
    return entries
