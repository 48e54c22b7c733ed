"""Fleet benchmark: the same Locust workload through each router setting, on fresh workers each time.

For each router in --routers: N fresh workers are started (empty caches; --executor cpu, sim or cuda),
the router in front of them, then Locust headless (bench/locust/locustfile.py) with the same --seed, so
every router sees the same sessions. Hit rates come from the workers' own /load counters
(cache_hit_tokens / cache_query_tokens, deltas over the run), requests per worker from their /metrics.

    radixfleet bench fleet --workload docqa --workers 4 --kv-cache-tokens 8192 \
        --routers cache_aware,round_robin,least_load,sglang-router --users 16 --duration 60 --out results/fleet

Router names: our policies (cache_aware, round_robin, least_load, ...: `radixfleet router --policy X`),
sglang-router (`pip install sglang-router`; its cache_aware policy) and vllm-router; a peer that is
not installed is skipped with a note. Peers re-serialize requests with fields of their own; those go
through a shim that drops any field the worker rejects by name (listed in the row's notes).

Several CUDA workers on one GPU (--executor cuda --workers 4 --gpus 0): they start one after another.
The CUDA executor sizes its pool as mem_fraction x the GPU's total memory minus everything already in
use on it (other workers included), and ignores --kv-cache-tokens; so worker i on a GPU is given the
cumulative fraction (i+1) x --mem-fraction, which leaves each worker about --mem-fraction of the GPU.

Writes DIR/fleet.json (rows keyed router, req_s, output_tok_s, ttft_p50_s, ttft_p99_s, itl_p50_s,
hit_rate, per_worker_requests, per_worker_prompt_tokens, busiest_over_mean, failed), DIR/fleet.csv,
DIR/fleet.png, and per router the Locust CSVs and process logs under DIR/logs/.
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import json
import math
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from bench.cache_hit_bench import FieldFilterShims, read_worker_counters, stop
from bench.locust.trace import TraceError, read_trace
from bench.locust.workloads import WORKLOADS
from bench.plotting import bar_panels, print_table, script_main, write_json
from bench.router_bench import ROOT, STANDIN, cpu_model, free_port, load_average, wait_http

LOCUSTFILE = ROOT / "bench" / "locust" / "locustfile.py"
PEERS = {  # name -> (python module to look for, pip package)
    "sglang-router": ("sglang_router", "sglang-router"),
    "vllm-router": ("vllm_router", "vllm-router"),
}
# Locust options passed through unchanged (see the locustfile's OPTION_DEFAULTS).
WORKLOAD_FLAGS = ("documents", "doc_chars", "zipf", "system_prompts", "system_chars", "turns", "user_chars",
                  "groups", "prompts_per_group", "prefix_chars", "question_chars", "trace")
ROW_KEYS = ("router", "req_s", "output_tok_s", "ttft_p50_s", "ttft_p99_s", "itl_p50_s", "e2e_p50_s", "hit_rate",
            "busiest_over_mean", "failed", "requests", "per_worker_requests", "per_worker_prompt_tokens")


class StreamingFieldFilterShims(FieldFilterShims):
    """FieldFilterShims (bench/cache_hit_bench.py) that stream the answer through as it arrives: the base
    class reads whole responses, which would hide a peer's TTFT and ITL behind the full generation."""

    def _handler(self, target: str):
        from aiohttp import web

        async def handle(request: web.Request) -> web.StreamResponse:
            raw = await request.read()
            try:
                body = json.loads(raw) if request.method == "POST" and raw else None
            except ValueError:
                body = None
            for _ in range(20):
                if isinstance(body, dict):
                    for name in self.dropped:
                        body.pop(name, None)
                    raw = json.dumps(body).encode()
                async with self.session.request(request.method, target + request.path_qs, data=raw or None,
                                                headers={"Content-Type": "application/json"}) as resp:
                    if resp.status == 400 and isinstance(body, dict):
                        data = await resp.read()
                        try:
                            param = json.loads(data)["error"]["param"]
                        except (ValueError, KeyError, TypeError):
                            param = None
                        if isinstance(param, str) and param in body:
                            self.dropped.add(param)
                            continue
                        return web.Response(status=400, body=data, content_type="application/json")
                    out = web.StreamResponse(status=resp.status,
                                             headers={"Content-Type": resp.headers.get("Content-Type",
                                                                                       "application/json")})
                    await out.prepare(request)
                    try:
                        async for chunk in resp.content.iter_any():
                            await out.write(chunk)
                        await out.write_eof()
                    except ConnectionResetError:
                        pass  # the peer hung up (Locust stops its users mid-request at the end of a run)
                    return out
            return web.Response(status=502, text="shim: too many rejected fields")

        return handle


class BenchError(RuntimeError):
    """A problem the user can fix: printed as one line, exit status 2."""


def log_tail(path: Path, lines: int = 3) -> str:
    try:
        text = path.read_text(errors="replace").strip().splitlines()
    except OSError:
        return ""
    return " | ".join(text[-lines:])


# --- workers ---------------------------------------------------------------------------------------------

def worker_argv(args, index: int, port: int) -> tuple[list[str], dict]:
    """Command line and extra environment of worker `index`."""
    if args.executor == "standin":  # tests: instant workers with a simulated prefix cache
        return [sys.executable, str(STANDIN), "--port", str(port), "--name", f"w{index}",
                "--kv-tokens", str(args.kv_cache_tokens or 65536)], {}
    argv = [sys.executable, "-m", "worker.cli", "worker", "--model", args.model, "--port", str(port),
            "--host", "127.0.0.1", "--log-level", "warning", "--executor", args.executor]
    env = {}
    if args.executor == "cuda":
        gpus = args.gpus.split(",")
        gpu = gpus[index % len(gpus)]
        nth_on_gpu = index // len(gpus)
        argv += ["--device", "cuda", "--mem-fraction", f"{min(0.98, (nth_on_gpu + 1) * args.mem_fraction):.4f}"]
        env["CUDA_VISIBLE_DEVICES"] = gpu
    else:
        argv += ["--device", "cpu"]
    if args.kv_cache_tokens and args.executor != "cuda":  # the CUDA executor sizes its pool from memory
        argv += ["--kv-cache-tokens", str(args.kv_cache_tokens)]
    argv += args.worker_arg or []
    return argv, env


def start_workers(args, logs: Path, tag: str) -> tuple[list[subprocess.Popen], list[str]]:
    """Started and waited for one at a time: CUDA workers on one GPU must each see the others' memory."""
    procs, urls = [], []
    base_env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    try:
        for i in range(args.workers):
            port = free_port()
            argv, env = worker_argv(args, i, port)
            log_path = logs / f"{tag}_worker{i}.log"
            proc = subprocess.Popen(argv, cwd=ROOT, env={**base_env, **env}, stdout=log_path.open("wb"),
                                    stderr=subprocess.STDOUT)
            procs.append(proc)
            url = f"http://127.0.0.1:{port}"
            urls.append(url)
            try:
                wait_http(url + "/health", timeout_s=args.worker_timeout, proc=proc)
            except (RuntimeError, TimeoutError) as exc:
                raise BenchError(f"worker {i} ({' '.join(argv[2:])}) did not come up: {exc}; its log "
                                 f"{log_path} ends: {log_tail(log_path)}") from None
            print(f"    worker {i} ready on {url}", flush=True)
    except BaseException:
        stop(procs)
        raise
    return procs, urls


def check_reachable(url: str, what: str) -> None:
    try:
        with urllib.request.urlopen(url.rstrip("/") + "/health", timeout=5) as resp:
            if resp.status == 200:
                return
            problem = f"HTTP {resp.status}"
    except urllib.error.HTTPError as exc:
        problem = f"HTTP {exc.code}"
    except (OSError, ValueError) as exc:
        problem = str(getattr(exc, "reason", exc))
    raise BenchError(f"{what} {url} is not reachable ({problem}): start it, or fix the URL")


def counters(urls: list[str]) -> list[dict]:
    try:
        return [read_worker_counters(u) for u in urls]
    except (OSError, KeyError, ValueError) as exc:
        raise BenchError(f"cannot read /load from the workers {urls}: {exc}") from None


# --- routers ---------------------------------------------------------------------------------------------

def router_argv(name: str, urls: list[str], port: int, args) -> list[str]:
    if name in PEERS:
        module = PEERS[name][0]
        return [sys.executable, "-m", f"{module}.launch_router", "--worker-urls", *urls, "--port", str(port),
                "--host", "127.0.0.1", "--policy", "cache_aware", "--log-level", "warn",
                "--prometheus-port", str(free_port())]
    return [sys.executable, "-m", "worker.cli", "router", "--worker-urls", *urls, "--port", str(port),
            "--host", "127.0.0.1", "--policy", name, "--log-level", "WARNING", *(args.router_arg or [])]


def resolve_routers(names: list[str]) -> tuple[list[str], list[str]]:
    """(routers to run, notes about skipped peers). Unknown names are an error."""
    from router.policies import POLICY_NAMES

    run, notes = [], []
    for name in names:
        if name in PEERS:
            module, package = PEERS[name]
            if importlib.util.find_spec(module) is None:
                notes.append(f"{name} skipped: not installed (pip install {package})")
                continue
        elif name not in POLICY_NAMES:
            raise BenchError(f"unknown router {name!r}: use our policies ({', '.join(POLICY_NAMES)}) "
                             f"or a peer ({', '.join(PEERS)})")
        run.append(name)
    return run, notes


def _pythonpath_with_root() -> str:
    """This source tree first, then whatever PYTHONPATH already holds (e.g. wheels of missing packages)."""
    return os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)


# --- locust ----------------------------------------------------------------------------------------------

def locust_argv(args, host: str, csv_prefix: Path, samples: Path) -> list[str]:
    argv = [sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless", "--only-summary",
            "-u", str(args.users), "-r", str(args.spawn_rate or args.users), "-t", f"{args.duration}s",
            "--stop-timeout", "0", "--host", host, "--csv", str(csv_prefix), "--loglevel", "WARNING",
            "--workload", args.workload, "--seed", str(args.seed), "--model", args.served_model or args.model,
            "--max-tokens", str(args.max_tokens), "--rate", str(args.rate), "--samples-out", str(samples)]
    for name in WORKLOAD_FLAGS:
        value = getattr(args, name)
        if value is not None:
            argv += ["--" + name.replace("_", "-"), str(value)]
    if args.session_ids:
        argv.append("--session-ids")
    return argv


def run_locust(args, host: str, urls: list[str], logs: Path, tag: str) -> dict:
    samples_path = logs / f"{tag}_samples.json"
    log_path = logs / f"{tag}_locust.log"
    proc = subprocess.Popen(locust_argv(args, host, logs / f"{tag}_locust", samples_path), cwd=ROOT,
                            env={**os.environ, "PYTHONPATH": _pythonpath_with_root()}, stdout=log_path.open("wb"),
                            stderr=subprocess.STDOUT)
    start = time.monotonic()
    before = counters(urls)
    next_report = start + args.progress_s
    while proc.poll() is None:
        time.sleep(0.5)
        if time.monotonic() >= next_report and proc.poll() is None:
            next_report += args.progress_s
            hits, queries = hit_totals(before, counters(urls))
            rate = f"{100 * hits / queries:.1f}%" if queries else "-"
            print(f"    {time.monotonic() - start:5.0f}/{args.duration}s  hit rate so far {rate}", flush=True)
        if time.monotonic() - start > args.duration + 120:
            proc.kill()
            raise BenchError(f"locust did not finish within {args.duration + 120}s; see {log_path}")
    if not samples_path.exists():
        raise BenchError(f"locust exited with {proc.returncode} and wrote no samples: {log_tail(log_path)} "
                         f"(full log: {log_path})")
    return json.loads(samples_path.read_text())


# --- figures ---------------------------------------------------------------------------------------------

def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile; None with no values."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, math.ceil(q / 100 * len(ordered)) - 1))
    return ordered[rank]


def hit_totals(before: list[dict], after: list[dict]) -> tuple[int, int]:
    hits = sum(a["cache_hit_tokens"] - b["cache_hit_tokens"] for a, b in zip(after, before))
    queries = sum(a["cache_query_tokens"] - b["cache_query_tokens"] for a, b in zip(after, before))
    return hits, queries


def summarize(router: str, samples: dict, before: list[dict], after: list[dict], notes: list[str]) -> dict:
    by_name: dict[str, list] = {}
    for name, seconds, ok, length in samples["samples"]:
        by_name.setdefault(name, []).append((seconds, ok, length))
    e2e = by_name.get("e2e", [])
    good = [s for s in e2e if s[1]]
    elapsed = samples["elapsed_s"] or 1.0
    hits, queries = hit_totals(before, after)
    per_requests = [None if a["requests"] is None or b["requests"] is None else a["requests"] - b["requests"]
                    for a, b in zip(after, before)]
    per_tokens = [a["cache_query_tokens"] - b["cache_query_tokens"] for a, b in zip(after, before)]
    # Requests per worker when every worker reports them (/metrics), else prompt tokens.
    basis = per_requests if all(r is not None for r in per_requests) else per_tokens
    mean = sum(basis) / len(basis) if basis else 0
    return {
        "router": router,
        "req_s": len(good) / elapsed,
        "output_tok_s": sum(s[2] for s in good) / elapsed,
        "ttft_p50_s": percentile([s[0] for s in by_name.get("ttft", [])], 50),
        "ttft_p99_s": percentile([s[0] for s in by_name.get("ttft", [])], 99),
        "itl_p50_s": percentile([s[0] for s in by_name.get("itl", [])], 50),
        "e2e_p50_s": percentile([s[0] for s in good], 50),
        "hit_rate": hits / queries if queries else 0.0,
        "busiest_over_mean": max(basis) / mean if mean else 0.0,
        "failed": len(e2e) - len(good),
        "requests": len(good),
        "per_worker_requests": per_requests,
        "per_worker_prompt_tokens": per_tokens,
        "load_basis": "requests" if basis is per_requests else "prompt tokens",
        "cache_hit_tokens": hits, "cache_query_tokens": queries,
        "elapsed_s": elapsed, "late_arrivals": samples.get("late_arrivals", 0),
        "sessions_started": samples.get("sessions_started"),
        "notes": notes,
    }


def write_csv(path: Path, rows: list[dict]) -> None:
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(ROW_KEYS)
        for row in rows:
            writer.writerow([" ".join(map(str, row[k])) if isinstance(row[k], list) else row[k] for k in ROW_KEYS])


def plot(path: Path, rows: list[dict], setup: str) -> None:
    labels = [r["router"] for r in rows]

    def series(key, scale=1.0):
        return {"": [None if r[key] is None else r[key] * scale for r in rows]}

    n = len(rows[0]["per_worker_prompt_tokens"]) if rows else 0
    basis = "per_worker_requests" if all(r["load_basis"] == "requests" for r in rows) else "per_worker_prompt_tokens"
    panels = [
        {"title": "throughput", "ylabel": "requests / s", "labels": labels, "series": series("req_s")},
        {"title": "prefix-cache hit rate (worker /load counters)", "ylabel": "%", "labels": labels,
         "series": series("hit_rate", 100)},
        {"title": "TTFT p50 / p99", "ylabel": "ms", "labels": labels,
         "series": {"p50": [None if r["ttft_p50_s"] is None else 1000 * r["ttft_p50_s"] for r in rows],
                    "p99": [None if r["ttft_p99_s"] is None else 1000 * r["ttft_p99_s"] for r in rows]}},
        {"title": "ITL p50", "ylabel": "ms", "labels": labels, "series": series("itl_p50_s", 1000)},
        {"title": basis.replace("_", " "), "ylabel": basis.split("_", 2)[2].replace("_", " "),
         "labels": [f"w{i}" for i in range(n)], "series": {r["router"]: r[basis] for r in rows}},
        {"title": "busiest / mean worker", "ylabel": "ratio", "labels": labels, "series": series("busiest_over_mean")},
    ]
    bar_panels(path, panels, "radixfleet bench fleet", footnote=setup)


# --- the run ---------------------------------------------------------------------------------------------

def run_router(name: str, args, logs: Path, external_urls: list[str] | None) -> dict:
    tag = name.replace("/", "_")
    notes: list[str] = []
    workers: list[subprocess.Popen] = []
    router = shims = None
    try:
        if external_urls:
            urls = external_urls
            notes.append("existing workers (--worker-urls): caches were not emptied; counters are deltas")
        else:
            print(f"  {name}: starting {args.workers} fresh {args.executor} workers", flush=True)
            workers, urls = start_workers(args, logs, tag)
        port = free_port()
        targets = urls
        if name in PEERS and args.executor != "standin":
            shims = StreamingFieldFilterShims(urls)
            targets = shims.urls
        argv = router_argv(name, targets, port, args)
        router_log = logs / f"{tag}_router.log"
        router = subprocess.Popen(argv, cwd=ROOT, stdout=router_log.open("wb"), stderr=subprocess.STDOUT)
        try:
            wait_http(f"http://127.0.0.1:{port}/health", timeout_s=60, proc=router)
        except (RuntimeError, TimeoutError) as exc:
            raise BenchError(f"router {name} did not come up: {exc}; {router_log} ends: {log_tail(router_log)}")
        time.sleep(1.5)  # let the router's first /load polls land
        before = counters(urls)
        load_before = load_average()
        print(f"  {name}: locust {args.workload}, {args.users} users"
              + (f", {args.rate}/s open loop" if args.rate > 0 else ", closed loop") + f", {args.duration}s",
              flush=True)
        samples = run_locust(args, f"http://127.0.0.1:{port}", urls, logs, tag)
        after = counters(urls)
        load_after = load_average()
    finally:
        if router is not None:
            stop([router])
        if shims is not None:
            if shims.dropped:
                notes.append(f"shim dropped fields the workers reject: {', '.join(sorted(shims.dropped))}")
            shims.close()
        stop(workers)
    row = summarize(name, samples, before, after, notes)
    # On a shared machine other work moves every figure: record how busy it was around the run.
    row["load_average_before_after"] = [load_before, load_after]
    print(f"  {name}: {row['req_s']:.2f} req/s, hit rate {100 * row['hit_rate']:.1f}%, "
          f"{row['failed']} failed", flush=True)
    return row


def run_external_router(url: str, args, logs: Path) -> dict:
    check_reachable(url, "router")
    urls = args.worker_urls or []
    before = counters(urls) if urls else []
    samples = run_locust(args, url.rstrip("/"), urls, logs, "external")
    after = counters(urls) if urls else []
    notes = [] if urls else ["no --worker-urls: hit rate and per-worker figures unknown"]
    return summarize(f"external {url}", samples, before, after, notes)


def validate(args) -> None:
    if args.workload not in WORKLOADS:
        raise BenchError(f"unknown workload {args.workload!r}: choose one of {', '.join(WORKLOADS)}")
    if args.workload == "trace":
        try:
            read_trace(args.trace or ROOT / "bench" / "traces" / "synthetic_chat.jsonl")  # the locustfile's default
        except TraceError as exc:
            raise BenchError(str(exc)) from None
    if args.executor == "cuda" and args.workers > 1 and len(args.gpus.split(",")) < args.workers:
        per_gpu = -(-args.workers // len(args.gpus.split(",")))
        if per_gpu * args.mem_fraction > 0.98:
            raise BenchError(f"{per_gpu} CUDA workers per GPU at --mem-fraction {args.mem_fraction} each need "
                             f"{per_gpu * args.mem_fraction:.2f} of a GPU: lower --mem-fraction (per worker)")
    for url in args.worker_urls or []:
        check_reachable(url, "worker")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--executor", default="cpu", choices=("cpu", "sim", "cuda", "standin"),
                        help="worker executor; standin: instant test workers (tests/standin_worker.py)")
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--model", default="demo", help="worker --model (built-in name or checkpoint folder)")
    parser.add_argument("--served-model", default=None, help="'model' field sent (default: --model)")
    parser.add_argument("--kv-cache-tokens", type=int, default=None, help="per-worker KV budget (cpu, sim)")
    parser.add_argument("--mem-fraction", type=float, default=0.2,
                        help="cuda: share of the GPU per worker (worker i on a GPU gets (i+1) x this)")
    parser.add_argument("--gpus", default="0", help="cuda: comma-separated GPU ids, workers spread over them")
    parser.add_argument("--worker-arg", action="append", metavar="ARG", help="extra worker flag (repeatable)")
    parser.add_argument("--router-arg", action="append", metavar="ARG", help="extra flag for our router")
    parser.add_argument("--worker-urls", nargs="+", default=None, help="use these running workers instead")
    parser.add_argument("--router-url", default=None, help="measure this running router (no routers started)")
    parser.add_argument("--routers", default="cache_aware,round_robin",
                        help="comma-separated: our policies and/or sglang-router, vllm-router")
    parser.add_argument("--workload", default="docqa", help=f"one of {', '.join(WORKLOADS)}")
    parser.add_argument("--users", type=int, default=16, help="Locust users (closed loop: sessions in flight)")
    parser.add_argument("--spawn-rate", type=float, default=None, help="users started per second (default: all)")
    parser.add_argument("--rate", type=float, default=0.0, help="open loop: sessions per second (0: closed loop)")
    parser.add_argument("--duration", type=int, default=60, help="seconds of load per router")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--session-ids", action="store_true", help="send session ids (routers may pin on them)")
    g = parser.add_argument_group("workload shape (each workload reads its own)")
    for name in WORKLOAD_FLAGS:
        g.add_argument("--" + name.replace("_", "-"), default=None, type=str if name == "trace" else
                       (float if name == "zipf" else int))
    parser.add_argument("--worker-timeout", type=float, default=600, help="seconds a worker may take to start")
    parser.add_argument("--progress-s", type=float, default=10, help="seconds between progress lines")
    parser.add_argument("--out", default="results/fleet", help="output folder")


def run(args: argparse.Namespace) -> int:
    try:
        return _run(args)
    except BenchError as exc:
        print(f"radixfleet bench fleet: {exc}", file=sys.stderr, flush=True)
        return 2


def _run(args: argparse.Namespace) -> int:
    validate(args)
    out = Path(args.out)
    logs = out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    notes: list[str] = []
    if args.router_url:
        routers = []
    else:
        routers, notes = resolve_routers([r.strip() for r in args.routers.split(",") if r.strip()])
    for note in notes:
        print(f"note: {note}", flush=True)
    fleet = (f"{len(args.worker_urls)} existing workers" if args.worker_urls
             else f"{args.workers} {args.executor} workers, model {args.model}"
             + (f", kv {args.kv_cache_tokens} tokens each" if args.kv_cache_tokens else "")
             + (f", mem-fraction {args.mem_fraction} each on GPU(s) {args.gpus}" if args.executor == "cuda" else ""))
    load = (f"{args.users} users, " + (f"open loop {args.rate}/s" if args.rate > 0 else "closed loop")
            + f", {args.duration}s per router, max_tokens {args.max_tokens}, seed {args.seed}")
    shape = {n: getattr(args, n) for n in WORKLOAD_FLAGS if getattr(args, n) is not None}
    workload = args.workload + (f" {shape}" if shape else "")
    setup = f"{fleet}; workload {workload}; {load}; {cpu_model()}, {os.cpu_count()} cores"
    print(f"fleet bench: {setup}", flush=True)
    failed_routers: list[str] = []
    if args.router_url:
        rows = [run_external_router(args.router_url, args, logs)]
    else:
        rows = []
        for name in routers:
            try:
                rows.append(run_router(name, args, logs, args.worker_urls))
            except BenchError as exc:  # one router that cannot run must not cost the others' figures
                print(f"  {name}: FAILED, left out of the table: {exc}", flush=True)
                notes.append(f"{name} failed: {exc}")
                failed_routers.append(name)
    if not rows:
        raise BenchError("no router to run: " + "; ".join(notes))
    print()
    print_table([{**r, "hit %": 100 * r["hit_rate"], "ttft p50 ms": _ms(r["ttft_p50_s"]),
                  "ttft p99 ms": _ms(r["ttft_p99_s"]), "itl p50 ms": _ms(r["itl_p50_s"])} for r in rows],
                ["router", "req_s", "output_tok_s", "ttft p50 ms", "ttft p99 ms", "itl p50 ms", "hit %",
                 "busiest_over_mean", "failed"], title=setup)
    for r in rows:
        print(f"  {r['router']}: per-worker requests {r['per_worker_requests']}, "
              f"prompt tokens {r['per_worker_prompt_tokens']}")
    payload = {"setup": setup, "notes": notes, "settings": vars(args), "rows": rows}
    write_json(out / "fleet.json", payload)
    write_csv(out / "fleet.csv", rows)
    plot(out / "fleet.png", rows, setup)
    print(f"wrote {out / 'fleet.json'}, {out / 'fleet.csv'}, {out / 'fleet.png'}")
    return 1 if failed_routers else 0


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else 1000 * seconds


if __name__ == "__main__":
    raise SystemExit(script_main(__doc__, add_arguments, run))
