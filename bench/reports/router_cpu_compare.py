"""Router CPU per request, two (or more) source trees of the router in one run, interleaved.

`radixfleet bench router` measures the routers of one tree. To compare a change with the code before it,
this starts one router per tree (each from its own folder, e.g. a `git archive` of the older commit in
/tmp) in front of the same fast stand-in workers, all side by side, and measures them in rounds: A, B,
A, B, ... so that load from elsewhere on a shared machine falls on every tree alike. Per round and
tree: an open loop at --rate req/s (or a closed loop of --concurrency connections) for --seconds
(non-streamed chat, ~1 KB prompts, bench/router_bench.py's payloads) and the CPU seconds the
router's process used meanwhile. A fixed rate is the fairer comparison on a shared machine: in a
closed loop the achieved rate follows the load generator's share of its core, and an event loop
woken for fewer requests at a time spends more CPU on each.

Reported per tree: CPU microseconds per request in every round, their median; per later tree, the ratio
to the first tree in each round (the same round, so the same machine state), its median and spread.

    PYTHONPATH=. python bench/reports/router_cpu_compare.py --tree before=/tmp/rf_before \\
        --tree this=. --rounds 10 --seconds 5 --rate 500 --out bench/reports/router_cpu_placement

Like router_bench, the routers share one core (only the one being measured is busy) and the stand-ins
and the load generator share the others.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from bench.router_bench import (closed_loop, cpu_model, free_port, load_average, make_payloads,  # noqa: E402
                                open_loop, process_tree_cpu_s, start_standins, wait_http)


def parse_tree(spec: str) -> tuple[str, Path]:
    name, sep, path = spec.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"--tree wants NAME=FOLDER, got {spec!r}")
    folder = Path(path).resolve()
    if not (folder / "router" / "app.py").is_file():
        raise argparse.ArgumentTypeError(f"{folder} has no router/app.py: give a source tree of radixfleet")
    return name, folder


def start_router(folder: Path, worker_urls: list[str], policy: str, cpus: set[int], log: Path):
    port = free_port()
    argv = [sys.executable, "-m", "worker.cli", "router", "--worker-urls", *worker_urls, "--policy", policy,
            "--log-level", "WARNING", "--host", "127.0.0.1", "--port", str(port)]
    env = {**os.environ, "PYTHONPATH": str(folder), "PYTHONUNBUFFERED": "1"}

    def pin() -> None:
        os.sched_setaffinity(0, cpus)

    proc = subprocess.Popen(argv, cwd=folder, env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT,
                            preexec_fn=pin)
    wait_http(f"http://127.0.0.1:{port}/health", proc=proc)
    return proc, port


def measure_cpu(port: int, pid: int, payloads: list[bytes], args) -> dict:
    """CPU per request of one router: open loop at args.rate req/s, or a closed loop when the rate is 0."""
    asyncio.run(closed_loop("127.0.0.1", port, payloads, 8, 0.5))  # warm the connections
    cpu_before = process_tree_cpu_s(pid)
    start = time.perf_counter()
    if args.rate > 0:
        result = asyncio.run(open_loop("127.0.0.1", port, payloads, args.rate, args.seconds))
        elapsed = time.perf_counter() - start
        done = result["n"]
        rate = result["achieved_rate"]
    else:
        result = asyncio.run(closed_loop("127.0.0.1", port, payloads, args.concurrency, args.seconds))
        elapsed = time.perf_counter() - start
        done = result["requests_per_s"] * elapsed
        rate = result["requests_per_s"]
    cpu = process_tree_cpu_s(pid) - cpu_before
    return {"cpu_us_per_request": cpu / max(done, 1) * 1e6, "requests": done, "cpu_s": cpu,
            "requests_per_s": rate, "errors": result.get("errors", 0), "load_average": load_average(),
            **({"p50_ms": result["p50_ms"], "p99_ms": result["p99_ms"]} if args.rate > 0 else {})}


def spread(values: list[float]) -> dict:
    ordered = sorted(values)
    return {"median": statistics.median(ordered), "min": ordered[0], "max": ordered[-1],
            "quartiles": statistics.quantiles(ordered, n=4) if len(ordered) >= 2 else ordered * 3}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tree", type=parse_tree, action="append", required=True,
                        help="NAME=FOLDER, a radixfleet source tree; the first is the reference")
    parser.add_argument("--policy", default="cache_aware")
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--rate", type=float, default=0.0,
                        help="open loop at this many req/s (every tree sees the same rate, so the same "
                             "event-loop batching); 0: closed loop of --concurrency connections")
    parser.add_argument("--prompt-bytes", type=int, default=1024)
    parser.add_argument("--router-cpu", type=int, default=0)
    parser.add_argument("--out", required=True, help="output path without extension (.json and .md are written)")
    args = parser.parse_args(argv)
    if len(args.tree) < 2:
        parser.error("give at least two --tree NAME=FOLDER")

    ncpu = os.cpu_count() or 1
    router_cpus = {args.router_cpu % ncpu}
    other_cpus = {c for c in range(ncpu) if c not in router_cpus} or router_cpus
    os.sched_setaffinity(0, other_cpus)
    payloads = make_payloads(256, args.prompt_bytes)
    setup = (f"{cpu_model()}, {ncpu} cores; routers pinned to core {sorted(router_cpus)[0]}, "
             f"{args.workers} fast stand-ins + load generator on {sorted(other_cpus)}; policy {args.policy}; "
             + (f"open loop at {args.rate:g} req/s, " if args.rate > 0 else f"closed loop, {args.concurrency} connections, ")
             + f"{args.seconds:g} s per tree per round, "
             f"{args.rounds} rounds; non-streamed chat, ~{len(payloads[0])} B bodies; python {platform.python_version()}")
    print(f"router cpu compare: {setup}", flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    logs = Path("/tmp") / f"router_cpu_compare_logs_{os.getpid()}"
    logs.mkdir(exist_ok=True)
    procs: list[subprocess.Popen] = []
    try:
        urls = start_standins(args.workers, other_cpus, logs, procs)
        routers = []
        for name, folder in args.tree:
            proc, port = start_router(folder, urls, args.policy, router_cpus, logs / f"router_{name}.log")
            procs.append(proc)
            routers.append((name, folder, port, proc.pid))
        rounds: list[dict[str, dict]] = []
        for r in range(args.rounds):
            # Alternate the order too, so neither tree always runs right after the other.
            order = routers if r % 2 == 0 else list(reversed(routers))
            row = {}
            for name, _, port, pid in order:
                row[name] = measure_cpu(port, pid, payloads, args)
            rounds.append(row)
            print(f" round {r + 1}/{args.rounds}: " + ", ".join(
                f"{name} {row[name]['cpu_us_per_request']:.0f} us/req" for name, *_ in routers), flush=True)
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()

    reference = args.tree[0][0]
    summary = {}
    for name, folder in args.tree:
        per_round = [row[name]["cpu_us_per_request"] for row in rounds]
        entry = {"folder": str(folder), "cpu_us_per_request": spread(per_round)}
        if name != reference:
            ratios = [row[name]["cpu_us_per_request"] / row[reference]["cpu_us_per_request"] for row in rounds]
            entry["ratio_to_" + reference] = spread(ratios)
        summary[name] = entry
    report = {"setup": setup, "command": " ".join([sys.executable, *sys.argv]), "settings": {
        k: (v if k != "tree" else [f"{n}={p}" for n, p in v]) for k, v in vars(args).items()},
        "summary": summary, "rounds": rounds}
    out.with_suffix(".json").write_text(json.dumps(report, indent=1) + "\n")
    lines = [f"setup: {setup}", "", "| tree | median us/req | min | max | ratio to " + reference +
             " (median) | ratio min-max |", "|---|---|---|---|---|---|"]
    for name, entry in summary.items():
        c = entry["cpu_us_per_request"]
        ratio = entry.get("ratio_to_" + reference)
        lines.append(f"| {name} | {c['median']:.0f} | {c['min']:.0f} | {c['max']:.0f} | "
                     + (f"{ratio['median']:.3f} | {ratio['min']:.3f}-{ratio['max']:.3f} |" if ratio else "1 | - |"))
    print("\n".join(lines))
    print(f"wrote {out.with_suffix('.json')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
