"""Penalty counts on the device, through the engine: same greedy tokens as counting on the host every step,
through preemption and resume (a tiny KV pool) and overlap scheduling, and no slot left behind.

The reference is the implementation before device counts: each step's penalised rows counted from their
host token lists (states without a counts key), synchronously. Every engine here has the same tiny KV
pool, so all of them schedule (and preempt) alike and a GPU's batch-dependent rounding cannot differ.
"""

from __future__ import annotations

import dataclasses
import random

import pytest

from worker.config import EngineConfig
from worker.engine import llm_engine
from worker.engine.llm_engine import LLMEngine
from worker.engine.protocol import EngineRequest
from worker.models.checkpoint_writer import write_checkpoint
from worker.sampling_params import SamplingParams

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]

PENALTIES = [  # negative values too: a random-weight model rarely repeats a token, so they show more
    dict(presence_penalty=1.5),
    {},
    dict(frequency_penalty=-0.8),
    dict(repetition_penalty=0.6),
    {},
    dict(presence_penalty=-0.5, frequency_penalty=0.4, repetition_penalty=1.3),
    dict(presence_penalty=-1.5),
    dict(frequency_penalty=1.0),
    dict(repetition_penalty=1.6),
]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_checkpoint("tiny-llama3", tmp_path_factory.mktemp("tiny-llama3") / "ckpt", seed=3, progress=False)


TINY_KV = dict(kv_cache_tokens=192, new_token_ratio_init=0.0, new_token_ratio_min=0.0)  # forces preemptions


def make_engine(folder, device: str, overlap: bool, **overrides) -> LLMEngine:
    options = dict(model=str(folder), device=device, page_size=4, progress=False,
                   overlap_schedule="on" if overlap else "off", **TINY_KV)
    options.update(overrides)
    return LLMEngine(EngineConfig(**options))


def workload(vocab: int, count: int, max_tokens: int, seed: int = 0):
    rng = random.Random(seed)
    requests = []
    for i in range(count):
        prompt = [rng.randrange(5, vocab) for _ in range(rng.randint(4, 24))]
        penalty = PENALTIES[i % len(PENALTIES)]
        params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, **penalty)
        requests.append((f"r{i}", prompt, params))
    return requests


def run(engine: LLMEngine, requests, abort_at: dict[int, str] | None = None) -> dict[str, list[int]]:
    """Every request to completion; the tokens of each. `abort_at`: step -> request id to abort then."""
    for rid, prompt, params in requests:
        engine.add_request(EngineRequest(rid, prompt, params))
    tokens: dict[str, list[int]] = {}
    steps = 0
    while engine.has_unfinished():
        if abort_at and steps in abort_at:
            engine.abort_request(abort_at[steps])
        for out in engine.step():
            tokens.setdefault(out.request_id, []).extend(out.new_token_ids)
        engine.check_invariants()
        steps += 1
        assert steps < 5000
    assert engine.stats().kv_tokens_used == 0
    return tokens


@pytest.fixture(scope="module")
def reference(folder):
    """Per device: the workload, its tokens with penalties counted on the host every step (no counts key,
    synchronous), and its tokens with the penalties taken away."""
    computed = {}

    def tokens_for(device: str):
        if device not in computed:
            probe = make_engine(folder, device, overlap=False)
            requests = workload(probe.model_config.vocab_size, count=18, max_tokens=48)
            with pytest.MonkeyPatch.context() as patch:
                original = llm_engine.sampling_states
                patch.setattr(llm_engine, "sampling_states", lambda *args: [
                    dataclasses.replace(state, counts_key=None) for state in original(*args)])
                host_counted = run(probe, requests)
            assert probe.sampler.penalty_counts.capacity == 0
            plain = [(rid, prompt, dataclasses.replace(params, presence_penalty=0.0, frequency_penalty=0.0,
                                                       repetition_penalty=1.0)) for rid, prompt, params in requests]
            unpenalised = make_engine(folder, device, overlap=True)
            without = run(unpenalised, plain)
            assert unpenalised.sampler.penalty_counts.capacity == 0  # unpenalised requests allocate nothing
            computed[device] = requests, host_counted, without
        return computed[device]

    return tokens_for


@pytest.mark.parametrize("device", DEVICES)
def test_each_penalty_changes_some_request(reference, device):
    requests, expected, without = reference(device)
    for kind, neutral in (("presence_penalty", 0.0), ("frequency_penalty", 0.0), ("repetition_penalty", 1.0)):
        alone = [rid for rid, _, params in requests if getattr(params, kind) != neutral]
        assert any(without[rid] != expected[rid] for rid in alone), f"{kind} changed no request"
    unpenalised_ids = [rid for rid, _, params in requests if not params.uses_penalties]
    assert all(without[rid] == expected[rid] for rid in unpenalised_ids)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("overlap", [False, True], ids=["sync", "overlap"])
def test_same_tokens_as_host_counts_through_preemption(folder, reference, device, overlap):
    requests, expected, _ = reference(device)
    engine = make_engine(folder, device, overlap)
    forwards_with_future = []
    forward = engine.executor.forward

    def counting_forward(batch, future_tokens=None):
        forwards_with_future.append(future_tokens is not None)
        return forward(batch) if future_tokens is None else forward(batch, future_tokens=future_tokens)

    engine.executor.forward = counting_forward
    assert run(engine, requests) == expected
    assert engine.stats().num_preemptions > 0
    # some penalised sequence was preempted, its slot freed, and its counts rebuilt when it resumed
    assert engine.sampler.penalty_counts.num_builds > sum(params.uses_penalties for _, _, params in requests)
    assert engine.sampler.penalty_counts.num_in_use == 0
    # penalised decodes no longer wait for their tokens on the host: with overlap they read them on the device
    assert any(forwards_with_future) is (overlap and engine.overlap)


@pytest.mark.parametrize("device", DEVICES)
def test_no_slot_leaks_after_a_hundred_requests(folder, device):
    engine = make_engine(folder, device, overlap=True, max_running_requests=8)
    requests = workload(engine.model_config.vocab_size, count=100, max_tokens=6, seed=7)
    requests = [(rid, prompt, dataclasses.replace(params, n=2) if i % 10 == 0 else params)
                for i, (rid, prompt, params) in enumerate(requests)]
    tokens = run(engine, requests, abort_at={3: "r1", 10: "r5", 20: "r20"})
    assert len(tokens) == 100
    counts = engine.sampler.penalty_counts
    assert counts.num_in_use == 0
    assert 0 < counts.capacity <= 16  # at most twice the 8 sequences running at once
