"""`radixfleet make-checkpoint`: write a built-in model as a Hugging Face checkpoint folder.

    radixfleet make-checkpoint --list
    radixfleet make-checkpoint --preset demo --out /tmp/demo
    radixfleet make-checkpoint --preset llama3-8b --out /data/llama3-8b --device cuda --shard-size 2GB
"""

from __future__ import annotations

import argparse
import re
import sys

from worker.models.checkpoint_writer import DEFAULT_MAX_SHARD_BYTES, count_parameters, write_checkpoint
from worker.models.presets import PRESETS, get_preset, preset_names

_SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
               "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(text: str) -> int:
    """A byte count written as 4GB, 500MB, 1.5GiB or 123456 (decimal units, binary with 'i')."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", text)
    unit = match.group(2).upper() if match else None
    if not match or unit not in _SIZE_UNITS:
        raise ValueError(f"cannot read the size {text!r}; write it like 4GB, 500MB, 2GiB or a number of bytes")
    size = int(float(match.group(1)) * _SIZE_UNITS[unit])
    if size <= 0:
        raise ValueError(f"the size {text!r} must be positive")
    return size


def format_count(count: int) -> str:
    """8030261248 -> '8.03B', 596049920 -> '596M'."""
    for divisor, suffix in ((10**9, "B"), (10**6, "M"), (10**3, "K")):
        if count >= divisor:
            value = count / divisor
            return f"{value:.2f}{suffix}" if value < 10 else f"{value:.3g}{suffix}"
    return str(count)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", metavar="NAME", help=f"built-in model: {', '.join(preset_names())}")
    parser.add_argument("--out", metavar="DIR", help="folder to create (must not exist, or be empty)")
    parser.add_argument("--seed", type=int, default=0, help="random seed of the weights (default 0)")
    parser.add_argument("--dtype", choices=["float32", "float16", "bfloat16"],
                        help="weight dtype (default: the preset's, float32 for small ones, bfloat16 for real shapes)")
    parser.add_argument("--shard-size", default=None, metavar="SIZE",
                        help="largest safetensors file, e.g. 4GB (default), 500MB; bigger models are sharded")
    parser.add_argument("--device", default="cpu",
                        help="where to draw the random numbers (cuda is much faster for the real shapes; "
                             "each device gives its own deterministic weights)")
    parser.add_argument("--force", action="store_true", help="replace --out if it already holds files")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument("--list", action="store_true", help="list the built-in models and exit")


def _print_presets() -> None:
    print(f"{'name':<14} {'params':>8}  {'dtype':<9} {'chat':<8} description")
    for name in preset_names():
        preset = PRESETS[name]
        config = preset.hf_config()
        print(f"{name:<14} {format_count(count_parameters(config)):>8}  {config['torch_dtype']:<9} "
              f"{preset.tokenizer_family:<8} {preset.description}")


def _error(message: str) -> int:
    print(f"radixfleet make-checkpoint: error: {message}", file=sys.stderr)
    return 2


def run(args: argparse.Namespace) -> int:
    if args.list:
        _print_presets()
        return 0
    if not args.preset:
        return _error(f"--preset is required (built-ins: {', '.join(preset_names())}; see --list)")
    try:
        preset = get_preset(args.preset)
    except ValueError as error:
        return _error(str(error))
    if not args.out:
        return _error("--out is required: the folder to write the checkpoint into")
    try:
        shard_bytes = parse_size(args.shard_size) if args.shard_size else DEFAULT_MAX_SHARD_BYTES
    except ValueError as error:
        return _error(f"--shard-size: {error}")
    try:
        folder = write_checkpoint(preset.name, args.out, seed=args.seed, dtype=args.dtype,
                                  max_shard_bytes=shard_bytes, device=args.device, progress=not args.quiet,
                                  overwrite=args.force)
    except FileExistsError as error:
        print(f"radixfleet make-checkpoint: error: {error} (or pass --force)", file=sys.stderr)
        return 1
    params = format_count(count_parameters(preset.hf_config()))
    print(f"wrote {preset.name} ({params} parameters, seed {args.seed}) to {folder}")
    return 0
