"""Prometheus metrics of one worker, named as vLLM names them but with a `radixfleet:` prefix.

Engine state (running / waiting requests, KV usage, prefix-cache and preemption counters) comes
from the latest `EngineStats` the engine process pushed, exported by a collector at scrape time;
latencies are observed by the frontend as tokens reach it.

`--metrics-prefix vllm` (or RADIXFLEET_METRICS_PREFIX=vllm) also exports every `radixfleet:` family
a second time under `vllm:`, so dashboards and autoscaling rules written for vLLM work unchanged
while ours keep their names.

Timings: the engine sends no per-request timestamps (`EngineOutput` carries tokens only), so the
frontend times what it sees. Decode time (first token to last) is exact. The split of the time to
the first token into queue and prefill needs the moment the engine scheduled the request: when an
output carries `scheduled_time` (monotonic, the engine's clock is the same machine's) it is used;
without it the whole time to the first token is counted as prefill and the queue time is not
observed (the waiting-requests gauge still shows the queue).
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from prometheus_client import (CollectorRegistry, Counter, Histogram, Info, PlatformCollector, ProcessCollector,
                               generate_latest)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.metrics_core import Metric

from worker.engine.protocol import EngineStats

if TYPE_CHECKING:
    from worker.config import EngineConfig
    from worker.server.generation import Generation

PREFIX = "radixfleet:"
VLLM_PREFIX = "vllm:"
PREFIX_CHOICES = ("radixfleet", "vllm")
PREFIX_ENV = "RADIXFLEET_METRICS_PREFIX"
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

_TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                 40.0, 80.0, 160.0, 640.0)
_ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4,
                0.5, 0.75, 1.0, 2.5, 5.0)
_E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
                480.0, 960.0, 1920.0)
_PHASE_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0,
                  320.0, 640.0, 1280.0)
# Token counts: 1, 2, 5 per decade up to a million-token context.
_TOKEN_BUCKETS = tuple(float(m * 10 ** e) for e in range(7) for m in (1, 2, 5) if m * 10 ** e <= 1_000_000)

# Set by `radixfleet worker` before the server starts (configure_metrics); read by every WorkerMetrics.
_process_options: dict = {"prefix": None, "config": None}


def configure_metrics(prefix: str | None = None, config: "EngineConfig | None" = None) -> None:
    """Process-wide options from the worker CLI: the exported prefix and the cache config to report.

    Raises ValueError naming the fix when neither the flag nor RADIXFLEET_METRICS_PREFIX is a known choice."""
    _process_options.update(prefix=_checked_prefix(prefix or os.environ.get(PREFIX_ENV) or "radixfleet"),
                            config=config)


def selected_prefix() -> str:
    """The configured prefix choice: the CLI's, else RADIXFLEET_METRICS_PREFIX, else radixfleet."""
    return _process_options["prefix"] or _checked_prefix(os.environ.get(PREFIX_ENV) or "radixfleet")


def _checked_prefix(choice: str) -> str:
    if choice not in PREFIX_CHOICES:
        raise ValueError(f"the metrics prefix must be one of {', '.join(PREFIX_CHOICES)} "
                         f"(--metrics-prefix or ${PREFIX_ENV}), got {choice!r}")
    return choice


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


class _CacheConfigCollector:
    """`cache_config_info`: the KV cache's shape as labels on a constant 1 (vLLM's info metric)."""

    def __init__(self, metrics: "WorkerMetrics", config: "EngineConfig | None"):
        self._metrics = metrics
        self._config = config

    def collect(self):
        labels = {}
        if self._config is not None:
            labels.update(block_size=str(self._config.page_size),
                          enable_prefix_caching=str(self._config.enable_prefix_cache),
                          gpu_memory_utilization=str(self._config.mem_fraction))
        stats = self._metrics.stats
        if stats is not None:  # the engine's real budget (on cuda it is sized from free memory)
            labels["num_kv_tokens"] = str(stats.kv_tokens_total)
            if self._config is not None:
                labels["num_gpu_blocks"] = str(stats.kv_tokens_total // self._config.page_size)
        info = Info(PREFIX + "cache_config", "The KV cache configuration.", registry=None)
        info.info(labels)
        yield from info.collect()


def _renamed(family: Metric, old: str, new: str) -> Metric:
    """A copy of a metric family whose name and samples start with `new` instead of `old`."""
    copy = Metric(new + family.name[len(old):], family.documentation, family.type, family.unit)
    copy.samples = [s._replace(name=new + s.name[len(old):]) for s in family.samples]
    return copy


class _PrefixedView:
    """What /metrics renders: the registry, plus `vllm:` copies of the `radixfleet:` families if asked."""

    def __init__(self, registry: CollectorRegistry, with_vllm_names: bool):
        self._registry = registry
        self._with_vllm_names = with_vllm_names

    def collect(self):
        for family in self._registry.collect():
            yield family
            if self._with_vllm_names and family.name.startswith(PREFIX):
                yield _renamed(family, PREFIX, VLLM_PREFIX)


class WorkerMetrics:
    """The worker's metric registry (one per server, so tests can run several in one process)."""

    def __init__(self, model_name: str, prefix: str | None = None, config: "EngineConfig | None" = None):
        self.model_name = model_name
        self.stats: EngineStats | None = None
        self.prefix_choice = prefix or selected_prefix()
        self.registry = CollectorRegistry()
        self.registry.register(_EngineStatsCollector(self))
        self.registry.register(_CacheConfigCollector(self, config or _process_options["config"]))
        ProcessCollector(registry=self.registry)  # the frontend's CPU, memory and open files
        PlatformCollector(registry=self.registry)
        self._view = _PrefixedView(self.registry, with_vllm_names=self.prefix_choice == "vllm")

        def histogram(name: str, help_text: str, buckets):
            return Histogram(PREFIX + name, help_text, labelnames=["model_name"], buckets=buckets,
                             registry=self.registry).labels(model_name)

        def counter(name: str, help_text: str):
            return Counter(PREFIX + name, help_text, labelnames=["model_name"],
                           registry=self.registry).labels(model_name)

        self.time_to_first_token = histogram("time_to_first_token_seconds", "Time to the first token.", _TTFT_BUCKETS)
        self.inter_token_latency = histogram("inter_token_latency_seconds", "Time between output tokens.",
                                             _ITL_BUCKETS)
        self.e2e_request_latency = histogram("e2e_request_latency_seconds", "Time from arrival to the last token.",
                                             _E2E_BUCKETS)
        self.request_queue_time = histogram(
            "request_queue_time_seconds",
            "Time from arrival until the engine scheduled the request (observed when the engine reports it).",
            _PHASE_BUCKETS)
        self.request_prefill_time = histogram(
            "request_prefill_time_seconds",
            "Time from scheduling to the first token (from arrival when the engine sends no scheduling time).",
            _PHASE_BUCKETS)
        self.request_decode_time = histogram("request_decode_time_seconds",
                                             "Time from the first token to the last.", _PHASE_BUCKETS)
        self.request_prompt_tokens = histogram("request_prompt_tokens", "Prompt tokens of each finished request.",
                                               _TOKEN_BUCKETS)
        self.request_generation_tokens = histogram(
            "request_generation_tokens", "Generated tokens of each finished request (all choices).", _TOKEN_BUCKETS)
        self._success = Counter(PREFIX + "request_success", "Ended requests by finish reason (abort: the client left, or a shutdown).",
                                labelnames=["model_name", "finished_reason"], registry=self.registry)
        self._prompt_tokens = counter("prompt_tokens", "Prompt tokens of finished requests.")
        self._generation_tokens = counter("generation_tokens", "Generated tokens.")

    def set_stats(self, stats: EngineStats) -> None:
        self.stats = stats

    def observe_first_token(self, arrival: float, first_token: float, scheduled: float | None) -> None:
        """The time to the first token, split into queue and prefill when the scheduling time is known."""
        self.time_to_first_token.observe(first_token - arrival)
        if scheduled is not None and arrival <= scheduled <= first_token:
            self.request_queue_time.observe(scheduled - arrival)
            self.request_prefill_time.observe(first_token - scheduled)
        else:
            self.request_prefill_time.observe(first_token - arrival)

    def observe_finished(self, generation: "Generation", e2e_seconds: float, reason: str,
                         decode_seconds: float | None = None) -> None:
        """A request ended: `reason` is its first choice's finish reason (stop, length, abort).

        `decode_seconds` (first token to last) is None when no token was generated."""
        self.e2e_request_latency.observe(e2e_seconds)
        self._success.labels(self.model_name, reason).inc()
        self._prompt_tokens.inc(generation.num_prompt_tokens)
        self._generation_tokens.inc(generation.num_completion_tokens)
        self.request_prompt_tokens.observe(generation.num_prompt_tokens)
        self.request_generation_tokens.observe(generation.num_completion_tokens)
        if decode_seconds is not None:
            self.request_decode_time.observe(decode_seconds)

    def render(self) -> bytes:
        return generate_latest(self._view)
