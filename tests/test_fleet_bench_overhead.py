"""bench fleet's reading of the router's own overhead histogram: a delta over the run, percentiles from buckets."""

from __future__ import annotations

import math

import pytest

from bench import fleet_bench

# cumulative bucket counts as scraped, {le: count}
BEFORE = {0.001: 5.0, 0.002: 5.0, 0.005: 5.0, math.inf: 5.0}
AFTER = {0.001: 55.0, 0.002: 95.0, 0.005: 104.0, math.inf: 105.0}  # 100 new: 50, 40, 9 and 1 past 5 ms


def test_percentiles_come_from_the_runs_delta_interpolated_within_a_bucket():
    assert fleet_bench.bucket_quantile(BEFORE, AFTER, 50) == pytest.approx(0.001)  # the 50th of 50 below 1 ms
    assert fleet_bench.bucket_quantile(BEFORE, AFTER, 25) == pytest.approx(0.0005)  # halfway into 0..1 ms
    assert fleet_bench.bucket_quantile(BEFORE, AFTER, 70) == pytest.approx(0.0015)  # 20 of the 40 in 1..2 ms
    assert fleet_bench.bucket_quantile(BEFORE, AFTER, 99) == pytest.approx(0.005)  # the 99th: last of 2..5 ms
    assert fleet_bench.bucket_quantile(BEFORE, AFTER, 100) == pytest.approx(0.005)  # past the last bound: that bound


def test_no_observations_in_the_run_give_no_figure():
    assert fleet_bench.bucket_quantile(AFTER, AFTER, 99) is None
    assert fleet_bench.bucket_quantile({}, {}, 99) is None


def test_row_figures_name_their_keys_and_count_the_runs_requests():
    figures = fleet_bench.router_overhead_figures(BEFORE, AFTER)
    assert figures == {"router_overhead_p50_s": pytest.approx(0.001), "router_overhead_p99_s": pytest.approx(0.005),
                       "router_overhead_requests": 100}
    # a peer router has no such histogram: the keys are there, empty
    assert fleet_bench.router_overhead_figures(None, None) == {
        "router_overhead_p50_s": None, "router_overhead_p99_s": None, "router_overhead_requests": 0}
    assert {"router_overhead_p50_s", "router_overhead_p99_s"} <= set(fleet_bench.ROW_KEYS)  # in the CSV too
