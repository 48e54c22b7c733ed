"""The `radixfleet` command. Each subcommand lives in its own module, imported only when used,
so `radixfleet router` never pays for importing torch.

A subcommand module provides `add_arguments(parser)` and `run(args) -> int`.

An unknown flag is answered with the subcommand's own usage, a "did you mean" suggestion, and, for
flags of other servers that name a feature radixfleet does not have (tensor parallelism, ...), one
line saying so.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from worker.flag_hints import did_you_mean

SUBCOMMANDS = {
    "up": ("router.launcher", "start the router and local workers (one per GPU; 2 CPU workers without one)"),
    "worker": ("worker.server.cli", "start one worker: OpenAI endpoint in front of one engine"),
    "router": ("router.cli", "start the cache-aware router in front of running workers"),
    "generate": ("worker.generate_cli", "offline generation from the command line"),
    "make-checkpoint": ("worker.models.checkpoint_cli", "write a built-in model as a Hugging Face folder"),
    "sim-fleet": ("worker.sim_fleet", "start many sim workers (cost-model executor) in one process"),
    "bench": ("bench.cli", "run a benchmark (engine, serve, router, cache-hit)"),
}

SHOW_DEFAULTS = ("up", "worker", "generate")  # the router writes its own defaults into its help

_DATA_PARALLEL = "radixfleet runs one whole model per worker (data parallel): `radixfleet up` starts one per GPU"
# Flags of vLLM / SGLang for features radixfleet does not have, and what to do instead.
UNSUPPORTED_FLAGS = {
    "--tensor-parallel-size": f"tensor parallelism is not supported; {_DATA_PARALLEL}",
    "--tp": f"tensor parallelism is not supported; {_DATA_PARALLEL}",
    "--tp-size": f"tensor parallelism is not supported; {_DATA_PARALLEL}",
    "--pipeline-parallel-size": f"pipeline parallelism is not supported; {_DATA_PARALLEL}",
    "--pp-size": f"pipeline parallelism is not supported; {_DATA_PARALLEL}",
    "--data-parallel-size": "use `radixfleet up --num-workers N` (one worker per GPU) instead",
    "--dp-size": "use `radixfleet up --num-workers N` (one worker per GPU) instead",
    "--quantization": "quantized checkpoints are not supported: use a float16 / bfloat16 safetensors folder",
    "--trust-remote-code": "not needed: radixfleet runs its own Llama-family model code, never the checkpoint's",
    "--enforce-eager": "use --no-enable-cuda-graphs",
    "--speculative-config": "speculative decoding is not supported",
    "--enable-lora": "LoRA adapters are not supported",
}


class CliParser(argparse.ArgumentParser):
    """ArgumentParser whose errors end with what to do (the usage shown is the subcommand's own).

    Prefixes of flags are not accepted: `--max-num-seq` is answered "did you mean --max-num-seqs?"
    rather than silently taken for it."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def unknown_arguments_error(self, extras: list[str]) -> None:
        flags = [a.split("=", 1)[0] for a in extras if a.startswith("-")]
        if not flags:
            self.error(f"unrecognized arguments: {' '.join(extras)}")
        lines = []
        for flag in flags:
            if flag in UNSUPPORTED_FLAGS:
                lines.append(f"{flag}: {UNSUPPORTED_FLAGS[flag]}")
                continue
            known = [s for action in self._actions for s in action.option_strings if s.startswith("--")]
            hint = did_you_mean(flag, known, f"`radixfleet {self.prog.split()[-1]} --help` lists them")
            lines.append(f"unrecognized argument {flag}{hint}")
        self.error("\n".join(lines))


def build_parser(argv: list[str]) -> tuple[argparse.ArgumentParser, argparse.ArgumentParser | None]:
    """The top-level parser and the parser of the subcommand named in argv (None when there is none)."""
    parser = CliParser(prog="radixfleet", description="cache-aware LLM serving fleet")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    chosen = None
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        # --help shows every default on the serving commands.
        formatter = argparse.ArgumentDefaultsHelpFormatter if name in SHOW_DEFAULTS else argparse.HelpFormatter
        sub_parser = sub.add_parser(name, help=help_text, description=help_text, formatter_class=formatter)
        # Import only the module of the subcommand being run (its arguments are needed to parse).
        if argv and argv[0] == name:
            module = importlib.import_module(module_name)
            module.add_arguments(sub_parser)
            sub_parser.set_defaults(_run=module.run)
            chosen = sub_parser
    return parser, chosen


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser, chosen = build_parser(argv)
    args, extras = parser.parse_known_args(argv)
    if extras:
        (chosen if isinstance(chosen, CliParser) else parser).unknown_arguments_error(extras)
    if not getattr(args, "_run", None):
        parser.print_help()
        return 2
    try:
        return int(args._run(args) or 0)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
