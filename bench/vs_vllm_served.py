"""The served half of `radixfleet bench vs-vllm`: each engine as an OpenAI server, the same doc-QA stream.

For each engine in turn: start its HTTP server on the checkpoint folder (vLLM's
`vllm.entrypoints.openai.api_server`, our `radixfleet worker`; both take the same vLLM-style flags), time
how long it takes to answer `/v1/models`, send a few warm-up requests, then the timed stream: `--requests`
streamed chat requests, `--concurrency` in flight (closed loop), each one of `--documents` shared
documents (Zipf `--zipf` popularity, bench/locust/workloads.py's DocQA) plus a distinct question,
`--max-tokens` output tokens with ignore_eos, at `--temperature`. Then the server is stopped (its whole
process group) before the next one starts, so each has the GPU to itself.

TTFT is taken at the first streamed event that carries text (vLLM sends an empty role delta first),
ITL per text event, req/s = completed requests / wall time of the stream.
"""

from __future__ import annotations

import asyncio
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from bench.locust.streaming import StreamReader, StreamResult, sse_data
from bench.locust.workloads import DocQA
from bench.router_bench import percentile, pythonpath_with

WARMUP_REQUESTS = 4


def add_served_arguments(parser) -> None:
    g = parser.add_argument_group("served mode (--modes served)")
    g.add_argument("--requests", type=int, default=768, help="streamed chat requests in the timed stream")
    g.add_argument("--concurrency", type=int, default=64, help="requests in flight (closed loop)")
    g.add_argument("--documents", type=int, default=48)
    g.add_argument("--doc-chars", type=int, default=16000, help="characters per document (~3.5k tokens)")
    g.add_argument("--zipf", type=float, default=0.8)
    g.add_argument("--max-tokens", type=int, default=32)
    g.add_argument("--temperature", type=float, default=0.6)
    g.add_argument("--server-timeout", type=float, default=600, help="seconds a server may take to start")


# ---------------------------------------------------------------------- servers
def server_command(engine: str, tree: Path, folder: Path, port: int, args, extra: list[str]) -> tuple[list, dict, str]:
    """(argv, env, cwd) of one engine's OpenAI server; `extra` are flags from `engine[...]`."""
    common = ["--port", str(port), "--gpu-memory-utilization", str(args.mem_fraction),
              "--max-model-len", str(args.max_model_len), "--max-num-seqs", str(args.max_num_seqs),
              "--seed", str(args.seed)]
    if args.max_num_batched_tokens:
        common += ["--max-num-batched-tokens", str(args.max_num_batched_tokens)]
    env = dict(os.environ)
    if engine == "vllm":
        env.update(PYTHONPATH=args.vllm_path, HF_HUB_OFFLINE="1")
        env.setdefault("VLLM_USE_FLASHINFER_SAMPLER", "0")
        argv = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(folder), *common]
        return argv + extra, env, tempfile.gettempdir()
    env["PYTHONPATH"] = pythonpath_with(tree)
    argv = [sys.executable, "-m", "worker.cli", "worker", "--model", str(folder), *common]
    return argv + extra, env, str(tree)


def _ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "/v1/models", timeout=2) as resp:
            return resp.status == 200
    except OSError:
        return False


def start_server(argv, env, cwd, log_path: Path, url: str, timeout_s: float) -> tuple[subprocess.Popen, float]:
    """Spawn in its own process group (vLLM forks an engine core) and wait for /v1/models."""
    t0 = time.perf_counter()
    log = open(log_path, "w")
    proc = subprocess.Popen(argv, env=env, cwd=cwd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    while time.perf_counter() - t0 < timeout_s:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before it was ready; see {log_path}")
        if _ready(url):
            return proc, time.perf_counter() - t0
        time.sleep(0.5)
    stop_server(proc)
    raise TimeoutError(f"server not ready after {timeout_s:.0f} s; see {log_path}")


def stop_server(proc: subprocess.Popen) -> None:
    if proc.poll() is not None:
        return
    for sig, wait_s in ((signal.SIGTERM, 30), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(wait_s)
            break
        except subprocess.TimeoutExpired:
            continue
    time.sleep(2)  # let the GPU memory of forked children go before the next server starts


# ---------------------------------------------------------------------- load
def chat_body(session, model: str, args) -> dict:
    return {"model": model, "messages": [{"role": "system", "content": session.system},
                                         {"role": "user", "content": session.user_turns[0]}],
            "max_tokens": args.max_tokens, "temperature": args.temperature, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}


async def one_request(http, url: str, body: dict) -> StreamResult:
    import orjson

    reader = StreamReader()
    result = reader.result
    try:
        async with http.post(url + "/v1/chat/completions", json=body) as resp:
            if resp.status != 200:
                result.error = f"HTTP {resp.status}: {(await resp.text())[:200]}"
                return result
            async for raw in resp.content:
                data = sse_data(raw)
                if data is None:
                    continue
                if data == b"[DONE]":
                    break
                if not reader.feed(orjson.loads(data)):
                    return result
        result.ok = result.ttft_s is not None
        if not result.ok:
            result.error = "stream carried no text"
    except Exception as exc:  # noqa: BLE001 - a failed request is counted, not fatal
        result.error = f"{type(exc).__name__}: {exc}"
    finally:
        reader.finish()
    return result


async def run_stream(url: str, model: str, args) -> tuple[list[StreamResult], float]:
    import aiohttp

    workload = DocQA(args.seed, args.max_tokens, documents=args.documents, doc_chars=args.doc_chars, zipf=args.zipf)
    timeout = aiohttp.ClientTimeout(total=600)
    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=0)) as http:
        warm = DocQA(args.seed + 1000, 8, documents=1, doc_chars=400, zipf=0.0)
        for i in range(WARMUP_REQUESTS):
            await one_request(http, url, {**chat_body(warm.session(i), model, args), "max_tokens": 8})
        indices = iter(range(args.requests))
        samples: list[StreamResult] = []

        async def user() -> None:
            for index in indices:
                samples.append(await one_request(http, url, chat_body(workload.session(index), model, args)))

        t0 = time.perf_counter()
        await asyncio.gather(*(user() for _ in range(args.concurrency)))
        return samples, time.perf_counter() - t0


def summarize(label: str, samples: list[StreamResult], wall_s: float, startup_s: float) -> dict:
    ok = [s for s in samples if s.ok]
    ttft = [s.ttft_s for s in ok]
    itl = [g for s in ok for g in s.itl_s]
    cached = [s.cached_tokens for s in ok if s.cached_tokens is not None]
    errors = sorted({s.error for s in samples if not s.ok and s.error})
    return {"engine": label, "requests": len(samples), "failed": len(samples) - len(ok),
            "req_s": len(ok) / wall_s, "output_tok_s": sum(s.completion_tokens or 0 for s in ok) / wall_s,
            "ttft_p50_s": percentile(ttft, 50), "ttft_p90_s": percentile(ttft, 90), "ttft_p99_s": percentile(ttft, 99),
            "itl_p50_s": percentile(itl, 50), "e2e_p50_s": percentile([s.e2e_s for s in ok], 50),
            "mean_cached_tokens": statistics.fmean(cached) if cached else None,
            "startup_s": startup_s, "wall_s": wall_s, "errors": errors[:5]}


def run_engine(label: str, engine: str, tree: Path, folder: Path, args, extra: list[str], port: int,
               logs: Path) -> dict:
    argv, env, cwd = server_command(engine, tree, folder, port, args, extra)
    url = f"http://127.0.0.1:{port}"
    print(f"=== served {label}: {' '.join(argv[1:4])} ... (log {logs / (_safe(label) + '.log')})", flush=True)
    proc, startup_s = start_server(argv, env, cwd, logs / f"{_safe(label)}.log", url, args.server_timeout)
    try:
        print(f"    ready after {startup_s:.1f} s; {args.requests} requests, {args.concurrency} in flight", flush=True)
        samples, wall_s = asyncio.run(run_stream(url, str(folder), args))
    finally:
        stop_server(proc)
    row = summarize(label, samples, wall_s, startup_s)
    print(f"    {row['req_s']:.1f} req/s, TTFT p50/p99 {row['ttft_p50_s'] or 0:.3f}/{row['ttft_p99_s'] or 0:.3f} s, "
          f"{row['failed']} failed", flush=True)
    return row


def _safe(label: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in label)[:80]
