"""Host cost per served request of the worker, on the sim executor: before/after in one run.

For each source tree given (`--tree LABEL=PATH`, e.g. the base commit unpacked to a folder and this
branch), in turn and `--rounds` times alternating: start `radixfleet worker --executor sim` from that
tree, send the served vs-vllm doc-QA stream (bench/vs_vllm_served.run_stream: streamed chat requests,
shared Zipf documents + a distinct question, ignore_eos) and read, from /proc, the CPU seconds the
frontend process and the engine process spent during the timed stream. Optionally `--py-spy PATH`
records both processes of each tree's first round (flame SVG + raw folded stacks).

    PYTHONPATH=$PWD python bench/reports/host_path_sim.py --tree before=/tmp/hostpath-base --tree after=$PWD

Prints a table and writes JSON (`--out`). The numbers are host work on this machine: compare only
ratios within one run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

from bench.router_bench import free_port, pythonpath_with
from bench.vs_vllm_served import run_stream, start_server, stop_server, summarize

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """utime + stime of one process (all its threads) so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        text = (task / "children").read_text().split()
        found.extend(int(p) for p in text)
    return found


def engine_pid(frontend: int) -> int:
    """The spawned engine process: the frontend's child that is not multiprocessing's resource tracker."""
    for _ in range(50):
        for child in children(frontend):
            cmdline = Path(f"/proc/{child}/cmdline").read_bytes().replace(b"\0", b" ")
            if b"multiprocessing" in cmdline and b"resource_tracker" not in cmdline:
                return child
        time.sleep(0.1)
    raise RuntimeError(f"no engine process under pid {frontend}")


def worker_argv(args, port: int, extra: list[str]) -> list[str]:
    return [sys.executable, "-m", "worker.cli", "worker", "--model", args.model, "--executor", "sim",
            "--sim-profile", args.sim_profile, "--port", str(port), "--max-model-len", str(args.max_model_len),
            "--max-num-seqs", str(args.max_num_seqs), "--seed", "0", *args.worker_arg, *extra]


def one_round(label: str, tree: Path, extra: list[str], args, logs: Path, profile: bool) -> dict:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "PYTHONPATH": pythonpath_with(tree)}
    log_path = logs / f"{label}.log"
    proc, startup_s = start_server(worker_argv(args, port, extra), env, str(tree), log_path, url, 300)
    spies = []
    try:
        front, engine = proc.pid, engine_pid(proc.pid)
        stream_args = SimpleNamespace(seed=0, max_tokens=args.max_tokens, documents=args.documents,
                                      doc_chars=args.doc_chars, zipf=args.zipf, requests=args.requests,
                                      concurrency=args.concurrency, temperature=args.temperature)
        # the same warm-up the served bench sends, then a first pass so the documents are cached and the
        # timed stream is the steady state (the GPU bench's cold start is the engine's, not the host's)
        if args.warm_pass:
            asyncio.run(run_stream(url, args.model, SimpleNamespace(**{**vars(stream_args), "seed": 99})))
        if profile and args.py_spy:
            for name, pid in (("frontend", front), ("engine", engine)):
                out = logs / f"{label}-{name}"
                spies.append(subprocess.Popen(
                    [args.py_spy, "record", "--pid", str(pid), "--rate", "200", "--nonblocking",
                     "--format", "raw", "--output", f"{out}.txt", "--duration", str(args.spy_seconds)],
                    stdout=subprocess.DEVNULL, stderr=open(f"{out}.spy.log", "w")))
            time.sleep(1.0)
        load_before = os.getloadavg()[0]
        before = {"frontend": cpu_seconds(front), "engine": cpu_seconds(engine), "client": time.process_time()}
        samples, wall_s = asyncio.run(run_stream(url, args.model, stream_args))
        after = {"frontend": cpu_seconds(front), "engine": cpu_seconds(engine), "client": time.process_time()}
        for spy in spies:
            spy.wait(args.spy_seconds + 30)
    finally:
        stop_server(proc)
    row = summarize(label, samples, wall_s, startup_s)
    ok = max(1, row["requests"] - row["failed"])
    for name in ("frontend", "engine", "client"):
        row[f"{name}_cpu_s"] = after[name] - before[name]
        row[f"{name}_cpu_ms_per_req"] = 1000 * (after[name] - before[name]) / ok
    row["worker_cpu_ms_per_req"] = row["frontend_cpu_ms_per_req"] + row["engine_cpu_ms_per_req"]
    row["loadavg_1m_before"] = load_before
    row["tree"], row["worker_flags"] = str(tree), extra
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tree", action="append", required=True, metavar="LABEL=PATH[=FLAGS]",
                        help="a source tree to serve from, with worker flags of its own after a second '=' "
                             "(e.g. 'before-1t=/tmp/base=--cpu-threads 1'); repeatable")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--model", default="qwen3-0.6b")
    parser.add_argument("--sim-profile", default="h200-qwen3-0.6b")
    parser.add_argument("--max-model-len", type=int, default=8192)
    parser.add_argument("--max-num-seqs", type=int, default=256)
    parser.add_argument("--requests", type=int, default=768)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--documents", type=int, default=48)
    parser.add_argument("--doc-chars", type=int, default=16000)
    parser.add_argument("--zipf", type=float, default=0.8)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--temperature", type=float, default=0.6)
    parser.add_argument("--warm-pass", action="store_true", help="one untimed pass first (documents cached)")
    parser.add_argument("--worker-arg", action="append", default=[], help="extra worker flag (repeatable)")
    parser.add_argument("--py-spy", default=None, help="path of a py-spy binary: record each tree's first round")
    parser.add_argument("--spy-seconds", type=int, default=8)
    parser.add_argument("--out", type=Path, default=Path("results/host_path_sim"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    trees = []
    for spec in args.tree:
        label, _, rest = spec.partition("=")
        path, _, flags = rest.partition("=")
        trees.append((label, Path(path).resolve(), flags.split()))
    rows = []
    for r in range(args.rounds):
        for label, tree, extra in trees:
            print(f"=== round {r + 1}: {label} ({tree} {' '.join(extra)})", flush=True)
            row = one_round(f"{label}-r{r + 1}", tree, extra, args, args.out, profile=r == 0)
            row["label"], row["round"] = label, r + 1
            rows.append(row)
            print(f"    {row['req_s']:.1f} req/s  TTFT p50/p99 {row['ttft_p50_s']:.3f}/{row['ttft_p99_s']:.3f} s  "
                  f"frontend {row['frontend_cpu_ms_per_req']:.2f} ms/req  engine {row['engine_cpu_ms_per_req']:.2f} "
                  f"ms/req  failed {row['failed']}", flush=True)
    print("\n| tree | round | req/s | TTFT p50 / p99 s | ITL p50 ms | frontend CPU ms/req | engine CPU ms/req "
          "| worker CPU ms/req | client CPU ms/req | load before |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['label']} | {row['round']} | {row['req_s']:.1f} | {row['ttft_p50_s']:.3f} / "
              f"{row['ttft_p99_s']:.3f} | {1000 * (row['itl_p50_s'] or 0):.1f} | "
              f"{row['frontend_cpu_ms_per_req']:.2f} | {row['engine_cpu_ms_per_req']:.2f} | "
              f"{row['worker_cpu_ms_per_req']:.2f} | {row['client_cpu_ms_per_req']:.2f} | "
              f"{row['loadavg_1m_before']:.1f} |")
    (args.out / "host_path_sim.json").write_text(json.dumps({"argv": sys.argv, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
