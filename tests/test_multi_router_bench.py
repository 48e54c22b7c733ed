"""bench multi-router: how requests are spread over replicas, the workloads, and one bounded run end to end."""

import argparse
import json

import pytest
from sim_helpers import write_profile

from bench import multi_router_bench as bench


def test_request_spread_cycles_over_replicas_per_request():
    picker = bench.ReplicaPicker("request", 3)
    messages = [{"role": "user", "content": "same text"}]
    assert [picker.pick(messages, picker.start_stream()) for _ in range(6)] == [0, 1, 2, 0, 1, 2]


def test_connection_spread_keeps_a_stream_on_the_replica_it_started_on():
    picker = bench.ReplicaPicker("connection", 2)
    first, second = picker.start_stream(), picker.start_stream()
    assert {first, second} == {0, 1}
    for turn in range(4):
        messages = [{"role": "user", "content": f"turn {turn}"}]
        assert picker.pick(messages, first) == first
        assert picker.pick(messages, second) == second


def test_prefix_hash_sends_a_shared_opening_to_one_replica_and_spreads_different_ones():
    picker = bench.ReplicaPicker("prefix-hash", 4, hash_chars=64)
    doc = "Document 3. " + "the mill and the river " * 10
    replicas = {picker.pick([{"role": "system", "content": doc}, {"role": "user", "content": q}], None)
                for q in ("where?", "when did it open?", "who owns it?" * 20)}
    assert len(replicas) == 1  # what follows the first 64 characters does not move the request
    openings = {picker.pick([{"role": "system", "content": f"Document {d}. " + "x" * 80}], None) for d in range(40)}
    assert openings == {0, 1, 2, 3}


def test_unknown_spread_is_refused_with_the_choices():
    with pytest.raises(ValueError, match="prefix-hash"):
        bench.ReplicaPicker("sticky", 2)


def test_chat_streams_name_their_conversation_and_share_system_prompts():
    streams = bench.chat_streams(conversations=6, turns=3, system_prompts=2, system_chars=200, user_chars=40, seed=1)
    assert len({s.session_id for s in streams}) == 6
    assert len({s.system for s in streams}) == 2
    assert all(len(s.user_turns) == 3 for s in streams)


def test_doc_qa_streams_are_one_shot_questions_about_the_given_documents():
    streams = bench.doc_qa_streams(docs=3, doc_chars=300, questions=20, question_chars=40, seed=1)
    assert len(streams) == 20 and all(len(s.user_turns) == 1 and s.session_id is None for s in streams)
    assert 1 < len({s.system for s in streams}) <= 3


def test_percentile_is_nearest_rank():
    values = [float(v) for v in range(1, 101)]
    assert bench.percentile(values, 50) == 50.0
    assert bench.percentile(values, 99) == 99.0
    assert bench.percentile([], 50) is None


def parse(argv):
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    return parser.parse_args(argv)


def test_bad_options_are_refused_with_a_message(tmp_path, capsys):
    profile = write_profile(tmp_path)
    assert bench.run(parse(["--sim-profile", str(profile), "--spread", "sticky"])) == 2
    assert "choose from request, connection, prefix-hash" in capsys.readouterr().err
    assert bench.run(parse(["--sim-profile", str(tmp_path / "missing.json")])) == 2
    assert "bench calibrate" in capsys.readouterr().err


def test_one_and_two_replicas_in_front_of_two_sim_workers(tmp_path, monkeypatch):
    monkeypatch.setenv("RADIXFLEET_HOME", str(tmp_path / "home"))
    profile = write_profile(tmp_path, const_s=0.001, per_token_s=1e-6)
    out = tmp_path / "report" / "multi_router"
    code = bench.run(parse([
        "--sim-profile", str(profile), "--workers", "2", "--replicas", "1,2", "--spread", "request",
        "--workloads", "chat", "--conversations", "3", "--turns", "2", "--system-prompts", "1",
        "--system-chars", "600", "--user-chars", "40", "--max-tokens", "3", "--concurrency", "2",
        "--max-requests", "6", "--max-seconds", "60", "--out", str(out)]))
    assert code == 0
    report = json.loads(out.with_suffix(".json").read_text())
    rows = report["rows"]
    assert [(r["replicas"], r["spread"]) for r in rows] == [(1, "request"), (2, "request")]
    for row in rows:
        assert row["errors"] == 0 and row["requests"] == 6
        assert 0.0 <= row["hit_rate"] <= 1.0
        assert row["cache_query_tokens"] > 0
        assert len(row["per_worker_requests"]) == 2 and sum(row["per_worker_requests"]) == 6
        assert sum(row["per_replica_requests"]) == 6
        assert row["ttft_p50_s"] is not None and row["ttft_p50_s"] <= row["ttft_p99_s"]
    assert rows[1]["per_replica_requests"] == [3, 3]  # round-robin per request over two replicas
    # second turns share the first turn's prefix: some of it is found in a worker's cache
    assert rows[0]["hit_rate"] > 0
