"""Penalty counts kept on the device (worker.engine.sampling_penalties.PenaltyCounts), through the Sampler.

Rows with a `counts_key` read counts that live on the sampler's device across steps; rows without one
count their host lists every step (the implementation before device counts). Both must penalise to the
same bits, also across a release (preemption) and with the newest output still a placeholder (overlap).
Every test runs on the CPU and, where a GPU is visible, on CUDA.
"""

from __future__ import annotations

import random

import pytest
import torch

from worker.engine.sampler import Sampler, SamplingState
from worker.engine.sequence import PLACEHOLDER_TOKEN
from worker.sampling_params import SamplingParams

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]
VOCAB = 97

PENALTIES = [
    dict(presence_penalty=1.5),
    dict(frequency_penalty=0.7),
    dict(repetition_penalty=1.8),
    dict(presence_penalty=-0.5, frequency_penalty=0.3, repetition_penalty=0.8),
    {},  # unpenalised rows share the batch
]


def params(**extra) -> SamplingParams:
    return SamplingParams(**{"temperature": 0.0, "max_tokens": 64, "ignore_eos": True, **extra})


def states_for(batch, outputs, keyed: bool, pending: int | None = None) -> list[SamplingState]:
    """Sampling states of `batch` [(key, prompt, params)]; `pending`: how many newest outputs are placeholders."""
    states = []
    for key, prompt, p in batch:
        out = list(outputs[key])
        if pending:
            out[len(out) - min(pending, len(out)):] = [PLACEHOLDER_TOKEN] * min(pending, len(out))
        states.append(SamplingState(p, prompt, out, counts_key=key if keyed else None))
    return states


def random_batch(seed: int, rows: int = 10):
    rng = random.Random(seed)
    return [(("r", i), [rng.randrange(VOCAB) for _ in range(rng.randint(1, 30))], params(**PENALTIES[i % len(PENALTIES)]))
            for i in range(rows)]


def peaked_logits(generator: torch.Generator, rows: int, device: str) -> torch.Tensor:
    """Random logits whose best few ids are close, so penalties change the argmax often."""
    logits = torch.randn(rows, VOCAB, generator=generator) * 0.3
    logits[:, :8] += 2.0
    return logits.to(device)


@pytest.mark.parametrize("device", DEVICES)
def test_device_counts_match_host_counts_step_by_step(device):
    batch = random_batch(seed=0)
    keyed, host = Sampler(VOCAB, device), Sampler(VOCAB, device)
    outputs = {key: [] for key, _, _ in batch}
    generator = torch.Generator().manual_seed(0)
    for step in range(24):
        logits = peaked_logits(generator, len(batch), device)
        if step == 9:  # a preemption: the slots go, and are rebuilt from prompt + outputs on resume
            for key, _, _ in batch[::2]:
                keyed.penalty_counts.release(key)
        expected = host.process_logits(logits, states_for(batch, outputs, keyed=False))
        got = keyed.process_logits(logits, states_for(batch, outputs, keyed=True))
        assert torch.equal(got, expected)
        tokens = keyed(logits, states_for(batch, outputs, keyed=True)).token_ids
        assert tokens == host(logits, states_for(batch, outputs, keyed=False)).token_ids
        for (key, _, _), token in zip(batch, tokens):
            outputs[key].append(token)
    assert len({tuple(out) for out in outputs.values()}) > 1
    assert keyed.penalty_counts.num_in_use == sum(p.uses_penalties for _, _, p in batch)  # one slot per penalised row


@pytest.mark.parametrize("device", DEVICES)
def test_overlap_placeholders_are_counted_on_the_device(device):
    """With overlap the newest output is still a placeholder on the host: the device counts already hold it."""
    batch = random_batch(seed=1, rows=6)
    keyed, host = Sampler(VOCAB, device), Sampler(VOCAB, device)
    outputs = {key: [] for key, _, _ in batch}
    generator = torch.Generator().manual_seed(1)
    for step in range(16):
        logits = peaked_logits(generator, len(batch), device)
        pending = keyed.sample_async(logits, states_for(batch, outputs, keyed=True, pending=1))
        expected = host(logits, states_for(batch, outputs, keyed=False)).token_ids
        assert pending.result().token_ids == expected
        for (key, _, _), token in zip(batch, expected):
            outputs[key].append(token)


def run_alone(device: str, penalty: dict, prompt: list[int], logits: torch.Tensor, steps: int) -> list[int]:
    sampler = Sampler(VOCAB, device)
    out: list[int] = []
    for _ in range(steps):
        state = SamplingState(params(**penalty), prompt, list(out), counts_key=("only", 0))
        out.append(sampler(logits, [state]).token_ids[0])
    return out


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("penalty", [dict(presence_penalty=0.5), dict(frequency_penalty=0.5),
                                     dict(repetition_penalty=2.0)], ids=["presence", "frequency", "repetition"])
def test_each_penalty_changes_the_output(device, penalty):
    logits = torch.zeros(1, VOCAB)
    logits[0, :4] = torch.tensor([2.0, 1.8, 1.6, 1.4])
    logits = logits.to(device)
    prompt = [0, 50]  # token 0 (the best) is in the prompt: only repetition looks there
    plain = run_alone(device, {}, prompt, logits, steps=6)
    penalised = run_alone(device, penalty, prompt, logits, steps=6)
    assert plain == [0] * 6
    assert penalised != plain
    if "repetition_penalty" in penalty:
        assert penalised[0] == 1  # 2.0 / 2 = 1.0 falls below 1.8 at once
    else:
        assert penalised[0] == 0 and penalised[1] == 1  # penalised only once it was generated


@pytest.mark.parametrize("device", DEVICES)
def test_slots_are_reused_after_release(device):
    sampler = Sampler(VOCAB, device)
    logits = torch.randn(4, VOCAB).to(device)
    for request in range(100):
        batch = [((request, i), [1, 2, 3], params(presence_penalty=1.0)) for i in range(4)]
        sampler(logits, states_for(batch, {key: [] for key, _, _ in batch}, keyed=True))
        for key, _, _ in batch:
            sampler.penalty_counts.release(key)
    counts = sampler.penalty_counts
    assert counts.num_in_use == 0
    assert counts.capacity == 4  # never grew beyond the four sequences alive at once
    counts.release(("never", "seen"))  # unknown keys are ignored


def test_unpenalised_rows_allocate_and_run_nothing(monkeypatch):
    from worker.engine.sampling_penalties import PenaltyCounts

    def forbidden(*args, **kwargs):
        raise AssertionError("the penalty path ran for unpenalised rows")

    monkeypatch.setattr(PenaltyCounts, "apply", forbidden)
    monkeypatch.setattr(PenaltyCounts, "count_sampled", forbidden)
    sampler = Sampler(VOCAB, "cpu")
    states = [SamplingState(params(), [1, 2], [3], counts_key=("r", i)) for i in range(3)]
    states.append(SamplingState(params(min_tokens=5, temperature=0.7, top_k=5), [1], [], counts_key=("s", 0)))
    sampler(torch.randn(4, VOCAB), states)
    assert sampler.penalty_counts.capacity == 0
    assert sampler.penalty_counts.output_counts.numel() == 0


def test_a_rebuild_with_a_token_still_on_the_device_is_refused():
    """The scheduler never resumes a sequence whose last token is unknown; if it did, counts would be wrong."""
    sampler = Sampler(VOCAB, "cpu")
    state = SamplingState(params(presence_penalty=1.0), [1], [5, PLACEHOLDER_TOKEN], counts_key=("r", 0))
    with pytest.raises(RuntimeError, match="not known yet"):
        sampler(torch.randn(1, VOCAB), [state])
