"""Piecewise CUDA graphs, the parts that need no GPU (worker.executor.piecewise_graphs).

- The piece split is exact: the schedule the graphs replay (token-wise pieces on a padded bucket, eager
  attention on the real rows between them), run eagerly on the CPU with the reference ops, gives the
  whole-model forward's logits and KV writes for prefill, extend-over-prefix and mixed steps, Llama- and
  Qwen3-shaped (q/k norms), whatever the padding rows hold, with future tokens resolved too.
- Buckets: the smallest bucket >= T, nothing above the largest, padding bounded.
- The CUDA executor's dispatch: decode graphs first, then piecewise, then eager; the flag's checks.
"""

from __future__ import annotations

import argparse
import dataclasses

import pytest
import torch
from helpers_hf import PagedSequence, PagePool, build_batch, make_hf_checkpoint, random_prompts

from kernels.attention_metadata import AttentionMetadata
from worker.config import ConfigError, EngineConfig
from worker.executor.cuda_attention import CudaAttentionBackend
from worker.executor.piecewise_graphs import PiecewiseGraphRunner, bucket_for, token_buckets
from worker.models.loader import load_model

PAGE_SIZE = 4
NUM_PAGES = 64
MAX_TOKENS = 64  # buckets 8, 16, 32, 64
VOCAB = 512
# (decodes, [(cached prefix, new tokens), ...]); no step's token count is a bucket, so every one pads
STEPS = {
    "prefill": (0, [(0, 5), (0, 12)]),  # 17 tokens -> bucket 32
    "extend": (0, [(9, 6)]),  # 6 tokens over a 9-token cached prefix -> bucket 8
    "mixed": (2, [(7, 5), (0, 4)]),  # 2 decodes, a chunk over a prefix, a fresh chunk: 11 -> bucket 16
}


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """model(kind) -> LlamaForCausalLM in float32 on the reference ops, one random checkpoint per kind."""
    cache = {}

    def get(kind: str):
        if kind not in cache:
            folder = make_hf_checkpoint(tmp_path_factory.mktemp(kind), kind, seed=3)
            cache[kind] = load_model(folder, "cpu", torch.float32, progress=False)[0]
        return cache[kind]

    return get


def empty_caches(model) -> list[tuple[torch.Tensor, torch.Tensor]]:
    cfg = model.config
    shape = ((NUM_PAGES + 1) * PAGE_SIZE, cfg.num_key_value_heads, cfg.head_dim)
    return [(torch.zeros(shape), torch.zeros(shape)) for _ in range(cfg.num_hidden_layers)]


def clone_caches(caches):
    return [(k.clone(), v.clone()) for k, v in caches]


def prepared_step(model, name: str, seed: int = 0):
    """(step batch, KV caches holding every sequence's cached prefix) for the step named in STEPS."""
    decodes, chunks = STEPS[name]
    shapes = [(9, 1)] * decodes + chunks
    prompts = random_prompts([cached + new for cached, new in shapes], VOCAB, seed)
    pool = PagePool(NUM_PAGES, seed)
    seqs = [PagedSequence(p) for p in prompts]
    for seq in seqs:
        pool.grow(seq, len(seq.tokens), PAGE_SIZE)
    caches = empty_caches(model)
    prefixes = [(seq, cached) for seq, (cached, _) in zip(seqs, shapes) if cached]
    if prefixes:
        with torch.inference_mode():
            model(build_batch(prefixes, PAGE_SIZE), caches)
    for seq, (cached, _) in zip(seqs, shapes):
        seq.num_computed = cached
    batch = build_batch([(seq, new) for seq, (_, new) in zip(seqs, shapes)], PAGE_SIZE)
    assert batch.num_decodes == decodes
    return batch, caches


def whole_model(model, batch, caches):
    with torch.inference_mode():
        return model(batch, caches)


def runner_on_cpu(model, caches) -> PiecewiseGraphRunner:
    return PiecewiseGraphRunner(model, caches, CudaAttentionBackend(torch.device("cpu")), MAX_TOKENS,
                                torch.device("cpu"))


def assert_same_kv(got, want):
    """The same K/V in every page but the scratch page 0 (where padding rows write theirs)."""
    for (k, v), (k_ref, v_ref) in zip(got, want):
        torch.testing.assert_close(k[PAGE_SIZE:], k_ref[PAGE_SIZE:], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(v[PAGE_SIZE:], v_ref[PAGE_SIZE:], atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------- the split is exact
@pytest.mark.parametrize("kind", ["llama", "qwen3"])
@pytest.mark.parametrize("name", list(STEPS))
def test_pieces_on_a_padded_bucket_equal_the_whole_model(model, kind, name):
    net = model(kind)
    batch, caches = prepared_step(net, name)
    piece_caches = clone_caches(caches)
    expected = whole_model(net, batch, caches)

    runner = runner_on_cpu(net, piece_caches)
    got = runner.run(batch)

    assert bucket_for(runner.buckets, batch.num_tokens) > batch.num_tokens  # padded
    assert got.shape == expected.shape == (len(batch.logits_indices), VOCAB)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    # The same K/V at the same slots (up to float32 GEMM rounding at another row count), and nothing else
    # written outside the scratch page: padding rows never reach a request's cache.
    assert_same_kv(piece_caches, caches)


@pytest.mark.parametrize("kind", ["llama", "qwen3"])
def test_padding_rows_never_reach_real_rows(model, kind):
    """Stale ids, positions, KV slots and attention outputs in the rows past T (what earlier steps leave
    there) change nothing, whatever bucket the step is padded to: no logit, and no K/V outside the scratch page."""
    net = model(kind)
    batch, caches = prepared_step(net, "mixed", seed=1)
    reference_caches = clone_caches(caches)
    expected = whole_model(net, batch, reference_caches)
    runner = runner_on_cpu(net, caches)
    pieces = runner.pieces
    generator = torch.Generator().manual_seed(0)
    meta = AttentionMetadata.from_batch(batch)
    tokens, pad = batch.num_tokens, MAX_TOKENS - batch.num_tokens
    for bucket in (16, 32, MAX_TOKENS):
        pieces.input_ids[tokens:] = torch.randint(0, VOCAB, (pad,), generator=generator)
        pieces.positions[tokens:] = torch.randint(0, 40, (pad,), generator=generator)
        pieces.out_slots[tokens:] = torch.randint(PAGE_SIZE, NUM_PAGES * PAGE_SIZE, (pad,), generator=generator)
        pieces.attn_out[tokens:] = 100 * torch.randn(pieces.attn_out[tokens:].shape, generator=generator)
        with torch.inference_mode():
            got = pieces.forward(batch, meta, bucket)
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
        assert_same_kv(caches, reference_caches)


def test_future_tokens_are_resolved_into_the_static_ids(model):
    """Overlap scheduling: decode rows whose input is the previous step's sampled token (id -(r + 1))."""
    net = model("qwen3")
    batch, caches = prepared_step(net, "mixed", seed=2)
    expected = whole_model(net, batch, clone_caches(caches))
    real = batch.input_ids.clone()
    future = torch.tensor([7, int(real[1]), 3, int(real[0])])  # rows 3 and 1 hold the decodes' tokens
    ids = real.clone()
    ids[0], ids[1] = -(3 + 1), -(1 + 1)
    got = runner_on_cpu(net, caches).run(dataclasses.replace(batch, input_ids=ids), future_tokens=future)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------- buckets
def test_buckets_are_the_smallest_that_fit_and_bound_the_padding():
    buckets = token_buckets(2048)
    assert buckets == [8, 16, 32, 64, 128, 256, 384, 512, 768, 1024, 1536, 2048]
    for tokens in range(1, 2049):
        bucket = bucket_for(buckets, tokens)
        assert bucket >= tokens
        assert all(b < tokens for b in buckets if b < bucket)  # the smallest that fits
        if tokens >= 256:
            assert (bucket - tokens) / bucket <= 1 / 3
    assert bucket_for(buckets, 2049) is None and bucket_for(buckets, 0) is None


def test_the_largest_bucket_is_the_cap_itself():
    assert token_buckets(1000)[-1] == 1000 and max(token_buckets(1000)) == 1000
    assert token_buckets(300) == [8, 16, 32, 64, 128, 256, 300]
    assert token_buckets(0) == [] and bucket_for(token_buckets(0), 5) is None


# --------------------------------------------------------------------------- the executor's dispatch
class Recording:
    """Wraps a runner (or stands in for one), recording which steps it ran."""

    def __init__(self, can_run, run):
        self.can_run, self._run, self.steps = can_run, run, []

    def run(self, batch, future_tokens=None):
        self.steps.append(batch.num_tokens)
        return self._run(batch, future_tokens)


def test_executor_tries_decode_graphs_then_piecewise_then_eager(tmp_path):
    import kernels.torch_ref as torch_ref
    from worker.executor.cuda import CUDAExecutor

    folder = make_hf_checkpoint(tmp_path / "llama", "llama", seed=3)
    config = EngineConfig(model=str(folder), dtype="float32", progress=False)
    executor = CUDAExecutor(folder, config, device="cpu", ops=torch_ref)
    executor.init_kv_cache(NUM_PAGES, PAGE_SIZE)
    assert executor.config.max_num_batched_tokens is not None  # the step budget is filled in as the engine does
    assert not executor.uses_piecewise_graphs  # no capture on a CPU
    eager = Recording(lambda batch: True, executor.forward_eager)
    decode = Recording(lambda batch: batch.num_decodes == batch.batch_size, executor.forward_eager)
    runner = runner_on_cpu(executor.model, executor.kv_caches)
    piecewise = Recording(runner.can_run, runner.run)
    executor.graphs, executor.piecewise, executor.forward_eager = decode, piecewise, eager.run

    mixed, _ = prepared_step(executor.model, "mixed")
    decode_only = build_batch([(PagedSequence([1] * 10, num_computed=9, pages=[1, 2, 3]), 1)] * 3, PAGE_SIZE)
    large = build_batch([(PagedSequence([1] * 80, pages=list(range(1, 21))), 80)], PAGE_SIZE)  # > 64 tokens
    executor.forward(decode_only)
    executor.forward(mixed)
    executor.forward(large)
    assert decode.steps == [3] and piecewise.steps == [mixed.num_tokens] and eager.steps == [80]


def test_piecewise_flag_is_declared_and_checked():
    from worker.server.cli import add_engine_arguments, engine_config_from_args

    parser = argparse.ArgumentParser()
    add_engine_arguments(parser)
    assert engine_config_from_args(parser.parse_args([])).piecewise_cuda_graph_max_tokens == 2048
    args = parser.parse_args(["--piecewise-cuda-graph-max-tokens", "0"])
    assert engine_config_from_args(args).piecewise_cuda_graph_max_tokens == 0
    with pytest.raises(ConfigError, match="--piecewise-cuda-graph-max-tokens"):
        EngineConfig(piecewise_cuda_graph_max_tokens=-1).validate()
