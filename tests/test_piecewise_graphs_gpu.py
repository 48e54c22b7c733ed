"""Piecewise CUDA graphs on a GPU (every test is marked `gpu`; run with `pytest -m gpu`).

A CUDA executor replaying piecewise graphs gives the logits (bf16 tolerances of tests/test_cuda_executor.py)
and greedy tokens of one with them off, for prefill, extend-over-prefix and mixed steps, a step with
future tokens (overlap scheduling), and steps whose K/V the graphs' path wrote; a step above the largest
bucket runs eagerly. Both executors run the same steps over the same pages, so their KV caches agree.
"""

from __future__ import annotations

import pytest
import torch
from helpers_hf import PagedSequence, PagePool, build_batch
from test_cuda_executor import PAGE_SIZE, assert_logits_close, checkpoint_folder, make_executor, random_prompts

pytestmark = pytest.mark.gpu

MAX_TOKENS = 1024  # buckets 8 .. 1024
# A replay differs from the eager step only where cuBLAS tiles the padded row count differently; over
# 28 bf16 layers that moves logits by a few rounding steps (test_cuda_executor's mixed-batch bound).
MAX_ERROR = 0.5


@pytest.fixture(scope="module")
def executors(tmp_path_factory):
    """(with piecewise graphs, without): the same qwen3-0.6b weights, the same KV page count."""
    folder = checkpoint_folder("qwen3-0.6b", tmp_path_factory)
    graphs = make_executor(folder, piecewise_cuda_graph_max_tokens=MAX_TOKENS)
    eager = make_executor(folder, piecewise_cuda_graph_max_tokens=0)
    assert graphs.uses_piecewise_graphs and not eager.uses_piecewise_graphs
    assert graphs.piecewise.buckets[-1] == MAX_TOKENS
    assert graphs.piecewise.num_graphs == len(graphs.piecewise.buckets) * (graphs.model_config.num_hidden_layers + 1)
    assert graphs.memory_report["piecewise_graph_memory_gib"] > 0
    yield graphs, eager
    graphs.shutdown()
    eager.shutdown()


def sequences(vocab: int, shapes: list[tuple[int, int]], seed: int) -> list[PagedSequence]:
    """One sequence per (cached prefix, new tokens), pages from a shuffled pool."""
    pool = PagePool(1024, seed=seed)
    seqs = [PagedSequence(p) for p in random_prompts(vocab, [c + n for c, n in shapes], seed)]
    for seq in seqs:
        pool.grow(seq, len(seq.tokens) + 8, PAGE_SIZE)
    return seqs


def both(executors, shapes, seed: int, future: bool = False):
    """Prefill each sequence's cached prefix (eagerly, on both), then run the step through `forward` on
    both executors. With `future`, decode rows' ids are references into a device tensor of tokens."""
    graphs, eager = executors
    seqs = sequences(graphs.model_config.vocab_size, shapes, seed)
    results = []
    for executor in (graphs, eager):
        prefixes = [(s, c) for s, (c, _) in zip(seqs, shapes) if c]
        for seq in seqs:
            seq.num_computed = 0
        if prefixes:
            executor.forward_eager(build_batch(prefixes, PAGE_SIZE))
        for seq, (cached, _) in zip(seqs, shapes):
            seq.num_computed = cached
        batch = build_batch([(s, n) for s, (_, n) in zip(seqs, shapes)], PAGE_SIZE)
        future_tokens = None
        if future:
            decodes = batch.num_decodes
            future_tokens = torch.zeros(decodes + 3, dtype=torch.int64, device="cuda")
            future_tokens[3:] = batch.input_ids[:decodes].cuda()  # row 3 + i holds decode i's token
            batch.input_ids[:decodes] = -(torch.arange(decodes) + 3 + 1)
        results.append(executor.forward(batch, future_tokens).float().clone())
    return batch, results


STEPS = {
    "prefill": [(0, 5), (0, 64), (0, 317)],  # 386 tokens -> bucket 512
    "extend": [(200, 300)],  # 300 tokens over a 200-token cached prefix -> 384
    "mixed": [(40, 1), (250, 1), (600, 1), (100, 100), (0, 20)],  # 3 decodes + 2 chunks: 123 -> 128
    "tiny": [(9, 1), (0, 3)],  # 4 tokens -> bucket 8
}


@pytest.mark.parametrize("name", list(STEPS))
def test_piecewise_step_equals_eager(executors, name):
    batch, (replayed, eager) = both(executors, STEPS[name], seed=len(name))
    assert executors[0].piecewise.can_run(batch)
    assert replayed.shape == eager.shape == (batch.batch_size, executors[0].model_config.vocab_size)
    assert_logits_close(replayed, eager, max_error=MAX_ERROR)


def test_future_tokens_resolve_before_the_replay(executors):
    _, (replayed, eager) = both(executors, STEPS["mixed"], seed=7, future=True)
    _, (_, plain) = both(executors, STEPS["mixed"], seed=7)
    assert_logits_close(replayed, eager, max_error=MAX_ERROR)
    assert torch.equal(eager, plain)  # the eager path resolved the same ids


def chunked_prefill_then_mixed_decodes(executor, feed: list[int] | None = None):
    """A 700-token prompt prefilled in chunks of 256, then 8 decode steps of it, each beside a 50-token chunk
    of another prompt. Decodes take `feed`'s tokens, else the greedy ones. Returns (logits, tokens)."""
    long_seq, other = sequences(executor.model_config.vocab_size, [(0, 700), (0, 400)], seed=5)
    logits = []
    for start in range(0, 700, 256):
        long_seq.num_computed = start
        logits.append(executor.forward(build_batch([(long_seq, min(256, 700 - start))], PAGE_SIZE)).float().clone())
    long_seq.num_computed = 700
    tokens = []
    for i in range(8):
        token = feed[i] if feed is not None else int(logits[-1][0].argmax())
        tokens.append(token)
        long_seq.tokens.append(token)
        other.num_computed = 50 * i
        step = executor.forward(build_batch([(long_seq, 1), (other, 50)], PAGE_SIZE)).float()
        logits.append(step[:1].clone())
        long_seq.num_computed += 1
    return torch.cat(logits), tokens


def test_greedy_over_kv_the_graphs_wrote(executors):
    """Piecewise steps that read the K/V earlier piecewise steps wrote (chunked prefill, then mixed steps):
    close logits at every step, and each step's greedy token among the eager run's best, fed the same tokens."""
    graphs, eager = executors
    want, tokens = chunked_prefill_then_mixed_decodes(eager)
    got, _ = chunked_prefill_then_mixed_decodes(graphs, feed=tokens)
    assert got.shape == want.shape == (3 + 8, graphs.model_config.vocab_size)
    assert_logits_close(got, want, max_error=MAX_ERROR)


def test_step_above_the_largest_bucket_runs_eagerly(executors):
    graphs, eager = executors
    calls = []
    runner = graphs.piecewise
    original = runner.run
    runner.run = lambda batch, future_tokens=None: calls.append(batch.num_tokens) or original(batch, future_tokens)
    try:
        batch, (big, reference) = both(executors, [(0, MAX_TOKENS + 1)], seed=9)
        _, (small, _) = both(executors, [(0, MAX_TOKENS)], seed=9)
    finally:
        runner.run = original
    assert not runner.can_run(batch)
    assert calls == [MAX_TOKENS]  # only the step that fits went through the graphs
    assert torch.equal(big, reference)  # the same eager kernels on the same data
