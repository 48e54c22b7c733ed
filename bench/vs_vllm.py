"""`radixfleet bench vs-vllm`: radixfleet and vLLM offline, side by side, same checkpoint, same workload.

The workload is nano-vllm's bench.py protocol: N sequences, prompt token ids random in [0, 10000),
prompt and output lengths uniform in [min-len, max-len], ignore_eos, one warm-up request, output tokens
over wall time; run sampled (temperature 0.6) and greedy, each `--repeats` times with fresh prompt ids
(seed, seed+1, ...; the same for every engine), so no repeat is served from the prefix cache of the one
before (the second run of a workload should match the first). Then decode time per token at the given batch sizes.

Each engine runs in its own process (bench/offline_child.py) on the same checkpoint folder and the same
workload file, one after the other on the same GPU. `--engines` names what runs:
  radixfleet          this source tree
  radixfleet@DIR      another source tree (e.g. `git archive` of an older commit): before/after in one run
  vllm                vLLM, imported from --vllm-path (kept off our PYTHONPATH: our `kernels` package
                      would shadow a name vLLM may import)

Writes <out>/vs_vllm_<model>.json and .png, and prints the table with every setting beside it.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
from pathlib import Path

from bench.plotting import bar_panels, print_table, write_report

REPO_ROOT = Path(__file__).resolve().parent.parent
CHILD = Path(__file__).resolve().parent / "offline_child.py"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="llama3-8b", help="built-in preset or a checkpoint folder")
    parser.add_argument("--checkpoint-dir", default=None, help="where preset checkpoints are written")
    parser.add_argument("--engines", default="vllm,radixfleet",
                        help="comma-separated: radixfleet, radixfleet@DIR (another source tree), vllm")
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


def _workload(args, vocab: int) -> dict:
    """One set of prompts per repeat (seed, seed+1, ...): the same distribution, different token ids, so a
    repeat is not served from the prefix cache that the run before it filled."""
    top = min(args.token_id_max, vocab)
    runs = []
    for repeat in range(args.repeats * len(args.sampling.split(","))):  # one set per (sampling mode, repeat)
        rng = random.Random(args.seed + repeat)
        prompts, outputs = [], []
        for _ in range(args.num_seqs):
            prompts.append([rng.randrange(top) for _ in range(rng.randint(args.min_len, args.max_len))])
            outputs.append(rng.randint(args.min_len, args.max_len))
        runs.append({"prompts": prompts, "output_lens": outputs})
    return {"runs": runs}


def _engine_options(args) -> dict:
    ours = {"max_running_requests": args.max_num_seqs, "max_model_len": args.max_model_len,
            "mem_fraction": args.mem_fraction, "seed": args.seed}
    theirs = {"max_num_seqs": args.max_num_seqs, "max_model_len": args.max_model_len,
              "gpu_memory_utilization": args.mem_fraction, "seed": args.seed}
    if args.max_num_batched_tokens:
        ours["max_num_batched_tokens"] = theirs["max_num_batched_tokens"] = args.max_num_batched_tokens
    return {"radixfleet": ours, "vllm": theirs}


def _child_command(spec: str, args, workload_path: Path, out_path: Path) -> tuple[list[str], dict, str]:
    env = dict(os.environ)
    if spec == "vllm":
        env["PYTHONPATH"] = args.vllm_path
        env.setdefault("VLLM_USE_FLASHINFER_SAMPLER", "0")
        env.setdefault("HF_HUB_OFFLINE", "1")
        engine, cwd = "vllm", tempfile.gettempdir()
    elif spec == "radixfleet" or spec.startswith("radixfleet@"):
        tree = Path(spec.split("@", 1)[1]).resolve() if "@" in spec else REPO_ROOT
        if not (tree / "worker").is_dir():
            raise SystemExit(f"--engines {spec}: {tree} holds no radixfleet source tree (no worker/ folder)")
        # the tree first; whatever PYTHONPATH already holds (e.g. wheels for missing packages) after it
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(tree), os.environ.get("PYTHONPATH", "")) if p)
        engine, cwd = "radixfleet", str(tree)
    else:
        raise SystemExit(f"--engines: unknown engine {spec!r} (radixfleet, radixfleet@DIR, vllm)")
    command = [sys.executable, str(CHILD), "--engine", engine, "--label", spec,
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
    from worker.models.config import ModelConfig

    engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    sampling = [s.strip() for s in args.sampling.split(",") if s.strip()]
    folder = resolve_checkpoint(args.model, args.checkpoint_dir)
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
    for spec in engines:
        result_path = out_dir / f"vs_vllm_{spec.replace('/', '_').replace('@', '_at_')}.part.json"
        command, env, cwd = _child_command(spec, args, workload_path, result_path)
        print(f"=== {spec}: {' '.join(command[1:3])} (cwd {cwd})", flush=True)
        code = subprocess.call(command, env=env, cwd=cwd)
        if code != 0 or not result_path.is_file():
            print(f"{spec} failed (exit {code}): skipped in the table", flush=True)
            skipped.append(spec)
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
