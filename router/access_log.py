"""The router's access log: the worker's line (worker/server/access_log.py) plus the worker that served it.

`worker_id` is the id the router gives each worker (as in its metrics and the X-Radixfleet-Worker
answer header); null when no worker answered (a 4xx from the router itself, no healthy worker).
`router_overhead_ms` is what the router itself added (radixfleet_router_overhead_seconds, router/proxy.py):
null likewise, and for a stream the client left before its first chunk.
"""

from __future__ import annotations

from aiohttp import web

from router.metrics import OVERHEAD_KEY
from router.proxy import WORKER_HEADER
from worker.server.access_log import access_log_middlewares, check_mode, configure_access_log


def _router_fields(request: web.Request, response: web.StreamResponse | None) -> dict:
    overhead_s = request.get(OVERHEAD_KEY)
    return {"worker_id": response.headers.get(WORKER_HEADER) if response is not None else None,
            "router_overhead_ms": round(overhead_s * 1000, 3) if overhead_s is not None else None}


def router_access_log(mode: str) -> list:
    """The access-log middleware for `--access-log mode` (none when off), its output set up."""
    if check_mode(mode) != "off":
        configure_access_log(mode)
    return access_log_middlewares(mode, _router_fields)
