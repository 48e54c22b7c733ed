"""`radixfleet up`: process planning (pure) and a real run with stand-in worker commands."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from router.launcher import Backoff, detect_gpus, plan_router, plan_workers

ROOT = Path(__file__).parent.parent


def test_one_worker_per_visible_gpu_with_its_own_cuda_visible_devices():
    specs = plan_workers(None, "auto", ["0", "3"], "llama3-8b", 9000)
    assert [s.name for s in specs] == ["worker0", "worker1"]
    assert [s.env["CUDA_VISIBLE_DEVICES"] for s in specs] == ["0", "3"]
    assert specs[1].argv[-6:] == ["--model", "llama3-8b", "--port", "9001", "--device", "cuda"]
    assert specs[1].health_url == "http://127.0.0.1:9001/health"


def test_no_gpu_means_two_cpu_workers_on_demo():
    specs = plan_workers(None, "auto", [], None, 8100)
    assert len(specs) == 2 and all(s.env == {} for s in specs)
    assert specs[0].argv[3:10] == ["worker", "--model", "demo", "--port", "8100", "--device", "cpu"]


def test_bad_plans_are_explained():
    with pytest.raises(ValueError, match="no GPU"):
        plan_workers(None, "cuda", [], "demo", 8100)
    with pytest.raises(ValueError, match="one worker per GPU"):
        plan_workers(3, "cuda", ["0"], "demo", 8100)
    with pytest.raises(ValueError, match="at least 1"):
        plan_workers(0, "cpu", [], "demo", 8100)


def test_worker_command_template_and_router_plan():
    specs = plan_workers(2, "cpu", [], "demo", 7000, "{python} standin.py --port {port} --name w{index}")
    assert specs[1].argv[1:] == ["standin.py", "--port", "7001", "--name", "w1"]
    router = plan_router(specs, 7999, "round_robin")
    i = router.argv.index("--worker-urls")
    assert router.argv[i + 1:i + 3] == ["http://127.0.0.1:7000", "http://127.0.0.1:7001"]
    assert router.health_url == "http://127.0.0.1:7999/health"


def test_detect_gpus_honours_cuda_visible_devices():
    assert detect_gpus({"CUDA_VISIBLE_DEVICES": "2,5"}) == ["2", "5"]
    assert detect_gpus({"CUDA_VISIBLE_DEVICES": ""}) == []
    assert detect_gpus({"CUDA_VISIBLE_DEVICES": "-1"}) == []


def test_backoff_doubles_caps_and_resets_after_a_stable_run():
    backoff = Backoff(initial_s=1, max_s=5, stable_s=60)
    assert [backoff.delay_after(1) for _ in range(5)] == [1, 2, 4, 5, 5]
    assert backoff.delay_after(120) == 1


def _free_port_block(n: int) -> int:
    """A base port with n free consecutive ports after it (best effort)."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            base = s.getsockname()[1]
        if base + n >= 65000:
            continue
        try:
            socks = []
            for p in range(base, base + n):
                sock = socket.socket()
                socks.append(sock)
                sock.bind(("127.0.0.1", p))
            return base
        except OSError:
            continue
        finally:
            for sock in socks:
                sock.close()
    raise RuntimeError("no free port block")


@pytest.mark.timeout(90)
def test_up_starts_workers_and_router_restarts_a_crash_and_stops_cleanly():
    base = _free_port_block(3)
    router_port, worker_base = base, base + 1
    standin = ROOT / "bench" / "standin_worker.py"
    cmd = [sys.executable, "-m", "worker.cli", "up", "--device", "cpu", "--num-workers", "2",
           "--port", str(router_port), "--host", "127.0.0.1", "--worker-base-port", str(worker_base),
           "--worker-cmd", f"{{python}} {standin} --port {{port}} --name up{{index}} --model {{model}}"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    lines: list[str] = []

    def pump():
        for line in proc.stdout:
            lines.append(line.rstrip("\n"))

    threading.Thread(target=pump, daemon=True).start()

    def wait_for(pattern: str, timeout: float = 30) -> re.Match:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            for line in list(lines):
                m = re.search(pattern, line)
                if m:
                    return m
            time.sleep(0.05)
        raise AssertionError(f"{pattern!r} not seen in output:\n" + "\n".join(lines))

    try:
        wait_for(r"radixfleet is up: http://127\.0\.0\.1:%d/v1" % router_port)
        assert any(line.startswith("[worker0] standin worker up0 ready") for line in lines)
        assert any(line.startswith("[worker1] ") for line in lines)
        assert any(line.startswith("[router] ") for line in lines)
        body = json.dumps({"model": "demo", "messages": [{"role": "user", "content": "hi"}]}).encode()
        req = urllib.request.Request(f"http://127.0.0.1:{router_port}/v1/chat/completions", data=body,
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=10) as resp:
            assert json.load(resp)["choices"][0]["message"]["content"].startswith("Hello from up")

        pid = int(wait_for(r"started worker0 \(pid (\d+)\)").group(1))
        os.kill(pid, signal.SIGKILL)
        wait_for(r"worker0 exited with code -9; restarting in 1\.0s")
        end = time.monotonic() + 20
        while sum("started worker0" in line for line in lines) < 2:
            assert time.monotonic() < end, "\n".join(lines)
            time.sleep(0.05)
        end = time.monotonic() + 20
        while True:  # the restarted worker answers again
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{worker_base}/health", timeout=1):
                    break
            except OSError:
                assert time.monotonic() < end
                time.sleep(0.1)

        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        wait_for(r"\[launcher\] stopped")
        for port in (router_port, worker_base, worker_base + 1):
            with pytest.raises(OSError):
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _up_with_a_failing_worker(exit_code: int) -> subprocess.CompletedProcess:
    """`up` with one worker whose command prints a line and exits with exit_code."""
    base = _free_port_block(2)
    cmd = [sys.executable, "-m", "worker.cli", "up", "--device", "cpu", "--num-workers", "1",
           "--port", str(base), "--worker-base-port", str(base + 1),
           "--worker-cmd", f"{{python}} -c 'import sys; print(\"no such model\"); sys.exit({exit_code})'"]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=50)


@pytest.mark.timeout(60)
def test_up_gives_up_on_a_worker_that_keeps_crashing_before_it_is_healthy():
    proc = _up_with_a_failing_worker(3)
    assert proc.returncode == 1
    assert "[worker0] no such model" in proc.stdout
    assert "worker0 exited 3 times before becoming healthy" in proc.stdout


@pytest.mark.timeout(60)
def test_up_does_not_restart_a_worker_that_exits_on_bad_options():
    proc = _up_with_a_failing_worker(2)
    assert proc.returncode == 1
    assert "worker0 exited with code 2 (bad options: see its message above); not restarting it" in proc.stdout
    assert proc.stdout.count("started worker0") == 1


def test_stop_timeouts_outlast_the_drains():
    from router.config import RouterConfig
    from router.launcher import stop_timeouts

    router_s, worker_s = stop_timeouts(RouterConfig().drain_timeout_s)
    assert router_s > RouterConfig().drain_timeout_s  # the router is never killed mid-drain
    assert worker_s > 30 + 10  # a worker drains --shutdown-timeout (30), then aborts and waits up to 10 s
