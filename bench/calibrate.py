"""`radixfleet bench calibrate`: measure the real engine's step times and fit the sim executor's cost model.

On the GPU machine (one H200; llama3-8b with random weights of its shape):

    radixfleet bench calibrate --model llama3-8b --out worker/executor/sim_profiles/h200-llama3-8b.json

Expected duration there: the engine start (on a fresh machine the first use of `llama3-8b` also writes its
16 GB random-weight checkpoint, about 1-2 minutes; pass `--model /tmp/ckpt/llama3-8b-seed0-gpu` or whatever
folder the fleet run already wrote to skip that; a start from an existing checkpoint loads it and captures
the decode CUDA graphs in ~20-40 s), then the measuring: about 60 warm-up steps and 330 measured ones
(138 decode/admit, 77 prefill, 116 doc-QA), which the shipped linear-v1 profile prices at ~7 s of GPU time
(more with the eager steps' ~10 ms each: ~10 s), plus the engine's host time per step: well under a
minute. `--budget-s` (120 s by default) stops it starting new grid cells past that and names the ones it
skipped. In all about 60-100 s from an existing checkpoint, under the 150 s asked for.

Offline, anywhere (no GPU, no engine): refit a profile from the raw samples it stores, e.g. after a change
to the cost model's form:

    radixfleet bench calibrate --refit worker/executor/sim_profiles/h200-llama3-8b.json [--out NEW.json]

Runs the real engine through these families of steps, recording every forward pass with its shape and its
device time (a synchronise before and after, overlap scheduling off so nothing else runs on the GPU):

* decode: B requests sharing a (C-1)-token prefix plus one distinct token each, decoding together, over a
  grid of batch sizes B and contexts C (the shared prefix is prefilled once, so the grid is cheap, and each
  decode row still attends over its full context); their admission steps (B chunks of a few tokens each
  over the cached prefix) are recorded as "admit";
* prefill: one chunk of P new tokens on top of a cached prefix of L tokens, over a grid of P (from 16
  tokens: small prefill-only steps pay the eager step's fixed cost) and L;
* document: the doc-QA fleet's miss, a fresh ~3.5k-token document prefilled in 2048-token chunks beside
  B decodes (B in 0, 8, 16, 32, 64);
* question: the doc-QA fleet's hit, k questions of ~30 tokens on a cached document beside B decodes;
* mixed: a fresh document and two questions arriving together beside B decodes.

Then it fits worker.executor.sim_cost_model (form "eager-v2") by non-negative least squares, prints the
fit quality (R^2, relative error overall and per family, the worst steps) and writes the profile JSON with
the raw samples and the GPU memory the worker had (so a sim worker's KV capacity follows --mem-fraction as
on this GPU).

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

FULL = {
    "decode_batches": (1, 4, 16, 32, 64, 128, 256),
    "decode_contexts": (256, 2048, 8192),
    "prefill_chunks": (16, 32, 64, 128, 256, 512, 1024, 2048),
    "prefill_prefixes": (0, 2048, 8192),
    # doc-QA sizes (bench fleet --workload docqa --doc-chars 16000: ~3.5k-token documents, ~30-token questions)
    "document_tokens": 3500,
    "question_tokens": 30,
    "docqa_decodes": (0, 8, 16, 32, 64),
    "questions_per_step": (1, 2, 4, 8),
}
QUICK = {"decode_batches": (1, 4, 8), "decode_contexts": (64, 256), "prefill_chunks": (16, 32, 128),
         "prefill_prefixes": (0, 128), "document_tokens": 200, "question_tokens": 10, "docqa_decodes": (0, 4),
         "questions_per_step": (1, 3)}
DECODE_STEPS = 6  # decode steps per (B, C) cell
PREFILL_REPEATS = 3
DOCUMENTS_PER_CELL = 3  # fresh documents prefilled per decode batch size
QUESTION_REPEATS = 3  # rounds of k questions per (B, k)
MIXED_QUESTIONS = 2  # questions that arrive with a fresh document, per "mixed" round


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", help="built-in name or checkpoint folder (e.g. llama3-8b)")
    parser.add_argument("--out", metavar="PATH", help="where to write the profile JSON (with --refit: default "
                        "the refitted file itself)")
    parser.add_argument("--refit", metavar="PROFILE", help="no engine: refit PROFILE's stored raw samples")
    from worker.executor.sim_cost_model import FORM, FORMS

    parser.add_argument("--form", default=FORM, choices=sorted(FORMS),
                        help=f"cost model form to fit (default {FORM}; see worker/executor/sim_cost_model.py)")
    parser.add_argument("--name", default=None, help="profile name (default: the --out file's stem)")
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--mem-fraction", type=float, default=0.85)
    parser.add_argument("--max-num-batched-tokens", type=int, default=2048)
    parser.add_argument("--page-size", type=int, default=16)
    parser.add_argument("--kv-cache-tokens", type=int, default=65536, help="KV budget on --device cpu")
    parser.add_argument("--quick", action="store_true", help="a small grid (for --device cpu and checks)")
    parser.add_argument("--budget-s", type=float, default=120.0,
                        help="stop measuring new grid cells after this many seconds (default 120)")
    parser.add_argument("--seed", type=int, default=0)


class ForwardRecorder:
    """Wraps executor.forward: records a StepSample (shape, device seconds, grid family) of every call."""

    def __init__(self, executor):
        import torch

        self.executor, self.torch = executor, torch
        self.samples: list = []
        self.recording = True
        self.family = ""
        self._original = executor.forward
        executor.forward = self._timed

    def _sync(self) -> None:
        if self.executor.device.type == "cuda":
            self.torch.cuda.synchronize()

    def _timed(self, batch, future_tokens=None):
        from worker.executor.sim_cost_model import StepSample

        self._sync()
        started = time.perf_counter()
        out = self._original(batch) if future_tokens is None else self._original(batch, future_tokens)
        self._sync()
        if self.recording:
            seconds = time.perf_counter() - started
            self.samples.append(StepSample.from_lengths(list(batch.seq_lens), list(batch.extend_lens),
                                                        batch.num_decodes, seconds, self.family))
        return out


class Grid:
    """Drives the engine through the calibration families. Every family checks the time budget between
    cells, so a slow device ends with fewer cells (named in `skipped`) rather than an overrun."""

    def __init__(self, engine, recorder: ForwardRecorder, seed: int, room: int, budget_s: float):
        self.engine, self.recorder, self.room = engine, recorder, room
        self.rng = random.Random(seed)
        self.vocab = min(engine.model_config.vocab_size, engine.tokenizer.vocab_size)
        self.deadline = time.perf_counter() + budget_s
        self.skipped: list[str] = []
        self._ids = 0

    # ------------------------------------------------------------------ helpers
    def tokens(self, n: int) -> list[int]:
        return [self.rng.randrange(self.vocab) for _ in range(n)]

    def add(self, ids: list[int], max_tokens: int) -> None:
        from worker.engine.protocol import EngineRequest
        from worker.sampling_params import SamplingParams

        self._ids += 1
        params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
        self.engine.add_request(EngineRequest(f"cal-{self._ids}", ids, params))

    def drain(self) -> None:
        while self.engine.has_unfinished():
            self.engine.step()

    def cache(self, ids: list[int]) -> None:
        """Prefill `ids` once (family "cache": long prompts in 2048-token chunks), so later prompts find them cached."""
        family, self.recorder.family = self.recorder.family, "cache"
        self.add(ids, 1)
        self.drain()
        self.recorder.family = family

    def settle(self, limit: int = 64) -> None:
        """Step until nothing waits and every running sequence is decoding (prefills done)."""
        scheduler = self.engine.scheduler
        for _ in range(limit):
            if not scheduler.waiting and all(seq.is_decoding for seq in scheduler.running):
                return
            self.engine.step()

    def over_budget(self, cell: str) -> bool:
        if time.perf_counter() > self.deadline:
            self.skipped.append(cell)
            return True
        return False

    def start_decodes(self, batch: int, context_ids: list[int], max_tokens: int) -> None:
        """`batch` decoding requests over the cached `context_ids` plus one distinct token each."""
        self.recorder.family = "admit"
        for _ in range(batch):
            self.add(context_ids + self.tokens(1), max_tokens)
        self.settle()

    # ------------------------------------------------------------------ families
    def decode(self, batches, contexts) -> None:
        for context in contexts:
            prefix = self.tokens(context - 1)
            self.cache(prefix)
            for batch in batches:
                if batch * (DECODE_STEPS + 2) + context > self.room:
                    continue
                if self.over_budget(f"decode B={batch} C={context}"):
                    continue
                self.start_decodes(batch, prefix, DECODE_STEPS)
                self.recorder.family = "decode"
                self.drain()

    def prefill(self, chunks, prefixes) -> None:
        for prefix_len in prefixes:
            prefix = self.tokens(prefix_len)
            if prefix:
                self.cache(prefix)
            for chunk in chunks:
                if prefix_len + chunk + 1 > self.room or self.over_budget(f"prefill P={chunk} L={prefix_len}"):
                    continue
                self.recorder.family = "prefill"
                for _ in range(PREFILL_REPEATS):
                    self.add(prefix + self.tokens(chunk), 1)
                    self.drain()

    def docqa(self, decodes, document_tokens: int, question_tokens: int, questions_per_step) -> None:
        """Documents (misses) and questions on a cached document (hits) beside B decodes."""
        document = self.tokens(document_tokens)
        self.cache(document)
        # steps the decodes must outlast: documents (2 chunks each), question rounds, mixed rounds
        rounds = DOCUMENTS_PER_CELL * 2 + len(questions_per_step) * QUESTION_REPEATS + 2 * 2
        for batch in decodes:
            if batch * (rounds + 8) + 2 * document_tokens * (DOCUMENTS_PER_CELL + 1) > self.room:
                continue
            if self.over_budget(f"docqa B={batch}"):
                continue
            # the decodes read a document-sized context, as the fleet's answers do
            self.start_decodes(batch, document, 4 * rounds + 8)
            self.recorder.family = "document"
            for _ in range(DOCUMENTS_PER_CELL):
                self.add(self.tokens(document_tokens), 1)
                self.settle()
            self.recorder.family = "question"
            for k in questions_per_step:
                for _ in range(QUESTION_REPEATS):
                    for _ in range(k):
                        self.add(document + self.tokens(question_tokens), 1)
                    self.settle()
            self.recorder.family = "mixed"  # a miss and hits in the same steps, as a busy worker sees them
            for _ in range(2):
                self.add(self.tokens(document_tokens), 1)
                for _ in range(MIXED_QUESTIONS):
                    self.add(document + self.tokens(question_tokens), 1)
                self.settle()
            self.recorder.family = "decode"
            for seq in list(self.engine.scheduler.running):  # the rest of the decode is not needed
                self.engine.abort_request(seq.request_id)
            self.drain()


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
    for sample in samples:
        shape = sample.shape
        predicted = model.step_seconds(shape)
        rows.append({"family": sample.family, "prefill_tokens": shape.prefill_tokens,
                     "prefill_chunks": shape.prefill_chunks, "decode_seqs": shape.decode_seqs,
                     "decode_context_tokens": shape.decode_context_tokens, "measured_ms": sample.seconds * 1e3,
                     "predicted_ms": predicted * 1e3, "rel_error": abs(predicted - sample.seconds) / sample.seconds})
    return sorted(rows, key=lambda r: -r["rel_error"])[:count]


def profile_json(profile: dict) -> str:
    """Indented JSON, with one line per raw sample (a profile holds hundreds)."""
    rest = {k: v for k, v in profile.items() if k != "samples"}
    text = json.dumps(rest, indent=2)
    samples = profile.get("samples")
    if not samples:
        return text + "\n"
    lines = ",\n".join("    " + json.dumps(s, separators=(",", ":")) for s in samples)
    return text[:-2] + ',\n  "samples": [\n' + lines + "\n  ]\n}\n"


def report(profile: dict, result, samples, dropped, out: Path) -> None:
    from worker.executor.sim_cost_model import OUTLIER_RATIO

    model = result.model
    print(f"\ncost model ({model.form}) of {profile.get('model')} on {profile.get('device')} "
          f"({result.num_samples} steps):")
    for name, value in zip(model.features, model.coefficients):
        print(f"  {name:<26} {value:.4g} s")
    print(f"fit: R^2 {result.r2:.4f}, relative error max {result.max_rel_error:.1%}, "
          f"mean {result.mean_rel_error:.1%}")
    for family, row in result.by_family.items():
        print(f"  {family:<10} {row['steps']:>4} steps: mean {row['mean_rel_error']:.1%}, "
              f"max {row['max_rel_error']:.1%}")
    if dropped:
        print(f"left out of the fit: {len(dropped)} step(s) over {OUTLIER_RATIO:g}x their prediction (stalls such as a JIT "
              f"compile): {', '.join(f'{s.family} {s.seconds * 1e3:.0f} ms' for s in dropped[:8])}")
    print("worst steps:")
    dropped_ids = {id(s) for s in dropped}
    for row in worst_rows(model, [s for s in samples if id(s) not in dropped_ids]):
        print(f"  {row['family']:<9} prefill {row['prefill_tokens']:>5} in {row['prefill_chunks']:>2} chunk(s), "
              f"decode {row['decode_seqs']:>4} (context {row['decode_context_tokens']:>8}): "
              f"measured {row['measured_ms']:.2f} ms, model {row['predicted_ms']:.2f} ms ({row['rel_error']:.0%})")
    print(f"wrote {out}")
    print(json.dumps({"profile": str(out), "fit": result.quality(),
                      "median_step_ms": statistics.median(s.seconds for s in samples) * 1e3}))


def refit(args: argparse.Namespace) -> int:
    from worker.executor.sim_cost_model import StepSample, fit_samples

    source = Path(args.refit)
    try:
        profile = json.loads(source.read_text())
        raw = profile["samples"]
        samples = [StepSample.from_dict(s) for s in raw]
    except (OSError, json.JSONDecodeError) as error:
        print(f"radixfleet bench calibrate: --refit {source}: not readable JSON ({error})", file=sys.stderr)
        return 2
    except (KeyError, TypeError):
        print(f"radixfleet bench calibrate: --refit {source} holds no raw 'samples' (profiles written before "
              "samples were stored cannot be refitted); run `bench calibrate` on the GPU again", file=sys.stderr)
        return 2
    except ValueError as error:
        print(f"radixfleet bench calibrate: --refit {source}: {error}", file=sys.stderr)
        return 2
    try:
        result, dropped = fit_samples(samples, args.form)
    except ValueError as error:
        print(f"radixfleet bench calibrate: --refit {source}: {error}", file=sys.stderr)
        return 2
    out = Path(args.out) if args.out else source
    profile["cost_model"] = result.model.to_dict()
    profile["fit"] = dict(result.quality(), outliers_dropped=len(dropped))
    if args.name:
        profile["name"] = args.name
    profile.setdefault("measured", {})["refit"] = {"from": str(source), "command": " ".join(sys.argv),
                                                   "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(profile_json(profile))
    report(profile, result, samples, dropped, out)
    return 0


def run(args: argparse.Namespace) -> int:
    if args.refit:
        return refit(args)
    if not args.model or not args.out:
        print("radixfleet bench calibrate: give --model M --out PATH to measure, or --refit PROFILE.json",
              file=sys.stderr)
        return 2
    import torch

    from worker.config import EngineConfig
    from worker.engine.llm_engine import LLMEngine
    from worker.executor.sim_cost_model import fit_samples

    form = args.form
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
    grid = QUICK if args.quick else FULL
    room = engine.cache.pool.num_pages * engine.cache.page_size // 2  # leave half the pool for cached prefixes
    chunks = [c for c in grid["prefill_chunks"] if c <= args.max_num_batched_tokens]
    recorder = ForwardRecorder(engine.executor)
    recorder.recording = False  # warm-up (Triton compilation, both eager and graphed paths) is not a step time
    warm = Grid(engine, recorder, args.seed + 1, room, budget_s=float("inf"))
    warm.prefill(chunks[:1] + chunks[-1:], [0])
    warm.decode(grid["decode_batches"][:2], grid["decode_contexts"][:1])
    warm.docqa(grid["docqa_decodes"][1:2], grid["document_tokens"], grid["question_tokens"],
               grid["questions_per_step"][-1:])
    recorder.recording = True
    measuring = time.perf_counter()
    cells = Grid(engine, recorder, args.seed, room, args.budget_s)
    cells.decode(grid["decode_batches"], grid["decode_contexts"])
    print(f"decode grid: {len(recorder.samples)} steps, {time.perf_counter() - measuring:.1f} s", flush=True)
    cells.prefill(chunks, grid["prefill_prefixes"])
    print(f"+ prefill grid: {len(recorder.samples)} steps, {time.perf_counter() - measuring:.1f} s", flush=True)
    cells.docqa(grid["docqa_decodes"], grid["document_tokens"], grid["question_tokens"], grid["questions_per_step"])
    print(f"+ doc-QA documents and questions: {len(recorder.samples)} steps, "
          f"{time.perf_counter() - measuring:.1f} s measuring", flush=True)
    if cells.skipped:
        print(f"--budget-s {args.budget_s:g} reached: skipped {len(cells.skipped)} cell(s): "
              f"{', '.join(cells.skipped)}", flush=True)
    samples = recorder.samples
    result, dropped = fit_samples(samples, form)
    device = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    profile = {
        "name": args.name or out.stem,
        "model": args.model,
        "device": device,
        "cost_model": result.model.to_dict(),
        "fit": dict(result.quality(), outliers_dropped=len(dropped)),
        "measured": {"what": "executor.forward device time (synchronised), overlap off",
                     "page_size": args.page_size, "max_num_batched_tokens": args.max_num_batched_tokens,
                     "grid": {k: list(v) if isinstance(v, tuple) else v for k, v in grid.items()},
                     "skipped_cells": cells.skipped, "measuring_s": round(time.perf_counter() - measuring, 1),
                     "command": " ".join(sys.argv), "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())},
    }
    memory = memory_model(engine.executor)
    if memory is not None:
        profile["memory"] = memory
    profile["samples"] = [s.to_dict() for s in samples]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(profile_json(profile))
    engine.shutdown()
    report(profile, result, samples, dropped, out)
    return 0
