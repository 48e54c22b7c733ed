"""`radixfleet bench vs-vllm`: radixfleet and vLLM side by side, same checkpoint, same workload, one command.

Two modes (`--modes offline,served`, either or both). Offline, the workload is nano-vllm's bench.py protocol: N sequences, prompt token ids random in [0, 10000),
prompt and output lengths uniform in [min-len, max-len], ignore_eos, one warm-up request, output tokens
over wall time; run sampled (temperature 0.6) and greedy, each `--repeats` times with fresh prompt ids
(the same lengths every pass, token ids drawn anew; the same for every engine), so no repeat is served
from the prefix cache of the one before and the second run of a workload should match the first. Then
decode time per token at the given batch sizes.

Each engine runs in its own process (bench/offline_child.py) on the same checkpoint folder and the same
workload file, one after the other on the same GPU. `--engines` names what runs:
  radixfleet          this source tree
  radixfleet@DIR      another source tree (e.g. `git archive` of an older commit): before/after in one run
  vllm                vLLM, imported from --vllm-path (kept off our PYTHONPATH: our `kernels` package
                      would shadow a name vLLM may import)
Any of them may carry its own settings in brackets, one variant per entry, e.g.
`--engines "vllm,radixfleet,radixfleet[--max-num-batched-tokens 8192]"`: served, they are server flags;
offline, `--name value` becomes the engine's keyword `name=value` (numbers parsed, `--no-name` is False).

Served (bench/vs_vllm_served.py): each engine as an OpenAI server in turn, the same streamed doc-QA chat
stream (768 requests, 64 in flight, 48 shared ~3.5k-token documents, Zipf 0.8, 32 tokens); req/s, TTFT
p50/p90/p99, ITL and start-up time.

Writes <out>/vs_vllm_<model>.json and .png (served: vs_vllm_served_<model>.*), and prints the tables
with every setting beside them. On the GPU machine (vLLM installed under /tmp/vsite, see
../shared/gpu-peers/HOWTO.md):

    radixfleet bench vs-vllm --model /tmp/ckpt/llama3-8b-seed0-gpu --modes offline,served \
        --vllm-path /tmp/vsite:/tmp/vsite/nvidia_cutlass_dsl/dsl_packages --out bench/reports
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

from bench.plotting import bar_panels, print_table, write_report
from bench.router_bench import free_port, pythonpath_with
from bench.vs_vllm_served import add_served_arguments, run_engine

REPO_ROOT = Path(__file__).resolve().parent.parent
CHILD = Path(__file__).resolve().parent / "offline_child.py"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="llama3-8b", help="built-in preset or a checkpoint folder")
    parser.add_argument("--checkpoint-dir", default=None, help="where preset checkpoints are written")
    parser.add_argument("--modes", default="offline", help="comma-separated: offline, served")
    parser.add_argument("--engines", default="vllm,radixfleet",
                        help="comma-separated: radixfleet, radixfleet@DIR (another source tree), vllm; "
                             "each may carry settings in brackets: radixfleet[--max-num-batched-tokens 8192]")
    parser.add_argument("--vllm-path", default=os.environ.get("VLLM_PYTHONPATH", "/tmp/vsite"),
                        help="PYTHONPATH entries for vLLM (colon-separated)")
    parser.add_argument("--sampling", default="t0.6,greedy", help="comma-separated: greedy, tX (temperature X)")
    parser.add_argument("--num-seqs", type=int, default=256)
    parser.add_argument("--min-len", type=int, default=100)
    parser.add_argument("--max-len", type=int, default=1024)
    parser.add_argument("--token-id-max", type=int, default=10000, help="prompt ids are random in [0, this)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--decode-batches", default="1,64")
    parser.add_argument("--decode-context", type=int, default=512)
    parser.add_argument("--decode-steps", type=int, default=64)
    parser.add_argument("--max-num-seqs", type=int, default=256, help="both engines' running-batch limit")
    parser.add_argument("--max-model-len", type=int, default=4096)
    parser.add_argument("--mem-fraction", type=float, default=0.85,
                        help="radixfleet --mem-fraction and vLLM gpu_memory_utilization")
    parser.add_argument("--max-num-batched-tokens", type=int, default=None,
                        help="both engines' step token budget (default: each engine's own default)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="results")
    add_served_arguments(parser)


ENGINE_SPEC = re.compile(r"\s*([^,\[\]]+?)\s*(?:\[([^\]]*)\])?\s*(?:,|$)")


def parse_engines(text: str) -> list[tuple[str, str, Path, list[str]]]:
    """'vllm,radixfleet[--x 1],radixfleet@DIR' -> [(label, engine, source tree, flags)]."""
    specs, position = [], 0
    while position < len(text.rstrip()):
        match = ENGINE_SPEC.match(text, position)
        if not match or match.end() == position:
            raise SystemExit(f"--engines: cannot read {text[position:]!r} (e.g. vllm,radixfleet[--flag value])")
        position = match.end()
        name, flags = match.group(1), shlex.split(match.group(2) or "")
        label = name + (f"[{match.group(2).strip()}]" if flags else "")
        if name == "vllm":
            specs.append((label, "vllm", REPO_ROOT, flags))
        elif name == "radixfleet" or name.startswith("radixfleet@"):
            tree = Path(name.split("@", 1)[1]).resolve() if "@" in name else REPO_ROOT
            if not (tree / "worker").is_dir():
                raise SystemExit(f"--engines {name}: {tree} holds no radixfleet source tree (no worker/ folder)")
            specs.append((label, "radixfleet", tree, flags))
        else:
            raise SystemExit(f"--engines: unknown engine {name!r} (radixfleet, radixfleet@DIR, vllm)")
    return specs


def flags_as_options(flags: list[str]) -> dict:
    """['--max-num-batched-tokens', '8192', '--no-enforce-eager'] -> {'max_num_batched_tokens': 8192, ...}."""
    options, i = {}, 0
    while i < len(flags):
        if not flags[i].startswith("--"):
            raise SystemExit(f"--engines: expected a --flag in brackets, got {flags[i]!r}")
        name = flags[i][2:].replace("-", "_")
        if i + 1 < len(flags) and not flags[i + 1].startswith("--"):
            options[name], i = number_or_text(flags[i + 1]), i + 2
        else:
            options[name.removeprefix("no_")], i = not name.startswith("no_"), i + 1
    return options


def number_or_text(value: str):
    """A command-line value as an int, else a float, else the text itself."""
    for kind in (int, float):
        try:
            return kind(value)
        except ValueError:
            pass
    return value


def _workload(args, vocab: int) -> dict:
    """One prompt set per timed pass: the same prompt and output lengths every pass (drawn once from the
    seed, so passes are the same work and their throughputs comparable), fresh token ids each pass (seed,
    seed+1, ...), so a pass is not served from the prefix cache that the pass before it filled."""
    top = min(args.token_id_max, vocab)
    shape = random.Random(args.seed)
    lengths = [(shape.randint(args.min_len, args.max_len), shape.randint(args.min_len, args.max_len))
               for _ in range(args.num_seqs)]
    runs = []
    for repeat in range(args.repeats * len(args.sampling.split(","))):  # one set per (sampling mode, repeat)
        ids = random.Random(args.seed + 1 + repeat)
        runs.append({"prompts": [[ids.randrange(top) for _ in range(n_in)] for n_in, _ in lengths],
                     "output_lens": [n_out for _, n_out in lengths]})
    return {"runs": runs}


def _engine_options(args) -> dict:
    ours = {"max_running_requests": args.max_num_seqs, "max_model_len": args.max_model_len,
            "mem_fraction": args.mem_fraction, "seed": args.seed}
    theirs = {"max_num_seqs": args.max_num_seqs, "max_model_len": args.max_model_len,
              "gpu_memory_utilization": args.mem_fraction, "seed": args.seed}
    if args.max_num_batched_tokens:
        ours["max_num_batched_tokens"] = theirs["max_num_batched_tokens"] = args.max_num_batched_tokens
    return {"radixfleet": ours, "vllm": theirs}


def _child_command(spec: tuple, args, workload_path: Path, out_path: Path) -> tuple[list[str], dict, str]:
    label, engine, tree, _flags = spec
    env = dict(os.environ)
    if engine == "vllm":
        env["PYTHONPATH"] = args.vllm_path
        env.setdefault("VLLM_USE_FLASHINFER_SAMPLER", "0")
        env.setdefault("HF_HUB_OFFLINE", "1")
        cwd = tempfile.gettempdir()
    else:
        env["PYTHONPATH"] = pythonpath_with(tree)
        cwd = str(tree)
    command = [sys.executable, str(CHILD), "--engine", engine, "--label", label,
               "--workload", str(workload_path), "--out", str(out_path)]
    return command, env, cwd


def _gpu_name() -> str:
    try:
        import torch

        return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    except Exception:  # noqa: BLE001 - only a label
        return "unknown GPU"


def run(args: argparse.Namespace) -> int:
    from bench.engine_bench import resolve_checkpoint

    engines = parse_engines(args.engines)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = sorted(set(modes) - {"offline", "served"})
    if unknown or not modes:
        raise SystemExit(f"--modes: unknown {', '.join(unknown) or 'empty'} (offline, served)")
    folder = resolve_checkpoint(args.model, args.checkpoint_dir)
    code = run_offline(args, engines, folder) if "offline" in modes else 0
    if "served" in modes:
        code = max(code, run_served(args, engines, folder))
    return code


def run_offline(args, engines: list[tuple], folder: Path) -> int:
    from worker.models.config import ModelConfig

    sampling = [s.strip() for s in args.sampling.split(",") if s.strip()]
    vocab = ModelConfig.from_folder(folder).vocab_size
    work = {"model": str(folder), "vocab": vocab, "seed": args.seed, "sampling": sampling,
            "repeats": args.repeats, "decode_batches": [int(b) for b in args.decode_batches.split(",") if b],
            "decode_context": args.decode_context, "decode_steps": args.decode_steps,
            "engine_options": _engine_options(args), **_workload(args, vocab)}
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    workload_path = out_dir / "vs_vllm_workload.json"
    workload_path.write_text(json.dumps(work))
    results, skipped = [], []
    for index, spec in enumerate(engines):
        label = spec[0]
        if spec[3]:  # this variant's own engine keywords on top of the shared ones
            work["engine_options"][label] = {**work["engine_options"][spec[1]], **flags_as_options(spec[3])}
            workload_path.write_text(json.dumps(work))
        result_path = out_dir / f"vs_vllm_{index}.part.json"
        command, env, cwd = _child_command(spec, args, workload_path, result_path)
        print(f"=== {label}: {' '.join(command[1:3])} (cwd {cwd})", flush=True)
        code = subprocess.call(command, env=env, cwd=cwd)
        if code != 0 or not result_path.is_file():
            print(f"{label} failed (exit {code}): skipped in the table", flush=True)
            skipped.append(label)
            continue
        results.append(json.loads(result_path.read_text()))
        result_path.unlink()
    workload_path.unlink()
    return _report(args, folder, sampling, results, skipped)


def _report(args, folder: Path, sampling: list[str], results: list[dict], skipped: list[str]) -> int:
    setting = (f"{args.num_seqs} seqs, in/out U[{args.min_len},{args.max_len}], ids < {args.token_id_max}, "
               f"ignore_eos, max_num_seqs {args.max_num_seqs}, max_model_len {args.max_model_len}, "
               f"mem {args.mem_fraction}, batched tokens {args.max_num_batched_tokens or 'engine default'}")
    title = f"offline, {Path(folder).name} on {_gpu_name()}: {setting}"
    rows = []
    for result in results:
        for row in result["offline"]:
            rows.append({"engine": result["label"], "sampling": row["sampling"], "run": row["run"],
                         "output tok/s": row["output_tok_s"], "seconds": row["seconds"],
                         "startup s": result["startup_s"]})
    print_table(rows, ["engine", "sampling", "run", "output tok/s", "seconds", "startup s"], title)
    decode_rows = [{"engine": r["label"], "batch": d["batch"], "ms/token": d["ms_per_token"]}
                   for r in results for d in r["decode"]]
    print_table(decode_rows, ["engine", "batch", "ms/token"], f"decode time per token, context {args.decode_context}")
    ratios = _ratios(results, sampling)
    if ratios:
        print_table(ratios, ["engine", "against", "figure", "ratio"], "ratios (best run of each; >1: first is faster)")
    payload = {"setting": setting, "model": str(folder), "gpu": _gpu_name(), "results": results,
               "ratios": ratios, "skipped": skipped, "command": _command_line(), "settings": vars(args)}

    def plot(path: Path) -> None:
        labels = [r["label"] for r in results]
        panels = [{"title": f"offline {mode}", "ylabel": "output tok/s", "labels": labels,
                   "series": {"best run": [_best(r, mode) for r in results]}} for mode in sampling]
        for batch in {d["batch"] for r in results for d in r["decode"]}:
            panels.append({"title": f"decode, batch {batch}", "ylabel": "ms per token", "labels": labels,
                           "series": {"ms/token": [next((d["ms_per_token"] for d in r["decode"] if d["batch"] == batch), None)
                                                   for r in results]}})
        if bar_panels(path, panels, title[:160], footnote=setting) is None:
            raise ImportError("matplotlib")

    write_report(Path(args.out) / f"vs_vllm_{Path(folder).name}", payload, plot)
    return 0 if not skipped else 1


def run_served(args, engines: list[tuple], folder: Path) -> int:
    out_dir = Path(args.out)
    logs = out_dir / "vs_vllm_served_logs"
    logs.mkdir(parents=True, exist_ok=True)
    rows, skipped = [], []
    for label, engine, tree, flags in engines:
        try:
            rows.append(run_engine(label, engine, tree, folder, args, flags, free_port(), logs))
        except (RuntimeError, TimeoutError) as exc:
            print(f"{label} failed: {exc}; skipped in the table", flush=True)
            skipped.append(label)
    setting = (f"{args.requests} streamed chat requests, {args.concurrency} in flight, {args.documents} documents of "
               f"{args.doc_chars} chars (Zipf {args.zipf}) + a distinct question, {args.max_tokens} tokens, "
               f"T={args.temperature}, ignore_eos; --gpu-memory-utilization {args.mem_fraction}, --max-num-seqs "
               f"{args.max_num_seqs}, --max-model-len {args.max_model_len}, --max-num-batched-tokens "
               f"{args.max_num_batched_tokens or 'engine default'}")
    title = f"served doc-QA, {Path(folder).name} on {_gpu_name()}"
    columns = ["engine", "req_s", "output_tok_s", "ttft_p50_s", "ttft_p90_s", "ttft_p99_s", "itl_p50_s", "failed",
               "startup_s"]
    print_table(rows, columns, f"{title}: {setting}")
    ratios = [{"engine": row["engine"], "against": rows[0]["engine"],
               "req/s ratio": row["req_s"] / rows[0]["req_s"] if rows[0]["req_s"] else None,
               "TTFT p99 ratio": (row["ttft_p99_s"] / rows[0]["ttft_p99_s"]) if rows[0]["ttft_p99_s"] else None}
              for row in rows[1:]]
    if ratios:
        print_table(ratios, ["engine", "against", "req/s ratio", "TTFT p99 ratio"],
                    "ratios against the first engine (req/s > 1 and TTFT p99 < 1: the other is better)")
    payload = {"setting": setting, "model": str(folder), "gpu": _gpu_name(), "rows": rows, "ratios": ratios,
               "skipped": skipped, "command": _command_line(), "settings": vars(args)}

    def plot(path: Path) -> None:
        labels = [row["engine"] for row in rows]
        panels = [{"title": "req/s", "ylabel": "requests / s", "labels": labels,
                   "series": {"req/s": [row["req_s"] for row in rows]}},
                  {"title": "TTFT", "ylabel": "seconds", "labels": labels,
                   "series": {q: [row[f"ttft_{q}_s"] for row in rows] for q in ("p50", "p90", "p99")}}]
        if bar_panels(path, panels, title, footnote=setting) is None:
            raise ImportError("matplotlib")

    write_report(out_dir / f"vs_vllm_served_{Path(folder).name}", payload, plot)
    return 0 if rows and not skipped else 1


def _command_line() -> str:
    """How this run was started, as `radixfleet bench vs-vllm ...` (also when run as a module)."""
    argv = sys.argv[1:] if sys.argv[0].endswith("vs_vllm.py") else sys.argv[3:]
    return "radixfleet bench vs-vllm " + " ".join(argv)


def _best(result: dict, mode: str) -> float | None:
    values = [row["output_tok_s"] for row in result["offline"] if row["sampling"] == mode]
    return max(values) if values else None


def _ratios(results: list[dict], sampling: list[str]) -> list[dict]:
    """Every engine against the first one listed (the peer, or the 'before' tree)."""
    if len(results) < 2:
        return []
    base, rows = results[0], []
    for other in results[1:]:
        for mode in sampling:
            mine, theirs = _best(other, mode), _best(base, mode)
            if mine and theirs:
                rows.append({"engine": other["label"], "against": base["label"], "figure": f"offline {mode}",
                             "ratio": mine / theirs})
        for decode in other["decode"]:
            peer = next((d for d in base["decode"] if d["batch"] == decode["batch"]), None)
            if peer:
                rows.append({"engine": other["label"], "against": base["label"],
                             "figure": f"decode bs{decode['batch']} speed",
                             "ratio": peer["ms_per_token"] / decode["ms_per_token"]})
    return rows


if __name__ == "__main__":
    from bench.plotting import script_main

    sys.exit(script_main(__doc__, add_arguments, run))
