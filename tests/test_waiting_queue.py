"""The waiting queue of each scheduling policy: the order in which waiting sequences are offered for admission."""

from __future__ import annotations

import pytest

from test_scheduler import Clock, fake_next_token, make_scheduler, make_seq, run_to_completion
from worker.config import POLICIES as CONFIG_POLICIES
from worker.engine.waiting_queue import (
    POLICIES,
    LongestPrefixQueue,
    PriorityQueue,
    WaitingQueue,
    make_waiting_queue,
)


def ids(seqs) -> list[str]:
    return [s.request_id for s in seqs]


def test_every_configurable_policy_has_a_queue_and_unknown_names_are_refused():
    assert set(POLICIES) == set(CONFIG_POLICIES)
    with pytest.raises(ValueError, match="unknown scheduling policy 'sjf'.*fcfs, priority, lpm"):
        make_waiting_queue("sjf", 5.0, Clock(), lambda s: 0)


def test_fcfs_offers_arrival_order_whatever_the_order_of_insertion():
    a, b, c = make_seq("a", [1]), make_seq("b", [2]), make_seq("c", [3])
    queue = WaitingQueue()
    for seq in (c, a, b):  # c re-queued after a preemption, for example
        queue.append(seq)
    assert ids(queue.in_policy_order()) == ["a", "b", "c"]
    queue.remove(a)
    assert ids(queue.in_policy_order()) == ["b", "c"] and len(queue) == 2 and a not in queue


def test_priority_offers_lower_values_first_and_ages_waiting_requests():
    clock = Clock()
    queue = PriorityQueue(aging_s=5.0, clock=clock)
    old_low = make_seq("old_low", [1], priority=2, arrival=0.0)
    high = make_seq("high", [2], priority=0, arrival=0.0)
    tie = make_seq("tie", [3], priority=0, arrival=0.0)
    for seq in (old_low, tie, high):
        queue.append(seq)
    assert ids(queue.in_policy_order()) == ["high", "tie", "old_low"]  # equal priority: arrival order
    # Ten seconds later, new urgent work arrives; old_low waited 2 levels' worth and ties with it...
    clock.now = 10.0
    fresh = make_seq("fresh", [4], priority=0, arrival=10.0)
    queue.append(fresh)
    assert ids(queue.in_policy_order()) == ["high", "tie", "old_low", "fresh"]
    # ...and anything that waited long enough overtakes a fresh urgent request.
    clock.now = 11.0
    late = make_seq("late", [5], priority=0, arrival=11.0)
    queue.append(late)
    assert ids(queue.in_policy_order())[-1] == "late"


def test_lpm_offers_the_longest_cached_prefix_first_within_its_window():
    cached = {"a": 0, "b": 8, "c": 8, "d": 4, "e": 16}
    queue = LongestPrefixQueue(lambda s: cached[s.request_id], window=4)
    for rid in "abcde":
        queue.append(make_seq(rid, [1]))
    # The window holds the 4 oldest (a..d); e arrived last and waits outside it despite its long match.
    assert ids(queue.in_policy_order()) == ["b", "c", "d", "a", "e"]


def test_lpm_scheduler_admits_the_cached_prompt_first_and_leaves_the_cache_untouched_while_sorting():
    sched = make_scheduler(max_running=1, policy="lpm", page_size=4)
    shared = list(range(10, 30))
    run_to_completion(sched, [make_seq("warm", shared, max_tokens=1)])
    cold = make_seq("cold", list(range(50, 70)), max_tokens=1, arrival=1.0)
    hot = make_seq("hot", shared[:12] + [5] * 9, max_tokens=1, arrival=2.0)  # its match ends mid-node
    sched.add(cold)
    sched.add(hot)
    nodes, queries = sched.kv.cache.num_nodes, sched.kv.cache.query_tokens
    assert ids(sched.waiting.in_policy_order()) == ["hot", "cold"]
    assert (sched.kv.cache.num_nodes, sched.kv.cache.query_tokens) == (nodes, queries)
    finished = run_to_completion(sched, [])
    assert ids(finished) == ["hot", "cold"]
    assert hot.num_cached_tokens == 12
    assert hot.output_token_ids == [fake_next_token(hot.prompt_token_ids)]
