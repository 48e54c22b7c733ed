"""`radixfleet bench engine`: the engine on one GPU against its roofline and against transformers.

Figures (each printed with the GPU, model, dtype and settings, and its roofline floor):
- offline throughput: the nano-vllm workload (N requests, input and output lengths uniform in
  [100, 1024], ignore_eos) and a mixed workload (1,000 requests: short and long prompts, shared system
  prompts, greedy and sampled);
- decode inter-token latency at batch 1, 8, 64, 256 (decode-only steps, context ~512 tokens);
- prefill throughput of one 1k, 4k and 16k-token prompt;
- time to first token of a 4k-token prompt whose first 3.9k tokens are cached, against cold;
- where the time of one decode step goes (scheduler, batch building, forward, sampler, update);
- the sampler step alone at batch 64 with every row penalised (repetition, frequency, presence): token ids
  uploaded from the host every step (before) against counts kept on the device (after), beside the same
  batch unpenalised. Needs no model, so it also runs on the CPU:
      radixfleet bench engine --workloads penalties --penalty-device cpu
  and on the GPU machine (llama3-8b's 128,256-id vocabulary by default):
      radixfleet bench engine --workloads penalties --penalty-device cuda --out bench/reports
transformers `generate` runs in the same process afterwards on the same checkpoint (bf16, sdpa
attention): the offline workload on a subset of its requests (the engine runs the same subset too),
decode latency at the smaller batches and the prefill lengths.

`--overlap both` runs the offline and decode figures with overlap scheduling off and on, one after the
other on the same engine (EngineConfig.overlap_schedule; the other figures use the engine's default).

Writes <out>/engine_bench_<model>.json and .png. Checkpoints of built-in presets are written on first
use (weights drawn on the GPU) under --checkpoint-dir.
"""

from __future__ import annotations

import argparse
import gc
import random
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench.plotting import bar_panels, print_table, write_json

TARGETS = {
    "decode_bs1_vs_floor": 1.3,  # ITL at batch 1 within 1.3x of the weight-bandwidth floor
    "offline_vs_roofline": 0.5,  # >= 50% of the roofline throughput
    "offline_vs_transformers": 5.0,  # >= 5x transformers
    "small_model_bs1_ms": 2.0,  # qwen3-0.6b at batch 1
    "cached_ttft_vs_cold": 0.15,  # cached-prefix TTFT <= 15% of cold
}


def _int_list(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="llama3-8b", help="a built-in preset (llama3-8b, qwen3-0.6b) or a local checkpoint folder")
    parser.add_argument("--checkpoint-dir", default=None,
                        help="where preset checkpoints are written on first use (default: $RADIXFLEET_HOME/bench-models)")
    parser.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float16"])
    parser.add_argument("--page-size", type=int, default=16)
    parser.add_argument("--mem-fraction", type=float, default=0.85)
    parser.add_argument("--max-num-batched-tokens", type=int, default=8192)
    parser.add_argument("--max-running-requests", type=int, default=256)
    parser.add_argument("--cuda-graph-max-bs", type=int, default=256)
    parser.add_argument("--no-cuda-graphs", action="store_true", help="run every step eagerly")
    parser.add_argument("--overlap", default="auto", choices=["auto", "off", "on", "both"],
                        help="overlap scheduling (EngineConfig.overlap_schedule; auto: the engine's default); "
                             "'both' runs the offline and decode figures with it off and on on one engine")
    parser.add_argument("--workloads", default="offline,mixed,decode,prefill,ttft,breakdown",
                        help="comma-separated subset of offline,mixed,decode,prefill,ttft,breakdown,penalties "
                             "(penalties alone needs no model and no GPU)")
    parser.add_argument("--penalty-device", default="auto", choices=["auto", "cpu", "cuda"],
                        help="where the penalties workload runs (auto: cuda when visible)")
    parser.add_argument("--penalty-vocab", type=int, default=128256,
                        help="vocabulary of the penalties workload when run alone (default: llama3-8b's)")
    parser.add_argument("--penalty-batch", type=int, default=64)
    parser.add_argument("--num-requests", type=int, default=256, help="offline (nano-vllm) workload size")
    parser.add_argument("--min-len", type=int, default=100)
    parser.add_argument("--max-len", type=int, default=1024)
    parser.add_argument("--mixed-requests", type=int, default=1000)
    parser.add_argument("--decode-batches", type=_int_list, default=[1, 8, 64, 256])
    parser.add_argument("--decode-context", type=int, default=512, help="prompt length of the decode-latency runs")
    parser.add_argument("--decode-steps", type=int, default=64)
    parser.add_argument("--prefill-lengths", type=_int_list, default=[1024, 4096, 16384])
    parser.add_argument("--ttft-prompt", type=int, default=4096)
    parser.add_argument("--ttft-cached", type=int, default=3900)
    parser.add_argument("--repeats", type=int, default=3, help="repeats of the prefill and TTFT figures (median)")
    parser.add_argument("--no-hf", action="store_true", help="skip the transformers comparison")
    parser.add_argument("--hf-requests", type=int, default=16, help="offline requests transformers runs (one batch)")
    parser.add_argument("--hf-decode-batches", type=_int_list, default=[1, 8])
    parser.add_argument("--out", default="results")
    parser.add_argument("--seed", type=int, default=0)


# ---------------------------------------------------------------------------------------------- engine side
@dataclass
class RunResult:
    seconds: float
    input_tokens: int
    output_tokens: int
    steps: int
    ttft_s: list[float] = field(default_factory=list)
    cached_tokens: int = 0

    @property
    def output_tok_s(self) -> float:
        return self.output_tokens / self.seconds if self.seconds > 0 else 0.0


def run_requests(engine, jobs: list[tuple[list[int], object]], step_times: list[float] | None = None) -> RunResult:
    """Submit every (prompt ids, SamplingParams) at once and step the engine until all finish."""
    from worker.engine.protocol import EngineRequest

    start = time.perf_counter()
    first_token: dict[str, float] = {}
    cached = 0
    outputs = 0
    for i, (ids, params) in enumerate(jobs):
        engine.add_request(EngineRequest(f"b{i}", ids, params))
    steps = 0
    while engine.has_unfinished():
        t0 = time.perf_counter()
        events = engine.step()
        now = time.perf_counter()
        if step_times is not None:
            step_times.append(now - t0)
        steps += 1
        for ev in events:
            if ev.new_token_ids:
                outputs += len(ev.new_token_ids)
                if ev.request_id not in first_token:
                    first_token[ev.request_id] = now - start
                    cached += ev.num_cached_tokens
    return RunResult(
        seconds=time.perf_counter() - start,
        input_tokens=sum(len(ids) for ids, _ in jobs),
        output_tokens=outputs,
        steps=steps,
        ttft_s=sorted(first_token.values()),
        cached_tokens=cached,
    )


def nano_vllm_workload(n: int, lo: int, hi: int, vocab: int, seed: int) -> list[tuple[list[int], int]]:
    rng = random.Random(seed)
    return [([rng.randrange(vocab) for _ in range(rng.randint(lo, hi))], rng.randint(lo, hi)) for _ in range(n)]


def mixed_workload(n: int, vocab: int, seed: int):
    """1,000-request mix: 40% chat turns over 16 shared system prompts (prefix hits), 40% short
    prompts, 20% long documents; outputs 16-512 tokens; half greedy, half sampled (T=0.8, top_p=0.95)."""
    from worker.sampling_params import SamplingParams

    rng = random.Random(seed + 1)
    systems = [[rng.randrange(vocab) for _ in range(rng.randint(256, 1024))] for _ in range(16)]
    jobs = []
    for _ in range(n):
        kind = rng.random()
        if kind < 0.4:
            ids = rng.choice(systems) + [rng.randrange(vocab) for _ in range(rng.randint(16, 256))]
        elif kind < 0.8:
            ids = [rng.randrange(vocab) for _ in range(rng.randint(16, 256))]
        else:
            ids = [rng.randrange(vocab) for _ in range(rng.randint(1024, 4096))]
        out = rng.randint(16, 512)
        if rng.random() < 0.5:
            params = SamplingParams(temperature=0.0, max_tokens=out, ignore_eos=True)
        else:
            params = SamplingParams(temperature=0.8, top_p=0.95, max_tokens=out, ignore_eos=True, seed=rng.randrange(1 << 30))
        jobs.append((ids, params))
    return jobs


def greedy(max_tokens: int):
    from worker.sampling_params import SamplingParams

    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)


def decode_itl(engine, batch: int, context: int, steps: int, vocab: int, seed: int) -> tuple[float, int]:
    """Median time of the decode-only steps of `batch` requests with `context`-token prompts."""
    rng = random.Random(seed)
    jobs = [([rng.randrange(vocab) for _ in range(context)], greedy(steps + 2)) for _ in range(batch)]
    from worker.engine.protocol import EngineRequest

    for i, (ids, params) in enumerate(jobs):
        engine.add_request(EngineRequest(f"d{batch}-{i}", ids, params))
    started: set[str] = set()
    times: list[float] = []
    while engine.has_unfinished():
        all_decoding = len(started) == batch
        t0 = time.perf_counter()
        events = engine.step()
        elapsed = time.perf_counter() - t0
        finished = any(ev.finish_reason for ev in events)
        if all_decoding and not finished and len(events) == batch:
            times.append(elapsed)
        started.update(ev.request_id for ev in events if ev.new_token_ids)
    return (statistics.median(times) if times else float("nan")), len(times)


def time_to_first_token(engine, ids: list[int]) -> tuple[float, int]:
    result = run_requests(engine, [(ids, greedy(1))])
    return result.seconds, result.cached_tokens


class StepProfiler:
    """Wraps the engine's phases with timers (synchronising after the forward), for one run."""

    PHASES = ("schedule", "build_forward_batch", "forward: H2D + launch (CPU)", "forward: wait for GPU",
              "sample + D2H", "update (launch + resolve)")

    def __init__(self, engine):
        import torch

        import worker.engine.llm_engine as llm_engine

        self.engine, self.module, self.torch = engine, llm_engine, torch
        self.totals = {p: 0.0 for p in self.PHASES}
        self.steps = 0
        self._saved = []

    def _wrap(self, owner, name, phase, sync=False):
        original = getattr(owner, name)
        own_attribute = name in vars(owner)  # a module function or an instance attribute, not a method
        totals, torch = self.totals, self.torch

        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            out = original(*args, **kwargs)
            t1 = time.perf_counter()
            totals[phase] += t1 - t0
            if sync and torch.cuda.is_available():
                torch.cuda.synchronize()
                totals[sync] += time.perf_counter() - t1
            return out

        self._saved.append((owner, name, original, own_attribute))
        setattr(owner, name, timed)

    def __enter__(self):
        e = self.engine
        self._wrap(e.scheduler, "schedule", "schedule")
        self._wrap(self.module, "build_forward_batch", "build_forward_batch")
        self._wrap(e.executor, "forward", "forward: H2D + launch (CPU)", sync="forward: wait for GPU")
        self._wrap(e.sampler, "sample_async", "sample + D2H")
        self._wrap(e.scheduler, "launch", "update (launch + resolve)")
        self._wrap(e.scheduler, "resolve", "update (launch + resolve)")
        return self

    def __exit__(self, *exc):
        for owner, name, original, own_attribute in reversed(self._saved):
            if own_attribute:
                setattr(owner, name, original)
            else:
                delattr(owner, name)  # the class's method shows through again


def step_breakdown(engine, batch: int, context: int, steps: int, vocab: int, seed: int) -> dict:
    """Per-phase milliseconds of an average decode step at `batch` (timed with a sync after forward)."""
    rng = random.Random(seed)
    warm = [([rng.randrange(vocab) for _ in range(context)], greedy(steps)) for _ in range(batch)]
    jobs = [([rng.randrange(vocab) for _ in range(context)], greedy(steps)) for _ in range(batch)]
    run_requests(engine, warm)  # same shapes, other tokens: no prefix-cache hit in the timed run
    with StepProfiler(engine) as prof:
        step_times: list[float] = []
        result = run_requests(engine, jobs, step_times)
    total = sum(step_times)
    phases = {k: v * 1e3 / result.steps for k, v in prof.totals.items()}
    phases["other (outputs, loop)"] = total * 1e3 / result.steps - sum(phases.values())
    phases["total per step"] = total * 1e3 / result.steps
    return phases


# ---------------------------------------------------------------------------------------------- transformers side
class HFRunner:
    """transformers generate on the same checkpoint, bf16, sdpa attention, on the GPU."""

    def __init__(self, folder: Path):
        import torch
        import transformers

        self.torch = torch
        self.model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).to("cuda").eval()

    def _generate(self, prompts: list[list[int]], max_new: int) -> float:
        torch = self.torch
        width = max(len(p) for p in prompts)
        ids = torch.zeros(len(prompts), width, dtype=torch.long)
        mask = torch.zeros(len(prompts), width, dtype=torch.long)
        for row, p in enumerate(prompts):  # left padding, as decoder-only generation needs
            ids[row, width - len(p):] = torch.tensor(p)
            mask[row, width - len(p):] = 1
        ids, mask = ids.cuda(), mask.cuda()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.inference_mode():
            self.model.generate(ids, attention_mask=mask, max_new_tokens=max_new, min_new_tokens=max_new,
                                do_sample=False, eos_token_id=None, pad_token_id=0)
        torch.cuda.synchronize()
        return time.perf_counter() - t0

    def offline(self, workload: list[tuple[list[int], int]]) -> RunResult:
        """One batch, max_new = the longest output; only each request's own output tokens count."""
        seconds = self._generate([p for p, _ in workload], max(o for _, o in workload))
        return RunResult(seconds, sum(len(p) for p, _ in workload), sum(o for _, o in workload), 0)

    def decode_itl(self, batch: int, context: int, steps: int, vocab: int, seed: int) -> float:
        rng = random.Random(seed)
        prompts = [[rng.randrange(vocab) for _ in range(context)] for _ in range(batch)]
        self._generate(prompts, 2)  # warm
        short = self._generate(prompts, 1)
        long = self._generate(prompts, steps + 1)
        return (long - short) / steps

    def ttft(self, ids: list[int]) -> float:
        return self._generate([ids], 1)

    def close(self):
        del self.model
        gc.collect()
        self.torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------------- sampler step
PENALTY_OUTPUTS = 128  # output tokens each row already has when the penalties workload starts


def penalty_step_rows(device: str, vocab: int, batch: int, prompt_len: int, steps: int, seed: int) -> list[dict]:
    """ms per sampler step (sample_async + read back of the tokens), greedy, every row penalised: counts
    from the host lists uploaded every step (states without a counts key: the path before device counts)
    against counts kept on the device (the engine's path), beside the same batch without penalties.
    Outputs grow by one token a step, from PENALTY_OUTPUTS; the first 5 steps (device counts built) are
    not timed."""
    import torch

    from worker.engine.sampler import Sampler, SamplingState
    from worker.sampling_params import SamplingParams

    rng = random.Random(seed)
    prompts = [[rng.randrange(vocab) for _ in range(prompt_len)] for _ in range(batch)]
    first_outputs = [[rng.randrange(vocab) for _ in range(PENALTY_OUTPUTS)] for _ in range(batch)]
    logits = torch.randn(batch, vocab, generator=torch.Generator().manual_seed(seed)).to(device)
    penalised = SamplingParams(temperature=0.0, presence_penalty=0.5, frequency_penalty=0.3, repetition_penalty=1.2)
    rows = []
    for path, params, keyed in (("no penalties", SamplingParams(temperature=0.0), False),
                                ("penalties, host upload (before)", penalised, False),
                                ("penalties, device counts (after)", penalised, True)):
        sampler = Sampler(vocab, device, seed=seed)
        outputs = [list(out) for out in first_outputs]
        times = []
        for step in range(steps + 5):
            states = [SamplingState(params, prompts[i], outputs[i], counts_key=i if keyed else None)
                      for i in range(batch)]
            start = time.perf_counter()
            tokens = sampler.sample_async(logits, states).result().token_ids
            if step >= 5:
                times.append(time.perf_counter() - start)
            for out, token in zip(outputs, tokens):
                out.append(token)
        times.sort()
        rows.append({"path": path, "median_ms": statistics.median(times) * 1e3,
                     "p90_ms": times[int(0.9 * (len(times) - 1))] * 1e3, "steps": len(times)})
    base = rows[0]["median_ms"]
    for row in rows:
        row["over_unpenalised_ms"] = row["median_ms"] - base
    return rows


def run_penalty_step(args: argparse.Namespace, device: str, vocab: int) -> dict:
    import platform

    import torch

    name = torch.cuda.get_device_name() if device == "cuda" else f"CPU ({platform.processor() or platform.machine()}, " \
        f"{torch.get_num_threads()} threads)"
    settings = {"device": name, "torch": torch.__version__, "vocab": vocab, "batch": args.penalty_batch,
                "prompt_tokens": args.decode_context, "outputs_at_start": PENALTY_OUTPUTS, "steps": args.decode_steps,
                "sampling": "greedy; repetition 1.2, frequency 0.3, presence 0.5 on every penalised row"}
    print(f"sampler step: {settings}", flush=True)
    rows = penalty_step_rows(device, vocab, args.penalty_batch, args.decode_context, args.decode_steps, args.seed)
    print_table(rows, ["path", "median_ms", "p90_ms", "over_unpenalised_ms", "steps"],
                title=f"sampler step, batch {args.penalty_batch}, vocab {vocab:,}, {name}")
    return {"settings": settings, "rows": rows}


# ---------------------------------------------------------------------------------------------- driver
def resolve_checkpoint(model: str, checkpoint_dir: str | None) -> Path:
    folder = Path(model)
    if folder.is_dir():
        return folder
    from worker.models.presets import get_preset

    try:
        get_preset(model)
    except Exception as exc:
        raise SystemExit(f"--model {model!r} is neither a checkpoint folder nor a built-in preset ({exc})") from None
    if checkpoint_dir is None:
        from worker.models.registry import radixfleet_home

        checkpoint_dir = radixfleet_home() / "bench-models"
    # Drawn on the GPU (fast for 8B shapes), so its values differ from the registry's CPU-drawn copy.
    folder = Path(checkpoint_dir) / f"{model}-seed0-gpu"
    if not (folder / "config.json").is_file():
        from worker.models.checkpoint_writer import write_checkpoint

        print(f"writing the {model} preset checkpoint to {folder} (random weights, drawn on the GPU)", flush=True)
        write_checkpoint(model, folder, seed=0, device="cuda", progress=True)
    return folder


def warm_up(engine, vocab: int, chunk: int) -> None:
    """Run the step shapes the figures meet once, so Triton's compiles (one per kernel variant) and the
    allocator's growth stay out of the timings: fresh short and long prefills, cached-prefix extends,
    a prompt over several chunks, and decodes mixed with prefill."""
    rng = random.Random(12345)
    short = [[rng.randrange(vocab) for _ in range(rng.randint(20, 300))] for _ in range(6)]
    run_requests(engine, [(p, greedy(8)) for p in short])
    run_requests(engine, [(p + [rng.randrange(vocab) for _ in range(40)], greedy(4)) for p in short])  # cached prefixes
    long = [rng.randrange(vocab) for _ in range(min(chunk + 700, engine.max_model_len - 16))]
    run_requests(engine, [(long, greedy(4))] + [(p[:50], greedy(40)) for p in short])
    run_requests(engine, [(long[:-300] + [rng.randrange(vocab) for _ in range(300)], greedy(2))])


def _median(values):
    return statistics.median(values) if values else float("nan")


def run(args: argparse.Namespace) -> int:
    import torch

    workloads = {w.strip() for w in args.workloads.split(",") if w.strip()}
    penalty_device = ("cuda" if torch.cuda.is_available() else "cpu") if args.penalty_device == "auto" else args.penalty_device
    if penalty_device == "cuda" and not torch.cuda.is_available():
        print("--penalty-device cuda: no CUDA GPU is visible (use --penalty-device cpu)", file=sys.stderr)
        return 2
    if workloads == {"penalties"}:  # the sampler alone: no model, no GPU needed
        report = run_penalty_step(args, penalty_device, args.penalty_vocab)
        print(f"wrote {write_json(Path(args.out) / 'engine_bench_sampler_penalties.json', report)}")
        return 0
    if not torch.cuda.is_available():
        print("radixfleet bench engine needs a CUDA GPU (none is visible)", file=sys.stderr)
        return 2
    from bench.roofline import ModelCost, decode_step_floor, measure_ceilings, prefill_floor, workload_floor
    from worker.config import EngineConfig
    from worker.engine.llm_engine import LLMEngine
    from worker.models.config import ModelConfig

    unknown = workloads - {"offline", "mixed", "decode", "prefill", "ttft", "breakdown", "penalties"}
    if unknown:
        print(f"--workloads: unknown {sorted(unknown)}", file=sys.stderr)
        return 2
    folder = resolve_checkpoint(args.model, args.checkpoint_dir)
    model_name = args.model if not Path(args.model).is_dir() else folder.name
    cfg = ModelConfig.from_folder(folder)
    vocab = cfg.vocab_size
    dtype_name = "bfloat16" if args.dtype == "auto" else args.dtype

    print("measuring the GPU's copy bandwidth and bf16 matmul rate ...", flush=True)
    ceilings = measure_ceilings()
    cost = ModelCost.from_config(cfg)
    engine_config = EngineConfig(
        model=str(folder), device="cuda", dtype=args.dtype, page_size=args.page_size, mem_fraction=args.mem_fraction,
        max_num_batched_tokens=args.max_num_batched_tokens, max_running_requests=args.max_running_requests,
        cuda_graph_max_bs=args.cuda_graph_max_bs, enable_cuda_graphs=not args.no_cuda_graphs, seed=args.seed,
        overlap_schedule="off" if args.overlap == "both" else args.overlap,
    )
    t0 = time.perf_counter()
    engine = LLMEngine(engine_config)
    startup_s = time.perf_counter() - t0
    # the offline and decode figures run once per mode; the others with the engine's own setting
    engine_overlap = engine.overlap
    overlap_modes = [False, True] if args.overlap == "both" else [engine_overlap]

    def overlap_label(flag: bool) -> str:
        return (", overlap " + ("on" if flag else "off")) if len(overlap_modes) > 1 else ""

    executor = engine.executor
    settings = {
        "gpu": ceilings.gpu,
        "model": model_name,
        "dtype": dtype_name,
        "page_size": args.page_size,
        "cuda_graphs": not args.no_cuda_graphs,
        "cuda_graph_max_bs": args.cuda_graph_max_bs,
        "max_num_batched_tokens": args.max_num_batched_tokens,
        "max_running_requests": args.max_running_requests,
        "mem_fraction": args.mem_fraction,
        "kv_cache_tokens": engine.cache.pool.num_pages * args.page_size,
        "engine_startup_s": round(startup_s, 1),
        "overlap_schedule": args.overlap if args.overlap == "both" else ("on" if engine_overlap else "off"),
    }
    header = (f"{ceilings.gpu} | {model_name} {dtype_name} | page {args.page_size}, graphs "
              f"{'<=' + str(args.cuda_graph_max_bs) if not args.no_cuda_graphs else 'off'}, "
              f"budget {args.max_num_batched_tokens} tok/step, {settings['kv_cache_tokens']:,} KV tokens | "
              f"measured {ceilings.bandwidth_bytes_per_s / 1e12:.2f} TB/s copy, "
              f"{ceilings.bf16_flops_per_s / 1e12:.0f} TFLOP/s bf16")
    print(header, flush=True)
    print(f"memory plan: {getattr(executor, 'memory_report', {})}", flush=True)

    warm_up(engine, vocab, args.max_num_batched_tokens)

    rows: list[dict] = []
    report: dict = {"settings": settings, "ceilings": ceilings.as_dict(), "model_cost": cost.as_dict(),
                    "memory": getattr(executor, "memory_report", {}), "figures": rows}
    hf_jobs = {}

    def add(figure, setting, value, unit, floor_value=None, better="higher", **extra):
        row = {"figure": figure, "setting": setting, "value": value, "unit": unit, "roofline": floor_value}
        if floor_value:
            row["of_roofline"] = (value / floor_value) if better == "higher" else (floor_value / value)
        row.update(extra)
        rows.append(row)
        print(f"  {figure} [{setting}]: {value:.4g} {unit}" + (f" (roofline {floor_value:.4g})" if floor_value else ""), flush=True)
        return row

    if "offline" in workloads:
        work = nano_vllm_workload(args.num_requests, args.min_len, args.max_len, vocab, args.seed)
        subset = work[: args.hf_requests]
        roof = workload_floor(cost, ceilings, [(len(p), o) for p, o in work], args.max_running_requests)
        sub_roof = workload_floor(cost, ceilings, [(len(p), o) for p, o in subset], args.max_running_requests)
        for flag in overlap_modes:
            engine.overlap = flag
            result = run_requests(engine, [(p, greedy(o)) for p, o in work])
            tok_s = result.output_tokens / roof.seconds
            add("offline throughput",
                f"nano-vllm: {len(work)} req, in/out U[{args.min_len},{args.max_len}], ignore_eos{overlap_label(flag)}",
                result.output_tok_s, "output tok/s", tok_s, seconds=result.seconds, output_tokens=result.output_tokens,
                input_tokens=result.input_tokens, steps=result.steps, roofline_bound=roof.bound,
                label=f"nano-vllm {len(work)} req{overlap_label(flag)}", overlap=flag)
            sub = run_requests(engine, [(p, greedy(o)) for p, o in subset])
            add("offline throughput", f"nano-vllm subset: first {len(subset)} req{overlap_label(flag)}", sub.output_tok_s,
                "output tok/s", sub.output_tokens / sub_roof.seconds, seconds=sub.seconds, output_tokens=sub.output_tokens,
                label=f"nano-vllm first {len(subset)}{overlap_label(flag)}", overlap=flag)
        engine.overlap = engine_overlap
        hf_jobs["offline"] = subset

    if "mixed" in workloads:
        jobs = mixed_workload(args.mixed_requests, vocab, args.seed)
        before_hits = engine.cache.hit_tokens
        result = run_requests(engine, jobs)
        pairs = [(len(p), params.max_tokens) for p, params in jobs]
        roof = workload_floor(cost, ceilings, pairs, args.max_running_requests)
        add("offline throughput", f"mixed: {len(jobs)} req, 16 shared system prompts, half sampled",
            result.output_tok_s, "output tok/s", result.output_tokens / roof.seconds, seconds=result.seconds,
            output_tokens=result.output_tokens, input_tokens=result.input_tokens,
            cached_prompt_tokens=engine.cache.hit_tokens - before_hits,
            p50_ttft_s=_median(result.ttft_s), note="roofline ignores the prefix-cache savings",
            label=f"mixed {len(jobs)} req")

    if "decode" in workloads:
        for batch in args.decode_batches:
            if batch > args.max_running_requests:
                continue
            for flag in overlap_modes:
                engine.overlap = flag
                itl, samples = decode_itl(engine, batch, args.decode_context, args.decode_steps, vocab, args.seed + batch)
                roof = decode_step_floor(cost, ceilings, batch, args.decode_context + args.decode_steps // 2)
                add("decode ITL", f"batch {batch}, context ~{args.decode_context}{overlap_label(flag)}", itl * 1e3,
                    "ms/token", roof.seconds * 1e3, better="lower", samples=samples,
                    label=f"batch {batch}{overlap_label(flag)}", overlap=flag,
                    graph_bs=(executor.graphs.padded_size(batch) if getattr(executor, "graphs", None) and batch <= executor.graphs.batch_sizes[-1] else None))
        engine.overlap = engine_overlap
        hf_jobs["decode"] = [b for b in args.hf_decode_batches if b in args.decode_batches]

    if "prefill" in workloads:
        for n in args.prefill_lengths:
            if n >= engine.max_model_len:
                continue
            times = []
            for r in range(args.repeats):
                ids = [random.Random(args.seed * 1000 + n + r).randrange(vocab) for _ in range(n)]
                times.append(time_to_first_token(engine, ids)[0])
            t = _median(times)
            roof = prefill_floor(cost, ceilings, n)
            add("prefill throughput", f"one {n:,}-token prompt (chunks of {args.max_num_batched_tokens})", n / t,
                "tok/s", n / roof.seconds, ttft_s=t, label=f"{n // 1024}k tokens" if n % 1024 == 0 else f"{n} tokens")
        hf_jobs["prefill"] = list(args.prefill_lengths)

    if "ttft" in workloads:
        n, shared = args.ttft_prompt, args.ttft_cached
        cold, warm, cached_counts = [], [], []
        for r in range(args.repeats):
            rng = random.Random(7000 + r)
            prefix = [rng.randrange(vocab) for _ in range(shared)]
            cold.append(time_to_first_token(engine, [rng.randrange(vocab) for _ in range(n)])[0])
            time_to_first_token(engine, prefix + [rng.randrange(vocab) for _ in range(n - shared)])  # fills the cache
            t, cached_tokens = time_to_first_token(engine, prefix + [rng.randrange(vocab) for _ in range(n - shared)])
            warm.append(t)
            cached_counts.append(cached_tokens)
        cached_n = int(_median(cached_counts))
        rng = random.Random(9999)
        prefix = [rng.randrange(vocab) for _ in range(shared)]
        time_to_first_token(engine, prefix + [rng.randrange(vocab) for _ in range(n - shared)])
        with StepProfiler(engine) as prof:
            t_total, _ = time_to_first_token(engine, prefix + [rng.randrange(vocab) for _ in range(n - shared)])
        report["cached_ttft_breakdown_ms"] = {**{k: v * 1e3 for k, v in prof.totals.items()}, "total": t_total * 1e3}
        print(f"  cached TTFT phases (ms): { {k: round(v, 3) for k, v in report['cached_ttft_breakdown_ms'].items()} }")
        add("TTFT", f"{n:,}-token prompt, cold", _median(cold) * 1e3, "ms",
            prefill_floor(cost, ceilings, n).seconds * 1e3, better="lower", label="cold")
        add("TTFT", f"{n:,}-token prompt, first {cached_n:,} cached", _median(warm) * 1e3, "ms",
            prefill_floor(cost, ceilings, n - cached_n, prefix=cached_n).seconds * 1e3, better="lower",
            cached_over_cold=_median(warm) / _median(cold), label=f"{cached_n:,} cached")

    breakdowns = {}
    if "breakdown" in workloads:
        for batch in sorted({1, min(64, args.max_running_requests)}):
            breakdowns[f"batch {batch}"] = step_breakdown(engine, batch, args.decode_context, 48, vocab, args.seed + 99)
        report["decode_step_breakdown_ms"] = breakdowns
    if "penalties" in workloads:
        report["sampler_penalty_step"] = run_penalty_step(args, "cuda", vocab)

    engine.shutdown()
    del engine, executor
    gc.collect()
    torch.cuda.empty_cache()

    if not args.no_hf and hf_jobs:
        print("transformers generate on the same checkpoint ...", flush=True)
        hf = HFRunner(folder)
        try:
            if "offline" in hf_jobs:
                subset = hf_jobs["offline"]
                res = hf.offline(subset)
                _attach_hf(rows, "offline throughput", f"nano-vllm subset: first {len(subset)} req", res.output_tok_s,
                           f"one generate() batch of {len(subset)}, left-padded, max_new={max(o for _, o in subset)}")
            for batch in hf_jobs.get("decode", []):
                itl = hf.decode_itl(batch, args.decode_context, 32, vocab, args.seed + batch)
                _attach_hf(rows, "decode ITL", f"batch {batch}, context ~{args.decode_context}", itl * 1e3, "generate()")
            for n in hf_jobs.get("prefill", []):
                ids = [random.Random(args.seed * 1000 + n).randrange(vocab) for _ in range(n)]
                hf.ttft(ids)  # warm
                t = hf.ttft(ids)
                _attach_hf(rows, "prefill throughput", f"one {n:,}-token prompt (chunks of {args.max_num_batched_tokens})",
                           n / t, "generate(max_new_tokens=1)")
        finally:
            hf.close()

    # the full offline workload against transformers' rate on the subset
    hf_rate = next((r.get("transformers") for r in rows if r["setting"].startswith("nano-vllm subset")), None)
    for r in rows:
        if r["setting"].startswith("nano-vllm:") and hf_rate:
            r["transformers"] = hf_rate
            r["speedup_vs_transformers"] = r["value"] / hf_rate
            r["transformers_note"] = "transformers' rate on the subset (full run too slow for it)"
    report["targets"] = evaluate_targets(rows, model_name)
    emit(report, rows, breakdowns, header, args, model_name)
    return 0


def _attach_hf(rows: list[dict], figure: str, setting: str, value: float, note: str) -> None:
    for r in rows:
        # with --overlap both the engine's settings carry an ", overlap on/off" suffix
        if r["figure"] == figure and r["setting"].split(", overlap ")[0] == setting:
            r["transformers"] = value
            higher = r["unit"] != "ms/token" and r["unit"] != "ms"
            r["speedup_vs_transformers"] = (r["value"] / value) if higher else (value / r["value"])
            r["transformers_note"] = note
            print(f"  transformers {figure} [{setting}]: {value:.4g} {r['unit']}", flush=True)


def evaluate_targets(rows: list[dict], model_name: str) -> list[dict]:
    out = []

    def find(figure, prefix):
        return next((r for r in rows if r["figure"] == figure and r["setting"].startswith(prefix)), None)

    d1 = find("decode ITL", "batch 1,")
    if d1 and "llama3-8b" in model_name:
        out.append({"target": "8B decode bs1 <= 1.3x floor", "value": d1["value"] / d1["roofline"], "goal": 1.3,
                    "met": d1["value"] / d1["roofline"] <= 1.3})
    if d1 and "qwen3-0.6b" in model_name:
        out.append({"target": "qwen3-0.6b bs1 <= 2 ms/token", "value": d1["value"], "goal": 2.0, "met": d1["value"] <= 2.0})
    off = find("offline throughput", "nano-vllm:")
    if off and off.get("roofline"):
        out.append({"target": "offline >= 50% of roofline", "value": off["of_roofline"], "goal": 0.5,
                    "met": off["of_roofline"] >= 0.5})
    if off and off.get("speedup_vs_transformers"):
        out.append({"target": "offline >= 5x transformers", "value": off["speedup_vs_transformers"], "goal": 5.0,
                    "met": off["speedup_vs_transformers"] >= 5.0})
    cached = find("TTFT", "4,096-token prompt, first")
    if cached:
        out.append({"target": "cached TTFT <= 15% of cold", "value": cached["cached_over_cold"], "goal": 0.15,
                    "met": cached["cached_over_cold"] <= 0.15})
    return out


def emit(report: dict, rows: list[dict], breakdowns: dict, header: str, args, model_name: str) -> None:
    print()
    print(header)
    print_table(rows, ["figure", "setting", "value", "unit", "roofline", "of_roofline", "transformers",
                       "speedup_vs_transformers"], title="engine benchmark")
    if breakdowns:
        phases = list(next(iter(breakdowns.values())).keys())
        print()
        print_table([{"phase": p, **{k: v[p] for k, v in breakdowns.items()}} for p in phases],
                    ["phase", *breakdowns.keys()], title="decode step breakdown, ms per step (sync after forward)")
    if report.get("targets"):
        print()
        print_table(report["targets"], ["target", "value", "goal", "met"], title="targets")
    out = Path(args.out)
    stem = f"engine_bench_{model_name.replace('/', '_')}"
    json_path = write_json(out / f"{stem}.json", report)
    panels = []
    for figure, ylabel in (("offline throughput", "output tok/s"), ("decode ITL", "ms/token"),
                           ("prefill throughput", "tok/s"), ("TTFT", "ms")):
        sel = [r for r in rows if r["figure"] == figure]
        if not sel:
            continue
        panels.append({
            "title": figure, "ylabel": ylabel,
            "labels": [r.get("label", r["setting"][:20]) for r in sel],
            "series": {"radixfleet": [r["value"] for r in sel], "roofline": [r.get("roofline") for r in sel],
                       "transformers": [r.get("transformers") for r in sel]},
        })
    footnote = ("transformers: generate(), bf16, sdpa attention, same checkpoint and GPU, run after the engine; its offline "
                "rate is one left-padded batch of the first requests (the full workloads would take hours). Roofline: "
                "max(bytes / measured copy bandwidth, FLOPs / measured bf16 matmul rate), see bench/roofline.py.")
    png = bar_panels(out / f"{stem}.png", panels, header, footnote=footnote)
    print(f"\nwrote {json_path}" + (f" and {png}" if png else ""))
