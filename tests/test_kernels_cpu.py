"""Triton kernels vs. the torch reference, run on the CPU in Triton's interpreter.

Small shapes, float32 and float16 (the interpreter's bfloat16 dot is wrong; bf16 is checked on the
GPU in test_kernels_gpu.py). Attention cases are ragged, cross page boundaries, use shuffled page
tables and NaN-filled unused cache slots; outputs start as NaN and every element is compared.

On a machine with CUDA these tests are skipped unless TRITON_INTERPRET=1 is set explicitly: switching
the interpreter on there would also turn every other test's Triton kernels into interpreted ones.
"""

import copy
import importlib
import inspect
import os
import sys

import pytest
import torch

if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # must be set before any @triton.jit runs
INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"
if not INTERPRETING:
    pytest.skip("interpreter tests: CUDA is present (the gpu tests cover the kernels)", allow_module_level=True)

_KERNEL_MODULES = [
    "kernels.triton_attention_decode",
    "kernels.triton_attention_extend",
    "kernels.triton_norm_rope_act",
    "kernels.triton_rope_write_kv",
    "kernels.triton_write_kv",
    "kernels.triton_ops",
]
for _name in _KERNEL_MODULES:  # if another test imported them first, re-decorate them as interpreted
    if _name in sys.modules:
        importlib.reload(sys.modules[_name])

from kernels import torch_ref, triton_ops  # noqa: E402
from kernels.triton_attention_decode import decode_attention  # noqa: E402
from kernels.triton_testing import make_case, patch_interpreter_scalar_index  # noqa: E402

patch_interpreter_scalar_index()

TOL = {torch.float32: dict(atol=2e-5, rtol=2e-5), torch.float16: dict(atol=3e-3, rtol=3e-3)}


def assert_close_everywhere(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype):
    assert out.shape == ref.shape
    assert not torch.isnan(out).any(), "kernel left unwritten (NaN) elements or read poisoned cache slots"
    torch.testing.assert_close(out.float(), ref.float(), **TOL[dtype])


def run_poisoned(case) -> torch.Tensor:
    """triton_ops' paged attention into an output that starts as NaN everywhere."""
    out = torch.full_like(case.q, float("nan"))
    return triton_ops.paged_attention_into(out, case.q, case.k_cache, case.v_cache, case.meta, case.scale)


def reference_attention(case):
    """torch_ref in float32 on the same inputs: the numerically best answer."""
    return torch_ref.paged_attention(
        case.q.float(), case.k_cache.float(), case.v_cache.float(), case.meta, case.scale
    )


# --------------------------------------------------------------------------- paged attention
@pytest.mark.parametrize(
    "page_size, head_dim, num_heads, num_kv_heads, dtype",
    [
        (1, 64, 4, 4, torch.float32),  # MHA, one token per page
        (4, 64, 4, 2, torch.float16),  # GQA 2
        (16, 128, 8, 2, torch.float32),  # GQA 4, head_dim 128
        (4, 128, 4, 1, torch.float16),  # GQA 4 with a single KV head
    ],
)
def test_decode_attention_ragged(page_size, head_dim, num_heads, num_kv_heads, dtype):
    torch.manual_seed(page_size * 1000 + head_dim + num_heads)
    seq_lens = [1, 5, 16, 17, 70]  # a single token, odd lengths, exactly on / just past page ends
    case = make_case(
        seq_lens, [1] * len(seq_lens), num_decodes=len(seq_lens), page_size=page_size,
        num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim, dtype=dtype,
    )
    out = triton_ops.paged_attention(case.q, case.k_cache, case.v_cache, case.meta, case.scale)
    assert out.dtype == dtype and out.shape == case.q.shape
    out = run_poisoned(case)
    assert_close_everywhere(out, reference_attention(case), dtype)


@pytest.mark.parametrize("num_splits", [1, 3, 8])
def test_decode_split_counts_agree(num_splits):
    """Any split count, including more splits than tiles (empty splits), gives the same answer."""
    torch.manual_seed(num_splits)
    case = make_case(
        [3, 64, 65, 150], [1] * 4, num_decodes=4, page_size=4,
        num_heads=4, num_kv_heads=2, head_dim=64, dtype=torch.float32,
    )
    out = torch.full_like(case.q, float("nan"))
    m = case.meta
    decode_attention(case.q, case.k_cache, case.v_cache, m.page_tables, m.seq_lens, m.page_size, case.scale, out, num_splits)
    assert_close_everywhere(out, reference_attention(case), torch.float32)


def test_decode_padding_sequence_with_no_context_gives_zeros():
    """CUDA-graph padding rows may carry seq_len 0: they must produce zeros, never NaN."""
    torch.manual_seed(7)
    case = make_case([9, 1], [1, 1], num_decodes=2, page_size=4, num_heads=2, num_kv_heads=1, head_dim=64, dtype=torch.float32)
    seq_lens = case.meta.seq_lens.clone()
    seq_lens[1] = 0
    for splits in (1, 4):
        out = torch.full_like(case.q, float("nan"))
        decode_attention(case.q, case.k_cache, case.v_cache, case.meta.page_tables, seq_lens, 4, case.scale, out, splits)
        assert torch.equal(out[1], torch.zeros_like(out[1]))
        assert_close_everywhere(out[:1], reference_attention(case)[:1], torch.float32)


@pytest.mark.parametrize(
    "page_size, head_dim, num_heads, num_kv_heads, dtype",
    [
        (1, 64, 2, 2, torch.float32),
        (4, 64, 4, 2, torch.float16),
        (16, 128, 4, 1, torch.float32),
    ],
)
def test_extend_attention_with_cached_prefixes(page_size, head_dim, num_heads, num_kv_heads, dtype):
    torch.manual_seed(page_size + head_dim)
    # (prefix, new): no prefix, prefix ending mid-page, one new token as a non-decode, a chunk
    # spanning several query blocks (block 64/128) that starts at an unaligned position
    prefixes = [0, 6, 16, 37]
    extends = [13, 21, 1, 140]
    seq_lens = [p + e for p, e in zip(prefixes, extends)]
    case = make_case(
        seq_lens, extends, num_decodes=0, page_size=page_size,
        num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim, dtype=dtype,
    )
    out = run_poisoned(case)
    assert_close_everywhere(out, reference_attention(case), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_mixed_decode_and_extend_batch(dtype):
    torch.manual_seed(11)
    seq_lens = [33, 2, 80, 19, 5]
    extends = [1, 1, 1, 19, 3]  # three decodes, a fresh prefill, a chunk on a prefix of 2
    case = make_case(
        seq_lens, extends, num_decodes=3, page_size=4, num_heads=4, num_kv_heads=2, head_dim=64, dtype=dtype,
    )
    out = run_poisoned(case)
    assert_close_everywhere(out, reference_attention(case), dtype)


def test_one_metadata_serves_every_layer_of_a_step():
    """The layers of a step share one AttentionMetadata, whose decode/extend views and split partials are
    made once (meta.split(), meta.scratch): each layer's own q and caches must still give its own answer."""
    torch.manual_seed(12)
    seq_lens, extends = [40, 9, 12], [1, 9, 4]  # one decode: few enough programs that its context splits
    base = make_case(seq_lens, extends, num_decodes=1, page_size=4, num_heads=4, num_kv_heads=2,
                     head_dim=64, dtype=torch.float32)
    meta = base.meta  # page tables, lengths and slots are the step's, the same for every layer

    def another_layer(case):
        """Same pages (poisoned slots stay NaN), new q and new cache contents."""
        layer = copy.copy(case)
        layer.q = torch.randn_like(case.q)
        layer.k_cache = torch.where(case.k_cache.isnan(), case.k_cache, torch.randn_like(case.k_cache))
        layer.v_cache = torch.where(case.v_cache.isnan(), case.v_cache, torch.randn_like(case.v_cache))
        return layer

    layers = [base, another_layer(base), another_layer(base)]
    outs = [triton_ops.paged_attention(case.q, case.k_cache, case.v_cache, meta, case.scale) for case in layers]
    assert meta._scratch, "the decode split partials were not taken from the step's shared scratch"
    for case, out in zip(layers, outs):
        assert_close_everywhere(out, reference_attention(case), torch.float32)


def test_paged_attention_rejects_bad_head_counts():
    case = make_case([4], [1], num_decodes=1, page_size=4, num_heads=3, num_kv_heads=3, head_dim=64, dtype=torch.float32)
    k_cache = case.k_cache[:, :2].contiguous()
    with pytest.raises(ValueError, match="num_kv_heads"):
        triton_ops.paged_attention(case.q, k_cache, k_cache, case.meta, case.scale)


# --------------------------------------------------------------------------- write_kv
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_write_kv_writes_exactly_the_given_slots(dtype):
    torch.manual_seed(3)
    num_slots, kv_heads, head_dim, tokens = 40, 3, 64, 9
    slots = torch.randperm(num_slots)[:tokens]
    kv = torch.randn(tokens, 2 * kv_heads, head_dim).to(dtype)
    k, v = kv[:, :kv_heads], kv[:, kv_heads:]  # non-contiguous views, as from a fused qkv projection
    caches = [torch.full((num_slots, kv_heads, head_dim), float("nan"), dtype=dtype) for _ in range(4)]
    torch_ref.write_kv(caches[0], caches[1], k, v, slots)
    triton_ops.write_kv(caches[2], caches[3], k, v, slots)
    for ref, got in ((caches[0], caches[2]), (caches[1], caches[3])):
        assert torch.equal(ref.isnan(), got.isnan()), "a slot outside out_slots was written (or one was missed)"
        assert torch.equal(ref[slots], got[slots])


# --------------------------------------------------------------------------- fused RoPE + write_kv
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("head_dim, heads, kv_heads", [(64, 4, 2), (128, 3, 1)])
def test_rope_and_write_kv_equals_apply_rope_then_write_kv(dtype, head_dim, heads, kv_heads):
    """One launch, bit for bit what the two separate Triton ops give (and the torch reference in bf16,
    where the interpreter's arithmetic is exact); only the token slots are written."""
    torch.manual_seed(head_dim + heads)
    tokens, num_slots = 7, 50
    cache = torch_ref.build_rope_cache(head_dim, 600, 10000.0)
    qkv = torch.randn(tokens, heads + 2 * kv_heads, head_dim).to(dtype)
    q, k, v = qkv[:, :heads], qkv[:, heads : heads + kv_heads], qkv[:, heads + kv_heads :]  # strided views
    positions = torch.tensor([0, 1, 15, 16, 100, 511, 599])
    slots = torch.randperm(num_slots)[:tokens]
    caches = [torch.full((num_slots, kv_heads, head_dim), float("nan"), dtype=dtype) for _ in range(4)]

    fused_q = triton_ops.rope_and_write_kv(q, k, v, positions, cache, caches[0], caches[1], slots)
    sep_q, sep_k = triton_ops.apply_rope(q, k, positions, cache)
    triton_ops.write_kv(caches[2], caches[3], sep_k, v, slots)
    assert fused_q.shape == q.shape and fused_q.dtype == dtype
    assert torch.equal(fused_q, sep_q)
    for got, want in ((caches[0], caches[2]), (caches[1], caches[3])):
        assert torch.equal(got.isnan(), want.isnan()), "a slot outside out_slots was written (or one was missed)"
        assert torch.equal(got[slots], want[slots])
    if dtype == torch.bfloat16:
        ref_caches = [torch.full_like(caches[0], float("nan")) for _ in range(2)]
        ref_q = torch_ref.rope_and_write_kv(q, k, v, positions, cache, ref_caches[0], ref_caches[1], slots)
        assert torch.equal(fused_q, ref_q)
        assert torch.equal(caches[0][slots], ref_caches[0][slots]) and torch.equal(caches[1][slots], ref_caches[1][slots])


def test_rope_and_write_kv_rejects_mismatched_cache():
    q, k = torch.randn(2, 4, 64), torch.randn(2, 2, 64)
    cache = torch.zeros(8, 1, 64)
    rope = torch_ref.build_rope_cache(64, 16, 10000.0)
    with pytest.raises(ValueError, match="do not match caches"):
        triton_ops.rope_and_write_kv(q, k, k, torch.tensor([0, 1]), rope, cache, cache, torch.tensor([0, 1]))


# --------------------------------------------------------------------------- RMSNorm, RoPE, SiLU
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("with_residual", [False, True])
def test_rms_norm(dtype, with_residual):
    torch.manual_seed(5)
    tokens, hidden = 7, 100  # hidden not a power of two
    x = torch.randn(tokens, hidden).to(dtype)
    weight = (1 + 0.1 * torch.randn(hidden)).to(dtype)
    residual = torch.randn(tokens, hidden).to(dtype) if with_residual else None
    ref_out, ref_res = torch_ref.rms_norm(x, weight, 1e-6, residual)
    out, res = triton_ops.rms_norm(x, weight, 1e-6, residual)
    assert out.dtype == ref_out.dtype
    torch.testing.assert_close(out, ref_out, atol=1e-5 if dtype == torch.float32 else 1e-2, rtol=1e-2)
    if dtype != torch.float32:  # same rounding steps: at most rare one-ulp differences
        assert (out == ref_out).float().mean() > 0.95
    if with_residual:
        assert torch.equal(res, ref_res)
    else:
        assert res is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("head_dim, scaling", [(64, None), (128, {"rope_type": "llama3", "factor": 8.0,
                         "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 64})])
def test_apply_rope(dtype, head_dim, scaling):
    torch.manual_seed(head_dim)
    tokens, heads, kv_heads = 6, 3, 1
    cache = torch_ref.build_rope_cache(head_dim, 512, 10000.0, scaling)
    qkv = torch.randn(tokens, heads + 2 * kv_heads, head_dim).to(dtype)
    q, k = qkv[:, :heads], qkv[:, heads : heads + kv_heads]  # strided views
    positions = torch.tensor([0, 3, 4, 100, 257, 511])
    ref_q, ref_k = torch_ref.apply_rope(q, k, positions, cache)
    out_q, out_k = triton_ops.apply_rope(q, k, positions, cache)
    if dtype == torch.bfloat16:  # no dot involved, so the interpreter's bf16 is exact: same rounding steps
        assert torch.equal(out_q, ref_q) and torch.equal(out_k, ref_k)
        return
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-3, rtol=2e-3)
    torch.testing.assert_close(out_q, ref_q, **tol)
    torch.testing.assert_close(out_k, ref_k, **tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_silu_and_mul(dtype):
    torch.manual_seed(9)
    x = (3 * torch.randn(5, 2 * 100)).to(dtype)
    out = triton_ops.silu_and_mul(x)
    ref = torch_ref.silu_and_mul(x)
    torch.testing.assert_close(out, ref, atol=1e-5 if dtype == torch.float32 else 2e-2, rtol=1e-2)
    if dtype != torch.float32:  # same rounding steps: at most rare one-ulp differences
        assert (out == ref).float().mean() > 0.95


def test_ops_module_matches_reference_signatures():
    """The model code takes either module as `ops`: every reference op must exist in triton_ops."""
    for name in ("rms_norm", "apply_rope", "silu_and_mul", "write_kv", "paged_attention", "build_rope_cache",
                 "rope_and_write_kv"):
        ref_fn, tri_fn = getattr(torch_ref, name), getattr(triton_ops, name)
        assert list(inspect.signature(ref_fn).parameters) == list(inspect.signature(tri_fn).parameters), name
