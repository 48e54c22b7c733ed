"""The sim executor's cost model: the fit recovers known coefficients, profiles are checked on load."""

import json
import random

import pytest

from worker.executor.sim import SimProfile, SimProfileError
from worker.executor.sim_cost_model import FEATURES, CostModel, StepShape, fit

TRUE = CostModel((0.006, 3e-5, 2e-5, 4e-9, 2e-10))


def random_shapes(n: int, seed: int = 0) -> list[StepShape]:
    rng = random.Random(seed)
    shapes = []
    for _ in range(n):
        decodes = rng.choice([0, 1, 8, 32, 128, 256])
        contexts = [rng.randrange(64, 8192) for _ in range(decodes)]
        chunks = [rng.randrange(1, 2048) for _ in range(rng.choice([0, 0, 1, 2]))]
        prefixes = [rng.randrange(0, 8192) for _ in chunks]
        seq_lens = contexts + [p + c for p, c in zip(prefixes, chunks)]
        extend_lens = [1] * decodes + chunks
        if seq_lens:
            shapes.append(StepShape.from_lengths(seq_lens, extend_lens, decodes))
    return shapes


def test_step_shape_counts_decodes_and_prefill_attention():
    shape = StepShape.from_lengths([100, 50, 30 + 10], [1, 1, 10], num_decodes=2)
    assert (shape.prefill_tokens, shape.decode_seqs, shape.decode_context_tokens) == (10, 2, 150)
    # 10 new tokens over a 30-token prefix: each attends to the prefix and, causally, to 1..10 new ones
    assert shape.prefill_attention_pairs == sum(30 + k for k in range(1, 11))


def test_fit_recovers_known_coefficients_from_exact_times():
    shapes = random_shapes(200)
    result = fit(shapes, [TRUE.step_seconds(s) for s in shapes])
    for name, got, want in zip(FEATURES, result.model.coefficients, TRUE.coefficients):
        assert got == pytest.approx(want, rel=1e-6), name
    assert result.r2 == pytest.approx(1.0) and result.max_rel_error < 1e-6


def test_fit_with_noise_predicts_unseen_steps_and_reports_its_error():
    rng = random.Random(1)
    shapes = random_shapes(400, seed=2)
    times = [TRUE.step_seconds(s) * rng.uniform(0.97, 1.03) for s in shapes]
    result = fit(shapes, times)
    assert result.model.coefficients[0] == pytest.approx(TRUE.coefficients[0], rel=0.05)
    for shape in random_shapes(100, seed=3):  # steps the fit never saw
        assert result.model.step_seconds(shape) == pytest.approx(TRUE.step_seconds(shape), rel=0.03)
    assert 0.01 < result.max_rel_error < 0.06
    assert result.r2 > 0.99


def test_fit_never_returns_a_negative_cost():
    # times that fall with the decode batch would need a negative coefficient: it is clamped to 0
    shapes = [StepShape(decode_seqs=b, decode_context_tokens=100 * b) for b in range(1, 40)]
    times = [0.010 - 0.0001 * b for b in range(1, 40)]
    result = fit(shapes, times)
    assert all(c >= 0 for c in result.model.coefficients)


def test_fit_needs_enough_positive_samples():
    with pytest.raises(ValueError, match="at least"):
        fit([StepShape(decode_seqs=1)], [0.01])
    with pytest.raises(ValueError, match="positive"):
        fit(random_shapes(10), [0.0] * len(random_shapes(10)))


def test_profile_round_trip_and_bad_profiles(tmp_path):
    path = tmp_path / "p.json"
    path.write_text(json.dumps({"name": "p", "cost_model": TRUE.to_dict()}))
    assert SimProfile.load(str(path)).cost_model == TRUE
    for bad, message in [
        ({}, "cost_model"),
        ({"cost_model": {"coefficients_s": {"const": -1}}}, "non-negative"),
        ({"cost_model": {"coefficients_s": {"flops": 1}}}, "unknown cost model feature"),
        ({"cost_model": {"form": "cubic", "coefficients_s": {}}}, "not supported"),
        ({"cost_model": TRUE.to_dict(), "sampling": {"eos_probability": 2}}, "eos_probability"),
    ]:
        path.write_text(json.dumps(bad))
        with pytest.raises(SimProfileError, match=message):
            SimProfile.load(str(path))
    path.write_text("{not json")
    with pytest.raises(SimProfileError, match="not readable JSON"):
        SimProfile.load(str(path))
    with pytest.raises(SimProfileError, match="bench calibrate"):
        SimProfile.load("no-such-profile")
