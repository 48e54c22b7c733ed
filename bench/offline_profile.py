"""Where the offline (nano-vllm) workload's wall time goes, step by step, on one GPU.

    python -m bench.offline_profile --model qwen3-0.6b --temperature 0.6 --windows 100:120,600:620 --out DIR

Runs the workload of `radixfleet bench engine` (N sequences, prompt and output lengths U[lo, hi],
ignore_eos) on a fresh engine with the worker's defaults and records every step: its wall time, its
decode rows and its prefill tokens. The steps are then grouped by kind (prefill-only, mixed, decode by
batch size) to show which of them the run's seconds were spent in. Inside each `--windows` range of
steps a torch.profiler trace adds the GPU's side: kernel time per step against wall time per step (the
GPU's busy share; below ~90% the step is host-bound) and the kernels that take the most.

Prints tables, writes offline_profile_<model>.json and .png (each step's wall time against its index,
coloured by kind, beside the seconds per kind). Needs a CUDA GPU; `--plot-only FILE.json` redraws the
PNG of a saved run anywhere.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import defaultdict
from pathlib import Path

from bench.plotting import print_table, write_report
from bench.vs_vllm import number_or_text


def _windows(text: str) -> list[tuple[int, int]]:
    try:
        pairs = [tuple(int(x) for x in part.split(":")) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected START:END[,START:END...], got {text!r}") from None
    if any(len(p) != 2 or p[0] >= p[1] for p in pairs):
        raise argparse.ArgumentTypeError(f"each window is START:END with START < END, got {text!r}")
    return sorted(pairs)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="qwen3-0.6b", help="a built-in preset or a local checkpoint folder")
    parser.add_argument("--checkpoint-dir", default=None)
    parser.add_argument("--num-requests", type=int, default=256)
    parser.add_argument("--min-len", type=int, default=100)
    parser.add_argument("--max-len", type=int, default=1024)
    parser.add_argument("--temperature", type=float, default=0.6, help="0 for greedy")
    parser.add_argument("--windows", type=_windows, default=[(100, 120), (600, 620)],
                        help="step ranges traced with torch.profiler")
    parser.add_argument("--engine-arg", action="append", default=[],
                        help="an EngineConfig field as NAME=VALUE (e.g. max_num_batched_tokens=2048); repeatable")
    parser.add_argument("--top", type=int, default=12, help="kernels listed per window")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="results")
    parser.add_argument("--plot-only", default=None, metavar="FILE.json", help="redraw the PNG of a saved run and exit")


def _engine_overrides(pairs: list[str]) -> dict:
    out = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep:
            raise SystemExit(f"--engine-arg {pair!r}: expected NAME=VALUE")
        parsed = number_or_text(value)
        out[name] = {"true": True, "false": False}.get(parsed.lower(), parsed) if isinstance(parsed, str) else parsed
    return out


def step_kind(num_decodes: int, prefill_tokens: int) -> str:
    if prefill_tokens and not num_decodes:
        return "prefill only"
    if prefill_tokens:
        return "mixed (decode + prefill)"
    for top in (8, 32, 64, 128, 192):
        if num_decodes <= top:
            return f"decode bs <= {top}"
    return "decode bs > 192"


def kernel_summary(prof, steps: int, top: int) -> tuple[float, list[dict]]:
    """GPU kernel milliseconds per step in a profiled window, and the `top` kernels by time."""
    totals: dict[str, float] = defaultdict(float)
    for event in prof.events():  # with only CUDA activity recorded, these are kernels, copies and memsets
        if event.device_type.name == "CUDA":
            totals[event.name] += event.time_range.elapsed_us() / 1000.0
    busy = sum(totals.values())
    rows = [{"kernel": name[:90], "ms_per_step": ms / steps, "share": ms / busy if busy else 0.0}
            for name, ms in sorted(totals.items(), key=lambda kv: -kv[1])[:top]]
    return busy / steps, rows


def plot_steps(report: dict, path: Path) -> None:
    """Step wall time against step index, one colour per kind; seconds per kind as bars beside it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = report["steps"]
    kinds = [k["kind"] for k in report["steps_by_kind"]]
    fig, (timeline, bars) = plt.subplots(1, 2, figsize=(13, 4.2), gridspec_kw={"width_ratios": [2.2, 1]})
    for kind in kinds:
        points = [(i, 1000 * s["wall_s"]) for i, s in enumerate(steps)
                  if "wall_s" in s and step_kind(s["decodes"], s["prefill_tokens"]) == kind]
        if points:
            timeline.scatter(*zip(*points), s=4, label=kind)
    timeline.set_yscale("log")
    timeline.set_xlabel("step")
    timeline.set_ylabel("wall ms per step (log)")
    timeline.legend(fontsize=7, markerscale=3)
    seconds = [k["seconds"] for k in report["steps_by_kind"]]
    bars.barh(kinds, seconds)
    for y, value in enumerate(seconds):
        bars.annotate(f"{value:.2f} s", (value, y), va="center", fontsize=7)
    bars.set_xlabel("seconds of the run")
    bars.tick_params(axis="y", labelsize=7)
    fig.suptitle(f"{report['gpu']} | {report['model']} | T={report['temperature']} | "
                 f"{report['output_tok_s']:,.0f} output tok/s over {report['seconds']:.2f} s", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(args: argparse.Namespace) -> int:
    if args.plot_only:
        import json

        report = json.loads(Path(args.plot_only).read_text())
        png = Path(args.plot_only).with_suffix(".png")
        plot_steps(report, png)
        print(f"wrote {png}")
        return 0
    import torch

    if not torch.cuda.is_available():
        print("bench offline_profile needs a CUDA GPU (none is visible)", file=sys.stderr)
        return 2
    from torch.profiler import ProfilerActivity, profile

    from bench.engine_bench import nano_vllm_workload, resolve_checkpoint, warm_up
    from worker.config import EngineConfig
    from worker.engine.llm_engine import LLMEngine
    from worker.engine.protocol import EngineRequest
    from worker.models.config import ModelConfig
    from worker.sampling_params import SamplingParams

    folder = resolve_checkpoint(args.model, args.checkpoint_dir)
    vocab = ModelConfig.from_folder(folder).vocab_size
    config = EngineConfig(model=str(folder), device="cuda", seed=args.seed, **_engine_overrides(args.engine_arg))
    engine = LLMEngine(config)
    warm_up(engine, vocab, config.max_num_batched_tokens or 2048)

    steps: list[dict] = []
    original_schedule = engine.scheduler.schedule

    def recording_schedule():
        batch = original_schedule()
        steps.append({"decodes": batch.num_decodes, "prefill_tokens": batch.num_tokens - batch.num_decodes})
        return batch

    engine.scheduler.schedule = recording_schedule
    work = nano_vllm_workload(args.num_requests, args.min_len, args.max_len, vocab, args.seed)
    for i, (ids, out_len) in enumerate(work):
        params = SamplingParams(max_tokens=out_len, ignore_eos=True, temperature=args.temperature)
        engine.add_request(EngineRequest(f"p{i}", ids, params))
    windows = list(args.windows)
    traces: list[dict] = []
    prof = None
    output_tokens = 0
    start = time.perf_counter()
    while engine.has_unfinished():
        index = len(steps)
        if prof is None and windows and index == windows[0][0]:
            prof = profile(activities=[ProfilerActivity.CUDA])  # no CPU tracing: it would slow the host
            prof.start()
        t0 = time.perf_counter()
        try:
            events = engine.step()
        except Exception:
            print(f"step {index} failed; the last steps (decodes, prefill tokens): "
                  f"{[(s['decodes'], s['prefill_tokens']) for s in steps[-4:]]}", file=sys.stderr, flush=True)
            raise
        wall = time.perf_counter() - t0
        if len(steps) > index:
            steps[index]["wall_s"] = wall
        output_tokens += sum(len(ev.new_token_ids) for ev in events)
        if prof is not None and len(steps) >= windows[0][1]:
            torch.cuda.synchronize()
            prof.stop()
            lo, hi = windows.pop(0)
            window_steps = steps[lo:hi]
            wall_ms = 1000 * sum(s.get("wall_s", 0.0) for s in window_steps) / len(window_steps)
            gpu_ms, kernels = kernel_summary(prof, len(window_steps), args.top)
            traces.append({"steps": f"{lo}:{hi}", "decodes_mean": sum(s["decodes"] for s in window_steps) / len(window_steps),
                           "prefill_tokens_mean": sum(s["prefill_tokens"] for s in window_steps) / len(window_steps),
                           "wall_ms_per_step": wall_ms, "gpu_kernel_ms_per_step": gpu_ms,
                           "gpu_busy": gpu_ms / wall_ms if wall_ms else 0.0, "kernels": kernels})
            prof = None
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start

    by_kind: dict[str, dict] = defaultdict(lambda: {"steps": 0, "seconds": 0.0, "decodes": 0, "prefill_tokens": 0})
    for s in steps:
        row = by_kind[step_kind(s["decodes"], s["prefill_tokens"])]
        row["steps"] += 1
        row["seconds"] += s.get("wall_s", 0.0)
        row["decodes"] += s["decodes"]
        row["prefill_tokens"] += s["prefill_tokens"]
    kinds = [{"kind": k, "steps": v["steps"], "seconds": v["seconds"], "share": v["seconds"] / seconds,
              "ms_per_step": 1000 * v["seconds"] / v["steps"], "decodes_per_step": v["decodes"] / v["steps"],
              "prefill_tokens_per_step": v["prefill_tokens"] / v["steps"]} for k, v in sorted(by_kind.items())]
    name = args.model if not Path(args.model).is_dir() else folder.name
    print(f"{torch.cuda.get_device_name()} | {name} | T={args.temperature} | {len(work)} sequences | "
          f"{output_tokens:,} output tokens in {seconds:.2f} s = {output_tokens / seconds:,.0f} tok/s | {len(steps)} steps")
    print_table(kinds, ["kind", "steps", "seconds", "share", "ms_per_step", "decodes_per_step", "prefill_tokens_per_step"])
    for trace in traces:
        print(f"\nsteps {trace['steps']}: {trace['decodes_mean']:.0f} decodes + {trace['prefill_tokens_mean']:.0f} prefill "
              f"tokens per step; wall {trace['wall_ms_per_step']:.2f} ms, GPU kernels {trace['gpu_kernel_ms_per_step']:.2f} ms "
              f"({100 * trace['gpu_busy']:.0f}% busy)")
        print_table(trace["kernels"], ["kernel", "ms_per_step", "share"])
    report = {"gpu": torch.cuda.get_device_name(), "model": name, "temperature": args.temperature,
              "engine_config": {k: v for k, v in vars(config).items() if isinstance(v, (int, float, str, bool, type(None)))},
              "seconds": seconds, "output_tokens": output_tokens, "output_tok_s": output_tokens / seconds,
              "steps_by_kind": kinds, "windows": traces, "steps": steps}
    write_report(Path(args.out) / f"offline_profile_{name}", report, lambda png: plot_steps(report, png))
    engine.shutdown()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
