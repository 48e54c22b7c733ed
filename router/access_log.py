"""The router's access log: the worker's line (worker/server/access_log.py) plus the worker that served it.

`worker_id` is the id the router gives each worker (as in its metrics and the X-Radixfleet-Worker
answer header); null when no worker answered (a 4xx from the router itself, no healthy worker).
"""

from __future__ import annotations

from aiohttp import web

from router.proxy import WORKER_HEADER
from worker.server.access_log import access_log_middlewares, check_mode, configure_access_log


def _worker_field(request: web.Request, response: web.StreamResponse | None) -> dict:
    return {"worker_id": response.headers.get(WORKER_HEADER) if response is not None else None}


def router_access_log(mode: str) -> list:
    """The access-log middleware for `--access-log mode` (none when off), its output set up."""
    if check_mode(mode) != "off":
        configure_access_log(mode)
    return access_log_middlewares(mode, _worker_field)
