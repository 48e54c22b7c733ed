"""/metrics of the router: the published names, read from live counters at scrape time."""

from prometheus_client.parser import text_string_to_metric_families

from router.app import RouterState
from router.config import RouterConfig
from router.metrics import render

# The names DESIGN.md and the dashboards rely on, and the latency histograms of the deploy issue.
PUBLISHED = {
    "radixfleet_router_requests": "counter", "radixfleet_router_routing_decisions": "counter",
    "radixfleet_router_responses": "counter", "radixfleet_router_retries": "counter",
    "radixfleet_router_errors": "counter", "radixfleet_router_predicted_match_ratio": "histogram",
    "radixfleet_router_request_duration_seconds": "histogram",
    "radixfleet_router_time_to_first_byte_seconds": "histogram",
    "radixfleet_router_overhead_seconds": "histogram",
    "radixfleet_router_worker_healthy": "gauge", "radixfleet_router_worker_in_flight": "gauge",
    "radixfleet_router_worker_outstanding_tokens": "gauge", "radixfleet_router_tree_size_tokens": "gauge",
    "radixfleet_router_tree_nodes": "gauge", "radixfleet_router_tree_capacity_tokens": "gauge",
    "radixfleet_router_tree_evicted_chunks": "counter", "radixfleet_router_workers": "gauge",
    "radixfleet_router_sessions": "gauge", "radixfleet_router_upstream_connections_opened": "counter",
    "radixfleet_router_draining": "gauge",
    # issue 11: load signals and the measured characters per token, per worker
    "radixfleet_router_worker_prefilling": "gauge", "radixfleet_router_worker_decoding": "gauge",
    "radixfleet_router_worker_chars_per_token": "gauge", "radixfleet_router_worker_restarts": "counter",
    # issue 11: what each worker's tree evicted and was sent again (cache_aware's miss placement reads it)
    "radixfleet_router_tree_reloaded_chunks": "counter", "radixfleet_router_tree_reload_share": "gauge",
}


def scrape(state: RouterState) -> dict:
    """{family name: family} as a Prometheus server would parse the scrape."""
    return {f.name: f for f in text_string_to_metric_families(render(state.registry).decode())}


def sample(families: dict, name: str, **labels) -> float:
    for family in families.values():
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return s.value
    raise KeyError((name, labels))


def test_every_published_family_is_exported_with_its_type():
    state = RouterState(RouterConfig(worker_urls=["http://127.0.0.1:1", "http://127.0.0.1:2"]))
    families = scrape(state)
    assert {name: f.type for name, f in families.items()} == PUBLISHED
    assert sample(families, "radixfleet_router_workers") == 2
    assert sample(families, "radixfleet_router_worker_healthy", worker="w1") == 1


def test_a_scrape_reads_the_counters_as_they_are_now():
    state = RouterState(RouterConfig(worker_urls=["http://127.0.0.1:1"]))
    m = state.metrics
    m.requests[("w0", "chat")] += 3
    m.decisions[("cache_aware", "cache_hit")] += 2
    m.retries += 1
    for ratio in (0.0, 0.25, 1.0):
        m.observe_match_ratio(ratio)
    m.duration["chat"].observe(0.2)
    m.duration["chat"].observe(3.0)
    m.first_byte["chat"].observe(0.004)
    state.draining = True
    families = scrape(state)
    assert sample(families, "radixfleet_router_requests_total", worker="w0", endpoint="chat") == 3
    assert sample(families, "radixfleet_router_routing_decisions_total", policy="cache_aware", reason="cache_hit") == 2
    assert sample(families, "radixfleet_router_retries_total") == 1
    assert sample(families, "radixfleet_router_predicted_match_ratio_bucket", le="0.0") == 1
    assert sample(families, "radixfleet_router_predicted_match_ratio_bucket", le="0.3") == 2
    assert sample(families, "radixfleet_router_predicted_match_ratio_count") == 3
    assert sample(families, "radixfleet_router_request_duration_seconds_bucket", endpoint="chat", le="0.25") == 1
    assert sample(families, "radixfleet_router_request_duration_seconds_count", endpoint="chat") == 2
    assert sample(families, "radixfleet_router_request_duration_seconds_sum", endpoint="chat") == 3.2
    assert sample(families, "radixfleet_router_time_to_first_byte_seconds_bucket", endpoint="chat", le="0.005") == 1
    assert sample(families, "radixfleet_router_draining") == 1
    m.retries += 1  # nothing is cached between scrapes
    assert sample(scrape(state), "radixfleet_router_retries_total") == 2


def test_samples_name_workers_by_id_never_by_url():
    state = RouterState(RouterConfig(worker_urls=["http://10.9.8.7:8100"]))
    state.metrics.requests[("w0", "completions")] += 1
    text = render(state.registry).decode()
    assert "10.9.8.7" not in text
    assert 'radixfleet_router_requests_total{worker="w0",endpoint="completions"} 1.0' in text
