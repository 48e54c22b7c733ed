"""Grammar-constrained decoding: host time to compute the token masks of one step, llguidance vs xgrammar.

What a constrained step costs on the engine side is (a) computing every constrained row's allowed-token
bitmask from its grammar state and (b) advancing each state by the sampled token. This script measures both
for a batch of JSON-schema rows over a synthetic 152k-token vocabulary (no downloads are possible here; the
vocabulary mixes the 256 byte tokens, English words with and without a leading space, capitalised forms,
JSON punctuation runs, digits and random letter strings, roughly the make-up of a Qwen-size BPE vocabulary).
Tokens are drawn uniformly from each row's allowed set, so rows walk through strings, numbers and nesting.

    python -m bench.grammar_bench --batch 1 64 --steps 64 --out results/grammar_bench.json

Prints a table (ms per step: mask, advance, total) and writes the JSON. `--sampler` also times the
engine's Sampler on [batch, vocab] logits with no constrained row (the path every unconstrained request
takes; run it under another checkout's PYTHONPATH for a before/after) and with a grammar mask on every row.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import string
import time
from pathlib import Path

import numpy as np
import torch

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 24},
        "age": {"type": "integer"},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 12}, "maxItems": 4},
        "kind": {"enum": ["person", "company", "place"]},
        "score": {"type": "number"},
        "address": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 16}},
                    "required": ["city"]},
    },
    "required": ["name", "age", "tags", "kind", "score", "address"],
    "additionalProperties": False,
}


def synthetic_vocab(size: int, seed: int = 0) -> list[bytes]:
    """`size` distinct byte strings shaped like a byte-level BPE vocabulary (token 0..255 are the bytes)."""
    from worker.models.demo_tokenizer import corpus

    rng = random.Random(seed)
    seen: set[bytes] = set()
    vocab: list[bytes] = []

    def add(token: bytes) -> None:
        if token and token not in seen and len(vocab) < size:
            seen.add(token)
            vocab.append(token)

    for b in range(256):
        add(bytes([b]))
    words = sorted({w for text in corpus(400) for w in text.replace("\n", " ").split(" ") if w})
    for word in words:
        for form in (word, " " + word, word.capitalize(), " " + word.capitalize()):
            add(form.encode())
            for cut in range(2, len(form)):
                add(form[:cut].encode())
    for run in ('{"', '":', '",', '"}', '":"', '","', '"]', '["', '":[', '},{', '{\n', '  "', "\n}", ", ", ": "):
        add(run.encode())
    for n in range(1000):
        add(str(n).encode())
        add((" " + str(n)).encode())
    letters = string.ascii_lowercase
    while len(vocab) < size:
        word = "".join(rng.choice(letters) for _ in range(rng.randint(2, 9)))
        add((" " + word if rng.random() < 0.5 else word).encode())
    return vocab


def _sample_allowed(bitmask_row: np.ndarray, rng: np.random.Generator, vocab_size: int) -> int:
    bits = np.unpackbits(bitmask_row.view(np.uint8), bitorder="little")[:vocab_size]
    allowed = np.flatnonzero(bits)
    return int(rng.choice(allowed))


def _timed_steps(fill, advance, bitmask: torch.Tensor, vocab_size: int, steps: int) -> tuple[list[float], list[float]]:
    """Run `steps` constrained steps: fill the masks, draw an allowed token per row, advance. (mask ms, advance ms)."""
    rng = np.random.default_rng(0)
    mask_ms, advance_ms = [], []
    for _ in range(steps):
        t0 = time.perf_counter()
        fill()
        t1 = time.perf_counter()
        tokens = [_sample_allowed(bitmask[i].numpy(), rng, vocab_size) for i in range(bitmask.shape[0])]
        t2 = time.perf_counter()
        advance(tokens)
        t3 = time.perf_counter()
        mask_ms.append((t1 - t0) * 1e3)
        advance_ms.append((t3 - t2) * 1e3)
    return mask_ms, advance_ms


def bench_llguidance(vocab: list[bytes], eos: int, batch: int, steps: int, threads: int) -> dict:
    import llguidance
    import llguidance.torch as lltorch

    class _Wrapper:  # what llguidance.TokenizerWrapper reads: tokens, eos, specials, and an encoder
        def __init__(self):
            self.tokens = vocab
            self.eos_token_id = eos
            self.bos_token_id = None
            self.special_token_ids = [eos]

        def __call__(self, text):
            data = text.encode() if isinstance(text, str) else text
            return list(data)  # byte tokens: enough for the grammar's forced-text tokenisation

    start = time.perf_counter()
    tokenizer = llguidance.LLTokenizer(llguidance.TokenizerWrapper(_Wrapper()))
    setup_s = time.perf_counter() - start
    grammar = llguidance.LLMatcher.grammar_from_json_schema(SCHEMA)
    start = time.perf_counter()
    matchers = [llguidance.LLMatcher(tokenizer, grammar, log_level=0) for _ in range(batch)]
    compile_s = (time.perf_counter() - start) / batch
    executor = llguidance.LLExecutor(num_threads=threads)
    bitmask = lltorch.allocate_token_bitmask(batch, len(vocab))

    def fill() -> None:
        lltorch.fill_next_token_bitmask_par(executor, [(m, i) for i, m in enumerate(matchers)], bitmask)

    def advance(tokens: list[int]) -> None:
        for matcher, token in zip(matchers, tokens):
            if token == eos or matcher.is_stopped():
                matcher.reset()
            else:
                matcher.consume_token(token)
        if any(m.is_error() for m in matchers):
            raise RuntimeError(next(m.get_error() for m in matchers if m.is_error()))

    mask_ms, advance_ms = _timed_steps(fill, advance, bitmask, len(vocab), steps)
    return _summary("llguidance", batch, setup_s, compile_s, mask_ms, advance_ms)


def bench_xgrammar(vocab: list[bytes], eos: int, batch: int, steps: int, threads: int) -> dict:
    import xgrammar as xgr

    start = time.perf_counter()
    info = xgr.TokenizerInfo(vocab, vocab_type=xgr.VocabType.RAW, vocab_size=len(vocab), stop_token_ids=[eos])
    compiler = xgr.GrammarCompiler(info, max_threads=threads)
    setup_s = time.perf_counter() - start
    start = time.perf_counter()
    compiled = compiler.compile_json_schema(json.dumps(SCHEMA))
    compile_s = time.perf_counter() - start
    matchers = [xgr.GrammarMatcher(compiled) for _ in range(batch)]
    batch_matcher = xgr.BatchGrammarMatcher(max_threads=threads)
    bitmask = xgr.allocate_token_bitmask(batch, len(vocab))

    def advance(tokens: list[int]) -> None:
        for matcher, token in zip(matchers, tokens):
            if matcher.is_terminated() or not matcher.accept_token(token) or matcher.is_terminated():
                matcher.reset()

    mask_ms, advance_ms = _timed_steps(lambda: batch_matcher.batch_fill_next_token_bitmask(matchers, bitmask),
                                       advance, bitmask, len(vocab), steps)
    return _summary("xgrammar", batch, setup_s, compile_s, mask_ms, advance_ms)


def bench_sampler(vocab_size: int, batch: int, steps: int) -> dict:
    """Sampler step time (ms): greedy and random rows without constraints; with a bitmask on every row."""
    from worker.engine.sampler import Sampler, SamplingState
    from worker.sampling_params import SamplingParams

    sampler = Sampler(vocab_size, "cpu", seed=0)
    logits = torch.randn(batch, vocab_size)
    result = {"batch": batch}
    for name, params in (("greedy", SamplingParams(temperature=0.0)), ("random", SamplingParams(temperature=0.8))):
        states = [SamplingState(params, [1, 2, 3], [4, 5]) for _ in range(batch)]
        sampler(logits, states)
        start = time.perf_counter()
        for _ in range(steps):
            sampler(logits, states)
        result[f"{name}_ms"] = round((time.perf_counter() - start) / steps * 1e3, 3)
    try:
        from worker.engine.grammar import unpack_bitmask
    except ImportError:  # a checkout from before grammar support
        return result
    bitmask = torch.randint(-(2**31), 2**31 - 1, (batch, (vocab_size + 31) // 32), dtype=torch.int32)
    start = time.perf_counter()
    for _ in range(steps):
        allowed = unpack_bitmask(bitmask, vocab_size, torch.device("cpu"))
        logits.clone().masked_fill_(~allowed, float("-inf"))
    result["apply_mask_ms"] = round((time.perf_counter() - start) / steps * 1e3, 3)
    return result


def _summary(library: str, batch: int, setup_s: float, compile_s: float, mask_ms: list[float],
             advance_ms: list[float]) -> dict:
    warm = mask_ms[2:] or mask_ms  # the first steps fill lazy caches
    return {
        "library": library,
        "batch": batch,
        "tokenizer_setup_s": round(setup_s, 3),
        "grammar_compile_ms": round(compile_s * 1e3, 2),
        "mask_ms_mean": round(statistics.fmean(warm), 3),
        "mask_ms_p50": round(statistics.median(warm), 3),
        "mask_ms_max": round(max(warm), 3),
        "advance_ms_mean": round(statistics.fmean(advance_ms), 3),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab-size", type=int, default=152_064)
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 64])
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--libraries", nargs="+", default=["llguidance", "xgrammar"])
    parser.add_argument("--sampler", action="store_true", help="only time the Sampler (before/after comparisons)")
    parser.add_argument("--out", type=Path, default=Path("results/grammar_bench.json"))
    args = parser.parse_args(argv)

    torch.set_num_threads(1)
    if args.sampler:
        rows = [bench_sampler(args.vocab_size, batch, args.steps) for batch in args.batch]
        print(f"Sampler, vocab {args.vocab_size}, 1 torch thread, ms per step")
        for r in rows:
            print("  " + "  ".join(f"{k}={v}" for k, v in r.items()))
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"vocab_size": args.vocab_size, "steps": args.steps, "sampler": rows}, indent=2))
        return 0
    vocab = synthetic_vocab(args.vocab_size)
    eos = len(vocab) - 1
    runners = {"llguidance": bench_llguidance, "xgrammar": bench_xgrammar}
    rows = []
    for library in args.libraries:
        for batch in args.batch:
            print(f"running {library} batch={batch} steps={args.steps} ...", flush=True)
            rows.append(runners[library](vocab, eos, batch, args.steps, args.threads))
    setting = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
               "vocab_size": len(vocab), "steps": args.steps, "threads": args.threads, "schema": SCHEMA}
    print(f"\n{setting['machine']}, vocab {len(vocab)}, JSON-schema rows, {args.steps} steps, "
          f"{args.threads} threads")
    header = f"{'library':<11} {'batch':>5} {'mask ms/step':>13} {'p50':>8} {'max':>8} {'advance ms':>11} {'compile ms':>11}"
    print(header)
    for r in rows:
        print(f"{r['library']:<11} {r['batch']:>5} {r['mask_ms_mean']:>13.3f} {r['mask_ms_p50']:>8.3f} "
              f"{r['mask_ms_max']:>8.3f} {r['advance_ms_mean']:>11.3f} {r['grammar_compile_ms']:>11.2f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"setting": setting, "results": rows}, indent=2))
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
