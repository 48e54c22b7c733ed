"""Prefix-tree keying for the router: chained xxhash chunks vs a character radix tree.

Builds one worker's tree from N cached prompts of a multi-turn chat workload (shared system prompts,
conversations growing turn by turn) and measures, for each keying:
  insert cost per prompt, lookup cost per request (hashing once + probing W worker trees),
  and memory held by the tree (tracemalloc, in a separate pass so it does not skew timings).

    .venv/bin/python -m bench.tree_bench [--prompts 100000] [--workers 4] [--out results/tree_bench.json]

The character radix tree here is a straightforward, reasonably tuned baseline (edge strings, child
dict keyed by first character, `startswith` comparisons in C); it does only insert and match, so its
figures are a lower bound on what it would cost with LRU eviction added.
"""

from __future__ import annotations

import argparse
import gc
import platform
import random
import time
import tracemalloc

from bench.plotting import script_main, write_json

from router.tree import PrefixTree, chunk_hashes

WORDS = ("the of and to in is you that it he was for on are as with his they at be this have from or one had "
         "by word but not what all were we when your can said there use an each which she do how their if will "
         "up other about out many then them these so some her would make like him into time has look two more "
         "write go see number no way could people my than first water been call who oil its now find long down "
         "day did get come made may part router cache token prefix worker batch kernel tensor latency").split()


def _common_prefix_len(edge: str, text: str, pos: int) -> int:
    """Characters edge and text[pos:] share, by binary search over C-level slice compares."""
    lo, hi = 0, min(len(edge), len(text) - pos)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if edge[lo:mid] == text[pos + lo:pos + mid]:
            lo = mid
        else:
            hi = mid - 1
    return lo


class CharRadixNode:
    __slots__ = ("edge", "children", "last_access")

    def __init__(self, edge: str) -> None:
        self.edge = edge
        self.children: dict[str, CharRadixNode] = {}
        self.last_access = 0.0


class CharRadixTree:
    """Character radix tree: each edge holds a string; children keyed by their first character."""

    def __init__(self) -> None:
        self.root = CharRadixNode("")
        self.tick = 0.0

    def match(self, text: str) -> int:
        node, pos, n = self.root, 0, len(text)
        while pos < n:
            child = node.children.get(text[pos])
            if child is None:
                return pos
            edge = child.edge
            if text.startswith(edge, pos):
                pos += len(edge)
                node = child
                continue
            return pos + _common_prefix_len(edge, text, pos)  # partial edge match
        return pos

    def insert(self, text: str) -> None:
        self.tick += 1
        node, pos, n = self.root, 0, len(text)
        while pos < n:
            node.last_access = self.tick
            child = node.children.get(text[pos])
            if child is None:
                leaf = CharRadixNode(text[pos:])
                leaf.last_access = self.tick
                node.children[text[pos]] = leaf
                return
            edge = child.edge
            if text.startswith(edge, pos):
                pos += len(edge)
                node = child
                continue
            i = _common_prefix_len(edge, text, pos)
            # Split the edge at i.
            middle = CharRadixNode(edge[:i])
            middle.last_access = self.tick
            child.edge = edge[i:]
            middle.children[child.edge[0]] = child
            node.children[text[pos]] = middle
            if pos + i < n:
                leaf = CharRadixNode(text[pos + i:])
                leaf.last_access = self.tick
                middle.children[text[pos + i]] = leaf
            return
        node.last_access = self.tick


def make_workload(n_prompts: int, n_system: int, turns: int, seed: int = 0) -> tuple[list[str], list[str]]:
    """(prompts to cache, follow-up queries): conversations under shared system prompts, turn by turn."""
    rng = random.Random(seed)

    def sentence(n_words: int) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(n_words)) + ". "

    systems = [f"System {i}: " + "".join(sentence(rng.randint(12, 20)) for _ in range(10)) for i in range(n_system)]
    prompts: list[str] = []
    queries: list[str] = []
    conversation = 0
    while len(prompts) < n_prompts:
        text = rng.choice(systems) + f"[conversation {conversation}] "
        conversation += 1
        for _ in range(turns):
            text += "USER: " + sentence(rng.randint(20, 40)) + "ASSISTANT: " + sentence(rng.randint(20, 40))
            prompts.append(text)
            if len(prompts) >= n_prompts:
                break
        if conversation % 10 == 0:
            queries.append(text + "USER: " + sentence(25))  # next turn of a cached conversation
        if conversation % 10 == 5:
            queries.append(rng.choice(systems) + "[new conversation] USER: " + sentence(25))
    return prompts, queries


def _bench_chunk(prompts, queries, workers, chunk_chars, measure_memory):
    capacity = 10**12  # no eviction while measuring size
    gc.collect()
    if measure_memory:
        tracemalloc.start()
        base = tracemalloc.get_traced_memory()[0]
    tree = PrefixTree(capacity, chunk_chars=chunk_chars)
    start = time.perf_counter()
    for text in prompts:
        tree.insert(chunk_hashes(text, chunk_chars))
    insert_s = time.perf_counter() - start
    if measure_memory:
        mem = tracemalloc.get_traced_memory()[0] - base
        tracemalloc.stop()
        return {"memory_bytes": mem, "nodes": len(tree)}
    # Lookup as the router does it: hash once, probe every worker's tree (here the same tree W times).
    start = time.perf_counter()
    total_match = 0
    for text in queries:
        hashes = chunk_hashes(text, chunk_chars)
        for _ in range(workers):
            total_match += tree.match_chars(hashes)
    lookup_s = time.perf_counter() - start
    start = time.perf_counter()
    for text in queries:
        chunk_hashes(text, chunk_chars)
    hash_s = time.perf_counter() - start
    # Eviction: shrink to half, LRU, and time it per evicted node.
    n_before = len(tree)
    start = time.perf_counter()
    tree.set_capacity(int(tree.size_tokens // 2))
    evict_s = time.perf_counter() - start
    return {"insert_us": insert_s / len(prompts) * 1e6, "lookup_us": lookup_s / len(queries) * 1e6,
            "hash_us": hash_s / len(queries) * 1e6, "mean_match_chars": total_match / len(queries) / workers,
            "nodes": n_before, "evict_us_per_node": evict_s / max(1, n_before - len(tree)) * 1e6}


def _bench_char(prompts, queries, workers, measure_memory):
    gc.collect()
    if measure_memory:
        tracemalloc.start()
        base = tracemalloc.get_traced_memory()[0]
    tree = CharRadixTree()
    start = time.perf_counter()
    for text in prompts:
        tree.insert(text)
    insert_s = time.perf_counter() - start
    if measure_memory:
        mem = tracemalloc.get_traced_memory()[0] - base
        tracemalloc.stop()
        return {"memory_bytes": mem}
    start = time.perf_counter()
    total_match = 0
    for text in queries:
        for _ in range(workers):
            total_match += tree.match(text)
    lookup_s = time.perf_counter() - start
    return {"insert_us": insert_s / len(prompts) * 1e6, "lookup_us": lookup_s / len(queries) * 1e6,
            "hash_us": 0.0, "mean_match_chars": total_match / len(queries) / workers,
            "evict_us_per_node": None}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--prompts", type=int, default=100_000, help="cached prompts per worker")
    parser.add_argument("--system-prompts", type=int, default=50)
    parser.add_argument("--turns", type=int, default=5)
    parser.add_argument("--workers", type=int, default=4, help="worker trees probed per lookup")
    parser.add_argument("--out", default="results/tree_bench.json")


def run(args: argparse.Namespace) -> int:

    prompts, queries = make_workload(args.prompts, args.system_prompts, args.turns)
    text_bytes = sum(len(p) for p in prompts)
    print(f"tree bench: {len(prompts)} cached prompts (mean {text_bytes / len(prompts):.0f} chars, "
          f"{args.system_prompts} system prompts, {args.turns}-turn conversations), {len(queries)} lookups "
          f"x {args.workers} workers; python {platform.python_version()} on {platform.machine()}", flush=True)
    rows = []
    for name, fn in (("xxhash chunks 64", lambda m: _bench_chunk(prompts, queries, args.workers, 64, m)),
                     ("xxhash chunks 128", lambda m: _bench_chunk(prompts, queries, args.workers, 128, m)),
                     ("char radix", lambda m: _bench_char(prompts, queries, args.workers, m))):
        print(f"  running {name}...", flush=True)
        timing = fn(False)
        memory = fn(True)
        row = {"keying": name, **timing, **memory}
        rows.append(row)
    header = f"{'keying':<18} {'insert us':>10} {'lookup us':>10} {'(hash us)':>10} {'match chars':>12} " \
             f"{'memory MB':>10} {'bytes/prompt':>13}"
    print(header)
    print("-" * len(header))
    for r in rows:
        print(f"{r['keying']:<18} {r['insert_us']:>10.1f} {r['lookup_us']:>10.1f} {r['hash_us']:>10.1f} "
              f"{r['mean_match_chars']:>12.0f} {r['memory_bytes'] / 2**20:>10.1f} "
              f"{r['memory_bytes'] / len(prompts):>13.0f}")
    print("lookup us: one request against all worker trees (hashing included, done once per request).")
    write_json(args.out, {"settings": vars(args), "mean_prompt_chars": text_bytes / len(prompts), "rows": rows})
    print(f"wrote {args.out}")
    return 0



if __name__ == "__main__":
    raise SystemExit(script_main(__doc__, add_arguments, run))
