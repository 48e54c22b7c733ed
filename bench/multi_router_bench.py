"""Several router replicas in front of the same sim workers: what it costs that each keeps its own trees.

For each workload, replica count R (1, 2, 4) and spread mode, in one run: a fresh sim fleet is started
(`radixfleet sim-fleet`, so caches start empty, KV small enough to be under pressure), R independent
`radixfleet router` processes in front of all its workers, and the same workload is spread over the
replicas from one asyncio client, as a Kubernetes Service or an ingress would:

* `request`: round-robin per request over the replicas (an L7 proxy or HTTP/2 ingress balancing per
  request; also what kube-proxy gives clients that open a connection per request). The worst case for
  agreement: consecutive turns of one conversation land on different replicas.
* `connection`: each conversation (or one-shot question) keeps the replica it started on, the replica
  picked round-robin: a client holding one keep-alive connection behind kube-proxy.
* `prefix-hash`: the replica is chosen by rendezvous hashing of the first --hash-chars characters of the
  request's routing text (what a prefix-aware ingress would do): every request that shares that opening
  (a document, a system prompt) meets the same replica, so that replica's trees see all of its traffic.

Workloads (no two share a request; both send X-Session-ID only where a client would):
* `doc-qa`: --docs documents of --doc-chars characters, one-shot questions about a document drawn at random;
  no session id. Size --docs x --doc-chars so the fleet's KV holds every document once but not R times:
  then what the replicas' disagreement costs shows as evictions.
* `chat`: --conversations multi-turn conversations of --turns turns over --system-prompts shared system
  prompts; the assistant's real reply is appended each turn, and X-Session-ID names the conversation.

Reported per run: fleet prefix-cache hit rate from the workers' own /load counters, req/s, TTFT p50/p99
(streamed; the first content chunk), busiest/mean requests per worker, and the routers' decisions by
reason summed over replicas. With --time-scale S the modelled GPU runs S times slower (for busy hosts);
latencies are then divided by S and req/s multiplied by S, so figures read as on the modelled GPU.

    radixfleet bench multi-router --sim-profile PROFILE.json [--workers 8] [--replicas 1,2,4] \
        [--spread request,prefix-hash] [--workloads doc-qa,chat] [--out results/multi_router]

Writes OUT.json and OUT.png. Loopback only; every run is bounded by --max-requests and --max-seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import xxhash

from bench.cache_hit_bench import build_system_prompts, read_worker_counters, stop, user_turn
from bench.plotting import bar_panels, format_table, script_main, write_report
from bench.router_bench import ROOT, cpu_model, free_port, percentile, wait_http
from router.policies import POLICY_NAMES
from router.request_parsing import chat_routing_text

WORKLOADS = ("doc-qa", "chat")
SPREADS = ("request", "connection", "prefix-hash")
MODEL = "llama3-8b"


# ---------------------------------------------------------------------- workloads (pure)
@dataclass
class Stream:
    """Requests a client sends one after another: a conversation's turns, or one question."""

    system: str
    user_turns: list[str]
    session_id: str | None = None


def doc_qa_streams(docs: int, doc_chars: int, questions: int, question_chars: int, seed: int) -> list[Stream]:
    rng = random.Random(seed)
    documents = [f"Document {d}. " + text for d, text in enumerate(build_system_prompts(docs, doc_chars, rng))]
    streams = []
    for q in range(questions):
        doc = rng.randrange(docs)
        streams.append(Stream(f"Answer from this document only.\n{documents[doc]}",
                              [user_turn(rng, q, 0, question_chars)]))
    return streams


def chat_streams(conversations: int, turns: int, system_prompts: int, system_chars: int, user_chars: int,
                 seed: int) -> list[Stream]:
    rng = random.Random(seed)
    systems = build_system_prompts(system_prompts, system_chars, rng)
    return [Stream(systems[c % system_prompts], [user_turn(rng, c, t, user_chars) for t in range(turns)],
                   session_id=f"conversation-{c}") for c in range(conversations)]


class ReplicaPicker:
    """Which replica a request goes to, per spread mode (see the module docstring)."""

    def __init__(self, spread: str, replicas: int, hash_chars: int = 256) -> None:
        if spread not in SPREADS:
            raise ValueError(f"unknown spread {spread!r}; choose from {', '.join(SPREADS)}")
        if replicas < 1:
            raise ValueError(f"need at least one replica, got {replicas}")
        self.spread = spread
        self.replicas = replicas
        self.hash_chars = hash_chars
        self._next = 0

    def _round_robin(self) -> int:
        index = self._next % self.replicas
        self._next += 1
        return index

    def start_stream(self) -> int | None:
        """Called once per stream: the replica a `connection` client keeps (None in other modes)."""
        return self._round_robin() if self.spread == "connection" else None

    def pick(self, messages: list[dict], stream_replica: int | None) -> int:
        if self.spread == "connection":
            return stream_replica
        if self.spread == "request":
            return self._round_robin()
        key = chat_routing_text(messages)[:self.hash_chars].encode()
        return max(range(self.replicas), key=lambda r: xxhash.xxh3_64_intdigest(key, seed=r))


# ---------------------------------------------------------------------- the client
@dataclass
class ClientResult:
    ttfts: list[float] = field(default_factory=list)
    requests: int = 0
    errors: int = 0
    per_replica: list[int] = field(default_factory=list)
    elapsed_s: float = 0.0
    stopped_by_deadline: bool = False


async def stream_chat(session: aiohttp.ClientSession, url: str, body: dict, headers: dict) -> tuple[float, str]:
    """POST a streamed chat request; returns (seconds to the first content chunk, the reply text)."""
    start = time.perf_counter()
    ttft = None
    pieces = []
    async with session.post(url + "/v1/chat/completions", json=body, headers=headers) as resp:
        if resp.status != 200:
            raise RuntimeError(f"HTTP {resp.status}: {(await resp.text())[:200]}")
        async for raw in resp.content:
            line = raw.strip()
            if not line.startswith(b"data:") or line == b"data: [DONE]":
                continue
            chunk = json.loads(line[5:])
            if "error" in chunk:
                raise RuntimeError(f"stream error: {chunk['error']}")
            for choice in chunk.get("choices") or ():
                text = (choice.get("delta") or {}).get("content")
                if text:
                    if ttft is None:
                        ttft = time.perf_counter() - start
                    pieces.append(text)
    return (ttft if ttft is not None else time.perf_counter() - start), "".join(pieces)


async def run_client(replica_urls: list[str], streams: list[Stream], picker: ReplicaPicker, *, concurrency: int,
                     max_tokens: int, max_requests: int, max_seconds: float, model: str = MODEL) -> ClientResult:
    """Play the streams, at most `concurrency` at once, stopping at max_requests sent or max_seconds."""
    result = ClientResult(per_replica=[0] * len(replica_urls))
    queue = list(reversed(streams))
    sent = 0
    deadline = time.perf_counter() + max_seconds

    async def client(session: aiohttp.ClientSession) -> None:
        nonlocal sent
        while queue:
            s = queue.pop()
            replica_of_stream = picker.start_stream()
            messages = [{"role": "system", "content": s.system}]
            headers = {"X-Session-ID": s.session_id} if s.session_id else {}
            for text in s.user_turns:
                if sent >= max_requests or time.perf_counter() >= deadline:
                    result.stopped_by_deadline = sent < max_requests
                    queue.clear()
                    return
                sent += 1
                messages.append({"role": "user", "content": text})
                replica = picker.pick(messages, replica_of_stream)
                result.per_replica[replica] += 1
                body = {"model": model, "messages": messages, "max_tokens": max_tokens, "temperature": 0,
                        "stream": True}
                try:
                    ttft, reply = await stream_chat(session, replica_urls[replica], body, headers)
                except (aiohttp.ClientError, asyncio.TimeoutError, RuntimeError, ValueError) as error:
                    result.errors += 1
                    if result.errors <= 3:
                        print(f"    request failed: {error}", file=sys.stderr, flush=True)
                    break  # a conversation whose turn failed cannot go on
                result.requests += 1
                result.ttfts.append(ttft)
                messages.append({"role": "assistant", "content": reply})

    timeout = aiohttp.ClientTimeout(total=max(60.0, max_seconds))
    connector = aiohttp.TCPConnector(limit=concurrency * 2)
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
        start = time.perf_counter()
        await asyncio.gather(*(client(session) for _ in range(concurrency)))
        result.elapsed_s = time.perf_counter() - start
    return result


# ---------------------------------------------------------------------- processes
def start_fleet(args, log: Path, urls_file: Path) -> tuple[subprocess.Popen, list[str]]:
    argv = [sys.executable, "-m", "worker.cli", "sim-fleet", "--workers", str(args.workers), "--base-port", "0",
            "--model", MODEL, "--sim-profile", str(args.sim_profile), "--kv-cache-tokens", str(args.kv_cache_tokens),
            "--time-scale", str(args.time_scale), "--urls-file", str(urls_file), "--report-s", "0", "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 300
    while not (urls_file.exists() and urls_file.read_text().strip()):
        if proc.poll() is not None:
            raise RuntimeError(f"sim-fleet exited with {proc.returncode}: {log.read_text()[-800:]}")
        if time.monotonic() > deadline:
            stop([proc])
            raise TimeoutError("sim-fleet did not come up in 300 s")
        time.sleep(0.2)
    urls = urls_file.read_text().split()
    for url in urls:
        wait_http(url + "/health", timeout_s=60, proc=proc)
    return proc, urls


def start_routers(worker_urls: list[str], replicas: int, policy: str, logs: Path, tag: str) -> tuple[list, list[str]]:
    procs, urls = [], []
    try:
        for r in range(replicas):
            port = free_port()
            argv = [sys.executable, "-m", "worker.cli", "router", "--worker-urls", *worker_urls, "--port", str(port),
                    "--host", "127.0.0.1", "--policy", policy, "--log-level", "WARNING"]
            procs.append(subprocess.Popen(argv, cwd=ROOT, stdout=(logs / f"{tag}_router{r}.log").open("wb"),
                                          stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": "1"}))
            urls.append(f"http://127.0.0.1:{port}")
        for url, proc in zip(urls, procs):
            wait_http(url + "/health", timeout_s=60, proc=proc)
    except BaseException:
        stop(procs)
        raise
    return procs, urls


def routing_reasons(router_urls: list[str]) -> dict[str, int]:
    """radixfleet_router_routing_decisions_total summed over replicas, by reason."""
    totals: dict[str, int] = {}
    pattern = re.compile(r'^radixfleet_router_routing_decisions_total\{[^}]*reason="([^"]+)"[^}]*\} ([0-9.e+]+)$',
                         re.M)
    for url in router_urls:
        try:
            with urllib.request.urlopen(url + "/metrics", timeout=5) as resp:
                text = resp.read().decode()
        except OSError:
            continue
        for reason, value in pattern.findall(text):
            totals[reason] = totals.get(reason, 0) + int(float(value))
    return totals


def summarize(workload: str, spread: str, replicas: int, policy: str, client: ClientResult, counters: list[dict],
              reasons: dict[str, int], time_scale: float) -> dict:
    hits = sum(c["cache_hit_tokens"] for c in counters)
    queries = sum(c["cache_query_tokens"] for c in counters)
    per_worker = [c["requests"] if c["requests"] is not None else c["cache_query_tokens"] for c in counters]
    mean = sum(per_worker) / len(per_worker) if per_worker else 0
    p50, p99 = percentile(client.ttfts, 50), percentile(client.ttfts, 99)
    return {
        "workload": workload, "spread": spread, "replicas": replicas, "policy": policy,
        "hit_rate": hits / queries if queries else 0.0,
        "cache_hit_tokens": hits, "cache_query_tokens": queries,
        "requests": client.requests, "errors": client.errors, "stopped_by_deadline": client.stopped_by_deadline,
        "elapsed_s": client.elapsed_s,
        "req_per_s": client.requests / client.elapsed_s * time_scale if client.elapsed_s else 0.0,
        "ttft_p50_s": p50 / time_scale if p50 is not None else None,
        "ttft_p99_s": p99 / time_scale if p99 is not None else None,
        "busiest_over_mean": max(per_worker) / mean if mean else 0.0,
        "per_worker_requests": per_worker, "per_replica_requests": client.per_replica,
        "routing_reasons": reasons,
    }


def run_one(args, workload: str, spread: str, replicas: int, streams: list[Stream], logs: Path) -> dict:
    tag = f"{args.policy}_{workload}_R{replicas}_{spread}"
    print(f"  {tag}: fresh fleet of {args.workers} sim workers, {replicas} router replica(s)", flush=True)
    with tempfile.TemporaryDirectory() as scratch:
        fleet, worker_urls = start_fleet(args, logs / f"{tag}_fleet.log", Path(scratch) / "urls")
        routers = []
        try:
            routers, router_urls = start_routers(worker_urls, replicas, args.policy, logs, tag)
            time.sleep(1.0)  # let every replica's first /load poll land (tree capacities from kv_tokens_total)
            client = asyncio.run(run_client(
                router_urls, streams, ReplicaPicker(spread, replicas, args.hash_chars),
                concurrency=args.concurrency, max_tokens=args.max_tokens, max_requests=args.max_requests,
                max_seconds=args.max_seconds))
            counters = [read_worker_counters(u) for u in worker_urls]
            reasons = routing_reasons(router_urls)
        finally:
            stop(routers)
            stop([fleet])
    row = summarize(workload, spread, replicas, args.policy, client, counters, reasons, args.time_scale)
    print(f"  {tag}: hit rate {row['hit_rate']:.1%}, {row['requests']} requests ({row['errors']} errors), "
          f"busiest/mean {row['busiest_over_mean']:.2f}", flush=True)
    return row


# ---------------------------------------------------------------------- report
COLUMNS = ("workload", "policy", "spread", "replicas", "hit_rate", "req_per_s", "ttft_p50_s", "ttft_p99_s",
           "busiest_over_mean", "requests", "errors")


def plot(rows: list[dict], path: Path, setup: str) -> None:
    panels = []
    for workload in dict.fromkeys(r["workload"] for r in rows):
        mine = [r for r in rows if r["workload"] == workload]
        replica_counts = sorted({r["replicas"] for r in mine})
        spreads = list(dict.fromkeys(r["spread"] for r in mine if r["replicas"] > 1)) or ["request"]
        by_key = {(r["spread"], r["replicas"]): r for r in mine}

        def series(metric: str, scale: float = 1.0) -> dict:
            out = {}
            for spread in spreads:
                values = []
                for n in replica_counts:
                    # one replica is the same run whatever the spread: it is measured once
                    row = by_key.get((spread, n)) or (next((r for r in mine if r["replicas"] == n), None)
                                                      if n == 1 else None)
                    values.append(row[metric] * scale if row and row[metric] is not None else None)
                out[spread] = values
            return out

        labels = [f"R={n}" for n in replica_counts]
        panels.append({"title": f"{workload}: fleet hit rate", "ylabel": "hit rate (%), worker counters",
                       "labels": labels, "series": series("hit_rate", 100)})
        panels.append({"title": f"{workload}: TTFT p50", "ylabel": "ms", "labels": labels,
                       "series": series("ttft_p50_s", 1000)})
        panels.append({"title": f"{workload}: busiest / mean worker", "ylabel": "requests ratio",
                       "labels": labels, "series": series("busiest_over_mean")})
    bar_panels(path, panels, "radixfleet: router replicas in front of the same sim workers", footnote=setup)


def parse_list(text: str, allowed: tuple | None, what: str) -> list[str]:
    items = [t.strip() for t in text.split(",") if t.strip()]
    if not items:
        raise ValueError(f"{what}: give at least one value")
    if allowed is not None:
        bad = [t for t in items if t not in allowed]
        if bad:
            raise ValueError(f"{what}: unknown {', '.join(bad)}; choose from {', '.join(allowed)}")
    return items


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--sim-profile", required=True,
                        help="sim cost-model profile (JSON from `radixfleet bench calibrate`, or a built-in name)")
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--kv-cache-tokens", type=int, default=4096, help="KV per worker: small, so caches evict")
    parser.add_argument("--time-scale", type=float, default=1.0, help="passed to sim-fleet (see its --help)")
    parser.add_argument("--policy", choices=POLICY_NAMES, default="cache_aware",
                        help="every replica's routing policy (session: rendezvous on X-Session-ID, stateless)")
    parser.add_argument("--replicas", default="1,2,4", help="router replica counts, comma separated")
    parser.add_argument("--spread", default="request,prefix-hash",
                        help=f"how the client spreads requests over replicas: {', '.join(SPREADS)}")
    parser.add_argument("--hash-chars", type=int, default=256, help="prefix-hash: characters of routing text hashed")
    parser.add_argument("--workloads", default="doc-qa,chat", help=f"comma separated: {', '.join(WORKLOADS)}")
    parser.add_argument("--docs", type=int, default=24)
    parser.add_argument("--doc-chars", type=int, default=3000)
    parser.add_argument("--questions", type=int, default=400)
    parser.add_argument("--question-chars", type=int, default=120)
    parser.add_argument("--conversations", type=int, default=96)
    parser.add_argument("--turns", type=int, default=4)
    parser.add_argument("--system-prompts", type=int, default=8)
    parser.add_argument("--system-chars", type=int, default=2000)
    parser.add_argument("--user-chars", type=int, default=200)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--concurrency", type=int, default=16, help="clients in flight at once")
    parser.add_argument("--max-requests", type=int, default=400, help="per run, at most this many requests")
    parser.add_argument("--max-seconds", type=float, default=120.0, help="per run, stop sending after this long")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="results/multi_router")


def run(args: argparse.Namespace) -> int:
    try:
        replica_counts = [int(n) for n in parse_list(args.replicas, None, "--replicas")]
        spreads = parse_list(args.spread, SPREADS, "--spread")
        workloads = parse_list(args.workloads, WORKLOADS, "--workloads")
        if any(n < 1 for n in replica_counts):
            raise ValueError("--replicas: every count must be at least 1")
        if args.workers < 1 or args.concurrency < 1 or args.max_requests < 1:
            raise ValueError("--workers, --concurrency and --max-requests must be at least 1")
        if args.time_scale <= 0:
            raise ValueError("--time-scale must be positive")
    except ValueError as error:
        print(f"radixfleet bench multi-router: {error}", file=sys.stderr)
        return 2
    profile = Path(args.sim_profile)
    if profile.suffix == ".json" and not profile.exists():
        print(f"radixfleet bench multi-router: no profile at {profile} (write one with `radixfleet bench "
              "calibrate` on a GPU, or give a built-in name)", file=sys.stderr)
        return 2
    if profile.exists():
        args.sim_profile = str(profile.resolve())

    workloads_desc = {
        "doc-qa": f"doc-qa: {args.docs} docs x {args.doc_chars} chars, {args.questions} one-shot questions",
        "chat": f"chat: {args.conversations} conversations x {args.turns} turns, {args.system_prompts} system "
                f"prompts x {args.system_chars} chars, X-Session-ID per conversation",
    }
    setup = (f"{args.workers} sim workers ({MODEL}, profile {Path(args.sim_profile).name}, KV {args.kv_cache_tokens} "
             f"tokens each, time scale {args.time_scale:g}), {args.policy} replicas; "
             + "; ".join(workloads_desc[w] for w in workloads)
             + f"; max_tokens {args.max_tokens}, {args.concurrency} in flight, <= {args.max_requests} requests/run; "
             f"prefix-hash on {args.hash_chars} chars; {cpu_model()}, {os.cpu_count()} cores")
    print(f"multi-router bench: {setup}", flush=True)
    out = Path(args.out)
    logs = out.parent / f"{out.name}_logs"
    logs.mkdir(parents=True, exist_ok=True)

    rows = []
    for workload in workloads:
        if workload == "doc-qa":
            streams = doc_qa_streams(args.docs, args.doc_chars, args.questions, args.question_chars, args.seed)
        else:
            streams = chat_streams(args.conversations, args.turns, args.system_prompts, args.system_chars,
                                   args.user_chars, args.seed)
        for replicas in replica_counts:
            # one replica sees everything whatever the spread: measure it once
            for spread in (spreads[:1] if replicas == 1 else spreads):
                rows.append(run_one(args, workload, spread, replicas, streams, logs))

    print()
    print(format_table(rows, COLUMNS, title=setup))
    print("hit rate: sum of the workers' cache_hit_tokens / cache_query_tokens (/load); TTFT and req/s in modelled "
          "time (divided / multiplied by the time scale); busiest/mean: requests per worker.")
    write_report(out, {"setup": setup, "settings": vars(args), "rows": rows}, lambda png: plot(rows, png, setup))
    return 0


if __name__ == "__main__":
    raise SystemExit(script_main(__doc__, add_arguments, run))
