"""Piecewise CUDA graphs vs eager: one mixed step (decodes + a prefill chunk) of T tokens, per T.

    python -m bench.piecewise_graphs_bench --model qwen3-0.6b [--tokens 64,256,512,1024,2048]
        [--decodes 32] [--context 1024] [--iters 50] [--json out.json]

One CUDA executor, its piecewise graphs captured up to the largest T; each step runs `--decodes` decode
rows over `--context` cached tokens each plus one chunk of T - decodes new tokens over a cached prefix of
the same length, the way the scheduler mixes them. `forward` (piecewise graph replay) is timed against
`forward_eager` on the very same batch (see `time_steps` for the three figures: GPU time, host time to
issue a step, and back-to-back wall time per step).
--model: a checkpoint folder or a built-in preset (written once with random weights on the GPU under
--checkpoint-dir, as the other engine benchmarks do: bench.engine_bench.resolve_checkpoint).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

PAGE_SIZE = 16


def mixed_step(tokens: int, decodes: int, context: int):
    """`decodes` decode rows of `context` tokens, then a chunk of tokens - decodes over a `context` prefix;
    and the pages it uses. Pages are consecutive from 1 (their contents do not matter for timing)."""
    from worker.engine.forward_batch import ForwardBatch

    decodes = min(decodes, tokens - 1)
    chunk = tokens - decodes
    seq_lens = [context + 1] * decodes + [context + chunk]
    extend_lens = [1] * decodes + [chunk]
    pages_per_seq = [-(-s // PAGE_SIZE) for s in seq_lens]
    width = max(pages_per_seq)
    page_tables = torch.zeros(len(seq_lens), width, dtype=torch.int32)
    positions, slots, page = [], [], 1
    for row, (seq_len, extend, n_pages) in enumerate(zip(seq_lens, extend_lens, pages_per_seq)):
        pages = torch.arange(page, page + n_pages, dtype=torch.int32)
        page_tables[row, :n_pages] = pages
        page += n_pages
        pos = torch.arange(seq_len - extend, seq_len, dtype=torch.int64)
        positions.append(pos)
        slots.append(pages[pos // PAGE_SIZE].to(torch.int64) * PAGE_SIZE + pos % PAGE_SIZE)
    positions = torch.cat(positions)
    batch = ForwardBatch(
        input_ids=torch.randint(0, 1000, (tokens,), dtype=torch.int64),
        positions=positions,
        out_slots=torch.cat(slots),
        page_tables=page_tables,
        seq_lens=seq_lens,
        extend_lens=extend_lens,
        logits_indices=torch.tensor(extend_lens, dtype=torch.int64).cumsum(0) - 1,
        num_decodes=decodes,
        page_size=PAGE_SIZE,
    )
    return batch, page


def time_steps(forward, batch, iters: int) -> dict[str, float]:
    """Milliseconds per step: `gpu` (CUDA events over back-to-back steps), `host` (median wall time to issue
    one step onto an idle GPU: what Python and the launches cost) and `wall` (back-to-back steps: the step
    rate one stream sustains, about max(gpu, host))."""
    for _ in range(3):
        forward(batch)
    torch.cuda.synchronize()
    issue = []
    for _ in range(min(iters, 20)):
        torch.cuda.synchronize()
        began = time.perf_counter()
        forward(batch)
        issue.append((time.perf_counter() - began) * 1e3)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    began = time.perf_counter()
    start.record()
    for _ in range(iters):
        forward(batch)
    end.record()
    end.synchronize()
    wall = (time.perf_counter() - began) / iters * 1e3
    return {"gpu": start.elapsed_time(end) / iters, "host": sorted(issue)[len(issue) // 2], "wall": wall}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="qwen3-0.6b", help="a checkpoint folder or a built-in preset")
    parser.add_argument("--checkpoint-dir", default=None, help="where preset checkpoints are written")
    parser.add_argument("--tokens", default="64,256,512,1024,2048", help="comma-separated step sizes T")
    parser.add_argument("--decodes", type=int, default=32, help="decode rows in each step")
    parser.add_argument("--context", type=int, default=1024, help="cached tokens of each row")
    parser.add_argument("--iters", type=int, default=50)
    parser.add_argument("--json", default=None, help="write the results here")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("piecewise_graphs_bench needs a CUDA GPU", file=sys.stderr)
        return 2
    sizes = sorted({int(t) for t in args.tokens.split(",")})

    from bench.engine_bench import resolve_checkpoint
    from worker.config import EngineConfig
    from worker.executor.cuda import CUDAExecutor

    folder = resolve_checkpoint(args.model, args.checkpoint_dir)
    config = EngineConfig(model=str(folder), device="cuda", progress=True, max_num_batched_tokens=max(sizes),
                          piecewise_cuda_graph_max_tokens=max(sizes), cuda_graph_max_bs=8)
    started = time.perf_counter()
    executor = CUDAExecutor(folder, config)
    steps = [mixed_step(tokens, args.decodes, args.context) for tokens in sizes]  # all from page 1
    executor.init_kv_cache(max(pages for _, pages in steps), PAGE_SIZE)
    startup_s = time.perf_counter() - started
    runner = executor.piecewise
    rows = []
    for tokens, (batch, _) in zip(sizes, steps):
        assert runner.can_run(batch)
        eager = time_steps(executor.forward_eager, batch, args.iters)
        graphs = time_steps(executor.forward, batch, args.iters)
        rows.append({"tokens": tokens, "bucket": next(b for b in runner.buckets if b >= tokens),
                     "decodes": batch.num_decodes, **{f"eager_{k}_ms": v for k, v in eager.items()},
                     **{f"piecewise_{k}_ms": v for k, v in graphs.items()},
                     "speedup": eager["wall"] / graphs["wall"]})
    gpu = torch.cuda.get_device_name()
    cfg = executor.model_config
    print(f"piecewise CUDA graphs vs eager: {args.model} ({cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}), "
          f"{gpu}, mixed steps of {args.decodes} decodes (context {args.context}) + one chunk, {args.iters} iters; "
          f"{runner.num_graphs} graphs, {executor.memory_report.get('piecewise_graph_memory_gib', 0):.3f} GiB, "
          f"executor start-up {startup_s:.1f} s")
    print(f"{'T':>6} {'bucket':>6} | {'eager gpu':>9} {'host':>7} {'wall':>7} | {'graph gpu':>9} {'host':>7} "
          f"{'wall':>7} | {'x':>5}")
    for r in rows:
        print(f"{r['tokens']:>6} {r['bucket']:>6} | {r['eager_gpu_ms']:>9.3f} {r['eager_host_ms']:>7.3f} "
              f"{r['eager_wall_ms']:>7.3f} | {r['piecewise_gpu_ms']:>9.3f} {r['piecewise_host_ms']:>7.3f} "
              f"{r['piecewise_wall_ms']:>7.3f} | {r['speedup']:>5.2f}")
    print("ms per step. gpu: CUDA events, steps back to back; host: time to issue one step onto an idle GPU; "
          "wall: back-to-back steps; x = eager wall / piecewise wall")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "model": args.model, "gpu": gpu, "decodes": args.decodes, "context": args.context, "iters": args.iters,
            "num_graphs": runner.num_graphs, "startup_s": startup_s, "memory_report": executor.memory_report,
            "rows": rows}, indent=2))
    executor.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
