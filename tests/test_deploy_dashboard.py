"""The Grafana dashboard queries only metrics that exist: every `radixfleet:*` name it uses is on the
/metrics of a real CPU worker, every `radixfleet_router_*` name on the /metrics of a router in front
of it (after one request, so the per-reason and per-worker series exist).

The router's latency histogram (`radixfleet_router_request_duration_seconds`) is added on another
branch; until it lands it is the only name allowed to be missing.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import warnings
import urllib.request
from pathlib import Path

import openai
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from worker.server.launcher import WorkerProcess, free_port

ROOT = Path(__file__).parent.parent
DASHBOARD = ROOT / "deploy" / "monitoring" / "grafana" / "dashboards" / "radixfleet.json"
PROMETHEUS = ROOT / "deploy" / "monitoring" / "prometheus.yml"
MAY_BE_MISSING_PREFIX = "radixfleet_router_request_duration"
METRIC_NAME = re.compile(r"radixfleet(?::|_router_)[A-Za-z0-9_:]+")
SUFFIXES = {"histogram": ("_bucket", "_sum", "_count", "_created"), "counter": ("_total", "_created"),
            "summary": ("_sum", "_count", "_created"), "info": ("_info",)}

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


def dashboard_queries() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    return [target["expr"] for panel in dashboard["panels"] for target in panel.get("targets", [])]


def queried_names() -> set[str]:
    return {name for expr in dashboard_queries() for name in METRIC_NAME.findall(expr)}


def exported_names(url: str) -> set[str]:
    """Every sample name /metrics can carry: the samples present, and each declared family's series."""
    with urllib.request.urlopen(url + "/metrics", timeout=30) as response:
        text = response.read().decode()
    names = set()
    for family in text_string_to_metric_families(text):
        names.add(family.name)
        names.update(family.name + suffix for suffix in SUFFIXES.get(family.type, ()))
        names.update(sample.name for sample in family.samples)
    return names


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    """(worker url, router url) after one chat request went through the router."""
    log = tmp_path_factory.mktemp("router") / "router.log"
    with WorkerProcess(["--model", "demo", "--device", "cpu", "--kv-cache-tokens", "8192", "--no-progress"],
                       env={"OMP_NUM_THREADS": "1"}) as worker:
        port = free_port()
        with log.open("wb") as log_file:
            router = subprocess.Popen([sys.executable, "-m", "worker.cli", "router", "--host", "127.0.0.1",
                                       "--port", str(port), "--worker-urls", worker.url], cwd=ROOT,
                                      stdout=log_file, stderr=subprocess.STDOUT)
        router_url = f"http://127.0.0.1:{port}"
        try:
            # The SDK's retries (connection refused, 503) wait out the router's start, about 40 s at most.
            client = openai.OpenAI(base_url=router_url + "/v1", api_key="unused", max_retries=8, timeout=120)
            try:
                client.chat.completions.create(model="demo", max_tokens=4, messages=[{"role": "user", "content": "Hi"}])
            except openai.APIError as error:
                pytest.fail(f"the router did not answer ({error}); exit code {router.poll()}; log:\n{log.read_text()}")
            yield worker.url, router_url
        finally:
            router.terminate()
            router.wait(30)


def test_dashboard_queries_metrics_of_both_kinds():
    names = queried_names()
    assert any(n.startswith("radixfleet:") for n in names) and any(n.startswith("radixfleet_router_") for n in names)
    for topic in ("time_to_first_token", "inter_token_latency", "generation_tokens", "prefix_cache_hits",
                  "kv_cache_usage_perc", "num_requests_waiting", "routing_decisions", "worker_healthy"):
        assert any(topic in n for n in names), f"the dashboard has no panel on {topic}"


def test_every_dashboard_metric_exists_on_a_running_worker_and_router(fleet):
    worker_url, router_url = fleet
    exported = exported_names(worker_url) | exported_names(router_url)
    missing = sorted(n for n in queried_names() if n not in exported)
    not_allowed = [n for n in missing if not n.startswith(MAY_BE_MISSING_PREFIX)]
    assert not not_allowed, f"the dashboard queries metrics nobody exports: {not_allowed}"
    if missing:  # only the router latency histogram, until its branch lands
        warnings.warn(f"dashboard metrics not exported yet: {missing}", stacklevel=1)


def test_panels_use_the_provisioned_datasource():
    datasources = yaml.safe_load((ROOT / "deploy/monitoring/grafana/provisioning/datasources/prometheus.yml").read_text())
    uids = {d["uid"] for d in datasources["datasources"]}
    dashboard = json.loads(DASHBOARD.read_text())
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            assert target["datasource"]["uid"] in uids, panel["title"]


def test_prometheus_scrapes_the_compose_services():
    config = yaml.safe_load(PROMETHEUS.read_text())
    compose = yaml.safe_load((ROOT / "compose.yaml").read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    router_targets = {t.split(":")[0] for c in jobs["radixfleet-router"]["static_configs"] for t in c["targets"]}
    worker_names = set(jobs["radixfleet-worker"]["dns_sd_configs"][0]["names"])
    assert router_targets == {"router", "cpu-router"} and router_targets <= set(compose["services"])
    aliases = {a for s in compose["services"].values() for a in s.get("networks", {}).get("default", {}).get("aliases", [])}
    assert worker_names <= set(compose["services"]) | aliases
