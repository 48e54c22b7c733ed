"""Gathers the fleet.json of each fleet_sim_scale_run.sh size into one table, JSON, CSV and PNG.

    python bench/reports/fleet_sim_scale_combine.py OUT_ROOT bench/reports/fleet_sim_scale
"""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

from bench.plotting import bar_panels

COLUMNS = ("workers", "router", "time_scale", "hit_rate", "hit_rate_after_warmup", "req_s", "req_s_per_worker", "ttft_p50_s", "ttft_p99_s",
           "busiest_over_mean", "requests_per_document", "router_added_p50_s", "router_added_p99_s", "probe_control_p50_s",
           "probe_control_p99_s", "router_added_probes", "router_added_mean_s", "requests", "failed",
           "sim_host_busy_max_pct", "router_cpu_share", "sim_host_cpu_share", "load_average_before_after")


def gather(root: Path) -> list[dict]:
    rows = []
    for path in sorted(root.glob("N*/fleet.json"), key=lambda p: int(p.parent.name[1:])):
        report = json.loads(path.read_text())
        n = report["settings"]["workers"]
        for row in report["rows"]:
            busy = row.get("sim_host_busy_pct") or [None]
            rows.append({**{k: row.get(k) for k in COLUMNS}, "workers": n, "req_s_per_worker": row["req_s"] / n,
                         "router": row["router"], "sim_host_busy_max_pct": max(busy, key=lambda v: v or 0),
                         "requests_per_document": row["requests"] / report["settings"]["documents"],
                         "setup": report["setup"]})
    return rows


def share(v):
    return "?" if v is None else f"{100 * v:.0f}%"


def ms(v):
    return None if v is None else 1000 * v


def markdown(rows: list[dict]) -> str:
    lines = ["| workers | router | time scale | hit rate | hit rate past warm-up | req/s (per worker) | TTFT p50 / p99 | busiest/mean "
             "| requests per doc | router added p50 / p99 (control p50 / p99) | router added mean | host_busy max "
             "| router / sim-fleet CPU | load avg |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        added = "-" if r["router_added_p50_s"] is None else (
            f"{ms(r['router_added_p50_s']):.1f} / {ms(r['router_added_p99_s']):.1f} ms "
            f"({ms(r['probe_control_p50_s']):.1f} / {ms(r['probe_control_p99_s']):.1f}), "
            f"{r['router_added_probes']} probes")
        mean = "-" if r["router_added_mean_s"] is None else f"{ms(r['router_added_mean_s']):.1f} ms"
        load = "-" if not r["load_average_before_after"] else " → ".join(f"{v:.1f}" for v in
                                                                         r["load_average_before_after"])
        warm = "-" if r["hit_rate_after_warmup"] is None else f"{100 * r['hit_rate_after_warmup']:.1f}%"
        lines.append(f"| {r['workers']} | {r['router']} | {r['time_scale']:g} | {100 * r['hit_rate']:.1f}% | {warm} "
                     f"| {r['req_s']:.1f} ({r['req_s_per_worker']:.2f}) | {ms(r['ttft_p50_s']):.0f} / "
                     f"{ms(r['ttft_p99_s']):.0f} ms | {r['busiest_over_mean']:.2f} | {r['requests_per_document']:.0f} "
                     f"| {added} | {mean} | {r['sim_host_busy_max_pct']}% | {share(r['router_cpu_share'])} / "
                     f"{share(r['sim_host_cpu_share'])} | {load} |")
    return "\n".join(lines)


FOOTNOTE = ("per worker: 2 documents of ~1.9k tokens, 6000 KV tokens, 2 closed-loop users; one sim-fleet process "
            "per router; see fleet_sim_scale.md")


def main(root: str, stem: str, footnote: str = FOOTNOTE) -> None:
    rows = gather(Path(root))
    Path(stem + ".json").write_text(json.dumps({"rows": rows}, indent=1) + "\n")
    with open(stem + ".csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(COLUMNS)
        for r in rows:
            writer.writerow([r[k] for k in COLUMNS])
    sizes = sorted({r["workers"] for r in rows})
    routers = list(dict.fromkeys(r["router"] for r in rows))
    by = {(r["workers"], r["router"]): r for r in rows}

    def series(key, scale=1.0, names=routers):
        return {name: [None if by.get((n, name)) is None or by[(n, name)][key] is None
                       else by[(n, name)][key] * scale for n in sizes] for name in names}

    labels = [f"N={n}" for n in sizes]
    ours = [name for name in routers if any(by.get((n, name), {}).get("router_added_p99_s") for n in sizes)]
    panels = [
        {"title": "hit rate (worker counters)", "ylabel": "%", "labels": labels, "series": series("hit_rate", 100)},
        {"title": "hit rate past the warm-up", "ylabel": "%", "labels": labels,
         "series": series("hit_rate_after_warmup", 100)},
        {"title": "req/s per worker (modelled time)", "ylabel": "req/s", "labels": labels,
         "series": series("req_s_per_worker")},
        {"title": "TTFT p99 (modelled time)", "ylabel": "ms", "labels": labels, "series": series("ttft_p99_s", 1000)},
        {"title": "busiest / mean worker", "ylabel": "ratio", "labels": labels, "series": series("busiest_over_mean")},
        {"title": "router added p50, probes (host time)", "ylabel": "ms", "labels": labels,
         "series": series("router_added_p50_s", 1000, ours)},
        {"title": "router added mean, histograms (host time)", "ylabel": "ms", "labels": labels,
         "series": series("router_added_mean_s", 1000, ours)},
    ]
    bar_panels(stem + ".png", panels, "radixfleet bench fleet: sim llama3-8b (H200 profile) fleets, doc-QA",
               footnote=footnote)
    print(markdown(rows))


if __name__ == "__main__":
    if len(sys.argv) < 3:
        raise SystemExit(f"usage: {sys.argv[0]} OUT_ROOT STEM [PNG_FOOTNOTE]")
    main(*sys.argv[1:4])
