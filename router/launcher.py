"""`radixfleet up`: start N local workers and the router in front of them, and keep them running.

One worker per visible GPU (CUDA_VISIBLE_DEVICES set to that GPU), or 2 CPU workers on the built-in
demo model when there is no GPU. Waits for every worker's /health, starts the router, prints the
endpoint. Every child's output is relayed line by line with a prefix ([worker0] ..., [router] ...).
A crashed child is restarted with exponential backoff; Ctrl-C / SIGTERM stops everything (the router
first, so it drains, then the workers).

Every worker option passes through (`up --model DIR --max-model-len 8192 --served-model-name m`); the
worker's scheduling policy is --scheduling-policy here, since --policy is the router's. CPU workers
share the cores: each gets cores / workers torch threads. Every port is checked before anything starts.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field

from router.policies import POLICY_NAMES
from worker.server.cli import add_worker_options, take_positional_model, usable_cores, worker_argv
from worker.server.launcher import bind_port

DEFAULT_CPU_WORKERS = 2
DEFAULT_SHUTDOWN_TIMEOUT_S = 30.0
# After SIGTERM a worker drains for its --shutdown-timeout, then aborts what is left and waits up to 10 s
# more (worker.server.serve); the launcher waits this much longer than that before it kills anything.
STOP_MARGIN_S = 15.0
WORKER_ABORT_WAIT_S = 10.0
# A process that exits this many times before it ever becomes healthy is not going to: give up early.
MAX_EXITS_BEFORE_HEALTHY = 3
USAGE_ERROR_EXIT = 2  # what the radixfleet commands exit with on bad options


@dataclass
class ProcessSpec:
    """One child process: its log prefix name, command line and extra environment."""

    name: str
    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)
    health_url: str | None = None


class Backoff:
    """Restart delays: initial, doubled per crash up to max_s; reset once a run lasted stable_s."""

    def __init__(self, initial_s: float = 1.0, max_s: float = 30.0, stable_s: float = 60.0) -> None:
        self.initial_s = initial_s
        self.max_s = max_s
        self.stable_s = stable_s
        self._next = initial_s

    def delay_after(self, uptime_s: float) -> float:
        """Delay before restarting a process that ran `uptime_s` seconds before exiting."""
        if uptime_s >= self.stable_s:
            self._next = self.initial_s
        delay = self._next
        self._next = min(self._next * 2, self.max_s)
        return delay


def detect_gpus(env: dict[str, str] | None = None) -> list[str]:
    """Visible GPU ids: CUDA_VISIBLE_DEVICES when set, else what nvidia-smi lists, else none."""
    env = os.environ if env is None else env
    visible = env.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return [d.strip() for d in visible.split(",") if d.strip() and d.strip() != "-1"]
    if shutil.which("nvidia-smi") is None:
        return []
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=index", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return []
    if out.returncode != 0:
        return []
    return [line.strip() for line in out.stdout.splitlines() if line.strip()]


def cpu_threads_per_worker(num_workers: int, cores: int) -> int:
    """CPU workers split the cores: oversubscribed torch pools cost far more than they bring."""
    return max(1, cores // max(1, num_workers))


def plan_workers(num_workers: int | None, device: str, gpus: list[str], model: str | None, base_port: int,
                 worker_cmd: str | None = None, host: str = "127.0.0.1", extra_args: list[str] | None = None,
                 cpu_threads: int | None = None) -> list[ProcessSpec]:
    """The worker processes to start. Pure: GPU list and command template are given.

    extra_args: worker options passed through to every worker. cpu_threads: each CPU worker's torch
    threads (None: the cores divided among the workers)."""
    if device == "auto":
        device = "cuda" if gpus else "cpu"
    if device == "cuda" and not gpus:
        raise ValueError("--device cuda but no GPU is visible (check nvidia-smi / CUDA_VISIBLE_DEVICES), "
                         "or use --device cpu")
    if num_workers is None:
        num_workers = len(gpus) if device == "cuda" else DEFAULT_CPU_WORKERS
    if num_workers < 1:
        raise ValueError("--num-workers must be at least 1")
    if device == "cuda" and num_workers > len(gpus):
        raise ValueError(f"--num-workers {num_workers} but only {len(gpus)} GPU(s) are visible: "
                         "one worker per GPU")
    model = model or "demo"
    extra = list(extra_args or [])
    if device == "cpu":
        extra += ["--cpu-threads", str(cpu_threads or cpu_threads_per_worker(num_workers, usable_cores()))]
    specs = []
    for index in range(num_workers):
        port = base_port + index
        if worker_cmd:
            argv = shlex.split(worker_cmd.format(port=port, index=index, device=device, model=model,
                                                 python=sys.executable))
        else:
            argv = [sys.executable, "-m", "worker.cli", "worker", "--model", model, "--port", str(port),
                    "--device", device, *extra]
        env = {"CUDA_VISIBLE_DEVICES": gpus[index]} if device == "cuda" else {}
        specs.append(ProcessSpec(f"worker{index}", argv, env, f"http://{host}:{port}/health"))
    return specs


def plan_router(worker_specs: list[ProcessSpec], port: int, policy: str, host: str = "0.0.0.0",
                extra: list[str] | None = None) -> ProcessSpec:
    urls = [spec.health_url.rsplit("/health", 1)[0] for spec in worker_specs if spec.health_url]
    argv = [sys.executable, "-m", "worker.cli", "router", "--worker-urls", *urls, "--port", str(port),
            "--policy", policy, "--host", host, *(extra or [])]
    probe_host = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    return ProcessSpec("router", argv, {}, f"http://{probe_host}:{port}/health")


def _say(message: str) -> None:
    print(f"[launcher] {message}", flush=True)


class ManagedProcess:
    """A child process whose output is relayed with a prefix, restarted with backoff when it dies."""

    def __init__(self, spec: ProcessSpec, backoff: Backoff | None = None) -> None:
        self.spec = spec
        self.backoff = backoff or Backoff()
        self.proc: asyncio.subprocess.Process | None = None
        self.stopping = False
        self.restarts = 0
        self.given_up = False  # it exited on bad options and is not restarted
        self._supervisor: asyncio.Task | None = None
        self._relay_task: asyncio.Task | None = None

    async def start(self) -> None:
        await self._spawn()
        self._supervisor = asyncio.get_running_loop().create_task(self._supervise())

    async def _spawn(self) -> None:
        env = {**os.environ, **self.spec.env, "PYTHONUNBUFFERED": "1"}
        self.proc = await asyncio.create_subprocess_exec(
            *self.spec.argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, env=env,
            start_new_session=True)  # our own signal handling decides when children stop
        self.started_at = time.monotonic()
        _say(f"started {self.spec.name} (pid {self.proc.pid}): {shlex.join(self.spec.argv)}")
        self._relay_task = asyncio.get_running_loop().create_task(self._relay(self.proc))

    async def _relay(self, proc: asyncio.subprocess.Process) -> None:
        prefix = f"[{self.spec.name}] ".encode()
        assert proc.stdout is not None
        while True:
            line = await proc.stdout.readline()
            if not line:
                return
            sys.stdout.buffer.write(prefix + line if line.endswith(b"\n") else prefix + line + b"\n")
            sys.stdout.flush()

    async def _supervise(self) -> None:
        while True:
            assert self.proc is not None
            code = await self.proc.wait()
            if self.stopping:
                return
            if code == USAGE_ERROR_EXIT:  # bad options: a restart would fail the same way
                self.given_up = True
                _say(f"{self.spec.name} exited with code {code} (bad options: see its message above); "
                     "not restarting it")
                return
            delay = self.backoff.delay_after(time.monotonic() - self.started_at)
            self.restarts += 1
            _say(f"{self.spec.name} exited with code {code}; restarting in {delay:.1f}s")
            await asyncio.sleep(delay)
            if self.stopping:
                return
            await self._spawn()

    async def stop(self, timeout_s: float = DEFAULT_SHUTDOWN_TIMEOUT_S + STOP_MARGIN_S) -> None:
        self.stopping = True
        proc = self.proc
        if proc is not None and proc.returncode is None:
            try:
                proc.send_signal(signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                await asyncio.wait_for(proc.wait(), timeout_s)
            except asyncio.TimeoutError:
                _say(f"{self.spec.name} did not stop in {timeout_s:.0f}s; killing it")
                proc.kill()
                await proc.wait()
        if self._supervisor is not None:
            self._supervisor.cancel()




async def wait_healthy(url: str, process: ManagedProcess, timeout_s: float, stop: asyncio.Event) -> bool:
    """Poll a /health URL until it answers 200 (True), the timeout passes, the process keeps
    crashing before it gets there, or a stop is asked (False)."""
    import aiohttp

    deadline = time.monotonic() + timeout_s
    last_report = time.monotonic()
    async with aiohttp.ClientSession() as session:
        while time.monotonic() < deadline and not stop.is_set():
            try:
                async with session.get(url, timeout=aiohttp.ClientTimeout(total=2)) as resp:
                    if resp.status == 200:
                        return True
            except (aiohttp.ClientError, asyncio.TimeoutError, OSError):
                pass
            if process.given_up:
                return False
            if process.restarts >= MAX_EXITS_BEFORE_HEALTHY:
                _say(f"{process.spec.name} exited {process.restarts} times before becoming healthy: "
                     "see its log above")
                return False
            if time.monotonic() - last_report > 15:
                last_report = time.monotonic()
                _say(f"still waiting for {process.spec.name} to become healthy...")
            try:
                await asyncio.wait_for(stop.wait(), 0.25)
            except asyncio.TimeoutError:
                pass
    return False


def stop_timeouts(shutdown_timeout_s: float) -> tuple[float, float]:
    """(router, worker): how long each may take after SIGTERM before it is killed. The router drains
    for shutdown_timeout_s; a worker drains as long, then aborts the rest and waits up to 10 s more."""
    return shutdown_timeout_s + STOP_MARGIN_S, shutdown_timeout_s + WORKER_ABORT_WAIT_S + STOP_MARGIN_S


def try_line(endpoint: str, model: str, api_key_hint: str | None) -> str:
    """A curl command that works against this fleet as printed (short max_tokens: the demo is slow).

    api_key_hint: what to write after "Bearer" (an environment variable is expanded by the shell)."""
    quote = '"' if api_key_hint and api_key_hint.startswith("$") else "'"
    auth = f"-H {quote}Authorization: Bearer {api_key_hint}{quote} " if api_key_hint else ""
    body = json.dumps({"model": model, "max_tokens": 32, "messages": [{"role": "user", "content": "Hello"}]})
    return f"curl {endpoint}/chat/completions -H 'Content-Type: application/json' {auth}-d '{body}'"


def busy_ports(checks: list[tuple[str, int, str]]) -> list[str]:
    """One line per (host, port, flag) that cannot be bound now, naming the flag that moves it."""
    problems = []
    for host, port, flag in checks:
        try:
            bind_port(host, port).close()
        except OSError as error:
            problems.append(f"port {port} on {host} is not available ({error.strerror or error}): "
                            f"pick another {flag} or stop the process using it")
    return problems


async def launch(workers: list[ProcessSpec], router: ProcessSpec, health_timeout_s: float,
                 endpoint: str, stop: asyncio.Event | None = None, try_command: str | None = None,
                 shutdown_timeout_s: float = DEFAULT_SHUTDOWN_TIMEOUT_S) -> int:
    """Start everything, wait for health, print the endpoint, then supervise until stopped.

    shutdown_timeout_s: the drain time given to the router and the workers (see stop_timeouts)."""
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(sig, stop.set)
        except (NotImplementedError, RuntimeError):  # pragma: no cover
            pass
    managed = [ManagedProcess(spec) for spec in workers]
    router_proc = ManagedProcess(router)
    code = 0
    try:
        for proc in managed:
            await proc.start()
        _say(f"waiting for {len(managed)} worker(s) to become healthy (model loading can take a while)")
        results = await asyncio.gather(*(wait_healthy(p.spec.health_url, p, health_timeout_s, stop)
                                         for p in managed))
        if stop.is_set():
            return 130
        if not all(results):
            bad = [p.spec.name for p, ok in zip(managed, results) if not ok]
            _say(f"{', '.join(bad)} did not become healthy (within --health-timeout {health_timeout_s:.0f} s, "
                 "or stopped): see their logs above; stopping")
            return 1
        await router_proc.start()
        if not await wait_healthy(router.health_url, router_proc, 60, stop):
            if stop.is_set():
                return 130
            _say("the router did not become healthy: see its log above; stopping")
            return 1
        print(f"\nradixfleet is up: {endpoint}  (OpenAI API; {len(managed)} workers)\n"
              + (f"  try: {try_command}\n" if try_command else "")
              + "  Ctrl-C stops everything.\n", flush=True)
        await stop.wait()
    finally:
        _say("stopping: router first (drains in-flight requests), then workers")
        router_stop_s, worker_stop_s = stop_timeouts(shutdown_timeout_s)
        await router_proc.stop(router_stop_s)
        await asyncio.gather(*(p.stop(worker_stop_s) for p in managed))
        _say("stopped")
    return code


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model_positional", nargs="?", default=None, metavar="MODEL",
                        help="the same as --model (`radixfleet up MODEL`)")
    fleet = parser.add_argument_group("fleet")
    fleet.add_argument("--num-workers", type=int, default=None,
                       help="workers to start; None: one per visible GPU, 2 on CPU")
    fleet.add_argument("--port", type=int, default=8000, help="router port (the endpoint clients use)")
    fleet.add_argument("--host", default="0.0.0.0", help="router bind address")
    fleet.add_argument("--policy", choices=POLICY_NAMES, default="cache_aware", help="router policy")
    fleet.add_argument("--worker-base-port", type=int, default=8100, help="worker i listens on this + i")
    fleet.add_argument("--health-timeout", type=float, default=900.0,
                       help="seconds to wait for workers to load and report healthy")
    fleet.add_argument("--api-key", default=os.environ.get("RADIXFLEET_API_KEY"),
                       help="clients must send 'Authorization: Bearer KEY' (env RADIXFLEET_API_KEY); "
                            "the workers require it too and the router sends it to them")
    fleet.add_argument("--shutdown-timeout", type=float, default=DEFAULT_SHUTDOWN_TIMEOUT_S, metavar="S",
                       help="on Ctrl-C / SIGTERM, seconds in-flight requests may run on (router and workers)")
    fleet.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    fleet.add_argument("--worker-cmd", default=None, help=argparse.SUPPRESS)  # tests: {port} {index} {device} {model} {python}
    parser.set_defaults(_worker_actions=add_worker_options(parser, for_up=True))


def worker_pass_through(args: argparse.Namespace) -> list[str]:
    """The worker options given to `up` (model, device and threads are planned separately)."""
    argv = worker_argv(args, args._worker_actions, skip=("model", "device", "cpu_threads"))
    argv += ["--shutdown-timeout", str(args.shutdown_timeout), "--log-level", args.log_level]
    return argv


def run(args: argparse.Namespace) -> int:
    try:
        take_positional_model(args, "demo")
        cpu_threads = None if args.cpu_threads == "auto" else int(args.cpu_threads)
        gpus = [] if args.device == "cpu" else detect_gpus()
        workers = plan_workers(args.num_workers, args.device, gpus, args.model, args.worker_base_port,
                               args.worker_cmd, extra_args=worker_pass_through(args), cpu_threads=cpu_threads)
    except ValueError as exc:
        print(f"radixfleet up: {exc}", file=sys.stderr)
        return 2
    checks = [(args.host, args.port, "--port")]
    checks += [("127.0.0.1", args.worker_base_port + i, "--worker-base-port") for i in range(len(workers))]
    problems = busy_ports(checks)
    if problems:
        for line in problems:
            print(f"radixfleet up: {line}", file=sys.stderr)
        return 1
    router = plan_router(workers, args.port, args.policy, args.host,
                         ["--drain-timeout", str(args.shutdown_timeout), "--log-level", args.log_level.upper()])
    if args.api_key:  # through the environment, not argv: command lines are visible to every user
        for spec in (router, *workers):
            spec.env["RADIXFLEET_API_KEY"] = args.api_key
        router.env["RADIXFLEET_WORKER_API_KEY"] = args.api_key
    shown_host = "localhost" if args.host in ("0.0.0.0", "::") else args.host
    endpoint = f"http://{shown_host}:{args.port}/v1"
    device = "cuda" if workers[0].env.get("CUDA_VISIBLE_DEVICES") is not None else "cpu"
    _say(f"{len(workers)} {device} worker(s) on model {args.model}, router policy {args.policy}")
    model_name = (args.served_model_name or [args.model])[0]
    key_hint = None
    if args.api_key:
        key_hint = "$RADIXFLEET_API_KEY" if os.environ.get("RADIXFLEET_API_KEY") == args.api_key else "YOUR_API_KEY"
    command = try_line(endpoint, model_name, key_hint)
    try:
        import uvloop

        return uvloop.run(launch(workers, router, args.health_timeout, endpoint, try_command=command,
                                 shutdown_timeout_s=args.shutdown_timeout))
    except ImportError:  # pragma: no cover
        return asyncio.run(launch(workers, router, args.health_timeout, endpoint, try_command=command,
                                  shutdown_timeout_s=args.shutdown_timeout))
