"""The frontend's asyncio handle on the engine process.

`EngineClient` starts the engine process, waits until it is ready, sends requests and aborts
(batched: every command issued during one event-loop iteration leaves in one pipe message), and
routes each step's outputs to the `RequestStream` of the request they belong to.

A reader thread does the blocking `recv()` and hands each message to the event loop with
`call_soon_threadsafe`, so the loop never blocks on the pipe. When the pipe reads EOF the engine
is dead: the client turns unhealthy and every open stream ends with an error.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import pickle
import threading
from dataclasses import dataclass

from worker.config import EngineConfig
from worker.engine.protocol import EngineOutput, EngineRequest, EngineStats
from worker.server.engine_messages import (
    AbortRequests,
    AddRequests,
    Fatal,
    Ready,
    Rejected,
    RejectKind,
    Shutdown,
    StartFailed,
    StatsUpdate,
    StepOutputs,
    decode_outputs,
)
from worker.server.engine_process import DEFAULT_ENGINE_FACTORY, run_engine_process
from worker.server.errors import ApiError, bad_request, engine_unavailable, internal_error, overloaded

log = logging.getLogger("radixfleet.worker")

RETRY_AFTER_S = 1  # what a 503 "queue full" answer asks the client to wait


class EngineStartError(RuntimeError):
    """The engine process could not load the model; the message holds its traceback."""


@dataclass
class EngineInfo:
    model_name: str
    max_model_len: int
    pid: int
    model_path: str  # the resolved checkpoint folder (to load the tokenizer when it could not be sent)
    tokenizer: object | None  # the engine's tokenizer, unpickled, when it could be sent


class RequestStream:
    """Outputs of one engine request as they arrive. Consumed by exactly one handler task."""

    def __init__(self, request_id: str, num_choices: int):
        self.request_id = request_id
        self.num_choices = num_choices
        self._pending: list[EngineOutput] = []
        self._wakeup = asyncio.Event()
        self._error: ApiError | None = None
        self.started = False  # set once the first output arrived (the request left the queue)
        self.finished = False  # every choice has sent its final event (or the stream failed)
        self._open_choices = num_choices

    # ---- called by the client (event-loop thread)
    def _deliver(self, output: EngineOutput) -> None:
        self.started = True
        self._pending.append(output)
        if output.finished:
            self._open_choices -= 1
            if self._open_choices <= 0:
                self.finished = True
        self._wakeup.set()

    def _fail(self, error: ApiError) -> None:
        self._error = error
        self.finished = True
        self._wakeup.set()

    # ---- called by the handler
    async def next_batch(self) -> list[EngineOutput]:
        """Every output received since the last call (waits for at least one).

        Handlers that fall behind get several steps' tokens at once, so a slow client or a busy
        frontend costs fewer, larger SSE chunks rather than a growing backlog.
        """
        while not self._pending:
            if self._error is not None:
                raise self._error
            self._wakeup.clear()
            await self._wakeup.wait()
        batch, self._pending = self._pending, []
        return batch


class EngineClient:
    """Owns the engine process. All methods run on the event loop thread."""

    def __init__(self, config: EngineConfig, engine_factory: str = DEFAULT_ENGINE_FACTORY):
        self.config = config
        self.engine_factory = engine_factory
        self.info: EngineInfo | None = None
        self.stats: EngineStats | None = None
        self.dead_reason: str | None = None  # set once the engine process is gone
        self._streams: dict[str, RequestStream] = {}
        # Commands of this event-loop iteration, sent together by _flush.
        self._adds: list[EngineRequest] = []
        self._aborts: list[tuple[str, int | None]] = []
        self._shutdown_asked = False
        self._flush_scheduled = False
        self._process = None
        self._commands = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ready: asyncio.Future | None = None
        self._stopping = False
        self.stats_listeners: list = []  # callables(stats) run on every stats update (metrics)
        self._handlers = {
            StepOutputs: self._on_step_outputs,
            StatsUpdate: self._on_stats,
            Rejected: self._on_rejected,
            Ready: self._on_ready,
            StartFailed: self._on_start_failed,
            Fatal: self._on_fatal,
        }

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> EngineInfo:
        """Spawn the engine process and wait until it has loaded the model."""
        self._loop = asyncio.get_running_loop()
        self._ready = self._loop.create_future()
        # spawn, not fork: CUDA cannot be initialised in a forked child, and a clean interpreter
        # does not inherit the frontend's event loop or sockets.
        context = multiprocessing.get_context("spawn")
        command_reader, command_writer = context.Pipe(duplex=False)
        output_reader, output_writer = context.Pipe(duplex=False)
        self._process = context.Process(
            target=run_engine_process,
            args=(self.config, command_reader, output_writer, self.engine_factory),
            name="radixfleet-engine",
            daemon=True,
        )
        self._process.start()
        # Close our copies of the child's ends: EOF on the output pipe then means the child died.
        command_reader.close()
        output_writer.close()
        self._commands = command_writer
        threading.Thread(target=self._read_outputs, args=(output_reader,), name="engine-reader", daemon=True).start()
        self.info = await self._ready
        return self.info

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    @property
    def healthy(self) -> bool:
        return self.info is not None and self.dead_reason is None and not self._stopping

    async def shutdown(self, timeout_s: float = 30.0) -> None:
        """Ask the engine to stop, wait for its process, kill it if it does not exit in time."""
        self._stopping = True
        if self._process is None:
            return
        if self.dead_reason is None:
            self._shutdown_asked = True
            self._flush()
        deadline = self._loop.time() + timeout_s
        while self._process.is_alive() and self._loop.time() < deadline:
            await asyncio.sleep(0.05)
        if self._process.is_alive():
            log.warning("engine process did not exit within %.0f s; killing it", timeout_s)
            self._process.kill()
            self._process.join(5)
        self._process.join(1)

    # ------------------------------------------------------------------ requests
    def submit(self, request: EngineRequest) -> RequestStream:
        """Queue a request for the engine; its outputs arrive on the returned stream."""
        if not self.healthy:
            raise engine_unavailable(self.dead_reason or "the worker is shutting down")
        stream = RequestStream(request.request_id, request.params.n)
        self._streams[request.request_id] = stream
        self._adds.append(request)
        self._schedule_flush()
        return stream

    def abort(self, request_id: str) -> None:
        """Stop a request and free its KV. Later outputs for it are dropped."""
        stream = self._streams.pop(request_id, None)
        if stream is not None and self.dead_reason is None:
            self._send_abort(request_id, None)

    def abort_choice(self, request_id: str, index: int) -> None:
        """Stop one choice of a request (a stop string ended it); the other choices go on."""
        if request_id in self._streams and self.dead_reason is None:
            self._send_abort(request_id, index)

    def release(self, request_id: str) -> None:
        """Forget a request that finished on its own."""
        self._streams.pop(request_id, None)

    @property
    def num_open_streams(self) -> int:
        return len(self._streams)

    def fail_all(self, error: ApiError) -> None:
        """End every open stream with `error` (used when the engine dies)."""
        streams, self._streams = self._streams, {}
        for stream in streams.values():
            stream._fail(error)

    # ------------------------------------------------------------------ IPC: out
    def _send_abort(self, request_id: str, index: int | None) -> None:
        self._aborts.append((request_id, index))
        self._schedule_flush()

    def _schedule_flush(self) -> None:
        """All commands of this loop iteration leave together in `_flush`."""
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        messages = []
        if self._adds:
            messages.append(AddRequests(self._adds))
        if self._aborts:  # after the adds: a request added and aborted in one iteration ends aborted
            messages.append(AbortRequests(self._aborts))
        if self._shutdown_asked:
            messages.append(Shutdown())
        self._adds, self._aborts, self._shutdown_asked = [], [], False
        try:
            for message in messages:
                self._commands.send(message)
        except (OSError, EOFError, BrokenPipeError):
            self._on_engine_dead("the engine process closed its command pipe")

    # ------------------------------------------------------------------ IPC: in
    def _read_outputs(self, conn) -> None:
        """Reader thread: blocking receives, handed to the event loop one message at a time."""
        try:
            while True:
                try:
                    message = pickle.loads(conn.recv_bytes())
                except (EOFError, OSError):
                    self._loop.call_soon_threadsafe(self._on_engine_dead, "the engine process exited")
                    return
                self._loop.call_soon_threadsafe(self._dispatch, message)
        except RuntimeError:  # the event loop closed first (the frontend is exiting): nobody left to tell
            return

    def _dispatch(self, message) -> None:
        self._handlers[type(message)](message)

    def _on_step_outputs(self, message: StepOutputs) -> None:
        streams = self._streams
        for output in decode_outputs(message.outputs):
            stream = streams.get(output.request_id)
            if stream is not None:  # None: aborted by us, its late events are dropped
                stream._deliver(output)
        if message.stats is not None:
            self._set_stats(message.stats)

    def _on_stats(self, message: StatsUpdate) -> None:
        self._set_stats(message.stats)

    def _on_rejected(self, message: Rejected) -> None:
        stream = self._streams.pop(message.request_id, None)
        if stream is None:
            return
        if message.kind is RejectKind.INVALID:
            error = bad_request(message.param, message.message, code=message.code)
        elif message.kind is RejectKind.QUEUE_FULL:
            error = overloaded(RETRY_AFTER_S, self.stats.num_waiting if self.stats else 0)
        else:
            error = internal_error(message.message)
        stream._fail(error)

    def _on_ready(self, message: Ready) -> None:
        tokenizer = pickle.loads(message.tokenizer) if message.tokenizer else None
        self._set_stats(message.stats)
        if not self._ready.done():
            self._ready.set_result(
                EngineInfo(message.model_name, message.max_model_len, message.pid, message.model_path, tokenizer)
            )

    def _on_start_failed(self, message: StartFailed) -> None:
        self.dead_reason = "the engine failed to start"
        if not self._ready.done():
            self._ready.set_exception(EngineStartError(message.traceback))

    def _on_fatal(self, message: Fatal) -> None:
        log.error("engine loop crashed:\n%s", message.traceback)
        self._on_engine_dead("the engine loop crashed: " + message.traceback.strip().splitlines()[-1])

    def _set_stats(self, stats: EngineStats) -> None:
        self.stats = stats
        for listener in self.stats_listeners:
            listener(stats)

    def _on_engine_dead(self, reason: str) -> None:
        """The engine process is gone (or its loop crashed): unhealthy from now on, open streams fail."""
        if self.dead_reason is None:
            self.dead_reason = reason
        if self._ready is not None and not self._ready.done():
            self._ready.set_exception(EngineStartError(reason))
        if not self._stopping:
            log.error("engine process is gone (%s); failing %d in-flight requests", reason, len(self._streams))
        self.fail_all(engine_unavailable(reason))

    def abort_in_engine(self) -> int:
        """Abort every open request in the engine but keep their streams: each one receives its final
        `abort` event and its handler ends the response normally (used by a shutdown). Returns the count."""
        if self.dead_reason is not None:
            return 0
        for request_id in self._streams:
            self._send_abort(request_id, None)
        return len(self._streams)
