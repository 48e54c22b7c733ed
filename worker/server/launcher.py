"""Start a `radixfleet worker` as a subprocess and wait until it serves (used by tests and benchmarks).

    with WorkerProcess(["--model", "demo", "--device", "cpu"]) as worker:
        requests.get(worker.url + "/health")
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path


def bind_port(host: str, port: int) -> socket.socket:
    """A socket bound to host:port, not yet listening (raises OSError when the port is taken).

    As aiohttp's reuse_address: a port in TIME_WAIT counts as free, one something listens on does not."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    return sock


def free_port() -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class WorkerStartError(RuntimeError):
    pass


class WorkerProcess:
    """One worker subprocess; its output goes to a log file (`log_text()` shows it)."""

    def __init__(self, args: list[str], port: int | None = None, host: str = "127.0.0.1",
                 env: dict[str, str] | None = None, start_timeout_s: float = 300.0, log_path: str | None = None):
        """`log_path`: keep the worker's output there (by default a temporary file, deleted on exit)."""
        self.port = port or free_port()
        self.host = host
        self.url = f"http://{host}:{self.port}"
        self.args = list(args)
        self.env = {**os.environ, **(env or {})}
        self.start_timeout_s = start_timeout_s
        self.process: subprocess.Popen | None = None
        self._keep_log = log_path is not None
        if log_path is not None:
            self._log_file = open(log_path, "w+b")
        else:
            self._log_file = tempfile.NamedTemporaryFile(prefix="radixfleet-worker-", suffix=".log", delete=False)
        self.log_path = Path(self._log_file.name)

    def start(self) -> "WorkerProcess":
        command = [sys.executable, "-m", "worker.cli", "worker", "--host", self.host, "--port", str(self.port),
                   *self.args]
        self.process = subprocess.Popen(command, stdout=self._log_file, stderr=subprocess.STDOUT, env=self.env)
        deadline = time.monotonic() + self.start_timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise WorkerStartError(f"the worker exited with code {self.process.returncode}:\n{self.log_text()}")
            if self.health_status() == 200:
                return self
            time.sleep(0.2)
        self.kill()
        raise WorkerStartError(f"the worker did not become healthy in {self.start_timeout_s:.0f} s:\n{self.log_text()}")

    def health_status(self) -> int | None:
        try:
            with urllib.request.urlopen(self.url + "/health", timeout=2) as response:
                return response.status
        except urllib.error.HTTPError as error:
            return error.code
        except (urllib.error.URLError, OSError):
            return None

    def log_text(self) -> str:
        self._log_file.flush()
        return self.log_path.read_text(errors="replace")

    def engine_pid(self) -> int | None:
        """The engine process id, from the worker's ready line."""
        for line in self.log_text().splitlines():
            if "engine pid" in line:
                return int(line.rsplit("engine pid", 1)[1].strip(" )"))
        return None

    def terminate(self, timeout_s: float = 60.0) -> int:
        """SIGTERM, then wait for a clean exit; SIGKILL if it does not come. Returns the exit code."""
        if self.process is None or self.process.poll() is not None:
            return self.process.returncode if self.process else 0
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.kill()
            return self.process.returncode

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)

    def __enter__(self) -> "WorkerProcess":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.terminate()
        self._log_file.close()
        if not self._keep_log:
            try:
                self.log_path.unlink()
            except OSError:
                pass
