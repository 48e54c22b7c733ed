"""The sim executor inside the real engine: no weights, modelled step times, KV budget, cheap sampling."""

import json
import time

import pytest
from sim_helpers import write_profile

from worker.config import ConfigError, EngineConfig
from worker.engine.llm_engine import LLMEngine
from worker.engine.protocol import EngineRequest
from worker.sampling_params import SamplingParams

MODEL = "llama3-8b"  # a real shape: the sim must start without materialising its 16 GB of weights


@pytest.fixture(autouse=True)
def home(tmp_path_factory, monkeypatch):
    folder = tmp_path_factory.getbasetemp() / "sim-home"
    monkeypatch.setenv("RADIXFLEET_HOME", str(folder))
    return folder


def engine_with(profile, **overrides) -> LLMEngine:
    settings = dict(model=MODEL, executor="sim", sim_profile=str(profile), kv_cache_tokens=8192, progress=False)
    settings.update(overrides)
    return LLMEngine(EngineConfig(**settings))


def run_all(engine, requests) -> dict[str, list]:
    outputs: dict[str, list] = {}
    for request_id, ids, params in requests:
        engine.add_request(EngineRequest(request_id, ids, params))
    while engine.has_unfinished():
        for out in engine.step():
            outputs.setdefault(out.request_id, []).append(out)
    return outputs


def test_starts_from_config_and_tokenizer_only(home, tmp_path):
    engine = engine_with(write_profile(tmp_path))
    files = {p.name for p in engine.model_path.iterdir()}
    assert {"config.json", "tokenizer.json", "tokenizer_config.json"} <= files
    assert not any(name.endswith(".safetensors") for name in files)
    assert engine.model_config.vocab_size == 128256
    # the sampler draws from a few ids only (no eos among them unless the profile gives eos odds)
    assert engine.sampler.vocab_size <= 1024
    assert not any(i < engine.sampler.vocab_size for i in engine.eos_token_ids)


def test_generates_to_max_tokens_and_reuses_the_cached_prefix(tmp_path):
    engine = engine_with(write_profile(tmp_path))
    prompt = engine.tokenizer.encode("a shared document about rivers and mills " * 20)
    first = run_all(engine, [("a", prompt, SamplingParams(max_tokens=12, temperature=0.0))])["a"]
    assert sum(len(o.new_token_ids) for o in first) == 12 and first[-1].finish_reason == "length"
    assert engine.tokenizer.decode([t for o in first for t in o.new_token_ids]).strip()  # real text comes out
    second = run_all(engine, [("b", prompt + [5, 6], SamplingParams(max_tokens=30, temperature=1.0, seed=1))])["b"]
    assert second[-1].finish_reason == "length"  # sampled, and still no eos: the default profile gives it no odds
    assert second[-1].num_cached_tokens >= len(prompt) - engine.cache.page_size
    assert engine.stats().cache_hit_tokens > 0


def test_eos_ends_outputs_only_when_the_profile_gives_it_odds(tmp_path):
    likely = engine_with(write_profile(tmp_path, "eos", const_s=0.0, sampling={"eos_probability": 0.5}))
    assert all(i < likely.sampler.vocab_size for i in likely.eos_token_ids)
    prompt = likely.tokenizer.encode("hello")
    sampled = run_all(likely, [(f"s{i}", prompt, SamplingParams(max_tokens=20, temperature=1.0, seed=i))
                               for i in range(8)])
    assert any(outs[-1].finish_reason == "stop" for outs in sampled.values())
    ignored = run_all(likely, [(f"i{i}", prompt, SamplingParams(max_tokens=20, temperature=1.0, seed=i,
                                                                ignore_eos=True)) for i in range(4)])
    assert all(outs[-1].finish_reason == "length" for outs in ignored.values())


def test_kv_capacity_from_the_flag_or_the_profiles_gpu_memory(tmp_path):
    assert engine_with(write_profile(tmp_path), kv_cache_tokens=4096).stats().kv_tokens_total == 4096
    gib = 1024**3
    memory = {"gpu_total_bytes": 100 * gib, "weights_bytes": 16 * gib, "reserved_bytes": 4 * gib}
    profile = write_profile(tmp_path, "mem", memory=memory)
    default_tokens = EngineConfig().kv_cache_tokens
    engine = engine_with(profile, kv_cache_tokens=default_tokens, mem_fraction=0.5)
    per_token = 2 * 32 * 8 * 128 * 2  # llama3-8b: layers, kv heads, head dim, K and V in bfloat16
    expected = (50 - 16 - 4) * gib // per_token
    assert abs(engine.stats().kv_tokens_total - expected) < engine.cache.page_size
    with pytest.raises(ConfigError, match="mem-fraction"):
        engine_with(profile, kv_cache_tokens=default_tokens, mem_fraction=0.15)


def test_a_costlier_profile_takes_longer_in_proportion(tmp_path):
    def wall(profile) -> tuple[float, float]:
        engine = engine_with(profile)
        prompt = engine.tokenizer.encode("one two three")
        # One untimed request first: a step credits the host CPU time spent since the step before (here the
        # engine's construction), which would otherwise shorten the first timed wait.
        run_all(engine, [("warm", prompt, SamplingParams(max_tokens=2, temperature=0.0))])
        modelled_before = engine.executor.modelled_seconds
        started = time.perf_counter()
        run_all(engine, [("r", prompt, SamplingParams(max_tokens=16, temperature=0.0))])
        return time.perf_counter() - started, engine.executor.modelled_seconds - modelled_before

    cheap_wall, cheap_model = wall(write_profile(tmp_path, "cheap", const_s=0.003))
    dear_wall, dear_model = wall(write_profile(tmp_path, "dear", const_s=0.030))
    assert dear_model == pytest.approx(10 * cheap_model, rel=0.01)
    assert dear_wall >= dear_model  # the modelled time is waited out
    assert dear_wall > 3 * cheap_wall


def test_deferred_mode_leaves_the_waiting_to_the_host(tmp_path):
    engine = engine_with(write_profile(tmp_path, "slow", const_s=0.5))
    engine.executor.defer_wait = True
    engine.add_request(EngineRequest("r", [1, 2, 3], SamplingParams(max_tokens=2, temperature=0.0)))
    engine.step()
    assert engine.executor.take_deferred_seconds() == pytest.approx(0.5, rel=0.01)
    assert engine.executor.take_deferred_seconds() == 0.0
    engine.executor.time_scale = 10.0  # a slowed-down fleet: every modelled step 10 times longer
    engine.step()
    assert engine.executor.take_deferred_seconds() == pytest.approx(5.0, rel=0.01)


def test_an_eager_v2_profile_prices_prefill_steps_above_decodes_and_splits_off_the_host_part(tmp_path):
    path = tmp_path / "eager.json"
    path.write_text(json.dumps({"name": "eager", "cost_model": {"form": "eager-v2", "coefficients_s": {
        "const": 0.005, "prefill_step": 0.010, "prefill_chunks": 0.001, "prefill_tokens": 1e-5}}}))
    engine = engine_with(path)
    engine.executor.defer_wait = True
    engine.add_request(EngineRequest("r", list(range(1, 101)), SamplingParams(max_tokens=2, temperature=0.0)))
    engine.step()  # the 100-token prefill: eager
    host, total = engine.executor.take_deferred()
    assert (host, total) == pytest.approx((0.010, 0.005 + 0.010 + 0.001 + 100 * 1e-5))
    engine.step()  # the decode: graphed, no host part
    assert engine.executor.take_deferred() == pytest.approx((0.0, 0.005))


def test_missing_profile_names_the_fix(tmp_path):
    # no calibrated profile ships for this shape (h200-llama3-8b and h200-qwen3-0.6b do)
    with pytest.raises(ConfigError, match="--sim-profile"):
        LLMEngine(EngineConfig(model="mistral-7b", executor="sim", progress=False))
    with pytest.raises(ConfigError, match="bench calibrate"):
        engine_with(tmp_path / "absent.json")
