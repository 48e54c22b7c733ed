"""`radixfleet bench fuzz`: fire fuzzed request bodies at a worker and at the router, count what comes back.

Each body is an OpenAI request with edge values in its fields (huge, negative and fractional numbers,
wrong types, lone surrogates, long stop lists), or a broken serialisation of one (nested 990 deep, a
5,000-digit integer, NaN, truncated, not UTF-8, not an object), sometimes with headers a proxy must not
pass on as they are. A good server answers every one with a 2xx or a 4xx carrying an OpenAI error body,
never a 5xx, and keeps serving. The report: status histograms, the 5xx and malformed answers (with the
body that caused them), requests slower than --slow-s, and the RSS of the processes it started.

    radixfleet bench fuzz --bodies 10000 --out bench/reports/fuzz_soak.json   # starts a demo worker + router
    radixfleet bench fuzz --worker-url http://127.0.0.1:8001 --router-url http://127.0.0.1:8000

`make_body(choose, ...)` is shared with the hypothesis fuzz test (tests/test_fuzz_endpoints.py): there
`choose` is a hypothesis draw, here a seeded random choice, so both explore the same space.
Loopback only; not part of CI.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import random
import subprocess
import sys
import time
from collections import Counter
from typing import Callable, Sequence
from urllib.parse import urlsplit

Choose = Callable[[Sequence], object]

TEXTS = ["Hello", "", " ", "a\ud800b", "\udfff", "\U0001F600 emoji", "x" * 3000, "\x00\x1f\x7f", "<|endoftext|>",
         "{{ raise_exception('boom') }}", "\u65e5\u672c\u8a9e", "\r\n\r\nHTTP/1.1 200 OK\r\n"]
INTS = [-1, 0, 1, 2, 3, 16, 128, 129, 2**31 - 1, 2**31, 2**63 - 1, 2**63, -(2**63) - 1, 10**30]
FLOATS = [0.0, 0.5, 1.0, 1.5, 2.0, 2.1, -0.1, 1e-300, 1e300, -1e300]
ODD = [None, True, False, "1", [], {}, [1, 2], {"a": 1}, "\ud800"]
SCALARS = {"int": INTS, "float": FLOATS, "odd": ODD, "text": TEXTS}


def _edge(choose: Choose) -> object:
    return choose(SCALARS[choose(sorted(SCALARS))])


def _field(choose: Choose, valid: Sequence) -> object:
    """A valid value most of the time, an edge value otherwise."""
    return choose(valid) if choose([True, True, True, False]) else _edge(choose)


# field -> plausible values; the edge values come from SCALARS
_SAMPLING = {
    "n": [1, 2], "temperature": [0, 0.7], "top_p": [0.9, 1.0], "top_k": [-1, 5], "min_p": [0.0, 0.1],
    "seed": [7, -(2**63)], "presence_penalty": [0.5], "frequency_penalty": [-0.5], "repetition_penalty": [1.1],
    "stop": ["\n", ["a", "b"], ["x"] * 17, "s" * 2000, [1, 2], ""], "stop_token_ids": [[1, 2], list(range(2000))],
    "min_tokens": [0, 1], "ignore_eos": [True, False], "priority": [0, 1], "logit_bias": [{}, {"5": 10}, [1]],
    "stream": [True, False], "stream_options": [{"include_usage": True}, {"bogus": 1}], "user": ["u1"],
    "model": ["demo", "nope"], "bogus_field": [1],
}
_COMPLETION_ONLY = {"logprobs": [0, 5, 20, 21], "echo": [True, False], "best_of": [1, 3], "suffix": ["s"]}
_CHAT_ONLY = {"logprobs": [True, False], "top_logprobs": [0, 5, 21], "max_completion_tokens": [1, 3],
              "tools": [[], [{"type": "function", "function": {"name": "f"}}]], "response_format": [{"type": "json"}],
              "chat_template_kwargs": [{"enable_thinking": False}, {"tokenize": True}]}
_PROMPTS = [[1, 2, 3], [[1], [2, 3]], [-1], [2**40], [], ["a"] * 300, 5, ["a", 3]]
_ROLES = ["user"] * 6 + ["system", "assistant", "tool", "bogus", None, 5]


def _message(choose: Choose) -> object:
    content = choose(["text"] * 4 + ["parts", "image", "none", "number"])
    value = {"text": lambda: choose(TEXTS), "parts": lambda: [{"type": "text", "text": choose(TEXTS)}],
             "image": lambda: [{"type": "image_url", "image_url": {"url": "http://x"}}],
             "none": lambda: None, "number": lambda: 5}[content]()
    return {"role": choose(_ROLES), "content": value}


def make_fields(choose: Choose, kind: str) -> dict:
    """An OpenAI body for kind 'chat' or 'completion', with fuzzed fields (max_tokens always small or edge)."""
    body: dict = {"max_tokens": _field(choose, [1, 2, 4])}
    if body["max_tokens"] is None:
        body["max_tokens"] = 2  # a null max_tokens on chat means "up to the context length": too slow here
    if kind == "chat":
        messages = [_message(choose) for _ in range(choose([1, 1, 2, 3]))]
        body["messages"] = choose([messages] * 6 + [[], "hi", [5]])
        extra = _CHAT_ONLY
    else:
        body["prompt"] = choose(TEXTS) if choose([True, False]) else choose(_PROMPTS)
        extra = _COMPLETION_ONLY
    fields = {**_SAMPLING, **extra}
    for name in sorted(fields):
        if choose([False] * 5 + [True]):
            body[name] = _field(choose, fields[name])
    if body.get("n") not in (None, 1, 2):
        body["max_tokens"] = 2  # n=128 with 129 tokens each is valid but takes a CPU worker a minute
    return body


def _json(body: object, ascii_only: bool) -> bytes:
    # surrogatepass: a lone surrogate written raw is invalid UTF-8, which is one more case to answer
    return json.dumps(body, ensure_ascii=ascii_only).encode("utf-8", "surrogatepass")


def serialize(choose: Choose, body: dict) -> bytes:
    mode = choose(["json"] * 12 + ["deep", "bigint", "nan", "truncated", "not_object", "garbage"])
    if mode == "json":
        return _json(body, choose([True, False]))
    if mode == "deep":
        depth = choose([63, 65, 990, 5000, 100000])
        field = "prompt" if "prompt" in body else "messages"
        return _json({**body, field: "__DEEP__"}, True).replace(b'"__DEEP__"', b"[" * depth + b"]" * depth)
    if mode == "bigint":
        digits = choose([25, 4301, 5000, 50000])
        field = choose(["max_tokens", "seed", "n", "temperature"])
        return _json({**body, field: "__BIG__"}, True).replace(b'"__BIG__"', b"9" * digits)
    if mode == "nan":
        return _json({**body, "temperature": "__NAN__"}, True).replace(b'"__NAN__"', choose([b"NaN", b"Infinity"]))
    if mode == "truncated":
        raw = _json(body, True)
        return raw[: len(raw) // 2]
    if mode == "not_object":
        return _json(choose([[body], "text", 5, None]), True)
    return choose([b"", b"\xff\xfe\x00{", b"{'single': 1}", b"\x1f\x8b\x08\x00garbage", b"{" * 3])


def make_headers(choose: Choose, allow_bad_encoding: bool = True) -> dict[str, bytes]:
    # Non-latin-1 bytes are legal on the wire (obs-text) but not something to pass on. Control characters
    # are left out: aiohttp refuses them while parsing, with a plain-text 400 no handler can change.
    options = [{}, {}, {}, {"X-Request-ID": "caf\u00e9\u2603".encode()}, {"traceparent": b"00-\xff\xfe-01"}]
    if allow_bad_encoding:
        options.append({"Content-Encoding": b"gzip"})
    return choose(options)


def make_request(choose: Choose, kind: str, allow_bad_encoding: bool = True) -> tuple[bytes, dict[str, bytes]]:
    return serialize(choose, make_fields(choose, kind)), make_headers(choose, allow_bad_encoding)


def send(base_url: str, path: str, raw: bytes, headers: dict[str, bytes], timeout_s: float = 120.0
         ) -> tuple[int, bytes, float]:
    """POST raw bytes with raw header values; (status, body, seconds). Loopback only."""
    parts = urlsplit(base_url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout_s)
    start = time.monotonic()
    try:
        conn.putrequest("POST", path)
        conn.putheader("Content-Type", "application/json")
        conn.putheader("Content-Length", str(len(raw)))
        for name, value in headers.items():
            conn.putheader(name, value)
        conn.endheaders(raw)
        response = conn.getresponse()
        return response.status, response.read(), time.monotonic() - start
    finally:
        conn.close()


def problem(status: int, body: bytes) -> str | None:
    """What is wrong with an answer to a fuzzed body, or None when it is one a client can rely on."""
    if status >= 500:
        return f"HTTP {status}"
    if status >= 400:
        try:
            error = json.loads(body)["error"]
        except (ValueError, KeyError, TypeError):
            return f"HTTP {status} without an OpenAI error body"
        if not isinstance(error.get("message"), str) or not isinstance(error.get("type"), str):
            return f"HTTP {status} error body lacks message/type"
        return None
    if status == 200 and not (body.lstrip().startswith(b"{") or b"data: [DONE]" in body):
        return "HTTP 200 that is neither JSON nor a finished event stream"
    return None


def kind_and_path(choose: Choose) -> tuple[str, str]:
    return choose([("chat", "/v1/chat/completions"), ("completion", "/v1/completions")])


# ---------------------------------------------------------------------- the soak
def _rss_mb(pid: int) -> float | None:
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def _wait_healthy(url: str, proc: subprocess.Popen | None, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    parts = urlsplit(url)
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise SystemExit(f"{proc.args[:4]} exited with {proc.returncode}")
        try:
            conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=2)
            conn.request("GET", "/health")
            if conn.getresponse().status == 200:
                return
        except OSError:
            pass
        time.sleep(0.3)
    raise SystemExit(f"{url} did not become healthy in {timeout_s:.0f} s")


def _start(args: list[str], port: int) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "worker.cli", *args, "--port", str(port), "--host", "127.0.0.1"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def soak(target: str, url: str, bodies: int, rng: random.Random, slow_s: float, pid: int | None,
         allow_bad_encoding: bool) -> dict:
    statuses: Counter = Counter()
    problems: list[dict] = []
    slow: list[dict] = []
    rss = [_rss_mb(pid)] if pid else []
    start = time.monotonic()
    for i in range(bodies):
        kind, path = kind_and_path(rng.choice)
        raw, headers = make_request(rng.choice, kind, allow_bad_encoding)
        try:
            status, answer, seconds = send(url, path, raw, headers)
        except (OSError, http.client.HTTPException) as exc:
            status, answer, seconds = -1, repr(exc).encode(), 0.0
        statuses[status] += 1
        issue = problem(status, answer) if status >= 0 else f"no answer: {answer.decode()}"
        if issue is not None:
            problems.append({"issue": issue, "path": path, "body": raw[:300].decode("latin-1"),
                             "headers": {k: v.decode("latin-1") for k, v in headers.items()},
                             "answer": answer[:300].decode("latin-1")})
        if seconds > slow_s:
            slow.append({"seconds": round(seconds, 2), "path": path, "body": raw[:200].decode("latin-1")})
        if pid and (i + 1) % max(1, bodies // 10) == 0:
            rss.append(_rss_mb(pid))
    return {"target": target, "bodies": bodies, "seconds": round(time.monotonic() - start, 1),
            "statuses": {str(k): v for k, v in sorted(statuses.items())},
            "5xx": sum(v for k, v in statuses.items() if k >= 500), "problems": len(problems),
            "problem_examples": problems[:20], "slow": len(slow), "slow_examples": slow[:10],
            "rss_mb": [round(r, 1) for r in rss if r is not None]}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--bodies", type=int, default=1000, help="fuzzed bodies per target (default 1000)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--worker-url", help="an already running worker (default: start a demo CPU worker)")
    parser.add_argument("--router-url", help="an already running router (default: start one in front of the worker)")
    parser.add_argument("--slow-s", type=float, default=30.0, help="report requests slower than this")
    parser.add_argument("--no-bad-encoding", action="store_true",
                        help="leave out bodies sent with Content-Encoding: gzip that are not gzip")
    parser.add_argument("--out", help="write the JSON report here")


def run(args: argparse.Namespace) -> int:
    started: list[subprocess.Popen] = []
    try:
        worker_url, worker_pid = args.worker_url, None
        if worker_url is None:
            from worker.server.launcher import free_port

            port = free_port()
            started.append(_start(["worker", "--model", "demo", "--device", "cpu", "--log-level", "warning"], port))
            worker_url, worker_pid = f"http://127.0.0.1:{port}", started[-1].pid
        _wait_healthy(worker_url, started[0] if started else None, 300)
        router_url, router_pid = args.router_url, None
        if router_url is None:
            from worker.server.launcher import free_port

            port = free_port()
            started.append(_start(["router", "--worker-urls", worker_url], port))
            router_url, router_pid = f"http://127.0.0.1:{port}", started[-1].pid
        _wait_healthy(router_url, started[-1] if router_pid else None, 60)
        reports = []
        for target, url, pid in (("worker", worker_url, worker_pid), ("router", router_url, router_pid)):
            rng = random.Random(args.seed)
            reports.append(soak(target, url, args.bodies, rng, args.slow_s, pid, not args.no_bad_encoding))
            _wait_healthy(url, None, 30)  # still serving after the run
        print(f"{'target':<8} {'bodies':>7} {'seconds':>8} {'5xx':>5} {'problems':>8} {'slow':>5}  statuses  rss MB")
        for r in reports:
            print(f"{r['target']:<8} {r['bodies']:>7} {r['seconds']:>8} {r['5xx']:>5} {r['problems']:>8} "
                  f"{r['slow']:>5}  {r['statuses']}  {r['rss_mb']}")
        result = {"options": vars(args), "reports": reports}
        print(json.dumps(result, indent=1)[:4000])
        if args.out:
            with open(args.out, "w") as out:
                json.dump(result, out, indent=1)
        return 0 if all(r["5xx"] == 0 and r["problems"] == 0 for r in reports) else 1
    finally:
        for proc in reversed(started):
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(p)
    sys.exit(run(p.parse_args()))
