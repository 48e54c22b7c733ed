"""A step launched on the device and not yet read back; and the sampling of a step held back behind its forward.

Overlap scheduling (worker.engine.llm_engine) launches step N before it reads back step N-1's tokens. Most
rows' sampling reads nothing of N-1 on the host (the counts of penalties live on the device, min_tokens and
seeded draws only count the outputs), so step N's sampling is queued right behind its forward. Rows with
bad words or a grammar (`SamplingParams.needs_output_tokens`) read N-1's real token on the host. For a step
with such a row that has a token in flight, only the forward is queued at launch: the engine then reads back
step N-1 (ready as soon as N-1's sampling is done, while N's forward runs on the device) and only then
samples step N (`sample_held_back`). The host's scheduling of step N still overlaps N-1 on the device, and
the grammar masks overlap N's forward.
"""

from __future__ import annotations

import dataclasses

from worker.engine.sampled_tokens import PendingSample
from worker.engine.sequence import PLACEHOLDER_TOKEN, SeqStatus, Sequence


class LaunchedStep:
    """A step whose forward (and, unless held back, sampling) is queued on the device, not yet read back.

    `seqs[j]` is the sequence (None: aborted) of the j-th sampled token, `sample` the tokens on their way
    (None until `sample_held_back` ran, for a held-back step), `held` the (logits, sampling states) waiting
    for it.
    """

    __slots__ = ("seqs", "sample", "prompt_logprobs", "held")

    def __init__(self, seqs: list[Sequence | None], sample: PendingSample | None, prompt_logprobs=None,
                 held: tuple | None = None):
        self.seqs = seqs
        self.sample = sample
        self.prompt_logprobs = prompt_logprobs  # of the prompt positions this step computed, if any asked
        self.held = held


def waits_for_previous_tokens(batch, rows: list[int]) -> bool:
    """Whether a sampling row of `batch` reads its outputs on the host while one of them is still on the
    device (a placeholder of the step in flight): then the step's sampling must wait for that step.
    Call before the scheduler launches `batch`."""
    seqs = batch.seqs
    return any(seqs[r].num_pending_tokens and seqs[r].params.needs_output_tokens for r in rows)


def sample_held_back(sampler, step: LaunchedStep) -> None:
    """Sample a held-back step, once the step before it is resolved, exactly as if sampled before launch.

    The states were taken before `Scheduler.launch`; they refer to the sequences' output lists, which
    launch() has since given this step's placeholder and the previous step's resolve its real token. The
    sampler must see what the synchronous engine shows it: all outputs before this step's token. So each
    placeholder of this step is taken off for the call (the lists stay the same objects: grammar states
    are keyed by them) and put back after; everything the sampler reads on the host it reads during the
    call. A sequence that finished when the previous step resolved (its token of this step is dropped at
    resolve, as in ordinary overlap) already had its placeholder dropped, and its penalty counts were
    released: its row counts from the host lists instead, so no device slot is taken again for it.
    """
    logits, states = step.held
    step.held = None
    hidden: list[Sequence] = []
    for j, seq in enumerate(step.seqs):
        if seq is None or seq.status is SeqStatus.FINISHED:
            states[j] = dataclasses.replace(states[j], counts_key=None)
        elif seq.num_pending_tokens:
            if seq.num_pending_tokens != 1 or seq.output_token_ids[-1] != PLACEHOLDER_TOKEN:
                raise RuntimeError(f"sequence {seq.seq_id} has a token in flight from before the held-back step")
            hidden.append(seq)
    for seq in hidden:
        seq.output_token_ids.pop()
    try:
        step.sample = sampler.sample_async(logits, states)
    finally:
        for seq in hidden:
            seq.output_token_ids.append(PLACEHOLDER_TOKEN)
