"""Test helpers: tiny random-weight Hugging Face checkpoints, the transformers oracle, and
hand-built ForwardBatch objects over a shuffled page pool (as the engine's allocator would hand out).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path

import torch

from worker.engine.forward_batch import ForwardBatch

TINY = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=512,
)

LLAMA3_SCALING = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,
}


def tiny_hf_config(kind: str):
    """A small transformers config of one supported family, in float32 with eager attention."""
    import transformers as tf

    configs = {
        "llama": lambda: tf.LlamaConfig(**TINY),
        "llama3_scaled": lambda: tf.LlamaConfig(**TINY, rope_theta=500000.0, rope_scaling=dict(LLAMA3_SCALING)),
        "llama_tied": lambda: tf.LlamaConfig(**TINY, tie_word_embeddings=True),
        "qwen2": lambda: tf.Qwen2Config(**TINY),
        # head_dim 32 while hidden/heads = 16: exercises q_size != hidden
        "qwen3": lambda: tf.Qwen3Config(**TINY, head_dim=32),
        "mistral": lambda: tf.MistralConfig(**TINY),
    }
    config = configs[kind]()
    config.dtype = torch.float32
    return config


def make_hf_checkpoint(folder: Path, kind: str, seed: int = 0, max_shard_size: str | None = None) -> Path:
    """Write a random-weight checkpoint of `kind` (see tiny_hf_config) to `folder` as safetensors.

    Weights are drawn larger than transformers' default init (std 0.02) so attention is far from
    uniform and logits spread out: a wrong position, page or head would show in the logits.
    """
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_hf_config(kind), dtype=torch.float32)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.normal_(1.0, 0.2)
            else:
                param.normal_(0.0, 0.15)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(folder, **kwargs)
    return Path(folder)


def load_hf_oracle(folder: Path):
    """The transformers model read back from `folder`: float32, eager attention, eval mode."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager")
    return model.eval()


def hf_logits(model, token_ids: list[int]) -> torch.Tensor:
    """[len(token_ids), vocab] float32 logits of every position of one sequence."""
    with torch.inference_mode():
        return model(input_ids=torch.tensor([token_ids])).logits[0].float()


def random_prompts(lengths: list[int], vocab: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(vocab) for _ in range(n)] for n in lengths]


# --------------------------------------------------------------------------- paged batches by hand
@dataclass
class PagedSequence:
    tokens: list[int]
    num_computed: int = 0  # tokens whose K/V are already in the cache
    pages: list[int] = field(default_factory=list)


class PagePool:
    """Hands out page ids 1..num_pages in a shuffled order, so sequences get scattered pages."""

    def __init__(self, num_pages: int, seed: int):
        self.free = list(range(1, num_pages + 1))
        random.Random(seed).shuffle(self.free)

    def grow(self, seq: PagedSequence, length: int, page_size: int) -> None:
        while len(seq.pages) * page_size < length:
            seq.pages.append(self.free.pop())


def build_batch(
    steps: list[tuple[PagedSequence, int]], page_size: int, all_logits: bool = False
) -> ForwardBatch:
    """One ForwardBatch computing `n` new tokens of each (sequence, n), in the order given.

    Callers list decodes (n == 1 with a cached prefix) first, as the engine does. Logits are
    returned for the last new token of each sequence, or for every new token with all_logits.
    """
    input_ids, positions, out_slots, logits_rows = [], [], [], []
    seq_lens, extend_lens = [], []
    for seq, n in steps:
        start = seq.num_computed
        for pos in range(start, start + n):
            input_ids.append(seq.tokens[pos])
            positions.append(pos)
            out_slots.append(seq.pages[pos // page_size] * page_size + pos % page_size)
        rows = range(len(input_ids) - n, len(input_ids))
        logits_rows.extend(rows if all_logits else [rows[-1]])
        seq_lens.append(start + n)
        extend_lens.append(n)
    max_pages = max(len(seq.pages) for seq, _ in steps)
    page_tables = torch.zeros(len(steps), max_pages, dtype=torch.int32)
    for b, (seq, _) in enumerate(steps):
        page_tables[b, : len(seq.pages)] = torch.tensor(seq.pages, dtype=torch.int32)
    num_decodes = 0
    for (seq, n) in steps:
        if n != 1 or seq.num_computed == 0:
            break
        num_decodes += 1
    return ForwardBatch(
        input_ids=torch.tensor(input_ids, dtype=torch.int64),
        positions=torch.tensor(positions, dtype=torch.int64),
        out_slots=torch.tensor(out_slots, dtype=torch.int64),
        page_tables=page_tables,
        seq_lens=seq_lens,
        extend_lens=extend_lens,
        logits_indices=torch.tensor(logits_rows, dtype=torch.int64),
        num_decodes=num_decodes,
        page_size=page_size,
    )
