"""Churn: a worker joins a loaded fleet (and one leaves); how fast it gets traffic, what it costs the cache.

Reuses the fleet benchmark's pieces (bench/fleet_bench.py: workers, Locust run, worker counters).
N+1 fresh workers are started, our router in front of the first N with an admin key; Locust runs the
workload; at --add-at seconds the spare is added with POST /workers, at --remove-at one of the first
N is removed with DELETE /workers. Every --sample-s the workers' own counters are read (requests done
from /metrics, cache hit and query tokens from /load). Reported per router policy:

* first_request_s: seconds from the add to the new worker's first finished request;
* share_5s: the new worker's share of the requests finished in the 5 s after the add, over its fair
  share 1/(N+1) (target >= 0.5);
* hit rate of the whole fleet in the --window-s before the add and after it (target: drop <= 2 points);
* failed requests over the run (target 0).

    PYTHONPATH=. python bench/reports/churn_bench.py --executor sim --workers 4 --kv-cache-tokens 4096 \
        --workload docqa --documents 30 --doc-chars 2000 --zipf 0.8 --users 16 --duration 60 \
        --add-at 25 --remove-at 45 --policies cache_aware,round_robin --out results/churn
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from bench import fleet_bench  # noqa: E402
from bench.cache_hit_bench import read_worker_counters, stop  # noqa: E402
from bench.router_bench import free_port, wait_http  # noqa: E402

ADMIN_KEY = "churn-bench"


def admin(router: str, method: str, url: str) -> int:
    req = urllib.request.Request(router + "/workers", data=json.dumps({"url": url}).encode(), method=method,
                                 headers={"Authorization": f"Bearer {ADMIN_KEY}", "Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=5) as resp:
        return resp.status


def sample(urls: list[str]) -> list[dict]:
    out = []
    for u in urls:
        try:
            out.append(read_worker_counters(u))
        except OSError:
            out.append(None)
    return out


def hit_rate(series, t0: float, t1: float) -> float | None:
    """Fleet hit rate between the samples nearest t0 and t1 (counter deltas summed over workers)."""
    a = min(series, key=lambda s: abs(s[0] - t0))[1]
    b = min(series, key=lambda s: abs(s[0] - t1))[1]
    hits = queries = 0
    for x, y in zip(a, b):
        if x is None or y is None:
            continue
        hits += y["cache_hit_tokens"] - x["cache_hit_tokens"]
        queries += y["cache_query_tokens"] - x["cache_query_tokens"]
    return hits / queries if queries else None


def requests_between(series, t0: float, t1: float) -> list[int]:
    a = min(series, key=lambda s: abs(s[0] - t0))[1]
    b = min(series, key=lambda s: abs(s[0] - t1))[1]
    return [0 if x is None or y is None or x["requests"] is None else y["requests"] - x["requests"]
            for x, y in zip(a, b)]


def run_policy(policy: str, args, logs: Path) -> dict:
    wargs = argparse.Namespace(**{**vars(args), "workers": args.workers + 1})
    workers, urls = fleet_bench.start_workers(wargs, logs, f"{policy}_churn")
    router = None
    try:
        port = free_port()
        base = f"http://127.0.0.1:{port}"
        argv = [sys.executable, "-m", "worker.cli", "router", "--worker-urls", *urls[:-1], "--port", str(port),
                "--host", "127.0.0.1", "--policy", policy, "--admin-key", ADMIN_KEY, "--log-level", "WARNING"]
        router = subprocess.Popen(argv, cwd=ROOT, stdout=(logs / f"{policy}_router.log").open("wb"),
                                  stderr=subprocess.STDOUT)
        wait_http(base + "/health", timeout_s=60, proc=router)
        time.sleep(1.5)
        result: dict = {}
        locust = threading.Thread(target=lambda: result.update(
            samples=fleet_bench.run_locust(args, base, urls[:-1], logs, f"{policy}_churn")), daemon=True)
        start = time.monotonic()
        locust.start()
        series = []
        added = removed = None
        while locust.is_alive():
            now = time.monotonic() - start
            if added is None and now >= args.add_at:
                admin(base, "POST", urls[-1])
                added = time.monotonic() - start
            if removed is None and args.remove_at and now >= args.remove_at:
                admin(base, "DELETE", urls[0])
                removed = time.monotonic() - start
            series.append((time.monotonic() - start, sample(urls)))
            time.sleep(args.sample_s)
        locust.join()
    finally:
        if router is not None:
            stop([router])
        stop(workers)
    first = next((t - added for t, s in series if t >= added and s[-1] and s[-1]["requests"]), None)
    window = requests_between(series, added, added + 5)
    fair = sum(window) / (args.workers + 1) if sum(window) else 0
    before = hit_rate(series, added - args.window_s, added)
    after = hit_rate(series, added, added + args.window_s)
    e2e = [s for s in result["samples"]["samples"] if s[0] == "e2e"]
    row = {
        "policy": policy, "added_at_s": added, "removed_at_s": removed,
        "first_request_s": first, "new_worker_requests_5s": window[-1], "fleet_requests_5s": sum(window),
        "share_5s_over_fair": window[-1] / fair if fair else None,
        "hit_rate_before": before, "hit_rate_after": after,
        "hit_drop_points": None if before is None or after is None else 100 * (before - after),
        "failed": sum(1 for s in e2e if not s[2]), "requests": len(e2e),
    }
    print(f"  {policy}: first request on the new worker {row['first_request_s']} s after the add, "
          f"5 s share {row['share_5s_over_fair']} of fair, hit rate {before} -> {after}, "
          f"{row['failed']} failed of {row['requests']}", flush=True)
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    fleet_bench.add_arguments(parser)
    parser.add_argument("--policies", default="cache_aware,round_robin")
    parser.add_argument("--add-at", type=float, default=25.0)
    parser.add_argument("--remove-at", type=float, default=45.0, help="0: remove nobody")
    parser.add_argument("--window-s", type=float, default=10.0)
    parser.add_argument("--sample-s", type=float, default=0.5)
    args = parser.parse_args()
    if args.add_at + args.window_s > args.duration:
        parser.error("--add-at + --window-s must fit inside --duration")
    out = Path(args.out)
    logs = out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    rows = [run_policy(p, args, logs) for p in args.policies.split(",")]
    setup = (f"{args.workers}+1 {args.executor} workers, kv {args.kv_cache_tokens}, workload {args.workload}, "
             f"{args.users} users, {args.duration}s, add at {args.add_at}s, remove at {args.remove_at}s")
    (out / "churn.json").write_text(json.dumps({"setup": setup, "rows": rows}, indent=2))
    print(setup)
    for r in rows:
        print(json.dumps(r))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
