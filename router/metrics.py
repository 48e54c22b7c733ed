"""Router metrics in Prometheus text format, `radixfleet_router_*`.

Hand-rolled counters (plain dict increments) rather than prometheus_client: the router's hot path
runs thousands of times a second on one core, and label lookups there cost more than the routing.
Workers are labelled by id (w0, w1, ...), never by URL: /metrics must not leak worker addresses.
"""

from __future__ import annotations

import time
from collections import defaultdict
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    from router.worker_pool import WorkerPool

# Buckets of the predicted match ratio histogram.
MATCH_RATIO_BUCKETS = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 1.0)


class RouterMetrics:
    def __init__(self) -> None:
        self.requests = defaultdict(int)  # (worker_id, endpoint) -> count
        self.decisions = defaultdict(int)  # (policy, reason) -> count
        self.responses = defaultdict(int)  # status class ("2xx", "4xx", ...) -> count
        self.retries = 0
        self.errors = defaultdict(int)  # kind -> count (no_worker, upstream, mid_stream, bad_request, ...)
        self.match_buckets = [0] * len(MATCH_RATIO_BUCKETS)
        self.match_sum = 0.0
        self.match_count = 0
        self.started_at = time.time()

    def observe_match_ratio(self, ratio: float) -> None:
        self.match_sum += ratio
        self.match_count += 1
        for i, bound in enumerate(MATCH_RATIO_BUCKETS):
            if ratio <= bound:
                self.match_buckets[i] += 1
                break

    def render(self, pool: "WorkerPool", now: float, draining: bool, sessions: int,
               upstream_connections_opened: int = 0) -> str:
        lines: list[str] = []

        def family(name: str, kind: str, help_text: str) -> None:
            lines.append(f"# HELP {name} {help_text}")
            lines.append(f"# TYPE {name} {kind}")

        family("radixfleet_router_requests_total", "counter", "Requests dispatched, by worker and endpoint.")
        for (worker_id, endpoint), count in sorted(self.requests.items()):
            lines.append(f'radixfleet_router_requests_total{{worker="{worker_id}",endpoint="{endpoint}"}} {count}')
        family("radixfleet_router_routing_decisions_total", "counter", "Routing decisions, by policy and reason.")
        for (policy, reason), count in sorted(self.decisions.items()):
            lines.append(f'radixfleet_router_routing_decisions_total{{policy="{policy}",reason="{reason}"}} {count}')
        family("radixfleet_router_responses_total", "counter", "Responses sent to clients, by status class.")
        for status_class, count in sorted(self.responses.items()):
            lines.append(f'radixfleet_router_responses_total{{status="{status_class}"}} {count}')
        family("radixfleet_router_retries_total", "counter", "Requests retried on another worker before their first byte.")
        lines.append(f"radixfleet_router_retries_total {self.retries}")
        family("radixfleet_router_errors_total", "counter", "Failures, by kind.")
        for kind, count in sorted(self.errors.items()):
            lines.append(f'radixfleet_router_errors_total{{kind="{kind}"}} {count}')

        family("radixfleet_router_predicted_match_ratio", "histogram",
               "Predicted cached fraction of the routing text on the chosen worker.")
        cumulative = 0
        for bound, count in zip(MATCH_RATIO_BUCKETS, self.match_buckets):
            cumulative += count
            lines.append(f'radixfleet_router_predicted_match_ratio_bucket{{le="{bound}"}} {cumulative}')
        lines.append(f'radixfleet_router_predicted_match_ratio_bucket{{le="+Inf"}} {self.match_count}')
        lines.append(f"radixfleet_router_predicted_match_ratio_sum {self.match_sum}")
        lines.append(f"radixfleet_router_predicted_match_ratio_count {self.match_count}")

        workers = sorted(pool, key=lambda w: (len(w.worker_id), w.worker_id))
        gauges = (
            ("radixfleet_router_worker_healthy", "1 if the worker is routable.", lambda w: int(w.routable(now))),
            ("radixfleet_router_worker_in_flight", "Requests in flight on the worker.", lambda w: w.in_flight),
            ("radixfleet_router_worker_outstanding_tokens", "Estimated prompt tokens awaiting prefill.",
             lambda w: w.outstanding_tokens),
            ("radixfleet_router_tree_size_tokens", "Estimated KV tokens in the worker's prefix tree.",
             lambda w: w.tree.size_tokens),
            ("radixfleet_router_tree_nodes", "Chunk nodes in the worker's prefix tree.", lambda w: len(w.tree)),
            ("radixfleet_router_tree_capacity_tokens", "KV capacity the tree is bounded by.",
             lambda w: w.tree.capacity_tokens),
            ("radixfleet_router_tree_evicted_chunks_total", "Chunks evicted from the worker's tree.",
             lambda w: w.tree.evicted_chunks),
        )
        for name, help_text, getter in gauges:
            family(name, "counter" if name.endswith("_total") else "gauge", help_text)
            for w in workers:
                lines.append(f'{name}{{worker="{w.worker_id}"}} {getter(w)}')
        family("radixfleet_router_workers", "gauge", "Workers known to the router.")
        lines.append(f"radixfleet_router_workers {len(workers)}")
        family("radixfleet_router_sessions", "gauge", "Session pins held.")
        lines.append(f"radixfleet_router_sessions {sessions}")
        family("radixfleet_router_upstream_connections_opened_total", "counter",
               "Connections opened to workers (keep-alive reuses them).")
        lines.append(f"radixfleet_router_upstream_connections_opened_total {upstream_connections_opened}")
        family("radixfleet_router_draining", "gauge", "1 while the router drains before shutdown.")
        lines.append(f"radixfleet_router_draining {int(draining)}")
        return "\n".join(lines) + "\n"
