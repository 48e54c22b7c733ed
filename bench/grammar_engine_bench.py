"""Grammar-constrained decoding in the real engine: decode time per step with and without a JSON schema.

bench/grammar_bench.py times the grammar library alone on a synthetic vocabulary; this one builds the
offline engine (`worker.LLM`) on a real checkpoint and drives `engine.step()` itself, so the figure holds
everything a constrained row costs end to end: feeding the matchers, filling the bitmasks, masking the
logits, and the wait for the previous step's tokens before a step with grammar rows can sample (they must
be known on the host to advance the matchers; see worker/engine/launched_step.py).

Per batch size B and mode (`none`: no constraint; `json_schema`: every row constrained by SCHEMA, the
same StructuredOutput a `response_format` json_schema request gets from worker/server/structured.py),
the same B prompts are submitted with `ignore_eos` and more max_tokens than the run needs. Once every
row has its first token (the prefill is not timed) and `--warmup` further steps have run, `--steps`
engine steps are timed as one wall-clock span (the device is synchronised at both ends) and the tokens
they produced are counted, so ms/step and ms per produced token are both exact. The two modes' windows
alternate `--repeats` times and each mode keeps its median window (all windows' ms/step are in the JSON).

SCHEMA is an unbounded array of objects with unbounded strings, so a row rarely completes its JSON in
the window. A row that does can only be given an eos by its grammar from then on (it keeps generating:
ignore_eos) and still pays the mask every step; `constrained_fraction` reports the share of produced
tokens that were not such eos tokens. Each mode runs once untimed first (Triton compiles, CUDA graphs,
the grammar compile and the tokenizer info).

On an H200 with a Qwen3-0.6B checkpoint folder (what the integrator runs):

    python -m bench.grammar_engine_bench --model /path/to/Qwen3-0.6B --device cuda --batch 1 64 \
        --steps 256 --out bench/reports/grammar_engine_bench_h200.json

(`--model qwen3-0.6b` writes that preset with random weights instead, via bench.engine_bench.resolve_checkpoint.)
On the CPU: `python -m bench.grammar_engine_bench --model demo --device cpu --batch 1 64 --steps 32`.
Prints a table (ms/step without and with the grammar, overhead in ms and %) and writes the JSON with the
command, machine and settings.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

SCHEMA = {
    "type": "object",
    "properties": {
        "title": {"type": "string"},
        "score": {"type": "integer"},
        "tags": {"type": "array", "items": {"type": "string"}, "minItems": 2},
        "notes": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {"heading": {"type": "string"}, "body": {"type": "string"}},
                "required": ["heading", "body"],
                "additionalProperties": False,
            },
            "minItems": 1,
        },
    },
    "required": ["title", "score", "tags", "notes"],
    "additionalProperties": False,
}
MODES = ("none", "json_schema")


def model_location(model: str, device: str, checkpoint_dir: str | None) -> str:
    """What LLM() gets: a folder as is; a preset on cuda via bench.engine_bench (drawn on the GPU, cached);
    a preset on cpu by name (the registry writes it once on the CPU)."""
    if Path(model).is_dir() or device == "cpu":
        return model
    from bench.engine_bench import resolve_checkpoint

    return str(resolve_checkpoint(model, checkpoint_dir))


def sampling_params(mode: str, max_tokens: int, temperature: float):
    from worker.sampling_params import SamplingParams, StructuredOutput

    constraint = StructuredOutput("json_schema", json.dumps(SCHEMA)) if mode == "json_schema" else None
    return SamplingParams(max_tokens=max_tokens, ignore_eos=True, temperature=temperature,
                          structured_output=constraint)


def prompts(tokenizer, batch: int) -> list[list[int]]:
    """B distinct prompts of the same shape (a JSON request, as a structured-output client would send)."""
    return [tokenizer.encode(f"Request {i}: write the notes of meeting {i * 7 + 3} as a JSON object with a "
                             f"'notes' array of title, body and score.") for i in range(batch)]


def _synchronize(device: str) -> None:
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


def run_window(llm, prompt_ids: list[list[int]], params, warmup: int, steps: int, device: str) -> dict:
    """Submit the prompts, wait for every first token, run `warmup` steps, time `steps`; abort the rest."""
    from worker.engine.llm_engine import new_request_id
    from worker.engine.protocol import EngineRequest

    engine = llm.engine
    ids = [new_request_id() for _ in prompt_ids]
    for rid, prompt in zip(ids, prompt_ids):
        engine.add_request(EngineRequest(rid, prompt, params))
    outputs: dict[str, list[int]] = {rid: [] for rid in ids}

    def step() -> int:
        produced = 0
        for out in engine.step():
            if out.error:
                raise RuntimeError(f"engine error: {out.error}")
            if out.finish_reason is not None and out.finish_reason != "abort":
                raise RuntimeError(f"a row finished ({out.finish_reason}) inside the window: raise max_tokens")
            outputs[out.request_id].extend(out.new_token_ids)
            produced += len(out.new_token_ids)
        return produced

    while not all(outputs.values()):
        step()
    for _ in range(warmup):
        step()
    before = {rid: len(tokens) for rid, tokens in outputs.items()}
    _synchronize(device)
    start = time.perf_counter()
    produced = sum(step() for _ in range(steps))
    _synchronize(device)
    seconds = time.perf_counter() - start
    for rid in ids:
        engine.abort_request(rid)
    while engine.has_unfinished():
        engine.step()
    eos = set(engine.eos_token_ids)
    window = [tokens[before[rid]:] for rid, tokens in outputs.items()]
    not_eos = sum(1 for tokens in window for t in tokens if t not in eos)
    return {
        "seconds": seconds,
        "ms_per_step": seconds / steps * 1e3,
        "tokens": produced,
        "ms_per_token": seconds / produced * 1e3 if produced else None,
        "constrained_fraction": not_eos / produced if produced else None,
        "sample_text": llm.tokenizer.decode(outputs[ids[0]][:48]),
    }


def bench_batch(llm, batch: int, args) -> dict:
    prompt_ids = prompts(llm.tokenizer, batch)
    # enough tokens that no row ends inside the window, even with a step's worth of overlap lag
    max_tokens = args.warmup + args.steps + 32
    row: dict = {"batch": batch, "prompt_tokens_mean": sum(map(len, prompt_ids)) / batch}
    params = {mode: sampling_params(mode, max_tokens, args.temperature) for mode in MODES}
    for mode in MODES:
        run_window(llm, prompt_ids, params[mode], 1, 2, args.device)  # untimed: compiles, graphs, grammar setup
    runs: dict[str, list[dict]] = {mode: [] for mode in MODES}
    for repeat in range(args.repeats):  # the modes alternate, so a slow spell of the machine hits both
        for mode in MODES:
            result = run_window(llm, prompt_ids, params[mode], args.warmup, args.steps, args.device)
            runs[mode].append(result)
            print(f"  batch {batch} {mode} run {repeat + 1}: {result['ms_per_step']:.3f} ms/step, "
                  f"{result['tokens']} tokens", flush=True)
    for mode in MODES:  # the median run, with every run's ms/step beside it
        ordered = sorted(runs[mode], key=lambda r: r["ms_per_step"])
        row[mode] = {**ordered[len(ordered) // 2], "ms_per_step_runs": [r["ms_per_step"] for r in runs[mode]]}
    base, constrained = row["none"]["ms_per_step"], row["json_schema"]["ms_per_step"]
    row["overhead_ms"] = constrained - base
    row["overhead_pct"] = (constrained - base) / base * 100
    return row


def machine(device: str) -> str:
    cpu = f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs"
    if device == "cuda":
        import torch

        return f"{torch.cuda.get_device_name(0)}; {cpu}"
    return cpu


def print_table(rows: list[dict]) -> None:
    print(f"\n{'batch':>5} {'ms/step none':>13} {'ms/step grammar':>16} {'overhead ms':>12} {'overhead %':>11} "
          f"{'ms/tok none':>12} {'ms/tok grammar':>15} {'constrained':>12}")
    for r in rows:
        none, grammar = r["none"], r["json_schema"]
        print(f"{r['batch']:>5} {none['ms_per_step']:>13.3f} {grammar['ms_per_step']:>16.3f} "
              f"{r['overhead_ms']:>12.3f} {r['overhead_pct']:>10.1f}% {none['ms_per_token']:>12.4f} "
              f"{grammar['ms_per_token']:>15.4f} {grammar['constrained_fraction']:>11.0%}")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="demo", help="a built-in preset (demo, qwen3-0.6b, ...) or a checkpoint folder")
    parser.add_argument("--checkpoint-dir", default=None, help="cuda presets: where bench.engine_bench writes them")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 64])
    parser.add_argument("--steps", type=int, default=128, help="timed engine steps per batch size and mode")
    parser.add_argument("--warmup", type=int, default=4, help="untimed decode steps before the window")
    parser.add_argument("--repeats", type=int, default=3, help="timed windows per mode, alternating; the median is kept")
    parser.add_argument("--temperature", type=float, default=0.0, help="0: greedy (the default)")
    parser.add_argument("--out", type=Path, default=Path("results/grammar_engine_bench.json"))


def run(args: argparse.Namespace) -> int:
    if min(args.batch) < 1 or args.steps < 1 or args.repeats < 1 or args.warmup < 0:
        raise SystemExit("--batch sizes, --steps and --repeats must be at least 1, --warmup at least 0")
    from worker import LLM

    location = model_location(args.model, args.device, args.checkpoint_dir)
    max_batch = max(args.batch)
    options = {"device": args.device, "progress": False, "max_running_requests": max(256, max_batch),
               "max_num_batched_tokens": max(2048, max_batch * 64)}
    if args.device == "cpu":
        options["kv_cache_tokens"] = max(65536, max_batch * (args.steps + args.warmup + 128))
    llm = LLM(location, **options)
    print(f"engine on {args.device}: {location}, overlap={llm.engine.overlap}", flush=True)
    rows = [bench_batch(llm, batch, args) for batch in args.batch]
    llm.engine.shutdown()
    print_table(rows)
    argv = getattr(args, "argv", None) or sys.argv[1:]
    setting = {"command": " ".join(["python", "-m", "bench.grammar_engine_bench", *argv]),
               "machine": machine(args.device), "model": args.model, "model_path": location, "device": args.device,
               "batches": args.batch, "steps": args.steps, "warmup": args.warmup, "repeats": args.repeats,
               "temperature": args.temperature,
               "engine_options": options, "overlap": llm.engine.overlap, "schema": SCHEMA}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"setting": setting, "results": rows}, indent=2))
    print(f"\nwrote {args.out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    args.argv = argv if argv is not None else sys.argv[1:]
    return run(args)


if __name__ == "__main__":
    raise SystemExit(main())
