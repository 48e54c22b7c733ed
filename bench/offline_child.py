"""One engine's side of `radixfleet bench vs-vllm`, run in its own process: radixfleet or vLLM.

Standalone on purpose: it imports nothing from this repository, so the same file drives vLLM (whose
PYTHONPATH must not see our top-level `kernels` package) and radixfleet from any source tree (the
tree under test is whatever `worker` resolves to on PYTHONPATH, which is how a before/after pair runs
in one command). It reads a workload JSON written by bench/vs_vllm.py and writes one result JSON.

Per sampling mode: one warm-up request, then `repeats` timed passes of the offline workload, each on its own prompt set
(output tokens / wall seconds). Decode time per token at batch B: the time of B requests with
`decode_steps + 1` output tokens minus the time with 1 output token, over `decode_steps`.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time


def _sampling(mode: str) -> dict:
    if mode == "greedy":
        return {"temperature": 0.0}
    if mode.startswith("t"):
        return {"temperature": float(mode[1:])}
    raise SystemExit(f"unknown sampling mode {mode!r}: use greedy or tX (e.g. t0.6)")


class RadixfleetRunner:
    def __init__(self, model: str, options: dict):
        from worker import LLM, SamplingParams

        self.SamplingParams = SamplingParams
        self.llm = LLM(model, **{"device": "cuda", **options})

    def generate(self, prompts: list[list[int]], outputs: list[int], sampling: dict) -> int:
        params = [self.SamplingParams(max_tokens=n, ignore_eos=True, **sampling) for n in outputs]
        results = self.llm.generate(prompts, params, use_tqdm=False)
        return sum(len(r.outputs[0].token_ids) for r in results)


class VllmRunner:
    def __init__(self, model: str, options: dict):
        from vllm import LLM, SamplingParams

        self.SamplingParams = SamplingParams
        self.llm = LLM(model=model, **options)

    def generate(self, prompts: list[list[int]], outputs: list[int], sampling: dict) -> int:
        params = [self.SamplingParams(max_tokens=n, ignore_eos=True, **sampling) for n in outputs]
        results = self.llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        return sum(len(r.outputs[0].token_ids) for r in results)


def _timed(runner, prompts, outputs, sampling) -> tuple[float, int]:
    t0 = time.perf_counter()
    tokens = runner.generate(prompts, outputs, sampling)
    return time.perf_counter() - t0, tokens


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--engine", required=True, choices=["radixfleet", "vllm"])
    parser.add_argument("--label", required=True)
    parser.add_argument("--workload", required=True, help="workload JSON from bench/vs_vllm.py")
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    work = json.load(open(args.workload))
    options = work["engine_options"].get(args.label, work["engine_options"][args.engine])  # a variant's own
    runner_class = RadixfleetRunner if args.engine == "radixfleet" else VllmRunner
    print(f"[{args.label}] starting {args.engine} on {work['model']} with {options}", flush=True)
    t0 = time.perf_counter()
    runner = runner_class(work["model"], options)
    result = {"label": args.label, "engine": args.engine, "startup_s": time.perf_counter() - t0,
              "engine_options": options, "offline": [], "decode": []}
    rng = random.Random(work["seed"] + 7)
    warmup = [[rng.randrange(work["vocab"]) for _ in range(16)]]
    sets = iter(work["runs"])  # a fresh prompt set for every timed pass: nothing is already cached
    for mode in work["sampling"]:
        sampling = _sampling(mode)
        runner.generate(warmup, [8], sampling)
        for run in range(1, work["repeats"] + 1):
            prompts = next(sets)
            seconds, tokens = _timed(runner, prompts["prompts"], prompts["output_lens"], sampling)
            row = {"sampling": mode, "run": run, "seconds": seconds, "output_tokens": tokens,
                   "output_tok_s": tokens / seconds}
            result["offline"].append(row)
            print(f"[{args.label}] offline {mode} run {run}: {tokens} tokens in {seconds:.2f} s "
                  f"= {tokens / seconds:,.0f} tok/s", flush=True)
    steps = work["decode_steps"]
    for batch in work["decode_batches"]:
        prompts = [[rng.randrange(work["vocab"]) for _ in range(work["decode_context"])] for _ in range(batch)]
        greedy = _sampling("greedy")
        runner.generate(prompts, [steps + 1] * batch, greedy)  # warm this batch size once
        best = float("inf")
        for _ in range(2):
            short, _ = _timed(runner, prompts, [1] * batch, greedy)
            long, _ = _timed(runner, prompts, [steps + 1] * batch, greedy)
            best = min(best, (long - short) / steps)
        result["decode"].append({"batch": batch, "ms_per_token": best * 1000})
        print(f"[{args.label}] decode batch {batch}: {best * 1000:.2f} ms per token", flush=True)
    json.dump(result, open(args.out, "w"), indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
