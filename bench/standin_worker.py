"""An instant stand-in for `radixfleet worker`, implementing its HTTP contract (DESIGN.md) with no model.

Used by the router's tests and benchmarks. It answers at once, simulates a per-worker prefix cache
(so `usage.prompt_tokens_details.cached_tokens` and the /load hit counters mean something), and can
be told to misbehave through POST /control {"mode": ...}:

  ok          normal answers
  fail        500 on generation requests
  fail_on_boom  500 on generation requests whose prompt contains BOOM (a bad input), others answered
  unavailable 503 without Retry-After (as a draining worker or a dead engine answers)
  busy        503 with Retry-After: 2 and code queue_full (as a worker at --max-waiting-requests)
  hang        accept generation requests and never answer
  unhealthy   /health answers 503 (generation still works)
  die_mid_stream  streams send their first chunk, then the connection is cut
  fixed_stream    generation answers FIXED_STREAM_PARTS, written one part at a time (passthrough tests)

It lives in the package (not under tests/) so `radixfleet bench cache-hit --standin` works from a wheel.

Run standalone: `python -m bench.standin_worker --port 8101 [--name w1] [--kv-tokens 65536] [--fast]`.
--fast serves canned answers from a bare asyncio protocol: the cheapest possible worker, for router
throughput benchmarks. Unknown arguments (--model, --device, ...) are ignored so that it can stand
in for the real worker command line.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections import OrderedDict

import xxhash
from aiohttp import web

CHARS_PER_TOKEN = 4
# Awkward on purpose: an event split across writes, non-ASCII bytes, an SSE comment line.
FIXED_STREAM_PARTS = (
    b'data: {"id":"x","choices":[{"index":0,"delta":{"content":"h\xc3\xa9"}',
    b'}]}\n\n: keep-alive comment\n\ndata: {"id":"x","choices":[{"index":0,"delta":{"content":"!"}}]}\n\n',
    b"data: [DONE]\n\n",
)
PAGE_TOKENS = 16
PAGE_CHARS = CHARS_PER_TOKEN * PAGE_TOKENS


class SimulatedPrefixCache:
    """Pages of the prompt text, chain-hashed, kept LRU within a token budget (like the real worker)."""

    def __init__(self, capacity_tokens: int) -> None:
        self.capacity_pages = max(1, capacity_tokens // PAGE_TOKENS)
        self.pages: OrderedDict[int, None] = OrderedDict()
        self.hit_tokens = 0
        self.query_tokens = 0

    def lookup_and_insert(self, text: str) -> tuple[int, int]:
        """Returns (prompt tokens, cached tokens) and caches the prompt."""
        prompt_tokens = max(1, (len(text) + CHARS_PER_TOKEN - 1) // CHARS_PER_TOKEN)
        data = text.encode()
        hashes, seed = [], 7
        for start in range(0, len(data) - PAGE_CHARS + 1, PAGE_CHARS):
            seed = xxhash.xxh64_intdigest(data[start:start + PAGE_CHARS], seed)
            hashes.append(seed)
        matched = 0
        for h in hashes:
            if h not in self.pages:
                break
            matched += 1
        cached = min(matched * PAGE_TOKENS, prompt_tokens - 1)
        for h in reversed(hashes):  # deepest first: ancestors stay more recent (evicted last)
            if h in self.pages:
                self.pages.move_to_end(h)
            else:
                self.pages[h] = None
        while len(self.pages) > self.capacity_pages:
            self.pages.popitem(last=False)
        self.hit_tokens += cached
        self.query_tokens += prompt_tokens
        return prompt_tokens, cached

    @property
    def used_tokens(self) -> int:
        return len(self.pages) * PAGE_TOKENS


def chat_prompt_text(messages: list) -> str:
    """The stand-in's 'chat template'."""
    parts = []
    for m in messages:
        content = m.get("content")
        if isinstance(content, list):
            content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
        parts.append(f"<|{m.get('role')}|>{content or ''}\n")
    return "".join(parts) + "<|assistant|>"


def _error(status: int, message: str, param: str | None = None) -> web.Response:
    body = {"error": {"message": message, "type": "invalid_request_error", "param": param, "code": None}}
    return web.json_response(body, status=status)


class StandinWorker:
    def __init__(self, name: str = "standin", kv_tokens: int = 65536, model: str = "standin-model",
                 chunk_delay_s: float = 0.0, response_delay_s: float = 0.0) -> None:
        self.name = name
        self.model = model
        self.kv_tokens = kv_tokens
        self.cache = SimulatedPrefixCache(kv_tokens)
        self.mode = "ok"
        self.chunk_delay_s = chunk_delay_s
        self.response_delay_s = response_delay_s
        self.running = 0
        self.served = 0
        self.runner: web.AppRunner | None = None
        self._stopping = asyncio.Event()
        self.port: int | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    # --- app -------------------------------------------------------------------------------------
    def make_app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self.chat)
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_get("/v1/models", self.models)
        app.router.add_get("/health", self.health)
        app.router.add_get("/load", self.load)
        app.router.add_get("/metrics", self.metrics)
        app.router.add_post("/tokenize", self.tokenize)
        app.router.add_post("/detokenize", self.detokenize)
        app.router.add_post("/control", self.control)
        app.router.add_get("/control", self.control_get)
        return app

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> "StandinWorker":
        # handler_cancellation: as the real worker, a client that leaves cancels its request (`running` drops)
        self.runner = web.AppRunner(self.make_app(), access_log=None, shutdown_timeout=0.5,
                                    handler_cancellation=True)
        await self.runner.setup()
        site = web.TCPSite(self.runner, host, port)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        return self

    async def stop(self) -> None:
        self._stopping.set()
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None

    # --- handlers --------------------------------------------------------------------------------
    async def health(self, request: web.Request) -> web.Response:
        if self.mode == "unhealthy":
            return web.json_response({"status": "loading"}, status=503)
        return web.json_response({"status": "ok"})

    async def load(self, request: web.Request) -> web.Response:
        return web.json_response({
            "running": self.running, "waiting": 0,
            "kv_tokens_used": self.cache.used_tokens, "kv_tokens_total": self.kv_tokens,
            "cache_hit_tokens": self.cache.hit_tokens, "cache_query_tokens": self.cache.query_tokens,
            "num_preemptions": 0,
        })

    async def metrics(self, request: web.Request) -> web.Response:
        return web.Response(text=f"radixfleet:num_requests_running {self.running}\n"
                                 f"radixfleet:prefix_cache_hits {self.cache.hit_tokens}\n"
                                 f"radixfleet:prefix_cache_queries {self.cache.query_tokens}\n")

    async def models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [
            {"id": self.model, "object": "model", "created": 0, "owned_by": "radixfleet"}]})

    async def tokenize(self, request: web.Request) -> web.Response:
        body = await request.json()
        text = body.get("prompt") or ""
        return web.json_response({"tokens": [ord(c) for c in text], "count": len(text)})

    async def detokenize(self, request: web.Request) -> web.Response:
        body = await request.json()
        return web.json_response({"prompt": "".join(chr(t) for t in body.get("tokens", []))})

    async def control(self, request: web.Request) -> web.Response:
        body = await request.json()
        if "mode" in body:
            self.mode = body["mode"]
        if "chunk_delay_s" in body:
            self.chunk_delay_s = float(body["chunk_delay_s"])
        if "response_delay_s" in body:
            self.response_delay_s = float(body["response_delay_s"])
        return await self.control_get(request)

    async def control_get(self, request: web.Request) -> web.Response:
        return web.json_response({"name": self.name, "mode": self.mode, "served": self.served,
                                  "running": self.running})

    async def chat(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, chat=True)

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, chat=False)

    async def _generate(self, request: web.Request, chat: bool) -> web.StreamResponse:
        try:
            body = await request.json()
        except ValueError:
            return _error(400, "body is not valid JSON")
        if chat:
            messages = body.get("messages")
            if not isinstance(messages, list):
                return _error(400, "messages must be a list", "messages")
            text = chat_prompt_text(messages)
        else:
            prompt = body.get("prompt")
            text = prompt if isinstance(prompt, str) else json.dumps(prompt)
        temperature = body.get("temperature", 1.0)
        if isinstance(temperature, (int, float)) and temperature < 0:
            return _error(400, "temperature must be >= 0", "temperature")
        if self.mode == "fail" or (self.mode == "fail_on_boom" and "BOOM" in text):
            return _error(500, "simulated worker failure")
        if self.mode == "unavailable":
            return _error(503, "stand-in unavailable")
        if self.mode == "busy":
            response = _error(503, "stand-in queue full")
            response.headers["Retry-After"] = "2"
            return response
        if self.mode == "hang":
            await self._stopping.wait()
            return _error(503, "stand-in stopping")
        if self.mode == "fixed_stream":
            resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await resp.prepare(request)
            for part in FIXED_STREAM_PARTS:
                await resp.write(part)
                await asyncio.sleep(0.01)
            await resp.write_eof()
            return resp
        self.running += 1
        try:
            if self.response_delay_s:
                await asyncio.sleep(self.response_delay_s)
            prompt_tokens, cached = self.cache.lookup_and_insert(text)
            self.served += 1
            words = f"Hello from {self.name} .".split()
            max_tokens = body.get("max_tokens") or len(words)
            words = words[:max_tokens]
            usage = {"prompt_tokens": prompt_tokens, "completion_tokens": len(words),
                     "total_tokens": prompt_tokens + len(words),
                     "prompt_tokens_details": {"cached_tokens": cached}}
            rid = f"{'chatcmpl' if chat else 'cmpl'}-{self.name}-{self.served}"
            created = int(time.time())
            if body.get("stream"):
                return await self._stream(request, chat, rid, created, words, usage, body)
            text_out = " ".join(words)
            if chat:
                choice = {"index": 0, "message": {"role": "assistant", "content": text_out},
                          "finish_reason": "stop", "logprobs": None}
                obj = "chat.completion"
            else:
                choice = {"index": 0, "text": text_out, "finish_reason": "stop", "logprobs": None}
                obj = "text_completion"
            return web.json_response({"id": rid, "object": obj, "created": created, "model": self.model,
                                      "choices": [choice], "usage": usage})
        finally:
            self.running -= 1

    async def _stream(self, request, chat, rid, created, words, usage, body) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        obj = "chat.completion.chunk" if chat else "text_completion"
        for i, word in enumerate(words):
            piece = word if i == 0 else " " + word
            if chat:
                delta = {"content": piece} if i else {"role": "assistant", "content": piece}
                choice = {"index": 0, "delta": delta, "finish_reason": None, "logprobs": None}
            else:
                choice = {"index": 0, "text": piece, "finish_reason": None, "logprobs": None}
            event = {"id": rid, "object": obj, "created": created, "model": self.model, "choices": [choice]}
            await resp.write(b"data: " + json.dumps(event).encode() + b"\n\n")
            if i == 0 and self.mode == "die_mid_stream":
                request.transport.close()  # type: ignore[union-attr]
                return resp
            if self.chunk_delay_s:
                await asyncio.sleep(self.chunk_delay_s)
        final_choice = ({"index": 0, "delta": {}, "finish_reason": "stop", "logprobs": None} if chat
                        else {"index": 0, "text": "", "finish_reason": "stop", "logprobs": None})
        final = {"id": rid, "object": obj, "created": created, "model": self.model, "choices": [final_choice]}
        await resp.write(b"data: " + json.dumps(final).encode() + b"\n\n")
        if (body.get("stream_options") or {}).get("include_usage"):
            tail = {"id": rid, "object": obj, "created": created, "model": self.model, "choices": [],
                    "usage": usage}
            await resp.write(b"data: " + json.dumps(tail).encode() + b"\n\n")
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp


# --- fast mode: canned answers from a bare protocol (router throughput benchmarks) --------------------

_CANNED_COMPLETION = json.dumps({
    "id": "chatcmpl-fast", "object": "chat.completion", "created": 0, "model": "standin-model",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}],
    "usage": {"prompt_tokens": 256, "completion_tokens": 1, "total_tokens": 257,
              "prompt_tokens_details": {"cached_tokens": 0}},
}).encode()
_CANNED_LOAD = json.dumps({"running": 0, "waiting": 0, "kv_tokens_used": 0, "kv_tokens_total": 1 << 20,
                           "cache_hit_tokens": 0, "cache_query_tokens": 0, "num_preemptions": 0}).encode()


def _http_response(body: bytes, content_type: bytes = b"application/json") -> bytes:
    return (b"HTTP/1.1 200 OK\r\nContent-Type: " + content_type + b"\r\nContent-Length: "
            + str(len(body)).encode() + b"\r\n\r\n" + body)


_FAST_RESPONSES = {
    b"/health": _http_response(b'{"status":"ok"}'),
    b"/load": _http_response(_CANNED_LOAD),
}
_FAST_DEFAULT = _http_response(_CANNED_COMPLETION)


class _FastProtocol(asyncio.Protocol):
    """Minimal HTTP/1.1 keep-alive server: parses request heads and Content-Length, nothing else."""

    def connection_made(self, transport):
        self.transport = transport
        self.buffer = b""

    def data_received(self, data):
        self.buffer += data
        while True:
            head_end = self.buffer.find(b"\r\n\r\n")
            if head_end < 0:
                return
            head = self.buffer[:head_end]
            length = 0
            lower = head.lower()
            pos = lower.find(b"content-length:")
            if pos >= 0:
                line_end = lower.find(b"\r\n", pos)
                length = int(lower[pos + 15: line_end if line_end >= 0 else len(lower)])
            total = head_end + 4 + length
            if len(self.buffer) < total:
                return
            path = head.split(b" ", 2)[1]
            self.buffer = self.buffer[total:]
            self.transport.write(_FAST_RESPONSES.get(path, _FAST_DEFAULT))


async def _serve_fast(host: str, port: int) -> None:
    server = await asyncio.get_running_loop().create_server(_FastProtocol, host, port, backlog=1024)
    async with server:
        await server.serve_forever()


async def _serve(args) -> None:
    worker = StandinWorker(args.name, args.kv_tokens)
    await worker.start(args.host, args.port)
    print(f"standin worker {args.name} ready on {worker.url}", flush=True)
    await asyncio.Event().wait()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--name", default=None)
    parser.add_argument("--kv-tokens", type=int, default=65536)
    parser.add_argument("--fast", action="store_true")
    args, _unknown = parser.parse_known_args(argv)
    args.name = args.name or f"standin{args.port}"
    try:
        import uvloop

        runner = uvloop.run
    except ImportError:  # pragma: no cover
        runner = asyncio.run
    try:
        if args.fast:
            print(f"fast standin ready on http://{args.host}:{args.port}", flush=True)
            runner(_serve_fast(args.host, args.port))
        else:
            runner(_serve(args))
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
