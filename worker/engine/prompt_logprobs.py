"""Prompt logprobs (vLLM's `prompt_logprobs`, and what completions' `echo` with `logprobs` shows).

For every prompt token after the first: its logprob under the model given the tokens before it, its rank,
and the k most likely tokens at that position. The logits of position q give the distribution of token
q + 1, so the rows wanted are positions 0 .. len(prompt) - 2 (the last prompt position's row is the one
that samples the first output token, as for any request).

How the rows are obtained. The executors already run the LM head only on the rows the step names in
`ForwardBatch.logits_indices` (worker.models.llama); `add_prompt_rows` appends a requesting sequence's
prompt positions of this step's chunk to that list, after the sampling rows, so both executors return
them with no change and the sampler still sees exactly its rows first. The log-softmax, the prompt
token's logprob and rank and the top k are computed on the executor's device here, in slices of rows,
and copied back with the step's tokens (worker.engine.sampled_tokens.PendingSample).

Why the prefix cache is skipped for such a request. A cached prefix has K/V but no logits: they would
have to be recomputed anyway, and recomputing the cached part means running its tokens through the model
while its pages already exist in the tree. So the scheduler admits the request from position 0 without
matching (worker.engine.scheduler, `Sequence.needs_prompt_logits`); its computed prompt still goes into
the cache for later requests (the tree keeps one copy of pages it already had). A preempted sequence
recomputes from 0 too and only positions not yet collected are taken. Chunks of such a sequence are
capped at PROMPT_LOGITS_PER_STEP tokens, which bounds the extra [rows, vocab] logits of a step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from worker.engine.protocol import TokenLogprob
from worker.engine.sampled_tokens import PendingSample
from worker.engine.sequence import Sequence
from worker.sampling_params import MAX_LOGPROBS, InvalidParameter

ROWS_PER_SLICE = 32  # log-softmax temporaries of at most [32, vocab] at a time


def check_prompt_logprobs(value, logits_width: int | None, vocab_size: int) -> None:
    """`logits_width`: how many token ids the executor's logits cover (None: all of them)."""
    if value is None:
        return
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= MAX_LOGPROBS:
        raise InvalidParameter("prompt_logprobs", f"must be an integer between 0 and {MAX_LOGPROBS}, got {value!r}")
    if logits_width is not None and logits_width < vocab_size:  # the sim executor's shortcut
        raise InvalidParameter("prompt_logprobs", f"this worker's executor returns logits over only the first "
                               f"{logits_width} of {vocab_size} token ids, so it has no prompt logprobs")


@dataclass
class PromptRows:
    """`count` consecutive prompt positions of `seq`, from position `first`, whose logits this step returns."""

    seq: Sequence
    first: int
    count: int


def add_prompt_rows(forward_batch, batch) -> list[PromptRows]:
    """Append the prompt positions whose logprobs are still wanted to `forward_batch.logits_indices`
    (after the sampling rows). Call before the scheduler launches the step (it reads `num_computed`)."""
    plans: list[PromptRows] = []
    extra: list[int] = []
    offset = 0  # where the sequence's new tokens start in the step's flat token list
    for seq, n_new in zip(batch.seqs, batch.num_new_tokens):
        if seq.needs_prompt_logits:
            start = seq.num_computed
            first = max(start, len(seq.prompt_logprob_entries))
            stop = min(start + n_new, len(seq.prompt_token_ids) - 1)
            if stop > first:
                plans.append(PromptRows(seq, first, stop - first))
                extra.extend(range(offset + first - start, offset + stop - start))
        offset += n_new
    if extra:
        forward_batch.logits_indices = torch.cat(
            [forward_batch.logits_indices, torch.tensor(extra, dtype=torch.int64)])
    return plans


class PendingPromptLogprobs:
    """A step's prompt logprobs on their way to the host; `collect()` adds them to their sequences."""

    def __init__(self, logits: torch.Tensor, plans: list[PromptRows]):
        self.plans = plans
        targets = [t for p in plans for t in p.seq.prompt_token_ids[p.first + 1:p.first + 1 + p.count]]
        top_counts = [p.seq.prompt_logprobs for p in plans for _ in range(p.count)]
        device_targets = torch.tensor(targets, dtype=torch.int64).to(logits.device, non_blocking=True)
        parts = _logprob_parts(logits, device_targets, max(top_counts))
        self._pending = PendingSample(device_targets, parts, list(range(len(targets))), top_counts, len(targets))

    def collect(self) -> None:
        entries = self._pending.result().logprobs
        at = 0
        for plan in self.plans:
            collected = plan.seq.prompt_logprob_entries
            for position in range(plan.first, plan.first + plan.count):
                if position == len(collected):  # a recomputed position (after preemption) is taken once
                    collected.append(entries[at])
                at += 1


def _logprob_parts(logits: torch.Tensor, targets: torch.Tensor, k: int) -> tuple[torch.Tensor, ...]:
    """(targets, their logprobs, ranks, top values, top ids): what PendingSample turns into TokenLogprobs."""
    chosen, ranks, top_values, top_ids = [], [], [], []
    for begin in range(0, logits.shape[0], ROWS_PER_SLICE):
        rows = torch.log_softmax(logits[begin:begin + ROWS_PER_SLICE].float(), dim=-1)
        target = targets[begin:begin + ROWS_PER_SLICE].unsqueeze(1)
        value = rows.gather(1, target)
        chosen.append(value.squeeze(1))
        ranks.append((rows > value).sum(dim=-1) + 1)  # ties share the better rank, as for sampled tokens
        values, ids = rows.topk(k, dim=-1)
        top_values.append(values)
        top_ids.append(ids)
    return targets, torch.cat(chosen), torch.cat(ranks), torch.cat(top_values), torch.cat(top_ids)


def take_prompt_logprobs(seq: Sequence) -> list[TokenLogprob | None] | None:
    """The whole prompt's logprobs (None first, as vLLM) once they are all known, handed out once."""
    if seq.prompt_logprobs is None or seq.prompt_logprobs_sent or seq.needs_prompt_logits:
        return None
    seq.prompt_logprobs_sent = True
    return [None] + list(seq.prompt_logprob_entries)
