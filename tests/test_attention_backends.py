"""The executors' attention backends agree on what a step is: the CUDA backend's packed upload (run here
on the CPU, unpinned) yields the same batch and metadata as the reference builder the CPU executor uses."""

import dataclasses

import pytest
import torch
from helpers_hf import PagedSequence, PagePool, build_batch

from kernels.attention_metadata import AttentionMetadata
from worker.executor.attention import HostAttentionBackend
from worker.executor.cuda_attention import CudaAttentionBackend

PAGE_SIZE = 4


def mixed_step(decodes: int, chunks: list[tuple[int, int]], seed: int = 0):
    """`decodes` decode rows (context 9), then prefill chunks (cached prefix, new tokens)."""
    pool = PagePool(64, seed)
    steps = []
    for _ in range(decodes):
        seq = PagedSequence(list(range(10)), num_computed=9)
        pool.grow(seq, 10, PAGE_SIZE)
        steps.append((seq, 1))
    for cached, new in chunks:
        seq = PagedSequence(list(range(cached + new)), num_computed=cached)
        pool.grow(seq, cached + new, PAGE_SIZE)
        steps.append((seq, new))
    return build_batch(steps, PAGE_SIZE)


def assert_same(a, b):
    for field in dataclasses.fields(a):
        x, y = getattr(a, field.name), getattr(b, field.name)
        if isinstance(x, torch.Tensor):
            assert torch.equal(x, y), field.name
        else:
            assert x == y, field.name


@pytest.mark.parametrize("decodes, chunks", [(0, [(0, 7)]), (3, []), (2, [(5, 3), (0, 11)]), (1, [(8, 1)])])
def test_packed_upload_matches_the_reference_metadata(decodes, chunks):
    batch = mixed_step(decodes, chunks)
    reference_batch, reference = HostAttentionBackend().prepare(batch)
    backend = CudaAttentionBackend(torch.device("cpu"))
    for _ in range(2):  # the second step reuses the packed buffers
        on_device, meta = backend.prepare(batch)
        assert_same(on_device, reference_batch)
        assert_same(meta, reference)
    assert reference.max_extend_len == max(batch.extend_lens) and reference.max_seq_len == max(batch.seq_lens)


def test_reference_metadata_lays_out_prefixes_and_starts():
    meta = AttentionMetadata.from_batch(mixed_step(2, [(5, 3), (0, 11)]))
    assert meta.prefix_lens.tolist() == [9, 9, 5, 0]
    assert meta.extend_starts.tolist() == [0, 1, 2, 5]
    assert meta.seq_lens.dtype == meta.extend_starts.dtype == torch.int32


def test_cuda_executor_eager_path_equals_cpu_executor_on_the_cpu(tmp_path):
    """The CUDA executor's eager forward (its backend's packed upload) with the reference ops on the CPU
    computes the same logits as the CPU executor: the executor side of the batch contract, without a GPU."""
    import kernels.torch_ref as torch_ref
    from helpers_hf import make_hf_checkpoint

    from worker.config import EngineConfig
    from worker.executor.cpu import CPUExecutor
    from worker.executor.cuda import CUDAExecutor

    folder = make_hf_checkpoint(tmp_path / "llama", "llama")
    config = EngineConfig(model=str(folder), dtype="float32", kv_cache_tokens=256, progress=False)
    cuda_like = CUDAExecutor(folder, config, device="cpu", ops=torch_ref)
    reference = CPUExecutor(folder, config)
    for executor in (cuda_like, reference):
        executor.init_kv_cache(executor.num_kv_pages(PAGE_SIZE), PAGE_SIZE)
    assert not cuda_like.uses_cuda_graphs
    prefill = mixed_step(0, [(0, 9), (0, 5)])
    torch.testing.assert_close(cuda_like.forward(prefill), reference.forward(prefill))
