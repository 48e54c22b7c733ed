"""`radixfleet router`: the cache-aware router in front of running workers.

Every flag is generated from a field of `RouterConfig`: `--name-with-dashes`, a trailing `_s` (seconds)
dropped (`drain_timeout_s` -> `--drain-timeout`), typed and defaulted from the dataclass, the default
shown in --help. A new field gets its flag without an edit here; `_HELP` and `_GROUP` only add words.

Mistakes are answered before anything starts: an unknown flag gets this command's usage and the
closest flag we have; a flag of another router that we lack gets one line saying what to use instead;
a port already taken gets one line naming --port.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import os
import sys
import typing

from router.config import RouterConfig
from router.listen import ListenError, listen_problem
from router.policies import POLICY_NAMES
from worker.flag_hints import did_you_mean

_HELP = {
    "worker_urls": "worker base URLs, e.g. http://127.0.0.1:8100 http://127.0.0.1:8101 (or comma-separated)",
    "host": "address to listen on",
    "port": "port to listen on",
    "policy": "how a worker is chosen for a request",
    "cache_threshold": "minimum predicted match ratio to route by cache (below: least loaded)",
    "balance_abs_threshold": "in-flight gap (max - min) above which load is imbalanced",
    "balance_rel_threshold": "ratio max/min above which load is imbalanced (both must hold)",
    "request_cost_tokens": "queue cost of one in-flight request, in prefill tokens, weighed against cache savings",
    "chunk_chars": "prefix tree granularity in characters",
    "chars_per_token": "characters per token, to turn routing text into token estimates",
    "default_kv_tokens": "tree capacity per worker until its /load reports kv_tokens_total",
    "session_header": "request header carrying the session id (else the body's 'user' field)",
    "session_ttl_s": "seconds a session pin lasts unused",
    "max_sessions": "session pins held at most (the oldest go first)",
    "max_retries": "retries on other workers for a request failing before its first byte",
    "connect_timeout_s": "seconds to connect to a worker",
    "read_timeout_s": "longest silence from a worker, first byte included, before the attempt fails",
    "max_body_bytes": "largest request body accepted (HTTP 413 above)",
    "health_interval_s": "seconds between two polls of each worker's /health and /load",
    "health_timeout_s": "seconds a health poll may take",
    "failure_threshold": "failed attempts in a row that open a worker's circuit breaker",
    "breaker_cooldown_s": "seconds an open breaker waits before letting one probe through (doubles on failure)",
    "drain_timeout_s": "seconds to let in-flight requests finish after SIGTERM",
    "api_key": "clients must send 'Authorization: Bearer KEY'",
    "worker_api_key": "key the workers require (their --api-key), sent to them as a Bearer token",
    "access_log": "one line per request on stderr: time, path, status, duration, request id, worker (no prompt text)",
    "admin_key": "key for GET/POST/DELETE /workers; without it they are disabled",
    "worker_dns": "discover workers: every address HOST resolves to, on PORT (re-resolved periodically)",
    "dns_interval_s": "seconds between DNS lookups",
    "worker_scheme": "scheme of the worker URLs made from --worker-dns",
    "health_down_after": "/health timeouts in a row that mark a worker down and move its unstarted requests",
    "health_readmit_after": "good polls in a row before a worker marked down for silence is routed to again",
    "max_active_requests": "requests proxied at once; more wait in the router's queue",
    "max_queued_requests": "requests waiting for a slot at most (beyond: 503 + Retry-After)",
    "queue_timeout_s": "seconds a request may wait for a slot (then 503 + Retry-After)",
    "header_timeout_s": "seconds a client connection may take to send a complete request head (and idle keep-alive)",
    "body_timeout_s": "seconds a request body may take to arrive (HTTP 408 past it)",
    "max_connections": "open client connections at most (beyond: 503 and close); 0: what the open-file limit allows",
}
_GROUP = {
    "cache_aware": ("cache_threshold", "balance_abs_threshold", "balance_rel_threshold", "request_cost_tokens",
                    "chunk_chars", "chars_per_token", "default_kv_tokens"),
    "sessions": ("session_header", "session_ttl_s", "max_sessions"),
    "serving": ("max_retries", "connect_timeout_s", "read_timeout_s", "max_body_bytes", "drain_timeout_s"),
    "health": ("health_interval_s", "health_timeout_s", "failure_threshold", "breaker_cooldown_s"),
    "security": ("api_key", "admin_key", "worker_api_key"),
    "discovery": ("worker_dns", "dns_interval_s", "worker_scheme"),
    "protection": ("health_down_after", "health_readmit_after", "max_active_requests", "max_queued_requests",
                   "queue_timeout_s", "header_timeout_s", "body_timeout_s", "max_connections"),
}
_CHOICES = {"policy": POLICY_NAMES, "worker_scheme": ("http", "https"), "access_log": ("off", "text", "json")}
_METAVAR = {"worker_urls": "URL", "worker_dns": "HOST:PORT", "api_key": "KEY", "admin_key": "KEY",
            "worker_api_key": "KEY"}
# Secrets come from the environment too (compose and Kubernetes pass them so); --help names the variable,
# never the value.
_ENV = {"api_key": "RADIXFLEET_API_KEY", "admin_key": "RADIXFLEET_ADMIN_KEY",
        "worker_api_key": "RADIXFLEET_WORKER_API_KEY"}

# Flags of other routers (SGLang's router, mostly) that a user may bring along, and what to do here instead.
FOREIGN_FLAGS = {
    "--max-payload-size": "use --max-body-bytes",
    "--retry-max-retries": "use --max-retries",
    "--disable-retries": "use --max-retries 0",
    "--cb-failure-threshold": "use --failure-threshold",
    "--disable-circuit-breaker": "there is no switch; a large --failure-threshold keeps breakers closed",
    "--health-check-interval-secs": "use --health-interval",
    "--health-check-timeout-secs": "use --health-timeout",
    "--request-timeout-secs": "the nearest is --read-timeout (longest silence from a worker)",
    "--max-tree-size": "each worker's tree is bounded by the KV capacity its /load reports "
                       "(--default-kv-tokens until then)",
    "--eviction-interval": "trees evict least-recently-used prefixes as they fill; there is nothing to schedule",
    "--prometheus-port": "/metrics is served on the router's own --port",
    "--prometheus-host": "/metrics is served on the router's own --host and --port",
    "--service-discovery": "Kubernetes pod discovery is not built in: give a headless Service to --worker-dns",
    "--selector": "Kubernetes pod discovery is not built in: give a headless Service to --worker-dns",
    "--pd-disaggregation": "prefill/decode disaggregation is not supported: every worker serves whole requests",
    "--prefill": "prefill/decode disaggregation is not supported: list the workers in --worker-urls",
    "--decode": "prefill/decode disaggregation is not supported: list the workers in --worker-urls",
    "--dp-aware": "each worker is one data-parallel replica: list each in --worker-urls",
    "--log-dir": "logs go to stderr; redirect them, or use --log-level",
    "--max-concurrent-requests": "use --max-active-requests (and --max-queued-requests, --queue-timeout)",
    "--tensor-parallel-size": "a worker option elsewhere, and not supported by radixfleet workers",
}


def flag_name(field_name: str) -> str:
    """`drain_timeout_s` -> `--drain-timeout`: the unit suffix is in the help, not in the flag."""
    return "--" + field_name.removesuffix("_s").replace("_", "-")


def _group_of(field_name: str) -> str | None:
    return next((group for group, names in _GROUP.items() if field_name in names), None)


def _default_text(item: dataclasses.Field, default) -> str:
    if item.name in _ENV:
        return f"${_ENV[item.name]}, else none"
    if isinstance(default, list):
        return " ".join(default) or "none"
    return "none" if default is None else str(default)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per RouterConfig field (plus --log-level), in the field's group."""
    defaults = RouterConfig()
    hints = typing.get_type_hints(RouterConfig)
    groups: dict[str | None, argparse._ActionsContainer] = {None: parser}
    flags = ["-h", "--help", "--log-level"]
    for item in dataclasses.fields(RouterConfig):
        group_name = _group_of(item.name)
        if group_name not in groups:
            groups[group_name] = parser.add_argument_group(group_name)
        target = groups[group_name]
        default = getattr(defaults, item.name)
        kind = hints[item.name]
        help_text = f"{_HELP.get(item.name, '')} (default: {_default_text(item, default)})".strip()
        flag = flag_name(item.name)
        flags.append(flag)
        # The metavar follows the flag, not the field: `--session-ttl SESSION_TTL`.
        options: dict = {"dest": item.name, "help": help_text,
                         "metavar": _METAVAR.get(item.name, flag[2:].upper().replace("-", "_"))}
        if item.name in _ENV:
            default = os.environ.get(_ENV[item.name]) or None
        if kind is bool:
            options.pop("metavar")
            target.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, **options)
            continue
        if typing.get_origin(kind) is list:  # list[str]
            target.add_argument(flag, nargs="*", type=typing.get_args(kind)[0], default=list(default), **options)
            continue
        scalar = next((t for t in typing.get_args(kind) if t is not type(None)), kind)  # str | None -> str
        if item.name in _CHOICES:
            options.pop("metavar")  # argparse shows the choices instead
        target.add_argument(flag, type=scalar, default=default, choices=_CHOICES.get(item.name), **options)
    parser.add_argument("--log-level", default="INFO", help="log level (default: INFO)")
    _explain_unknown_flags(parser, flags)


def _explain_unknown_flags(parser: argparse.ArgumentParser, known: list[str]) -> None:
    """Make this (sub)parser answer leftovers itself, with its own usage, instead of the top-level parser.

    `radixfleet` parses subcommands as argparse subparsers, which hand leftovers up to the top-level
    parser; its message shows the top-level usage and no hint. Wrapping this parser's parse_known_args
    catches them where the router's flags are known.
    """
    parse_known_args = parser.parse_known_args

    def parse_known_args_or_explain(args=None, namespace=None):
        namespace, extras = parse_known_args(args, namespace)
        if extras:
            foreign, message = unknown_flag_message(extras, known)
            if foreign:  # one line: the user knows the flag, from elsewhere; the usage would not help
                print(f"{parser.prog}: {message}", file=sys.stderr)
                parser.exit(2)
            parser.error(message)
        return namespace, extras

    parser.parse_known_args = parse_known_args_or_explain


def unknown_flag_message(extras: list[str], known: list[str]) -> tuple[bool, str]:
    """(is it another router's flag, what to say) for the first argument argparse could not place."""
    first = next((arg for arg in extras if arg.startswith("-")), extras[0])
    flag = first.split("=", 1)[0]
    if flag in FOREIGN_FLAGS:
        return True, f"{flag} is not a radixfleet router flag: {FOREIGN_FLAGS[flag]}"
    if not flag.startswith("-"):
        return False, (f"unexpected argument {first!r}: worker URLs go after --worker-urls "
                       f"(e.g. --worker-urls http://127.0.0.1:8100)")
    return False, f"unknown flag {flag}{did_you_mean(flag, known, 'see --help for the flags')}"


def config_from_args(args: argparse.Namespace) -> RouterConfig:
    values = {item.name: getattr(args, item.name) for item in dataclasses.fields(RouterConfig)
              if hasattr(args, item.name)}
    # Accept both "--worker-urls a b" and "--worker-urls a,b" (the form env files and compose use).
    values["worker_urls"] = [url for arg in values.get("worker_urls") or [] for url in arg.split(",") if url.strip()]
    for name in _ENV:  # an empty variable means no key
        values[name] = values.get(name) or None
    return RouterConfig(**values)


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = config_from_args(args)
        config.validate()
    except ValueError as exc:
        print(f"radixfleet router: {exc}", file=sys.stderr)
        return 2
    problem = listen_problem(config.host, config.port)  # before any worker is contacted
    if problem is not None:
        print(f"radixfleet router: {problem}", file=sys.stderr)
        return 2
    from router.app import serve

    try:
        try:
            import uvloop
        except ImportError:  # pragma: no cover
            asyncio.run(serve(config))
        else:
            uvloop.run(serve(config))
    except ListenError as exc:  # the port was taken between the check and the listen
        print(f"radixfleet router: {exc}", file=sys.stderr)
        return 2
    return 0
