"""Decode attention over ragged contexts against uniform ones of the same mean (a GPU probe, issue 9).

    python bench/reports/decode_attention_ragged_probe.py    # on the GPU machine; writes $OUT/attn_probe.json

Batches 64 / 128 / 256 of the qwen3-0.6b (16 query heads, 8 KV heads) and llama3-8b (32 / 8) attention
shapes, head dim 128, page 16, bf16; contexts all 1,060 tokens ("uniform") or drawn from U[120, 2000]
("ragged", the offline workload's spread near its start); pages scattered over the pool. For the split
counts auto / 1 / 2 / 4 / 8: microseconds per call and the K/V bytes read per second.
"""
import json, os, random, sys, torch
from kernels.triton_attention_decode import decode_attention, choose_num_splits
out = {}
def bench(fn, iters=50):
    for _ in range(3): fn()
    torch.cuda.synchronize()
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    s.record()
    for _ in range(iters): fn()
    e.record(); torch.cuda.synchronize()
    return s.elapsed_time(e) / iters
dev = torch.device("cuda")
page = 16
for heads, kvh in ((16, 8), (32, 8)):
    for batch in (64, 128, 256):
        rng = random.Random(0)
        for kind in ("uniform", "ragged"):
            lens = [1060] * batch if kind == "uniform" else [rng.randint(120, 2000) for _ in range(batch)]
            pages_per = [(l + page - 1) // page for l in lens]
            total_pages = sum(pages_per)
            maxp = max(pages_per)
            kc = torch.randn(total_pages * page, kvh, 128, device=dev, dtype=torch.bfloat16)
            vc = torch.randn_like(kc)
            pt = torch.zeros(batch, maxp, dtype=torch.int32, device=dev)
            perm = torch.randperm(total_pages, device=dev, dtype=torch.int32)
            o = 0
            for b, n in enumerate(pages_per):
                pt[b, :n] = perm[o:o + n]; o += n
            sl = torch.tensor(lens, dtype=torch.int32, device=dev)
            q = torch.randn(batch, heads, 128, device=dev, dtype=torch.bfloat16)
            res = torch.empty_like(q)
            nbytes = sum(lens) * kvh * 128 * 2 * 2
            row = {}
            for ns in (None, 1, 2, 4, 8):
                ms = bench(lambda: decode_attention(q, kc, vc, pt, sl, page, 0.088, res, num_splits=ns))
                row[str(ns or f"auto{choose_num_splits(batch, kvh, dev)}")] = {"ms": ms, "TBs": nbytes / ms / 1e9}
            out[f"h{heads}/{kvh} bs{batch} {kind}"] = row
            print(f"h{heads}/{kvh} bs{batch} {kind}:", {k: f"{v['ms']*1000:.0f}us {v['TBs']:.2f}TB/s" for k, v in row.items()}, flush=True)
json.dump(out, open(os.path.join(os.environ.get("OUT", "."), "attn_probe.json"), "w"), indent=1)
