"""Locust users that speak the OpenAI streaming API to a radixfleet router (or any OpenAI server).

    locust -f bench/locust/locustfile.py --host http://127.0.0.1:8000 --workload docqa --seed 0 \
        [--headless -u 32 -r 8 -t 60s --csv results/docqa] [--rate 4]

Every request reports three Locust request events, so the web UI and the CSVs show them:
  "e2e"   end-to-end time of the request (a failure is reported here, with the reason);
          its response length is the completion token count
  "ttft"  time to the first streamed token
  "itl"   each gap between streamed token events

Closed loop (default): each of the -u users sends its next session as soon as its last one ended.
Open loop (--rate R > 0): sessions start at Poisson arrivals of R per second over the whole run,
each taken by a free user (raise -u if the run reports late arrivals). Trace workloads replay their
own arrival times unless --rate is given. Session i is the same for the same --seed in every run
(bench/locust/workloads.py); users take sessions 0, 1, 2, ... in turn. Run Locust in one process
(no --processes): the session counter and arrival clock live in this process.

--samples-out FILE writes every sample (name, seconds, ok, length) as JSON at exit, for exact percentiles
(`radixfleet bench fleet` reads it; Locust's own CSV rounds times above 100 ms to 2 digits).
"""

from __future__ import annotations

import itertools
import json
import random
import time
from pathlib import Path

# locust first: it monkey-patches the standard library (ssl, sockets) before requests imports it.
from locust import User, events, task  # isort: skip
import gevent
import requests

from bench.locust.streaming import request_body, stream_request
from bench.locust.trace import TraceError
from bench.locust.workloads import WORKLOADS, UnknownWorkload, make_workload, run_session

SHIPPED_TRACE = Path(__file__).resolve().parent.parent / "traces" / "synthetic_chat.jsonl"
OPTION_DEFAULTS = {  # flag -> (default, type, help); every workload reads only its own
    "workload": ("docqa", str, f"one of {', '.join(WORKLOADS)}"),
    "seed": (0, int, "seed of the generated sessions and of open-loop arrivals"),
    "model": ("demo", str, "the 'model' field sent"),
    "max-tokens": (32, int, "output tokens per request (trace lines carry their own)"),
    "rate": (0.0, float, "open loop: sessions per second (0: closed loop)"),
    "trace": (str(SHIPPED_TRACE), str, "JSONL trace for --workload trace (default: the shipped synthetic one)"),
    "documents": (48, int, "docqa: number of documents"),
    "doc-chars": (4000, int, "docqa: characters per document"),
    "zipf": (0.8, float, "docqa: Zipf exponent of document popularity"),
    "system-prompts": (8, int, "chat: shared system prompts"),
    "system-chars": (2000, int, "chat / hot: characters per system prompt"),
    "turns": (4, int, "chat: turns per conversation"),
    "user-chars": (200, int, "chat / hot: characters per user turn"),
    "groups": (16, int, "gsp: prefix groups"),
    "prompts-per-group": (16, int, "gsp: prompts per group"),
    "prefix-chars": (8000, int, "gsp: characters per group prefix"),
    "question-chars": (120, int, "docqa / gsp: characters per question"),
    "request-timeout": (600.0, float, "seconds before a request counts as failed"),
    "samples-out": ("", str, "write every sample to this JSON file at exit"),
}
SWITCHES = {"session-ids": "send each session's id (X-Session-ID header and `user` field); off: routers must "
                           "place requests from the prompts alone"}


@events.init_command_line_parser.add_listener
def _add_options(parser) -> None:
    for flag, (default, kind, help_text) in OPTION_DEFAULTS.items():
        parser.add_argument("--" + flag, type=kind, default=default, help=help_text)
    for flag, help_text in SWITCHES.items():
        parser.add_argument("--" + flag, action="store_true", help=help_text)


class Run:
    """What every user shares: the workload, the session counter, the arrival clock and the samples."""

    def __init__(self, options) -> None:
        names = {flag.replace("-", "_") for flag in OPTION_DEFAULTS}
        values = {name: getattr(options, name) for name in names}
        self.workload = make_workload(values.pop("workload"), values["seed"], values["max_tokens"],
                                      path=values["trace"], **{k: v for k, v in values.items()
                                                               if k not in ("seed", "max_tokens", "trace")})
        self.options = options
        self.counter = itertools.count()
        self.rate = options.rate
        arrivals = random.Random(f"arrivals:{options.seed}")
        self.gaps = (arrivals.expovariate(self.rate) for _ in itertools.count()) if self.rate > 0 else None
        self.next_poisson_s = 0.0
        self.start = time.monotonic()
        self.late_arrivals = 0
        self.samples: list[tuple[str, float, bool, int]] = []

    def next_session(self):
        """The next session and when (monotonic) it should start; None: at once (closed loop)."""
        index = next(self.counter)
        session = self.workload.session(index)
        if self.gaps is not None:
            self.next_poisson_s += next(self.gaps)
            return session, self.start + self.next_poisson_s
        if session.arrival_s is not None:
            return session, self.start + session.arrival_s
        return session, None


RUN: Run | None = None


@events.init.add_listener
def _init(environment, **_kwargs) -> None:
    global RUN
    options = environment.parsed_options
    if options is None:  # imported as a library (tests): nothing to set up
        return
    try:
        RUN = Run(options)
    except (UnknownWorkload, TraceError) as exc:
        # One clear line, and a non-zero exit, rather than a traceback per user.
        print(f"locustfile: {exc}", flush=True)
        environment.process_exit_code = 2
        raise SystemExit(2)
    print(f"locustfile: {RUN.workload.describe()}; seed {options.seed}; "
          + (f"open loop at {RUN.rate}/s" if RUN.rate > 0 else "closed loop"), flush=True)


@events.request.add_listener
def _record(name, response_time, response_length, exception, **_kwargs) -> None:
    if RUN is not None:
        RUN.samples.append((name, response_time / 1000.0, exception is None, response_length))


@events.quitting.add_listener
def _write_samples(environment, **_kwargs) -> None:
    if RUN is None or not RUN.options.samples_out:
        return
    with open(RUN.options.samples_out, "w") as f:
        json.dump({"samples": RUN.samples, "elapsed_s": time.monotonic() - RUN.start,
                   "late_arrivals": RUN.late_arrivals,
                   "sessions_started": next(RUN.counter), "workload": RUN.workload.describe()}, f)


class OpenAIStreamingUser(User):
    """Sends whole sessions: a multi-turn chat is one task, its turns in order with the replies appended."""

    def on_start(self) -> None:
        self.http = requests.Session()

    def on_stop(self) -> None:
        self.http.close()

    def _fire(self, name: str, seconds: float, length: int = 0, exception: Exception | None = None) -> None:
        self.environment.events.request.fire(request_type="POST", name=name, response_time=seconds * 1000.0,
                                             response_length=length, exception=exception, context={})

    def _send(self, session, messages):
        send_id = RUN.options.session_ids
        path, body = request_body(session, RUN.options.model, messages, send_id)
        result = stream_request(self.http, self.environment.host, path, body, session.id if send_id else None,
                                RUN.options.request_timeout)
        if not result.ok:
            self._fire("e2e", result.e2e_s, exception=RuntimeError(result.error))
            return None
        self._fire("e2e", result.e2e_s, result.completion_tokens or 0)
        if result.ttft_s is not None:
            self._fire("ttft", result.ttft_s)
        for gap in result.itl_s:
            self._fire("itl", gap)
        return result.text

    @task
    def session(self) -> None:
        session, start_at = RUN.next_session()
        if start_at is not None:
            delay = start_at - time.monotonic()
            if delay > 0:
                gevent.sleep(delay)
            elif delay < -0.05:
                RUN.late_arrivals += 1  # every user was busy when this session was due
        if session.prompt is not None:
            self._send(session, None)
        else:
            run_session(session, lambda messages: self._send(session, messages))
