"""Worker /metrics on a real CPU worker started with RADIXFLEET_METRICS_PREFIX=vllm: the vLLM-named
copies, the per-request token and phase histograms, the cache-config info metric, and X-Request-ID.
"""

from __future__ import annotations

import subprocess
import sys
import urllib.request

import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from worker.server.launcher import WorkerProcess

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def worker():
    with WorkerProcess(["--model", "demo", "--device", "cpu", "--kv-cache-tokens", "8192", "--page-size", "16",
                        "--no-progress"], env={"OMP_NUM_THREADS": "1", "RADIXFLEET_METRICS_PREFIX": "vllm"}) as process:
        yield process


@pytest.fixture(scope="module")
def answered(worker):
    """One chat request with ignore_eos (so its token counts are known), sent with an X-Request-ID."""
    client = openai.OpenAI(base_url=worker.url + "/v1", api_key="unused", max_retries=0, timeout=120)
    raw = client.chat.completions.with_raw_response.create(
        model="demo", max_tokens=5, temperature=0, messages=[{"role": "user", "content": "Count the rivers."}],
        extra_body={"ignore_eos": True}, extra_headers={"X-Request-ID": "trace-abc-123"})
    return raw


def scrape(worker) -> dict[str, float]:
    with urllib.request.urlopen(worker.url + "/metrics", timeout=30) as response:
        text = response.read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            key = sample.name + "".join(f",{k}={v}" for k, v in sorted(sample.labels.items()) if k != "model_name")
            samples[key] = sample.value
    return samples


def test_request_id_is_echoed(answered):
    assert answered.headers["x-request-id"] == "trace-abc-123"


def test_a_request_without_an_id_gets_one(worker):
    with urllib.request.urlopen(worker.url + "/v1/models", timeout=30) as response:
        assert len(response.headers["X-Request-ID"]) == 32


def test_token_histograms_count_the_request(worker, answered):
    usage = answered.parse().usage
    samples = scrape(worker)
    assert samples["radixfleet:request_prompt_tokens_count"] == 1
    assert samples["radixfleet:request_prompt_tokens_sum"] == usage.prompt_tokens
    assert samples["radixfleet:request_generation_tokens_sum"] == usage.completion_tokens == 5
    # bucket le=5 holds the 5 generated tokens; le=2 does not
    assert samples["radixfleet:request_generation_tokens_bucket,le=5.0"] == 1
    assert samples["radixfleet:request_generation_tokens_bucket,le=2.0"] == 0


def test_phase_histograms_add_up_to_the_request(worker, answered):
    samples = scrape(worker)
    assert samples["radixfleet:request_prefill_time_seconds_count"] == 1
    assert samples["radixfleet:request_decode_time_seconds_count"] == 1
    ttft = samples["radixfleet:time_to_first_token_seconds_sum"]
    queue_and_prefill = samples["radixfleet:request_prefill_time_seconds_sum"] + \
        samples["radixfleet:request_queue_time_seconds_sum"]
    assert queue_and_prefill == pytest.approx(ttft)
    assert samples["radixfleet:request_decode_time_seconds_sum"] <= samples["radixfleet:e2e_request_latency_seconds_sum"]


def test_cache_config_info_reports_the_kv_cache(worker, answered):
    info = [key for key in scrape(worker) if key.startswith("radixfleet:cache_config_info,")]
    assert len(info) == 1
    labels = dict(part.split("=", 1) for part in info[0].split(",")[1:])
    assert labels["block_size"] == "16" and labels["enable_prefix_caching"] == "True"
    assert int(labels["num_kv_tokens"]) == 8192 and int(labels["num_gpu_blocks"]) == 8192 // 16


def test_vllm_prefix_copies_every_radixfleet_metric(worker, answered):
    samples = scrape(worker)
    ours = {k: v for k, v in samples.items() if k.startswith("radixfleet:") and "_created" not in k}
    assert "radixfleet:num_requests_waiting" in ours and "radixfleet:time_to_first_token_seconds_count" in ours
    for key, value in ours.items():
        assert samples["vllm:" + key[len("radixfleet:"):]] == value, key


def test_a_bad_prefix_is_a_clear_cli_error():
    result = subprocess.run([sys.executable, "-m", "worker.cli", "worker", "--model", "demo", "--device", "cpu"],
                            capture_output=True, text=True, timeout=120,
                            env={**__import__("os").environ, "RADIXFLEET_METRICS_PREFIX": "prom"})
    assert result.returncode == 2
    message = result.stdout + result.stderr  # CLI errors go to stderr
    assert "RADIXFLEET_METRICS_PREFIX" in message and "vllm" in message
