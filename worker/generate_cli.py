"""`radixfleet generate`: offline generation from the command line (handy for smoke tests)."""

from __future__ import annotations

import argparse
import json
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("prompts", nargs="*", help="prompts (default: one built-in prompt)")
    parser.add_argument("--model", default="demo", help="Hugging Face folder or built-in name (default: demo)")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="where the model runs")
    parser.add_argument("--chat", action="store_true", help="wrap each prompt as a user message (chat template)")
    parser.add_argument("--max-tokens", type=int, default=32, help="tokens to generate per choice")
    parser.add_argument("--temperature", type=float, default=0.0,
                        help="0 is greedy: every choice of --n is then the same text; use e.g. 0.8 for variety")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass")
    parser.add_argument("--seed", type=int, default=None, help="sampling seed; None: random")
    parser.add_argument("--n", type=int, default=1, help="choices per prompt (differ only with --temperature > 0)")
    parser.add_argument("--json", action="store_true", help="print one JSON object per prompt")
    parser.add_argument("--cpu-threads", default="auto", metavar="N|auto",
                        help="torch threads on CPU; auto: $OMP_NUM_THREADS when set, else every usable core")


def run(args: argparse.Namespace) -> int:
    from worker.config import ConfigError
    from worker.server.cli import UsageError, apply_cpu_threads, resolve_cpu_threads

    try:
        apply_cpu_threads(resolve_cpu_threads(args.cpu_threads))  # before torch is imported
    except UsageError as exc:
        print(f"radixfleet generate: {exc}", file=sys.stderr)
        return 2
    from worker.llm import LLM
    from worker.sampling_params import InvalidParameter, SamplingParams

    prompts = args.prompts or ["The quick brown fox"]
    try:
        params = SamplingParams(
            n=args.n, max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p, seed=args.seed
        )
        llm = LLM(args.model, device=args.device)
    except (InvalidParameter, ConfigError, ValueError) as exc:
        print(f"radixfleet generate: {exc}", file=sys.stderr)
        return 2
    if args.chat:
        outputs = llm.chat([[{"role": "user", "content": p}] for p in prompts], params)
    else:
        outputs = llm.generate(prompts, params)
    for prompt, out in zip(prompts, outputs):
        if args.json:
            print(json.dumps({"prompt": prompt, "choices": [
                {"text": c.text, "finish_reason": c.finish_reason, "tokens": len(c.token_ids)} for c in out.outputs
            ]}))
            continue
        for c in out.outputs:
            print(f"--- {prompt!r} [choice {c.index}, {len(c.token_ids)} tokens, {c.finish_reason}]")
            print(c.text)
    return 0
