"""The sim executor's cost model: the fit recovers known coefficients, profiles are checked on load."""

import json
import random
from pathlib import Path

import pytest

from worker.executor.sim import PROFILES_DIR, SimProfile, SimProfileError
from worker.executor.sim_cost_model import (FEATURES, FORMS, CostModel, StepSample, StepShape, fit,
                                            fit_samples)

# const, prefill_step, prefill_chunks, prefill_tokens, decode_seqs, decode_context_tokens, prefill_attention_pairs:
# a 5 ms graphed decode floor, 10 ms more for any eager (prefill) step, 0.5 ms per chunk
TRUE = CostModel((0.005, 0.010, 5e-4, 3e-5, 2e-5, 4e-9, 2e-10))


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
    assert shape.prefill_chunks == 1 and shape.value("prefill_step") == 1.0
    assert StepShape.from_lengths([100, 50], [1, 1], num_decodes=2).value("prefill_step") == 0.0
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
    assert result.model.coefficients[:2] == pytest.approx(TRUE.coefficients[:2], rel=0.05)
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
        ({"cost_model": {"form": "linear-v1", "coefficients_s": {"prefill_step": 0.01}}}, "unknown cost model"),
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


def piecewise_seconds(shape: StepShape) -> float:
    """A known cost of the GPU's kind: graphed decode steps, eager steps with a fixed host cost and a
    per-chunk cost on top of the linear terms."""
    eager = shape.prefill_chunks > 0
    return (0.005 + (0.010 + 5e-4 * shape.prefill_chunks if eager else 0.0) + 3e-5 * shape.prefill_tokens
            + 2e-5 * shape.decode_seqs + 4e-9 * shape.decode_context_tokens + 2e-10 * shape.prefill_attention_pairs)


def docqa_cells() -> list[tuple[int, int, list[tuple[int, int]]]]:
    """(decodes, their summed context, prefill chunks) of the doc-QA fleet's steps: decode batches,
    2048-token document chunks and ~40-token questions on a 3.5k cached document beside 0-128 decodes,
    and small prefill-only steps."""
    cells = []
    for decodes in (0, 1, 16, 32, 64, 128):
        context = decodes * 3600
        cells += [(decodes, context, [(0, 2048 - decodes)]), (decodes, context, [(2048 - decodes, 1452 + decodes)])]
        cells += [(decodes, context, [(3488, 42)] * k) for k in (1, 2, 4, 8)]
        if decodes:  # decode-only steps over the documents and over short chats
            cells += [(decodes, context, []), (decodes, decodes * 300, [])]
    return cells + [(0, 0, [(prefix, chunk)]) for chunk in (16, 64, 256) for prefix in (0, 2048)]


def docqa_shapes() -> list[StepShape]:
    return [StepShape.from_chunks(d, c, chunks) for d, c, chunks in docqa_cells()]


def test_eager_form_recovers_a_piecewise_cost_the_linear_form_cannot():
    shapes = docqa_shapes()
    seconds = [piecewise_seconds(s) for s in shapes]
    new = fit(shapes, seconds)
    assert new.model.form == "eager-v2"
    assert new.model.coefficients == pytest.approx(TRUE.coefficients, rel=1e-6)
    assert new.max_rel_error < 1e-6
    old = fit(shapes, seconds, form="linear-v1")
    assert old.max_rel_error > 0.3  # the small prefill steps' fixed cost has nowhere to go


def test_fit_samples_reports_families_and_leaves_out_stalls():
    rng = random.Random(4)
    samples = [StepSample(d, c, 0, tuple(chunks),
                          piecewise_seconds(StepShape.from_chunks(d, c, chunks)) * rng.uniform(0.99, 1.01),
                          "question" if chunks and chunks[0][1] == 42 else "other")
               for d, c, chunks in docqa_cells()]
    stall = StepSample(0, 0, 0, ((0, 16),), 2.5, "prefill")  # a 2.5 s JIT compile on a 16-token prefill
    result, dropped = fit_samples(samples + [stall])
    assert dropped == [stall]
    assert result.num_samples == len(samples)
    assert result.model.coefficients[1] == pytest.approx(0.010, rel=0.05)
    assert set(result.by_family) == {"question", "other"}
    assert result.by_family["question"]["max_rel_error"] < 0.05



def test_step_sample_round_trip_and_bad_samples():
    sample = StepSample.from_lengths([300, 200, 3488 + 42], [1, 1, 42], 2, 0.021, "question")
    assert (sample.decode_seqs, sample.decode_context_tokens, sample.decode_context_max) == (2, 500, 300)
    assert sample.chunks == ((3488, 42),)
    assert StepSample.from_dict(json.loads(json.dumps(sample.to_dict()))) == sample
    assert sample.shape == StepShape.from_lengths([300, 200, 3488 + 42], [1, 1, 42], 2)
    for bad in ({"d": [1, 2], "p": [], "s": 0.1}, {"d": [1, 2, 2], "p": [[1]], "s": 0.1},
                {"d": [1, 2, 2], "p": [], "s": 0}):
        with pytest.raises(ValueError, match="sample"):
            StepSample.from_dict(bad)


def test_shipped_linear_v1_profiles_still_load_and_price_steps_as_before():
    for path in sorted(Path(PROFILES_DIR).glob("*.json")):
        data = json.loads(path.read_text())
        profile = SimProfile.load(str(path))
        form = data["cost_model"].get("form", "linear-v1")
        assert profile.cost_model.form == form and form in FORMS
        if form == "linear-v1":
            c = data["cost_model"]["coefficients_s"]
            shape = StepShape.from_lengths([4000, 3000, 3488 + 42], [1, 1, 42], 2)
            want = (c["const"] + c["prefill_tokens"] * 42 + c["decode_seqs"] * 2 + c["decode_context_tokens"] * 7000
                    + c["prefill_attention_pairs"] * shape.prefill_attention_pairs)
            assert profile.cost_model.step_seconds(shape) == pytest.approx(want)
