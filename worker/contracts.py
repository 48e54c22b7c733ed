"""Contracts shared by the router and the worker: the JSON codec, the OpenAI error body, the /load report.

Both sides import this one module, so a change to a contract is made once and read the same on both ends.
It imports neither torch nor aiohttp: the router imports it without paying for the engine.

JSON is orjson, a declared dependency (no fallback): it is what both hot paths already used where it was
installed (one SSE chunk per token per stream on the worker, every request body on the router), it is
several times faster than the standard library there, and one codec everywhere means one behaviour
(compact separators, UTF-8 output, NaN and infinities written as null).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

import orjson

# --- JSON ----------------------------------------------------------------------------------------

JSONDecodeError = orjson.JSONDecodeError  # a subclass of ValueError


def dumps(obj: Any) -> bytes:
    """Compact UTF-8 JSON."""
    return orjson.dumps(obj)


def loads(data: bytes | str) -> Any:
    """Parse JSON; raises ValueError (orjson.JSONDecodeError) on bad input."""
    return orjson.loads(data)


# --- OpenAI error body -----------------------------------------------------------------------------

def error_body(message: str, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    """The body OpenAI answers on failure, `{"error": {"message", "type", "param", "code"}}`.

    SDKs map the HTTP status to their exception classes and show `message`; `param` names the field to fix.
    """
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def error_json(message: str, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> bytes:
    """`error_body` encoded, for an HTTP response body."""
    return dumps(error_body(message, type, param, code))


def sse_error_event(message: str, type: str = "server_error", param: str | None = None,
                    code: str | None = None) -> bytes:
    """An error as one server-sent event: how a stream that already started reports a failure."""
    return b"data: " + error_json(message, type, param, code) + b"\n\n"


SSE_DONE = b"data: [DONE]\n\n"


# --- GET /load -------------------------------------------------------------------------------------

@dataclass(slots=True)
class LoadReport:
    """A worker's GET /load answer: the figures the router balances on. Every key is an integer.

    The worker builds one from its engine statistics and serves `to_json()`; the router reads it back
    with `from_json()`, where a missing key counts as 0 (an older worker) and a non-number is an error.
    """

    running: int = 0  # sequences in the running batch
    waiting: int = 0  # requests queued for admission
    kv_tokens_used: int = 0
    kv_tokens_total: int = 0  # KV capacity: the router bounds its prefix tree of this worker by it
    cache_hit_tokens: int = 0  # prompt tokens served from the prefix cache, since start
    cache_query_tokens: int = 0  # prompt tokens looked up in the prefix cache, since start
    num_preemptions: int = 0

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: object) -> "LoadReport":
        """Validate a parsed /load body. Raises ValueError naming the bad field."""
        if not isinstance(data, dict):
            raise ValueError("/load must answer a JSON object")
        values = {}
        for item in fields(cls):
            value = data.get(item.name, 0)
            if not isinstance(value, (int, float)) or isinstance(value, bool):
                raise ValueError(f"/load field {item.name!r} must be a number, got {value!r}")
            values[item.name] = int(value)
        return cls(**values)


LOAD_KEYS = tuple(item.name for item in fields(LoadReport))
