"""`radixfleet bench calibrate`: measure the real engine's step times and fit the sim executor's cost model.

    radixfleet bench calibrate --model llama3-8b --out worker/executor/sim_profiles/h200-llama3-8b.json

Runs the real engine (CUDA by default) through three families of steps, recording every forward pass with
its shape and its device time (a synchronise before and after, overlap scheduling off so nothing else runs
on the GPU meanwhile):

* decode: B requests sharing a (C-1)-token prefix plus one distinct token each, decoding together, over a
  grid of batch sizes B and contexts C (the shared prefix is prefilled once, so the grid is cheap, and each
  decode row still attends over its full context);
* prefill: one chunk of P new tokens on top of a cached prefix of L tokens, over a grid of P and L;
* mixed: prefill chunks landing while a decode batch runs (what a serving engine mostly does).

Then it fits worker.executor.sim_cost_model by non-negative least squares, prints the fit quality (R^2, max
and mean relative error, the worst steps) and writes the profile JSON with the GPU memory the worker had
(so a sim worker's KV capacity follows --mem-fraction as on this GPU). Takes about 1-3 minutes per model
after the engine has started (the first use of a built-in model also writes its random-weight checkpoint).

`--device cpu` runs the same procedure on the CPU executor with a small grid (`--quick`): for checking the
procedure, not for a profile worth shipping.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

DECODE_BATCHES = (1, 4, 16, 32, 64, 128, 256)
DECODE_CONTEXTS = (256, 2048, 8192)
PREFILL_CHUNKS = (64, 256, 512, 1024, 2048)
PREFILL_PREFIXES = (0, 2048, 8192)
QUICK = {"decode_batches": (1, 4, 8), "decode_contexts": (64, 256), "prefill_chunks": (32, 128),
         "prefill_prefixes": (0, 128)}
DECODE_STEPS = 6  # decode steps per (B, C) cell
PREFILL_REPEATS = 3


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="built-in name or checkpoint folder (e.g. llama3-8b)")
    parser.add_argument("--out", required=True, metavar="PATH", help="where to write the profile JSON")
    parser.add_argument("--name", default=None, help="profile name (default: the --out file's stem)")
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--mem-fraction", type=float, default=0.85)
    parser.add_argument("--max-num-batched-tokens", type=int, default=2048)
    parser.add_argument("--page-size", type=int, default=16)
    parser.add_argument("--kv-cache-tokens", type=int, default=65536, help="KV budget on --device cpu")
    parser.add_argument("--quick", action="store_true", help="a small grid (for --device cpu and checks)")
    parser.add_argument("--seed", type=int, default=0)


class ForwardRecorder:
    """Wraps executor.forward: records (StepShape, device seconds) of every call."""

    def __init__(self, executor):
        import torch

        self.executor, self.torch = executor, torch
        self.samples: list[tuple] = []
        self.recording = True
        self._original = executor.forward
        executor.forward = self._timed

    def _sync(self) -> None:
        if self.executor.device.type == "cuda":
            self.torch.cuda.synchronize()

    def _timed(self, batch, future_tokens=None):
        from worker.executor.sim_cost_model import StepShape

        self._sync()
        started = time.perf_counter()
        out = self._original(batch) if future_tokens is None else self._original(batch, future_tokens)
        self._sync()
        if self.recording:
            shape = StepShape.from_lengths(batch.seq_lens, batch.extend_lens, batch.num_decodes)
            self.samples.append((shape, time.perf_counter() - started))
        return out


def _params(max_tokens: int):
    from worker.sampling_params import SamplingParams

    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)


def _drain(engine) -> None:
    while engine.has_unfinished():
        engine.step()


def _add(engine, request_id: str, ids: list[int], max_tokens: int) -> None:
    from worker.engine.protocol import EngineRequest

    engine.add_request(EngineRequest(request_id, ids, _params(max_tokens)))


def run_decode_grid(engine, rng: random.Random, vocab: int, batches, contexts, room: int) -> None:
    for context in contexts:
        prefix = [rng.randrange(vocab) for _ in range(context - 1)]
        _add(engine, f"dp{context}", prefix + [rng.randrange(vocab)], 1)  # cache the shared prefix once
        _drain(engine)
        for batch in batches:
            if batch * (DECODE_STEPS + 2) + context > room:
                continue
            for i in range(batch):
                _add(engine, f"d{context}-{batch}-{i}", prefix + [rng.randrange(vocab)], DECODE_STEPS)
            _drain(engine)


def run_prefill_grid(engine, rng: random.Random, vocab: int, chunks, prefixes, room: int) -> None:
    for prefix_len in prefixes:
        prefix = [rng.randrange(vocab) for _ in range(prefix_len)]
        if prefix:
            _add(engine, f"pp{prefix_len}", prefix, 1)
            _drain(engine)
        for chunk in chunks:
            if prefix_len + chunk + 1 > room:
                continue
            for r in range(PREFILL_REPEATS):
                _add(engine, f"p{prefix_len}-{chunk}-{r}", prefix + [rng.randrange(vocab) for _ in range(chunk)], 1)
                _drain(engine)


def run_mixed(engine, rng: random.Random, vocab: int, batch: int, context: int, chunk: int, room: int) -> None:
    """`batch` decodes of `context` tokens with fresh `chunk`-token prompts arriving every step."""
    if batch * 40 + context + 8 * chunk > room:
        return
    prefix = [rng.randrange(vocab) for _ in range(context - 1)]
    for i in range(batch):
        _add(engine, f"m{batch}-{i}", prefix + [rng.randrange(vocab)], 32)
    for step in range(24):
        if step % 3 == 0:
            _add(engine, f"mp{batch}-{step}", [rng.randrange(vocab) for _ in range(chunk)], 1)
        engine.step()
    _drain(engine)


def memory_model(executor) -> dict | None:
    """The GPU memory the worker had, as the sim executor models it (None on CPU)."""
    report = getattr(executor, "memory_report", None)
    if not report:
        return None
    gib = 1024**3
    total = report["total_gib"] * gib
    weights = report["weights_gib"] * gib
    kv = report["kv_cache_gib"] * gib
    # everything that is neither weights nor KV at this --mem-fraction: CUDA context, activations, graphs, reserve
    mem_fraction = executor.config.mem_fraction
    return {"gpu_total_bytes": int(total), "weights_bytes": int(weights),
            "reserved_bytes": int(max(total * mem_fraction - weights - kv, 0)),
            "measured_at_mem_fraction": mem_fraction, "kv_cache_tokens_measured": report.get("kv_cache_tokens")}


def worst_rows(model, samples, count: int = 5) -> list[dict]:
    rows = []
    for shape, seconds in samples:
        predicted = model.step_seconds(shape)
        rows.append({"prefill_tokens": shape.prefill_tokens, "decode_seqs": shape.decode_seqs,
                     "decode_context_tokens": shape.decode_context_tokens, "measured_ms": seconds * 1e3,
                     "predicted_ms": predicted * 1e3, "rel_error": abs(predicted - seconds) / seconds})
    return sorted(rows, key=lambda r: -r["rel_error"])[:count]


def run(args: argparse.Namespace) -> int:
    import torch

    from worker.config import EngineConfig
    from worker.engine.llm_engine import LLMEngine
    from worker.executor.sim_cost_model import fit

    if args.device == "cuda" and not torch.cuda.is_available():
        print("radixfleet bench calibrate: no CUDA GPU is visible; run it on the GPU machine "
              "(or --device cpu --quick to check the procedure)", file=sys.stderr)
        return 2
    out = Path(args.out)
    config = EngineConfig(model=args.model, device=args.device, executor=args.device, page_size=args.page_size,
                          mem_fraction=args.mem_fraction, max_num_batched_tokens=args.max_num_batched_tokens,
                          kv_cache_tokens=args.kv_cache_tokens, overlap_schedule="off", seed=args.seed)
    started = time.perf_counter()
    engine = LLMEngine(config)
    print(f"engine up in {time.perf_counter() - started:.1f} s: model {args.model}, executor {engine.executor.name}",
          flush=True)
    grid = QUICK if args.quick else {"decode_batches": DECODE_BATCHES, "decode_contexts": DECODE_CONTEXTS,
                                     "prefill_chunks": PREFILL_CHUNKS, "prefill_prefixes": PREFILL_PREFIXES}
    rng = random.Random(args.seed)
    vocab = min(engine.model_config.vocab_size, engine.tokenizer.vocab_size)
    room = engine.cache.pool.num_pages * engine.cache.page_size // 2  # leave half the pool for cached prefixes
    chunks = [c for c in grid["prefill_chunks"] if c <= args.max_num_batched_tokens]
    recorder = ForwardRecorder(engine.executor)
    recorder.recording = False  # warm-up (Triton compilation) is not a step time
    run_prefill_grid(engine, rng, vocab, chunks[:1], [0], room)
    run_decode_grid(engine, rng, vocab, grid["decode_batches"][:2], grid["decode_contexts"][:1], room)
    recorder.recording = True
    measuring = time.perf_counter()
    run_decode_grid(engine, rng, vocab, grid["decode_batches"], grid["decode_contexts"], room)
    print(f"decode grid: {len(recorder.samples)} steps", flush=True)
    run_prefill_grid(engine, rng, vocab, chunks, grid["prefill_prefixes"], room)
    print(f"+ prefill grid: {len(recorder.samples)} steps", flush=True)
    for batch in grid["decode_batches"][1:4]:
        run_mixed(engine, rng, vocab, batch, grid["decode_contexts"][0], chunks[-1] // 2, room)
    print(f"+ mixed: {len(recorder.samples)} steps, {time.perf_counter() - measuring:.1f} s measuring", flush=True)

    shapes = [shape for shape, _ in recorder.samples]
    seconds = [t for _, t in recorder.samples]
    result = fit(shapes, seconds)
    device = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    profile = {
        "name": args.name or out.stem,
        "model": args.model,
        "device": device,
        "cost_model": result.model.to_dict(),
        "fit": result.quality(),
        "measured": {"what": "executor.forward device time (synchronised), overlap off",
                     "page_size": args.page_size, "max_num_batched_tokens": args.max_num_batched_tokens,
                     "grid": {k: list(v) for k, v in grid.items()}, "command": " ".join(sys.argv),
                     "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())},
    }
    memory = memory_model(engine.executor)
    if memory is not None:
        profile["memory"] = memory
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(profile, indent=2) + "\n")
    engine.shutdown()

    print(f"\ncost model of {args.model} on {device} ({result.num_samples} steps):")
    for name, value in profile["cost_model"]["coefficients_s"].items():
        print(f"  {name:<26} {value:.4g} s")
    print(f"fit: R^2 {result.r2:.4f}, relative error max {result.max_rel_error:.1%}, "
          f"mean {result.mean_rel_error:.1%}")
    print("worst steps:")
    for row in worst_rows(result.model, recorder.samples):
        print(f"  prefill {row['prefill_tokens']:>5} decode {row['decode_seqs']:>4} (context {row['decode_context_tokens']:>8}): "
              f"measured {row['measured_ms']:.2f} ms, model {row['predicted_ms']:.2f} ms ({row['rel_error']:.0%})")
    print(f"wrote {out}")
    print(json.dumps({"profile": str(out), "fit": result.quality(),
                      "median_step_ms": statistics.median(seconds) * 1e3}))
    return 0
