"""Sim workers over the real HTTP path: one standalone worker process, and a fleet of them in one process."""

import asyncio
import json
import os
import subprocess
import sys
import threading
import urllib.error
import urllib.request

import pytest
from sim_helpers import write_profile

from worker.config import EngineConfig
from worker.server.launcher import WorkerProcess
from worker.sim_fleet import SimFleet

MODEL = "llama3-8b"
DOC = "The river number 7 runs past the old mill and into the sea. " * 12


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    return tmp_path_factory.mktemp("sim-home")


@pytest.fixture(scope="module")
def profile(home):
    return write_profile(home, const_s=0.002, per_token_s=2e-6)


def post(url: str, body: dict) -> tuple[int, dict]:
    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=30) as response:
        return json.loads(response.read())


def chat(url: str, question: str, max_tokens: int = 8) -> tuple[int, dict]:
    return post(url + "/v1/chat/completions", {
        "model": MODEL, "max_tokens": max_tokens,
        "messages": [{"role": "system", "content": DOC}, {"role": "user", "content": question}]})


def test_a_sim_worker_process_serves_chat_and_reports_cache_hits(home, profile):
    args = ["--model", MODEL, "--executor", "sim", "--sim-profile", str(profile), "--kv-cache-tokens", "16384",
            "--no-progress"]
    with WorkerProcess(args, env={"RADIXFLEET_HOME": str(home), "OMP_NUM_THREADS": "1"}) as worker:
        status, first = chat(worker.url, "Where does the river go?")
        assert status == 200, first
        assert first["usage"]["completion_tokens"] == 8
        assert first["choices"][0]["finish_reason"] == "length"
        status, second = chat(worker.url, "Where does the river go?")
        assert second["usage"]["prompt_tokens_details"]["cached_tokens"] >= first["usage"]["prompt_tokens"] - 16
        load = get(worker.url + "/load")
        assert load["kv_tokens_total"] == 16384 and load["cache_hit_tokens"] > 0
        assert not list((home / "models").glob("*/*.safetensors"))  # no weights were written


class LoopThread:
    """An event loop in a thread, hosting the fleet while the test talks to it over HTTP."""

    def __init__(self):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro, timeout=120):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self):
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


@pytest.fixture(scope="module")
def fleet(home, profile):
    saved = os.environ.get("RADIXFLEET_HOME")
    os.environ["RADIXFLEET_HOME"] = str(home)
    config = EngineConfig(model=MODEL, executor="sim", sim_profile=str(profile), kv_cache_tokens=4096,
                          progress=False)
    host = LoopThread()
    fleet = SimFleet(config, num_workers=8)
    host.run(fleet.start())
    yield fleet
    host.run(fleet.stop())
    host.close()
    if saved is None:
        os.environ.pop("RADIXFLEET_HOME", None)
    else:
        os.environ["RADIXFLEET_HOME"] = saved


def test_eight_workers_in_one_process_each_answer_load_and_health(fleet):
    urls = fleet.urls
    assert len(set(urls)) == 8
    for url in urls:
        assert get(url + "/health")["status"] == "ok"
        load = get(url + "/load")
        assert load["kv_tokens_total"] == 4096 and load["running"] == 0


def test_fleet_workers_serve_chat_and_count_their_own_hits(fleet):
    a, b = fleet.urls[0], fleet.urls[1]
    for _ in range(2):
        status, body = chat(a, "What runs past the mill?", max_tokens=5)
        assert status == 200 and body["usage"]["completion_tokens"] == 5
    assert body["usage"]["prompt_tokens_details"]["cached_tokens"] > 0
    assert get(a + "/load")["cache_hit_tokens"] > 0
    assert get(b + "/load")["cache_query_tokens"] == 0  # caches are per worker
    status, body = chat(b, "Streams?", max_tokens=3)
    assert status == 200
    assert body["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    assert "radixfleet:prefix_cache_queries" in urllib.request.urlopen(b + "/metrics", timeout=30).read().decode()


def test_fleet_workers_refuse_bad_input_with_an_openai_error(fleet):
    status, body = post(fleet.urls[2] + "/v1/chat/completions", {"model": MODEL, "messages": [], "max_tokens": 2})
    assert status == 400 and body["error"]["param"] == "messages"
    status, body = post(fleet.urls[2] + "/v1/completions", {"model": MODEL, "prompt": [999999], "max_tokens": 2})
    assert status == 400 and "token ids" in body["error"]["message"]


def test_sim_fleet_command_names_a_missing_profile(home):
    result = subprocess.run(
        [sys.executable, "-m", "worker.cli", "sim-fleet", "--workers", "2", "--base-port", "0", "--model", MODEL,
         "--sim-profile", str(home / "missing.json"), "--no-progress"],
        capture_output=True, text=True, timeout=120, env={**os.environ, "RADIXFLEET_HOME": str(home)})
    assert result.returncode == 2
    assert "bench calibrate" in result.stderr


def test_steps_of_workers_on_one_modelled_gpu_queue_for_it_but_not_their_host_part():
    from worker.sim_fleet import SharedGPU

    gpu = SharedGPU()
    # four decode steps (all GPU work) issued together end one after another, as on a time-sliced GPU
    assert [gpu.reserve(0.0, 0.0, 0.010) for _ in range(4)] == pytest.approx([0.010, 0.020, 0.030, 0.040])
    gpu = SharedGPU()
    # eager steps: 6 ms of kernel launches each (host, side by side), then 4 ms of GPU work each, queued
    assert [gpu.reserve(0.0, 0.006, 0.010) for _ in range(3)] == pytest.approx([0.010, 0.014, 0.018])
    assert gpu.reserve(1.0, 0.0, 0.005) == pytest.approx(1.005)  # an idle GPU does not delay a later step


def test_workers_per_gpu_groups_the_fleet(home, profile):
    config = EngineConfig(model=MODEL, executor="sim", sim_profile=str(profile), kv_cache_tokens=4096,
                          progress=False)
    from worker.config import ConfigError

    with pytest.raises(ConfigError, match="--workers-per-gpu"):
        SimFleet(config, num_workers=4, workers_per_gpu=0)
    saved = os.environ.get("RADIXFLEET_HOME")
    os.environ["RADIXFLEET_HOME"] = str(home)
    host = LoopThread()
    try:
        fleet = SimFleet(config, num_workers=5, workers_per_gpu=2)
        host.run(fleet.start())
        gpus = [w.client.gpu for w in fleet.workers]
        assert gpus[0] is gpus[1] and gpus[2] is gpus[3] and gpus[4] is not None
        assert len({id(g) for g in gpus}) == 3
        status, body = chat(fleet.urls[1], "What runs past the mill?", max_tokens=3)
        assert status == 200 and body["usage"]["completion_tokens"] == 3
        host.run(fleet.stop())
    finally:
        host.close()
        if saved is None:
            os.environ.pop("RADIXFLEET_HOME", None)
        else:
            os.environ["RADIXFLEET_HOME"] = saved
