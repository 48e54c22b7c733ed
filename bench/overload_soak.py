"""`radixfleet bench overload`: the router and its workers under 10x overload, a hung worker, and a long soak.

Starts demo CPU workers and a router on loopback (or uses --router-url / --worker-urls), then runs one
scenario:

  overload  measure the fleet's capacity (completed requests/s at a modest concurrency), then offer
            --factor times that rate, open loop, for --seconds. Every answer must be a 200 that
            completes (JSON with choices, or an event stream ending in [DONE]) or a 429/503 carrying
            Retry-After; anything else, and any connection that breaks, is counted as lost.
            Reports statuses, latency, router and worker RSS before and after, and the workers'
            KV in use once the load stops (it must return to 0).
  hung      steady streamed traffic; SIGSTOP one worker for --stop-s, then SIGCONT. Reports how long
            the router took to take it out of rotation and to re-admit it, the slowest request, and
            any failed request.
  soak      mixed traffic (streamed and not, bad requests, clients that leave early) for --seconds,
            sampling router and worker RSS; writes a PNG of RSS over time.

    radixfleet bench overload overload --seconds 60 --factor 10 --out bench/reports/overload_10x
    radixfleet bench overload hung --out bench/reports/hung_worker
    radixfleet bench overload soak --seconds 600 --out bench/reports/soak

Loopback only; not part of CI. Needs aiohttp (a dependency already).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import aiohttp

from bench.plotting import print_table, write_report

PROMPTS = ["Tell me about mills.", "What is a radix tree?", "Name three rivers.", "Count to five."]


# --- processes ------------------------------------------------------------------------------------------

def _free_port() -> int:
    from worker.server.launcher import free_port

    return free_port()


def _rss_mb(pid: int | None) -> float | None:
    if pid is None:
        return None
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        return None
    return None


class Fleet:
    """Demo workers and a router as subprocesses, or URLs of running ones."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.procs: list[subprocess.Popen] = []
        self.worker_urls: list[str] = list(args.worker_urls or [])
        self.worker_pids: list[int | None] = [None] * len(self.worker_urls)
        self.router_url: str | None = args.router_url
        self.router_pid: int | None = None

    def _start(self, argv: list[str], port: int) -> subprocess.Popen:
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        proc = subprocess.Popen([sys.executable, "-m", "worker.cli", *argv, "--host", "127.0.0.1", "--port", str(port)],
                                env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.procs.append(proc)
        return proc

    async def start(self) -> None:
        if not self.worker_urls:
            for _ in range(self.args.workers):
                port = _free_port()
                proc = self._start(["worker", "--model", "demo", "--device", "cpu", "--log-level", "warning",
                                    "--max-waiting-requests", str(self.args.max_waiting),
                                    "--max-running-requests", str(self.args.max_running)], port)
                self.worker_urls.append(f"http://127.0.0.1:{port}")
                self.worker_pids.append(proc.pid)
        for url in self.worker_urls:
            await _wait_healthy(url, 300)
        if self.router_url is None:
            port = _free_port()
            proc = self._start(["router", "--worker-urls", *self.worker_urls, "--admin-key", "bench",
                                "--health-interval", "0.5", "--log-level", "warning"], port)
            self.router_url = f"http://127.0.0.1:{port}"
            self.router_pid = proc.pid
        await _wait_healthy(self.router_url, 60)

    def stop(self) -> None:
        for proc in reversed(self.procs):
            try:
                proc.send_signal(signal.SIGCONT)
            except ProcessLookupError:
                pass
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()

    def rss(self) -> dict:
        return {"router": _rss_mb(self.router_pid),
                "workers": [_rss_mb(pid) for pid in self.worker_pids]}


async def _wait_healthy(url: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    async with aiohttp.ClientSession() as session:
        while time.monotonic() < deadline:
            try:
                async with session.get(url + "/health", timeout=aiohttp.ClientTimeout(total=2)) as resp:
                    if resp.status == 200:
                        return
            except (aiohttp.ClientError, asyncio.TimeoutError, OSError):
                pass
            await asyncio.sleep(0.3)
    raise SystemExit(f"{url} did not become healthy within {timeout_s:.0f} s")


async def _kv_in_use(session: aiohttp.ClientSession, urls: list[str]) -> list[int | None]:
    used = []
    for url in urls:
        try:
            async with session.get(url + "/load", timeout=aiohttp.ClientTimeout(total=5)) as resp:
                used.append((await resp.json())["kv_tokens_used"])
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError, ValueError, KeyError):
            used.append(None)
    return used


# --- one request ----------------------------------------------------------------------------------------

class Tally:
    """What came back: statuses, latency of completed answers, and everything that counts as lost."""

    def __init__(self) -> None:
        self.statuses: Counter = Counter()
        self.latency_s: list[float] = []
        self.lost: Counter = Counter()  # reason -> count
        self.lost_examples: list[str] = []
        self.slowest_s = 0.0

    def lose(self, reason: str, detail: str = "") -> None:
        self.lost[reason] += 1
        if len(self.lost_examples) < 10:
            self.lost_examples.append(f"{reason}: {detail[:200]}")

    def summary(self) -> dict:
        lat = sorted(self.latency_s)
        pct = (lambda q: round(lat[min(len(lat) - 1, int(q * len(lat)))], 3) if lat else None)
        return {"answers": sum(self.statuses.values()), "statuses": {str(k): v for k, v in sorted(self.statuses.items())},
                "completed": len(lat), "p50_s": pct(0.5), "p99_s": pct(0.99), "max_s": round(self.slowest_s, 3),
                "lost": sum(self.lost.values()), "lost_by_reason": dict(self.lost), "lost_examples": self.lost_examples}


async def one_request(session: aiohttp.ClientSession, base: str, tally: Tally, rng: random.Random,
                      stream: bool, max_tokens: int, leave_after_s: float | None = None,
                      bad: bool = False) -> None:
    body: dict = {"model": "demo", "messages": [{"role": "user", "content": rng.choice(PROMPTS)}],
                  "max_tokens": max_tokens, "stream": stream}
    if bad:
        body["temperature"] = -1
    started = time.monotonic()
    try:
        async with session.post(base + "/v1/chat/completions", json=body) as resp:
            tally.statuses[resp.status] += 1
            if leave_after_s is not None:  # a client that goes away mid-request
                await asyncio.sleep(leave_after_s)
                resp.close()
                return
            raw = await resp.read()
            elapsed = time.monotonic() - started
            tally.slowest_s = max(tally.slowest_s, elapsed)
            if resp.status == 200:
                if stream and not raw.rstrip().endswith(b"data: [DONE]"):
                    tally.lose("stream without [DONE]", raw[-200:].decode("latin-1"))
                elif stream and b'"error"' in raw:
                    tally.lose("stream ended by an error event", raw[-300:].decode("latin-1"))
                elif not stream and not json.loads(raw).get("choices"):
                    tally.lose("200 without choices", raw[:200].decode("latin-1"))
                else:
                    tally.latency_s.append(elapsed)
            elif resp.status in (429, 503):
                if "Retry-After" not in resp.headers:
                    tally.lose(f"{resp.status} without Retry-After", raw[:200].decode("latin-1"))
            elif resp.status == 400 and bad:
                pass
            else:
                tally.lose(f"status {resp.status}", raw[:200].decode("latin-1"))
    except (aiohttp.ClientError, asyncio.TimeoutError, OSError, ValueError) as exc:
        tally.lose("connection broken", repr(exc))


# --- scenarios ----------------------------------------------------------------------------------------

async def _closed_loop(base: str, concurrency: int, seconds: float, stream_share: float, max_tokens: int,
                       rng: random.Random, tally: Tally, extra=None) -> None:
    deadline = time.monotonic() + seconds
    timeout = aiohttp.ClientTimeout(total=600)
    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=0)) as session:
        async def user():
            while time.monotonic() < deadline:
                kind = extra(rng) if extra is not None else {}
                await one_request(session, base, tally, rng, rng.random() < stream_share, max_tokens, **kind)

        await asyncio.gather(*(user() for _ in range(concurrency)))


async def measure_capacity(base: str, args: argparse.Namespace, rng: random.Random) -> float:
    tally = Tally()
    started = time.monotonic()
    await _closed_loop(base, args.capacity_concurrency, args.capacity_s, 0.5, args.max_tokens, rng, tally)
    return len(tally.latency_s) / (time.monotonic() - started)


async def overload(fleet: Fleet, args: argparse.Namespace) -> dict:
    rng = random.Random(args.seed)
    base = fleet.router_url
    capacity = await measure_capacity(base, args, rng)
    rate = max(1.0, capacity * args.factor)
    print(f"capacity {capacity:.2f} completed requests/s; offering {rate:.1f}/s for {args.seconds:g} s")
    rss_before = fleet.rss()
    tally = Tally()
    tasks: set[asyncio.Task] = set()
    timeout = aiohttp.ClientTimeout(total=900)
    rss_samples = []
    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=0)) as session:
        started = time.monotonic()
        next_at = started
        sent = 0
        while time.monotonic() - started < args.seconds:  # open loop: arrivals do not wait for answers
            now = time.monotonic()
            if now < next_at:
                await asyncio.sleep(next_at - now)
            task = asyncio.ensure_future(one_request(session, base, tally, rng, rng.random() < 0.5, args.max_tokens))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            sent += 1
            next_at += rng.expovariate(rate)
            if sent % 200 == 0:
                rss_samples.append({"t": round(time.monotonic() - started, 1), **fleet.rss()})
        offered_s = time.monotonic() - started
        await asyncio.gather(*tasks)
        drained_s = time.monotonic() - started
        kv_deadline = time.monotonic() + 60
        kv = await _kv_in_use(session, fleet.worker_urls)
        while any(k for k in kv if k) and time.monotonic() < kv_deadline:
            await asyncio.sleep(0.5)
            kv = await _kv_in_use(session, fleet.worker_urls)
    rss_after = fleet.rss()
    result = {"scenario": "overload", "capacity_rps": round(capacity, 2), "offered_rps": round(rate, 1),
              "sent": sent, "offered_s": round(offered_s, 1), "all_answered_s": round(drained_s, 1),
              **tally.summary(), "rss_before_mb": rss_before, "rss_after_mb": rss_after, "rss_samples": rss_samples,
              "kv_tokens_in_use_after": kv}
    router_growth = (rss_after["router"] or 0) - (rss_before["router"] or 0)
    result["router_rss_growth_mb"] = round(router_growth, 1)
    print_table([{"sent": sent, "answers": result["answers"], "completed": result["completed"],
                  "shed 429/503": sum(v for k, v in tally.statuses.items() if k in (429, 503)),
                  "lost": result["lost"], "p50 s": result["p50_s"], "p99 s": result["p99_s"],
                  "router RSS +MB": result["router_rss_growth_mb"], "KV in use after": str(kv)}],
                ["sent", "answers", "completed", "shed 429/503", "lost", "p50 s", "p99 s", "router RSS +MB",
                 "KV in use after"], title=f"{args.factor:g}x overload for {args.seconds:g} s")
    return result


async def _worker_health(session: aiohttp.ClientSession, base: str) -> dict[str, bool]:
    async with session.get(base + "/workers", headers={"Authorization": "Bearer bench"}) as resp:
        return {w["url"]: w["healthy"] for w in (await resp.json())["workers"]}


async def hung(fleet: Fleet, args: argparse.Namespace) -> dict:
    if not fleet.procs or len(fleet.worker_pids) < 2 or fleet.worker_pids[1] is None:
        raise SystemExit("the hung scenario starts its own workers (leave out --worker-urls)")
    rng = random.Random(args.seed)
    base = fleet.router_url
    victim_url, victim_pid = fleet.worker_urls[1], fleet.worker_pids[1]
    tally = Tally()
    events: dict = {}
    timeline = []

    async def watch():
        async with aiohttp.ClientSession() as session:
            started = time.monotonic()
            while time.monotonic() - started < args.before_s + args.stop_s + args.after_s:
                try:
                    healthy = (await _worker_health(session, base)).get(victim_url)
                except (aiohttp.ClientError, OSError, ValueError):
                    healthy = None
                t = time.monotonic() - started
                timeline.append((round(t, 2), healthy))
                if "stopped_at" in events and "out_at" not in events and healthy is False:
                    events["out_at"] = t
                if "resumed_at" in events and "back_at" not in events and healthy:
                    events["back_at"] = t
                await asyncio.sleep(0.1)

    async def conductor():
        started = time.monotonic()
        await asyncio.sleep(args.before_s)
        os.kill(victim_pid, signal.SIGSTOP)
        events["stopped_at"] = time.monotonic() - started
        await asyncio.sleep(args.stop_s)
        os.kill(victim_pid, signal.SIGCONT)
        events["resumed_at"] = time.monotonic() - started

    total = args.before_s + args.stop_s + args.after_s
    await asyncio.gather(watch(), conductor(),
                         _closed_loop(base, args.concurrency, total, 0.7, args.max_tokens, rng, tally))
    flips = sum(1 for a, b in zip(timeline, timeline[1:]) if a[1] != b[1] and None not in (a[1], b[1]))
    result = {"scenario": "hung", **tally.summary(), "stop_s": args.stop_s,
              "out_of_rotation_after_s": round(events["out_at"] - events["stopped_at"], 2) if "out_at" in events else None,
              "readmitted_after_s": round(events["back_at"] - events["resumed_at"], 2) if "back_at" in events else None,
              "health_changes": flips, "router_first_byte_timeout_s": 60.0}
    print_table([{"requests": result["answers"], "completed": result["completed"], "lost": result["lost"],
                  "max s": result["max_s"], "p99 s": result["p99_s"],
                  "out of rotation after s": result["out_of_rotation_after_s"],
                  "re-admitted after s": result["readmitted_after_s"], "health changes": flips}],
                ["requests", "completed", "lost", "max s", "p99 s", "out of rotation after s",
                 "re-admitted after s", "health changes"],
                title=f"one of {len(fleet.worker_urls)} workers SIGSTOPped for {args.stop_s:g} s")
    return result


async def soak(fleet: Fleet, args: argparse.Namespace) -> dict:
    rng = random.Random(args.seed)
    tally = Tally()
    samples = []

    def mixed(r: random.Random) -> dict:
        roll = r.random()
        if roll < 0.05:
            return {"bad": True}
        if roll < 0.10:
            return {"leave_after_s": 0.05}
        return {}

    async def sample():
        started = time.monotonic()
        while time.monotonic() - started < args.seconds:
            samples.append({"t": round(time.monotonic() - started, 1), **fleet.rss()})
            await asyncio.sleep(args.sample_s)
        samples.append({"t": round(time.monotonic() - started, 1), **fleet.rss()})

    await asyncio.gather(sample(), _closed_loop(fleet.router_url, args.concurrency, args.seconds, 0.5,
                                                args.max_tokens, rng, tally, extra=mixed))
    async with aiohttp.ClientSession() as session:
        kv = await _kv_in_use(session, fleet.worker_urls)
    router = [s["router"] for s in samples if s["router"] is not None]
    # flatness over the second half: the first minutes hold warm-up (caches, allocator arenas)
    half = router[len(router) // 2:] or router
    result = {"scenario": "soak", "seconds": args.seconds, **tally.summary(), "rss_samples": samples,
              "router_rss_first_mb": router[0] if router else None, "router_rss_last_mb": router[-1] if router else None,
              "router_rss_second_half_spread_pct": round(100 * (max(half) - min(half)) / min(half), 1) if half else None,
              "kv_tokens_in_use_after": kv}
    print_table([{"seconds": args.seconds, "requests": result["answers"], "lost": result["lost"],
                  "router RSS first MB": result["router_rss_first_mb"], "last MB": result["router_rss_last_mb"],
                  "2nd-half spread %": result["router_rss_second_half_spread_pct"], "KV in use after": str(kv)}],
                ["seconds", "requests", "lost", "router RSS first MB", "last MB", "2nd-half spread %",
                 "KV in use after"], title="soak of mixed traffic (5% bad requests, 5% clients leaving)")
    return result


def _plot_rss(samples: list[dict], title: str):
    def plot(path: Path) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(8, 4))
        t = [s["t"] / 60 for s in samples]
        ax.plot(t, [s["router"] for s in samples], label="router")
        for i in range(len(samples[0]["workers"]) if samples else 0):
            ax.plot(t, [s["workers"][i] for s in samples], label=f"worker {i} frontend")
        ax.set_xlabel("minutes")
        ax.set_ylabel("RSS (MB)")
        ax.set_title(title)
        ax.legend()
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)

    return plot


SCENARIOS = {"overload": overload, "hung": hung, "soak": soak}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("scenario", choices=sorted(SCENARIOS))
    parser.add_argument("--seconds", type=float, default=60.0, help="overload / soak length (default 60)")
    parser.add_argument("--factor", type=float, default=10.0, help="overload: offered rate / measured capacity")
    parser.add_argument("--capacity-s", type=float, default=20.0, help="overload: seconds to measure capacity")
    parser.add_argument("--capacity-concurrency", type=int, default=8)
    parser.add_argument("--concurrency", type=int, default=8, help="hung / soak: concurrent clients")
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--workers", type=int, default=2, help="demo CPU workers to start")
    parser.add_argument("--max-waiting", type=int, default=16, help="the workers' --max-waiting-requests")
    parser.add_argument("--max-running", type=int, default=8, help="the workers' --max-running-requests")
    parser.add_argument("--before-s", type=float, default=10.0, help="hung: traffic before SIGSTOP")
    parser.add_argument("--stop-s", type=float, default=20.0, help="hung: how long the worker stays stopped")
    parser.add_argument("--after-s", type=float, default=15.0, help="hung: traffic after SIGCONT")
    parser.add_argument("--sample-s", type=float, default=5.0, help="soak: RSS sampling interval")
    parser.add_argument("--worker-urls", nargs="*", help="running workers (default: start demo CPU workers)")
    parser.add_argument("--router-url", help="a running router (default: start one)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", help="write OUT.json (and OUT.png for soak and overload)")


def run(args: argparse.Namespace) -> int:
    fleet = Fleet(args)

    async def main() -> dict:
        await fleet.start()
        return await SCENARIOS[args.scenario](fleet, args)

    try:
        result = asyncio.run(main())
    finally:
        fleet.stop()
    result["options"] = {k: v for k, v in vars(args).items()}
    result["machine"] = f"{os.cpu_count()} CPU cores, demo model on CPU, loopback"
    if args.out:
        samples = result.get("rss_samples")
        plot = _plot_rss(samples, f"RSS during {args.scenario}") if samples else None
        write_report(args.out, result, plot)
    print(json.dumps({k: v for k, v in result.items() if k != "rss_samples"}, indent=1, default=str)[:3000])
    return 0 if result["lost"] == 0 else 1


if __name__ == "__main__":
    from bench.plotting import script_main

    sys.exit(script_main(__doc__, add_arguments, run))
