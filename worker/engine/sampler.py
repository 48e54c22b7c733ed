"""Turn one step's logits into one token per sequence.

The pipeline, in vLLM's order (what users of the OpenAI-style API expect):

1. penalties: repetition (Hugging Face style, over prompt + output tokens: positive logits are divided by
   the penalty, negative ones multiplied), then frequency and presence (OpenAI style, over output tokens:
   `logit -= frequency * count + presence * (count > 0)`). Rows with a `counts_key` (the engine's) read
   counts kept on the device across steps (worker.engine.sampling_penalties.PenaltyCounts);
2. min_tokens: while a sequence has fewer than `min_tokens` output tokens, its eos ids and stop token ids
   are masked out (whatever `ignore_eos` says); then the logit processors (worker.engine.logit_processors);
3. temperature; a temperature of (almost) 0 means greedy: argmax of the penalised logits;
4. top_k, then top_p (one descending sort of the rows that need either), then min_p;
5. sampling by the exponential race: argmax(probs / E) with E ~ Exponential(1) i.i.d., which draws from
   `probs` exactly and needs no cumulative sum. On CUDA the race runs in log space in one fused kernel
   (`kernels/triton_sampling.py`: Gumbel-max, greedy and random rows together, temperature applied
   in the kernel), so no softmax, noise tensor or host sync is needed.

Randomness. A request with a `seed` gets noise that depends on (seed, choice index, output position) only,
so its tokens do not depend on what else is in the batch, on its row, or on whether it was preempted and
recomputed. On CUDA that is a per-row Philox key given to the fused kernel; on the CPU a generator
re-seeded for that row. Rows without a seed take fresh keys (CUDA) or share one batch generator (CPU).

Host -> device uploads of per-row values go through pinned memory with non_blocking copies: a plain
`torch.tensor(list, device="cuda")` waits for the GPU to drain, which would serialise overlap scheduling.

Logprobs are taken from log_softmax of the raw logits handed to the sampler (before penalties and
temperature), as vLLM reports them by default.

Stop conditions (eos, max_tokens, stop strings) are not decided here: the scheduler and
`worker.engine.output` do that.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Hashable

import torch

from worker.engine.logit_processors import apply_logit_processors
from worker.engine.sampled_tokens import PendingSample, SampleResult, logprob_tensors
from worker.engine.sampling_filters import apply_min_p, apply_top_k, apply_top_k_top_p, device_tensor
from worker.engine.sampling_penalties import PenaltyCounts, apply_row_penalties, mask_stop_tokens
from worker.sampling_params import SamplingParams

__all__ = [  # the filters and PendingSample live in their own modules; importable from here as before
    "PendingSample", "SampleResult", "Sampler", "SamplingState", "apply_min_p", "apply_top_k",
    "apply_top_k_top_p", "row_seed",
]

# Temperatures below this are treated as greedy: dividing by them would overflow float32 logits.
GREEDY_TEMPERATURE = 1e-5

_MASK64 = (1 << 64) - 1


@dataclass
class SamplingState:
    """What the sampler needs to know about one row of the batch."""

    params: SamplingParams
    prompt_token_ids: list[int]
    output_token_ids: list[int]  # generated so far by this sequence (one choice of a request)
    choice_index: int = 0  # which of the n choices: seeded choices get distinct, reproducible streams
    eos_token_ids: tuple[int, ...] = ()
    # identifies the sequence across steps (the engine's seq_id): penalties then use counts kept on the
    # device, bumped from each sample, freed by `Sampler.penalty_counts.release(key)`; None: counted every step
    counts_key: Hashable | None = None

    @property
    def is_greedy(self) -> bool:
        return self.params.temperature < GREEDY_TEMPERATURE

    @property
    def blocks_stop_tokens(self) -> bool:
        """True while min_tokens forbids eos and stop token ids."""
        return len(self.output_token_ids) < self.params.min_tokens


def _splitmix64(value: int) -> int:
    """One round of the splitmix64 finaliser: a cheap, well-mixed 64-bit hash of an integer."""
    value = (value + 0x9E3779B97F4A7C15) & _MASK64
    value = ((value ^ (value >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    value = ((value ^ (value >> 27)) * 0x94D049BB133111EB) & _MASK64
    return value ^ (value >> 31)


def row_seed(seed: int, choice_index: int, position: int) -> int:
    """The generator seed for one seeded draw, from (seed, choice index, output position) alone.

    Deterministic across processes (no use of Python's salted `hash`), non-negative and below 2**63.
    """
    mixed = _splitmix64(seed & _MASK64)
    high = seed >> 64
    while high not in (0, -1):  # Python ints are unbounded: fold in every 64-bit limb of a huge seed
        mixed = _splitmix64(mixed ^ (high & _MASK64))
        high >>= 64
    mixed = _splitmix64(mixed ^ (choice_index & _MASK64))
    mixed = _splitmix64(mixed ^ (position & _MASK64))
    return mixed & ((1 << 63) - 1)


class Sampler:
    """Samples one token per row from float32 logits [B, V] on any torch device.

    `vocab_size`: the tokenizer's vocabulary; logits with more columns (an lm_head padded for speed) have
    the extra columns dropped, so padding ids are never sampled. `seed` seeds the generator shared by rows
    without a per-request seed. `grammars` (worker.engine.grammar.GrammarMasks) masks structured outputs.
    """

    def __init__(self, vocab_size: int, device: torch.device | str, seed: int = 0, grammars=None):
        if vocab_size <= 0:
            raise ValueError(f"vocab_size must be positive, got {vocab_size}")
        self.vocab_size = vocab_size
        self.device = torch.device(device)
        self._batch_generator = torch.Generator(device=self.device)
        self._batch_generator.manual_seed(seed)
        # Re-seeded before every seeded row's draw; kept to avoid creating a generator per row per step.
        self._row_generator = torch.Generator(device=self.device)
        # CUDA: fresh Philox keys for unseeded rows, from the engine seed (reproducible run to run).
        self._key_source = random.Random(seed)
        self._fused = self.device.type == "cuda"
        self.grammars = grammars
        self.penalty_counts = PenaltyCounts(vocab_size, self.device)  # allocates nothing until a penalised row

    # ------------------------------------------------------------------ entry point
    def __call__(self, logits: torch.Tensor, states: list[SamplingState]) -> SampleResult:
        return self.sample_async(logits, states).result()

    def sample_async(self, logits: torch.Tensor, states: list[SamplingState]) -> PendingSample:
        """Queue the sampling of one token per row without waiting for the device.

        Penalised rows with a `counts_key` read their counts on the device, and this step's tokens are added
        to them behind the sample on the same stream; rows without one read `output_token_ids` on the host
        (so need real tokens there). min_tokens and seeded draws only count the outputs. Everything the
        result needs is computed now, so `logits` may be overwritten right after.
        """
        raw = self._checked_logits(logits, states)
        work, counted = self._penalised(raw, states, sampling=True)
        if all(s.is_greedy for s in states):
            tokens = work.argmax(dim=-1)  # the fast path: no softmax, no sort, no noise
        elif self._fused:
            tokens = self._sample_fused(work, raw, states)
        else:
            tokens = self._sample_mixed(work, states)

        logprob_rows = [i for i, s in enumerate(states) if s.params.logprobs is not None]
        top_counts = [states[i].params.logprobs for i in logprob_rows]
        parts = logprob_tensors(raw, tokens, self._index(logprob_rows), top_counts) if logprob_rows else None
        pending = PendingSample(tokens, parts, logprob_rows, top_counts, len(states))
        if counted is not None:  # same stream, behind the sample and its copies to the host (which need not wait)
            self.penalty_counts.count_sampled(counted, tokens)
        return pending

    def process_logits(self, logits: torch.Tensor, states: list[SamplingState]) -> torch.Tensor:
        """The logits after penalties and min_tokens masking, before temperature: float32 [B, vocab_size].

        What greedy rows take the argmax of. The caller's tensor is never modified.
        """
        return self._penalised(self._checked_logits(logits, states), states, sampling=False)[0]

    def _penalised(self, raw: torch.Tensor, states: list[SamplingState], sampling: bool):
        """(penalised float32 logits, the rows whose device counts take this step's tokens, or None)."""
        work = raw.float()
        penalty_rows = [i for i, s in enumerate(states) if s.params.uses_penalties]
        min_tokens_rows = [i for i, s in enumerate(states) if s.blocks_stop_tokens]
        processor_rows = [i for i, s in enumerate(states) if s.params.uses_logit_processors]
        if (penalty_rows or min_tokens_rows or processor_rows) and work.data_ptr() == raw.data_ptr():
            work = work.clone()  # never modify the caller's logits
        counted = None
        if penalty_rows:
            counted = apply_row_penalties(work, penalty_rows, states, self.penalty_counts, sampling)
        if min_tokens_rows:
            mask_stop_tokens(work, min_tokens_rows, states, self.vocab_size)
        if processor_rows:
            apply_logit_processors(work, processor_rows, states, self.grammars)
        return work, counted

    def _checked_logits(self, logits: torch.Tensor, states: list[SamplingState]) -> torch.Tensor:
        if logits.dim() != 2:
            raise ValueError(f"logits must be 2-D [batch, vocab], got shape {tuple(logits.shape)}")
        if logits.shape[0] != len(states):
            raise ValueError(f"logits have {logits.shape[0]} rows but {len(states)} sampling states were given")
        if logits.device.type != self.device.type:
            raise ValueError(f"logits are on {logits.device} but the sampler was built for {self.device}")
        if logits.shape[1] < self.vocab_size:
            raise ValueError(f"logits have {logits.shape[1]} columns, fewer than vocab_size={self.vocab_size}")
        return logits[:, : self.vocab_size]

    def _upload(self, values: list, dtype: torch.dtype) -> torch.Tensor:
        """A 1-D tensor of `values` on the sampler's device, queued without waiting for the device."""
        return device_tensor(values, dtype, self.device)

    def _index(self, rows: list[int]) -> torch.Tensor:
        return self._upload(rows, torch.long)

    def _float_column(self, values: list[float]) -> torch.Tensor:
        return self._upload(values, torch.float32).unsqueeze(1)

    # ------------------------------------------------------------------ sampling
    def _sample_fused(self, work: torch.Tensor, raw: torch.Tensor, states: list[SamplingState]) -> torch.Tensor:
        """CUDA: greedy and random rows in one Gumbel-max launch, temperature applied in the kernel.

        Rows with top_k / top_p / min_p are divided by their temperature and filtered first (those filters
        depend on the temperature), then enter the kernel with an inverse temperature of 1.
        """
        from kernels.triton_sampling import gumbel_argmax

        vocab = self.vocab_size
        inv_temperature, keys, is_random, filtered = [], [], [], []
        for i, state in enumerate(states):
            params = state.params
            if state.is_greedy:
                inv_temperature.append(1.0)
                keys.append(0)
                is_random.append(False)
                continue
            is_random.append(True)
            if params.seed is not None:
                keys.append(row_seed(params.seed, state.choice_index, len(state.output_token_ids)))
            else:
                keys.append(self._key_source.getrandbits(63))
            if 0 < params.top_k < vocab or params.top_p < 1.0 or params.min_p > 0.0:
                filtered.append(i)
                inv_temperature.append(1.0)
            else:
                inv_temperature.append(1.0 / params.temperature)
        if filtered:
            if work.data_ptr() == raw.data_ptr():
                work = work.clone()  # never modify the caller's logits
            index = self._index(filtered)
            sub = self._filtered(work.index_select(0, index), [states[i] for i in filtered])
            work.index_copy_(0, index, sub)
        return gumbel_argmax(
            work, self._upload(inv_temperature, torch.float32), self._upload(keys, torch.long),
            self._upload(is_random, torch.bool),
        )

    def _filtered(self, logits: torch.Tensor, states: list[SamplingState]) -> torch.Tensor:
        """Random rows' logits divided by their temperature, then top_k, top_p and min_p applied."""
        params = [s.params for s in states]
        scaled = logits / self._float_column([p.temperature for p in params])
        vocab = self.vocab_size
        top_k = [p.top_k if 0 < p.top_k < vocab else vocab for p in params]
        top_p = [p.top_p if p.top_p < 1.0 else float("inf") for p in params]
        if any(p != float("inf") for p in top_p):
            scaled = apply_top_k_top_p(scaled, top_k, top_p)
        elif any(k < vocab for k in top_k):
            scaled = apply_top_k(scaled, top_k)
        min_p = [p.min_p for p in params]
        if any(m > 0.0 for m in min_p):
            scaled = apply_min_p(scaled, self._float_column(min_p))
        return scaled

    def _sample_mixed(self, logits: torch.Tensor, states: list[SamplingState]) -> torch.Tensor:
        """Greedy rows take the argmax; the other rows are filtered and sampled together."""
        greedy_rows = [i for i, s in enumerate(states) if s.is_greedy]
        random_rows = [i for i, s in enumerate(states) if not s.is_greedy]
        random_states = [states[i] for i in random_rows]
        if greedy_rows:
            tokens = torch.empty(len(states), dtype=torch.long, device=self.device)
            greedy_index = self._index(greedy_rows)
            tokens[greedy_index] = logits.index_select(0, greedy_index).argmax(dim=-1)
            random_index = self._index(random_rows)
            scaled = logits.index_select(0, random_index)
        else:
            tokens = None
            scaled = logits

        scaled = self._filtered(scaled, random_states)
        probs = torch.softmax(scaled, dim=-1)
        noise = self._exponential_noise(probs.shape, random_states)
        chosen = probs.div_(noise).argmax(dim=-1)
        if tokens is None:
            return chosen
        tokens[random_index] = chosen
        return tokens

    def _exponential_noise(self, shape: torch.Size, states: list[SamplingState]) -> torch.Tensor:
        """Exponential(1) noise [R, V]: per-row generators for seeded rows, the batch generator for the rest."""
        noise = torch.empty(shape, dtype=torch.float32, device=self.device)
        unseeded = [j for j, s in enumerate(states) if s.params.seed is None]
        if len(unseeded) == len(states):
            noise.exponential_(generator=self._batch_generator)
        elif unseeded:
            draw = torch.empty(len(unseeded), shape[1], dtype=torch.float32, device=self.device)
            noise[self._index(unseeded)] = draw.exponential_(generator=self._batch_generator)
        for j, state in enumerate(states):
            if state.params.seed is None:
                continue
            self._row_generator.manual_seed(
                row_seed(state.params.seed, state.choice_index, len(state.output_token_ids))
            )
            # A fresh contiguous buffer: the draw must not depend on the row's place in the batch.
            row = torch.empty(shape[1], dtype=torch.float32, device=self.device)
            noise[j] = row.exponential_(generator=self._row_generator)
        # A draw of exactly 0 would turn a masked token's 0 probability into 0/0 = NaN, which argmax prefers.
        return noise.clamp_(min=torch.finfo(torch.float32).tiny)
