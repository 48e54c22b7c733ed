"""The per-step token budget a worker starts with when --max-num-batched-tokens is not given."""

import pytest

from worker.config import ConfigError, EngineConfig
from worker.engine.llm_engine import LLMEngine
from worker.engine.step_budget import DEFAULT_BUDGET, SMALL_MODEL_BUDGET, default_step_token_budget


def test_rule_small_models_on_a_gpu_get_the_large_budget():
    assert default_step_token_budget("cuda", 600_000_000) == SMALL_MODEL_BUDGET
    assert default_step_token_budget("sim", 600_000_000) == SMALL_MODEL_BUDGET
    assert default_step_token_budget("cuda", 8_000_000_000) == DEFAULT_BUDGET
    assert default_step_token_budget("cpu", 600_000_000) == DEFAULT_BUDGET
    assert default_step_token_budget("cuda", None) == DEFAULT_BUDGET  # unknown size: the safe default


@pytest.mark.parametrize("model, expected", [("qwen3-0.6b", SMALL_MODEL_BUDGET), ("llama3-8b", DEFAULT_BUDGET)])
def test_sim_engine_resolves_the_budget_from_the_model(model, expected):
    engine = LLMEngine(EngineConfig(model=model, executor="sim", sim_profile="h200-llama3-8b", progress=False))
    assert engine.config.max_num_batched_tokens == expected
    assert engine.scheduler.config.max_num_batched_tokens == expected


def test_cpu_engine_keeps_2048_and_an_explicit_budget_wins():
    assert LLMEngine(EngineConfig(model="demo", device="cpu", progress=False)).config.max_num_batched_tokens == 2048
    engine = LLMEngine(EngineConfig(model="demo", device="cpu", max_num_batched_tokens=512, progress=False))
    assert engine.scheduler.config.max_num_batched_tokens == 512
    with pytest.raises(ConfigError, match="at least 16"):
        EngineConfig(max_num_batched_tokens=8).validate()
