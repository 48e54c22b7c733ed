"""Fleet benchmark: the same Locust workload through each router setting, on fresh workers each time.

For each router in --routers: N fresh workers are started (empty caches; --executor cpu, sim or cuda),
the router in front of them, then Locust headless (bench/locust/locustfile.py) with the same --seed, so
every router sees the same sessions. Hit rates come from the workers' own /load counters
(cache_hit_tokens / cache_query_tokens, deltas over the run), requests per worker from their /metrics.

    radixfleet bench fleet --workload docqa --workers 4 --kv-cache-tokens 8192 \
        --routers cache_aware,round_robin,least_load,sglang-router --users 16 --duration 60 --out results/fleet

Router names: our policies (cache_aware, round_robin, least_load, ...: `radixfleet router --policy X`),
sglang-router (`pip install sglang-router`; its cache_aware policy), vllm-router and smg (`pip install smg`, the
Shepherd Model Gateway that grew out of sglang-router; the same launch_router flags); a peer that is
not installed is skipped with a note. Peers re-serialize requests with fields of their own; those go
through a shim that drops any field the worker rejects by name (listed in the row's notes).

Several CUDA workers on one GPU (--executor cuda --workers 4 --gpus 0): they start one after another.
The CUDA executor sizes its pool as mem_fraction x the GPU's total memory minus everything already in
use on it (other workers included), and ignores --kv-cache-tokens; so worker i on a GPU is given the
cumulative fraction (i+1) x --mem-fraction, which leaves each worker about --mem-fraction of the GPU.

Many sim workers (--executor sim with --workers over 8, or --sim-host one-process): one fresh
`radixfleet sim-fleet` process per router setting holds them all (a process per worker does not fit a
2-core box at 128), its --urls-file feeding the router. `--time-scale S` slows every modelled step S times
for a host that cannot keep up (the sim-fleet's host_busy lines, kept in the row as sim_host_busy_pct, say
when): req/s are then multiplied and latencies divided by S, and each row records its time_scale.

Length of the load: --duration seconds, or for doc-QA until R requests per document have completed
(--requests-per-document R; the duration is then a cap), so that fleets of different sizes pay the same share
of cold misses; --warmup-requests-per-document W adds the hit rate past the first W x documents requests.

The router's added latency is measured during the same load (router_added_* in each row of our routers):
paired probes, TTFT through the router minus TTFT straight at the worker the router chose, beside a control
pair with no router in it (its spread is the noise floor), and the mean of the router's own
time_to_first_byte histogram minus the workers' time_to_first_token. These are host seconds, not scaled.
The router's own account of it (router_overhead_*): the delta over the run of its
radixfleet_router_overhead_seconds histogram (arrival to the upstream request sent, plus the worker's first
body byte to the client), p50 / p99 interpolated linearly within its buckets as Prometheus'
histogram_quantile does; the worker's noise is not in it, so it reads what the probes cannot on a busy host.

Writes DIR/fleet.json (rows keyed router, req_s, output_tok_s, ttft_p50_s, ttft_p99_s, itl_p50_s,
hit_rate, per_worker_requests, per_worker_prompt_tokens, busiest_over_mean, failed, router_added_p50_s,
router_added_p99_s, router_added_mean_s, router_overhead_p50_s, router_overhead_p99_s, time_scale), DIR/fleet.csv,
DIR/fleet.png, and per router the Locust CSVs and process logs under DIR/logs/.
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import json
import math
import os
import re
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

from bench.cache_hit_bench import FieldFilterShims, read_worker_counters, stop
from bench.locust.trace import TraceError, read_trace
from bench.locust.workloads import WORKLOADS
from bench.plotting import bar_panels, print_table, script_main, write_json
from bench.router_bench import (ROOT, STANDIN, cpu_model, free_port, load_average, percentile, pythonpath_with,
                                wait_http)

LOCUSTFILE = ROOT / "bench" / "locust" / "locustfile.py"
PEERS = {  # name -> (python module to look for, pip package)
    "sglang-router": ("sglang_router", "sglang-router"),
    "vllm-router": ("vllm_router", "vllm-router"),
    "smg": ("smg", "smg"),
}
PEER_LOG_LEVEL = {"sglang-router": "warn", "vllm-router": "warning", "smg": "warn"}  # each spells "warnings only" its own way
# Locust options passed through unchanged (see the locustfile's OPTION_DEFAULTS).
WORKLOAD_FLAGS = ("documents", "doc_chars", "zipf", "system_prompts", "system_chars", "turns", "user_chars",
                  "groups", "prompts_per_group", "prefix_chars", "question_chars", "trace")
ROW_KEYS = ("router", "req_s", "output_tok_s", "ttft_p50_s", "ttft_p99_s", "itl_p50_s", "e2e_p50_s", "hit_rate",
            "busiest_over_mean", "failed", "requests", "router_added_p50_s", "router_added_p99_s",
            "router_added_mean_s", "router_overhead_p50_s", "router_overhead_p99_s", "time_scale", "per_worker_requests", "per_worker_prompt_tokens")
SIM_PROCESS_PER_WORKER_MAX = 8  # --sim-host auto: more sim workers than this share one sim-fleet process
SIM_REPORT_S = 5  # seconds between the sim-fleet's host_busy lines


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


# --- one-process sim host --------------------------------------------------------------------------------

def one_process_sim(args) -> bool:
    """Run the sim workers as one `radixfleet sim-fleet` process (auto: when more than 8 of them)."""
    if args.executor != "sim":
        return False
    return args.sim_host == "one-process" or (args.sim_host == "auto" and args.workers > SIM_PROCESS_PER_WORKER_MAX)


def sim_fleet_argv(args, urls_file: Path) -> list[str]:
    argv = [sys.executable, "-m", "worker.cli", "sim-fleet", "--workers", str(args.workers), "--base-port", "0",
            "--host", "127.0.0.1", "--model", args.model, "--urls-file", str(urls_file),
            "--time-scale", f"{args.time_scale:g}", "--report-s", str(SIM_REPORT_S), "--no-progress"]
    if args.kv_cache_tokens:
        argv += ["--kv-cache-tokens", str(args.kv_cache_tokens)]
    return argv + (args.worker_arg or [])


def start_sim_fleet(args, logs: Path, tag: str) -> tuple[list[subprocess.Popen], list[str], Path]:
    """One fresh sim-fleet process (empty caches) and its worker URLs, read from its --urls-file."""
    urls_file = logs / f"{tag}_sim_fleet_urls.txt"
    urls_file.unlink(missing_ok=True)
    log_path = logs / f"{tag}_sim_fleet.log"
    argv = sim_fleet_argv(args, urls_file)
    proc = subprocess.Popen(argv, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"},
                            stdout=log_path.open("wb"), stderr=subprocess.STDOUT)
    deadline = time.monotonic() + args.worker_timeout
    while not (urls_file.exists() and urls_file.read_text().endswith("\n")):
        if proc.poll() is not None or time.monotonic() > deadline:
            stop([proc])
            why = f"exited with {proc.returncode}" if proc.returncode is not None else \
                f"was not up within --worker-timeout {args.worker_timeout:g} s"
            raise BenchError(f"sim-fleet ({' '.join(argv[3:])}) {why}; its log {log_path} ends: {log_tail(log_path)}")
        time.sleep(0.2)
    urls = urls_file.read_text().split()
    try:
        for url in urls:
            wait_http(url + "/health", timeout_s=60, proc=proc)
    except (RuntimeError, TimeoutError) as exc:
        stop([proc])
        raise BenchError(f"sim-fleet worker did not answer /health: {exc}; see {log_path}") from None
    print(f"    {len(urls)} sim workers ready in one process, {urls[0]} .. {urls[-1]}", flush=True)
    return [proc], urls, log_path


def cpu_seconds(proc: subprocess.Popen | None) -> float | None:
    """User + system CPU seconds a process has used so far (Linux /proc), None where unknown."""
    try:
        fields = Path(f"/proc/{proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (AttributeError, OSError, ValueError, IndexError):
        return None


def cpu_share(before: float | None, after: float | None, seconds: float) -> float | None:
    return None if before is None or after is None or seconds <= 0 else (after - before) / seconds


HOST_BUSY = re.compile(r"host_busy (\d+)% of one core")


def host_busy_during(log_path: Path, from_offset: int) -> list[int]:
    """The sim-fleet's host_busy figures (percent of one core spent in engine steps) printed after an offset."""
    try:
        with log_path.open("rb") as f:
            f.seek(from_offset)
            text = f.read().decode(errors="replace")
    except OSError:
        return []
    return [int(v) for v in HOST_BUSY.findall(text)]


# --- the router's added latency --------------------------------------------------------------------------
# Two measures, taken during the Locust run (so at the offered load):
#  * paired probes: a small streamed completion through the router, then the same-shaped one straight at the
#    worker the router picked (its X-Radixfleet-Worker header), then one more straight at it; the added
#    latency of a probe is TTFT via router minus TTFT direct. Same worker, moments apart: what differs is the
#    router's hop, plus the noise of landing in another engine step, which the control (second direct minus
#    first direct, no router in it) measures, so a reader can tell the router's share from that noise.
#  * histogram means over all the Locust requests: the router's own time_to_first_byte mean minus the workers'
#    time_to_first_token mean (exact means; Prometheus buckets are too coarse for millisecond quantiles). The
#    direct probes, which only the workers saw, are taken out of the workers' totals (their client-side TTFT,
#    a hop longer than the worker's own figure: close enough against thousands of Locust requests).
# Router work is not slowed by --time-scale, so these stay in host seconds (not divided by the scale).

PROBE_PROMPT_CHARS = 200


def probe_ttft(http, url: str, body: dict) -> tuple[float, str | None]:
    """(seconds to the first streamed event, the X-Radixfleet-Worker header) of one streamed completion."""
    started = time.perf_counter()
    with http.post(url + "/v1/completions", json=body, stream=True, timeout=120) as resp:
        if resp.status_code != 200:
            raise RuntimeError(f"HTTP {resp.status_code}: {resp.text[:200]}")
        for line in resp.iter_lines():
            if line.startswith(b"data:"):
                ttft = time.perf_counter() - started
                for _ in resp.iter_lines():  # drain, so the connection is reused
                    pass
                return ttft, resp.headers.get("X-Radixfleet-Worker")
    raise RuntimeError("the stream ended with no event")


class LatencyProbe(threading.Thread):
    """Paired probes (router vs direct, and direct vs direct as a control) until stopped."""

    def __init__(self, router_url: str, worker_urls: list[str], model: str, interval_s: float):
        super().__init__(daemon=True, name="router-latency-probe")
        self.router_url, self.worker_urls, self.model, self.interval_s = router_url, worker_urls, model, interval_s
        self.added: list[float] = []
        self.control: list[float] = []
        self.direct_ttfts: list[float] = []  # the probes the workers saw with no router in front
        self.sent_via_router = 0  # taken out of the router's request count (LoadGoal)
        self.errors = 0
        self._stopping = threading.Event()

    def body(self, n: int) -> dict:
        text = f"latency probe {n}: " + ("the quick brown fox jumps over the lazy dog " * 8)[:PROBE_PROMPT_CHARS]
        return {"model": self.model, "prompt": text, "max_tokens": 1, "temperature": 0, "stream": True}

    def run(self) -> None:
        import requests

        n = 0
        with requests.Session() as http:
            while not self._stopping.wait(self.interval_s):
                n += 1
                try:
                    self._pair(http, n)
                except (OSError, RuntimeError, ValueError, requests.RequestException):
                    self.errors += 1

    def _pair(self, http, n: int) -> None:
        self.sent_via_router += 1
        via_router, worker_id = probe_ttft(http, self.router_url, self.body(3 * n))
        index = worker_id[1:] if worker_id and worker_id.startswith("w") else ""
        if not index.isdigit() or int(index) >= len(self.worker_urls):
            raise ValueError(f"router answered with worker header {worker_id!r}")
        direct_url = self.worker_urls[int(index)]
        direct, _ = probe_ttft(http, direct_url, self.body(3 * n + 1))
        self.direct_ttfts.append(direct)
        direct_again, _ = probe_ttft(http, direct_url, self.body(3 * n + 2))
        self.direct_ttfts.append(direct_again)
        self.added.append(via_router - direct)  # one after the other on the same worker ...
        self.control.append(direct_again - direct)  # ... as this pair, which has no router in it

    def finish(self) -> None:
        self._stopping.set()
        self.join(timeout=130)


def histogram_totals(url: str, name: str) -> tuple[float, float]:
    """(sum, count) of histogram `name` in url's /metrics, added up over its labels; (0, 0) if absent."""
    with urllib.request.urlopen(url.rstrip("/") + "/metrics", timeout=10) as resp:
        text = resp.read().decode(errors="replace")
    totals = [0.0, 0.0]
    for line in text.splitlines():
        for i, suffix in enumerate(("_sum", "_count")):
            if line.startswith(name + suffix) and line[len(name) + len(suffix)] in " {":
                totals[i] += float(line.rsplit(" ", 1)[1])
    return totals[0], totals[1]


OVERHEAD_HISTOGRAM = "radixfleet_router_overhead_seconds"


def histogram_buckets(url: str, name: str) -> dict[float, float]:
    """Cumulative bucket counts {upper bound: count} of histogram `name` in url's /metrics, added up over its
    labels (+Inf as math.inf); {} if absent."""
    with urllib.request.urlopen(url.rstrip("/") + "/metrics", timeout=10) as resp:
        text = resp.read().decode(errors="replace")
    buckets: dict[float, float] = {}
    prefix = name + "_bucket{"
    for line in text.splitlines():
        if line.startswith(prefix):
            match = re.search(r'le="([^"]+)"', line)
            if match:
                bound = float(match.group(1))  # float() reads "+Inf" too
                buckets[bound] = buckets.get(bound, 0.0) + float(line.rsplit(" ", 1)[1])
    return buckets


def bucket_quantile(before: dict[float, float], after: dict[float, float], q: float) -> float | None:
    """The q-th percentile of the observations between two scrapes of a histogram, interpolated linearly
    within the bucket it falls in (from 0 below the first bound); past the last finite bound, that bound.
    None when nothing was observed."""
    bounds = sorted(after)
    counts = [after[b] - before.get(b, 0.0) for b in bounds]
    if not counts or counts[-1] <= 0:
        return None
    rank = q / 100 * counts[-1]
    lower, below = 0.0, 0.0
    for bound, count in zip(bounds, counts):
        if count >= rank:
            if math.isinf(bound):
                return lower
            return lower + (bound - lower) * ((rank - below) / (count - below) if count > below else 0.0)
        lower, below = bound, count
    return lower  # pragma: no cover - the +Inf bucket holds every observation


def router_overhead_figures(before: dict[float, float] | None, after: dict[float, float] | None) -> dict:
    """The router's own added seconds over the run, from its histogram's delta (our routers only)."""
    if not after:
        return {"router_overhead_p50_s": None, "router_overhead_p99_s": None, "router_overhead_requests": 0}
    before = before or {}
    return {"router_overhead_p50_s": bucket_quantile(before, after, 50),
            "router_overhead_p99_s": bucket_quantile(before, after, 99),
            "router_overhead_requests": int(after.get(math.inf, 0.0) - before.get(math.inf, 0.0))}


def ttft_means(router_url: str, worker_urls: list[str]) -> dict:
    """Histogram totals: the router's time to first byte and the workers' time to first token."""
    router = histogram_totals(router_url, "radixfleet_router_time_to_first_byte_seconds")
    workers = [histogram_totals(u, "radixfleet:time_to_first_token_seconds") for u in worker_urls]
    return {"router": router, "workers": (sum(w[0] for w in workers), sum(w[1] for w in workers))}


def router_added_figures(probe: LatencyProbe | None, before: dict | None, after: dict | None) -> dict:
    figures = {"router_added_p50_s": None, "router_added_p99_s": None, "router_added_probes": 0,
               "probe_control_p50_s": None, "probe_control_p99_s": None, "probe_errors": 0,
               "router_added_mean_s": None}
    if probe is not None:
        figures.update(router_added_p50_s=percentile(probe.added, 50), router_added_p99_s=percentile(probe.added, 99),
                       router_added_probes=len(probe.added), probe_control_p50_s=percentile(probe.control, 50),
                       probe_control_p99_s=percentile(probe.control, 99), probe_errors=probe.errors)
    if before and after:
        (rs, rc), (ws, wc) = [[a - b for a, b in zip(after[k], before[k])] for k in ("router", "workers")]
        if probe is not None:  # the direct probes reached the workers only: out of the workers' totals
            ws, wc = ws - sum(probe.direct_ttfts), wc - len(probe.direct_ttfts)
        if rc and wc:
            figures["router_added_mean_s"] = rs / rc - ws / wc
    return figures


# --- routers ---------------------------------------------------------------------------------------------

def router_argv(name: str, urls: list[str], port: int, args) -> list[str]:
    if name in PEERS:
        module = PEERS[name][0]
        return [sys.executable, "-m", f"{module}.launch_router", "--worker-urls", *urls, "--port", str(port),
                "--host", "127.0.0.1", "--policy", "cache_aware", "--log-level", PEER_LOG_LEVEL[name],
                "--prometheus-port", str(free_port())]
    extra = list(args.router_arg or [])
    if args.time_scale != 1.0 and not any(a.startswith("--health-interval") for a in extra):
        # Polls of /health and /load cost host time per worker that no time scale slows: at 128 workers, 1 s
        # apart, they outnumber the requests. Spaced S times wider they stay 1 s apart in modelled time.
        extra += ["--health-interval", f"{args.time_scale:g}"]
    return [sys.executable, "-m", "worker.cli", "router", "--worker-urls", *urls, "--port", str(port),
            "--host", "127.0.0.1", "--policy", name, "--log-level", "WARNING", *extra]


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


# --- a load measured in requests per document --------------------------------------------------------------
# In a fixed --duration a bigger fleet (or a slower host) serves fewer requests per document, and the first
# request for each document is a cold miss on every router: the hit rate then falls with N for a reason that
# has nothing to do with routing. --requests-per-document R ends the load once R x documents requests have
# completed, so every size pays the same share of cold misses; --warmup-requests-per-document W also reports
# the hit rate over the requests after the first W x documents (hit_rate_after_warmup: the steady state).

class LoadGoal:
    """When to snapshot the workers' counters (end of warm-up) and when to stop the load."""

    def __init__(self, documents: int, requests_per_document: float | None, warmup_per_document: float | None):
        self.target = None if requests_per_document is None else math.ceil(requests_per_document * documents)
        self.warmup = None if warmup_per_document is None else math.ceil(warmup_per_document * documents)
        self.count = None  # callable: requests completed since the load started
        self.warm_counters: list[dict] | None = None
        self.reached = False

    def watch(self, router_url: str, worker_urls: list[str], ours: bool, probe: "LatencyProbe | None") -> None:
        """Count completed requests from the router's own histogram (ours: one scrape, whatever the fleet
        size; the latency probes sent through it taken out), else from the workers' (peers)."""
        if ours:
            def completed() -> float:
                sent = probe.sent_via_router if probe is not None else 0
                return histogram_totals(router_url, "radixfleet_router_request_duration_seconds")[1] - sent
        else:
            def completed() -> float:
                total = [c["requests"] for c in counters(worker_urls)]
                if any(r is None for r in total):
                    raise BenchError("--requests-per-document needs request counts in the workers' /metrics")
                return sum(total)
        start = completed()
        self.count = lambda: completed() - start

    def check(self, worker_urls: list[str]) -> bool:
        """Called during the load; True once the load should stop."""
        if self.count is None or self.reached:
            return self.reached
        done = self.count()
        if self.warmup is not None and self.warm_counters is None and done >= self.warmup:
            self.warm_counters = counters(worker_urls)
        if self.target is not None and done >= self.target:
            self.reached = True
        return self.reached


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


def watch_goal(goal: LoadGoal, proc: subprocess.Popen, urls: list[str], start: float) -> None:
    """Checks the goal every half second while locust runs; stops locust once it is reached."""
    while proc.poll() is None:
        time.sleep(0.5)
        try:
            reached = goal.check(urls)
        except (OSError, ValueError, BenchError) as exc:  # a missed check is retried; the run goes on
            print(f"    load goal: check failed ({exc}); retrying", flush=True)
            continue
        if reached:
            proc.terminate()  # locust stops its users and writes the samples as on -t
            print(f"    {time.monotonic() - start:5.0f}s  {goal.target} requests done: stopping", flush=True)
            return


def run_locust(args, host: str, urls: list[str], logs: Path, tag: str, goal: LoadGoal | None = None) -> dict:
    samples_path = logs / f"{tag}_samples.json"
    log_path = logs / f"{tag}_locust.log"
    proc = subprocess.Popen(locust_argv(args, host, logs / f"{tag}_locust", samples_path), cwd=ROOT,
                            env={**os.environ, "PYTHONPATH": pythonpath_with(ROOT)}, stdout=log_path.open("wb"),
                            stderr=subprocess.STDOUT)
    start = time.monotonic()
    before = counters(urls)
    next_report = start + args.progress_s
    watcher = None
    if goal is not None:
        # its own thread: a progress line reads every worker's counters, which at 128 loaded sim workers
        # takes tens of seconds, and the stop must not wait for that
        watcher = threading.Thread(target=watch_goal, args=(goal, proc, urls, start), daemon=True, name="load-goal")
        watcher.start()
    while proc.poll() is None:
        time.sleep(0.5)
        if time.monotonic() >= next_report and proc.poll() is None:
            next_report += args.progress_s
            hits, queries = hit_totals(before, counters(urls))
            rate = f"{100 * hits / queries:.1f}%" if queries else "-"
            done = f", {goal.count():.0f}/{goal.target} requests" if goal is not None and goal.target else ""
            print(f"    {time.monotonic() - start:5.0f}/{args.duration}s  hit rate so far {rate}{done}", flush=True)
        if time.monotonic() - start > args.duration + 120:
            proc.kill()
            raise BenchError(f"locust did not finish within {args.duration + 120}s; see {log_path}")
    if watcher is not None:
        watcher.join(timeout=60)
    if not samples_path.exists():
        raise BenchError(f"locust exited with {proc.returncode} and wrote no samples: {log_tail(log_path)} "
                         f"(full log: {log_path})")
    return json.loads(samples_path.read_text())


# --- figures ---------------------------------------------------------------------------------------------

def hit_totals(before: list[dict], after: list[dict]) -> tuple[int, int]:
    hits = sum(a["cache_hit_tokens"] - b["cache_hit_tokens"] for a, b in zip(after, before))
    queries = sum(a["cache_query_tokens"] - b["cache_query_tokens"] for a, b in zip(after, before))
    return hits, queries


def summarize(router: str, samples: dict, before: list[dict], after: list[dict], notes: list[str],
              time_scale: float = 1.0) -> dict:
    """One row. Under a sim --time-scale S every modelled step lasted S times longer: rates are multiplied
    by S and latencies divided by S, back to the modelled GPU's time (the row's time_scale says S)."""
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

    def modelled(seconds: float | None) -> float | None:
        return None if seconds is None else seconds / time_scale

    return {
        "router": router,
        "req_s": len(good) / elapsed * time_scale,
        "output_tok_s": sum(s[2] for s in good) / elapsed * time_scale,
        "ttft_p50_s": modelled(percentile([s[0] for s in by_name.get("ttft", [])], 50)),
        "ttft_p99_s": modelled(percentile([s[0] for s in by_name.get("ttft", [])], 99)),
        "itl_p50_s": modelled(percentile([s[0] for s in by_name.get("itl", [])], 50)),
        "e2e_p50_s": modelled(percentile([s[0] for s in good], 50)),
        "time_scale": time_scale,
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


def per_document_figures(args, row: dict, goal: LoadGoal | None, after: list[dict]) -> dict:
    """Requests per document, and the hit rate past the warm-up when one was asked for."""
    figures = {"requests_per_document": row["requests"] / args.documents if args.documents else None,
               "hit_rate_after_warmup": None, "requests_goal_reached": None}
    if goal is not None:
        figures["requests_goal_reached"] = goal.reached if goal.target is not None else None
        if goal.warm_counters is not None:
            hits, queries = hit_totals(goal.warm_counters, after)
            figures["hit_rate_after_warmup"] = hits / queries if queries else None
    return figures


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
    if any(r["router_added_p99_s"] is not None for r in rows):
        panels.append({"title": "router added latency (paired probes)", "ylabel": "ms", "labels": labels,
                       "series": {"p50": [_ms(r["router_added_p50_s"]) for r in rows],
                                  "p99": [_ms(r["router_added_p99_s"]) for r in rows],
                                  "control p99": [_ms(r["probe_control_p99_s"]) for r in rows]}})
    if any(r["router_overhead_p99_s"] is not None for r in rows):
        panels.append({"title": "router overhead (its own histogram, bucket-interpolated)", "ylabel": "ms",
                       "labels": labels, "series": {"p50": [_ms(r["router_overhead_p50_s"]) for r in rows],
                                                    "p99": [_ms(r["router_overhead_p99_s"]) for r in rows]}})
    bar_panels(path, panels, "radixfleet bench fleet", footnote=setup)


# --- the run ---------------------------------------------------------------------------------------------

def run_router(name: str, args, logs: Path, external_urls: list[str] | None) -> dict:
    tag = name.replace("/", "_")
    notes: list[str] = []
    workers: list[subprocess.Popen] = []
    router = shims = probe = None
    sim_log: Path | None = None
    means_before = means_after = overhead_before = overhead_after = None
    try:
        if external_urls:
            urls = external_urls
            notes.append("existing workers (--worker-urls): caches were not emptied; counters are deltas")
        elif one_process_sim(args):
            print(f"  {name}: starting {args.workers} fresh sim workers in one sim-fleet process", flush=True)
            workers, urls, sim_log = start_sim_fleet(args, logs, tag)
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
        router_url = f"http://127.0.0.1:{port}"
        ours = name not in PEERS  # peers have no worker header and no time_to_first_byte histogram
        if ours:
            overhead_before = histogram_buckets(router_url, OVERHEAD_HISTOGRAM)
        if ours and args.probe_interval_s > 0:
            means_before = ttft_means(router_url, urls)
            probe = LatencyProbe(router_url, urls, args.served_model or args.model, args.probe_interval_s)
            probe.start()
        goal = None
        if args.requests_per_document is not None or args.warmup_requests_per_document is not None:
            goal = LoadGoal(args.documents, args.requests_per_document, args.warmup_requests_per_document)
            goal.watch(router_url, urls, ours, probe)
        sim_log_offset = sim_log.stat().st_size if sim_log else 0
        # CPU the router and the one-process sim host used during the load (a share of one core each)
        host_proc = workers[0] if sim_log else None
        cpu_before = (cpu_seconds(router), cpu_seconds(host_proc), time.monotonic())
        print(f"  {name}: locust {args.workload}, {args.users} users"
              + (f", {args.rate}/s open loop" if args.rate > 0 else ", closed loop") + f", {args.duration}s",
              flush=True)
        samples = run_locust(args, router_url, urls, logs, tag, goal)
        cpu_after = (cpu_seconds(router), cpu_seconds(host_proc), time.monotonic())
        if probe is not None:
            probe.finish()
            means_after = ttft_means(router_url, urls)
        if ours:
            overhead_after = histogram_buckets(router_url, OVERHEAD_HISTOGRAM)
        after = counters(urls)
        load_after = load_average()
    finally:
        if probe is not None:
            probe.finish()
        if router is not None:
            stop([router])
        if shims is not None:
            if shims.dropped:
                notes.append(f"shim dropped fields the workers reject: {', '.join(sorted(shims.dropped))}")
            shims.close()
        stop(workers)
    row = summarize(name, samples, before, after, notes, args.time_scale)
    row.update(router_added_figures(probe, means_before, means_after))
    row.update(router_overhead_figures(overhead_before, overhead_after))
    row.update(per_document_figures(args, row, goal, after))
    # On a shared machine other work moves every figure: record how busy it was around the run.
    row["load_average_before_after"] = [load_before, load_after]
    elapsed = cpu_after[2] - cpu_before[2]
    row["router_cpu_share"] = cpu_share(cpu_before[0], cpu_after[0], elapsed)
    if sim_log is not None:
        row["sim_host_cpu_share"] = cpu_share(cpu_before[1], cpu_after[1], elapsed)
    if sim_log is not None:
        # Percent of one core the sim engines' steps took, per report line during the load: near 100 the
        # host could not keep up with the modelled GPU, and a larger --time-scale is needed.
        row["sim_host_busy_pct"] = host_busy_during(sim_log, sim_log_offset)
    added, overhead = row["router_added_p99_s"], row["router_overhead_p99_s"]
    print(f"  {name}: {row['req_s']:.2f} req/s, hit rate {100 * row['hit_rate']:.1f}%, "
          f"{row['failed']} failed" + (f", router added p99 {1000 * added:.1f} ms" if added is not None else "")
          + (f", router overhead p99 {1000 * overhead:.2f} ms" if overhead is not None else "")
          + (f", sim host_busy {row['sim_host_busy_pct']}%, sim-fleet process {_pct(row['sim_host_cpu_share'])} "
             f"of a core" if sim_log is not None else "")
          + f", router process {_pct(row['router_cpu_share'])} of a core", flush=True)
    return row


def run_external_router(url: str, args, logs: Path) -> dict:
    check_reachable(url, "router")
    urls = args.worker_urls or []
    before = counters(urls) if urls else []
    samples = run_locust(args, url.rstrip("/"), urls, logs, "external")
    after = counters(urls) if urls else []
    notes = [] if urls else ["no --worker-urls: hit rate and per-worker figures unknown"]
    return {**summarize(f"external {url}", samples, before, after, notes), **router_added_figures(None, None, None),
            **router_overhead_figures(None, None)}


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
    if args.time_scale != 1.0 and not one_process_sim(args):
        raise BenchError(f"--time-scale {args.time_scale:g} needs sim workers in one process: add --executor sim "
                         "--sim-host one-process")
    if not args.time_scale > 0:
        raise BenchError(f"--time-scale must be positive, got {args.time_scale:g}")
    per_document = [(flag, v) for flag, v in (("--requests-per-document", args.requests_per_document),
                                              ("--warmup-requests-per-document", args.warmup_requests_per_document))
                    if v is not None]
    for flag, value in per_document:
        if args.workload != "docqa" or not args.documents:
            raise BenchError(f"{flag} needs --workload docqa with --documents D (requests are counted per document)")
        if not value > 0:
            raise BenchError(f"{flag} must be positive, got {value:g}")
        if args.router_url:
            raise BenchError(f"{flag} needs routers the bench starts (not --router-url)")
    if (args.requests_per_document is not None and args.warmup_requests_per_document is not None
            and args.warmup_requests_per_document >= args.requests_per_document):
        raise BenchError("--warmup-requests-per-document must be below --requests-per-document")
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
                        help="comma-separated: our policies and/or sglang-router, vllm-router, smg")
    parser.add_argument("--workload", default="docqa", help=f"one of {', '.join(WORKLOADS)}")
    parser.add_argument("--users", type=int, default=16, help="Locust users (closed loop: sessions in flight)")
    parser.add_argument("--spawn-rate", type=float, default=None, help="users started per second (default: all)")
    parser.add_argument("--rate", type=float, default=0.0, help="open loop: sessions per second (0: closed loop)")
    parser.add_argument("--duration", type=int, default=60, help="seconds of load per router")
    parser.add_argument("--requests-per-document", type=float, default=None, metavar="R",
                        help="docqa: end the load once R x --documents requests have completed (--duration "
                             "stays the cap), so fleets of any size pay the same share of cold misses")
    parser.add_argument("--warmup-requests-per-document", type=float, default=None, metavar="W",
                        help="docqa: also report the hit rate over the requests after the first W x --documents "
                             "(hit_rate_after_warmup)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--session-ids", action="store_true", help="send session ids (routers may pin on them)")
    g = parser.add_argument_group("workload shape (each workload reads its own)")
    for name in WORKLOAD_FLAGS:
        g.add_argument("--" + name.replace("_", "-"), default=None, type=str if name == "trace" else
                       (float if name == "zipf" else int))
    parser.add_argument("--sim-host", default="auto", choices=("auto", "one-process", "per-worker"),
                        help="sim: all workers in one `radixfleet sim-fleet` process, or a process per worker "
                             f"(auto: one process when more than {SIM_PROCESS_PER_WORKER_MAX} workers)")
    parser.add_argument("--time-scale", type=float, default=1.0, metavar="S",
                        help="sim one-process: every modelled step S times slower, for a host that cannot keep up "
                             "(req/s are multiplied and latencies divided by S in the report)")
    parser.add_argument("--probe-interval-s", type=float, default=0.5,
                        help="seconds between router-vs-direct latency probes during the load (0: none)")
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
             + (f", mem-fraction {args.mem_fraction} each on GPU(s) {args.gpus}" if args.executor == "cuda" else "")
             + ((f", one sim-fleet process, time scale {args.time_scale:g} (figures converted back to modelled "
                 "time; router added latency in host time)") if one_process_sim(args) else ""))
    load = (f"{args.users} users, " + (f"open loop {args.rate}/s" if args.rate > 0 else "closed loop")
            + f", {args.duration}s per router"
            + (f" (or until {args.requests_per_document:g} requests per document)" if args.requests_per_document else "")
            + (f", hit rate also past {args.warmup_requests_per_document:g} requests per document"
               if args.warmup_requests_per_document else "")
            + f", max_tokens {args.max_tokens}, seed {args.seed}")
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
                  "ttft p99 ms": _ms(r["ttft_p99_s"]), "itl p50 ms": _ms(r["itl_p50_s"]),
                  "added p50 ms": _ms(r["router_added_p50_s"]), "added p99 ms": _ms(r["router_added_p99_s"]),
                  "control p99 ms": _ms(r["probe_control_p99_s"]), "overhead p50 ms": _ms(r["router_overhead_p50_s"]),
                  "overhead p99 ms": _ms(r["router_overhead_p99_s"])} for r in rows],
                ["router", "req_s", "output_tok_s", "ttft p50 ms", "ttft p99 ms", "itl p50 ms", "hit %",
                 "busiest_over_mean", "failed", "added p50 ms", "added p99 ms", "control p99 ms", "overhead p50 ms",
                 "overhead p99 ms"], title=setup)
    if any(r["router_overhead_p99_s"] is not None for r in rows):
        print("  overhead: the router's own radixfleet_router_overhead_seconds over the run (arrival to upstream "
              "sent + first body byte to client), p50/p99 interpolated within its buckets; added/control: probes")
    for r in rows:
        print(f"  {r['router']}: per-worker requests {r['per_worker_requests']}, "
              f"prompt tokens {r['per_worker_prompt_tokens']}")
    payload = {"setup": setup, "notes": notes, "settings": vars(args), "rows": rows}
    write_json(out / "fleet.json", payload)
    write_csv(out / "fleet.csv", rows)
    plot(out / "fleet.png", rows, setup)
    print(f"wrote {out / 'fleet.json'}, {out / 'fleet.csv'}, {out / 'fleet.png'}")
    return 1 if failed_routers else 0


def _pct(share: float | None) -> str:
    return "?" if share is None else f"{100 * share:.0f}%"


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else 1000 * seconds


if __name__ == "__main__":
    raise SystemExit(script_main(__doc__, add_arguments, run))
