"""The fleet bench repeated: every router several times, interleaved, with mean / min / max per router.

One fleet-bench run gives one figure per router, and on a shared 2-core box the same command moves the
hit rate by about a point and busiest/mean by up to 0.1 from run to run (bench/reports/placement_sim/
README.md): too much to tell two routers apart from one run. This runs the fleet bench's own
`run_router` (fresh workers per run, same Locust workload) --repeats times per router, interleaved
(repeat 1 of every router, then repeat 2, ...) so that a change in the box's load hits every router
alike; repeat k uses workload seed --seed + k for every router (the same sessions for each router
within a repeat, different documents and questions across repeats). Every fleet-bench flag applies.

    PYTHONPATH=. python bench/reports/placement_sim/repeats.py --executor sim --model demo \
        --worker-arg=--sim-profile --worker-arg=h200-llama3-8b --workers 4 --users 16 --duration 30 \
        --max-tokens 16 --kv-cache-tokens 4096 --workload docqa --documents 30 --doc-chars 2000 --zipf 0.8 \
        --routers cache_aware,sglang-router --repeats 3 --out results/docqa_repeats

Writes DIR/repeats.json: {"setup", "settings", "runs": [every fleet-bench row, with its repeat and seed],
"summary": per router the mean / min / max of hit rate, busiest/mean, req/s and the box's load average}.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT))

from bench import fleet_bench  # noqa: E402
from bench.plotting import print_table, write_json  # noqa: E402
from bench.router_bench import cpu_model  # noqa: E402

FIGURES = ("hit_rate", "busiest_over_mean", "req_s")


def spread(values: list[float]) -> dict:
    return {"mean": sum(values) / len(values), "min": min(values), "max": max(values)} if values else {}


def summarize(runs: list[dict]) -> dict:
    """Per router: mean / min / max of each figure over its repeats, and the load average around them."""
    out: dict[str, dict] = {}
    for router in dict.fromkeys(r["router"] for r in runs):
        mine = [r for r in runs if r["router"] == router]
        entry = {name: spread([r[name] for r in mine]) for name in FIGURES}
        loads = [x for r in mine for x in (r.get("load_average_before_after") or []) if x is not None]
        entry["load_average"] = spread(loads)
        entry["repeats"] = len(mine)
        entry["failed"] = sum(r["failed"] for r in mine)
        out[router] = entry
    return out


def table_rows(summary: dict) -> list[dict]:
    rows = []
    for router, s in summary.items():
        hit, bal, rate, load = s["hit_rate"], s["busiest_over_mean"], s["req_s"], s["load_average"]
        rows.append({"router": router, "repeats": s["repeats"],
                     "hit % mean": 100 * hit["mean"], "hit % min": 100 * hit["min"], "hit % max": 100 * hit["max"],
                     "busiest/mean mean": bal["mean"], "b/m min": bal["min"], "b/m max": bal["max"],
                     "req/s mean": rate["mean"], "failed": s["failed"],
                     "load avg": f"{load['min']:.1f}-{load['max']:.1f}" if load else "?"})
    return rows


def add_arguments(parser: argparse.ArgumentParser) -> None:
    fleet_bench.add_arguments(parser)
    parser.add_argument("--repeats", type=int, default=3, help="runs per router (workload seeds --seed .. --seed+N-1)")


def run(args: argparse.Namespace) -> int:
    if args.repeats < 1:
        print("repeats.py: --repeats must be at least 1", file=sys.stderr)
        return 2
    if args.router_url or args.worker_urls:
        print("repeats.py: needs routers and workers the bench starts (drop --router-url / --worker-urls)",
              file=sys.stderr)
        return 2
    try:
        fleet_bench.validate(args)
        routers, notes = fleet_bench.resolve_routers([r.strip() for r in args.routers.split(",") if r.strip()])
    except fleet_bench.BenchError as exc:
        print(f"repeats.py: {exc}", file=sys.stderr)
        return 2
    for note in notes:
        print(f"note: {note}", flush=True)
    out = Path(args.out)
    runs: list[dict] = []
    for k in range(args.repeats):
        for name in routers:
            one = copy.copy(args)
            one.seed = args.seed + k
            logs = out / "logs" / f"repeat{k}"
            logs.mkdir(parents=True, exist_ok=True)
            print(f"repeat {k + 1}/{args.repeats}, seed {one.seed}: {name}", flush=True)
            try:
                row = fleet_bench.run_router(name, one, logs, None)
            except fleet_bench.BenchError as exc:
                print(f"  {name}: FAILED: {exc}", flush=True)
                notes.append(f"{name} repeat {k} failed: {exc}")
                continue
            runs.append({**row, "repeat": k, "seed": one.seed})
    if not runs:
        print("repeats.py: no run finished: " + "; ".join(notes), file=sys.stderr)
        return 1
    summary = summarize(runs)
    setup = (f"{args.workers} {args.executor} workers, kv {args.kv_cache_tokens}, workload {args.workload}, "
             f"{args.users} users, {args.duration}s per run, {args.repeats} repeats interleaved (seeds {args.seed}.."
             f"{args.seed + args.repeats - 1}); {cpu_model()}, {os.cpu_count()} cores")
    print()
    print_table(table_rows(summary), ["router", "repeats", "hit % mean", "hit % min", "hit % max",
                                      "busiest/mean mean", "b/m min", "b/m max", "req/s mean", "failed",
                                      "load avg"], title=setup)
    for r in runs:
        print(f"  {r['router']} seed {r['seed']}: hit {100 * r['hit_rate']:.1f}%, busiest/mean "
              f"{r['busiest_over_mean']:.2f}, per-worker requests {r['per_worker_requests']}")
    write_json(out / "repeats.json", {"setup": setup, "notes": notes, "settings": vars(args), "runs": runs,
                                      "summary": summary})
    print(f"wrote {out / 'repeats.json'}")
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.strip().split("\n")[0])
    add_arguments(parser)
    raise SystemExit(run(parser.parse_args()))
