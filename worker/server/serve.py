"""Run one worker: start the engine process, serve HTTP until SIGTERM, then shut down cleanly.

Shutdown order: stop listening (the port is free at once), refuse new requests (503), let in-flight
requests finish for up to `shutdown_timeout_s`, abort the rest (their streams end with
finish_reason "abort"), close connections, stop the engine process.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
import sys
from dataclasses import dataclass, field

from aiohttp import web

from worker.config import EngineConfig
from worker.server.app import ServerLimits, build_app
from worker.server.connection_guard import GuardedSite, connection_limit
from worker.server.context import ServerContext
from worker.server.drop_in import DropInOptions
from worker.server.drop_in import configure as configure_drop_in
from worker.server.engine_client import EngineClient, EngineStartError
from worker.server.engine_process import DEFAULT_ENGINE_FACTORY

log = logging.getLogger("radixfleet.worker")


@dataclass
class ServeOptions:
    config: EngineConfig
    host: str = "127.0.0.1"
    port: int = 8000
    served_model_names: list[str] = field(default_factory=list)
    shutdown_timeout_s: float = 30.0  # how long in-flight requests may run on after SIGTERM
    engine_factory: str = DEFAULT_ENGINE_FACTORY
    api_key: str | None = None  # clients must send it as a Bearer token (not /health, /metrics)
    tokenizer_path: str | None = None  # the HTTP side's tokenizer folder; None: the model's
    chat_template: str | None = None  # replaces the model's chat template
    default_max_tokens: int | None = None  # chat max_tokens when a request sets none; None: rest of context
    # Bound before the model loads (worker.server.launcher.bind_port), listening once it is ready.
    # None: bind host:port when ready.
    sock: socket.socket | None = None
    # slow and surplus clients (worker.server.connection_guard): a complete request head within
    # header_timeout_s of connecting (or of the previous answer), the body within body_timeout_s,
    # at most max_connections open (0: what the open-file limit allows) and max_active_requests
    # generation requests in the frontend (None: the engine's running + waiting bounds)
    header_timeout_s: float = 15.0
    body_timeout_s: float = 60.0
    max_connections: int = 0
    max_active_requests: int | None = None
    max_generated_tokens: int | None = None  # n * max_tokens bound; None: worker.server.limits' default
    drop_in: DropInOptions = field(default_factory=DropInOptions)


def load_tokenizer(model_path: str):
    """The frontend's own tokenizer, when the engine's could not be sent over the pipe."""
    from worker.tokenizer import Tokenizer

    return Tokenizer.from_folder(model_path)


def _print(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


async def serve(options: ServeOptions) -> int:
    """Serve until SIGTERM / SIGINT. Returns the process exit code."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    client = EngineClient(options.config, options.engine_factory)
    _print(f"radixfleet worker: starting the engine process for model {options.config.model!r} ...")
    start = asyncio.ensure_future(client.start())
    stopped_early = asyncio.ensure_future(stop.wait())
    await asyncio.wait([start, stopped_early], return_when=asyncio.FIRST_COMPLETED)
    if not start.done():
        _print("radixfleet worker: interrupted while loading; stopping the engine")
        start.cancel()
        await client.shutdown(timeout_s=5)
        return 130
    stopped_early.cancel()
    try:
        info = start.result()
    except EngineStartError as error:
        details = str(error).strip()
        log.debug("engine start failure:\n%s", details)
        _print(f"radixfleet worker: the engine failed to start: {details.splitlines()[-1] if details else error}"
               + ("" if log.isEnabledFor(logging.DEBUG) else "  (--log-level debug shows the traceback)"))
        await client.shutdown(timeout_s=5)
        return 1
    if options.tokenizer_path is not None:
        tokenizer = load_tokenizer(options.tokenizer_path)
    else:
        tokenizer = info.tokenizer if info.tokenizer is not None else load_tokenizer(info.model_path)
    if options.chat_template is not None:
        tokenizer.chat_template = options.chat_template
    limit_kwargs = {} if options.max_generated_tokens is None else {"max_generated_tokens": options.max_generated_tokens}
    ctx = ServerContext(options.config, client, tokenizer, info.model_name, info.max_model_len,
                        options.served_model_names or None, **limit_kwargs)
    ctx.default_max_tokens = options.default_max_tokens
    configure_drop_in(ctx, options.drop_in, info.model_path)
    # handler_cancellation: a client that disconnects cancels its handler, whose cleanup aborts the
    # request in the engine and frees its KV (streaming responses also notice on their next write).
    # keepalive_timeout is also aiohttp's timer from a connection's opening to its first complete
    # request head: the header timeout that closes a slowloris.
    limits = ServerLimits(options.body_timeout_s, options.max_active_requests)
    runner = web.AppRunner(build_app(ctx, options.api_key, limits), handler_cancellation=True, access_log=None,
                           keepalive_timeout=options.header_timeout_s)
    await runner.setup()
    max_connections = connection_limit(options.max_connections, fds_per_connection=1)
    if options.sock is not None:
        site = GuardedSite(runner, sock=options.sock, max_connections=max_connections)
    else:
        site = GuardedSite(runner, options.host, options.port, max_connections=max_connections)
    try:
        await site.start()
    except OSError as error:
        _print(f"radixfleet worker: cannot listen on {options.host}:{options.port}: {error.strerror or error}. "
               "Pick another --port or stop the process using it.")
        await runner.cleanup()
        await client.shutdown(timeout_s=10)
        return 1
    url = f"http://{options.host}:{options.port}"
    _print(f"radixfleet worker ready at {url} (model {ctx.model_name!r}, max_model_len {info.max_model_len}, "
           f"engine pid {info.pid}{', API key required' if options.api_key else ''})")

    await stop.wait()
    _print("radixfleet worker: shutting down (no new requests)")
    await _drain(ctx, site, options.shutdown_timeout_s)
    await runner.cleanup()
    await client.shutdown()
    _print("radixfleet worker: stopped")
    return 0


async def _drain(ctx: ServerContext, site: web.BaseSite, timeout_s: float) -> None:
    ctx.draining = True
    await site.stop()  # closes the listening socket: the port is free for a new worker
    if await _wait_idle(ctx, timeout_s):
        return
    aborted = ctx.client.abort_in_engine()
    _print(f"radixfleet worker: aborting {aborted} requests still running after {timeout_s:.0f} s")
    await _wait_idle(ctx, 10.0)


async def _wait_idle(ctx: ServerContext, timeout_s: float) -> bool:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while ctx.active_handlers > 0 and ctx.client.dead_reason is None:
        if loop.time() >= deadline:
            return False
        await asyncio.sleep(0.05)
    return True


def run_server(options: ServeOptions) -> int:
    """Blocking entry point: uvloop when available, then `serve`."""
    try:
        import uvloop

        return uvloop.run(serve(options))
    except ImportError:  # pragma: no cover - uvloop is a dependency; this keeps odd platforms working
        return asyncio.run(serve(options))
