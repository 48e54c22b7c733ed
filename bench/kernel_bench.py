"""Kernel benchmark: Triton paged decode / extend attention vs. torch SDPA on dense tensors.

    python -m bench.kernel_bench [--page-size 16] [--quick] [--sweep] [--json out.json]

Shapes are Llama-3-8B's attention (32 query heads, 8 KV heads, head_dim 128, bf16). Decode runs every
(batch, context) pair with all sequences at that context; its bytes are the K/V it must read (plus q and
out), so bytes / time is the achieved HBM bandwidth, printed beside the bandwidth of a plain
device-to-device copy measured in the same run. Extend reports TFLOP/s (causal FLOPs only). The SDPA
baseline gets the same problem as contiguous, unpaged tensors (decode: the GQA group as the query
length, so the flash backend serves it).
"""

from __future__ import annotations

import argparse
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


def decode_case(batch: int, context: int, page_size: int):
    from kernels.triton_testing import make_case

    return make_case(
        [context] * batch, [1] * batch, num_decodes=batch, page_size=page_size,
        num_heads=HEADS, num_kv_heads=KV_HEADS, head_dim=HEAD_DIM, dtype=DTYPE, device="cuda",
    )


def bench_decode(batches, contexts, page_size: int, configs=None):
    from kernels import triton_ops
    from kernels.triton_attention_decode import DecodeConfig, decode_attention

    rows = []
    for context in contexts:
        for batch in batches:
            torch.manual_seed(0)
            case = decode_case(batch, context, page_size)
            m = case.meta
            out = torch.empty_like(case.q)
            kv_bytes = batch * context * KV_HEADS * HEAD_DIM * 2 * case.k_cache.element_size()
            io_bytes = kv_bytes + 2 * case.q.numel() * case.q.element_size()
            row = {"batch": batch, "context": context, "page_size": page_size, "bytes": io_bytes}
            row["triton_ms"] = bench_ms(
                lambda: triton_ops.paged_attention_into(out, case.q, case.k_cache, case.v_cache, m, case.scale)
            )
            for name, cfg in (configs or {}).items():
                row[f"cfg:{name}"] = bench_ms(
                    lambda cfg=cfg: decode_attention(
                        case.q, case.k_cache, case.v_cache, m.page_tables, m.seq_lens, page_size, case.scale, out,
                        config=cfg,
                    )
                )
            del case
            # SDPA baseline on dense [B, KH, S, D] K/V; the group's query heads become the query axis.
            q = torch.randn(batch, KV_HEADS, HEADS // KV_HEADS, HEAD_DIM, device="cuda", dtype=DTYPE)
            k = torch.randn(batch, KV_HEADS, context, HEAD_DIM, device="cuda", dtype=DTYPE)
            v = torch.randn_like(k)
            row["sdpa_ms"] = bench_ms(lambda: F.scaled_dot_product_attention(q, k, v))
            del q, k, v
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
        "n32w4s2": DecodeConfig(32, 4, 2),
        "n64w4s3": DecodeConfig(64, 4, 3),
        "n64w8s2": DecodeConfig(64, 8, 2),
        "n128w4s2": DecodeConfig(128, 4, 2),
    }
    extend = {
        "m128n64w8s2": ExtendConfig(128, 64, 8, 2),
        "m128n32w4s2": ExtendConfig(128, 32, 4, 2),
        "m64n64w4s3": ExtendConfig(64, 64, 4, 3),
        "m128n64w8s3": ExtendConfig(128, 64, 8, 3),
    }
    return decode, extend


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--page-size", type=int, default=16)
    parser.add_argument("--quick", action="store_true", help="fewer sizes")
    parser.add_argument("--sweep", action="store_true", help="also time alternative launch configs")
    parser.add_argument("--json", help="write all figures to this file")
    args = parser.parse_args(argv)
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
    extend_rows = bench_extend(extend_cases, args.page_size, extend_cfgs)
    print_tables(decode_rows, extend_rows, copy_gbs, gpu)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"gpu": gpu, "copy_gbs": copy_gbs, "decode": decode_rows, "extend": extend_rows}, f, indent=1)


if __name__ == "__main__":
    main()
