"""The engine loop in its own process, fed by the HTTP frontend's commands and streaming its outputs back.

Why a separate process: the scheduler loop (`LLMEngine.step()`) must never wait on HTTP work
(JSON, detokenization, SSE writes), and one Python process cannot give it that guarantee
because of the GIL. The engine process only ever sees token ids.

Why `multiprocessing` pipes (standard library, no zmq): a `Pipe(duplex=False)` is a plain Unix
socket pair with message framing. Its two properties we rely on:
  * the engine drains commands with `poll(0)`, which never blocks, and blocks with a timeout only
    when it has no work at all;
  * when either process dies the other end reads EOF, so a dead engine is noticed at once by the
    frontend's reader thread and a dead frontend makes the engine exit (no orphans holding a GPU).
Outputs go through a sender thread fed by a `SimpleQueue`: `step()` results are handed over in one
batched message per step and the loop continues at once, even when the frontend is slow to read
(a full socket buffer blocks the sender thread, never the scheduler).

The messages are the dataclasses of worker.server.engine_messages, pickled whole.
"""

from __future__ import annotations

import importlib
import os
import pickle
import signal
import sys
import threading
import time
import traceback
from multiprocessing.connection import Connection
from queue import SimpleQueue

from worker.config import EngineConfig
from worker.engine.protocol import EngineStats, QueueFullError
from worker.sampling_params import InvalidParameter
from worker.server import engine_messages as msg

DEFAULT_ENGINE_FACTORY = "worker.engine.llm_engine:LLMEngine"
IDLE_POLL_S = 0.5  # how long an idle engine sleeps in poll() before re-checking (commands wake it at once)
STATS_INTERVAL_S = 0.05  # how often a busy engine refreshes the frontend's /load and /metrics figures


def load_factory(path: str):
    """Import "package.module:attribute" (the engine class, or a test double with the same API)."""
    module_name, _, attribute = path.partition(":")
    return getattr(importlib.import_module(module_name), attribute)


def _ready_message(engine) -> msg.Ready:
    """What the frontend needs to serve: names, limits, and the tokenizer (if it can be pickled)."""
    try:
        tokenizer = pickle.dumps(engine.tokenizer)
    except Exception:  # the frontend then loads its own copy
        tokenizer = None
    return msg.Ready(
        model_name=engine.model_name,
        max_model_len=engine.max_model_len,
        pid=os.getpid(),
        model_path=str(getattr(engine, "model_path", "") or ""),
        stats=engine.stats(),
        tokenizer=tokenizer,
    )


class _Sender:
    """Sends messages to the frontend from a background thread, so the engine loop never blocks."""

    def __init__(self, conn: Connection):
        self._conn = conn
        self._queue: SimpleQueue = SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="engine-sender", daemon=True)
        self._thread.start()

    def put(self, message) -> None:
        self._queue.put(message)

    def close(self) -> None:
        """Flush everything queued, then stop the thread."""
        self._queue.put(None)
        self._thread.join(timeout=10)

    def _run(self) -> None:
        while True:
            message = self._queue.get()
            if message is None:
                return
            try:
                self._conn.send_bytes(pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL))
            except (OSError, EOFError):  # the frontend is gone; the main loop notices on its side
                return


class EngineLoop:
    """Runs `engine.step()` while there is work and applies frontend commands between steps."""

    def __init__(self, engine, commands: Connection, sender: _Sender):
        self.engine = engine
        self.commands = commands
        self.sender = sender
        self.running = True
        self._last_stats = 0.0
        self.num_steps = 0
        self.step_seconds = 0.0  # inside engine.step(); the rest of the busy time is this loop's overhead
        self._handlers = {
            msg.AddRequests: self._add_all,
            msg.AbortRequests: self._abort_all,
            msg.Shutdown: self._shutdown,
        }

    def _handle(self, message) -> None:
        self._handlers[type(message)](message)

    def _add_all(self, message: msg.AddRequests) -> None:
        for request in message.requests:
            self._add(request)

    def _abort_all(self, message: msg.AbortRequests) -> None:
        for request_id, index in message.targets:
            self.engine.abort_request(request_id, index)

    def _shutdown(self, message: msg.Shutdown) -> None:
        self.running = False

    def _add(self, request) -> None:
        """The engine decides whether it takes a request (lengths, vocabulary, queue room); a refusal goes
        back to that request's client and the loop goes on."""
        try:
            self.engine.add_request(request)
        except InvalidParameter as error:
            code = getattr(error, "code", None)
            self.sender.put(msg.Rejected(request.request_id, msg.RejectKind.INVALID, error.message, error.param, code))
        except QueueFullError as error:
            self.sender.put(msg.Rejected(request.request_id, msg.RejectKind.QUEUE_FULL, str(error)))
        except Exception as error:  # noqa: BLE001
            text = f"{type(error).__name__}: {error}"
            self.sender.put(msg.Rejected(request.request_id, msg.RejectKind.ERROR, text))

    def _drain_commands(self, timeout: float) -> bool:
        """Apply every queued command; wait up to `timeout` for the first. True if any arrived."""
        if not self.commands.poll(timeout):
            return False
        while True:
            self._handle(self.commands.recv())
            if not self.running or not self.commands.poll(0):
                return True

    def run(self) -> None:
        while self.running:
            got_commands = self._drain_commands(0 if self.engine.has_unfinished() else IDLE_POLL_S)
            if not self.running:
                break
            if self.engine.has_unfinished():
                started = time.perf_counter()
                outputs = self.engine.step()
                self.step_seconds += time.perf_counter() - started
                self.num_steps += 1
                self.sender.put(msg.StepOutputs(msg.encode_outputs(outputs), self._stats_if_due()))
            elif got_commands:
                self.sender.put(msg.StatsUpdate(self.engine.stats()))

    def _stats_if_due(self) -> EngineStats | None:
        """EngineStats costs time (it walks the running requests' pages), so a busy engine sends them at
        most every STATS_INTERVAL_S; it always sends them when it falls idle, so /load shows 0 at once."""
        now = time.monotonic()
        if now - self._last_stats < STATS_INTERVAL_S and self.engine.has_unfinished():
            return None
        self._last_stats = now
        return self.engine.stats()


def run_engine_process(
    config: EngineConfig,
    commands: Connection,
    outputs: Connection,
    engine_factory: str = DEFAULT_ENGINE_FACTORY,
) -> None:
    """Entry point of the engine process (a `multiprocessing` spawn target)."""
    # Ctrl-C in a terminal, `timeout` and systemd signal the whole process group: the frontend decides
    # how to shut down (finish or abort in-flight requests) and then tells this process, so it ignores
    # SIGINT and SIGTERM itself. If the frontend dies instead, the command pipe reads EOF and we exit.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    sender = _Sender(outputs)
    try:
        engine = load_factory(engine_factory)(config)
    except BaseException:  # noqa: BLE001 - any load failure must reach the frontend as text
        sender.put(msg.StartFailed(traceback.format_exc()))
        sender.close()
        return
    loop = EngineLoop(engine, commands, sender)
    started = time.perf_counter()
    try:
        sender.put(_ready_message(engine))
        loop.run()
    except (EOFError, OSError):
        pass  # the frontend went away: nothing to report to
    except BaseException:  # noqa: BLE001
        sender.put(msg.Fatal(traceback.format_exc()))
    finally:
        print(f"radixfleet engine: {loop.num_steps} steps, {loop.step_seconds:.2f} s in step() over "
              f"{time.perf_counter() - started:.2f} s up", file=sys.stderr, flush=True)
        try:
            engine.shutdown()
        finally:
            sender.close()
