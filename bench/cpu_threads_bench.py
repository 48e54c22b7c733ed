"""CPU workers and their torch thread pools: requests `radixfleet up` serves in N seconds, with each
worker's threads sized to its share of the cores (what `up` does) against every worker using all cores.

    .venv/bin/python -m bench.cpu_threads_bench --seconds 20

Starts `radixfleet up --device cpu` on the demo model once per setting (127.0.0.1 only), sends chat
requests from `--concurrency` client threads for `--seconds`, and prints a table and a JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

from worker.server.cli import usable_cores
from worker.server.launcher import free_port


def _post(url: str, body: dict, timeout: float = 120) -> dict:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.load(response)


def _wait_up(proc: subprocess.Popen, port: int, timeout_s: float = 300) -> None:
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise RuntimeError(f"radixfleet up exited with code {proc.returncode}; its log: {proc.args[-1]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise TimeoutError("radixfleet up did not become healthy")


def measure(cpu_threads: str, workers: int, seconds: float, concurrency: int, max_tokens: int) -> dict:
    port, base = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    cmd = [sys.executable, "-m", "worker.cli", "up", "--device", "cpu", "--num-workers", str(workers),
           "--host", "127.0.0.1", "--port", str(port), "--worker-base-port", str(base), "--log-level", "warning"]
    if cpu_threads != "share":
        cmd += ["--cpu-threads", cpu_threads]
    log = tempfile.NamedTemporaryFile(prefix="cpu-threads-bench-up-", suffix=".log", delete=False)
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                            start_new_session=True)
    try:
        _wait_up(proc, port)
        url = f"http://127.0.0.1:{port}/v1/chat/completions"
        _post(url, {"model": "demo", "max_tokens": 2, "messages": [{"role": "user", "content": "warm up"}]})
        done, tokens, errors = [0], [0], [0]
        lock = threading.Lock()
        deadline = time.monotonic() + seconds

        def client(i: int) -> None:
            n = 0
            while time.monotonic() < deadline:
                n += 1
                body = {"model": "demo", "max_tokens": max_tokens, "ignore_eos": True,
                        "messages": [{"role": "user", "content": f"client {i} request {n}: tell me a story"}]}
                try:
                    answer = _post(url, body)
                except OSError:
                    with lock:
                        errors[0] += 1
                    continue
                if time.monotonic() <= deadline:
                    with lock:
                        done[0] += 1
                        tokens[0] += answer["usage"]["completion_tokens"]

        threads = [threading.Thread(target=client, args=(i,)) for i in range(concurrency)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return {"cpu_threads": cpu_threads, "requests": done[0], "output_tokens": tokens[0], "errors": errors[0],
                "req_per_s": round(done[0] / seconds, 2)}
    finally:
        proc.terminate()
        try:
            proc.wait(90)
        except subprocess.TimeoutExpired:
            proc.kill()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--settings", default=f"share,{usable_cores()}",
                        help="comma-separated: 'share' (up's default: cores / workers each) or a thread count")


def run(args: argparse.Namespace) -> int:
    cores = usable_cores()
    setup = (f"{platform.processor() or platform.machine()}, {cores} usable cores; radixfleet up, {args.workers} CPU "
             f"workers on demo; {args.concurrency} clients, chat, max_tokens {args.max_tokens} (ignore_eos); "
             f"{args.seconds:.0f} s per setting")
    print(f"cpu threads bench: {setup}", flush=True)
    rows = [measure(s, args.workers, args.seconds, args.concurrency, args.max_tokens) for s in args.settings.split(",")]
    print(f"{'threads per worker':>20} {'requests':>9} {'req/s':>7} {'tokens':>7} {'errors':>7}")
    for r in rows:
        label = f"share ({max(1, cores // args.workers)})" if r["cpu_threads"] == "share" else r["cpu_threads"]
        print(f"{label:>20} {r['requests']:>9} {r['req_per_s']:>7} {r['output_tokens']:>7} {r['errors']:>7}")
    print(json.dumps({"setup": setup, "results": rows}))
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_arguments(parser)
    sys.exit(run(parser.parse_args()))
