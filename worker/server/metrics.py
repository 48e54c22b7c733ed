"""Prometheus metrics of one worker, named as vLLM names them but with a `radixfleet:` prefix.

Engine state (running / waiting requests, KV usage, prefix-cache and preemption counters) comes
from the latest `EngineStats` the engine process pushed, exported by a collector at scrape time;
latencies are observed by the frontend as tokens reach it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Histogram, PlatformCollector, ProcessCollector, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from worker.engine.protocol import EngineStats

if TYPE_CHECKING:
    from worker.server.generation import Generation

PREFIX = "radixfleet:"
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

_TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                 40.0, 80.0, 160.0, 640.0)
_ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4,
                0.5, 0.75, 1.0, 2.5, 5.0)
_E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
                480.0, 960.0, 1920.0)


class _EngineStatsCollector:
    """Exports the latest EngineStats as gauges and counters (the engine keeps the running totals)."""

    def __init__(self, metrics: "WorkerMetrics"):
        self._metrics = metrics

    def collect(self):
        stats: EngineStats | None = self._metrics.stats
        model = self._metrics.model_name
        if stats is None:
            return
        gauges = [
            ("num_requests_running", "Requests in the running batch.", stats.num_running),
            ("num_requests_waiting", "Requests waiting to be scheduled.", stats.num_waiting),
            ("kv_cache_usage_perc", "Fraction of the KV cache in use by requests (1 = full).",
             stats.kv_tokens_used / stats.kv_tokens_total if stats.kv_tokens_total else 0.0),
        ]
        for name, help_text, value in gauges:
            family = GaugeMetricFamily(PREFIX + name, help_text, labels=["model_name"])
            family.add_metric([model], value)
            yield family
        counters = [
            ("prefix_cache_queries", "Prompt tokens looked up in the prefix cache.", stats.cache_query_tokens),
            ("prefix_cache_hits", "Prompt tokens found in the prefix cache.", stats.cache_hit_tokens),
            ("num_preemptions", "Requests preempted (recomputed later) for lack of KV space.", stats.num_preemptions),
        ]
        for name, help_text, value in counters:
            family = CounterMetricFamily(PREFIX + name, help_text, labels=["model_name"])
            family.add_metric([model], value)
            yield family


class WorkerMetrics:
    """The worker's metric registry (one per server, so tests can run several in one process)."""

    def __init__(self, model_name: str):
        self.model_name = model_name
        self.stats: EngineStats | None = None
        self.registry = CollectorRegistry()
        self.registry.register(_EngineStatsCollector(self))
        ProcessCollector(registry=self.registry)  # the frontend's CPU, memory and open files
        PlatformCollector(registry=self.registry)
        labels = {"labelnames": ["model_name"], "registry": self.registry}
        self._ttft = Histogram(PREFIX + "time_to_first_token_seconds", "Time to the first token.",
                               buckets=_TTFT_BUCKETS, **labels)
        self._itl = Histogram(PREFIX + "inter_token_latency_seconds", "Time between output tokens.",
                              buckets=_ITL_BUCKETS, **labels)
        self._e2e = Histogram(PREFIX + "e2e_request_latency_seconds", "Time from arrival to the last token.",
                              buckets=_E2E_BUCKETS, **labels)
        self._success = Counter(PREFIX + "request_success", "Ended requests by finish reason (abort: the client left, or a shutdown).",
                                labelnames=["model_name", "finished_reason"], registry=self.registry)
        self._prompt_tokens = Counter(PREFIX + "prompt_tokens", "Prompt tokens of finished requests.", **labels)
        self._generation_tokens = Counter(PREFIX + "generation_tokens", "Generated tokens.", **labels)
        self.time_to_first_token = self._ttft.labels(model_name)
        self.inter_token_latency = self._itl.labels(model_name)
        self.e2e_request_latency = self._e2e.labels(model_name)

    def set_stats(self, stats: EngineStats) -> None:
        self.stats = stats

    def observe_finished(self, generation: "Generation", e2e_seconds: float, reason: str) -> None:
        """A request ended: `reason` is its first choice's finish reason (stop, length, abort)."""
        self.e2e_request_latency.observe(e2e_seconds)
        self._success.labels(self.model_name, reason).inc()
        self._prompt_tokens.labels(self.model_name).inc(generation.num_prompt_tokens)
        self._generation_tokens.labels(self.model_name).inc(generation.num_completion_tokens)

    def render(self) -> bytes:
        return generate_latest(self.registry)
