"""The sampler (worker/engine/sampler.py): greedy, temperature, filters, seeds, penalties, min_tokens, logprobs."""

from __future__ import annotations

import math

import pytest
import torch

from worker.engine.sampler import Sampler, SamplingState, apply_min_p, apply_top_k, apply_top_k_top_p, row_seed
from worker.sampling_params import InvalidParameter, SamplingParams

torch.set_num_threads(1)


def state(prompt=(0,), output=(), choice_index=0, eos=(), **params) -> SamplingState:
    params.setdefault("max_tokens", None)
    return SamplingState(
        params=SamplingParams(**params),
        prompt_token_ids=list(prompt),
        output_token_ids=list(output),
        choice_index=choice_index,
        eos_token_ids=tuple(eos),
    )


def random_logits(rows: int, vocab: int, seed: int = 0, scale: float = 2.0) -> torch.Tensor:
    return torch.randn(rows, vocab, generator=torch.Generator().manual_seed(seed)) * scale


def chi_square(counts: torch.Tensor, probs: torch.Tensor) -> float:
    expected = probs * counts.sum()
    return float(((counts - expected) ** 2 / expected).sum())


# ---------------------------------------------------------------------- greedy and temperature
def test_greedy_is_argmax():
    logits = random_logits(16, 100)
    result = Sampler(100, "cpu")(logits, [state(temperature=0.0) for _ in range(16)])
    assert result.token_ids == logits.argmax(-1).tolist()
    assert result.logprobs == [None] * 16


def test_greedy_rows_stay_argmax_in_a_mixed_batch():
    logits = random_logits(8, 50, seed=1)
    states = [state(temperature=0.0 if i % 2 == 0 else 1.0, top_k=5 if i == 3 else 0) for i in range(8)]
    tokens = Sampler(50, "cpu")(logits, states).token_ids
    argmax = logits.argmax(-1).tolist()
    assert [tokens[i] for i in range(0, 8, 2)] == [argmax[i] for i in range(0, 8, 2)]


def test_greedy_only_batch_takes_the_fast_path(monkeypatch):
    """No softmax, sort or noise for an all-greedy batch (this is the common GPU decode case)."""

    def forbidden(*args, **kwargs):
        raise AssertionError("greedy-only batches must not compute a softmax or sort")

    monkeypatch.setattr(torch, "softmax", forbidden)
    monkeypatch.setattr(torch.Tensor, "sort", forbidden)
    monkeypatch.setattr(torch.Tensor, "exponential_", forbidden)
    logits = random_logits(4, 30)
    assert Sampler(30, "cpu")(logits, [state(temperature=0.0)] * 4).token_ids == logits.argmax(-1).tolist()


@pytest.mark.parametrize("seeded", [False, True])
def test_temperature_sampling_follows_the_softmax_distribution(seeded):
    logits = torch.tensor([1.0, 0.5, 0.0, -0.5, -1.0, 2.0])
    temperature = 0.7
    draws = 4000
    if seeded:  # one seeded request, many output positions: each position gets fresh noise
        states = [state(temperature=temperature, seed=3, output=[0] * i) for i in range(draws)]
    else:
        states = [state(temperature=temperature) for _ in range(draws)]
    tokens = Sampler(6, "cpu", seed=5)(logits.expand(draws, 6), states).token_ids
    counts = torch.bincount(torch.tensor(tokens), minlength=6).float()
    expected = torch.softmax(logits / temperature, -1)
    # 5 degrees of freedom: the 99.99th percentile is ~25.7. A wrong temperature gives hundreds.
    assert chi_square(counts, expected) < 30
    assert chi_square(counts, torch.softmax(logits, -1)) > 100  # temperature 1 would not fit


def test_tiny_temperature_is_greedy():
    logits = random_logits(4, 40, seed=3)
    tokens = Sampler(40, "cpu")(logits, [state(temperature=1e-7)] * 4).token_ids
    assert tokens == logits.argmax(-1).tolist()


# ---------------------------------------------------------------------- filters
def probabilities(logits: torch.Tensor) -> list[float]:
    return torch.softmax(logits, -1).tolist()


def test_top_k_top_p_min_p_never_emit_excluded_tokens():
    vocab, draws = 20, 600
    logits = random_logits(1, vocab, seed=4, scale=1.0)[0]
    order = logits.argsort(descending=True).tolist()
    probs = probabilities(logits)
    top3 = set(order[:3])
    nucleus, mass = set(), 0.0
    for token in order:  # keep tokens while the mass ranked above them is below 0.6
        if mass >= 0.6:
            break
        nucleus.add(token)
        mass += probs[token]
    best = max(probs)
    above_min_p = {t for t in range(vocab) if probs[t] >= 0.3 * best}
    settings = [dict(top_k=3), dict(top_p=0.6), dict(min_p=0.3)]
    allowed = [top3, nucleus, above_min_p]
    assert all(1 < len(a) < vocab for a in allowed)  # each filter really excludes something here

    # All three kinds of rows in one batch, interleaved.
    states = [state(**settings[i % 3]) for i in range(3 * draws)]
    tokens = Sampler(vocab, "cpu")(logits.expand(3 * draws, vocab), states).token_ids
    for kind in range(3):
        emitted = set(tokens[kind::3])
        assert emitted <= allowed[kind]
        assert emitted == allowed[kind]  # and the kept tokens are all reachable


def test_top_k_only_batch_uses_the_same_filter():
    logits = random_logits(6, 50, seed=9)
    ks = [1, 3, 50, 7, 60, 49]
    expected = apply_top_k_top_p(logits, top_k=ks, top_p=[float("inf")] * 6)
    assert torch.equal(apply_top_k(logits, ks), expected)
    assert torch.isfinite(expected).sum(-1).tolist() == [1, 3, 50, 7, 50, 49]
    tokens = Sampler(50, "cpu")(logits[:1].expand(300, 50), [state(top_k=4)] * 300).token_ids
    assert set(tokens) == set(logits[0].topk(4).indices.tolist())


def test_top_k_top_p_filter_on_a_hand_made_example():
    logits = torch.log(torch.tensor([[0.5, 0.2, 0.15, 0.1, 0.05], [0.5, 0.2, 0.15, 0.1, 0.05]]))
    filtered = apply_top_k_top_p(logits, top_k=[5, 2], top_p=[0.8, float("inf")])
    kept = torch.isfinite(filtered).tolist()
    assert kept[0] == [True, True, True, False, False]  # 0.5 + 0.2 < 0.8, so 0.15 is in; then 0.85 >= 0.8
    assert kept[1] == [True, True, False, False, False]  # top_k=2
    assert torch.equal(filtered[torch.isfinite(filtered)], logits[torch.isfinite(filtered)])


def test_top_p_applies_after_top_k():
    logits = torch.log(torch.tensor([[0.4, 0.3, 0.2, 0.1]]))
    # After top_k=2 the renormalised probabilities are 4/7 and 3/7: top_p=0.5 keeps only the first.
    kept = torch.isfinite(apply_top_k_top_p(logits, top_k=[2], top_p=[0.5])).tolist()
    assert kept[0] == [True, False, False, False]


def test_min_p_on_a_hand_made_example():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    kept = torch.isfinite(apply_min_p(logits, torch.tensor([[0.3]]))).tolist()
    assert kept[0] == [True, True, True, False]  # threshold 0.15: 0.05 goes


# ---------------------------------------------------------------------- seeds
def generate(sampler: Sampler, logits_for, base: SamplingState, steps: int, others: int = 0, row: int = 0) -> list[int]:
    """Run `steps` decode steps of `base` at batch row `row`, surrounded by `others` unrelated rows."""
    output: list[int] = []
    for step in range(steps):
        me = SamplingState(base.params, base.prompt_token_ids, list(output), base.choice_index)
        batch = [state(temperature=0.9, seed=None if i % 2 else 1000 + i, output=[1] * step) for i in range(others)]
        batch.insert(row, me)
        logits = torch.stack([logits_for(step, i == row) for i in range(len(batch))])
        output.append(sampler(logits, batch).token_ids[row])
    return output


def flat_logits(step: int, mine: bool) -> torch.Tensor:
    if mine:
        return random_logits(1, 500, seed=step, scale=0.5)[0]
    return random_logits(1, 500, seed=10_000 + step)[0]


def test_seeded_output_does_not_depend_on_the_batch_or_the_row():
    base = state(seed=1234, temperature=1.0, top_p=0.95)
    alone = generate(Sampler(500, "cpu", seed=1), flat_logits, base, steps=12)
    crowded = generate(Sampler(500, "cpu", seed=2), flat_logits, base, steps=12, others=5, row=3)
    last_row = generate(Sampler(500, "cpu", seed=3), flat_logits, base, steps=12, others=2, row=2)
    assert alone == crowded == last_row
    other_seed = generate(Sampler(500, "cpu", seed=1), flat_logits, state(seed=4321, top_p=0.95), steps=12)
    assert other_seed != alone


def test_seeded_token_is_the_same_after_preemption_and_recompute():
    """A recomputed request asks again for the same output position: it must get the same token."""
    base = state(seed=7, temperature=1.0)
    full = generate(Sampler(500, "cpu"), flat_logits, base, steps=10)
    resumed_state = SamplingState(base.params, base.prompt_token_ids, full[:6], 0)
    fresh_sampler = Sampler(500, "cpu", seed=99)
    fresh_sampler(random_logits(3, 500), [state(), state(), state()])  # its batch generator has moved on
    assert fresh_sampler(flat_logits(6, True)[None], [resumed_state]).token_ids == [full[6]]


def test_seeded_choices_differ_but_each_is_reproducible():
    choices = [state(seed=5, choice_index=i, temperature=1.0) for i in range(4)]
    runs = [generate(Sampler(500, "cpu"), flat_logits, c, steps=8) for c in choices]
    assert len({tuple(r) for r in runs}) == 4
    again = [generate(Sampler(500, "cpu", seed=8), flat_logits, c, steps=8, others=3, row=1) for c in choices]
    assert again == runs


def test_unseeded_rows_use_the_sampler_seed():
    logits = random_logits(6, 300, scale=0.3)
    states = [state(temperature=1.0) for _ in range(6)]
    assert Sampler(300, "cpu", seed=11)(logits, states).token_ids == Sampler(300, "cpu", seed=11)(logits, states).token_ids
    draws = {tuple(Sampler(300, "cpu", seed=s)(logits, states).token_ids) for s in range(4)}
    assert len(draws) > 1


def test_row_seed_is_stable_and_distinct():
    assert row_seed(1, 0, 0) == row_seed(1, 0, 0)
    seeds = {row_seed(s, c, p) for s in (0, 1, -1, 2**70) for c in range(3) for p in range(3)}
    assert len(seeds) == 36
    assert all(0 <= s < 2**63 for s in seeds)


# ---------------------------------------------------------------------- penalties and min_tokens
LOGITS = torch.tensor([[2.0, -1.0, 0.5, 3.0, -2.0, 1.0]])


def processed(**params) -> list[float]:
    # prompt holds token 0 (and 5 twice); the output so far holds token 1 once and token 3 twice
    row = state(prompt=[0, 5, 5], output=[1, 3, 3], **params)
    return Sampler(6, "cpu").process_logits(LOGITS, [row])[0].tolist()


def test_repetition_penalty_divides_positive_and_multiplies_negative_seen_logits():
    assert processed(repetition_penalty=2.0) == pytest.approx([1.0, -2.0, 0.5, 1.5, -2.0, 0.5])


def test_frequency_penalty_scales_with_output_counts_only():
    assert processed(frequency_penalty=0.5) == pytest.approx([2.0, -1.5, 0.5, 2.0, -2.0, 1.0])


def test_presence_penalty_applies_once_per_output_token():
    assert processed(presence_penalty=0.25) == pytest.approx([2.0, -1.25, 0.5, 2.75, -2.0, 1.0])


def test_penalties_combine_repetition_first():
    expected = [1.0, -2.0 - 0.5 - 0.25, 0.5, 1.5 - 1.0 - 0.25, -2.0, 0.5]
    assert processed(repetition_penalty=2.0, frequency_penalty=0.5, presence_penalty=0.25) == pytest.approx(expected)


def test_penalties_change_the_greedy_choice_and_leave_the_caller_logits_alone():
    original = LOGITS.clone()
    row = state(prompt=[0], output=[3], temperature=0.0, presence_penalty=2.0)
    assert Sampler(6, "cpu")(LOGITS, [row]).token_ids == [0]  # 3 is penalised to 1.0, so 0 (2.0) wins
    assert torch.equal(LOGITS, original)


def test_penalties_are_per_row():
    logits = LOGITS.expand(3, 6)
    rows = [
        state(prompt=[0, 5, 5], output=[1, 3, 3], repetition_penalty=2.0),
        state(prompt=[0, 5, 5], output=[1, 3, 3]),
        state(prompt=[0, 5, 5], output=[1, 3, 3], frequency_penalty=0.5),
    ]
    out = Sampler(6, "cpu").process_logits(logits, rows).tolist()
    assert out[0] == pytest.approx([1.0, -2.0, 0.5, 1.5, -2.0, 0.5])
    assert out[1] == pytest.approx(LOGITS[0].tolist())
    assert out[2] == pytest.approx([2.0, -1.5, 0.5, 2.0, -2.0, 1.0])


@pytest.mark.parametrize("ignore_eos", [False, True])
def test_min_tokens_blocks_eos_and_stop_token_ids(ignore_eos):
    logits = torch.tensor([[0.0, 0.0, 9.0, 8.0, 1.0]]).expand(2, 5)  # eos (2) and stop token (3) are favourites
    sampler = Sampler(5, "cpu")
    for produced in range(4):
        rows = [
            state(output=[0] * produced, eos=(2,), stop_token_ids=[3], min_tokens=3, temperature=0.0, ignore_eos=ignore_eos),
            state(output=[0] * produced, eos=(2,), stop_token_ids=[3], min_tokens=3, temperature=1.0, ignore_eos=ignore_eos),
        ]
        tokens = sampler(logits, rows).token_ids
        if produced < 3:
            assert tokens[0] == 4 and tokens[1] not in (2, 3)
        else:
            assert tokens[0] == 2


# ---------------------------------------------------------------------- logprobs
def test_logprobs_are_log_softmax_of_the_raw_logits_with_ranks_and_top():
    logits = random_logits(4, 64, seed=6)
    rows = [
        state(temperature=0.0, logprobs=3),
        state(temperature=1.3, logprobs=5, presence_penalty=1.0, output=[1, 2]),
        state(temperature=0.8),
        state(temperature=1.0, logprobs=0, seed=1),
    ]
    result = Sampler(64, "cpu")(logits, rows)
    reference = torch.log_softmax(logits, -1)
    assert result.logprobs[2] is None
    for row, k in ((0, 3), (1, 5), (3, 0)):
        entry = result.logprobs[row]
        token = result.token_ids[row]
        assert entry.token_id == token
        assert entry.logprob == pytest.approx(reference[row, token].item(), abs=1e-5)
        assert entry.rank == int((reference[row] > reference[row, token]).sum()) + 1
        values, ids = reference[row].topk(k) if k else (torch.empty(0), torch.empty(0, dtype=torch.long))
        assert [t for t, _ in entry.top] == ids.tolist()
        assert [v for _, v in entry.top] == pytest.approx(values.tolist(), abs=1e-5)
    assert result.logprobs[0].rank == 1  # greedy picked the best token


def test_logprobs_in_a_greedy_only_batch():
    logits = random_logits(2, 10, seed=8)
    result = Sampler(10, "cpu")(logits, [state(temperature=0.0, logprobs=2), state(temperature=0.0)])
    assert result.logprobs[0].logprob == pytest.approx(torch.log_softmax(logits[0], -1).max().item(), abs=1e-6)
    assert len(result.logprobs[0].top) == 2 and result.logprobs[1] is None


# ---------------------------------------------------------------------- vocabulary and input checks
def test_padded_vocab_columns_are_never_sampled():
    logits = torch.zeros(64, 12)
    logits[:, 10:] = 50.0  # padding columns of an lm_head rounded up for speed
    rows = [state(temperature=0.0 if i % 2 else 1.0) for i in range(64)]
    assert max(Sampler(10, "cpu")(logits, rows).token_ids) < 10


def test_bad_logits_shape_is_rejected():
    sampler = Sampler(10, "cpu")
    with pytest.raises(ValueError, match="rows"):
        sampler(torch.zeros(2, 10), [state()])
    with pytest.raises(ValueError, match="vocab_size"):
        sampler(torch.zeros(1, 8), [state()])
    with pytest.raises(ValueError, match="2-D"):
        sampler(torch.zeros(10), [state()])


@pytest.mark.parametrize(
    "field, value",
    [
        ("temperature", -0.5),
        ("temperature", math.nan),
        ("top_p", 0.0),
        ("top_k", -3),
        ("min_p", 1.5),
        ("repetition_penalty", 0.0),
        ("presence_penalty", 3.0),
        ("frequency_penalty", -2.5),
        ("logprobs", 21),
        ("seed", "abc"),
        ("min_tokens", -1),
        ("stop_token_ids", [-1]),
    ],
)
def test_invalid_sampling_params_name_the_field(field, value):
    with pytest.raises(InvalidParameter) as error:
        SamplingParams(**{field: value})
    assert error.value.param == field
    assert field in str(error.value)


# ---------------------------------------------------------------------- GPU
@pytest.mark.gpu
@pytest.mark.parametrize("settings", [dict(top_k=50), dict(top_p=0.9, min_p=0.01), dict(frequency_penalty=0.5)])
def test_seeded_sampling_on_cuda_is_batch_independent(settings):
    base = state(seed=77, temperature=1.0, **settings)

    def cuda_logits(step, mine):
        return flat_logits(step, mine).cuda()

    alone = generate(Sampler(500, "cuda"), cuda_logits, base, steps=6)
    crowded = generate(Sampler(500, "cuda", seed=5), cuda_logits, base, steps=6, others=31, row=17)
    assert alone == crowded


@pytest.mark.gpu
def test_greedy_on_cuda_is_argmax():
    logits = random_logits(8, 500).cuda()
    assert Sampler(500, "cuda")(logits, [state(temperature=0.0)] * 8).token_ids == logits.argmax(-1).tolist()


@pytest.mark.gpu
@pytest.mark.parametrize("seeded", [False, True])
@pytest.mark.parametrize("settings", [dict(), dict(top_k=4), dict(top_p=0.8), dict(min_p=0.2)])
def test_cuda_sampling_matches_the_reference_distribution(seeded, settings):
    """The fused CUDA path draws from the same distribution as the CPU reference filters define."""
    logits = torch.tensor([1.0, 0.5, 0.0, -0.5, -1.0, 2.0, 0.2, -0.2])
    temperature, draws, vocab = 0.7, 20000, 8
    if seeded:
        states = [state(temperature=temperature, seed=3, output=[0] * i, **settings) for i in range(draws)]
    else:
        states = [state(temperature=temperature, **settings) for _ in range(draws)]
    tokens = Sampler(vocab, "cuda", seed=5)(logits.expand(draws, vocab).cuda(), states).token_ids
    counts = torch.bincount(torch.tensor(tokens), minlength=vocab).float()
    scaled = (logits / temperature).unsqueeze(0)
    if "top_k" in settings:
        scaled = apply_top_k(scaled, [settings["top_k"]])
    if "top_p" in settings:
        scaled = apply_top_k_top_p(scaled, [vocab], [settings["top_p"]])
    if "min_p" in settings:
        scaled = apply_min_p(scaled, torch.tensor([[settings["min_p"]]]))
    expected = torch.softmax(scaled[0], -1)
    kept = expected > 0
    assert counts[~kept].sum() == 0  # filtered tokens are never drawn
    # at most 7 degrees of freedom: the 99.99th percentile is ~29.9
    assert chi_square(counts[kept], expected[kept]) < 32


@pytest.mark.gpu
def test_cuda_mixed_batch_keeps_greedy_rows_exact():
    logits = random_logits(64, 3000).cuda()
    states = [state(temperature=0.0) if i % 2 else state(temperature=0.8, seed=i) for i in range(64)]
    tokens = Sampler(3000, "cuda")(logits, states).token_ids
    assert tokens[1::2] == logits[1::2].argmax(-1).tolist()
