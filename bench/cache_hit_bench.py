"""Cache hits by router: multi-turn chat with shared system prompts in front of N workers.

For each router setting, in one run: fresh workers are started (empty caches), the router in front
of them, and the same workload is replayed: C conversations, each opening with one of S shared system
prompts and growing turn by turn (the assistant's real reply is appended, as chat clients do), at
most K conversations in flight. No session ids are sent: placement must come from the prompts.
Reported per router: prefix-cache hit rate from the workers' own /load counters
(cache_hit_tokens / cache_query_tokens), requests and prompt tokens per worker, busiest/mean load.

    .venv/bin/python -m bench.cache_hit_bench [--workers 4] [--conversations 32] [--turns 4]
    .venv/bin/python -m bench.cache_hit_bench --standin   # instant stand-in workers (simulated cache)

Writes results/cache_hit_bench.json and .png. The peer (sglang-router, cache_aware with its defaults)
is skipped with a note when the package is missing.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import os
import random
import re
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import aiohttp

from bench.plotting import script_main, write_report
from bench.router_bench import ROOT, STANDIN, cpu_model, free_port, wait_http

WORDS = ("answer question system careful detail context history policy router worker cache prefix token model "
         "reply summary example explain describe compare list reason step result value").split()


def build_system_prompts(n: int, chars: int, rng: random.Random) -> list[str]:
    prompts = []
    for i in range(n):
        words = []
        while sum(len(w) + 1 for w in words) < chars:
            words.append(rng.choice(WORDS))
        prompts.append(f"You are assistant number {i}. " + " ".join(words))
    return prompts


def user_turn(rng: random.Random, conversation: int, turn: int, chars: int) -> str:
    words = [rng.choice(WORDS) for _ in range(chars // 7)]
    return f"(conversation {conversation}, turn {turn}) " + " ".join(words) + "?"


async def run_workload(base_url: str, args, model: str) -> dict:
    rng = random.Random(args.seed)
    systems = build_system_prompts(args.system_prompts, args.system_chars, rng)
    plans = []
    for c in range(args.conversations):
        plans.append((systems[c % len(systems)],
                      [user_turn(rng, c, t, args.user_chars) for t in range(args.turns)]))
    semaphore = asyncio.Semaphore(args.concurrency)
    errors = 0
    latencies = []

    async def conversation(session: aiohttp.ClientSession, system: str, turns: list[str]) -> None:
        nonlocal errors
        async with semaphore:
            messages = [{"role": "system", "content": system}]
            for text in turns:
                messages.append({"role": "user", "content": text})
                body = {"model": model, "messages": messages, "max_tokens": args.max_tokens, "temperature": 0}
                start = time.perf_counter()
                try:
                    async with session.post(base_url + "/v1/chat/completions", json=body) as resp:
                        data = await resp.json(content_type=None)
                        if resp.status != 200:
                            errors += 1
                            return
                except (aiohttp.ClientError, asyncio.TimeoutError):
                    errors += 1
                    return
                latencies.append(time.perf_counter() - start)
                messages.append({"role": "assistant", "content": data["choices"][0]["message"]["content"]})

    timeout = aiohttp.ClientTimeout(total=600)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        start = time.perf_counter()
        await asyncio.gather(*(conversation(session, s, t) for s, t in plans))
        elapsed = time.perf_counter() - start
    latencies.sort()
    return {"errors": errors, "elapsed_s": elapsed, "requests": len(latencies),
            "p50_latency_s": latencies[len(latencies) // 2] if latencies else None}


def read_worker_counters(url: str) -> dict:
    with urllib.request.urlopen(url + "/load", timeout=5) as resp:
        load = json.load(resp)
    requests = None
    try:
        with urllib.request.urlopen(url + "/metrics", timeout=5) as resp:
            text = resp.read().decode()
        m = re.search(r"^radixfleet:e2e_request_latency_seconds_count(?:\{[^}]*\})? ([0-9.e+]+)$", text, re.M)
        if m:
            requests = int(float(m.group(1)))
    except OSError:
        pass
    return {"cache_hit_tokens": load["cache_hit_tokens"], "cache_query_tokens": load["cache_query_tokens"],
            "requests": requests}


class FieldFilterShims:
    """Per worker, a pass-through proxy that drops request fields the worker rejects as unknown.

    sglang-router re-serializes every request with SGLang-only fields (no_stop_trim,
    separate_reasoning, ...); an OpenAI-strict worker answers those with 400. The shim retries
    without the field the worker named, remembers it, and passes everything else through
    untouched, so the peer can be measured on the same workers. It runs on its own thread; it only
    sits in front of the peer, and hit rates and per-worker loads are read from the workers themselves.
    """

    def __init__(self, worker_urls: list[str]) -> None:
        import threading

        self.worker_urls = worker_urls
        self.dropped: set[str] = set()
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.urls = asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(30)

    async def _start(self) -> list[str]:
        from aiohttp import web

        self.session = aiohttp.ClientSession()
        self.runners = []
        urls = []
        for target in self.worker_urls:
            app = web.Application(client_max_size=64 * 1024 * 1024)
            app.router.add_route("*", "/{tail:.*}", self._handler(target))
            runner = web.AppRunner(app, access_log=None)
            await runner.setup()
            site = web.TCPSite(runner, "127.0.0.1", 0)
            await site.start()
            self.runners.append(runner)
            urls.append(f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}")
        return urls

    def _handler(self, target: str):
        from aiohttp import web

        async def handle(request: web.Request) -> web.Response:
            raw = await request.read()
            body = None
            if request.method == "POST" and raw:
                try:
                    body = json.loads(raw)
                except ValueError:
                    body = None
            for _ in range(20):
                if isinstance(body, dict):
                    for field in self.dropped:
                        body.pop(field, None)
                    raw = json.dumps(body).encode()
                async with self.session.request(request.method, target + request.path_qs, data=raw or None,
                                                headers={"Content-Type": "application/json"}) as resp:
                    data = await resp.read()
                    if resp.status == 400 and isinstance(body, dict):
                        try:
                            param = json.loads(data)["error"]["param"]
                        except (ValueError, KeyError, TypeError):
                            param = None
                        if isinstance(param, str) and param in body:  # (a concurrent request may have added it)
                            self.dropped.add(param)
                            continue
                    return web.Response(status=resp.status, body=data,
                                        content_type=resp.headers.get("Content-Type", "application/json")
                                        .split(";")[0])
            return web.Response(status=502, text="shim: too many rejected fields")

        return handle

    def close(self) -> None:
        async def stop():
            for runner in self.runners:
                await runner.cleanup()
            await self.session.close()

        asyncio.run_coroutine_threadsafe(stop(), self.loop).result(30)
        self.loop.call_soon_threadsafe(self.loop.stop)


def start_workers(args, logs: Path, tag: str) -> tuple[list[subprocess.Popen], list[str]]:
    procs, urls = [], []
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    for i in range(args.workers):
        port = free_port()
        if args.standin:
            argv = [sys.executable, str(STANDIN), "--port", str(port), "--name", f"w{i}",
                    "--kv-tokens", str(args.standin_kv_tokens)]
        else:
            argv = [sys.executable, "-m", "worker.cli", "worker", "--model", args.model, "--device", "cpu",
                    "--port", str(port), "--log-level", "warning"]
        log = (logs / f"{tag}_worker{i}.log").open("wb")
        procs.append(subprocess.Popen(argv, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT))
        urls.append(f"http://127.0.0.1:{port}")
    for url, proc in zip(urls, procs):
        wait_http(url + "/health", timeout_s=300, proc=proc)
    return procs, urls


def stop(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        if p.poll() is None:
            p.terminate()
    for p in procs:
        try:
            p.wait(15)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def run_one(name: str, router_argv, args, logs: Path, shim: bool = False) -> dict:
    tag = name.replace(" ", "_")
    print(f"  {name}: starting {args.workers} fresh workers", flush=True)
    workers, urls = start_workers(args, logs, tag)
    router = None
    shims = None
    try:
        port = free_port()
        if shim:
            shims = FieldFilterShims(urls)
        argv = router_argv(shims.urls if shims else urls, port)
        router = subprocess.Popen(argv, cwd=ROOT, stdout=(logs / f"{tag}_router.log").open("wb"),
                                  stderr=subprocess.STDOUT)
        wait_http(f"http://127.0.0.1:{port}/health", timeout_s=60, proc=router)
        time.sleep(1.5)  # let the router's first /load polls land
        print(f"  {name}: {args.conversations} conversations x {args.turns} turns", flush=True)
        model = "standin-model" if args.standin else args.model
        result = asyncio.run(run_workload(f"http://127.0.0.1:{port}", args, model))
        counters = [read_worker_counters(u) for u in urls]
    finally:
        if router is not None:
            stop([router])
        if shims is not None:
            if shims.dropped:
                print(f"  {name}: shim dropped fields the worker rejects: {sorted(shims.dropped)}")
            shims.close()
        stop(workers)
    hits = sum(c["cache_hit_tokens"] for c in counters)
    queries = sum(c["cache_query_tokens"] for c in counters)
    per_worker_requests = [c["requests"] for c in counters]
    per_worker_tokens = [c["cache_query_tokens"] for c in counters]
    load_basis = per_worker_requests if all(r is not None for r in per_worker_requests) else per_worker_tokens
    mean = sum(load_basis) / len(load_basis)
    return {"router": name, **result, "hit_rate": hits / queries if queries else 0.0,
            "cache_hit_tokens": hits, "cache_query_tokens": queries,
            "per_worker_requests": per_worker_requests, "per_worker_prompt_tokens": per_worker_tokens,
            "busiest_over_mean": max(load_basis) / mean if mean else 0.0}


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    names = [r["router"] for r in rows]
    ax1.bar(names, [100 * r["hit_rate"] for r in rows], color="tab:green")
    ax1.set_ylabel("prefix-cache hit rate (%) from worker counters")
    ax1.tick_params(axis="x", labelsize=7)
    width = 0.8 / max(1, len(rows))
    n_workers = len(rows[0]["per_worker_prompt_tokens"])
    for k, r in enumerate(rows):
        basis = r["per_worker_requests"] if all(x is not None for x in r["per_worker_requests"]) \
            else r["per_worker_prompt_tokens"]
        ax2.bar([i + k * width for i in range(n_workers)], basis, width=width, label=r["router"])
    ax2.set_xticks([i + 0.4 - width / 2 for i in range(n_workers)], [f"worker {i}" for i in range(n_workers)])
    ax2.set_ylabel("requests per worker")
    ax2.legend(fontsize=7)
    fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--model", default="demo")
    parser.add_argument("--standin", action="store_true", help="instant stand-in workers with a simulated cache")
    parser.add_argument("--standin-kv-tokens", type=int, default=65536)
    parser.add_argument("--conversations", type=int, default=32)
    parser.add_argument("--turns", type=int, default=4)
    parser.add_argument("--system-prompts", type=int, default=4)
    parser.add_argument("--system-chars", type=int, default=1500)
    parser.add_argument("--user-chars", type=int, default=200)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--concurrency", type=int, default=8, help="conversations in flight at once")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-peer", action="store_true")
    parser.add_argument("--out", default="results/cache_hit_bench")


def run(args: argparse.Namespace) -> int:

    def ours(policy: str):
        return lambda urls, port: [sys.executable, "-m", "worker.cli", "router", "--worker-urls", *urls,
                                   "--port", str(port), "--host", "127.0.0.1", "--policy", policy,
                                   "--log-level", "WARNING"]

    routers = [("radixfleet cache_aware", ours("cache_aware"), False),
               ("radixfleet round_robin", ours("round_robin"), False)]
    if not args.skip_peer:
        if importlib.util.find_spec("sglang_router") is None:
            print("sglang-router not installed: peer skipped (.venv/bin/pip install sglang-router)")
        else:
            routers.append(("sglang-router cache_aware", lambda urls, port: [
                sys.executable, "-m", "sglang_router.launch_router", "--worker-urls", *urls, "--port", str(port),
                "--host", "127.0.0.1", "--policy", "cache_aware", "--log-level", "warn",
                "--prometheus-port", str(free_port())], not args.standin))
    workers_desc = "stand-in workers (simulated prefix cache)" if args.standin else \
        f"CPU workers on model {args.model}"
    setup = (f"{args.workers} {workers_desc}; {args.conversations} conversations x {args.turns} turns, "
             f"{args.system_prompts} shared system prompts of {args.system_chars} chars, {args.user_chars}-char "
             f"user turns, max_tokens {args.max_tokens}, {args.concurrency} conversations in flight; {cpu_model()}, "
             f"{os.cpu_count()} cores")
    print(f"cache-hit bench: {setup}", flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    logs = out.parent / "cache_hit_bench_logs"
    logs.mkdir(exist_ok=True)
    rows = [run_one(name, make_argv, args, logs, shim) for name, make_argv, shim in routers]

    header = f"{'router':<27} {'hit rate':>8} {'busiest/mean':>12} {'requests per worker':>24} {'errors':>6} {'time s':>7}"
    print()
    print(setup)
    print(header)
    print("-" * len(header))
    for r in rows:
        per = r["per_worker_requests"] if all(x is not None for x in r["per_worker_requests"]) \
            else r["per_worker_prompt_tokens"]
        print(f"{r['router']:<27} {100 * r['hit_rate']:>7.1f}% {r['busiest_over_mean']:>12.2f} "
              f"{str(per):>24} {r['errors']:>6} {r['elapsed_s']:>7.1f}")
    print("hit rate: sum of workers' cache_hit_tokens / cache_query_tokens (from /load). "
          "Target: cache_aware beats round_robin, matches or beats the peer, busiest/mean <= 1.25.")
    write_report(out, {"setup": setup, "settings": vars(args), "rows": rows},
                 lambda png: plot(rows, png, setup))
    return 0



if __name__ == "__main__":
    raise SystemExit(script_main(__doc__, add_arguments, run))
