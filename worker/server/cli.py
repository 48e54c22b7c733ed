"""`radixfleet worker`: one engine behind an OpenAI-compatible HTTP endpoint.

Engine options are generated from the fields of `EngineConfig`, so every engine setting has a flag
(`--page-size`, `--kv-cache-tokens`, `--max-num-batched-tokens`, `--policy`, ...) and a new field
gets one without touching this file. `add_engine_arguments` / `engine_config_from_args` are reused
by benchmarks that start workers.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import typing

from worker.config import DEVICES, EXECUTORS, POLICIES, ConfigError, EngineConfig
from worker.server.drop_in import add_drop_in_arguments, drop_in_options_from_args

_CHOICES = {"device": DEVICES, "executor": EXECUTORS, "policy": POLICIES,
            "dtype": ("auto", "float32", "float16", "bfloat16"), "overlap_schedule": ("auto", "on", "off")}
_HELP = {
    "model": "local Hugging Face checkpoint folder or built-in name (demo, qwen3-0.6b, llama3-8b, ...)",
    "device": "auto: cuda when a GPU is visible, else cpu",
    "executor": "auto follows the device; sim runs a cost model with no tensors",
    "kv_cache_tokens": "KV budget in tokens (cpu and sim executors)",
    "sim_profile": "sim executor: calibration JSON (radixfleet bench calibrate) or built-in name, e.g. h200-llama3-8b",
    "mem_fraction": "fraction of free GPU memory the KV pool may take (cuda)",
    "max_num_batched_tokens": "token budget of one engine step (decodes + prefill chunks)",
    "max_waiting_requests": "beyond this many waiting requests new ones get HTTP 503 + Retry-After",
    "max_model_len": "context length; None: the model's",
    "policy": "scheduling policy",
    "overlap_schedule": "prepare step N+1 on the CPU while the GPU runs step N; auto: on for cuda, off for cpu",
}


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_engine_arguments(parser: argparse.ArgumentParser, skip: tuple[str, ...] = ()) -> None:
    """One flag per EngineConfig field, typed and defaulted from the dataclass."""
    hints = typing.get_type_hints(EngineConfig)
    group = parser.add_argument_group("engine")
    for item in dataclasses.fields(EngineConfig):
        if item.name in skip:
            continue
        default = item.default
        kind = hints[item.name]
        help_text = _HELP.get(item.name, "")
        if kind is bool:
            group.add_argument(_flag(item.name), dest=item.name, action=argparse.BooleanOptionalAction,
                               default=default, help=help_text)
            continue
        scalar = next((t for t in typing.get_args(kind) if t is not type(None)), kind)  # int | None -> int
        group.add_argument(_flag(item.name), dest=item.name, type=scalar, default=default,
                           choices=_CHOICES.get(item.name), help=f"{help_text} (default: {default})".strip())


def engine_config_from_args(args: argparse.Namespace) -> EngineConfig:
    names = {item.name for item in dataclasses.fields(EngineConfig)}
    return EngineConfig(**{name: getattr(args, name) for name in names if hasattr(args, name)}).validate()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    parser.add_argument("--port", type=int, default=8000, help="HTTP port (default: 8000)")
    parser.add_argument("--served-model-name", nargs="+", default=None, metavar="NAME",
                        help="model name(s) clients use in 'model' (default: the --model value)")
    parser.add_argument("--shutdown-timeout", type=float, default=30.0, metavar="S",
                        help="on SIGTERM, seconds in-flight requests may run on before they are aborted")
    parser.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    add_drop_in_arguments(parser)
    add_engine_arguments(parser)
    parser.add_argument("--metrics-prefix", choices=("radixfleet", "vllm"), default=None,
                        help="vllm: also export every radixfleet: metric as vllm:* for vLLM dashboards "
                             "(default: $RADIXFLEET_METRICS_PREFIX, else radixfleet)")


def run(args: argparse.Namespace) -> int:
    from worker.server.serve import ServeOptions, run_server

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = engine_config_from_args(args)
    except ConfigError as error:
        print(f"radixfleet worker: {error}")
        return 2
    if not (0 < args.port < 65536):
        print(f"radixfleet worker: --port must be between 1 and 65535, got {args.port}")
        return 2
    from worker.server.metrics import configure_metrics

    try:
        configure_metrics(args.metrics_prefix, config)
    except ValueError as error:  # a bad RADIXFLEET_METRICS_PREFIX
        print(f"radixfleet worker: {error}")
        return 2
    options = ServeOptions(config, args.host, args.port, args.served_model_name or [], args.shutdown_timeout,
                           drop_in=drop_in_options_from_args(args))
    return run_server(options)
