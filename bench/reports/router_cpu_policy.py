"""cache_aware's own CPU per request, in process: choose + on_dispatch + dispatched + first byte + finish.

No HTTP: what the policy, its trees and the load bookkeeping cost a request, the part of the router the
placement work changed. Runs the router of one source tree (put it first on PYTHONPATH; trees from
before the placement work have the older WorkerState calls, handled below) and prints the best of
--repeats timings in microseconds per request. Interleave trees from the shell for a comparison:

    for r in 1 2 3 4 5 6; do for t in /tmp/rf_before .; do
        PYTHONPATH=$t python bench/reports/router_cpu_policy.py; done; done
"""

from __future__ import annotations

import argparse
import random
import time

from router.policies import CacheAware, RouteRequest
from router.tree import chunk_hashes
from router.worker_pool import WorkerPool

WORDS = "alpha beta gamma delta router cache prefix token worker latency batch queue kernel tensor".split()


def requests(n: int, seed: int = 0) -> list[RouteRequest]:
    """n prompts of ~1 KB over 8 shared ~600-character prefixes (router_bench's shape, in process)."""
    rng = random.Random(seed)
    prefixes = [" ".join(rng.choice(WORDS) for _ in range(90)) for _ in range(8)]
    texts = [prefixes[i % 8] + " " + " ".join(rng.choice(WORDS) for _ in range(40)) for i in range(n)]
    return [RouteRequest(chunk_hashes(t), len(t)) for t in texts]


def run(routes: list[RouteRequest], n: int, workers: int, streamed: bool) -> float:
    """Microseconds per request over n requests, each finished before the next (one in flight)."""
    pool = WorkerPool()
    for i in range(workers):
        pool.add(f"http://127.0.0.1:{9000 + i}")
    policy = CacheAware()
    ws = list(pool)
    placement_era = hasattr(ws[0], "uncached_tokens")  # WorkerState after the placement work
    start = time.perf_counter()
    for k in range(n):
        route = routes[k % len(routes)]
        d = policy.choose(ws, route)
        w = d.worker
        if placement_era:
            pending = w.on_dispatch(w.uncached_tokens(route.text_chars, d.match_chars), streamed, route.text_chars)
            policy.dispatched(d, route)
            if streamed:
                w.on_first_byte(pending)
            w.on_finish(pending)
        else:
            uncached = max(0, round((route.text_chars - d.match_chars) / 4))
            w.on_dispatch(uncached)
            policy.dispatched(d, route)
            w.on_first_byte(uncached)
            w.on_finish()
    return (time.perf_counter() - start) / n * 1e6


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=20000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--streamed", action="store_true", help="streamed answers (default: non-streamed)")
    args = parser.parse_args()
    routes = requests(200)
    best = min(run(routes, args.requests, args.workers, args.streamed) for _ in range(args.repeats))
    print(f"{best:.2f} us per request (best of {args.repeats} x {args.requests}, {args.workers} workers)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
