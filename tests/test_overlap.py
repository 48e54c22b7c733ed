"""Overlap scheduling (EngineConfig.overlap_schedule) must not change a single token.

With overlap the engine launches step N+1 before it reads back step N's tokens: decodes refer to tokens
still on the device, eos is seen one step late, and finished / preempted / aborted sequences may have a
step in flight. On the CPU the same code path runs synchronously underneath, so every scenario here is
compared token for token with overlap off and (greedy) with transformers, with the scheduler's page
invariants checked after every step and no KV left in use at the end.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
import torch

from worker.config import EngineConfig
from worker.engine.llm_engine import LLMEngine
from worker.engine.protocol import EngineRequest
from worker.executor.base import resolve_future_tokens
from worker.models.checkpoint_writer import write_checkpoint
from worker.sampling_params import SamplingParams

from test_engine_vs_hf import hf_greedy, random_prompts

transformers = pytest.importorskip("transformers")

MAX_NEW = 8


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-llama3") / "ckpt"
    write_checkpoint("tiny-llama3", folder, seed=1, progress=False)
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager")
    hf.eval()
    return folder, hf


@pytest.fixture(scope="module")
def vocab(checkpoint) -> int:
    return checkpoint[1].config.vocab_size


def make_engine(folder, overlap: bool, **overrides) -> LLMEngine:
    options = dict(model=str(folder), device="cpu", page_size=4, kv_cache_tokens=8192, progress=False,
                   overlap_schedule=overlap)
    options.update(overrides)
    engine = LLMEngine(EngineConfig(**options))
    assert engine.overlap is overlap
    return engine


@dataclass
class Run:
    """What one engine run produced, per (request id, choice index)."""

    tokens: dict = field(default_factory=dict)
    finish: dict = field(default_factory=dict)
    stop_ids: dict = field(default_factory=dict)
    logprobs: dict = field(default_factory=dict)
    cached: dict = field(default_factory=dict)
    forwards: int = 0
    forwards_with_future_tokens: int = 0


def run(engine: LLMEngine, requests: list[tuple[str, list[int], SamplingParams]], abort=None) -> Run:
    """Submit everything, step to completion, check invariants after each step. `abort`: (step, id)."""
    result = Run()
    forward = engine.executor.forward

    def counting_forward(batch, future_tokens=None):
        result.forwards += 1
        if future_tokens is not None:
            result.forwards_with_future_tokens += 1
            return forward(batch, future_tokens=future_tokens)
        return forward(batch)

    engine.executor.forward = counting_forward
    for rid, prompt, params in requests:
        engine.add_request(EngineRequest(rid, prompt, params))
    steps = 0
    while engine.has_unfinished():
        if abort is not None and steps == abort[0]:
            engine.abort_request(abort[1])
        for out in engine.step():
            key = (out.request_id, out.index)
            result.tokens.setdefault(key, []).extend(out.new_token_ids)
            if out.logprobs:
                result.logprobs.setdefault(key, []).extend(out.logprobs)
            if out.finish_reason is not None:
                assert key not in result.finish, f"{key} finished twice"
                result.finish[key] = out.finish_reason
                result.stop_ids[key] = out.stop_token_id
            result.cached[key] = out.num_cached_tokens
        engine.check_invariants()
        steps += 1
        assert steps < 5000
    assert engine.stats().kv_tokens_used == 0
    assert not engine.scheduler.running and not engine.scheduler.waiting
    return result


def greedy(max_tokens=MAX_NEW, **extra) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, **extra)


def both(folder, requests, abort=None, **overrides) -> tuple[Run, Run]:
    """The same workload with overlap off and on."""
    return (run(make_engine(folder, False, **overrides), requests, abort),
            run(make_engine(folder, True, **overrides), requests, abort))


def assert_same_run(sync: Run, overlap: Run) -> None:
    assert overlap.tokens == sync.tokens
    assert overlap.finish == sync.finish
    assert overlap.stop_ids == sync.stop_ids


# ---------------------------------------------------------------------- greedy, against transformers
def test_single_request_matches_transformers_and_overlaps(checkpoint, vocab):
    folder, hf = checkpoint
    prompt = random_prompts(vocab, 1, seed=0, min_len=20, max_len=20)[0]
    sync, overlap = both(folder, [("r0", prompt, greedy())])
    assert overlap.tokens[("r0", 0)] == hf_greedy(hf, prompt, MAX_NEW)
    assert_same_run(sync, overlap)
    # every decode but the first read its input token on the device, and no step was added
    assert overlap.forwards_with_future_tokens == MAX_NEW - 1
    assert sync.forwards_with_future_tokens == 0
    assert overlap.forwards == sync.forwards == MAX_NEW


@pytest.fixture(scope="module")
def mixed(checkpoint, vocab):
    prompts = random_prompts(vocab, 16, seed=1)
    expected = {(f"r{i}", 0): hf_greedy(checkpoint[1], p, MAX_NEW) for i, p in enumerate(prompts)}
    return [(f"r{i}", p, greedy()) for i, p in enumerate(prompts)], expected


def test_sixteen_concurrent_requests(checkpoint, mixed):
    requests, expected = mixed
    sync, overlap = both(checkpoint[0], requests)
    assert overlap.tokens == expected
    assert_same_run(sync, overlap)


def test_small_prefill_chunks(checkpoint, mixed):
    requests, expected = mixed
    sync, overlap = both(checkpoint[0], requests, max_num_batched_tokens=16, page_size=1)
    assert overlap.tokens == expected
    assert_same_run(sync, overlap)


def test_forced_preemption_of_sequences_with_tokens_in_flight(checkpoint, mixed):
    requests, expected = mixed
    options = dict(kv_cache_tokens=160, page_size=4, new_token_ratio_init=0.0, new_token_ratio_min=0.0)
    engine = make_engine(checkpoint[0], True, **options)
    overlap = run(engine, requests)
    assert engine.stats().num_preemptions > 0
    assert overlap.tokens == expected


@pytest.mark.parametrize("page_size", [1, 16])
def test_cached_prefix(checkpoint, vocab, page_size):
    folder, hf = checkpoint
    shared = random_prompts(vocab, 1, seed=5, min_len=40, max_len=40)[0]
    prompts = random_prompts(vocab, 4, seed=6, max_len=12, shared=shared)
    engine = make_engine(folder, True, page_size=page_size)
    run(engine, [("warm", shared + [7], greedy(2))])
    got = run(engine, [(f"r{i}", p, greedy()) for i, p in enumerate(prompts)])
    assert all(got.cached[(f"r{i}", 0)] >= (40 // page_size) * page_size for i in range(4))
    assert got.tokens == {(f"r{i}", 0): hf_greedy(hf, p, MAX_NEW) for i, p in enumerate(prompts)}


def test_n_choices(checkpoint, vocab):
    folder, hf = checkpoint
    prompt = random_prompts(vocab, 1, seed=7, min_len=30, max_len=30)[0]
    sync, overlap = both(folder, [("r0", prompt, greedy(n=2))])
    expected = hf_greedy(hf, prompt, MAX_NEW)
    assert overlap.tokens == {("r0", 0): expected, ("r0", 1): expected}
    assert_same_run(sync, overlap)


# ---------------------------------------------------------------------- stops
def test_stop_token_found_one_step_late_is_cut_exactly(checkpoint, vocab):
    """The stop token is known only after the next decode was launched: that step's token is dropped,
    and what the finished sequence leaves in the radix cache serves a later request correctly."""
    folder, hf = checkpoint
    prompt = random_prompts(vocab, 1, seed=8, min_len=13, max_len=13)[0]
    free_run = hf_greedy(hf, prompt, 12)
    stop = free_run[4]
    cut = free_run.index(stop) + 1
    params = SamplingParams(temperature=0.0, max_tokens=12, stop_token_ids=[stop])
    sync, overlap = both(folder, [("r0", prompt, params)], page_size=1)
    assert overlap.tokens[("r0", 0)] == free_run[:cut]
    assert overlap.finish[("r0", 0)] == "stop" and overlap.stop_ids[("r0", 0)] == stop
    assert_same_run(sync, overlap)
    assert overlap.forwards == sync.forwards + 1  # the one extra decode, whose token was discarded

    engine = make_engine(folder, True, page_size=1)
    run(engine, [("r0", prompt, params)])
    follow_up = prompt + free_run[:cut] + [11, 12]
    again = run(engine, [("r1", follow_up, greedy())])
    assert again.cached[("r1", 0)] >= len(prompt) + cut - 1  # reused the stopped sequence's KV
    assert again.tokens[("r1", 0)] == hf_greedy(hf, follow_up, MAX_NEW)


def test_min_tokens_hold_back_the_stop_token(checkpoint, vocab):
    folder, hf = checkpoint
    prompt = random_prompts(vocab, 1, seed=8, min_len=13, max_len=13)[0]
    stop = hf_greedy(hf, prompt, 12)[1]
    params = SamplingParams(temperature=0.0, max_tokens=12, stop_token_ids=[stop], min_tokens=5)
    sync, overlap = both(folder, [("r0", prompt, params), ("r1", prompt[:7], params)])
    assert len(overlap.tokens[("r0", 0)]) >= 5
    assert_same_run(sync, overlap)


def test_max_tokens_schedules_no_extra_step(checkpoint, vocab):
    folder, _ = checkpoint
    prompts = random_prompts(vocab, 3, seed=9)
    requests = [(f"r{i}", p, greedy(max_tokens=m)) for i, (p, m) in enumerate(zip(prompts, (1, 2, 7)))]
    sync, overlap = both(folder, requests)
    assert_same_run(sync, overlap)
    assert [len(overlap.tokens[(f"r{i}", 0)]) for i in range(3)] == [1, 2, 7]
    assert set(overlap.finish.values()) == {"length"}
    assert overlap.forwards == sync.forwards


def test_context_length_limit(checkpoint, vocab):
    folder, _ = checkpoint
    prompt = random_prompts(vocab, 1, seed=10, min_len=20, max_len=20)[0]
    params = SamplingParams(temperature=0.0, ignore_eos=True, max_tokens=None)  # the context ends it
    sync, overlap = both(folder, [("r0", prompt, params)], max_model_len=28)
    assert len(overlap.tokens[("r0", 0)]) == 8 and overlap.finish[("r0", 0)] == "length"
    assert_same_run(sync, overlap)


def test_abort_with_a_step_in_flight(checkpoint, mixed):
    requests, expected = mixed
    requests = requests[:4]
    sync, overlap = both(checkpoint[0], requests, abort=(3, "r1"))
    assert overlap.finish[("r1", 0)] == "abort"
    assert overlap.tokens[("r1", 0)] == expected[("r1", 0)][: len(overlap.tokens[("r1", 0)])]
    for key in [("r0", 0), ("r2", 0), ("r3", 0)]:
        assert overlap.tokens[key] == expected[key]
    assert sync.finish[("r1", 0)] == "abort"


# ---------------------------------------------------------------------- sampling
def test_seeded_sampling_and_logprobs_do_not_depend_on_overlap(checkpoint, vocab):
    folder, _ = checkpoint
    prompts = random_prompts(vocab, 3, seed=11)
    requests = [
        ("seeded", prompts[0], SamplingParams(temperature=1.0, seed=123, n=2, max_tokens=MAX_NEW, ignore_eos=True)),
        ("topk", prompts[1], SamplingParams(temperature=0.8, top_k=20, top_p=0.9, seed=7, max_tokens=MAX_NEW,
                                            ignore_eos=True, logprobs=3)),
        ("greedy", prompts[2], greedy(logprobs=2)),
    ]
    sync, overlap = both(folder, requests)
    assert_same_run(sync, overlap)
    assert overlap.logprobs == sync.logprobs
    assert len(overlap.logprobs[("topk", 0)]) == MAX_NEW


def test_penalised_steps_overlap_with_unchanged_tokens(checkpoint, vocab):
    """Penalties count output tokens on the device (worker/engine/sampling_penalties.py): penalised steps
    overlap like any other, and the tokens are those of the synchronous run."""
    folder, _ = checkpoint
    prompts = random_prompts(vocab, 2, seed=12)
    requests = [
        ("pen", prompts[0], SamplingParams(temperature=0.0, max_tokens=MAX_NEW, ignore_eos=True,
                                           presence_penalty=1.5, frequency_penalty=0.5, repetition_penalty=1.3)),
        ("plain", prompts[1], greedy()),
    ]
    sync, overlap = both(folder, requests)
    assert_same_run(sync, overlap)


# ---------------------------------------------------------------------- the scheduler with a step in flight
def _launched_prompt(stop_after_preempt: bool):
    """One sequence whose first token is launched (not resolved), then preempted; resolves to EOS or not."""
    from test_scheduler import EOS, make_scheduler, make_seq

    from worker.engine.forward_batch import build_forward_batch

    sched = make_scheduler(page_size=4)
    seq = make_seq("a", list(range(20, 30)), max_tokens=8)
    sched.add(seq)
    batch = sched.schedule()
    launched = sched.launch(batch, batch.sampling_rows())
    assert launched == [seq] and seq.num_pending_tokens == 1 and seq.output_token_ids == [-1]

    decode = sched.schedule()  # the next decode reads its input from row 0 of the launched step
    forward_batch, _ = build_forward_batch(decode, 4)
    assert forward_batch.input_ids.tolist() == [-1]
    sched.launch(decode, decode.sampling_rows())  # its step is in flight too; now preempt the sequence
    sched.preempt(seq)
    sched.check_invariants()
    assert not sched.schedule().seqs  # never prefilled while a token is still on the device
    advanced, finished = sched.resolve(launched, [EOS if stop_after_preempt else 42], frozenset({EOS}))
    assert advanced == [0]
    return sched, seq, finished


def test_preempted_sequence_finishes_when_its_pending_token_is_a_stop():
    sched, seq, finished = _launched_prompt(stop_after_preempt=True)
    assert finished == [seq] and seq.finish_reason == "stop"
    assert seq.output_token_ids == [3] and seq not in sched.waiting
    sched.check_invariants()
    assert sched.kv_tokens_in_use() == 0


def test_preempted_sequence_is_readmitted_with_its_real_token():
    from worker.engine.forward_batch import build_forward_batch

    sched, seq, finished = _launched_prompt(stop_after_preempt=False)
    assert not finished and seq.output_token_ids == [42, -1] and seq.num_pending_tokens == 1
    sched.resolve([seq], [43])  # the second step in flight resolves while the sequence waits
    assert seq.output_token_ids == [42, 43] and seq.num_pending_tokens == 0
    batch = sched.schedule()
    assert batch.seqs == [seq]
    forward_batch, rows = build_forward_batch(batch, 4)
    assert rows == [0] and forward_batch.input_ids.tolist()[-2:] == [42, 43]
    assert min(forward_batch.input_ids.tolist()) >= 0
    sched.check_invariants()


def test_overlap_setting(checkpoint):
    """auto: off on the CPU (nothing runs concurrently there); on/off and booleans force it; typos are named."""
    import argparse

    from worker.config import ConfigError
    from worker.server.cli import add_engine_arguments, engine_config_from_args

    folder = checkpoint[0]
    assert not LLMEngine(EngineConfig(model=str(folder), device="cpu", progress=False)).overlap
    assert LLMEngine(EngineConfig(model=str(folder), device="cpu", progress=False, overlap_schedule="on")).overlap
    assert EngineConfig(overlap_schedule=False).validate().overlap_schedule == "off"
    with pytest.raises(ConfigError, match="--overlap-schedule"):
        EngineConfig(overlap_schedule="yes").validate()
    parser = argparse.ArgumentParser()
    add_engine_arguments(parser)
    assert engine_config_from_args(parser.parse_args(["--overlap-schedule", "on"])).overlap_schedule == "on"
    assert engine_config_from_args(parser.parse_args([])).overlap_schedule == "auto"


def test_resolve_future_tokens():
    future = torch.tensor([50, 60, 70])
    ids = torch.tensor([5, -3, -1, 0, 9])
    assert resolve_future_tokens(ids, future).tolist() == [5, 70, 50, 0, 9]


# ---------------------------------------------------------------------- the CUDA executor (run with -m gpu)
def make_cuda_engine(tmp_path_factory) -> LLMEngine:
    """One qwen3-0.6b engine on the GPU with decode graphs and overlap, prefix cache off so that runs with
    overlap off and on compute the same shapes (the caller flips `engine.overlap`)."""
    from test_cuda_executor import checkpoint_folder

    folder = checkpoint_folder("qwen3-0.6b", tmp_path_factory)
    engine = LLMEngine(EngineConfig(model=str(folder), device="cuda", progress=False, mem_fraction=0.4,
                                    cuda_graph_max_bs=16, page_size=16, enable_prefix_cache=False,
                                    overlap_schedule=True))
    assert engine.executor.uses_cuda_graphs and engine.overlap
    return engine


@pytest.mark.gpu
def test_cuda_engine_overlap_gives_the_same_tokens(tmp_path_factory):
    """On the GPU (pinned copies, events, CUDA graphs reading pending tokens on the device) overlap changes
    no token: one engine, prefix cache off so both runs compute the same shapes, overlap off then on."""
    from test_cuda_executor import random_prompts as gpu_prompts

    engine = make_cuda_engine(tmp_path_factory)
    vocab = engine.model_config.vocab_size
    prompts = gpu_prompts(vocab, [5, 64, 317, 1000, 12, 40, 90, 3, 150, 22, 7, 600], seed=3)
    requests = [(f"g{i}", p, greedy(24)) for i, p in enumerate(prompts)]
    requests += [
        ("seeded", prompts[1], SamplingParams(temperature=0.9, top_p=0.9, seed=5, n=2, max_tokens=24, ignore_eos=True,
                                              logprobs=2)),
        ("penalty", prompts[2], SamplingParams(temperature=0.0, max_tokens=24, presence_penalty=1.0, ignore_eos=True)),
    ]
    engine.overlap = False
    sync = run(engine, requests)
    engine.overlap = True
    overlap = run(engine, requests)
    engine.shutdown()
    assert overlap.forwards_with_future_tokens > 0
    assert_same_run(sync, overlap)
    assert all(len(tokens) == 24 for tokens in overlap.tokens.values())
