"""`radixfleet router`: the cache-aware router in front of running workers."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys

from router.config import RouterConfig
from router.policies import POLICY_NAMES

_DEFAULTS = RouterConfig()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = _DEFAULTS
    parser.add_argument("--worker-urls", nargs="*", default=[], metavar="URL",
                        help="worker base URLs, e.g. http://127.0.0.1:8100 http://127.0.0.1:8101")
    parser.add_argument("--worker-dns", default=None, metavar="HOST:PORT",
                        help="discover workers: every address HOST resolves to, on PORT (re-resolved periodically)")
    parser.add_argument("--dns-interval", type=float, default=d.dns_interval_s, help="seconds between DNS lookups")
    parser.add_argument("--host", default=d.host)
    parser.add_argument("--port", type=int, default=d.port)
    parser.add_argument("--policy", choices=POLICY_NAMES, default=d.policy)
    g = parser.add_argument_group("cache_aware")
    g.add_argument("--cache-threshold", type=float, default=d.cache_threshold,
                   help="minimum predicted match ratio to route by cache (below: least loaded)")
    g.add_argument("--balance-abs-threshold", type=int, default=d.balance_abs_threshold,
                   help="in-flight gap (max - min) above which load is imbalanced")
    g.add_argument("--balance-rel-threshold", type=float, default=d.balance_rel_threshold,
                   help="ratio max/min above which load is imbalanced (both must hold)")
    g.add_argument("--request-cost-tokens", type=float, default=d.request_cost_tokens,
                   help="queue cost of one in-flight request, in prefill tokens, weighed against cache savings")
    g.add_argument("--chunk-chars", type=int, default=d.chunk_chars, help="prefix tree granularity in characters")
    g.add_argument("--default-kv-tokens", type=int, default=d.default_kv_tokens,
                   help="tree capacity per worker until its /load reports kv_tokens_total")
    s = parser.add_argument_group("sessions")
    s.add_argument("--session-header", default=d.session_header,
                   help="request header carrying the session id (else the body's 'user' field)")
    s.add_argument("--session-ttl", type=float, default=d.session_ttl_s, help="seconds a session pin lasts unused")
    r = parser.add_argument_group("serving")
    r.add_argument("--max-retries", type=int, default=d.max_retries,
                   help="retries on other workers for a request failing before its first byte")
    r.add_argument("--connect-timeout", type=float, default=d.connect_timeout_s)
    r.add_argument("--read-timeout", type=float, default=d.read_timeout_s,
                   help="longest silence from a worker, first byte included, before the attempt fails")
    r.add_argument("--max-body-bytes", type=int, default=d.max_body_bytes)
    r.add_argument("--health-interval", type=float, default=d.health_interval_s)
    r.add_argument("--drain-timeout", type=float, default=d.drain_timeout_s,
                   help="seconds to let in-flight requests finish after SIGTERM")
    a = parser.add_argument_group("security")
    a.add_argument("--api-key", default=os.environ.get("RADIXFLEET_API_KEY"),
                   help="clients must send 'Authorization: Bearer KEY' (env RADIXFLEET_API_KEY)")
    a.add_argument("--admin-key", default=os.environ.get("RADIXFLEET_ADMIN_KEY"),
                   help="key for GET/POST/DELETE /workers (env RADIXFLEET_ADMIN_KEY); without it they are disabled")
    a.add_argument("--worker-api-key", default=os.environ.get("RADIXFLEET_WORKER_API_KEY"),
                   help="key the workers require (their --api-key), sent to them as a Bearer token "
                        "(env RADIXFLEET_WORKER_API_KEY)")
    parser.add_argument("--log-level", default="INFO")


def config_from_args(args: argparse.Namespace) -> RouterConfig:
    return RouterConfig(
        # Accept both "--worker-urls a b" and "--worker-urls a,b" (the form env files and compose use).
        worker_urls=[url for arg in (args.worker_urls or []) for url in arg.split(",") if url.strip()],
        worker_dns=args.worker_dns,
        dns_interval_s=args.dns_interval,
        host=args.host,
        port=args.port,
        policy=args.policy,
        cache_threshold=args.cache_threshold,
        balance_abs_threshold=args.balance_abs_threshold,
        balance_rel_threshold=args.balance_rel_threshold,
        request_cost_tokens=args.request_cost_tokens,
        chunk_chars=args.chunk_chars,
        default_kv_tokens=args.default_kv_tokens,
        session_header=args.session_header,
        session_ttl_s=args.session_ttl,
        max_retries=args.max_retries,
        connect_timeout_s=args.connect_timeout,
        read_timeout_s=args.read_timeout,
        max_body_bytes=args.max_body_bytes,
        health_interval_s=args.health_interval,
        drain_timeout_s=args.drain_timeout,
        api_key=args.api_key or None,
        admin_key=args.admin_key or None,
        worker_api_key=args.worker_api_key or None,
    )


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = config_from_args(args)
        config.validate()
    except ValueError as exc:
        print(f"radixfleet router: {exc}", file=sys.stderr)
        return 2
    from router.app import serve

    try:
        import uvloop

        uvloop.run(serve(config))
    except ImportError:  # pragma: no cover
        asyncio.run(serve(config))
    return 0
