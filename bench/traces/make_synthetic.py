"""Writes bench/traces/synthetic_chat.jsonl: a small made-up trace in the replay format (bench/locust/trace.py).

24 chat sessions over 3 shared system prompts, 1-4 turns each (a later turn repeats the earlier turns,
with a placeholder assistant reply, as a recorded chat history would), plus a few completion prompts;
Poisson arrivals at ~2 requests/s. Deterministic: `python -m bench.traces.make_synthetic` rewrites the
same file.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from bench.locust.workloads import words

OUT = Path(__file__).with_name("synthetic_chat.jsonl")


def main() -> None:
    rng = random.Random(2026)
    systems = [f"You are support agent {i} for product line {i}. " + words(rng, 1200) for i in range(3)]
    pending = []  # (session id, history so far, turns left)
    for s in range(24):
        history = [{"role": "system", "content": systems[s % 3]}]
        pending.append((f"session-{s:02d}", history, rng.randint(1, 4)))
    lines, clock = [], 0.0
    while pending:
        clock += rng.expovariate(2.0)
        if rng.random() < 0.1:
            lines.append({"arrival_s": round(clock, 3), "session_id": f"completion-{len(lines)}",
                          "prompt": "Continue the story: " + words(rng, 300), "output_tokens": 24})
            continue
        k = rng.randrange(len(pending))
        sid, history, left = pending[k]
        history.append({"role": "user", "content": words(rng, 160) + "?"})
        lines.append({"arrival_s": round(clock, 3), "session_id": sid, "messages": list(history),
                      "output_tokens": rng.choice((16, 32, 48))})
        history.append({"role": "assistant", "content": "(reply) " + words(rng, 80)})
        if left == 1:
            pending.pop(k)
        else:
            pending[k] = (sid, history, left - 1)
    OUT.write_text("".join(json.dumps(line) + "\n" for line in lines))
    print(f"wrote {OUT}: {len(lines)} requests over {clock:.1f} s")


if __name__ == "__main__":
    main()
