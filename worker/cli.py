"""The `radixfleet` command. Each subcommand lives in its own module, imported only when used,
so `radixfleet router` never pays for importing torch.

A subcommand module provides `add_arguments(parser)` and `run(args) -> int`.
"""

from __future__ import annotations

import argparse
import importlib
import sys

SUBCOMMANDS = {
    "up": ("router.launcher", "start the router and local workers (one per GPU; 2 CPU workers without one)"),
    "worker": ("worker.server.cli", "start one worker: OpenAI endpoint in front of one engine"),
    "router": ("router.cli", "start the cache-aware router in front of running workers"),
    "generate": ("worker.generate_cli", "offline generation from the command line"),
    "make-checkpoint": ("worker.models.checkpoint_cli", "write a built-in model as a Hugging Face folder"),
    "sim-fleet": ("worker.sim_fleet", "start many sim workers (cost-model executor) in one process"),
    "bench": ("bench.cli", "run a benchmark (engine, serve, router, cache-hit)"),
}


def build_parser(argv: list[str]) -> tuple[argparse.ArgumentParser, object | None]:
    parser = argparse.ArgumentParser(prog="radixfleet", description="cache-aware LLM serving fleet")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    chosen = None
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        sub_parser = sub.add_parser(name, help=help_text, description=help_text)
        # Import only the module of the subcommand being run (its arguments are needed to parse).
        if argv and argv[0] == name:
            module = importlib.import_module(module_name)
            module.add_arguments(sub_parser)
            sub_parser.set_defaults(_run=module.run)
            chosen = module
    return parser, chosen


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser, _ = build_parser(argv)
    args = parser.parse_args(argv)
    if not getattr(args, "_run", None):
        parser.print_help()
        return 2
    try:
        return int(args._run(args) or 0)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
