"""`radixfleet worker --api-key`: requests must carry `Authorization: Bearer KEY`, as on the router.

/health and /metrics stay open, so load balancers, Kubernetes probes and Prometheus need no key.
The key is compared in constant time.
"""

from __future__ import annotations

import hmac

from aiohttp import web

from worker.server.errors import ApiError

OPEN_PATHS = frozenset({"/health", "/metrics"})


def bearer_token(request: web.Request) -> str:
    value = request.headers.get("Authorization", "")
    return value[7:].strip() if value.startswith("Bearer ") else ""


def api_key_middleware(key: str):
    expected = key.encode()

    @web.middleware
    async def require_api_key(request: web.Request, handler):
        if request.path in OPEN_PATHS or hmac.compare_digest(bearer_token(request).encode(), expected):
            return await handler(request)
        return ApiError(401, "missing or invalid API key: send 'Authorization: Bearer <key>'",
                        code="invalid_api_key").response()

    return require_api_key
