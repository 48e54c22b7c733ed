"""A fixed sequence of requests through cache_aware, and the decisions it gets (worker, reason, match).

Used by tests/test_placement_decisions.py to show that a change meant to make the policy cheaper leaves
every decision as it was. The sequence exercises each rule: multi-turn chat over shared system prompts
(cache hits, new copies), Zipf doc-QA on trees under eviction pressure, one hot prompt, a cache miss,
load imbalance, session pins, a worker joining mid-way (warm-up), /load reports releasing non-streamed prefills, and
usage teaching the characters per token. No time, no randomness beyond a seeded `random.Random`.

Regenerate the recorded decisions (only when a decision is meant to change, and say why in the commit):

    PYTHONPATH=. python -m tests.placement_replay --write
"""

from __future__ import annotations

import json
import random
import sys
from collections import deque
from pathlib import Path

from router.policies import CacheAware, RouteRequest
from router.sessions import SessionTable
from router.tree import chunk_hashes
from router.worker_pool import WorkerPool
from worker.contracts import LoadReport

RECORDED = Path(__file__).parent / "data" / "cache_aware_decisions.json"
WORDS = "cache prefix worker token batch prompt reply system kernel page evict share route load queue".split()


def words(rng: random.Random, n_chars: int) -> str:
    out, size = [], 0
    while size < n_chars:
        out.append(rng.choice(WORDS))
        size += len(out[-1]) + 1
    return " ".join(out)


def load_report(running: int, waiting: int, kv_total: int, query_tokens: int) -> LoadReport:
    return LoadReport(running=running, waiting=waiting, kv_tokens_used=0, kv_tokens_total=kv_total,
                      cache_query_tokens=query_tokens, cache_hit_tokens=0)


def replay(seed: int = 0, requests: int = 3000) -> list[list]:
    """Run the sequence; returns [worker id, reason, match chars] per decision."""
    rng = random.Random(seed)
    systems = [f"You are assistant {i}. " + words(rng, 2000) for i in range(6)]
    documents = [f"Document {d}. " + words(rng, 1800) for d in range(24)]
    hot = "The one shared prompt. " + words(rng, 3000)
    zipf = [1.0 / (d + 1) ** 0.8 for d in range(len(documents))]
    pool = WorkerPool(default_kv_tokens=6000)
    for i in range(4):
        pool.add(f"http://10.0.0.{i + 1}:8000")
    policy = CacheAware(sessions=SessionTable(clock=lambda: 0.0))
    decisions: list[list] = []
    in_flight: deque = deque()
    conversations: dict[int, list] = {}
    query_tokens = {w.url: 0 for w in pool}

    def text_for(step: int, user: int) -> tuple[str, bool]:
        """(routing text, streamed) of this user's next request."""
        phase = (step // 250) % 4
        if phase == 0:  # chat: a conversation of 3 turns over a shared system prompt
            conv = conversations.get(user)
            if conv is None or conv[1] == 3:
                conv = conversations[user] = [rng.choice(systems), 0]
            conv[0] += f" user {user} turn {conv[1]}: " + words(rng, 200)
            conv[1] += 1
            return conv[0], True
        if phase == 1:  # doc-QA: Zipf-popular documents, more than one worker's tree holds
            doc = rng.choices(range(len(documents)), weights=zipf)[0]
            return documents[doc] + f" Question {step}: " + words(rng, 120), False
        if phase == 2:  # one hot prompt, now and then a prompt nobody shares
            if step % 17 == 0:
                return f"Unshared {step}. " + words(rng, 600), True
            return hot + f" Request {step}: " + words(rng, 150), True
        conv = conversations.get(user)  # chat again, non-streamed
        if conv is None or conv[1] >= 3:
            conv = conversations[user] = [rng.choice(systems), 0]
        conv[0] += f" user {user} turn {conv[1]}: " + words(rng, 200)
        conv[1] += 1
        return conv[0], False

    for step in range(requests):
        if step == 1200:
            pool.add("http://10.0.0.9:8000")  # joins under traffic: warm-up
            query_tokens["http://10.0.0.9:8000"] = 0
        if step % 40 == 20:  # a /load poll of every worker
            for w in pool:
                query_tokens[w.url] += 40 * 300
                waiting = sum(1 for entry in in_flight if entry[1] is w) // 3
                w.report = load_report(w.in_flight - waiting, waiting, 6000 + 500 * (step // 1000),
                                       query_tokens[w.url])
                w.tree.set_capacity(w.report.kv_tokens_total)
        user = step % 12
        text, streamed = text_for(step, user)
        # The non-streamed chat phase names its sessions (X-Session-ID): pins.
        key = f"user-{user}" if (step // 250) % 4 == 3 else None
        route = RouteRequest(chunk_hashes(text), len(text), key)
        if step % 97 == 0:  # a burst on one worker: load imbalance
            w0 = next(iter(pool))
            for _ in range(70):
                w0.on_dispatch(0)
        decision = policy.choose(list(pool), route)
        worker = decision.worker
        decisions.append([worker.worker_id, decision.reason, decision.match_chars])
        pending = worker.on_dispatch(worker.uncached_tokens(route.text_chars, decision.match_chars), streamed,
                                     route.text_chars)
        policy.dispatched(decision, route)
        in_flight.append((user, worker, pending, route.text_chars, streamed))
        if step % 97 == 0:
            for _ in range(70):
                w0.on_finish()
        # Requests finish out of order: 12 in flight, a pseudo-random one of the oldest four ends.
        if len(in_flight) > 12:
            index = rng.randrange(4)
            _, done_worker, done_pending, chars, done_streamed = in_flight[index]
            del in_flight[index]
            if done_streamed:
                done_worker.on_first_byte(done_pending)
            done_worker.on_finish(done_pending)
            done_worker.on_prompt_tokens(chars, max(1, round(chars / 5.3)))
    return decisions


def main(argv: list[str]) -> int:
    decisions = replay()
    if "--write" in argv:
        RECORDED.parent.mkdir(exist_ok=True)
        RECORDED.write_text(json.dumps({"seed": 0, "requests": len(decisions), "decisions": decisions},
                                       separators=(",", ":")) + "\n")
        print(f"wrote {len(decisions)} decisions to {RECORDED}")
    else:
        from collections import Counter
        print(Counter(reason for _, reason, _ in decisions))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
