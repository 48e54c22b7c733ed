"""`radixfleet worker`: one engine behind an OpenAI-compatible HTTP endpoint.

Engine options are generated from the fields of `EngineConfig`, so every engine setting has a flag
(`--page-size`, `--kv-cache-tokens`, `--max-num-batched-tokens`, `--policy`, ...) and a new field
gets one without touching this file. `add_engine_arguments` / `engine_config_from_args` are reused
by benchmarks that start workers.

vLLM / SGLang spellings are accepted where the meaning is ours too (`--gpu-memory-utilization`,
`--max-num-seqs`, `--enable-prefix-caching`, `--model-path`, a positional model, ...).
`add_worker_options` / `worker_argv` let `radixfleet up` take every worker option and pass it on.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
import typing
from pathlib import Path

from worker.config import DEVICES, EXECUTORS, POLICIES, ConfigError, EngineConfig
from worker.server.drop_in import add_drop_in_arguments, drop_in_options_from_args

_CHOICES = {"device": DEVICES, "executor": EXECUTORS, "policy": POLICIES,
            "dtype": ("auto", "float32", "float16", "bfloat16"), "overlap_schedule": ("auto", "on", "off")}
_HELP = {
    "model": "local Hugging Face checkpoint folder or built-in name (demo, qwen3-0.6b, llama3-8b, ...); "
             "hub ids must already be in the local Hugging Face cache",
    "device": "auto: cuda when a GPU is visible, else cpu",
    "executor": "auto follows the device; sim runs a cost model with no tensors",
    "kv_cache_tokens": "KV budget in tokens (cpu and sim executors)",
    "sim_profile": "sim executor: calibration JSON (radixfleet bench calibrate) or built-in name, e.g. h200-llama3-8b",
    "mem_fraction": "fraction of free GPU memory the KV pool may take (cuda)",
    "max_num_batched_tokens": "token budget of one engine step (decodes + prefill chunks); default: 8192 for "
                              "models under 3B parameters on a GPU, else 2048 (measured: worker/engine/step_budget.py)",
    "max_running_requests": "most requests decoding at once",
    "max_waiting_requests": "beyond this many waiting requests new ones get HTTP 503 + Retry-After",
    "max_model_len": "context length; None: the model's",
    "policy": "scheduling policy",
    "enable_prefix_cache": "reuse the KV of shared prompt prefixes (radix cache)",
    "priority_aging_s": "priority policy: a waiting request gains one level per this many seconds",
    "new_token_ratio_init": "admission keeps room for this fraction of running requests' remaining tokens",
    "new_token_ratio_min": "the floor that ratio decays to while nothing is preempted",
    "seed": "base seed of sampling",
    "cuda_graph_max_bs": "largest decode batch captured as a CUDA graph",
    "enable_cuda_graphs": "replay decode steps as CUDA graphs (cuda); off also turns off the piecewise graphs",
    "piecewise_cuda_graph_max_tokens": "prefill / extend / mixed steps up to this many tokens run all but attention "
                                       "as CUDA graphs of token-count buckets (cuda); 0: off",
    "progress": "progress bars while loading",
    "overlap_schedule": "prepare step N+1 on the CPU while the GPU runs step N; auto: on for cuda, off for cpu",
}
# Other servers' names for the same settings (vLLM, then SGLang).
_ALIASES = {
    "model": ("--model-path",),
    "mem_fraction": ("--gpu-memory-utilization", "--mem-fraction-static"),
    "max_running_requests": ("--max-num-seqs",),
    "enable_prefix_cache": ("--enable-prefix-caching",),
    "policy": ("--scheduling-policy",),
}
_DEMO_MODEL = "demo"
DEMO_DEFAULT_MAX_TOKENS = 64  # the demo model writes random text: a short answer is all a first try needs


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_engine_arguments(parser: argparse.ArgumentParser, skip: tuple[str, ...] = (),
                         renamed: dict[str, tuple[str, ...]] | None = None) -> list[argparse.Action]:
    """One flag per EngineConfig field, typed and defaulted from the dataclass (plus its aliases).

    `renamed`: field -> the only option strings to use for it, the first naming its dest (`up` has its
    own --policy, so the worker's is --scheduling-policy, dest scheduling_policy, there)."""
    hints = typing.get_type_hints(EngineConfig)
    group = parser.add_argument_group("engine")
    actions = []
    for item in dataclasses.fields(EngineConfig):
        if item.name in skip:
            continue
        default = item.default
        kind = hints[item.name]
        names = (renamed or {}).get(item.name) or (_flag(item.name), *_ALIASES.get(item.name, ()))
        dest = names[0][2:].replace("-", "_")  # a renamed flag has its own dest (see worker_argv)
        help_text = _HELP.get(item.name) or item.name.replace("_", " ")
        if kind is bool:
            actions.append(group.add_argument(*names, dest=dest, action=argparse.BooleanOptionalAction,
                                              default=default, help=help_text))
            continue
        scalar = next((t for t in typing.get_args(kind) if t is not type(None)), kind)  # int | None -> int
        actions.append(group.add_argument(*names, dest=dest, type=scalar, default=default,
                                          choices=_CHOICES.get(item.name), help=help_text))
    return actions


def engine_config_from_args(args: argparse.Namespace) -> EngineConfig:
    names = {item.name for item in dataclasses.fields(EngineConfig)}
    return EngineConfig(**{name: getattr(args, name) for name in names if hasattr(args, name)}).validate()


def add_worker_options(parser: argparse.ArgumentParser, for_up: bool = False) -> list[argparse.Action]:
    """The options of one worker besides where it listens. Returns their actions (see `worker_argv`).

    for_up: `radixfleet up` owns --policy (the router's), --log-level, --shutdown-timeout and --api-key,
    and gives each worker its share of the cores; the scheduling policy is --scheduling-policy there."""
    group = parser.add_argument_group("worker")
    actions = [
        group.add_argument("--served-model-name", nargs="+", default=None, metavar="NAME",
                           help="model name(s) clients use in 'model'; None: the --model value"),
        group.add_argument("--tokenizer", default=None, metavar="DIR",
                           help="folder of tokenizer.json / tokenizer_config.json for the HTTP side (encode, "
                                "chat template, decode); None: the model folder's"),
        group.add_argument("--chat-template", default=None, metavar="FILE_OR_TEXT",
                           help="Jinja chat template (a file, or the template itself) replacing the model's"),
        group.add_argument("--default-max-tokens", default="auto", metavar="N|auto|none",
                           help=f"chat max_tokens when a request sets none; auto: {DEMO_DEFAULT_MAX_TOKENS} on "
                                "the demo model, else the rest of the context (as 'none')"),
        group.add_argument("--cpu-threads", default="auto", metavar="N|auto",
                           help="torch / OpenMP threads of this worker; auto: $OMP_NUM_THREADS when set, else "
                                "1 with --executor sim, else every core this process may use (`radixfleet up` "
                                "gives each worker its share)"),
    ]
    if not for_up:
        parser.add_argument("--api-key", default=os.environ.get("RADIXFLEET_API_KEY"),
                            help="clients must send 'Authorization: Bearer KEY' (env RADIXFLEET_API_KEY); "
                                 "/health and /metrics stay open for probes")
        parser.add_argument("--shutdown-timeout", type=float, default=30.0, metavar="S",
                            help="on SIGTERM, seconds in-flight requests may run on before they are aborted")
        parser.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
        add_protection_arguments(parser)
        parser.add_argument("--access-log", default="off", choices=("off", "text", "json"),
                            help="one line per HTTP request on stderr (time, method, path, status, duration, "
                                 "request id, token counts; never prompt text); default off")
    renamed = {"policy": ("--scheduling-policy",)} if for_up else None
    return actions + add_drop_in_arguments(parser) + add_engine_arguments(parser, renamed=renamed)


def add_protection_arguments(parser: argparse.ArgumentParser) -> None:
    """Slow clients, connection and request bounds (worker.server.connection_guard, worker.server.app)."""
    group = parser.add_argument_group("protection")
    group.add_argument("--header-timeout", type=float, default=15.0, metavar="S",
                       help="seconds a connection may take to send a complete request head (also the idle "
                            "keep-alive timeout)")
    group.add_argument("--body-timeout", type=float, default=60.0, metavar="S",
                       help="seconds a request body may take to arrive (HTTP 408 past it)")
    group.add_argument("--max-connections", type=int, default=0, metavar="N",
                       help="open connections at most, beyond them 503 and close; 0: what the open-file limit allows")
    group.add_argument("--max-active-requests", type=int, default=None, metavar="N",
                       help="generation requests in the frontend at most, beyond them 503 + Retry-After; "
                            "default: --max-running-requests + --max-waiting-requests")
    group.add_argument("--max-generated-tokens", type=int, default=None, metavar="N",
                       help="n * max_tokens a request may ask for (HTTP 400 above); default: 131072, "
                            "and never below the context length")


def _check_protection_arguments(args: argparse.Namespace) -> None:
    if args.header_timeout <= 0 or args.body_timeout <= 0:
        raise UsageError("--header-timeout and --body-timeout must be > 0 (seconds)")
    if args.max_connections < 0:
        raise UsageError("--max-connections must be >= 0 (0: derived from the open-file limit)")
    for flag, value in (("--max-active-requests", args.max_active_requests),
                        ("--max-generated-tokens", args.max_generated_tokens)):
        if value is not None and value < 1:
            raise UsageError(f"{flag} must be >= 1, got {value}")


def worker_argv(args: argparse.Namespace, actions: list[argparse.Action], skip: tuple[str, ...] = ()) -> list[str]:
    """The command-line options that reproduce the non-default values of `actions` in `args`."""
    argv: list[str] = []
    for action in actions:
        if action.dest in skip:
            continue
        value = getattr(args, action.dest, action.default)
        if value == action.default:
            continue
        flag = action.option_strings[0]
        if isinstance(action, argparse.BooleanOptionalAction):
            argv.append(flag if value else "--no-" + flag[2:])
        elif isinstance(value, list):
            argv += [flag, *map(str, value)]
        else:
            argv += [flag, str(value)]
    return argv


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model_positional", nargs="?", default=None, metavar="MODEL",
                        help="the same as --model (`radixfleet worker MODEL`)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    parser.add_argument("--port", type=int, default=8000, help="HTTP port")
    add_worker_options(parser)
    parser.add_argument("--metrics-prefix", choices=("radixfleet", "vllm"), default=None,
                        help="vllm: also export every radixfleet: metric as vllm:* for vLLM dashboards "
                             "(default: $RADIXFLEET_METRICS_PREFIX, else radixfleet)")


class UsageError(ValueError):
    """A bad option: the message names the flag and the fix."""


def take_positional_model(args: argparse.Namespace, default_model: str) -> None:
    """`radixfleet worker MODEL` / `up MODEL`: the positional model, unless --model says otherwise."""
    positional = getattr(args, "model_positional", None)
    if positional is None:
        return
    if args.model not in (default_model, positional):
        raise UsageError(f"two models given: {positional!r} and --model {args.model!r}; give one")
    args.model = positional


# The sim executor's only torch work is the sampler over a few hundred ids per row: a pool of threads
# per tiny op costs more than it saves, and on a shared or loaded host its waits multiplied the engine
# process's CPU time per served request by 3.7 (bench/reports/host_path_sim.md).
SIM_CPU_THREADS = 1


def resolve_cpu_threads(value: str, env: typing.Mapping[str, str] | None = None, executor: str = "auto") -> int:
    """Threads for torch's CPU pools: a number, or auto ($OMP_NUM_THREADS, else SIM_CPU_THREADS for the
    sim executor, else every usable core)."""
    env = os.environ if env is None else env
    if value == "auto":
        preset = env.get("OMP_NUM_THREADS", "")
        if preset.isdigit() and int(preset) > 0:
            return int(preset)
        return SIM_CPU_THREADS if executor == "sim" else usable_cores()
    if not value.isdigit() or int(value) < 1:
        raise UsageError(f"--cpu-threads must be a positive number or auto, got {value!r}")
    return int(value)


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def apply_cpu_threads(threads: int) -> None:
    """Size torch's thread pools in this process and in the engine process it spawns (which reads the
    environment when it imports torch). Must run before torch does any work."""
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[name] = str(threads)
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.set_num_threads(threads)


def resolve_default_max_tokens(value: str, model: str) -> int | None:
    if value == "auto":
        return DEMO_DEFAULT_MAX_TOKENS if model == _DEMO_MODEL else None
    if value == "none":
        return None
    if not value.isdigit() or int(value) < 1:
        raise UsageError(f"--default-max-tokens must be a positive number, auto or none, got {value!r}")
    return int(value)


def read_chat_template(value: str | None) -> str | None:
    """--chat-template: a file's contents, or the value itself when it is a template (has '{')."""
    if value is None:
        return None
    path = Path(value).expanduser()
    if path.is_file():
        return path.read_text()
    if "{" in value:
        return value
    raise UsageError(f"--chat-template {value!r} is neither a file nor a Jinja template")


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        take_positional_model(args, EngineConfig.model)
        apply_cpu_threads(resolve_cpu_threads(args.cpu_threads, executor=args.executor))
        default_max_tokens = resolve_default_max_tokens(args.default_max_tokens, args.model)
        chat_template = read_chat_template(args.chat_template)
        if args.tokenizer is not None and not Path(args.tokenizer).expanduser().is_dir():
            raise UsageError(f"--tokenizer {args.tokenizer!r} is not a folder (it needs tokenizer.json)")
        if not (0 < args.port < 65536):
            raise UsageError(f"--port must be between 1 and 65535, got {args.port}")
        config = engine_config_from_args(args)
        _check_protection_arguments(args)
    except (ConfigError, UsageError) as error:
        print(f"radixfleet worker: {error}", file=sys.stderr)
        return 2
    from worker.server.metrics import configure_metrics

    try:
        configure_metrics(getattr(args, "metrics_prefix", None), config)
    except ValueError as error:  # a bad RADIXFLEET_METRICS_PREFIX
        print(f"radixfleet worker: {error}", file=sys.stderr)
        return 2
    from worker.server.access_log import configure_access_log

    configure_access_log(getattr(args, "access_log", "off"))
    from worker.server.launcher import bind_port

    # Take the port before anything loads: a busy port is one line at once, not a failure after loading.
    # Connections are refused until the model is ready and the socket starts listening.
    try:
        sock = bind_port(args.host, args.port)
    except OSError as error:
        print(f"radixfleet worker: cannot listen on {args.host}:{args.port}: {error.strerror or error}. "
              "Pick another --port or stop the process using it.", file=sys.stderr)
        return 1
    sock.setblocking(False)
    from worker.server.serve import ServeOptions, run_server

    options = ServeOptions(config, args.host, args.port, args.served_model_name or [], args.shutdown_timeout,
                           api_key=args.api_key or None, tokenizer_path=args.tokenizer,
                           chat_template=chat_template, default_max_tokens=default_max_tokens, sock=sock,
                           header_timeout_s=args.header_timeout, body_timeout_s=args.body_timeout,
                           max_connections=args.max_connections, max_active_requests=args.max_active_requests,
                           max_generated_tokens=args.max_generated_tokens,
                           drop_in=drop_in_options_from_args(args))
    return run_server(options)
