"""Turn one step's logits into one token per sequence.

The pipeline, in vLLM's order (what users of the OpenAI-style API expect):

1. penalties: repetition (Hugging Face style, over prompt + output tokens: positive logits are divided by
   the penalty, negative ones multiplied), then frequency and presence (OpenAI style, over output tokens:
   `logit -= frequency * count + presence * (count > 0)`);
2. min_tokens: while a sequence has fewer than `min_tokens` output tokens, its eos ids and stop token ids
   are masked out (whatever `ignore_eos` says);
3. temperature; a temperature of (almost) 0 means greedy: argmax of the penalised logits;
4. top_k, then top_p (one descending sort of the rows that need either), then min_p;
5. sampling by the exponential race: argmax(probs / E) with E ~ Exponential(1) i.i.d., which draws from
   `probs` exactly and needs no cumulative sum.

Randomness. A request with a `seed` gets noise that depends on (seed, choice index, output position) only,
through a generator re-seeded for that row, so its tokens do not depend on what else is in the batch, on
its row, or on whether it was preempted and recomputed. Rows without a seed share one batch generator.

Logprobs are taken from log_softmax of the raw logits handed to the sampler (before penalties and
temperature), as vLLM reports them by default.

Stop conditions (eos, max_tokens, stop strings) are not decided here: the scheduler and
`worker.engine.output` do that.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from itertools import chain

import numpy as np
import torch

from worker.engine.protocol import TokenLogprob
from worker.sampling_params import SamplingParams

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

    @property
    def is_greedy(self) -> bool:
        return self.params.temperature < GREEDY_TEMPERATURE

    @property
    def blocks_stop_tokens(self) -> bool:
        """True while min_tokens forbids eos and stop token ids."""
        return len(self.output_token_ids) < self.params.min_tokens


@dataclass
class SampleResult:
    token_ids: list[int]  # one per row
    logprobs: list[TokenLogprob | None]  # one per row; None where the request did not ask for logprobs


class PendingSample:
    """A step's sampled tokens (and logprobs) on their way to the host.

    Built by `Sampler.sample_async` right after the sampling kernels are queued: `token_ids` stays on the
    device (the next step may read it there), and copies into pinned host memory are queued behind it with
    an event. `result()` waits for that event only, so the host can prepare the next step in the meantime.
    On the CPU everything is already done and `result()` just converts.
    """

    def __init__(self, token_ids: torch.Tensor, logprob_parts: tuple | None, logprob_rows: list[int],
                 top_counts: list[int], num_rows: int):
        self.token_ids = token_ids  # [B] int64 on the sampler's device
        self._num_rows = num_rows
        self._logprob_rows = logprob_rows
        self._top_counts = top_counts
        parts = (token_ids,) + (logprob_parts or ())
        if token_ids.device.type == "cuda":
            self._host = tuple(_to_pinned_host(t) for t in parts)
            self._ready: torch.cuda.Event | None = torch.cuda.Event()
            self._ready.record()
        else:
            self._host = parts
            self._ready = None
        self._result: SampleResult | None = None

    def result(self) -> SampleResult:
        """Wait for the copies (not for later work on the device) and return the tokens as Python ints."""
        if self._result is None:
            if self._ready is not None:
                self._ready.synchronize()
            tokens, *logprob_parts = self._host
            logprobs: list[TokenLogprob | None] = [None] * self._num_rows
            if self._logprob_rows:
                entries = _logprob_entries(*logprob_parts, self._top_counts)
                for row, entry in zip(self._logprob_rows, entries):
                    logprobs[row] = entry
            self._result = SampleResult(token_ids=tokens.tolist(), logprobs=logprobs)
        return self._result


def _to_pinned_host(tensor: torch.Tensor) -> torch.Tensor:
    host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
    host.copy_(tensor, non_blocking=True)
    return host


def _logprob_entries(
    chosen: torch.Tensor, chosen_logprob: torch.Tensor, ranks: torch.Tensor,
    top_values: torch.Tensor, top_ids: torch.Tensor, top_counts: list[int],
) -> list[TokenLogprob]:
    """Host tensors from `Sampler._logprob_tensors` -> one TokenLogprob per logprob row."""
    chosen_list = chosen.tolist()
    chosen_logprob_list = chosen_logprob.tolist()
    ranks_list = ranks.tolist()
    top_values_list, top_ids_list = top_values.tolist(), top_ids.tolist()
    entries = []
    for j, k in enumerate(top_counts):
        top = list(zip(top_ids_list[j][:k], top_values_list[j][:k])) if k > 0 else []
        entries.append(
            TokenLogprob(token_id=chosen_list[j], logprob=chosen_logprob_list[j], rank=ranks_list[j], top=top)
        )
    return entries


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
    without a per-request seed.
    """

    def __init__(self, vocab_size: int, device: torch.device | str, seed: int = 0):
        if vocab_size <= 0:
            raise ValueError(f"vocab_size must be positive, got {vocab_size}")
        self.vocab_size = vocab_size
        self.device = torch.device(device)
        self._batch_generator = torch.Generator(device=self.device)
        self._batch_generator.manual_seed(seed)
        # Re-seeded before every seeded row's draw; kept to avoid creating a generator per row per step.
        self._row_generator = torch.Generator(device=self.device)

    # ------------------------------------------------------------------ entry point
    def __call__(self, logits: torch.Tensor, states: list[SamplingState]) -> SampleResult:
        return self.sample_async(logits, states).result()

    def sample_async(self, logits: torch.Tensor, states: list[SamplingState]) -> PendingSample:
        """Queue the sampling of one token per row without waiting for the device.

        Penalties read `output_token_ids` on the host, so rows using them need real tokens there (the
        engine resolves pending tokens first); min_tokens and seeded draws only count the outputs.
        Everything the result needs is computed now, so `logits` may be overwritten right after.
        """
        raw = self._checked_logits(logits, states)
        work = self._penalised(raw, states)
        if all(s.is_greedy for s in states):
            tokens = work.argmax(dim=-1)  # the fast path: no softmax, no sort, no noise
        else:
            tokens = self._sample_mixed(work, states)

        logprob_rows = [i for i, s in enumerate(states) if s.params.logprobs is not None]
        top_counts = [states[i].params.logprobs for i in logprob_rows]
        parts = self._logprob_tensors(raw, tokens, logprob_rows, top_counts) if logprob_rows else None
        return PendingSample(tokens, parts, logprob_rows, top_counts, len(states))

    def process_logits(self, logits: torch.Tensor, states: list[SamplingState]) -> torch.Tensor:
        """The logits after penalties and min_tokens masking, before temperature: float32 [B, vocab_size].

        What greedy rows take the argmax of. The caller's tensor is never modified.
        """
        return self._penalised(self._checked_logits(logits, states), states)

    def _penalised(self, raw: torch.Tensor, states: list[SamplingState]) -> torch.Tensor:
        work = raw.float()
        penalty_rows = [i for i, s in enumerate(states) if s.params.uses_penalties]
        min_tokens_rows = [i for i, s in enumerate(states) if s.blocks_stop_tokens]
        if penalty_rows or min_tokens_rows:
            if work.data_ptr() == raw.data_ptr():
                work = work.clone()  # never modify the caller's logits
            if penalty_rows:
                self._apply_penalties(work, penalty_rows, states)
            if min_tokens_rows:
                self._mask_stop_tokens(work, min_tokens_rows, states)
        return work

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

    def _index(self, rows: list[int]) -> torch.Tensor:
        return torch.tensor(rows, dtype=torch.long, device=self.device)

    def _float_column(self, values: list[float]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.float32, device=self.device).unsqueeze(1)

    # ------------------------------------------------------------------ penalties and masks
    def _token_counts(self, id_lists: list[list[int]]) -> torch.Tensor:
        """[R, V] float32: how often each token id occurs in each row's list (ids outside the vocab ignored).

        One flat bincount over `row * (V + 1) + id`; the extra column per row collects out-of-vocab ids.
        """
        vocab = self.vocab_size
        lengths = [len(ids) for ids in id_lists]
        # numpy.fromiter is several times faster than torch.tensor on long Python lists (prompts re-sent each step)
        flat_ids = np.fromiter(chain.from_iterable(id_lists), dtype=np.int64, count=sum(lengths))
        flat = torch.from_numpy(flat_ids).to(self.device, non_blocking=True)
        rows = torch.repeat_interleave(
            torch.arange(len(id_lists), device=self.device), torch.tensor(lengths).to(self.device, non_blocking=True)
        )
        flat = torch.where((flat >= 0) & (flat < vocab), flat, vocab)
        counts = torch.bincount(rows * (vocab + 1) + flat, minlength=len(id_lists) * (vocab + 1))
        return counts.view(len(id_lists), vocab + 1)[:, :vocab].float()

    def _apply_penalties(self, logits: torch.Tensor, rows: list[int], states: list[SamplingState]) -> None:
        index = self._index(rows)
        params = [states[i].params for i in rows]
        sub = logits.index_select(0, index)
        output_counts = self._token_counts([states[i].output_token_ids for i in rows])

        repetition = [p.repetition_penalty for p in params]
        if any(r != 1.0 for r in repetition):
            seen = (self._token_counts([states[i].prompt_token_ids for i in rows]) > 0) | (output_counts > 0)
            penalty = self._float_column(repetition)
            penalised = torch.where(sub > 0, sub / penalty, sub * penalty)
            sub = torch.where(seen, penalised, sub)

        frequency = [p.frequency_penalty for p in params]
        if any(f != 0.0 for f in frequency):
            sub = sub - self._float_column(frequency) * output_counts
        presence = [p.presence_penalty for p in params]
        if any(p != 0.0 for p in presence):
            sub = sub - self._float_column(presence) * (output_counts > 0).float()
        logits.index_copy_(0, index, sub)

    def _mask_stop_tokens(self, logits: torch.Tensor, rows: list[int], states: list[SamplingState]) -> None:
        """min_tokens: forbid eos and stop token ids in the given rows."""
        row_ids: list[int] = []
        col_ids: list[int] = []
        for row in rows:
            state = states[row]
            banned = {t for t in (*state.eos_token_ids, *state.params.stop_token_ids) if 0 <= t < self.vocab_size}
            row_ids.extend([row] * len(banned))
            col_ids.extend(sorted(banned))
        if row_ids:
            logits[self._index(row_ids), self._index(col_ids)] = float("-inf")

    # ------------------------------------------------------------------ sampling
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

        params = [s.params for s in random_states]
        scaled = scaled / self._float_column([p.temperature for p in params])
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

    # ------------------------------------------------------------------ logprobs
    def _logprob_tensors(
        self, raw: torch.Tensor, tokens: torch.Tensor, rows: list[int], top_counts: list[int]
    ) -> tuple[torch.Tensor, ...]:
        """Device tensors (chosen ids, their logprobs, ranks, top values, top ids) of the logprob rows."""
        index = self._index(rows)
        logprobs = torch.log_softmax(raw.index_select(0, index).float(), dim=-1)
        chosen = tokens.index_select(0, index)
        chosen_logprob = logprobs.gather(1, chosen.unsqueeze(1))
        ranks = (logprobs > chosen_logprob).sum(dim=-1) + 1  # ties share the better rank
        top_values, top_ids = logprobs.topk(max(top_counts), dim=-1)  # k = 0 gives empty [R, 0] tensors
        return chosen, chosen_logprob.squeeze(1), ranks, top_values, top_ids


# ---------------------------------------------------------------------- filters (pure functions on logits)
def apply_top_k(logits: torch.Tensor, top_k: list[int]) -> torch.Tensor:
    """Mask (to -inf) all but each row's `top_k` best tokens (`top_k[r] >= V` disables it for row r).

    Cheaper than a full sort when top_p is not in play: one topk of the largest k. Tokens tied with the
    k-th best are kept too.
    """
    vocab = logits.shape[1]
    largest = max(k for k in top_k if k < vocab)
    best = logits.topk(largest, dim=-1).values
    k = torch.tensor([min(k, largest) for k in top_k], dtype=torch.long, device=logits.device).unsqueeze(1)
    threshold = best.gather(1, k - 1)
    disabled = torch.tensor([k >= vocab for k in top_k], device=logits.device).unsqueeze(1)
    threshold = threshold.masked_fill(disabled, float("-inf"))
    return logits.masked_fill(logits < threshold, float("-inf"))


def apply_top_k_top_p(logits: torch.Tensor, top_k: list[int], top_p: list[float]) -> torch.Tensor:
    """Mask (to -inf) all but each row's `top_k` best tokens, then all but its top_p nucleus.

    One descending sort serves every row. `top_k[r] >= V` disables top_k for row r and `top_p[r] = inf`
    disables top_p. The nucleus keeps a token while the probability mass of the tokens ranked strictly above
    it is below top_p (so the best token is always kept), computed after top_k, as in vLLM.
    """
    vocab = logits.shape[1]
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    k = torch.tensor(top_k, dtype=torch.long, device=logits.device).unsqueeze(1)
    if any(value < vocab for value in top_k):  # decided from the host lists: no device sync
        ranks = torch.arange(vocab, device=logits.device).unsqueeze(0)
        sorted_logits = sorted_logits.masked_fill(ranks >= k, float("-inf"))
    p = torch.tensor(top_p, dtype=torch.float32, device=logits.device).unsqueeze(1)
    if any(math.isfinite(value) for value in top_p):
        probs = torch.softmax(sorted_logits, dim=-1)
        mass_above = probs.cumsum(dim=-1) - probs
        outside = mass_above >= p
        outside[:, 0] = False
        sorted_logits = sorted_logits.masked_fill(outside, float("-inf"))
    return torch.empty_like(logits).scatter_(1, order, sorted_logits)


def apply_min_p(logits: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Mask tokens whose probability is below `min_p` (a [R, 1] column) times their row's best probability."""
    probs = torch.softmax(logits, dim=-1)
    threshold = probs.amax(dim=-1, keepdim=True) * min_p
    return logits.masked_fill(probs < threshold, float("-inf"))
