"""Kernel benchmark: Triton paged decode / extend attention vs. torch SDPA on dense tensors.

    python -m bench.kernel_bench [--page-size 16] [--quick] [--sweep] [--json out.json]

Shapes are Llama-3-8B's attention (32 query heads, 8 KV heads, head_dim 128, bf16). Decode runs every
(batch, context) pair with all sequences at that context; its bytes are the K/V it must read (plus q and
out), so bytes / time is the achieved HBM bandwidth, printed beside the bandwidth of a plain
device-to-device copy measured in the same run. Decode is timed as CUDA-graph replays (as the engine
runs it), rotating over enough input copies that nothing is served from L2. Extend reports TFLOP/s (causal FLOPs only). The SDPA
baseline gets the same problem as contiguous, unpaged tensors (decode: the GQA group as the query
length, so the flash backend serves it).
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys

import torch
import torch.nn.functional as F

HEADS, KV_HEADS, HEAD_DIM = 32, 8, 128
DTYPE = torch.bfloat16


def bench_ms(fn) -> float:
    """Median time of fn in milliseconds, with CUDA events (triton.testing.do_bench)."""
    import triton.testing

    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def copy_bandwidth_gbs() -> float:
    """Device-to-device copy of 2 GiB, counting bytes read plus written: the practical HBM ceiling."""
    src = torch.empty(2**30, dtype=torch.float16, device="cuda").normal_()
    dst = torch.empty_like(src)
    ms = bench_ms(lambda: dst.copy_(src))
    del src, dst
    return 2 * 2**31 / ms / 1e6


def graph_bench_ms(fns) -> float:
    """Median ms per call of `fns` run round-robin, each captured in its own CUDA graph.

    Graphs take the launch overhead out (the engine replays decode in graphs too), and rotating over
    several input copies keeps small problems from being served out of L2.
    """
    for fn in fns:  # compile and warm up outside capture
        fn()
    torch.cuda.synchronize()
    graphs = []
    for fn in fns:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        graphs.append(graph)
    counter = itertools.count()
    return bench_ms(lambda: graphs[next(counter) % len(graphs)].replay())


def l2_bytes() -> int:
    return getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 64 * 2**20)


def decode_case(batch: int, context: int, page_size: int):
    from kernels.triton_testing import make_case

    return make_case(
        [context] * batch, [1] * batch, num_decodes=batch, page_size=page_size,
        num_heads=HEADS, num_kv_heads=KV_HEADS, head_dim=HEAD_DIM, dtype=DTYPE, device="cuda",
    )


def bench_decode(batches, contexts, page_size: int, configs=None):
    from kernels import triton_ops
    from kernels.triton_attention_decode import decode_attention

    rows = []
    for context in contexts:
        for batch in batches:
            torch.manual_seed(0)
            kv_bytes = batch * context * KV_HEADS * HEAD_DIM * 2 * DTYPE.itemsize
            copies = max(1, min(16, -(-4 * l2_bytes() // kv_bytes)))  # inputs >= 4x L2 in all
            cases = [decode_case(batch, context, page_size) for _ in range(copies)]
            outs = [torch.empty_like(c.q) for c in cases]
            io_bytes = kv_bytes + 2 * cases[0].q.numel() * DTYPE.itemsize
            row = {"batch": batch, "context": context, "page_size": page_size, "bytes": io_bytes, "copies": copies}
            row["triton_ms"] = graph_bench_ms([
                lambda c=c, o=o: triton_ops.paged_attention_into(o, c.q, c.k_cache, c.v_cache, c.meta, c.scale)
                for c, o in zip(cases, outs)
            ])
            for name, cfg in (configs or {}).items():
                row[f"cfg:{name}"] = graph_bench_ms([
                    lambda c=c, o=o, cfg=cfg: decode_attention(
                        c.q, c.k_cache, c.v_cache, c.meta.page_tables, c.meta.seq_lens, page_size, c.scale, o,
                        config=cfg,
                    )
                    for c, o in zip(cases, outs)
                ])
            del cases, outs
            # SDPA baseline on dense [B, KH, S, D] K/V; the group's query heads become the query axis.
            dense = [
                (
                    torch.randn(batch, KV_HEADS, HEADS // KV_HEADS, HEAD_DIM, device="cuda", dtype=DTYPE),
                    torch.randn(batch, KV_HEADS, context, HEAD_DIM, device="cuda", dtype=DTYPE),
                    torch.randn(batch, KV_HEADS, context, HEAD_DIM, device="cuda", dtype=DTYPE),
                )
                for _ in range(copies)
            ]
            row["sdpa_ms"] = graph_bench_ms([lambda t=t: F.scaled_dot_product_attention(*t) for t in dense])
            del dense
            torch.cuda.empty_cache()
            rows.append(row)
            print(f"  decode batch {batch:4d} ctx {context:5d}: triton {row['triton_ms']:.3f} ms, "
                  f"sdpa {row['sdpa_ms']:.3f} ms", file=sys.stderr, flush=True)
    return rows


def causal_flops(extend: int, prefix: int) -> float:
    visible = extend * prefix + extend * (extend + 1) / 2
    return 4 * HEADS * HEAD_DIM * visible


def bench_extend(cases, page_size: int, configs=None):
    from kernels import triton_ops
    from kernels.triton_attention_extend import extend_attention
    from kernels.triton_testing import make_case

    rows = []
    for batch, extend, prefix in cases:
        torch.manual_seed(0)
        case = make_case(
            [prefix + extend] * batch, [extend] * batch, num_decodes=0, page_size=page_size,
            num_heads=HEADS, num_kv_heads=KV_HEADS, head_dim=HEAD_DIM, dtype=DTYPE, device="cuda",
        )
        m = case.meta
        out = torch.empty_like(case.q)
        flops = batch * causal_flops(extend, prefix)
        row = {"batch": batch, "extend": extend, "prefix": prefix, "page_size": page_size, "flops": flops}
        row["triton_ms"] = bench_ms(
            lambda: triton_ops.paged_attention_into(out, case.q, case.k_cache, case.v_cache, m, case.scale)
        )
        for name, cfg in (configs or {}).items():
            row[f"cfg:{name}"] = bench_ms(
                lambda cfg=cfg: extend_attention(
                    case.q, case.k_cache, case.v_cache, m.page_tables, m.seq_lens, m.extend_lens, m.extend_starts,
                    page_size, extend, case.scale, out, config=cfg,
                )
            )
        del case
        q = torch.randn(batch, HEADS, extend, HEAD_DIM, device="cuda", dtype=DTYPE)
        k = torch.randn(batch, KV_HEADS, prefix + extend, HEAD_DIM, device="cuda", dtype=DTYPE)
        v = torch.randn_like(k)
        if prefix == 0:
            row["sdpa_ms"] = bench_ms(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True))
        else:  # bottom-right aligned causal mask: query i sees keys <= prefix + i
            mask = torch.ones(extend, prefix + extend, device="cuda", dtype=torch.bool).tril(diagonal=prefix)
            row["sdpa_ms"] = bench_ms(lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True))
        del q, k, v
        torch.cuda.empty_cache()
        rows.append(row)
        print(f"  extend batch {batch} ext {extend} prefix {prefix}: triton {row['triton_ms']:.3f} ms, "
              f"sdpa {row['sdpa_ms']:.3f} ms", file=sys.stderr, flush=True)
    return rows


def eager_call_us() -> dict[str, float]:
    """Wall-clock microseconds per eager call at batch 1 (launch overhead dominates: what graphs remove)."""
    import time

    from kernels import triton_ops

    torch.manual_seed(0)
    case = decode_case(1, 1024, 16)
    out = torch.empty_like(case.q)
    x = torch.randn(1, 4096, device="cuda", dtype=DTYPE)
    w = torch.ones(4096, device="cuda", dtype=DTYPE)
    qkv = torch.randn(1, HEADS + 2 * KV_HEADS, HEAD_DIM, device="cuda", dtype=DTYPE)
    q, k, v = qkv[:, :HEADS], qkv[:, HEADS : HEADS + KV_HEADS], qkv[:, HEADS + KV_HEADS :]
    rope = triton_ops.build_rope_cache(HEAD_DIM, 4096, 500000.0, device="cuda")
    positions = torch.zeros(1, dtype=torch.int64, device="cuda")
    gate_up = torch.randn(1, 2 * 14336, device="cuda", dtype=DTYPE)
    slots = torch.zeros(1, dtype=torch.int64, device="cuda")
    calls = {
        "paged_attention (decode)": lambda: triton_ops.paged_attention_into(
            out, case.q, case.k_cache, case.v_cache, case.meta, case.scale),
        "rms_norm + residual": lambda: triton_ops.rms_norm(x, w, 1e-5, x),
        "apply_rope": lambda: triton_ops.apply_rope(q, k, positions, rope),
        "silu_and_mul": lambda: triton_ops.silu_and_mul(gate_up),
        "write_kv": lambda: triton_ops.write_kv(case.k_cache, case.v_cache, k, v, slots),
    }
    result = {}
    for name, fn in calls.items():
        for _ in range(20):
            fn()
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(500):
            fn()
        torch.cuda.synchronize()
        result[name] = (time.perf_counter() - start) / 500 * 1e6
    return result


def print_tables(decode_rows, extend_rows, copy_gbs: float, gpu: str):
    print(f"\nGPU: {gpu}; torch {torch.__version__}; shapes: {HEADS} q heads, {KV_HEADS} kv heads, "
          f"head_dim {HEAD_DIM}, {DTYPE}; copy bandwidth (read+write) {copy_gbs:.0f} GB/s")
    print("\nDecode attention (one token per sequence, all at `ctx`), paged Triton vs dense SDPA")
    cfg_names = sorted({k for r in decode_rows for k in r if k.startswith("cfg:")})
    head = f"{'batch':>5} {'ctx':>5} {'page':>4} {'triton ms':>9} {'GB/s':>6} {'%copy':>5} {'sdpa ms':>8} {'GB/s':>6} {'speedup':>7}"
    print(head + "".join(f" {n[4:]:>14}" for n in cfg_names))
    for r in decode_rows:
        tri_bw = r["bytes"] / r["triton_ms"] / 1e6
        sdpa_bw = r["bytes"] / r["sdpa_ms"] / 1e6
        line = (f"{r['batch']:>5} {r['context']:>5} {r['page_size']:>4} {r['triton_ms']:>9.3f} {tri_bw:>6.0f} "
                f"{100 * tri_bw / copy_gbs:>5.0f} {r['sdpa_ms']:>8.3f} {sdpa_bw:>6.0f} {r['sdpa_ms'] / r['triton_ms']:>6.2f}x")
        print(line + "".join(f" {r[n]:>14.3f}" for n in cfg_names))
    print("\nExtend attention (causal new tokens over a cached prefix), paged Triton vs dense SDPA")
    cfg_names = sorted({k for r in extend_rows for k in r if k.startswith("cfg:")})
    head = f"{'batch':>5} {'extend':>6} {'prefix':>6} {'triton ms':>9} {'TFLOP/s':>7} {'sdpa ms':>8} {'TFLOP/s':>7} {'speedup':>7}"
    print(head + "".join(f" {n[4:]:>14}" for n in cfg_names))
    for r in extend_rows:
        line = (f"{r['batch']:>5} {r['extend']:>6} {r['prefix']:>6} {r['triton_ms']:>9.3f} "
                f"{r['flops'] / r['triton_ms'] / 1e9:>7.0f} {r['sdpa_ms']:>8.3f} {r['flops'] / r['sdpa_ms'] / 1e9:>7.0f} "
                f"{r['sdpa_ms'] / r['triton_ms']:>6.2f}x")
        print(line + "".join(f" {r[n]:>14.3f}" for n in cfg_names))


def sweep_configs():
    from kernels.triton_attention_decode import DecodeConfig
    from kernels.triton_attention_extend import ExtendConfig

    decode = {
        "n64w4s2": DecodeConfig(64, 4, 2),
        "n64w4s4": DecodeConfig(64, 4, 4),
        "n128w4s3": DecodeConfig(128, 4, 3),
        "n32w4s4": DecodeConfig(32, 4, 4),
    }
    extend = {
        "m128n128w8s2": ExtendConfig(128, 128, 8, 2),
        "m64n128w4s2": ExtendConfig(64, 128, 4, 2),
        "m128n64w4s2": ExtendConfig(128, 64, 4, 2),
        "m64n64w4s4": ExtendConfig(64, 64, 4, 4),
        "m64n32w4s3": ExtendConfig(64, 32, 4, 3),
    }
    return decode, extend


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--page-size", type=int, default=16)
    parser.add_argument("--quick", action="store_true", help="fewer sizes")
    parser.add_argument("--decode-only", action="store_true", help="skip the extend table")
    parser.add_argument("--sweep", action="store_true", help="also time alternative launch configs")
    parser.add_argument("--json", help="write all figures to this file")


def run(args: argparse.Namespace) -> int:
    if not torch.cuda.is_available():
        sys.exit("kernel_bench needs a CUDA GPU (the Triton kernels are checked on CPU by tests/test_kernels_cpu.py)")
    gpu = torch.cuda.get_device_name()
    batches = [1, 8, 64, 256] if args.quick else [1, 8, 32, 64, 128, 256]
    contexts = [1024, 8192] if args.quick else [1024, 2048, 4096, 8192]
    extend_cases = [(1, 1024, 0), (1, 4096, 0), (4, 2048, 0), (1, 512, 7680), (1, 4096, 4096), (8, 1024, 1024)]
    decode_cfgs, extend_cfgs = sweep_configs() if args.sweep else (None, None)
    print(f"kernel_bench on {gpu}: measuring copy bandwidth ...", file=sys.stderr, flush=True)
    copy_gbs = copy_bandwidth_gbs()
    decode_rows = bench_decode(batches, contexts, args.page_size, decode_cfgs)
    extend_rows = [] if args.decode_only else bench_extend(extend_cases, args.page_size, extend_cfgs)
    print_tables(decode_rows, extend_rows, copy_gbs, gpu)
    eager = eager_call_us()
    print("\nEager wall-clock per call at batch 1 (host launch overhead; CUDA graphs remove it for decode)")
    for name, us in eager.items():
        print(f"  {name:<26} {us:7.1f} us")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"gpu": gpu, "copy_gbs": copy_gbs, "decode": decode_rows, "extend": extend_rows,
                       "eager_call_us": eager}, f, indent=1)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
