"""Greedy output of the engine must equal transformers' `generate`, token for token, on the same
random-weight checkpoints (written by our own make-checkpoint, loaded by our own loader) — however the
engine schedules the work: one request, many concurrent ones, tiny prefill chunks, forced preemption,
and with or without a cached prefix."""

from __future__ import annotations

import random

import pytest
import torch

from worker.config import EngineConfig
from worker.engine.llm_engine import LLMEngine
from worker.engine.protocol import EngineRequest
from worker.models.checkpoint_writer import write_checkpoint
from worker.sampling_params import SamplingParams

transformers = pytest.importorskip("transformers")

PRESETS = ["tiny-llama3", "tiny-qwen2", "tiny-qwen3"]
MAX_NEW = 10


@pytest.fixture(scope="module", params=PRESETS)
def checkpoint(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(request.param) / "ckpt"
    write_checkpoint(request.param, folder, seed=1, progress=False)
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager")
    hf.eval()
    return folder, hf


def hf_greedy(hf, prompt: list[int], max_new: int) -> list[int]:
    with torch.inference_mode():
        out = hf.generate(
            torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            max_new_tokens=max_new, do_sample=False, eos_token_id=None, pad_token_id=0,
        )
    return out[0, len(prompt):].tolist()


def engine_greedy(engine: LLMEngine, prompts: list[list[int]], max_new: int) -> tuple[list[list[int]], list[int]]:
    """Submit all prompts at once and run to completion; returns outputs and cached-token counts."""
    params = SamplingParams(temperature=0.0, max_tokens=max_new, ignore_eos=True)
    for i, p in enumerate(prompts):
        engine.add_request(EngineRequest(f"r{i}", p, params))
    tokens = {i: [] for i in range(len(prompts))}
    cached = {}
    steps = 0
    while engine.has_unfinished():
        for out in engine.step():
            i = int(out.request_id[1:])
            tokens[i].extend(out.new_token_ids)
            cached[i] = out.num_cached_tokens
        engine.check_invariants()
        steps += 1
        assert steps < 20_000
    assert engine.stats().kv_tokens_used == 0
    return [tokens[i] for i in range(len(prompts))], [cached[i] for i in range(len(prompts))]


def random_prompts(vocab: int, count: int, seed: int, min_len=1, max_len=60, shared: list[int] | None = None):
    rng = random.Random(seed)
    prefix = shared or []
    return [prefix + [rng.randrange(5, vocab) for _ in range(rng.randint(min_len, max_len))] for _ in range(count)]


def make_engine(folder, **overrides) -> LLMEngine:
    options = dict(model=str(folder), device="cpu", page_size=4, kv_cache_tokens=8192, progress=False)
    options.update(overrides)
    return LLMEngine(EngineConfig(**options))


def assert_same(expected: list[list[int]], got: list[list[int]]):
    for i, (e, g) in enumerate(zip(expected, got)):
        assert g == e, f"request {i}: engine {g} != transformers {e}"


def test_single_request(checkpoint):
    folder, hf = checkpoint
    engine = make_engine(folder)
    prompt = random_prompts(hf.config.vocab_size, 1, seed=0, min_len=20, max_len=20)
    got, _ = engine_greedy(engine, prompt, MAX_NEW)
    assert_same([hf_greedy(hf, prompt[0], MAX_NEW)], got)


@pytest.fixture(scope="module")
def mixed_workload(checkpoint):
    folder, hf = checkpoint
    prompts = random_prompts(hf.config.vocab_size, 16, seed=1)
    return prompts, [hf_greedy(hf, p, MAX_NEW) for p in prompts]


def test_sixteen_concurrent_requests_of_mixed_lengths(checkpoint, mixed_workload):
    prompts, expected = mixed_workload
    got, _ = engine_greedy(make_engine(checkpoint[0]), prompts, MAX_NEW)
    assert_same(expected, got)


def test_small_prefill_chunks(checkpoint, mixed_workload):
    prompts, expected = mixed_workload
    engine = make_engine(checkpoint[0], max_num_batched_tokens=16, page_size=1)
    got, _ = engine_greedy(engine, prompts, MAX_NEW)
    assert_same(expected, got)


def test_forced_preemption_gives_the_same_tokens(checkpoint, mixed_workload):
    prompts, expected = mixed_workload
    # room for about two sequences at once and no decode reserve: the scheduler must preempt
    engine = make_engine(checkpoint[0], kv_cache_tokens=160, page_size=4, new_token_ratio_init=0.0,
                         new_token_ratio_min=0.0)
    got, _ = engine_greedy(engine, prompts, MAX_NEW)
    assert engine.stats().num_preemptions > 0
    assert_same(expected, got)


@pytest.mark.parametrize("page_size", [1, 16])
def test_cached_prefix_does_not_change_a_token(checkpoint, page_size):
    folder, hf = checkpoint
    shared = random_prompts(hf.config.vocab_size, 1, seed=5, min_len=40, max_len=40)[0]
    prompts = random_prompts(hf.config.vocab_size, 4, seed=6, max_len=12, shared=shared)
    expected = [hf_greedy(hf, p, MAX_NEW) for p in prompts]
    cold = make_engine(folder, page_size=page_size, enable_prefix_cache=False)
    got_cold, cached_cold = engine_greedy(cold, prompts, MAX_NEW)
    assert cached_cold == [0, 0, 0, 0]
    warm = make_engine(folder, page_size=page_size)
    engine_greedy(warm, [shared + [7]], 2)  # warm the cache with the shared prefix
    got_warm, cached_warm = engine_greedy(warm, prompts, MAX_NEW)
    assert all(c >= (40 // page_size) * page_size for c in cached_warm)
    assert_same(expected, got_cold)
    assert_same(expected, got_warm)
