"""`radixfleet bench serve`: replay a workload over HTTP and report latency percentiles and throughput.

The workload is made of token-id prompts (exact input lengths, no tokenizer needed on the client) sent
to `/v1/completions` with `ignore_eos`, so every request produces exactly its output length. Requests
arrive as a Poisson process at `--request-rate` (inf: all at once) or are kept at a fixed
`--concurrency`. For each request we record the time to the first token (TTFT), the gaps between
streamed chunks (ITL), the time per output token after the first (TPOT) and the end-to-end latency.

Without `--url` the benchmark starts a worker itself with the engine options given here. With
`--compare-offline` it also runs the same workload through the offline engine (`LLMEngine.step()`
in this process, all requests at once) and reports the HTTP / offline output-throughput ratio,
side by side in the same run (the worker is stopped first so both get the same GPU).

Results: a table on stdout, JSON and a PNG under `--out` (default results/).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import platform
import random
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

TOKEN_ID_RANGE = (100, 3000)  # ordinary tokens in every supported vocabulary (the demo one has 3072)


# ---------------------------------------------------------------------- workload
@dataclass
class WorkItem:
    prompt_token_ids: list[int]
    output_len: int


def make_workload(args) -> list[WorkItem]:
    """Random prompts, or prompts that share one of `--num-prefixes` prefixes (`--workload shared-prefix`)."""
    rng = random.Random(args.workload_seed)

    def tokens(count: int) -> list[int]:
        return [rng.randrange(*TOKEN_ID_RANGE) for _ in range(count)]

    def length(low: int, high: int | None) -> int:
        return rng.randint(low, high) if high and high > low else low

    prefixes = [tokens(args.shared_prefix_len) for _ in range(args.num_prefixes)]
    items = []
    for i in range(args.num_requests):
        prompt = tokens(length(args.input_len, args.input_len_max))
        if args.workload == "shared-prefix":
            prompt = prefixes[i % len(prefixes)] + prompt
        items.append(WorkItem(prompt, length(args.output_len, args.output_len_max)))
    return items


# ---------------------------------------------------------------------- HTTP client
@dataclass
class RequestResult:
    ok: bool
    prompt_len: int
    output_tokens: int = 0
    ttft: float = 0.0
    e2e: float = 0.0
    itl: list[float] = field(default_factory=list)
    error: str = ""

    @property
    def tpot(self) -> float | None:
        return (self.e2e - self.ttft) / (self.output_tokens - 1) if self.output_tokens > 1 else None


async def _one_request(session, url: str, model: str | None, item: WorkItem) -> RequestResult:
    body = {"prompt": item.prompt_token_ids, "max_tokens": item.output_len, "temperature": 0, "stream": True,
            "ignore_eos": True, "stream_options": {"include_usage": True, "continuous_usage_stats": True}}
    if model:
        body["model"] = model
    result = RequestResult(ok=False, prompt_len=len(item.prompt_token_ids))
    start = time.perf_counter()
    last = None
    try:
        async with session.post(url + "/v1/completions", json=body) as response:
            if response.status != 200:
                result.error = f"HTTP {response.status}: {(await response.text())[:200]}"
                return result
            async for line in response.content:
                if not line.startswith(b"data: ") or line.startswith(b"data: [DONE]"):
                    continue
                now = time.perf_counter()
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    result.error = chunk["error"].get("message", "error event")
                    return result
                # continuous_usage_stats: every chunk says how many tokens the request has so far, so a
                # chunk that carries several tokens (a busy server coalesces) counts as that many gaps.
                # A server without it gives usage only at the end: then each text chunk counts as one token.
                choices = chunk.get("choices")
                if chunk.get("usage"):
                    new_tokens = chunk["usage"]["completion_tokens"] - result.output_tokens
                    result.output_tokens = chunk["usage"]["completion_tokens"]
                else:
                    new_tokens = 1 if choices and choices[0].get("text") else 0
                if not choices or new_tokens <= 0:
                    continue
                if last is None:
                    result.ttft = now - start
                    result.itl.extend([0.0] * (new_tokens - 1))
                else:
                    result.itl.extend([(now - last) / new_tokens] * new_tokens)
                last = now
    except Exception as error:  # noqa: BLE001 - a failed request is reported, the run goes on
        result.error = f"{type(error).__name__}: {error}"
        return result
    result.e2e = time.perf_counter() - start
    result.ok = result.output_tokens > 0
    return result


async def run_http(url: str, model: str | None, items: list[WorkItem], request_rate: float,
                   concurrency: int | None, seed: int) -> tuple[list[RequestResult], float]:
    """Send the workload; returns per-request results and the wall time from first send to last answer."""
    import aiohttp

    rng = random.Random(seed + 1)
    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=None, sock_read=600)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        gate = asyncio.Semaphore(concurrency) if concurrency else None

        async def send(item):
            if gate is None:
                return await _one_request(session, url, model, item)
            async with gate:
                return await _one_request(session, url, model, item)

        start = time.perf_counter()
        tasks = []
        for item in items:
            tasks.append(asyncio.ensure_future(send(item)))
            if math.isfinite(request_rate) and request_rate > 0:
                await asyncio.sleep(rng.expovariate(request_rate))
        results = await asyncio.gather(*tasks)
        return results, time.perf_counter() - start


def warmup_items(items: list[WorkItem], count: int) -> list[WorkItem]:
    """The workload's first requests, prompts reversed (so they leave no cached prefix for the timed run).

    Both paths run them before timing, so neither pays one-off costs inside its figure: Triton compiles a
    kernel variant the first time a shape class shows up (batch sizes, context lengths, chunk layouts), and
    on a cold cache that took seconds out of the first timed run on an H200, and a warm-up of 64 requests
    still left ~1.8 s of it inside the timed run (batch sizes it never reached). Hence the default: the
    whole workload once, at full size, untimed.
    """
    return [WorkItem(item.prompt_token_ids[::-1], item.output_len) for item in items[:count]]


async def _warm_up(url: str, model: str | None, items: list[WorkItem]) -> None:
    import aiohttp

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        await asyncio.gather(*(_one_request(session, url, model, item) for item in items))


# ---------------------------------------------------------------------- offline engine
def run_offline(config, items: list[WorkItem], warmup: list[WorkItem]) -> dict:
    """The same workload through LLMEngine in this process, all requests queued at once.

    Returns output tokens, seconds from the first add_request to the last token, and the number of
    engine steps (the HTTP worker logs its own count, to compare batch sizes).
    """
    from worker.engine.llm_engine import LLMEngine
    from worker.engine.protocol import EngineRequest
    from worker.sampling_params import SamplingParams

    engine = LLMEngine(config)
    try:
        for i, item in enumerate(warmup):
            warm = SamplingParams(max_tokens=item.output_len, temperature=0, ignore_eos=True)
            engine.add_request(EngineRequest(f"warmup-{i}", item.prompt_token_ids, warm))
        while engine.has_unfinished():
            engine.step()
        output_tokens = 0
        start = time.perf_counter()
        for i, item in enumerate(items):
            params = SamplingParams(max_tokens=item.output_len, temperature=0, ignore_eos=True)
            engine.add_request(EngineRequest(f"offline-{i}", item.prompt_token_ids, params))
        steps = 0
        while engine.has_unfinished():
            steps += 1
            for output in engine.step():
                output_tokens += len(output.new_token_ids)
        seconds = time.perf_counter() - start
        return {"output_tokens": output_tokens, "duration_s": seconds, "output_throughput": output_tokens / seconds,
                "steps": steps}
    finally:
        engine.shutdown()


# ---------------------------------------------------------------------- report
def _percentiles(values: list[float]) -> dict:
    if not values:
        return {"mean": None, "p50": None, "p90": None, "p99": None, "max": None}
    ordered = sorted(values)

    def pick(q: float) -> float:
        return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]

    return {"mean": statistics.fmean(ordered), "p50": pick(0.5), "p90": pick(0.9), "p99": pick(0.99),
            "max": ordered[-1]}


def summarize(results: list[RequestResult], duration: float) -> dict:
    ok = [r for r in results if r.ok]
    output_tokens = sum(r.output_tokens for r in ok)
    return {
        "requests": len(results),
        "completed": len(ok),
        "failed": len(results) - len(ok),
        "errors": sorted({r.error for r in results if not r.ok})[:5],
        "duration_s": duration,
        "request_throughput": len(ok) / duration if duration else 0.0,
        "input_throughput": sum(r.prompt_len for r in ok) / duration if duration else 0.0,
        "output_throughput": output_tokens / duration if duration else 0.0,
        "output_tokens": output_tokens,
        "ttft_s": _percentiles([r.ttft for r in ok]),
        "itl_s": _percentiles([gap for r in ok for gap in r.itl]),
        "tpot_s": _percentiles([r.tpot for r in ok if r.tpot is not None]),
        "e2e_s": _percentiles([r.e2e for r in ok]),
    }


def _device_name(args) -> str:
    try:
        import torch

        if torch.cuda.is_available() and args.device != "cpu":
            return torch.cuda.get_device_name(0)
    except Exception:  # noqa: BLE001 - the name is informative only
        pass
    return f"CPU ({platform.processor() or platform.machine()})"


def format_report(setup: dict, summary: dict, offline: dict | None) -> str:
    def ms(value):
        return f"{'-':>9}" if value is None else f"{value * 1000:9.1f}"

    lines = ["", "== radixfleet bench serve ==", *[f"{key:>16}: {value}" for key, value in setup.items()], ""]
    lines.append(f"requests: {summary['completed']} completed, {summary['failed']} failed in "
                 f"{summary['duration_s']:.2f} s")
    for error in summary["errors"]:
        lines.append(f"  error: {error}")
    lines.append(f"throughput: {summary['request_throughput']:.2f} req/s, {summary['input_throughput']:.0f} input "
                 f"tok/s, {summary['output_throughput']:.0f} output tok/s")
    lines.append("")
    lines.append(f"{'latency (ms)':<14}{'mean':>10}{'p50':>10}{'p90':>10}{'p99':>10}{'max':>10}")
    for key, label in (("ttft_s", "TTFT"), ("itl_s", "ITL"), ("tpot_s", "TPOT"), ("e2e_s", "E2E")):
        row = summary[key]
        lines.append(f"{label:<14}" + "".join(f" {ms(row[q])}" for q in ("mean", "p50", "p90", "p99", "max")))
    if offline is not None:
        lines.append("")
        lines.append(f"offline engine (same workload, same run): {offline['output_tokens']} tokens in "
                     f"{offline['duration_s']:.2f} s = {offline['output_throughput']:.0f} output tok/s "
                     f"({offline['steps']} steps)")
        lines.append(f"HTTP / offline output throughput: {offline['http_over_offline']:.3f} "
                     f"({offline['http_over_offline'] * 100:.1f}%)")
    return "\n".join(lines)


def write_plot(path: Path, results: list[RequestResult], summary: dict, offline: dict | None, title: str) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no PNG written (pip install matplotlib)", file=sys.stderr)
        return False
    ok = [r for r in results if r.ok]
    series = {"TTFT": [r.ttft for r in ok], "ITL": [g for r in ok for g in r.itl], "E2E": [r.e2e for r in ok]}
    figure, axes = plt.subplots(1, 4, figsize=(18, 4.2))
    for axis, (name, values) in zip(axes, series.items()):
        values = sorted(v * 1000 for v in values)
        if values:
            axis.plot(values, [(i + 1) / len(values) for i in range(len(values))])
        axis.set_xlabel(f"{name} (ms)")
        axis.set_ylabel("fraction of requests" if name != "ITL" else "fraction of gaps")
        axis.set_title(f"{name} CDF")
        axis.grid(alpha=0.3)
    bars = {"HTTP": summary["output_throughput"]}
    if offline is not None:
        bars["offline engine"] = offline["output_throughput"]
    axes[3].bar(list(bars), list(bars.values()), color=["tab:blue", "tab:gray"][: len(bars)])
    axes[3].set_ylabel("output tokens / s")
    axes[3].set_title("throughput")
    figure.suptitle(title, fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return True


# ---------------------------------------------------------------------- command line
def add_arguments(parser: argparse.ArgumentParser) -> None:
    from worker.server.cli import add_engine_arguments

    target = parser.add_argument_group("target")
    target.add_argument("--url", default=None,
                        help="a running worker or router; without it a worker is started with the engine options")
    target.add_argument("--served-model", default=None, help="'model' sent in requests (default: none)")
    workload = parser.add_argument_group("workload")
    workload.add_argument("--workload", choices=("random", "shared-prefix"), default="random")
    workload.add_argument("--num-requests", type=int, default=256)
    workload.add_argument("--input-len", type=int, default=512, help="prompt tokens (minimum with --input-len-max)")
    workload.add_argument("--input-len-max", type=int, default=None, help="prompt lengths uniform in [input-len, this]")
    workload.add_argument("--output-len", type=int, default=128, help="output tokens (ignore_eos)")
    workload.add_argument("--output-len-max", type=int, default=None, help="output lengths uniform in [output-len, this]")
    workload.add_argument("--shared-prefix-len", type=int, default=1024, help="shared-prefix workload: prefix tokens")
    workload.add_argument("--num-prefixes", type=int, default=8, help="shared-prefix workload: distinct prefixes")
    workload.add_argument("--request-rate", type=float, default=float("inf"),
                          help="Poisson arrival rate in requests/s (inf: all at once)")
    workload.add_argument("--concurrency", type=int, default=None, help="keep this many requests in flight instead")
    workload.add_argument("--warmup-requests", type=int, default=None,
                          help="untimed requests of the workload's shapes sent first (default: all of them)")
    workload.add_argument("--workload-seed", type=int, default=0, help="seed of the random prompts and arrivals")
    output = parser.add_argument_group("output")
    output.add_argument("--compare-offline", action="store_true",
                        help="also run the workload through the offline engine and report HTTP / offline throughput")
    output.add_argument("--out", default="results", help="folder for the JSON and PNG")
    output.add_argument("--tag", default=None, help="name of the result files (default: serve_<workload>_<time>)")
    add_engine_arguments(parser)


def _check_args(args) -> str | None:
    if args.num_requests < 1:
        return "--num-requests must be at least 1"
    if args.input_len < 1 or args.output_len < 1:
        return "--input-len and --output-len must be at least 1"
    if args.concurrency is not None and args.concurrency < 1:
        return "--concurrency must be at least 1"
    if args.request_rate <= 0:
        return "--request-rate must be positive (inf: all at once)"
    return None


def run(args: argparse.Namespace) -> int:
    from worker.server.cli import engine_config_from_args
    from worker.server.launcher import WorkerProcess

    problem = _check_args(args)
    if problem:
        print(f"radixfleet bench serve: {problem}", file=sys.stderr)
        return 2
    config = engine_config_from_args(args)
    items = make_workload(args)
    warmup = warmup_items(items, len(items) if args.warmup_requests is None else args.warmup_requests)
    setup = {
        "target": args.url or f"worker started here (model {config.model}, device {config.device}, "
                              f"executor {config.executor})",
        "device": _device_name(config),
        "workload": f"{args.workload}, {len(items)} requests, input {args.input_len}"
                    f"{'-' + str(args.input_len_max) if args.input_len_max else ''} tokens"
                    f"{f' + shared prefix {args.shared_prefix_len} ({args.num_prefixes} prefixes)' if args.workload == 'shared-prefix' else ''}"
                    f", output {args.output_len}{'-' + str(args.output_len_max) if args.output_len_max else ''} tokens, "
                    "ignore_eos, greedy",
        "arrivals": f"concurrency {args.concurrency}" if args.concurrency else f"Poisson, rate {args.request_rate} req/s",
        "warm-up": f"{len(warmup)} requests of the same shapes through each path before timing",
        "engine": ("as configured on the target; offline run: " if args.url else "") + f"page {config.page_size}, max batched tokens {config.max_num_batched_tokens}, "
                  f"max running {config.max_running_requests}, policy {config.policy}, "
                  f"prefix cache {'on' if config.enable_prefix_cache else 'off'}",
    }
    print(f"radixfleet bench serve: {setup['workload']}", file=sys.stderr)

    def run_against(url: str):
        if warmup:
            print(f"warm-up: {len(warmup)} requests (untimed)", file=sys.stderr)
            asyncio.run(_warm_up(url, args.served_model, warmup))
        return asyncio.run(run_http(url, args.served_model, items, args.request_rate, args.concurrency,
                                    args.workload_seed))

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tag = args.tag or f"serve_{args.workload}_{time.strftime('%Y%m%d-%H%M%S')}"
    if args.url:
        results, duration = run_against(args.url.rstrip("/"))
    else:
        worker_args = _worker_args(args)
        print(f"starting a worker: radixfleet worker {' '.join(worker_args)} (log: {out / tag}_worker.log)",
              file=sys.stderr)
        with WorkerProcess(worker_args, start_timeout_s=1800, log_path=str(out / f"{tag}_worker.log")) as worker:
            results, duration = run_against(worker.url)
    summary = summarize(results, duration)

    offline = None
    if args.compare_offline:
        print("running the same workload through the offline engine ...", file=sys.stderr)
        offline = run_offline(config, items, warmup)
        offline["http_over_offline"] = summary["output_throughput"] / offline["output_throughput"]

    print(format_report(setup, summary, offline))
    report = {"setup": setup, "engine_config": asdict(config), "http": summary, "offline": offline,
              "args": {k: (v if not isinstance(v, float) or math.isfinite(v) else str(v)) for k, v in vars(args).items()
                       if not callable(v)}}
    (out / f"{tag}.json").write_text(json.dumps(report, indent=2, default=str))
    title = f"{setup['device']} | {setup['workload']} | {setup['arrivals']}"
    if write_plot(out / f"{tag}.png", results, summary, offline, title):
        print(f"wrote {out / tag}.json and {out / tag}.png")
    return 0 if summary["failed"] == 0 else 1


def _worker_args(args) -> list[str]:
    """The engine options given to this benchmark, as `radixfleet worker` flags."""
    import dataclasses

    from worker.config import EngineConfig

    flags = []
    for item in dataclasses.fields(EngineConfig):
        value = getattr(args, item.name, item.default)
        if value is None or value == item.default:
            continue
        flag = "--" + item.name.replace("_", "-")
        if isinstance(value, bool):
            flags.append(flag if value else "--no-" + flag[2:])
        else:
            flags += [flag, str(value)]
    return flags
