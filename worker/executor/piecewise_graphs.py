"""Piecewise CUDA graphs for prefill, extend and mixed steps: everything but attention, per token-count bucket.

A step of T tokens that is not decode-only runs about a dozen kernels per layer; launched from Python
their host cost rivals the GPU time of a 512-2048 token step on a small model. Everything in a layer
except paged attention is token-wise (embedding, norms with the residual add, QKV / o / gate-up / down
projections, q/k norms, RoPE with the K/V write into the token's own slot, SiLU * mul: no row reads
another), so those pieces can run on a padded bucket of Tb >= T rows, captured once per bucket as CUDA
graphs, while paged attention (whose launches size themselves from the step's host-side lengths) runs
eagerly on the first T rows between them. Padding rows hold garbage that no real row ever reads, and
write their K/V into slot 0, in the scratch page no request owns.

Pieces of one step (L layers), `PaddedPieces.piece(i, ...)`:
  piece 0        embedding + layer 0's before_attention and RoPE/K-V write          -> q, residual
  piece i (< L)  layer i-1's after_attention + layer i's before_attention and RoPE/K-V write -> q, residual
  piece L        layer L-1's after_attention                                        -> hidden, residual
  then, eagerly: final norm and LM head on the logits rows (their count varies).
Between piece i and i+1, layer i's paged attention reads q[:T] (and the cache) and writes the static
buffer `attn_out[:T]` that piece i+1 reads. `PaddedPieces.forward` is that schedule; it runs the pieces
eagerly (CPU tests) or by replaying their graphs (`PiecewiseGraphRunner`), so the tests exercise the very
code the graphs hold.

Static inputs of every graph: `input_ids`, `positions` and `out_slots` [max_Tb] (the step's values copied
in, future tokens resolved in the ids before the replay; the slots of the rows past T reset to 0 every
step, since stale ones would be other requests' slots) and `attn_out[max_Tb, heads, head_dim]`. Stale ids,
positions and attention rows past T only ever feed padding rows, and are always valid values (every step
leaves resolved ids), so the embedding and the RoPE table lookup never fault.

Memory: the L+1 graphs of every bucket share one private memory pool. PyTorch's rules for that:
  1. a tensor allocated during a capture lives in the pool; while a Python reference holds it, no later
     capture may reuse its memory, and once it is dropped, later captures into the same pool may;
  2. a replay rewrites exactly the memory its capture used, so graphs whose captures reused each other's
     memory are correct only when replayed in an order that never reads memory a later-captured graph
     has overwritten: here, within a bucket, the capture order (and buckets never interleave in a step);
  3. the pool is returned to the device only when every graph using it is destroyed (empty_cache keeps it).
So the runner keeps piece i's outputs alive through the capture of piece i+1 (they are its input, and
layer i's attention reads them between the two replays) and then drops them: piece i+2 reuses their
memory, and the pool holds about two layers of activations of the largest bucket instead of L per bucket.
To reach those outputs at replay without keeping them alive, the runner keeps non-owning aliases of them
(`_non_owning_alias`, through the CUDA array interface): valid because the graphs hold the pool.

Buckets: 8, 16, 32, 64, 128, 256, then 384, 512, 768, 1024, 1536, 2048, ... up to the largest (capped at
--piecewise-cuda-graph-max-tokens and --max-num-batched-tokens, which is added as a bucket itself). At
256 tokens and up, where the GEMMs are compute-bound, a step pads by at most a third of its bucket
(257 -> 384); below that doubling steps may pad up to half, but the GEMMs there are bound by reading the
weights, so padded rows cost next to nothing. Steps above the largest bucket, and decode-only steps the
decode graphs take (worker.executor.cuda_graphs), keep their paths.
"""

from __future__ import annotations

import bisect
import gc
import logging
import time
from typing import Callable

import torch
from tqdm.auto import tqdm

from kernels.attention_metadata import AttentionMetadata
from worker.engine.forward_batch import ForwardBatch
from worker.executor.base import resolve_future_tokens
from worker.executor.cuda_attention import CudaAttentionBackend
from worker.models.llama import KVCache, LlamaForCausalLM

log = logging.getLogger(__name__)

MiB = 1024**2
_GRAPH_BYTES = MiB // 2  # device memory of one instantiated piece graph, generously (kernel nodes, params)
SMALLEST_BUCKET = 8
_DOUBLING_UP_TO = 256  # doubling buckets below this, then steps of x1.5 / x1.33 (384, 512, 768, 1024, ...)


def token_buckets(max_tokens: int) -> list[int]:
    """The token counts captured, ascending; `max_tokens` itself is the last (see the module docstring)."""
    if max_tokens < 1:
        return []
    sizes, size = [], SMALLEST_BUCKET
    while size < _DOUBLING_UP_TO:
        sizes.append(size)
        size *= 2
    size = _DOUBLING_UP_TO
    while size < max_tokens:
        sizes.append(size)
        sizes.append(size * 3 // 2)
        size *= 2
    return sorted({s for s in sizes if s < max_tokens} | {max_tokens})


def bucket_for(buckets: list[int], num_tokens: int) -> int | None:
    """The smallest bucket >= num_tokens, or None when the step is larger than every bucket (or empty)."""
    if num_tokens < 1 or not buckets or num_tokens > buckets[-1]:
        return None
    return buckets[bisect.bisect_left(buckets, num_tokens)]


# (piece index, previous piece's outputs or None) -> this piece's outputs
PieceRunner = Callable[[int, "tuple | None"], tuple]


class PaddedPieces:
    """The model's forward as L+1 token-wise pieces on a padded bucket with eager attention between them.

    Plain torch (runs on the CPU with the reference ops); `PiecewiseGraphRunner` captures `piece` and
    replays it through `forward`'s `run_piece` hook."""

    def __init__(self, model: LlamaForCausalLM, kv_caches: list[KVCache], max_tokens: int, device: torch.device):
        if not model.layers:
            raise ValueError("piecewise graphs need a model with at least one layer")
        if len(kv_caches) != len(model.layers):
            raise ValueError(f"got {len(kv_caches)} KV caches for {len(model.layers)} layers")
        self.model = model
        self.kv_caches = kv_caches
        self.max_tokens = max_tokens
        self.num_layers = len(model.layers)
        cfg = model.config
        dtype = model.embed_tokens.weight.dtype
        # zeros: valid token ids, positions, scratch slots and finite activations for the padding rows
        self.input_ids = torch.zeros(max_tokens, dtype=torch.int64, device=device)
        self.positions = torch.zeros(max_tokens, dtype=torch.int64, device=device)
        self.out_slots = torch.zeros(max_tokens, dtype=torch.int64, device=device)
        self.attn_out = torch.zeros(max_tokens, cfg.num_attention_heads, cfg.head_dim, dtype=dtype, device=device)

    @property
    def num_pieces(self) -> int:
        return self.num_layers + 1

    def piece(self, index: int, bucket: int, previous: tuple | None) -> tuple:
        """Piece `index` on `bucket` rows (what one CUDA graph holds); `previous` is piece index-1's outputs."""
        layers = self.model.layers
        if index == 0:
            hidden, residual = self.model.embed_tokens(self.input_ids[:bucket]), None
        else:
            hidden, residual = layers[index - 1].after_attention(self.attn_out[:bucket], previous[-1])
            if index == self.num_layers:
                return hidden, residual
        q, k, v, residual = layers[index].before_attention(hidden, residual)
        q = layers[index].self_attn.rope_and_write_kv(
            q, k, v, self.positions[:bucket], self.out_slots[:bucket], self.kv_caches[index], self.model.rope_cache
        )
        return q, residual

    def load_inputs(self, batch: ForwardBatch, bucket: int, future_tokens: torch.Tensor | None) -> None:
        """The step's ids, positions and KV slots into the static buffers (rows past T: scratch slot 0);
        references to future tokens resolved in the ids, on the device."""
        num_tokens = batch.num_tokens
        ids = self.input_ids[:num_tokens]
        ids.copy_(batch.input_ids)
        if future_tokens is not None:
            ids.copy_(resolve_future_tokens(ids, future_tokens))
        self.positions[:num_tokens].copy_(batch.positions)
        self.out_slots[:num_tokens].copy_(batch.out_slots)
        self.out_slots[num_tokens:bucket].zero_()

    def forward(
        self,
        batch: ForwardBatch,
        meta: AttentionMetadata,
        bucket: int,
        future_tokens: torch.Tensor | None = None,
        run_piece: PieceRunner | None = None,
    ) -> torch.Tensor:
        """One step of `batch.num_tokens` <= bucket tokens (batch and meta on the device): float32 logits
        [len(batch.logits_indices), vocab]. `run_piece(index, previous)` runs a piece (default: eagerly)."""
        num_tokens = batch.num_tokens
        if not 0 < num_tokens <= bucket <= self.max_tokens:
            raise ValueError(f"a step of {num_tokens} tokens does not fit bucket {bucket} (max {self.max_tokens})")
        if run_piece is None:
            def run_piece(index: int, previous: tuple | None) -> tuple:
                return self.piece(index, bucket, previous)

        self.load_inputs(batch, bucket, future_tokens)
        outputs = None
        for index, (layer, kv_cache) in enumerate(zip(self.model.layers, self.kv_caches)):
            outputs = run_piece(index, outputs)
            q, _ = outputs
            layer.self_attn.paged_attention(q[:num_tokens], kv_cache, meta, out=self.attn_out[:num_tokens])
        hidden, residual = run_piece(self.num_layers, outputs)
        return self.model.compute_logits(hidden, residual, batch.logits_indices)


class _DeviceMemory:
    """A bare CUDA array interface over `nbytes` at `pointer`: a tensor made from it does not own the memory."""

    def __init__(self, pointer: int, nbytes: int):
        self.__cuda_array_interface__ = {
            "shape": (nbytes,), "typestr": "|u1", "data": (pointer, False), "strides": None, "version": 3,
        }


def _non_owning_alias(tensor: torch.Tensor) -> torch.Tensor:
    """A tensor over the same memory, shape and strides as `tensor` that does not keep that memory allocated."""
    storage = tensor.untyped_storage()
    raw = torch.as_tensor(_DeviceMemory(storage.data_ptr(), storage.nbytes()), device=tensor.device)
    return raw.view(tensor.dtype).as_strided(tensor.shape, tensor.stride(), tensor.storage_offset())


class PiecewiseGraphRunner:
    """Captures the pieces of every bucket as CUDA graphs and replays them (see the module docstring).

    Before `capture` (or on a CPU, where it cannot run) `run` goes through the same schedule with the
    pieces run eagerly: what the CPU tests check."""

    def __init__(
        self,
        model: LlamaForCausalLM,
        kv_caches: list[KVCache],
        attention: CudaAttentionBackend,
        max_tokens: int,
        device: torch.device,
    ):
        self.attention = attention
        self.device = device
        self.buckets = token_buckets(max_tokens)
        self.pieces = PaddedPieces(model, kv_caches, max(self.buckets, default=1), device)
        self._graphs: dict[int, list[torch.cuda.CUDAGraph]] = {}
        self._outputs: dict[int, list[tuple[torch.Tensor, ...]]] = {}  # non-owning aliases, per bucket and piece

    @staticmethod
    def reserve_bytes(model_config, max_tokens: int, element_size: int) -> int:
        """What the capture takes at most: the pool (about two pieces' outputs and one piece's temporaries
        at the largest bucket, doubled for the allocator's rounding), the static buffers, the capture
        stream's cuBLAS workspace, and the instantiated graphs themselves (measured on an H200: 0.34 GiB
        for qwen3-0.6b's 348 graphs up to 2048 tokens, of which ~0.1 GiB activations)."""
        cfg = model_config
        qkv = cfg.q_size + 2 * cfg.kv_size
        per_token = 2 * qkv + (cfg.q_size + cfg.kv_size) + 3 * cfg.intermediate_size + 8 * cfg.hidden_size
        activations = 2 * max_tokens * per_token * element_size
        static = max_tokens * (cfg.q_size * element_size + 3 * 8)  # attn_out; ids, positions, slots
        graphs = len(token_buckets(max_tokens)) * (cfg.num_hidden_layers + 1) * _GRAPH_BYTES
        return activations + static + graphs + 64 * MiB

    # ------------------------------------------------------------------ capture
    def capture(self, progress: bool = True) -> None:
        """Warm up and capture every bucket, largest first (later buckets reuse its pool memory)."""
        if self.device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA device, got {self.device}")
        pieces = self.pieces
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        pool = None
        start = time.perf_counter()
        total = len(self.buckets) * pieces.num_pieces
        with torch.inference_mode(), tqdm(total=total, desc="Capturing piecewise CUDA graphs", unit="graph",
                                          disable=not progress) as bar:
            for bucket in reversed(self.buckets):
                with torch.cuda.stream(stream):
                    # Eagerly first, on the capture stream: Triton compiles, cuBLAS picks its kernels and
                    # sets up this stream's workspace outside the capture. Every static slot is 0 (no step
                    # has run yet), so these K/V writes land in the scratch page.
                    pieces.out_slots.zero_()
                    outputs = None
                    for index in range(pieces.num_pieces):
                        outputs = pieces.piece(index, bucket, outputs)
                    del outputs
                stream.synchronize()
                gc.collect()  # once per bucket (torch.cuda.graph would do it for every graph)
                graphs, aliases, outputs = [], [], None
                for index in range(pieces.num_pieces):
                    graph = torch.cuda.CUDAGraph()
                    with torch.cuda.stream(stream):
                        graph.capture_begin(pool=pool)
                        try:
                            new_outputs = pieces.piece(index, bucket, outputs)
                        finally:
                            graph.capture_end()
                    pool = graph.pool()
                    graphs.append(graph)
                    aliases.append(tuple(_non_owning_alias(t) for t in new_outputs))
                    outputs = new_outputs  # the previous piece's outputs are dropped here (rule 1)
                    bar.update()
                del outputs, new_outputs
                self._graphs[bucket] = graphs
                self._outputs[bucket] = aliases
                bar.set_postfix_str(f"tokens={bucket}")
        torch.cuda.synchronize(self.device)
        log.info("piecewise CUDA graphs: %d graphs (%d buckets of %d pieces, up to %d tokens) in %.1f s",
                 total, len(self.buckets), pieces.num_pieces, self.buckets[-1], time.perf_counter() - start)

    # ------------------------------------------------------------------ replay
    def can_run(self, batch: ForwardBatch) -> bool:
        """True for a step of 1 to max-bucket tokens (the executor sends decode-only steps to its decode
        graphs first)."""
        return bucket_for(self.buckets, batch.num_tokens) is not None

    def run(self, batch: ForwardBatch, future_tokens: torch.Tensor | None = None) -> torch.Tensor:
        """The step through the graphs of its bucket, with eager attention between them: float32 logits."""
        bucket = bucket_for(self.buckets, batch.num_tokens)
        if bucket is None:
            raise ValueError(f"no piecewise graph holds a step of {batch.num_tokens} tokens")
        on_device, meta = self.attention.prepare(batch)
        replay = None
        if bucket in self._graphs:
            graphs, aliases = self._graphs[bucket], self._outputs[bucket]

            def replay(index: int, _previous: tuple | None) -> tuple:
                graphs[index].replay()
                return aliases[index]

        with torch.inference_mode():
            return self.pieces.forward(on_device, meta, bucket, future_tokens, run_piece=replay)

    @property
    def num_graphs(self) -> int:
        return sum(len(graphs) for graphs in self._graphs.values())
