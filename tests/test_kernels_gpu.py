"""Triton kernels vs. the torch reference on the GPU, in bfloat16, at serving sizes.

Large random ragged batches (hundreds of decodes up to 8k context, prefill chunks up to 4k on prefixes up
to 8k), page sizes 1/16/64, head_dim 64/128. Unused cache slots hold NaN, outputs start as NaN, and every
output element is compared with torch_ref run in float32 on the same (bf16-valued) inputs.
Run with `pytest -m gpu tests/test_kernels_gpu.py`.
"""

import random

import pytest
import torch

from kernels import torch_ref
from kernels.triton_testing import make_case

pytestmark = pytest.mark.gpu

# bf16 inputs; the kernel rounds probabilities and the output to bf16, the reference stays in fp32.
ATTN_TOL = dict(atol=2e-2, rtol=2e-2)
MAX_REL_NORM_ERROR = 1e-2


def _ops():
    from kernels import triton_ops  # imported lazily: collection must not need CUDA

    return triton_ops


def run_poisoned(case) -> torch.Tensor:
    out = torch.full_like(case.q, float("nan"))
    return _ops().paged_attention_into(out, case.q, case.k_cache, case.v_cache, case.meta, case.scale)


def reference(case) -> torch.Tensor:
    return torch_ref.paged_attention(case.q.float(), case.k_cache.float(), case.v_cache.float(), case.meta, case.scale)


def assert_attention_close(out: torch.Tensor, ref: torch.Tensor):
    assert not torch.isnan(out).any(), "unwritten output elements, or a read of a poisoned cache slot"
    rel = ((out.float() - ref).norm() / ref.norm()).item()
    assert rel < MAX_REL_NORM_ERROR, f"relative error {rel:.2e}"
    torch.testing.assert_close(out.float(), ref, **ATTN_TOL)


SHAPES = [  # (head_dim, num_heads, num_kv_heads): Llama-3-8B-like GQA 4, and head_dim 64 with GQA 8
    (128, 32, 8),
    (64, 16, 2),
]


@pytest.mark.parametrize("page_size", [1, 16, 64])
@pytest.mark.parametrize("head_dim, num_heads, num_kv_heads", SHAPES)
def test_decode_large_ragged_batch(page_size, head_dim, num_heads, num_kv_heads):
    rng = random.Random(page_size * 7 + head_dim)
    torch.manual_seed(page_size * 7 + head_dim)
    seq_lens = [rng.randint(1, 8192) for _ in range(256)]
    seq_lens[:4] = [1, page_size, page_size + 1, 8192]  # edges: one token, exactly one page, just past it
    case = make_case(
        seq_lens, [1] * len(seq_lens), num_decodes=len(seq_lens), page_size=page_size,
        num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim, dtype=torch.bfloat16, device="cuda",
    )
    assert_attention_close(run_poisoned(case), reference(case))


@pytest.mark.parametrize("page_size", [1, 16, 64])
@pytest.mark.parametrize("head_dim, num_heads, num_kv_heads", SHAPES)
def test_extend_large_ragged_batch(page_size, head_dim, num_heads, num_kv_heads):
    rng = random.Random(page_size * 13 + head_dim)
    torch.manual_seed(page_size * 13 + head_dim)
    prefixes = [0, 8192, 1, 4095] + [rng.randint(0, 8192) for _ in range(2)]
    extends = [4096, 4096 - 3, 777, 1] + [rng.randint(1, 4096) for _ in range(2)]
    seq_lens = [p + e for p, e in zip(prefixes, extends)]
    case = make_case(
        seq_lens, extends, num_decodes=0, page_size=page_size,
        num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim, dtype=torch.bfloat16, device="cuda",
    )
    assert_attention_close(run_poisoned(case), reference(case))


@pytest.mark.parametrize("page_size", [16, 64])
def test_mixed_batch_of_decodes_and_chunks(page_size):
    rng = random.Random(page_size)
    torch.manual_seed(page_size)
    decodes = [rng.randint(1, 6000) for _ in range(64)]
    prefixes = [rng.randint(0, 3000) for _ in range(5)]
    extends = [rng.randint(1, 1500) for _ in range(5)]
    seq_lens = decodes + [p + e for p, e in zip(prefixes, extends)]
    case = make_case(
        seq_lens, [1] * len(decodes) + extends, num_decodes=len(decodes), page_size=page_size,
        num_heads=32, num_kv_heads=8, head_dim=128, dtype=torch.bfloat16, device="cuda",
    )
    out = _ops().paged_attention(case.q, case.k_cache, case.v_cache, case.meta, case.scale)
    assert out.shape == case.q.shape and out.dtype == torch.bfloat16
    assert_attention_close(run_poisoned(case), reference(case))


def test_decode_replays_in_a_cuda_graph_with_new_lengths():
    """Captured once, replayed after the sequences grew: the graph must follow the device seq_lens."""
    torch.manual_seed(0)
    seq_lens = [100, 2000, 37, 4096, 1, 513, 64, 3000]
    case = make_case(
        [s + 300 for s in seq_lens], [1] * 8, num_decodes=8, page_size=16,
        num_heads=32, num_kv_heads=8, head_dim=128, dtype=torch.bfloat16, device="cuda",
    )
    meta = case.meta
    grown = meta.seq_lens.clone()
    meta.seq_lens.copy_(torch.tensor(seq_lens, dtype=torch.int32))
    out = torch.full_like(case.q, float("nan"))
    ops = _ops()
    ops.paged_attention_into(out, case.q, case.k_cache, case.v_cache, meta, case.scale)  # compile first
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        ops.paged_attention_into(out, case.q, case.k_cache, case.v_cache, meta, case.scale)
    meta.seq_lens.copy_(grown)
    meta.seq_lens_list[:] = grown.tolist()
    out.fill_(float("nan"))
    graph.replay()
    torch.cuda.synchronize()
    assert_attention_close(out, reference(case))


@pytest.mark.parametrize("head_dim, kv_heads", [(128, 8), (64, 2)])
def test_write_kv_large(head_dim, kv_heads):
    torch.manual_seed(head_dim)
    slots_total, tokens = 200_000, 20_000
    slots = torch.randperm(slots_total, device="cuda")[:tokens]
    k = torch.randn(tokens, kv_heads, head_dim, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    caches = [torch.full((slots_total, kv_heads, head_dim), float("nan"), device="cuda", dtype=torch.bfloat16) for _ in range(4)]
    torch_ref.write_kv(caches[0], caches[1], k, v, slots)
    _ops().write_kv(caches[2], caches[3], k, v, slots)
    assert torch.equal(caches[0].isnan(), caches[2].isnan()) and torch.equal(caches[1].isnan(), caches[3].isnan())
    assert torch.equal(caches[0][slots], caches[2][slots]) and torch.equal(caches[1][slots], caches[3][slots])


def test_rms_norm_rope_silu_bf16_match_reference():
    """Same rounding steps as the reference: at most one bf16 ulp apart, almost always identical."""
    torch.manual_seed(1)
    ops = _ops()
    tokens, hidden, inter = 3001, 4096, 14336
    x = torch.randn(tokens, hidden, device="cuda", dtype=torch.bfloat16)
    residual = torch.randn_like(x)
    weight = (1 + 0.1 * torch.randn(hidden, device="cuda")).to(torch.bfloat16)
    out, res = ops.rms_norm(x, weight, 1e-5, residual)
    ref_out, ref_res = torch_ref.rms_norm(x, weight, 1e-5, residual)
    assert torch.equal(res, ref_res)
    torch.testing.assert_close(out, ref_out, atol=2e-2, rtol=1e-2)
    assert (out == ref_out).float().mean() > 0.99

    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}
    cache = torch_ref.build_rope_cache(128, 131072, 500000.0, scaling, device="cuda")
    qkv = torch.randn(tokens, 48, 128, device="cuda", dtype=torch.bfloat16)
    q, k = qkv[:, :32], qkv[:, 32:40]
    positions = torch.randint(0, 131072, (tokens,), device="cuda")
    (oq, ok), (rq, rk) = ops.apply_rope(q, k, positions, cache), torch_ref.apply_rope(q, k, positions, cache)
    torch.testing.assert_close(oq, rq, atol=2e-2, rtol=1e-2)
    torch.testing.assert_close(ok, rk, atol=2e-2, rtol=1e-2)
    assert (oq == rq).float().mean() > 0.99

    gate_up = 3 * torch.randn(tokens, 2 * inter, device="cuda", dtype=torch.bfloat16)
    out, ref = ops.silu_and_mul(gate_up), torch_ref.silu_and_mul(gate_up)
    torch.testing.assert_close(out, ref, atol=2e-2, rtol=1e-2)
    assert (out == ref).float().mean() > 0.99


def test_rope_and_write_kv_bit_identical_to_the_separate_ops():
    """The fused launch (RoPE on q and k, K/V into the paged cache) at serving size, llama3 RoPE scaling:
    bit for bit what apply_rope then write_kv give, and nothing written outside the tokens' slots."""
    torch.manual_seed(2)
    ops = _ops()
    tokens, slots_total = 3001, 50_000
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}
    cache = torch_ref.build_rope_cache(128, 131072, 500000.0, scaling, device="cuda")
    qkv = torch.randn(tokens, 48, 128, device="cuda", dtype=torch.bfloat16)
    q, k, v = qkv[:, :32], qkv[:, 32:40], qkv[:, 40:]  # strided views of a fused projection
    positions = torch.randint(0, 131072, (tokens,), device="cuda")
    slots = torch.randperm(slots_total, device="cuda")[:tokens]
    caches = [torch.full((slots_total, 8, 128), float("nan"), device="cuda", dtype=torch.bfloat16) for _ in range(4)]
    fused_q = ops.rope_and_write_kv(q, k, v, positions, cache, caches[0], caches[1], slots)
    sep_q, sep_k = ops.apply_rope(q, k, positions, cache)
    ops.write_kv(caches[2], caches[3], sep_k, v, slots)
    assert torch.equal(fused_q, sep_q)
    for got, want in ((caches[0], caches[2]), (caches[1], caches[3])):
        assert torch.equal(got.isnan(), want.isnan())
        assert torch.equal(got[slots], want[slots])



def test_decode_chain_with_programmatic_dependent_launch_equals_plain_launches(monkeypatch):
    """RoPE + K/V write -> decode split -> merge, launched back to back as PDL dependents (Hopper+), gives
    exactly the bits of ordinary launches, eagerly and replayed from a CUDA graph with new token values."""
    torch.manual_seed(4)
    ops = _ops()
    batch = 4
    case = make_case([700, 1, 4096, 33], [1] * batch, num_decodes=batch, page_size=16,
                     num_heads=32, num_kv_heads=8, head_dim=128, dtype=torch.bfloat16, device="cuda")
    meta = case.meta
    rope = torch_ref.build_rope_cache(128, 8192, 500000.0, device="cuda")
    positions = meta.seq_lens.to(torch.int64) - 1  # each sequence's new token is its last position
    rows = torch.arange(batch, device="cuda")
    slots = meta.page_tables[rows, positions // 16].to(torch.int64) * 16 + positions % 16
    first, second = (torch.randn(batch, 48, 128, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    qkv = first.clone()

    def step(out):
        q = ops.rope_and_write_kv(qkv[:, :32], qkv[:, 32:40], qkv[:, 40:], positions, rope,
                                  case.k_cache, case.v_cache, slots)
        ops.paged_attention_into(out, q, case.k_cache, case.v_cache, meta, case.scale)
        return out

    results = {}
    for pdl in ("0", "1"):
        monkeypatch.setenv("RADIXFLEET_PDL", pdl)
        qkv.copy_(first)
        eager_first = step(torch.full_like(case.q, float("nan")))
        replayed = torch.full_like(case.q, float("nan"))
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            step(replayed)
        qkv.copy_(second)
        graph.replay()
        eager_second = step(torch.full_like(case.q, float("nan")))
        torch.cuda.synchronize()
        assert not torch.isnan(replayed).any()
        assert torch.equal(replayed, eager_second), f"graph replay differs from eager (RADIXFLEET_PDL={pdl})"
        results[pdl] = (eager_first, eager_second)
    assert torch.equal(results["0"][0], results["1"][0]) and torch.equal(results["0"][1], results["1"][1])
