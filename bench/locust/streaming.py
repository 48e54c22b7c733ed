"""One streamed OpenAI request, timed: time to first token, gaps between tokens, end to end.

Plain `requests` with stream=True (cooperative under Locust's gevent patching); no OpenAI SDK in the
hot path. Chat and completion streams are both read: an event's text is `choices[0].delta.content`
(chat) or `choices[0].text` (completions); the usage event (stream_options.include_usage) gives the
token counts. TTFT is taken at the first event carrying text, each later text event adds one ITL gap
(a worker may send several tokens in one event: the gap is then per event, as clients see it).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field

import requests

from bench.locust.workloads import Session


@dataclass
class StreamResult:
    ok: bool
    e2e_s: float
    error: str | None = None
    ttft_s: float | None = None
    itl_s: list[float] = field(default_factory=list)
    text: str = ""
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    cached_tokens: int | None = None


def request_body(session: Session, model: str, messages: list[dict] | None,
                 send_session_id: bool = False) -> tuple[str, dict]:
    """(path, body) of one streamed request; chat unless the session carries a completion prompt.
    With send_session_id the session id goes in the `user` field (a router may pin sessions on it)."""
    common = {"model": model, "max_tokens": session.max_tokens, "temperature": 0, "stream": True,
              "stream_options": {"include_usage": True}}
    if send_session_id:
        common["user"] = session.id
    if session.prompt is not None:
        return "/v1/completions", {**common, "prompt": session.prompt}
    return "/v1/chat/completions", {**common, "messages": messages}


def _error_text(resp: requests.Response) -> str:
    try:
        return f"HTTP {resp.status_code}: {resp.json()['error']['message']}"
    except (ValueError, KeyError, TypeError):
        return f"HTTP {resp.status_code}: {resp.text[:200]}"


def sse_data(line: bytes) -> bytes | None:
    """The payload of a server-sent `data:` line; None for blank separators and ": comment" keep-alives."""
    return line[5:].strip() if line.startswith(b"data:") else None


class StreamReader:
    """Folds one stream's decoded events into a StreamResult, whatever client reads the bytes (this module's
    `requests` one under Locust, bench/vs_vllm_served.py's aiohttp one): usage from the usage event, TTFT at
    the first event carrying text, one ITL gap per later text event."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.result = StreamResult(ok=False, e2e_s=0.0)
        self._last: float | None = None
        self._pieces: list[str] = []

    def feed(self, event: dict) -> bool:
        """Take one event; False (the result's error set) when the stream reports an error instead."""
        result = self.result
        if "error" in event:
            result.error = f"stream error: {event['error'].get('message', event['error'])}"
            return False
        usage = event.get("usage")
        if usage:
            result.prompt_tokens = usage.get("prompt_tokens")
            result.completion_tokens = usage.get("completion_tokens")
            result.cached_tokens = (usage.get("prompt_tokens_details") or {}).get("cached_tokens")
        for choice in event.get("choices") or ():
            piece = (choice.get("delta") or {}).get("content") if "delta" in choice else choice.get("text")
            if not piece:
                continue
            now = time.perf_counter()
            if self._last is None:
                result.ttft_s = now - self.start
            else:
                result.itl_s.append(now - self._last)
            self._last = now
            self._pieces.append(piece)
        return True

    def finish(self) -> StreamResult:
        """End to end time and the whole text, once the stream is over (however it ended)."""
        self.result.e2e_s = time.perf_counter() - self.start
        self.result.text = "".join(self._pieces)
        return self.result


def stream_request(http: requests.Session, base_url: str, path: str, body: dict, session_id: str | None = None,
                   timeout_s: float = 600.0) -> StreamResult:
    """session_id, when given, is sent as the X-Session-ID header."""
    reader = StreamReader()
    result = reader.result
    try:
        with http.post(base_url + path, json=body, stream=True, timeout=timeout_s,
                       headers={"X-Session-ID": session_id} if session_id else None) as resp:
            if resp.status_code != 200:
                result.error = _error_text(resp)
                return result
            for raw in resp.iter_lines():
                data = sse_data(raw)
                if data is None:
                    continue
                if data == b"[DONE]":
                    break
                if not reader.feed(json.loads(data)):
                    return result
        result.ok = True
    except (requests.RequestException, ValueError) as exc:
        result.error = f"{type(exc).__name__}: {exc}"
    finally:
        reader.finish()
    return result
