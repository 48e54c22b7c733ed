"""Load signals and measured token bounds of a worker (router.worker_pool), tested as pure objects."""

import pytest

from router.usage import prompt_tokens_in
from router.worker_pool import CharsPerToken, LoadReport, WorkerPool


def worker(kv_tokens: int = 100_000):
    return WorkerPool(default_kv_tokens=kv_tokens).add("http://10.0.0.1:8000")


def test_a_streamed_prompt_stops_counting_as_pending_prefill_at_its_first_chunk():
    w = worker()
    pending = w.on_dispatch(500, streamed=True)
    assert (w.outstanding_tokens, w.prefilling, w.decoding) == (500, 1, 0)
    w.on_first_byte(pending)
    assert (w.outstanding_tokens, w.prefilling, w.decoding) == (0, 0, 1), "now it decodes"
    w.on_finish(pending)
    assert (w.outstanding_tokens, w.in_flight, w.decoding) == (0, 0, 0)


def test_a_non_streamed_prompt_is_released_by_the_next_load_report_not_by_its_whole_answer():
    w = worker()
    first = w.on_dispatch(300, streamed=False)
    second = w.on_dispatch(200, streamed=False)
    w.report = LoadReport(running=1, waiting=1)  # one of ours still queued: the newest
    assert w.outstanding_tokens == 200 and not second.done and first.done
    assert w.decoding == 1
    w.report = LoadReport(running=2, waiting=0)  # nothing queued: both admitted
    assert (w.outstanding_tokens, w.prefilling, w.decoding) == (0, 0, 2)
    w.on_finish(first)
    w.on_finish(second)
    assert (w.in_flight, w.outstanding_tokens) == (0, 0)


def test_a_finished_request_releases_what_no_report_released_and_only_once():
    w = worker()
    a = w.on_dispatch(100, streamed=False)
    b = w.on_dispatch(50, streamed=False)
    w.on_finish(a)  # e.g. it failed before any /load poll
    assert w.outstanding_tokens == 50
    w.on_first_byte(b)  # the answer came in whole
    w.on_finish(b)
    w.report = LoadReport(waiting=0)
    assert (w.outstanding_tokens, w.prefilling, w.in_flight) == (0, 0, 0)


def test_streamed_and_non_streamed_requests_count_alike_once_prefilled():
    streamed, whole = worker(), worker()
    p = streamed.on_dispatch(400, streamed=True)
    whole.on_dispatch(400, streamed=False)
    streamed.on_first_byte(p)
    whole.report = LoadReport(running=1, waiting=0)
    assert (streamed.outstanding_tokens, streamed.decoding) == (whole.outstanding_tokens, whole.decoding) == (0, 1)


def test_prompt_tokens_are_read_from_an_answer_or_a_usage_event():
    body = b'{"id":"x","choices":[],"usage":{"prompt_tokens":1234,"completion_tokens":16}}'
    assert prompt_tokens_in(body) == 1234
    event = b'data: {"choices":[],"usage":{"prompt_tokens": 77,"total_tokens":93}}\n\ndata: [DONE]\n\n'
    assert prompt_tokens_in(event) == 77
    assert prompt_tokens_in(b'data: {"choices":[{"delta":{"content":"hi"}}]}\n\n') is None
    assert prompt_tokens_in(b'{"usage":{"prompt_tokens":null}}') is None


def test_chars_per_token_is_learned_from_usage_and_bounds_the_tree_in_real_tokens():
    w = worker(kv_tokens=10_000)
    assert w.chars_per_token.value == 4.0 and not w.chars_per_token.measured
    for _ in range(20):
        w.on_prompt_tokens(5300, 1000)  # the demo tokenizer: ~5.3 characters per token
    assert w.chars_per_token.measured
    assert w.chars_per_token.value == pytest.approx(5.3)
    assert w.tree.max_chunks == int(10_000 / (128 / 5.3)), "the tree holds what 10k real tokens hold"
    assert w.uncached_tokens(5300, 0) == 1000


def test_chars_per_token_follows_a_change_and_ignores_empty_observations():
    cpt = CharsPerToken(4.0)
    for _ in range(10):
        cpt.observe(4000, 1000)
    cpt.observe(0, 10)
    cpt.observe(100, 0)
    assert cpt.value == pytest.approx(4.0)
    for _ in range(500):
        cpt.observe(3000, 1000)
    assert cpt.value == pytest.approx(3.0, rel=0.02)


def test_without_usage_the_load_counters_teach_chars_per_token():
    w = worker()
    w.report = LoadReport(cache_query_tokens=1000)
    for _ in range(4):
        w.on_dispatch(0, text_chars=1500)
    w.report = LoadReport(cache_query_tokens=3000)  # 6000 characters were 2000 prompt tokens
    assert w.chars_per_token.value == pytest.approx(3.0)


def test_a_restart_seen_in_load_counters_empties_the_tree_and_restarts_warm_up():
    w = worker()
    w.report = LoadReport(cache_query_tokens=50_000)
    w.tree.insert([1, 2, 3])
    w.joined_at = -1
    w.report = LoadReport(cache_query_tokens=10)  # went backwards: a fresh process
    assert len(w.tree) == 0 and w.restarts == 1 and w.joined_at is None


def test_new_workers_start_from_the_fleet_measurement():
    pool = WorkerPool()
    a = pool.add("http://10.0.0.1:8000")
    for _ in range(5):
        a.on_prompt_tokens(5000, 1000)
    b = pool.add("http://10.0.0.2:8000")
    assert b.chars_per_token.value == pytest.approx(5.0) and b.tree.chars_per_token == pytest.approx(5.0)


def test_admin_view_shows_tree_size_cached_tokens_and_load_signals():
    w = worker(kv_tokens=1000)
    w.tree.insert(list(range(100)))  # 100 chunks of 32 tokens: more than 1000 tokens, so it is bounded
    w.on_dispatch(40, streamed=True)
    view = w.describe(0.0)
    assert view["tree_nodes"] == len(w.tree) and view["tree_tokens"] <= 1000
    assert view["estimated_cached_tokens"] == w.tree.size_tokens
    assert (view["outstanding_tokens"], view["prefilling"], view["decoding"]) == (40, 1, 0)
    assert view["chars_per_token"] == 4.0 and view["chars_per_token_measured"] is False
