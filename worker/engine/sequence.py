"""One choice of one request, as the scheduler tracks it.

A request with n choices becomes n `Sequence`s. Choice 0 is prefilled first; the others wait
(`held_choices` on choice 0) until its prompt is in the radix cache, then start from that shared prefix.
"""

from __future__ import annotations

import enum
import itertools
from dataclasses import dataclass, field

from worker.sampling_params import SamplingParams

_arrival_counter = itertools.count()

# Stands in an output slot for a token that was sampled on the device but not yet read back to the host
# (overlap scheduling, see worker.engine.llm_engine). Never a real token id, never sent to the model: the
# model runner replaces it by a reference into the previous step's sampled-token tensor.
PLACEHOLDER_TOKEN = -1

# A sequence computing prompt logprobs returns logits for every position of its chunk; capping the chunk
# bounds those [chunk, vocab] float32 rows (256 x 152k is 156 MB) near what the CUDA executor's memory
# plan reserves for a step's logits.
PROMPT_LOGITS_PER_STEP = 256


class SeqStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    request_id: str
    index: int
    prompt_token_ids: list[int]
    params: SamplingParams
    arrival_time: float
    output_token_ids: list[int] = field(default_factory=list)
    status: SeqStatus = SeqStatus.WAITING
    # Tie-breaker that keeps the arrival order stable, also for equal timestamps.
    arrival_order: int = field(default_factory=lambda: next(_arrival_counter))

    # KV state. pages[i] holds positions [i*page_size, (i+1)*page_size).
    # The first `num_tree_tokens` tokens' pages belong to the radix tree (shared, kept alive by the lock on
    # `tree_node`); the rest are private to this sequence.
    pages: list[int] = field(default_factory=list)
    num_computed: int = 0  # tokens whose K/V is in `pages`
    tree_node: object | None = None
    num_tree_tokens: int = 0

    num_cached_tokens: int = -1  # prompt tokens served from the cache at first admission (-1: not yet admitted)
    num_preemptions: int = 0
    finish_reason: str | None = None
    stop_token_id: int | None = None
    held_choices: list["Sequence"] = field(default_factory=list)  # choices 1..n-1 waiting on choice 0's prefill
    # Overlap scheduling: how many trailing output slots are still PLACEHOLDER_TOKEN, and the row of the
    # newest one in its step's sampled-token tensor (what the next decode's input refers to).
    num_pending_tokens: int = 0
    future_row: int = -1
    # chained hashes of the prompt's token blocks, computed on first use (worker.engine.shared_prefill)
    prompt_block_hashes: list[int] | None = field(default=None, repr=False)
    # prompt logprobs (choice 0 of a request that asked; worker.engine.prompt_logprobs): the top-k asked,
    # and the entries known so far, entry i being prompt token i + 1's (computed from position i's logits)
    prompt_logprobs: int | None = None
    prompt_logprob_entries: list = field(default_factory=list)
    prompt_logprobs_sent: bool = False

    @property
    def seq_id(self) -> tuple[str, int]:
        return (self.request_id, self.index)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    def token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def num_uncomputed(self) -> int:
        """Tokens still to run through the model before the next token can be sampled."""
        return self.num_tokens - self.num_computed

    @property
    def needs_prompt_logits(self) -> bool:
        """Whether prompt positions of this sequence still need their logits (so it is prefilled from the
        start, never from a cached prefix, in chunks of at most PROMPT_LOGITS_PER_STEP tokens)."""
        return self.prompt_logprobs is not None and len(self.prompt_logprob_entries) < len(self.prompt_token_ids) - 1

    def max_prefill_chunk(self) -> int:
        return PROMPT_LOGITS_PER_STEP if self.needs_prompt_logits else self.num_tokens

    @property
    def is_decoding(self) -> bool:
        return self.status is SeqStatus.RUNNING and self.num_uncomputed == 1

    def add_placeholder(self, future_row: int) -> None:
        """An output slot for the token the launched step samples, filled when the step resolves; until
        then the next decode reads its input from row `future_row` of that step's sampled tokens."""
        self.output_token_ids.append(PLACEHOLDER_TOKEN)
        self.num_pending_tokens += 1
        self.future_row = future_row

    def drop_pending_tokens(self) -> None:
        """Forget unresolved placeholders (the sequence finished or was aborted before they resolved)."""
        if self.num_pending_tokens:
            del self.output_token_ids[-self.num_pending_tokens :]
            self.num_pending_tokens = 0

    def remaining_output_budget(self, max_model_len: int) -> int:
        """Upper bound on the tokens this sequence may still generate."""
        by_context = max_model_len - self.num_tokens
        if self.params.max_tokens is None:
            return max(by_context, 0)
        return max(min(self.params.max_tokens - len(self.output_token_ids), by_context), 0)
