"""Steps with grammar or bad-words rows keep overlap scheduling and give the synchronous engine's tokens.

Such rows read their real output tokens on the host when they sample. With overlap the engine queues the
step's forward, resolves the previous step while it runs, then samples (worker.engine.launched_step).
Every scenario runs on the CPU demo model with overlap off and forced on, compared token for token, with
the scheduler's page invariants checked after every step and no KV (nor penalty slot) left at the end.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import jsonschema
import pytest

from tests.test_overlap import make_cuda_engine, make_engine as make_overlap_engine
from worker.engine.llm_engine import LLMEngine
from worker.engine.protocol import EngineRequest
from worker.sampling_params import SamplingParams, StructuredOutput

COLOURS = {"type": "array", "items": {"enum": ["red", "green", "blue"]}, "minItems": 1, "maxItems": 3}
OBJECT = {"type": "object", "properties": {"ok": {"type": "boolean"}, "n": {"type": "integer", "minimum": 0,
                                                                          "maximum": 99}},
          "required": ["ok", "n"], "additionalProperties": False}


def schema(value: dict) -> StructuredOutput:
    return StructuredOutput("json_schema", json.dumps(value))


def make_engine(overlap: bool, **overrides) -> LLMEngine:
    """test_overlap's engine (CPU, page size 4, overlap forced on or off) on the demo model."""
    return make_overlap_engine("demo", overlap, **{"kv_cache_tokens": 4096, **overrides})


@dataclass
class Run:
    tokens: dict = field(default_factory=dict)
    finish: dict = field(default_factory=dict)
    prompt_logprobs: dict = field(default_factory=dict)
    forwards: int = 0
    forwards_with_future_tokens: int = 0
    seen_by_sampler: list = field(default_factory=list)  # (seq id, outputs) of host-reading rows, per sample


def run(engine: LLMEngine, requests, abort=None, later=()) -> Run:
    """Submit `requests`, step to completion; `abort`: (step, request id); `later`: (step, request) added then."""
    result = Run()
    forward, sample_async = engine.executor.forward, engine.sampler.sample_async

    def counting_forward(batch, future_tokens=None):
        result.forwards += 1
        if future_tokens is not None:
            result.forwards_with_future_tokens += 1
            return forward(batch, future_tokens=future_tokens)
        return forward(batch)

    def recording_sample(logits, states):
        result.seen_by_sampler.extend((s.counts_key, tuple(s.output_token_ids)) for s in states
                                      if s.params.needs_output_tokens)
        return sample_async(logits, states)

    engine.executor.forward, engine.sampler.sample_async = counting_forward, recording_sample
    prompt = engine.tokenizer.encode
    for rid, text, params in requests:
        engine.add_request(EngineRequest(rid, prompt(text), params))
    steps = 0
    while engine.has_unfinished() or later:
        if abort is not None and steps == abort[0]:
            engine.abort_request(abort[1])
        while later and later[0][0] == steps:
            _, (rid, text, params) = later[0]
            later = later[1:]
            engine.add_request(EngineRequest(rid, prompt(text), params, prompt_logprobs=params.prompt_logprobs))
        for out in engine.step():
            key = (out.request_id, out.index)
            result.tokens.setdefault(key, []).extend(out.new_token_ids)
            if out.prompt_logprobs is not None:
                result.prompt_logprobs[key] = out.prompt_logprobs
            if out.finish_reason is not None:
                assert key not in result.finish, f"{key} finished twice"
                result.finish[key] = out.finish_reason
        engine.check_invariants()
        steps += 1
        assert steps < 2000
    assert engine.stats().kv_tokens_used == 0
    assert engine.sampler.penalty_counts.num_in_use == 0
    return result


def both(requests, abort=None, later=(), **overrides) -> tuple[Run, Run]:
    return (run(make_engine(False, **overrides), requests, abort, later),
            run(make_engine(True, **overrides), requests, abort, later))


def assert_same_run(sync: Run, overlap: Run) -> None:
    assert overlap.tokens == sync.tokens
    assert overlap.finish == sync.finish
    assert overlap.prompt_logprobs == sync.prompt_logprobs


def assert_sampler_saw_real_tokens(sync: Run, overlap: Run) -> None:
    """Host-reading rows saw what the synchronous engine showed them: every output before this step's,
    real (never a placeholder); the overlapped run may add a row of a step whose token is dropped."""
    assert all(t >= 0 for _, outputs in overlap.seen_by_sampler for t in outputs)
    assert set(sync.seen_by_sampler) <= set(overlap.seen_by_sampler)


def greedy(max_tokens=60, **extra) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, **extra)


def test_constrained_rows_overlap_with_the_synchronous_tokens():
    requests = [
        ("colours", "colours", greedy(structured_output=schema(COLOURS), n=2)),
        ("object", "an object", greedy(structured_output=schema(OBJECT))),
        ("regex", "a code", greedy(max_tokens=12, structured_output=StructuredOutput("regex", r"[a-f]{3}-\d{2,4}"))),
        ("free", "hello there", greedy(max_tokens=20, ignore_eos=True)),
        ("seeded", "a story", SamplingParams(temperature=1.0, seed=3, max_tokens=20, ignore_eos=True, min_tokens=4)),
    ]
    sync, overlap = both(requests)
    assert_same_run(sync, overlap)
    assert_sampler_saw_real_tokens(sync, overlap)
    for key in [("colours", 0), ("colours", 1), ("object", 0)]:
        assert overlap.finish[key] == "stop"
    make = make_engine(True)
    text = make.tokenizer.decode(overlap.tokens[("object", 0)], skip_special_tokens=True)
    jsonschema.validate(json.loads(text), OBJECT)
    # constrained decodes read their input token on the device too: with constrained rows in every step
    # but the first and the tail, the synchronous fallback of before would have had none
    assert overlap.forwards_with_future_tokens >= overlap.forwards - 3
    assert sync.forwards_with_future_tokens == 0


def test_single_constrained_request_overlaps_every_decode():
    params = greedy(max_tokens=40, ignore_eos=True, structured_output=schema(COLOURS))
    sync, overlap = both([("r0", "colours", params)])
    assert_same_run(sync, overlap)
    assert overlap.forwards == sync.forwards == 40
    assert overlap.forwards_with_future_tokens == 39


def test_bad_words_rows_overlap_with_the_synchronous_tokens():
    free = run(make_engine(False), [("r0", "story time", greedy(max_tokens=16, ignore_eos=True))])
    word = free.tokens[("r0", 0)][3:5]
    params = greedy(max_tokens=16, ignore_eos=True, bad_words_token_ids=[word, [free.tokens[("r0", 0)][8]]])
    sync, overlap = both([("r0", "story time", params), ("r1", "story", greedy(max_tokens=10, ignore_eos=True))])
    assert_same_run(sync, overlap)
    assert_sampler_saw_real_tokens(sync, overlap)
    banned = overlap.tokens[("r0", 0)]
    assert tuple(word) not in set(zip(banned, banned[1:]))
    assert overlap.forwards_with_future_tokens == 15


def test_json_complete_then_eos_or_ignore_eos():
    """The grammar completes: with eos it stops (seen one step late under overlap, the extra decode's token
    dropped); with ignore_eos a terminated grammar allows only eos until max_tokens."""
    requests = [
        ("stops", "colours", greedy(structured_output=schema(COLOURS), presence_penalty=0.5)),
        ("goes_on", "colours", greedy(max_tokens=40, ignore_eos=True, structured_output=schema(COLOURS))),
    ]
    sync, overlap = both(requests)
    assert_same_run(sync, overlap)
    assert_sampler_saw_real_tokens(sync, overlap)
    assert overlap.finish[("stops", 0)] == "stop"
    goes_on = overlap.tokens[("goes_on", 0)]
    assert len(goes_on) == 40 and goes_on[-1] in make_engine(True).eos_token_ids


def test_stop_token_found_one_step_late_is_cut_exactly():
    """A constrained (and penalised) sequence whose stop token is known only after the next step was
    launched: that step's row is dropped exactly, its penalty slot not taken again."""
    base = dict(structured_output=schema(OBJECT), presence_penalty=0.5)
    free = run(make_engine(False), [("r0", "an object", greedy(**base))])
    tokens = free.tokens[("r0", 0)]
    stop = tokens[4]
    cut = tokens.index(stop) + 1
    params = greedy(stop_token_ids=[stop], **base)
    sync, overlap = both([("r0", "an object", params)], page_size=1)
    assert_same_run(sync, overlap)
    assert overlap.tokens[("r0", 0)] == tokens[:cut] and overlap.finish[("r0", 0)] == "stop"
    assert overlap.forwards == sync.forwards + 1  # the one extra decode, whose token was discarded
    assert_sampler_saw_real_tokens(sync, overlap)


def test_abort_of_a_constrained_request_with_a_step_in_flight():
    requests = [
        ("c0", "colours", greedy(max_tokens=30, ignore_eos=True, structured_output=schema(COLOURS))),
        ("c1", "an object", greedy(structured_output=schema(OBJECT))),
        ("free", "hello", greedy(max_tokens=12, ignore_eos=True)),
    ]
    expected = run(make_engine(False), requests)
    sync, overlap = both(requests, abort=(4, "c0"))
    assert overlap.finish[("c0", 0)] == sync.finish[("c0", 0)] == "abort"
    assert overlap.tokens[("c0", 0)] == expected.tokens[("c0", 0)][: len(overlap.tokens[("c0", 0)])]
    for key in [("c1", 0), ("free", 0)]:
        assert overlap.tokens[key] == expected.tokens[key]


def test_preempted_constrained_sequences_keep_their_tokens():
    requests = [(f"r{i}", f"item number {i}", greedy(max_tokens=30, ignore_eos=True,
                                                     structured_output=schema(COLOURS if i % 2 else OBJECT)))
                for i in range(6)]
    expected = run(make_engine(False), requests)
    engine = make_engine(True, kv_cache_tokens=96, new_token_ratio_init=0.0, new_token_ratio_min=0.0)
    overlap = run(engine, requests)
    assert engine.stats().num_preemptions > 0
    assert overlap.tokens == expected.tokens


def test_prompt_logprobs_in_a_held_back_step():
    """A prompt-logprobs request prefilled in steps whose sampling waits for the previous step's tokens."""
    constrained = ("c0", "colours", greedy(max_tokens=30, ignore_eos=True, structured_output=schema(COLOURS)))
    text = "a longer prompt, prefilled in chunks next to the constrained decode, whose logprobs are wanted " * 2
    asking = ("p0", text, greedy(max_tokens=4, prompt_logprobs=2))
    sync, overlap = both([constrained], later=((3, asking),), max_num_batched_tokens=16)
    assert_same_run(sync, overlap)
    logprobs = overlap.prompt_logprobs[("p0", 0)]
    assert logprobs[0] is None and len(logprobs) == len(make_engine(True).tokenizer.encode(asking[1]))


# ---------------------------------------------------------------------- the CUDA executor (run with -m gpu)
@pytest.mark.gpu
def test_cuda_engine_constrained_rows_overlap_with_the_synchronous_tokens(tmp_path_factory):
    """On the GPU (CUDA graphs reading pending tokens on the device, masks uploaded per step) held-back
    sampling gives the synchronous engine's tokens, and completed JSON validates."""
    engine = make_cuda_engine(tmp_path_factory)
    requests = [
        ("colours", "colours", greedy(structured_output=schema(COLOURS), n=2)),
        ("object", "an object", greedy(max_tokens=80, structured_output=schema(OBJECT))),
        ("regex", "a code", greedy(max_tokens=12, structured_output=StructuredOutput("regex", r"[a-f]{3}-\d{2,4}"))),
        ("free", "hello there", greedy(max_tokens=20, ignore_eos=True)),
        ("seeded", "a story", SamplingParams(temperature=1.0, seed=3, max_tokens=20, ignore_eos=True)),
    ]
    engine.overlap = False
    sync = run(engine, requests)
    engine.overlap = True
    overlap = run(engine, requests)
    engine.shutdown()
    assert_same_run(sync, overlap)
    assert_sampler_saw_real_tokens(sync, overlap)
    assert overlap.forwards_with_future_tokens > 0
    for key, value in [(("object", 0), OBJECT), (("colours", 0), COLOURS), (("colours", 1), COLOURS)]:
        if overlap.finish[key] == "stop":
            jsonschema.validate(json.loads(engine.tokenizer.decode(overlap.tokens[key], skip_special_tokens=True)), value)
