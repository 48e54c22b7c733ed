"""The router in front of two real CPU workers (`radixfleet worker --model demo --device cpu`).

End to end with the `openai` package: answers pass through (streaming and not), and a repeated
prefix goes back to the worker that holds it, whose own usage reports it as cached.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import openai
import pytest

ROOT = Path(__file__).parent.parent
pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_healthy(url: str, proc: subprocess.Popen, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"{proc.args} exited with {proc.returncode}"
        try:
            with urllib.request.urlopen(url, timeout=1) as resp:
                if resp.status == 200:
                    return
        except OSError:
            time.sleep(0.2)
    raise TimeoutError(url)


@pytest.fixture(scope="module")
def router_url(tmp_path_factory):
    logs = tmp_path_factory.mktemp("logs")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = []
    try:
        worker_urls = []
        for i in range(2):
            port = _free_port()
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "worker.cli", "worker", "--model", "demo", "--device", "cpu", "--port",
                 str(port), "--log-level", "warning"], cwd=ROOT, env=env,
                stdout=(logs / f"worker{i}.log").open("wb"), stderr=subprocess.STDOUT))
            worker_urls.append(f"http://127.0.0.1:{port}")
        for url, proc in zip(worker_urls, procs):
            _wait_healthy(url + "/health", proc, 180)
        port = _free_port()
        router = subprocess.Popen([sys.executable, "-m", "worker.cli", "router", "--worker-urls", *worker_urls,
                                   "--port", str(port), "--host", "127.0.0.1"], cwd=ROOT, env=env,
                                  stdout=(logs / "router.log").open("wb"), stderr=subprocess.STDOUT)
        procs.append(router)
        _wait_healthy(f"http://127.0.0.1:{port}/health", router, 30)
        yield f"http://127.0.0.1:{port}"
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()


def test_answers_pass_through_and_repeated_prefixes_hit_the_cache(router_url):
    client = openai.OpenAI(base_url=router_url + "/v1", api_key="unused", max_retries=0, timeout=120)
    system = "You are a careful assistant who explains routing, caching and batching in plain words. " * 8
    first = client.chat.completions.with_raw_response.create(
        model="demo", max_tokens=6, temperature=0,
        messages=[{"role": "system", "content": system}, {"role": "user", "content": "What is a cache?"}])
    reply = first.parse()
    assert isinstance(reply.choices[0].message.content, str) and reply.usage.completion_tokens > 0
    home = first.headers["x-radixfleet-worker"]
    second = client.chat.completions.with_raw_response.create(
        model="demo", max_tokens=6, temperature=0,
        messages=[{"role": "system", "content": system}, {"role": "user", "content": "And a router?"}])
    assert second.headers["x-radixfleet-worker"] == home, "the shared prefix goes back to its worker"
    assert second.parse().usage.prompt_tokens_details.cached_tokens > 100

    chunks = list(client.chat.completions.create(
        model="demo", max_tokens=6, temperature=0, stream=True, stream_options={"include_usage": True},
        messages=[{"role": "user", "content": "Stream a short answer."}]))
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0
    completion = client.completions.create(model="demo", prompt="Once upon a time", max_tokens=4, temperature=0)
    assert completion.usage.completion_tokens > 0
    assert [m.id for m in client.models.list().data] == ["demo"]
