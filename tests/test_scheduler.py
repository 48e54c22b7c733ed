"""Scheduler behaviour on the real radix cache, with a fake model: the "sampled" token is a pure function
of the sequence's tokens so far, so any schedule (chunking, preemption, cache hits) must give the same
outputs as the simplest one."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from worker.cache.page_pool import PagePool
from worker.cache.radix_cache import RadixCache
from worker.engine.protocol import FinishReason
from worker.engine.scheduler import Scheduler, SchedulerConfig
from worker.engine.sequence import Sequence, SeqStatus
from worker.sampling_params import SamplingParams

EOS = 3


def fake_next_token(tokens: list[int]) -> int:
    """Deterministic 'model': never EOS, depends on the whole history."""
    h = 0
    for t in tokens[-16:]:
        h = (h * 31 + t) % 1_000_003
    return 10 + (h + len(tokens)) % 90


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def make_scheduler(num_pages=256, page_size=4, budget=64, max_running=16, policy="fcfs", ratio=(0.7, 0.1),
                   cache=True, clock=None):
    cache_obj = RadixCache(PagePool(num_pages, page_size), enabled=cache)
    config = SchedulerConfig(
        max_num_batched_tokens=budget, max_running_requests=max_running, max_model_len=4096, policy=policy,
        new_token_ratio_init=ratio[0], new_token_ratio_min=ratio[1], priority_aging_s=5.0,
    )
    return Scheduler(config, cache_obj, clock=clock or Clock())


def make_seq(rid, prompt, max_tokens=8, priority=0, arrival=0.0, n=1):
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, priority=priority, n=n)
    seq = Sequence(request_id=rid, index=0, prompt_token_ids=list(prompt), params=params, arrival_time=arrival)
    seq.held_choices = [
        Sequence(request_id=rid, index=i, prompt_token_ids=list(prompt), params=params, arrival_time=arrival)
        for i in range(1, n)
    ]
    return seq


def step(sched: Scheduler, on_batch=None):
    batch = sched.schedule()
    if on_batch:
        on_batch(batch)
    sampled = {row: fake_next_token(batch.seqs[row].token_ids()) for row in range(len(batch)) if batch.samples(row)}
    # the synchronous engine's order: launch the step, collect cut-offs, resolve its sampled tokens
    rows = sorted(sampled)
    launched = sched.launch(batch, rows)
    cut_off = sched.take_cut_off()
    advanced_rows, resolved = sched.resolve(launched, [sampled[r] for r in rows], frozenset({EOS}))
    advanced, finished = [launched[j] for j in advanced_rows], cut_off + resolved
    sched.check_invariants()
    return batch, advanced, finished


def run_to_completion(sched: Scheduler, seqs, on_batch=None, max_steps=5000):
    for s in seqs:
        sched.add(s)
    finished_all = []
    for _ in range(max_steps):
        if not sched.has_work():
            break
        _, _, finished = step(sched, on_batch)
        finished_all.extend(finished)
    else:
        pytest.fail("scheduler did not finish the workload")
    return finished_all


def outputs_of(finished):
    return {(s.request_id, s.index): (list(s.output_token_ids), s.finish_reason) for s in finished}


def random_workload(rng: random.Random, count: int, max_prompt=120, shared_prefix_len=0):
    shared = [rng.randrange(10, 100) for _ in range(shared_prefix_len)]
    seqs = []
    for i in range(count):
        prompt = shared + [rng.randrange(10, 100) for _ in range(rng.randrange(1, max_prompt))]
        seqs.append(make_seq(f"r{i}", prompt, max_tokens=rng.randrange(1, 24), arrival=float(i)))
    return seqs


def clone(seqs):
    return [make_seq(s.request_id, s.prompt_token_ids, s.params.max_tokens, s.params.priority, s.arrival_time,
                     s.params.n) for s in seqs]


# ---------------------------------------------------------------------------------------------- budget
@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), budget=st.sampled_from([16, 37, 64]), page_size=st.sampled_from([1, 4, 16]))
def test_token_budget_and_running_cap_never_exceeded(seed, budget, page_size):
    rng = random.Random(seed)
    sched = make_scheduler(num_pages=4096 // page_size, page_size=page_size, budget=budget, max_running=5)

    def check(batch):
        assert batch.num_tokens <= budget
        assert len(sched.running) <= 5
        assert all(n == 1 for n in batch.num_new_tokens[: batch.num_decodes])

    finished = run_to_completion(sched, random_workload(rng, 12, shared_prefix_len=rng.choice([0, 20])), check)
    assert len(finished) == 12
    assert sched.kv_tokens_in_use() == 0


def test_long_prompt_is_chunked_and_never_blocks_running_decodes():
    sched = make_scheduler(num_pages=2048, page_size=4, budget=32)
    short = make_seq("short", [11, 12, 13], max_tokens=40)
    sched.add(short)
    step(sched)  # prefill of the short prompt
    long = make_seq("long", list(range(10, 10 + 300)), max_tokens=2, arrival=1.0)
    sched.add(long)
    chunks = []
    while long.status is not SeqStatus.FINISHED:
        batch, _, _ = step(sched)
        if short.status is SeqStatus.RUNNING or short in batch.seqs:
            assert short in batch.seqs[: batch.num_decodes], "a running decode was left out of a step"
        if long in batch.seqs:
            chunks.append(batch.num_new_tokens[batch.seqs.index(long)])
    assert max(chunks) <= 31  # one token of every step's budget went to the decode
    assert sum(chunks[: len(chunks) - 1]) >= 300  # the prompt really was spread over several steps
    assert len(chunks) >= 300 // 32


def test_chunked_prefill_progress_is_shared_through_the_cache():
    sched = make_scheduler(num_pages=1024, page_size=4, budget=32)
    prompt = list(range(10, 10 + 100))
    first = make_seq("a", prompt, max_tokens=1)
    run_to_completion(sched, [first])
    second = make_seq("b", prompt + [42], max_tokens=1)
    run_to_completion(sched, [second])
    assert second.num_cached_tokens == 100  # 100 is page aligned; all of the first prompt was reused


# ---------------------------------------------------------------------------------------------- preemption
@pytest.mark.parametrize("page_size", [1, 4])
def test_preempted_requests_finish_with_the_same_output(page_size):
    rng = random.Random(7)
    seqs = random_workload(rng, 16, max_prompt=40, shared_prefix_len=8)
    reference = outputs_of(run_to_completion(make_scheduler(num_pages=4096, page_size=page_size), clone(seqs)))
    # A pool barely larger than one sequence, and no decode reserve: preemption is forced.
    tight = make_scheduler(num_pages=96 // page_size, page_size=page_size, ratio=(0.0, 0.0))
    got = outputs_of(run_to_completion(tight, clone(seqs)))
    assert tight.num_preemptions > 0
    assert got == reference
    assert tight.kv_tokens_in_use() == 0


def test_preemption_victim_is_lowest_priority_then_latest():
    sched = make_scheduler(num_pages=12, page_size=4, budget=64, ratio=(0.0, 0.0), policy="priority")
    a = make_seq("a", [10] * 8, max_tokens=30, priority=0, arrival=0)
    b = make_seq("b", [11] * 8, max_tokens=30, priority=5, arrival=1)
    c = make_seq("c", [12] * 8, max_tokens=30, priority=0, arrival=2)
    for s in (a, b, c):
        sched.add(s)
    preempted = []
    for _ in range(200):
        before = {s.request_id for s in sched.running}
        step(sched)
        after = {s.request_id for s in sched.running}
        preempted += sorted(before - after - {s.request_id for s in (a, b, c) if s.status is SeqStatus.FINISHED})
        if preempted:
            break
    assert preempted and preempted[0] == "b"


def test_sequence_larger_than_the_whole_pool_ends_with_length():
    sched = make_scheduler(num_pages=8, page_size=4, ratio=(0.0, 0.0))
    seq = make_seq("big", [10] * 20, max_tokens=100)
    finished = run_to_completion(sched, [seq])
    assert finished[0].finish_reason == FinishReason.LENGTH
    assert len(seq.output_token_ids) == 8 * 4 - 20 + 1
    assert sched.kv_tokens_in_use() == 0


# ---------------------------------------------------------------------------------------------- policies
def test_priority_policy_runs_urgent_requests_first():
    sched = make_scheduler(max_running=1, policy="priority")
    low = make_seq("low", [10, 11], max_tokens=3, priority=10, arrival=0.0)
    high = make_seq("high", [12, 13], max_tokens=3, priority=0, arrival=0.0)
    finished = run_to_completion(sched, [low, high])
    assert [s.request_id for s in finished] == ["high", "low"]


def test_priority_aging_prevents_starvation():
    clock = Clock()
    sched = make_scheduler(max_running=1, policy="priority", clock=clock)
    low = make_seq("low", [10, 11], max_tokens=2, priority=3, arrival=0.0)
    sched.add(low)
    finished_order = []
    for i in range(200):  # a steady stream of urgent work arriving faster than it is served
        clock.now = float(i)
        sched.add(make_seq(f"hi{i}", [12, 13, i % 50 + 10], max_tokens=2, priority=0, arrival=clock.now))
        _, _, finished = step(sched)
        finished_order += [s.request_id for s in finished]
        if "low" in finished_order:
            break
    assert "low" in finished_order, "the low-priority request starved"
    # it waited for its priority gap (3 levels x 5 s aging) but not much longer
    assert 10 <= finished_order.index("low") <= 40


def test_lpm_schedules_the_longest_cached_prefix_first():
    sched = make_scheduler(max_running=1, policy="lpm")
    shared = list(range(10, 74))
    run_to_completion(sched, [make_seq("warm", shared + [5], max_tokens=1)])
    cold = make_seq("cold", list(range(80, 150)), max_tokens=1, arrival=1.0)
    warm = make_seq("hit", shared + [6, 7], max_tokens=1, arrival=2.0)
    finished = run_to_completion(sched, [cold, warm])
    assert [s.request_id for s in finished] == ["hit", "cold"]
    assert warm.num_cached_tokens == 64


# ---------------------------------------------------------------------------------------------- abort, n > 1
def test_abort_at_any_moment_frees_kv():
    rng = random.Random(3)
    for abort_after in range(0, 12):
        sched = make_scheduler(num_pages=512, page_size=4, budget=16)
        seqs = random_workload(rng, 6, max_prompt=60)
        for s in seqs:
            sched.add(s)
        for _ in range(abort_after):
            step(sched)
        already_done = {s.request_id for s in seqs if s.status is SeqStatus.FINISHED}
        for s in seqs[::2]:
            sched.abort(s.request_id)
            sched.check_invariants()
        while sched.has_work():
            step(sched)
        assert sched.kv_tokens_in_use() == 0
        for s in seqs[::2]:
            if s.request_id not in already_done:
                assert s.finish_reason == FinishReason.ABORT
        for s in seqs[1::2]:
            assert s.finish_reason == FinishReason.LENGTH  # the others ran to max_tokens


def test_n_choices_share_the_prompt_kv():
    sched = make_scheduler(num_pages=512, page_size=4)
    prompt = list(range(10, 10 + 41))
    seq = make_seq("multi", prompt, max_tokens=4, n=3)
    held = list(seq.held_choices)
    finished = run_to_completion(sched, [seq])
    assert len(finished) == 3
    # the later choices found the prompt (page-aligned part, excluding the last token) in the cache
    assert all(h.num_cached_tokens == 40 for h in held)
    # with a pure-function "model", all three choices agree
    assert len({tuple(s.output_token_ids) for s in finished}) == 1


# ---------------------------------------------------------------------------------------------- decode reserve
def test_decode_reserve_decays_while_stable_and_jumps_back_after_a_preemption():
    from worker.engine.decode_reserve import CLIP_TOKENS, DecodeReserve

    reserve = DecodeReserve(init=0.5, minimum=0.1, decay=0.2, max_model_len=100_000, pages_for=lambda n: -(-n // 4))
    seqs = [make_seq("a", [1] * 10, max_tokens=40), make_seq("b", [1] * 10, max_tokens=None)]
    assert reserve.pages(seqs) == -(-int((40 + CLIP_TOKENS) * 0.5) // 4)  # b's unbounded budget is clipped
    for _ in range(5):
        reserve.after_decode_only_step()
    assert reserve.ratio == 0.1  # never below the minimum
    reserve.after_preemption()
    assert reserve.ratio == pytest.approx(0.6)  # back above the initial ratio
