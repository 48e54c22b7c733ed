"""Where doc-QA's cache misses come from: the decision log of decision_log.patch, one JSON line per request.

Each line: the router's decision (worker, reason, predicted cached characters on it and on every worker,
loads) and the worker's answer (prompt tokens, cached tokens from usage). A request counts as a hit when
at least 30% of its prompt was cached (the router's cache_threshold), as predicted when the router's tree
on the chosen worker held at least 30% of its routing text. Usage:

    git apply bench/reports/placement_sim/tree_accuracy/decision_log.patch
    RF_DIAG=/tmp/decisions.jsonl python -m bench.fleet_bench ... --routers cache_aware --probe-interval-s 0
    python bench/reports/placement_sim/tree_accuracy/analyse.py /tmp/decisions.jsonl
"""

import collections
import json
import sys


def main(path: str) -> None:
    rows = sorted((r for r in map(json.loads, open(path)) if r.get("ct") is not None), key=lambda r: r["t"])
    hit = sum(r["ct"] for r in rows) / sum(r["pt"] for r in rows)
    print(f"{len(rows)} requests, hit rate {hit:.2%} (cached / prompt tokens)")
    kinds: collections.Counter = collections.Counter()
    seen: set = set()
    holders: collections.Counter = collections.Counter()
    last_on: dict = {}
    back_home = 0
    for r in rows:
        predicted = r["m"] / r["n"] >= 0.3
        cached = r["ct"] / r["pt"] >= 0.3
        held = sum(1 for m in r["all"].values() if m / r["n"] >= 0.3)
        holders[held] += 1
        first = r["doc"] not in seen
        seen.add(r["doc"])
        if first:
            kind = "first request of its document"
        elif predicted and cached:
            kind = "predicted hit, hit"
        elif predicted:
            kind = "predicted hit, worker had evicted it (tree too optimistic)"
        elif cached:
            kind = "predicted miss, worker held it (tree forgot it)"
        elif held:
            kind = "held elsewhere, sent to another worker (load over cache), miss"
        else:
            kind = "held by no worker's tree, miss"
            back_home += last_on.get(r["doc"]) == r["w"]
        kinds[kind] += 1
        last_on[r["doc"]] = r["w"]
    for kind, n in kinds.most_common():
        print(f"  {n:5d}  {n / len(rows):6.2%}  {kind}")
    none = kinds["held by no worker's tree, miss"]
    print(f"  of the {none} held by no tree: {back_home} sent back to the worker that last served the document")
    print("  workers whose tree held the document, per request:", dict(sorted(holders.items())))


if __name__ == "__main__":
    main(sys.argv[1])
