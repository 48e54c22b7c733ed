"""Read `usage.prompt_tokens` out of a worker's answer bytes without parsing the JSON.

The router learns each worker's characters per token from it (router.worker_pool.CharsPerToken). A
full JSON parse of every answer would cost more than routing it, so this finds the key with a C-level
byte search and reads the digits after it. Only the worker's own answers are read, which put the
field in the `usage` object of the final body or stream event (OpenAI's shape).
"""

from __future__ import annotations

_KEY = b'"prompt_tokens":'


def prompt_tokens_in(data: bytes) -> int | None:
    """The last `"prompt_tokens": N` in `data`, or None when there is none (or it is not a number)."""
    at = data.rfind(_KEY)
    if at < 0:
        return None
    i = at + len(_KEY)
    n = len(data)
    while i < n and data[i] in b" \t":
        i += 1
    start = i
    while i < n and 48 <= data[i] <= 57:
        i += 1
    if i == start or i - start > 12:
        return None
    return int(data[start:i])
