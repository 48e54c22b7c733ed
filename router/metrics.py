"""Router metrics, `radixfleet_router_*`, exported through prometheus-client at scrape time.

The hot path only bumps plain counters (`RouterMetrics`: ints, dicts and bucket lists): the router
routes thousands of requests a second on one core, and prometheus-client's labelled children (a lock
and a dict lookup per increment) would cost more there than the routing. `RouterCollector` is a
prometheus-client Collector that turns those counters, and the live worker pool, into metric families
only when /metrics is scraped, so exporting costs nothing between scrapes.

Workers are labelled by id (w0, w1, ...), never by URL: /metrics must not leak worker addresses.
"""

from __future__ import annotations

import bisect
import time
from collections import defaultdict
from typing import TYPE_CHECKING, Callable, Iterator, Sequence

from aiohttp import web
from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

if TYPE_CHECKING:  # pragma: no cover
    from router.app import RouterState

# Buckets of the predicted match ratio histogram.
MATCH_RATIO_BUCKETS = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 1.0)
# Seconds, from the request's arrival at the router: to its last byte, and to the worker's first byte.
DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)
FIRST_BYTE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
# Seconds the router itself adds to a request: fine from 0.1 ms to 50 ms, so a p99 near the 2 ms target
# interpolates between bounds at most 1.5x apart.
OVERHEAD_BUCKETS = (0.0001, 0.0002, 0.0003, 0.0005, 0.00075, 0.001, 0.0015, 0.002, 0.003, 0.005, 0.0075, 0.01,
                    0.015, 0.02, 0.03, 0.05, 0.1)

# Where the proxy leaves a request's own seconds for the access log (a typed key where aiohttp has them).
OVERHEAD_KEY = (web.RequestKey("radixfleet_router_overhead_s", float) if hasattr(web, "RequestKey")
                else "radixfleet_router_overhead_s")

# Prometheus text format 0.0.4, what `/metrics` answers.
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class Buckets:
    """A histogram's live state: a count per bucket (not cumulative), the sum and the count."""

    __slots__ = ("bounds", "counts", "sum", "count")

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = tuple(bounds)
        self.counts = [0] * len(self.bounds)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.sum += value
        self.count += 1
        i = bisect.bisect_left(self.bounds, value)  # the first bound >= value
        if i < len(self.counts):
            self.counts[i] += 1

    def cumulative(self) -> list[tuple[str, float]]:
        """(le, count) pairs as Prometheus wants them, ending with +Inf."""
        pairs = []
        running = 0
        for bound, count in zip(self.bounds, self.counts):
            running += count
            pairs.append((floatToGoString(bound), running))
        pairs.append(("+Inf", self.count))
        return pairs


class RouterMetrics:
    """The counters the request path bumps. Read only by `RouterCollector`, at scrape time."""

    def __init__(self) -> None:
        self.requests = defaultdict(int)  # (worker_id, endpoint) -> count
        self.decisions = defaultdict(int)  # (policy, reason) -> count
        self.responses = defaultdict(int)  # status class ("2xx", "4xx", ...) -> count
        self.retries = 0
        self.errors = defaultdict(int)  # kind -> count (no_worker, upstream, mid_stream, bad_request, ...)
        self.match_ratio = Buckets(MATCH_RATIO_BUCKETS)
        self.duration = defaultdict(lambda: Buckets(DURATION_BUCKETS))  # endpoint -> arrival to last byte
        self.first_byte = defaultdict(lambda: Buckets(FIRST_BYTE_BUCKETS))  # endpoint -> arrival to first byte
        self.overhead = defaultdict(lambda: Buckets(OVERHEAD_BUCKETS))  # endpoint -> the router's own seconds

    def observe_match_ratio(self, ratio: float) -> None:
        self.match_ratio.observe(ratio)


def _histogram(name: str, help_text: str, by_endpoint: dict[str, Buckets]) -> HistogramMetricFamily:
    family = HistogramMetricFamily(name, help_text, labels=["endpoint"])
    for endpoint, buckets in sorted(by_endpoint.items()):
        family.add_metric([endpoint], buckets.cumulative(), buckets.sum)
    return family


class RouterCollector(Collector):
    """Reads the router's live state into metric families each time /metrics is scraped."""

    def __init__(self, state: "RouterState") -> None:
        self.state = state

    def collect(self) -> Iterator[Metric]:
        state = self.state
        m = state.metrics
        requests = CounterMetricFamily("radixfleet_router_requests_total", "Requests dispatched, by worker and endpoint.",
                                       labels=["worker", "endpoint"])
        for (worker_id, endpoint), count in sorted(m.requests.items()):
            requests.add_metric([worker_id, endpoint], count)
        yield requests
        decisions = CounterMetricFamily("radixfleet_router_routing_decisions_total",
                                        "Routing decisions, by policy and reason.", labels=["policy", "reason"])
        for (policy, reason), count in sorted(m.decisions.items()):
            decisions.add_metric([policy, reason], count)
        yield decisions
        responses = CounterMetricFamily("radixfleet_router_responses_total",
                                        "Responses sent to clients, by status class.", labels=["status"])
        for status_class, count in sorted(m.responses.items()):
            responses.add_metric([status_class], count)
        yield responses
        yield CounterMetricFamily("radixfleet_router_retries_total",
                                  "Requests retried on another worker before their first byte.", value=m.retries)
        errors = CounterMetricFamily("radixfleet_router_errors_total", "Failures, by kind.", labels=["kind"])
        for kind, count in sorted(m.errors.items()):
            errors.add_metric([kind], count)
        yield errors
        ratio = HistogramMetricFamily("radixfleet_router_predicted_match_ratio",
                                      "Predicted cached fraction of the routing text on the chosen worker.")
        ratio.add_metric([], m.match_ratio.cumulative(), m.match_ratio.sum)
        yield ratio
        yield _histogram("radixfleet_router_request_duration_seconds",
                         "Generation requests sent to a worker: seconds from arrival at the router to the last "
                         "byte of the answer (retries included), by endpoint.", m.duration)
        yield _histogram("radixfleet_router_time_to_first_byte_seconds",
                         "Generation requests a worker answered: seconds from arrival at the router until the "
                         "worker's first byte (the answer, or a stream's first chunk), by endpoint.", m.first_byte)
        yield _histogram("radixfleet_router_overhead_seconds",
                         "Requests a worker answered: seconds the router itself added, from arrival to the upstream "
                         "request sent (parse, policy, connection) plus from the worker's first body byte "
                         "arriving to its write to the client (relay); the worker's own time is not in it, "
                         "nor failed attempts' waits. By endpoint.", m.overhead)
        yield from self._worker_families()
        yield GaugeMetricFamily("radixfleet_router_sessions", "Session pins held.", value=len(state.sessions))
        opened = state.upstream.connections_opened if state.upstream is not None else 0
        yield CounterMetricFamily("radixfleet_router_upstream_connections_opened_total",
                                  "Connections opened to workers (keep-alive reuses them).", value=opened)
        yield GaugeMetricFamily("radixfleet_router_draining", "1 while the router drains before shutdown.",
                                value=int(state.draining))

    def _worker_families(self) -> Iterator[Metric]:
        now = time.monotonic()
        workers = sorted(self.state.pool, key=lambda w: (len(w.worker_id), w.worker_id))
        per_worker: tuple[tuple[str, str, Callable], ...] = (
            ("radixfleet_router_worker_healthy", "1 if the worker is routable.", lambda w: int(w.routable(now))),
            ("radixfleet_router_worker_in_flight", "Requests in flight on the worker.", lambda w: w.in_flight),
            ("radixfleet_router_worker_outstanding_tokens", "Estimated prompt tokens awaiting prefill.",
             lambda w: w.outstanding_tokens),
            ("radixfleet_router_worker_prefilling", "Requests in flight on the worker not yet known to be prefilled.",
             lambda w: w.prefilling),
            ("radixfleet_router_worker_decoding", "Requests in flight on the worker past their prefill.",
             lambda w: w.decoding),
            ("radixfleet_router_worker_chars_per_token",
             "Characters of routing text per prompt token, learned from the worker's usage (or the default).",
             lambda w: w.chars_per_token.value),
            ("radixfleet_router_worker_restarts_total", "Worker restarts seen in its /load counters.",
             lambda w: w.restarts),
            ("radixfleet_router_tree_size_tokens", "Estimated KV tokens in the worker's prefix tree.",
             lambda w: w.tree.size_tokens),
            ("radixfleet_router_tree_nodes", "Chunk nodes in the worker's prefix tree.", lambda w: len(w.tree)),
            ("radixfleet_router_tree_capacity_tokens", "KV capacity the tree is bounded by.",
             lambda w: w.tree.capacity_tokens),
            ("radixfleet_router_tree_evicted_chunks_total", "Chunks evicted from the worker's tree.",
             lambda w: w.tree.evicted_chunks),
            ("radixfleet_router_tree_reloaded_chunks_total",
             "Chunks sent to the worker again after its tree had evicted them (its cache could not keep them).",
             lambda w: w.tree.reloaded_chunks),
            ("radixfleet_router_tree_reload_share",
             "Share of the chunks recently new to the worker's tree that it had evicted before (thrashing).",
             lambda w: w.tree.reload_share),
        )
        for name, help_text, getter in per_worker:
            kind = CounterMetricFamily if name.endswith("_total") else GaugeMetricFamily
            family = kind(name, help_text, labels=["worker"])
            for w in workers:
                family.add_metric([w.worker_id], getter(w))
            yield family
        yield GaugeMetricFamily("radixfleet_router_workers", "Workers known to the router.", value=len(workers))


def make_registry(state: "RouterState") -> CollectorRegistry:
    """A registry of this router's own (not the process-global one: tests run several routers in one process)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(RouterCollector(state))
    return registry


def _escape(value: str) -> str:
    return value.replace("\\", r"\\").replace("\n", r"\n").replace('"', r"\"")


def render(registry: CollectorRegistry) -> bytes:
    """The registry in Prometheus text format 0.0.4.

    Like prometheus_client's `generate_latest`, except that each sample keeps its labels in the order
    its family declares them (generate_latest sorts them by name): the published samples read
    `radixfleet_router_requests_total{worker="w0",endpoint="chat"}`, and scrapers, dashboards and
    greps written against that text keep working. Label order means nothing to Prometheus itself.
    """
    lines: list[str] = []
    for family in registry.collect():
        name = family.name + "_total" if family.type == "counter" else family.name
        lines.append(f"# HELP {name} {_escape(family.documentation)}")
        lines.append(f"# TYPE {name} {family.type}")
        for sample in family.samples:
            value = floatToGoString(sample.value)
            if sample.labels:
                labels = ",".join(f'{key}="{_escape(str(val))}"' for key, val in sample.labels.items())
                lines.append(f"{sample.name}{{{labels}}} {value}")
            else:
                lines.append(f"{sample.name} {value}")
    return ("\n".join(lines) + "\n").encode()
