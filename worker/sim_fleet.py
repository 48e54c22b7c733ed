"""`radixfleet sim-fleet`: many sim workers in one process, each a real HTTP worker on its own port.

A worker normally is two processes (HTTP frontend + engine). A fleet of 128 of those does not fit a small
machine, and with the sim executor nothing needs a process of its own: the engine does no tensor work, it
only waits for the modelled step time. So this host runs, in one asyncio event loop:

* per worker, the real frontend (worker.server.app with its own ServerContext, metrics and port: the same
  /v1/chat/completions, /v1/completions, /load, /health, /metrics) and a real LLMEngine with a SimExecutor;
* per worker, a task that steps its engine and then awaits the modelled step time (the executor runs with
  `defer_wait`, so no step blocks the loop) before handing the step's outputs to the request streams.

`InProcessEngineClient` stands in for worker.server.engine_client.EngineClient (the frontend's handle on an
engine process) with the same methods, applying requests and aborts straight to the engine between steps.

Several workers on one GPU (`--workers-per-gpu K`: workers 0..K-1 share modelled GPU 0, and so on), as in
a fleet run with several CUDA workers on one GPU: a GPU runs the kernels of one process at a time, so each
step's GPU part waits for the steps the GPU already holds (a FIFO queue per modelled GPU), while its host
part (CostModel.host_seconds: an eager step's kernel launches) runs beside the others' GPU work. With K = 1
(the default) every worker has a GPU of its own, as the calibration measured it.

Fidelity: a step lasts max(modelled time, the host's own time for it). While the host CPU keeps up (check
the `host_busy` figure printed every --report-s), timing is as modelled. When it does not (128 workers
under load on 2 cores), `--time-scale S` stretches every modelled step S times: the fleet then behaves
like the modelled one in slow motion (latencies x S, req/s / S), with the host's share S times smaller.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
import time
from dataclasses import dataclass

from aiohttp import web

from worker.config import ConfigError, EngineConfig
from worker.engine.protocol import EngineRequest
from worker.sampling_params import InvalidParameter
from worker.server.engine_client import (
    RETRY_AFTER_S,
    EngineClient,
    EngineInfo,
    RequestStream,
)
from worker.server.errors import (
    ApiError,
    bad_request,
    engine_unavailable,
    internal_error,
    overloaded,
)

log = logging.getLogger("radixfleet.sim_fleet")

STATS_INTERVAL_S = 0.05  # as the engine process: a busy engine refreshes /load at most this often
TIMER_SLACK_S = 0.002  # lateness of a wake-up that is carried into the next step rather than lost


class SharedGPU:
    """One modelled GPU under several workers: their steps' GPU parts run one after another."""

    def __init__(self):
        self.free_at = float("-inf")  # perf_counter time at which the queued GPU work ends

    def reserve(self, origin: float, host_s: float, total_s: float) -> float:
        """A step issued at `origin` with `host_s` of host work and `total_s` in all: the time its tokens exist."""
        gpu_start = max(origin + host_s, self.free_at)
        self.free_at = gpu_start + (total_s - host_s)
        return self.free_at


class InProcessEngineClient(EngineClient):
    """The frontend's handle on an engine stepped in this event loop.

    An EngineClient (the streams' bookkeeping, health, stats listeners are inherited) whose engine lives in
    this process: requests and aborts are applied to it directly, between steps, instead of over a pipe.
    """

    def __init__(self, engine, gpu: SharedGPU | None = None):
        super().__init__(engine.config)
        self.engine = engine
        self.gpu = gpu  # None: a GPU of its own
        self.executor = engine.executor
        self.info = EngineInfo(engine.model_name, engine.max_model_len, os.getpid(), str(engine.model_path),
                               engine.tokenizer)
        self.stats = engine.stats()
        self._work = asyncio.Event()
        self._last_stats = 0.0
        self._deadline: float | None = None  # perf_counter time at which the last step's tokens were due
        self._task: asyncio.Task | None = None
        self.busy_seconds = 0.0  # host time spent inside engine.step()

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:  # not a coroutine: nothing to wait for
        self._loop = asyncio.get_running_loop()
        self._task = self._loop.create_task(self._run(), name="sim-engine")

    @property
    def pid(self) -> int:
        return os.getpid()

    async def shutdown(self, timeout_s: float = 5.0) -> None:
        self._stopping = True
        self.abort_in_engine()
        if self._task is not None:
            self._task.cancel()
            try:
                await asyncio.wait_for(self._task, timeout_s)
            except (asyncio.CancelledError, asyncio.TimeoutError):
                pass
        self.engine.shutdown()

    # ------------------------------------------------------------------ requests
    def submit(self, request: EngineRequest) -> RequestStream:
        if not self.healthy:
            raise engine_unavailable(self.dead_reason or "the worker is shutting down")
        stream = RequestStream(request.request_id, request.params.n)
        self._streams[request.request_id] = stream
        try:
            self.engine.add_request(request)
        except InvalidParameter as error:
            self._reject(stream, bad_request(error.param, error.message))
        except Exception as error:  # noqa: BLE001 - the request's client hears of it, the fleet goes on
            if type(error).__name__ == "QueueFullError":
                self._reject(stream, overloaded(RETRY_AFTER_S, self.stats.num_waiting if self.stats else 0))
            else:
                self._reject(stream, internal_error(f"{type(error).__name__}: {error}"))
        else:
            self._work.set()
        return stream

    def _reject(self, stream: RequestStream, error: ApiError) -> None:
        self._streams.pop(stream.request_id, None)
        stream._fail(error)

    def abort(self, request_id: str) -> None:
        if self._streams.pop(request_id, None) is not None:
            self.engine.abort_request(request_id)
            self._work.set()  # the abort event is an output the loop delivers

    def abort_choice(self, request_id: str, index: int) -> None:
        if request_id in self._streams:
            self.engine.abort_request(request_id, index)
            self._work.set()

    def abort_in_engine(self) -> int:
        for request_id in list(self._streams):
            self.engine.abort_request(request_id)
        self._work.set()
        return len(self._streams)

    # ------------------------------------------------------------------ the engine loop
    async def _run(self) -> None:
        try:
            while True:
                if not self.engine.has_unfinished():
                    self._set_stats(self.engine.stats())
                    self._work.clear()
                    await self._work.wait()
                    continue
                started = time.perf_counter()
                # A timer fires up to a millisecond late (the loop's clock has that grain): a step that
                # follows the previous one at once starts, in modelled time, when that one ended.
                origin = started
                if self._deadline is not None and 0 <= started - self._deadline < TIMER_SLACK_S:
                    origin = self._deadline
                outputs = self.engine.step()
                done = time.perf_counter()
                self.busy_seconds += done - started
                # the step's tokens exist once its modelled time has passed (host time already spent counts)
                host_s, total_s = self.executor.take_deferred()
                self._deadline = origin + total_s if self.gpu is None else self.gpu.reserve(origin, host_s, total_s)
                remaining = self._deadline - done
                if remaining > 0:
                    await asyncio.sleep(remaining)
                else:
                    await asyncio.sleep(0)  # let the frontends run between steps, as the pipe would
                for output in outputs:
                    stream = self._streams.get(output.request_id)
                    if stream is not None:
                        stream._deliver(output)
                now = time.monotonic()
                if now - self._last_stats >= STATS_INTERVAL_S:
                    self._last_stats = now
                    self._set_stats(self.engine.stats())
        except asyncio.CancelledError:
            raise
        except Exception as error:  # noqa: BLE001 - one broken engine must not take the fleet down
            log.exception("sim engine loop crashed")
            self.dead_reason = f"the engine loop crashed: {type(error).__name__}: {error}"
            self.fail_all(engine_unavailable(self.dead_reason))


@dataclass
class SimWorker:
    port: int
    client: InProcessEngineClient
    runner: web.AppRunner

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


class SimFleet:
    """`num_workers` sim workers on ports base_port, base_port + 1, ... (0: free ports picked by the OS)."""

    def __init__(self, config: EngineConfig, num_workers: int, base_port: int = 0, host: str = "127.0.0.1",
                 served_model_names: list[str] | None = None, time_scale: float = 1.0, workers_per_gpu: int = 1):
        if num_workers < 1:
            raise ConfigError(f"--workers must be at least 1, got {num_workers}")
        if workers_per_gpu < 1:
            raise ConfigError(f"--workers-per-gpu must be at least 1, got {workers_per_gpu}")
        self.workers_per_gpu = workers_per_gpu
        if not (time_scale > 0):
            raise ConfigError(f"--time-scale must be positive, got {time_scale}")
        self.time_scale = float(time_scale)
        if config.executor != "sim":
            config.executor = "sim"
        self.config = config.validate()
        self.num_workers = num_workers
        self.base_port = base_port
        self.host = host
        self.served_model_names = served_model_names
        self.workers: list[SimWorker] = []

    @property
    def urls(self) -> list[str]:
        return [f"http://{self.host}:{w.port}" for w in self.workers]

    async def start(self, progress: bool = False) -> None:
        from worker.engine.llm_engine import LLMEngine
        from worker.executor.sim import SimExecutor, SimProfile
        from worker.models.registry import resolve_model
        from worker.server.app import build_app
        from worker.server.context import ServerContext

        model_path = resolve_model(self.config.model, progress=self.config.progress, weights=False)
        probe = SimExecutor(model_path, self.config)  # resolves and checks the profile once for all workers
        profile: SimProfile = probe.profile
        shared = self.workers_per_gpu > 1
        gpus = [SharedGPU() for _ in range(-(-self.num_workers // self.workers_per_gpu))] if shared else []
        try:
            for i in range(self.num_workers):
                executor = probe if i == 0 else SimExecutor(model_path, self.config, profile=profile)
                executor.defer_wait = True
                executor.time_scale = self.time_scale
                engine = LLMEngine(self.config, executor=executor)
                client = InProcessEngineClient(engine, gpus[i // self.workers_per_gpu] if shared else None)
                ctx = ServerContext(self.config, client, engine.tokenizer, engine.model_name, engine.max_model_len,
                                    self.served_model_names)
                runner = web.AppRunner(build_app(ctx), handler_cancellation=True, access_log=None)
                await runner.setup()
                port = self.base_port + i if self.base_port else 0
                site = web.TCPSite(runner, self.host, port, reuse_address=True)
                try:
                    await site.start()
                except OSError as error:
                    await runner.cleanup()
                    raise ConfigError(f"cannot listen on {self.host}:{port}: {error.strerror or error}; pick another "
                                      "--base-port or stop the process using those ports") from None
                if not port:
                    port = runner.addresses[0][1]
                client.start()
                self.workers.append(SimWorker(port, client, runner))
                if progress and ((i + 1) % 16 == 0 or i + 1 == self.num_workers):
                    print(f"radixfleet sim-fleet: {i + 1}/{self.num_workers} workers up", file=sys.stderr, flush=True)
        except BaseException:
            await self.stop()
            raise

    async def stop(self) -> None:
        for worker in self.workers:
            await worker.runner.cleanup()
            await worker.client.shutdown()
        self.workers = []

    def host_busy_seconds(self) -> float:
        return sum(w.client.busy_seconds for w in self.workers)


# ---------------------------------------------------------------------- CLI
def add_arguments(parser: argparse.ArgumentParser) -> None:
    from worker.server.cli import add_engine_arguments

    parser.add_argument("--workers", type=int, default=8, help="how many sim workers (default: 8)")
    parser.add_argument("--base-port", type=int, default=9100,
                        help="worker i listens on base-port + i (default: 9100; 0: free ports)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    parser.add_argument("--urls-file", default=None, metavar="PATH",
                        help="write the worker URLs there, one a line, once all are up (for the router)")
    parser.add_argument("--time-scale", type=float, default=1.0, metavar="S",
                        help="run every modelled step S times slower, for hosts too busy to keep up with the "
                             "modelled GPU (then divide measured latencies by S and multiply req/s by S)")
    parser.add_argument("--workers-per-gpu", type=int, default=1, metavar="K",
                        help="workers 0..K-1 share one modelled GPU, K..2K-1 the next, ...: their steps' GPU parts "
                             "queue on it, as CUDA workers sharing a GPU do (default 1: a GPU each)")
    parser.add_argument("--report-s", type=float, default=10.0,
                        help="print fleet figures this often (0: never)")
    parser.add_argument("--log-level", default="warning", choices=("debug", "info", "warning", "error"))
    add_engine_arguments(parser, skip=("executor", "device"))


async def _serve(fleet: SimFleet, args: argparse.Namespace) -> int:
    import signal

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    started = time.perf_counter()
    try:
        await fleet.start(progress=True)
    except ConfigError as error:
        print(f"radixfleet sim-fleet: {error}", file=sys.stderr)
        return 2
    urls = fleet.urls
    if args.urls_file:
        with open(args.urls_file, "w") as handle:
            handle.write("\n".join(urls) + "\n")
    print(f"radixfleet sim-fleet: {len(urls)} sim workers ready in {time.perf_counter() - started:.1f} s, "
          f"{urls[0]} .. {urls[-1]} (profile {fleet.workers[0].client.executor.profile.name!r}, "
          f"time scale {fleet.time_scale:g}, {fleet.workers_per_gpu} worker(s) per modelled GPU)",
          file=sys.stderr, flush=True)
    last_busy, last_time = 0.0, time.perf_counter()
    while not stop.is_set():
        try:
            await asyncio.wait_for(stop.wait(), args.report_s if args.report_s > 0 else None)
        except asyncio.TimeoutError:
            busy, now = fleet.host_busy_seconds(), time.perf_counter()
            running = sum(w.client.stats.num_running for w in fleet.workers if w.client.stats)
            hits = sum(w.client.stats.cache_hit_tokens for w in fleet.workers if w.client.stats)
            queries = sum(w.client.stats.cache_query_tokens for w in fleet.workers if w.client.stats)
            print(f"radixfleet sim-fleet: running {running}, hit rate {hits / max(queries, 1):.1%}, "
                  f"host_busy {(busy - last_busy) / (now - last_time):.0%} of one core in engine steps",
                  file=sys.stderr, flush=True)
            last_busy, last_time = busy, now
    print("radixfleet sim-fleet: stopping", file=sys.stderr, flush=True)
    await fleet.stop()
    return 0


def run(args: argparse.Namespace) -> int:
    from worker.server.cli import engine_config_from_args

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args.executor, args.device = "sim", "cpu"
    try:
        config = engine_config_from_args(args)
        fleet = SimFleet(config, args.workers, args.base_port, args.host, time_scale=args.time_scale,
                         workers_per_gpu=args.workers_per_gpu)
    except ConfigError as error:
        print(f"radixfleet sim-fleet: {error}", file=sys.stderr)
        return 2
    if args.base_port and not (0 < args.base_port and args.base_port + args.workers - 1 < 65536):
        print(f"radixfleet sim-fleet: ports {args.base_port}..{args.base_port + args.workers - 1} are not all valid; "
              "lower --base-port", file=sys.stderr)
        return 2
    try:
        import uvloop

        return uvloop.run(_serve(fleet, args))
    except ImportError:  # pragma: no cover
        return asyncio.run(_serve(fleet, args))
