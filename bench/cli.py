"""`radixfleet bench NAME ...`: dispatches to the benchmark modules under bench/.

Each benchmark module exposes add_arguments(parser) and run(args) -> int, like the other subcommands.
"""

from __future__ import annotations

import argparse
import importlib
import sys

BENCHMARKS = {
    "engine": ("bench.engine_bench", "offline engine throughput, latency, prefill and cached TTFT (GPU)"),
    "serve": ("bench.serve_bench", "replay a workload over HTTP against a worker or the router"),
    "router": ("bench.router_bench", "router overhead against instant stand-in workers"),
    "cache-hit": ("bench.cache_hit_bench", "multi-turn chat cache-hit rate per routing policy"),
    "fleet": ("bench.fleet_bench", "Locust workloads through each router on fresh workers (cpu, sim, cuda)"),
    "multi-router": ("bench.multi_router_bench", "hit rate with 1, 2, 4 router replicas in front of the same sim workers"),
    "tree": ("bench.tree_bench", "router tree lookup cost and memory at 100k+ prompts"),
    "calibrate": ("bench.calibrate", "fit the sim executor's step-time cost model from real engine steps (GPU)"),
    "kernels": ("bench.kernel_bench", "Triton attention kernels against torch (GPU)"),
    "vs-vllm": ("bench.vs_vllm", "radixfleet and vLLM on the same checkpoint and workload, offline and served (GPU)"),
    "fuzz": ("bench.fuzz_soak", "fuzzed request bodies at a worker and the router: statuses, 5xx, slow, RSS"),
    "overload": ("bench.overload_soak", "10x overload, a SIGSTOPped worker and a soak through the router: lost, RSS"),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("benchmark", choices=sorted(BENCHMARKS), help="which benchmark to run")
    parser.add_argument("rest", nargs=argparse.REMAINDER, help="the benchmark's own options (see NAME --help)")


def run(args: argparse.Namespace) -> int:
    module_name, description = BENCHMARKS[args.benchmark]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        print(f"radixfleet bench {args.benchmark}: not available ({exc})", file=sys.stderr)
        return 2
    parser = argparse.ArgumentParser(prog=f"radixfleet bench {args.benchmark}", description=description)
    module.add_arguments(parser)
    return int(module.run(parser.parse_args(args.rest)) or 0)
