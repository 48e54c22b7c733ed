"""Router overhead: requests/s on one core and added latency, radixfleet vs sglang-router, same stand-ins.

Setup (printed with the results): K instant stand-in workers (bench/standin_worker.py --fast) and the
load generator share one core; the router under test is pinned alone to another core (taskset-style
affinity), so "requests/s on one core" is the router's own. Each router is measured:
  * latency: open loop at --rate req/s (non-streaming chat, ~1 KB prompts) for --seconds; latency is
    taken from each request's scheduled start (no coordinated omission). Added latency = router
    percentile - the same percentile measured directly against a stand-in in the same run.
  * throughput: closed loop, --concurrency connections, for --seconds.

    .venv/bin/python -m bench.router_bench [--rate 1000] [--seconds 10] [--workers 4]

Writes results/router_bench.json and results/router_bench.png. The peer router is skipped (with a
note) when the `sglang_router` package is not installed (.venv/bin/pip install sglang-router).
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import math
import os
import platform
import random
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from bench.plotting import script_main, write_report

ROOT = Path(__file__).resolve().parent.parent
STANDIN = Path(__file__).resolve().parent / "standin_worker.py"

WORDS = "alpha beta gamma delta router cache prefix token worker latency batch queue kernel tensor".split()


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (q in [0, 100]) of the benchmarks' samples; None with no values."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, min(len(ordered), math.ceil(q * len(ordered) / 100)))
    return ordered[rank - 1]


def pythonpath_with(tree: Path) -> str:
    """PYTHONPATH with a radixfleet source tree first and whatever it already held (e.g. wheels) after it."""
    return os.pathsep.join(p for p in (str(tree), os.environ.get("PYTHONPATH", "")) if p)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def spawn(argv: list[str], cpus: set[int] | None, log: Path) -> subprocess.Popen:
    def pin() -> None:
        if cpus:
            os.sched_setaffinity(0, cpus)

    return subprocess.Popen(argv, stdout=log.open("wb"), stderr=subprocess.STDOUT, preexec_fn=pin, cwd=ROOT,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})


def wait_http(url: str, timeout_s: float = 60, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process for {url} exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=1) as resp:
                if resp.status == 200:
                    return
        except OSError:
            time.sleep(0.1)
    raise TimeoutError(f"{url} not healthy after {timeout_s}s")


def start_standins(n: int, cpus: set[int], logs: Path, procs: list[subprocess.Popen]) -> list[str]:
    """Start n fast stand-in workers on `cpus` (appended to `procs`, for the caller to stop); their urls."""
    urls = []
    started = []
    for i in range(n):
        port = free_port()
        started.append(spawn([sys.executable, str(STANDIN), "--port", str(port), "--fast"], cpus,
                             logs / f"standin{i}.log"))
        procs.append(started[-1])
        urls.append(f"http://127.0.0.1:{port}")
    for url, proc in zip(urls, started):
        wait_http(url + "/health", proc=proc)
    return urls


def make_payloads(n: int, prompt_bytes: int, seed: int = 0) -> list[bytes]:
    """Chat requests of about prompt_bytes of message text: 4 shared system prompts + varied questions."""
    rng = random.Random(seed)

    def words(n_chars: int) -> str:
        out = []
        size = 0
        while size < n_chars:
            w = rng.choice(WORDS)
            out.append(w)
            size += len(w) + 1
        return " ".join(out)

    systems = [f"System prompt {i}: " + words(prompt_bytes // 2) for i in range(4)]
    payloads = []
    for i in range(n):
        body = {"model": "standin-model", "max_tokens": 16, "messages": [
            {"role": "system", "content": systems[i % 4]},
            {"role": "user", "content": f"question {i}: " + words(prompt_bytes // 2)}]}
        payloads.append(json.dumps(body).encode())
    return payloads


def http_request_bytes(host: str, port: int, body: bytes) -> bytes:
    return (f"POST /v1/chat/completions HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode() + body


class Connection:
    """One keep-alive HTTP/1.1 connection with a minimal response reader (Content-Length or chunked)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, host: str, port: int) -> "Connection":
        reader, writer = await asyncio.open_connection(host, port)
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return cls(reader, writer)

    async def roundtrip(self, raw: bytes) -> int:
        self.writer.write(raw)
        head = await self.reader.readuntil(b"\r\n\r\n")
        status = int(head[9:12])
        lower = head.lower()
        pos = lower.find(b"content-length:")
        if pos >= 0:
            end = lower.find(b"\r\n", pos)
            await self.reader.readexactly(int(lower[pos + 15:end]))
        elif b"transfer-encoding: chunked" in lower:
            while True:
                size = int((await self.reader.readuntil(b"\r\n")).split(b";")[0], 16)
                await self.reader.readexactly(size + 2)
                if size == 0:
                    break
        return status

    def close(self) -> None:
        self.writer.close()


async def closed_loop(host: str, port: int, payloads: list[bytes], concurrency: int, seconds: float) -> dict:
    raws = [http_request_bytes(host, port, p) for p in payloads]
    conns = [await Connection.open(host, port) for _ in range(concurrency)]
    done = 0
    errors = 0
    stop_at = time.perf_counter() + seconds

    async def loop(conn: Connection, offset: int) -> None:
        nonlocal done, errors
        i = offset
        while time.perf_counter() < stop_at:
            status = await conn.roundtrip(raws[i % len(raws)])
            i += concurrency
            if status == 200:
                done += 1
            else:
                errors += 1

    start = time.perf_counter()
    await asyncio.gather(*(loop(c, k) for k, c in enumerate(conns)))
    elapsed = time.perf_counter() - start
    for c in conns:
        c.close()
    return {"requests_per_s": done / elapsed, "errors": errors}


async def open_loop(host: str, port: int, payloads: list[bytes], rate: float, seconds: float) -> dict:
    """Send at a fixed rate; latency from each request's scheduled time."""
    raws = [http_request_bytes(host, port, p) for p in payloads]
    idle: list[Connection] = [await Connection.open(host, port) for _ in range(16)]
    latencies: list[float] = []
    errors = 0
    total = int(rate * seconds)
    tasks = []

    async def one(i: int, scheduled: float) -> None:
        nonlocal errors
        conn = idle.pop() if idle else await Connection.open(host, port)
        status = await conn.roundtrip(raws[i % len(raws)])
        latencies.append(time.perf_counter() - scheduled)
        if status != 200:
            errors += 1
        idle.append(conn)

    loop = asyncio.get_running_loop()
    start = time.perf_counter() + 0.05
    for i in range(total):
        scheduled = start + i / rate
        delay = scheduled - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(loop.create_task(one(i, scheduled)))
    await asyncio.gather(*tasks)
    achieved = total / (time.perf_counter() - start)
    for c in idle:
        c.close()
    latencies.sort()

    def pct(p: float) -> float:
        return latencies[min(len(latencies) - 1, int(p / 100 * len(latencies)))] * 1000

    return {"p50_ms": pct(50), "p90_ms": pct(90), "p99_ms": pct(99), "mean_ms": sum(latencies) / len(latencies) * 1000,
            "errors": errors, "achieved_rate": achieved, "n": len(latencies)}


def process_tree_cpu_s(pid: int) -> float:
    """CPU seconds (user + system, all threads) used so far by a process and its descendants."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0.0
    stack = [pid]
    while stack:
        p = stack.pop()
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / ticks
            for task in Path(f"/proc/{p}/task").iterdir():
                children = (task / "children").read_text().split()
                stack.extend(int(c) for c in children)
        except (OSError, IndexError, ValueError):
            continue
    return total


def load_average() -> float:
    try:
        return float(Path("/proc/loadavg").read_text().split()[0])
    except (OSError, ValueError):
        return float("nan")


def measure(name: str, port: int, payloads: list[bytes], args, pid: int | None) -> dict:
    """Latency (open loop) and throughput (closed loop) of one target; CPU used by the router process."""
    print(f"  {name}: warm-up", flush=True)
    asyncio.run(closed_loop("127.0.0.1", port, payloads, 8, 1.0))
    load_before = load_average()
    print(f"  {name}: open loop at {args.rate:.0f} req/s for {args.seconds:.0f}s", flush=True)
    latency = asyncio.run(open_loop("127.0.0.1", port, payloads, args.rate, args.seconds))
    print(f"  {name}: closed loop, {args.concurrency} connections, {args.seconds:.0f}s", flush=True)
    cpu_before = process_tree_cpu_s(pid) if pid else 0.0
    start = time.perf_counter()
    throughput = asyncio.run(closed_loop("127.0.0.1", port, payloads, args.concurrency, args.seconds))
    elapsed = time.perf_counter() - start
    row = {"target": name, "machine_load_avg": load_before, **latency, **throughput}
    if pid:
        cpu = process_tree_cpu_s(pid) - cpu_before
        done = throughput["requests_per_s"] * elapsed
        row["router_cpu_share"] = cpu / elapsed  # < 1 when the router's core was shared with others
        row["cpu_us_per_request"] = cpu / max(done, 1) * 1e6
        row["requests_per_cpu_s"] = done / max(cpu, 1e-9)
    return row


def median_row(samples: list[dict]) -> dict:
    """Per-metric median over repeated measurements of one target (keeps every sample too)."""
    row = {"target": samples[0]["target"], "repeats": len(samples), "samples": samples}
    for key, value in samples[0].items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            values = sorted(s[key] for s in samples)
            row[key] = values[len(values) // 2]
    return row


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    routers = [r for r in rows if r["target"] != "direct (no router)"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    names = [r["target"] for r in routers]
    x = range(len(routers))
    ax1.bar([i - 0.2 for i in x], [r["added_p50_ms"] for r in routers], width=0.4, label="added p50")
    ax1.bar([i + 0.2 for i in x], [r["added_p99_ms"] for r in routers], width=0.4, label="added p99")
    ax1.axhline(1.0, color="tab:blue", linestyle=":", linewidth=1, label="p50 target 1 ms")
    ax1.axhline(5.0, color="tab:orange", linestyle=":", linewidth=1, label="p99 target 5 ms")
    ax1.set_xticks(list(x), names, fontsize=8)
    ax1.set_ylabel("added latency (ms)")
    ax1.legend(fontsize=7)
    ax2.bar(list(x), [r["requests_per_s"] for r in routers], color="tab:green")
    ax2.axhline(3000, color="gray", linestyle=":", linewidth=1, label="target 3,000 req/s")
    ax2.set_xticks(list(x), names, fontsize=8)
    ax2.set_ylabel("requests/s (router on one core)")
    ax2.legend(fontsize=7)
    fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--rate", type=float, default=1000.0)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--prompt-bytes", type=int, default=1024)
    parser.add_argument("--policies", nargs="+", default=["cache_aware", "round_robin"])
    parser.add_argument("--skip-peer", action="store_true")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved rounds; medians are reported")
    parser.add_argument("--router-cpu", type=int, default=0, help="core the router under test is pinned to")
    parser.add_argument("--out", default="results/router_bench")


def run(args: argparse.Namespace) -> int:

    ncpu = os.cpu_count() or 1
    router_cpus = {args.router_cpu % ncpu}
    other_cpus = ({c for c in range(ncpu) if c not in router_cpus} or router_cpus) if ncpu > 1 else {0}
    os.sched_setaffinity(0, other_cpus)  # the load generator shares the stand-ins' core
    payloads = make_payloads(256, args.prompt_bytes)
    setup = (f"{cpu_model()}, {ncpu} cores; router pinned to core {sorted(router_cpus)[0]}; {args.workers} fast stand-in workers + "
             f"load generator on core {sorted(other_cpus)}; non-streaming chat, ~{len(payloads[0])} B bodies; "
             f"python {platform.python_version()}; {args.seconds:.0f}s per phase")
    print(f"router bench: {setup}", flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    logs = out.parent / "router_bench_logs"
    logs.mkdir(exist_ok=True)
    procs: list[subprocess.Popen] = []
    router_procs: list[subprocess.Popen] = []
    try:
        worker_urls = start_standins(args.workers, other_cpus, logs, procs)
        direct_port = int(worker_urls[0].rsplit(":", 1)[1])
        targets = [(f"radixfleet {p}", [sys.executable, "-m", "worker.cli", "router", "--worker-urls", *worker_urls,
                                        "--policy", p, "--log-level", "WARNING", "--host", "127.0.0.1"])
                   for p in args.policies]
        if not args.skip_peer:
            if importlib.util.find_spec("sglang_router") is None:
                print("  sglang-router not installed: peer skipped (.venv/bin/pip install sglang-router)")
            else:
                targets.append(("sglang-router cache_aware",
                                [sys.executable, "-m", "sglang_router.launch_router", "--worker-urls", *worker_urls,
                                 "--policy", "cache_aware", "--log-level", "warn", "--host", "127.0.0.1",
                                 "--prometheus-port", str(free_port())]))
        # All routers run side by side (idle ones cost nothing) and are measured in interleaved rounds,
        # so a burst of load from elsewhere on the machine cannot land on one router only.
        live = [("direct (no router)", direct_port, None)]
        for name, argv_base in targets:
            port = free_port()
            proc = spawn(argv_base + ["--port", str(port)], router_cpus, logs / f"{name.replace(' ', '_')}.log")
            router_procs.append(proc)
            wait_http(f"http://127.0.0.1:{port}/health", proc=proc)
            live.append((name, port, proc.pid))
        time.sleep(1.0)
        samples: dict[str, list[dict]] = {name: [] for name, _, _ in live}
        for round_index in range(args.repeats):
            print(f" round {round_index + 1}/{args.repeats}", flush=True)
            for name, port, pid in live:
                samples[name].append(measure(name, port, payloads, args, pid))
        rows = [median_row(samples[name]) for name, _, _ in live]
    finally:
        for proc in router_procs + procs:
            proc.terminate()
        for proc in router_procs + procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()

    base = rows[0]
    for r in rows:
        r["added_p50_ms"] = r["p50_ms"] - base["p50_ms"]
        r["added_p99_ms"] = r["p99_ms"] - base["p99_ms"]
    peer = next((r for r in rows if r["target"].startswith("sglang")), None)
    header = (f"{'target':<27} {'rate':>5} {'p50 ms':>7} {'p99 ms':>7} {'+p50 ms':>8} {'+p99 ms':>8} "
              f"{'req/s':>6} {'cpu share':>9} {'cpu us/req':>10} {'req/cpu-s':>9} {'vs peer':>7} {'load':>5}")
    print()
    print(setup)
    print(header)
    print("-" * len(header))
    for r in rows:
        ratio = (f"{r['requests_per_cpu_s'] / peer['requests_per_cpu_s']:.2f}x"
                 if peer and "requests_per_cpu_s" in r else "-")
        cpu = (f"{r['router_cpu_share']:>9.2f} {r['cpu_us_per_request']:>10.0f} {r['requests_per_cpu_s']:>9.0f}"
               if "requests_per_cpu_s" in r else f"{'-':>9} {'-':>10} {'-':>9}")
        print(f"{r['target']:<27} {r['achieved_rate']:>5.0f} {r['p50_ms']:>7.2f} {r['p99_ms']:>7.2f} "
              f"{r['added_p50_ms']:>8.2f} {r['added_p99_ms']:>8.2f} {r['requests_per_s']:>6.0f} {cpu} {ratio:>7} "
              f"{r['machine_load_avg']:>5.1f}" + (f"  errors {r['errors']}" if r["errors"] else ""))
    print(f"medians of {args.repeats} interleaved rounds. req/s: closed loop, wall clock. req/cpu-s: the same requests per CPU-second the router process used "
          "(its one-core capacity, robust to other load on the machine); vs peer compares that.\n"
          "targets: added p50 <= 1 ms and p99 <= 5 ms at 1,000 req/s; >= 3,000 req/s on one core. "
          "'direct' req/s is the load generator + stand-in ceiling; load = machine load average.")
    write_report(out, {"setup": setup, "settings": vars(args), "rows": rows},
                 lambda png: plot(rows, png, setup))
    return 0



if __name__ == "__main__":
    raise SystemExit(script_main(__doc__, add_arguments, run))
