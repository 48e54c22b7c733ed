"""`radixfleet bench fleet`: a short real run on stand-in workers, the streamed-request timing, and the
clear one-line messages for bad input."""

from __future__ import annotations

import argparse
import asyncio
import json
import threading

import pytest
import requests

from bench import fleet_bench
from bench.locust.streaming import request_body, stream_request
from bench.locust.workloads import MultiTurnChat
from tests.standin_worker import StandinWorker


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    fleet_bench.add_arguments(parser)
    return parser.parse_args(list(argv))


@pytest.fixture
def standin():
    """One stand-in worker on its own event loop thread, streaming one event per word."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    worker = asyncio.run_coroutine_threadsafe(StandinWorker("w0", chunk_delay_s=0.005).start(), loop).result(10)
    yield worker
    asyncio.run_coroutine_threadsafe(worker.stop(), loop).result(10)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(5)


def test_a_streamed_request_reports_ttft_one_gap_per_later_event_and_the_text(standin):
    session = MultiTurnChat(seed=0, max_tokens=3, system_prompts=1, system_chars=100).session(0)
    path, body = request_body(session, "standin-model", [{"role": "user", "content": "hi"}])
    with requests.Session() as http:
        result = stream_request(http, standin.url, path, body)
    assert result.ok and result.error is None
    assert result.text == "Hello from w0"  # the stand-in's words, max_tokens 3
    assert result.completion_tokens == 3 and result.prompt_tokens > 0
    assert result.ttft_s is not None and len(result.itl_s) == 2
    assert result.ttft_s <= result.e2e_s


def test_an_http_error_is_a_failed_result_with_the_workers_message(standin):
    body = {"model": "m", "messages": "not a list", "stream": True}
    with requests.Session() as http:
        result = stream_request(http, standin.url, "/v1/chat/completions", body)
    assert not result.ok and result.error == "HTTP 400: messages must be a list"


def test_a_load_of_so_many_requests_per_document_stops_there_and_reports_the_steady_state(tmp_path):
    out = tmp_path / "fleet"
    args = parse("--executor", "standin", "--workers", "2", "--routers", "cache_aware", "--workload", "docqa",
                 "--documents", "3", "--doc-chars", "400", "--users", "3", "--duration", "120", "--max-tokens", "4",
                 "--requests-per-document", "5", "--warmup-requests-per-document", "2", "--out", str(out))
    assert fleet_bench.run(args) == 0
    row = json.loads((out / "fleet.json").read_text())["rows"][0]
    assert row["requests_goal_reached"] is True  # stopped by the count, long before the 120 s cap
    assert row["requests"] >= 15 and row["requests_per_document"] == row["requests"] / 3
    # the stand-ins answer in microseconds, so the warm-up snapshot and the stop may come in the same check
    # (then nothing was queried after it: None); otherwise the steady-state figure is a rate
    assert "hit_rate_after_warmup" in row
    assert row["hit_rate_after_warmup"] is None or 0 <= row["hit_rate_after_warmup"] <= 1
    assert 0 < row["hit_rate"] < 1


@pytest.mark.parametrize("extra, message", [
    (["--requests-per-document", "5"], "--workload docqa with --documents"),
    (["--workload", "docqa", "--documents", "3", "--requests-per-document", "0"], "must be positive"),
    (["--workload", "docqa", "--documents", "3", "--requests-per-document", "4",
      "--warmup-requests-per-document", "4"], "below --requests-per-document"),
])
def test_requests_per_document_needs_a_docqa_load(extra, message, capsys):
    args = parse("--executor", "standin", "--workload", "chat", *extra) if "--workload" not in extra else \
        parse("--executor", "standin", *extra)
    assert fleet_bench.run(args) == 2
    assert message in capsys.readouterr().err


def test_fleet_run_on_two_standin_workers_and_two_routers_writes_the_rows(tmp_path, capsys):
    out = tmp_path / "fleet"
    args = parse("--executor", "standin", "--workers", "2", "--routers", "cache_aware,round_robin",
                 "--workload", "chat", "--users", "3", "--duration", "6", "--max-tokens", "4",
                 "--system-chars", "400", "--progress-s", "1", "--out", str(out))
    assert fleet_bench.run(args) == 0
    report = json.loads((out / "fleet.json").read_text())
    rows = report["rows"]
    assert [r["router"] for r in rows] == ["cache_aware", "round_robin"]
    for row in rows:
        for key in ("router", "req_s", "ttft_p50_s", "ttft_p99_s", "itl_p50_s", "hit_rate",
                    "busiest_over_mean", "failed", "output_tok_s", "per_worker_requests",
                    "per_worker_prompt_tokens"):
            assert key in row, key
        assert row["failed"] == 0 and row["requests"] > 0 and row["req_s"] > 0
        assert row["ttft_p50_s"] <= row["ttft_p99_s"]
        assert len(row["per_worker_prompt_tokens"]) == 2
        assert sum(row["per_worker_prompt_tokens"]) == row["cache_query_tokens"] > 0
        assert 0 < row["hit_rate"] < 1  # shared system prompts and growing chats hit the workers' caches
        assert row["busiest_over_mean"] >= 1
    assert (out / "fleet.csv").read_text().splitlines()[0].startswith("router,req_s,")
    assert (out / "fleet.png").stat().st_size > 0
    printed = capsys.readouterr().out
    assert "hit rate so far" in printed and "round_robin: starting 2 fresh standin workers" in printed


def run_and_capture(capsys, *argv: str) -> tuple[int, str]:
    code = fleet_bench.run(parse(*argv))
    captured = capsys.readouterr()
    return code, captured.err + captured.out


def test_unknown_workload_is_one_clear_message(capsys, tmp_path):
    code, text = run_and_capture(capsys, "--workload", "nope", "--out", str(tmp_path))
    assert code == 2 and "unknown workload 'nope': choose one of chat, docqa" in text


def test_malformed_trace_line_names_file_and_line(capsys, tmp_path):
    trace = tmp_path / "bad.jsonl"
    trace.write_text('{"arrival_s": 0, "session_id": "a", "prompt": "x", "output_tokens": 1}\n{oops\n')
    code, text = run_and_capture(capsys, "--workload", "trace", "--trace", str(trace), "--out", str(tmp_path))
    assert code == 2 and f"{trace}:2: not valid JSON" in text


def test_unreachable_worker_and_router_are_named(capsys, tmp_path):
    from bench.router_bench import free_port

    dead = f"http://127.0.0.1:{free_port()}"
    code, text = run_and_capture(capsys, "--worker-urls", dead, "--out", str(tmp_path))
    assert code == 2 and f"worker {dead} is not reachable" in text
    code, text = run_and_capture(capsys, "--router-url", dead, "--out", str(tmp_path))
    assert code == 2 and f"router {dead} is not reachable" in text


def test_unknown_router_and_missing_peer(monkeypatch):
    with pytest.raises(fleet_bench.BenchError, match="unknown router 'fastest'"):
        fleet_bench.resolve_routers(["cache_aware", "fastest"])
    monkeypatch.setitem(fleet_bench.PEERS, "peer-router", ("no_such_module_xyz", "peer-router"))
    routers, notes = fleet_bench.resolve_routers(["round_robin", "peer-router"])
    assert routers == ["round_robin"]
    assert notes == ["peer-router skipped: not installed (pip install peer-router)"]


def test_a_worker_that_refuses_its_flags_is_named_with_its_log(capsys, tmp_path):
    code, text = run_and_capture(capsys, "--executor", "cpu", "--workers", "1", "--routers", "round_robin",
                                 "--worker-arg=--no-such-flag", "--duration", "1", "--out", str(tmp_path))
    assert code == 2
    assert "worker 0 (" in text and "did not come up" in text and "--no-such-flag" in text


def test_worker_command_lines_per_executor():
    sim = parse("--executor", "sim", "--kv-cache-tokens", "4096", "--model", "llama3-8b")
    argv, env = fleet_bench.worker_argv(sim, 0, 9000)
    assert argv[argv.index("--executor") + 1] == "sim" and argv[argv.index("--kv-cache-tokens") + 1] == "4096"
    assert env == {}
    # Four CUDA workers on one GPU, started in turn: cumulative fractions leave each ~0.2 of the GPU.
    cuda = parse("--executor", "cuda", "--workers", "4", "--mem-fraction", "0.2", "--kv-cache-tokens", "4096")
    fractions = []
    for i in range(4):
        argv, env = fleet_bench.worker_argv(cuda, i, 9000 + i)
        fractions.append(float(argv[argv.index("--mem-fraction") + 1]))
        assert env == {"CUDA_VISIBLE_DEVICES": "0"} and "--kv-cache-tokens" not in argv
    assert fractions == pytest.approx([0.2, 0.4, 0.6, 0.8])
    two_gpus = parse("--executor", "cuda", "--workers", "4", "--gpus", "0,1", "--mem-fraction", "0.4")
    placed = [fleet_bench.worker_argv(two_gpus, i, 9000)[1]["CUDA_VISIBLE_DEVICES"] for i in range(4)]
    assert placed == ["0", "1", "0", "1"]


def test_too_many_cuda_workers_for_one_gpu_is_refused(capsys, tmp_path):
    code, text = run_and_capture(capsys, "--executor", "cuda", "--workers", "6", "--mem-fraction", "0.2",
                                 "--out", str(tmp_path))
    assert code == 2 and "lower --mem-fraction" in text


def test_percentile_is_nearest_rank():
    values = [float(v) for v in range(1, 101)]
    assert fleet_bench.percentile(values, 50) == 50.0
    assert fleet_bench.percentile(values, 99) == 99.0
    assert fleet_bench.percentile([3.0], 99) == 3.0
    assert fleet_bench.percentile([], 50) is None


def test_the_peer_shim_streams_events_through_and_drops_fields_the_worker_names(standin):
    shims = fleet_bench.StreamingFieldFilterShims([standin.url])
    try:
        path, body = request_body(MultiTurnChat(seed=0, max_tokens=3).session(0), "standin-model",
                                  [{"role": "user", "content": "hi"}])
        with requests.Session() as http:
            result = stream_request(http, shims.urls[0], path, body)
            assert result.ok and result.text == "Hello from w0" and len(result.itl_s) == 2
            # The stand-in names 'messages' as the bad field: the shim drops it, retries, and passes on
            # the second refusal (now about a field the body no longer has).
            refused = stream_request(http, shims.urls[0], "/v1/chat/completions",
                                     {"model": "m", "messages": "x", "stream": True})
        assert refused.error == "HTTP 400: messages must be a list"
        assert shims.dropped == {"messages"}
    finally:
        shims.close()


def test_eight_sim_workers_in_one_process_behind_two_routers_write_the_rows(tmp_path, capsys):
    from sim_helpers import write_profile

    profile = write_profile(tmp_path, const_s=0.002, per_token_s=2e-6)
    out = tmp_path / "fleet"
    args = parse("--executor", "sim", "--sim-host", "one-process", "--workers", "8", "--model", "llama3-8b",
                 f"--worker-arg=--sim-profile={profile}", "--kv-cache-tokens", "4096", "--time-scale", "2",
                 "--routers", "cache_aware,round_robin", "--workload", "docqa", "--documents", "4",
                 "--doc-chars", "600", "--users", "4", "--duration", "4", "--max-tokens", "4",
                 "--probe-interval-s", "0.2", "--progress-s", "60", "--out", str(out))
    assert fleet_bench.run(args) == 0
    rows = json.loads((out / "fleet.json").read_text())["rows"]
    assert [r["router"] for r in rows] == ["cache_aware", "round_robin"]
    for row in rows:
        for key in ("router", "req_s", "ttft_p50_s", "ttft_p99_s", "itl_p50_s", "hit_rate", "busiest_over_mean",
                    "failed", "router_added_p50_s", "router_added_p99_s", "router_added_mean_s", "time_scale",
                    "router_overhead_p50_s", "router_overhead_p99_s"):
            assert row[key] is not None, key
        assert row["router_overhead_p50_s"] <= row["router_overhead_p99_s"]
        assert row["router_overhead_requests"] >= row["requests"]  # every load request (and each probe) is in it
        assert row["failed"] == 0 and row["requests"] > 0 and row["time_scale"] == 2
        assert len(row["per_worker_requests"]) == 8 and sum(row["per_worker_requests"]) > 0
        assert 0 < row["hit_rate"] < 1  # shared documents hit the sim workers' radix caches
        assert row["router_added_probes"] > 0 and row["probe_errors"] == 0
        assert isinstance(row["sim_host_busy_pct"], list)
    printed = capsys.readouterr().out
    assert "8 sim workers ready in one process" in printed and "time scale 2" in printed
    # one sim-fleet process per router setting: each its own log and URLs file
    assert sorted(p.name for p in (out / "logs").glob("*_sim_fleet.log")) == [
        "cache_aware_sim_fleet.log", "round_robin_sim_fleet.log"]


def test_a_time_scale_converts_rates_up_and_latencies_down():
    samples = {"elapsed_s": 10.0, "samples": [["e2e", 4.0, True, 8], ["e2e", 6.0, True, 8], ["ttft", 2.0, True, 0],
                                              ["itl", 0.5, True, 0]]}
    counts = [{"cache_hit_tokens": 0, "cache_query_tokens": 0, "requests": 0}]
    after = [{"cache_hit_tokens": 5, "cache_query_tokens": 10, "requests": 2}]
    plain = fleet_bench.summarize("r", samples, counts, after, [])
    scaled = fleet_bench.summarize("r", samples, counts, after, [], time_scale=4.0)
    assert scaled["req_s"] == pytest.approx(4 * plain["req_s"]) and plain["req_s"] == pytest.approx(0.2)
    assert scaled["output_tok_s"] == pytest.approx(4 * plain["output_tok_s"])
    assert scaled["ttft_p50_s"] == pytest.approx(0.5) and scaled["itl_p50_s"] == pytest.approx(0.125)
    assert scaled["hit_rate"] == plain["hit_rate"] == 0.5  # counts do not depend on the clock
    assert (plain["time_scale"], scaled["time_scale"]) == (1.0, 4.0)


def test_the_sim_host_is_one_process_past_eight_workers_and_a_time_scale_needs_it(capsys, tmp_path):
    assert not fleet_bench.one_process_sim(parse("--executor", "sim", "--workers", "8"))
    assert fleet_bench.one_process_sim(parse("--executor", "sim", "--workers", "9"))
    assert not fleet_bench.one_process_sim(parse("--executor", "sim", "--workers", "64", "--sim-host", "per-worker"))
    assert not fleet_bench.one_process_sim(parse("--executor", "cpu", "--workers", "64"))
    argv = fleet_bench.sim_fleet_argv(parse("--executor", "sim", "--workers", "128", "--model", "llama3-8b",
                                            "--time-scale", "8", "--kv-cache-tokens", "6000",
                                            "--worker-arg=--sim-profile=p.json"), tmp_path / "urls")
    assert argv[3:5] == ["sim-fleet", "--workers"] and argv[argv.index("--workers") + 1] == "128"
    assert argv[argv.index("--time-scale") + 1] == "8" and argv[argv.index("--kv-cache-tokens") + 1] == "6000"
    assert argv[-1] == "--sim-profile=p.json"
    code, text = run_and_capture(capsys, "--executor", "cpu", "--time-scale", "4", "--out", str(tmp_path))
    assert code == 2 and "--time-scale 4 needs sim workers in one process" in text


def test_router_added_latency_comes_from_probe_pairs_and_histogram_means():
    probe = fleet_bench.LatencyProbe("http://r", ["http://w0"], "m", 1.0)
    probe.added, probe.control = [0.001, 0.002, 0.003], [0.0, 0.0005, -0.0005]
    probe.direct_ttfts = [0.25, 0.25]  # seen by the workers only: not part of the comparison
    before = {"router": (1.0, 10.0), "workers": (0.5, 10.0)}
    after = {"router": (4.0, 30.0), "workers": (3.0, 32.0)}
    figures = fleet_bench.router_added_figures(probe, before, after)
    assert figures["router_added_p50_s"] == 0.002 and figures["router_added_p99_s"] == 0.003
    assert figures["router_added_probes"] == 3 and figures["probe_control_p99_s"] == 0.0005
    assert figures["router_added_mean_s"] == pytest.approx(3.0 / 20 - 2.0 / 20)
    assert fleet_bench.router_added_figures(None, None, None)["router_added_p99_s"] is None
