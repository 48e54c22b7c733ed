"""The Locust workloads' request generators: the same sessions for the same seed, and the shape each
workload promises (shared prefixes, Zipf skew, replies appended turn by turn)."""

from __future__ import annotations

from collections import Counter

import pytest

from bench.locust.workloads import (WORKLOADS, DocQA, GeneratedSharedPrefix, HotSystemPrompt, MultiTurnChat,
                                    TraceReplay, UnknownWorkload, make_workload, run_session)

TRACE = "bench/traces/synthetic_chat.jsonl"


def small(name: str, seed: int):
    return make_workload(name, seed, 16, path=TRACE, documents=12, doc_chars=300, system_prompts=3,
                         system_chars=200, groups=4, prompts_per_group=5, prefix_chars=300)


@pytest.mark.parametrize("name", sorted(WORKLOADS))
def test_same_seed_same_sessions_in_any_order(name):
    a, b = small(name, 7), small(name, 7)
    forward = [a.session(i) for i in range(30)]
    backward = [b.session(i) for i in reversed(range(30))][::-1]
    assert forward == backward


@pytest.mark.parametrize("name", sorted(set(WORKLOADS) - {"trace"}))
def test_another_seed_changes_the_sessions(name):
    assert [small(name, 1).session(i) for i in range(10)] != [small(name, 2).session(i) for i in range(10)]


def test_unknown_workload_names_the_choices():
    with pytest.raises(UnknownWorkload, match="unknown workload 'nope'.*docqa"):
        make_workload("nope", 0, 16)


def test_chat_sessions_share_few_system_prompts_and_append_the_real_reply():
    workload = MultiTurnChat(seed=0, max_tokens=8, system_prompts=3, system_chars=300, turns=3)
    systems = {workload.session(i).system for i in range(40)}
    assert len(systems) == 3

    session = workload.session(5)
    sent = []

    def send(messages):
        sent.append(messages)
        return f"reply {len(sent)}"

    assert run_session(session, send) == 3
    assert sent[0] == [{"role": "system", "content": session.system},
                       {"role": "user", "content": session.user_turns[0]}]
    assert sent[1] == sent[0] + [{"role": "assistant", "content": "reply 1"},
                                 {"role": "user", "content": session.user_turns[1]}]
    assert sent[2] == sent[1] + [{"role": "assistant", "content": "reply 2"},
                                 {"role": "user", "content": session.user_turns[2]}]


def test_a_failed_turn_ends_the_session():
    session = MultiTurnChat(seed=0, max_tokens=8, turns=4).session(0)
    calls = []
    assert run_session(session, lambda m: calls.append(m)) == 1  # send returned None: no second turn
    assert len(calls) == 1


def test_docqa_popularity_is_zipf_skewed_and_each_request_carries_its_whole_document():
    workload = DocQA(seed=0, max_tokens=8, documents=20, doc_chars=400, zipf=1.0)
    sessions = [workload.session(i) for i in range(4000)]
    counts = Counter(s.tags["document"] for s in sessions)
    assert set(counts) <= set(range(20))
    # Zipf 1.0: rank 0 is drawn ~20x as often as rank 19, rank 1 about half as often as rank 0.
    assert counts[0] > 10 * counts[19]
    assert 0.35 < counts[1] / counts[0] < 0.65
    for s in sessions[:50]:
        assert workload.documents[s.tags["document"]] in s.system
    assert len({s.user_turns[0] for s in sessions}) == len(sessions)  # every question distinct


def test_docqa_uniform_when_the_exponent_is_zero():
    workload = DocQA(seed=3, max_tokens=8, documents=4, doc_chars=100, zipf=0.0)
    counts = Counter(workload.session(i).tags["document"] for i in range(4000))
    assert min(counts.values()) > 800


def test_hot_system_prompt_is_one_prefix_for_every_request():
    workload = HotSystemPrompt(seed=0, max_tokens=8, system_chars=500)
    sessions = [workload.session(i) for i in range(20)]
    assert {s.system for s in sessions} == {workload.system}
    assert len({s.user_turns[0] for s in sessions}) == 20


def test_generated_shared_prefix_visits_every_group_prompt_once_per_pass():
    workload = GeneratedSharedPrefix(seed=0, max_tokens=8, groups=4, prompts_per_group=5, prefix_chars=400)
    sessions = [workload.session(i) for i in range(20)]
    assert sorted((s.tags["group"], s.tags["prompt"]) for s in sessions) == [(g, p) for g in range(4)
                                                                             for p in range(5)]
    for s in sessions:
        assert s.system == workload.prefixes[s.tags["group"]]
    assert len({s.user_turns[0] for s in sessions}) == 20
    again, first = workload.session(20), workload.session(0)  # the next pass repeats the prompts
    assert (again.system, again.user_turns) == (first.system, first.user_turns)


def test_trace_replay_sends_the_recorded_requests_and_loops_with_shifted_arrivals():
    workload = TraceReplay(seed=0, max_tokens=8, path=TRACE)
    n = len(workload.records)
    first, looped = workload.session(0), workload.session(n)
    record = workload.records[0]
    assert first.messages == record.messages and first.max_tokens == record.output_tokens
    assert looped.messages == first.messages
    assert looped.arrival_s == pytest.approx(first.arrival_s + workload.span_s)
    sent = []
    assert run_session(first, lambda m: sent.append(m) or "ignored") == 1
    assert sent == [record.messages]  # a trace's history is sent as recorded, nothing appended
    prompts = [workload.session(i) for i in range(n) if workload.session(i).prompt is not None]
    assert prompts and all(p.messages is None for p in prompts)
