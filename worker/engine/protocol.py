"""Plain data that crosses the engine boundary: requests in, token events out.

The engine speaks only token ids. Text (chat templates, detokenization, stop strings) belongs to
the frontend (`worker.server`) or the offline `LLM` wrapper, which both use `worker.engine.output`.
These objects are picklable so they can cross a process boundary unchanged.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from worker.sampling_params import InvalidParameter, SamplingParams


class QueueFullError(RuntimeError):
    """The waiting queue is at `max_waiting_requests`; the caller should retry later (HTTP 503).

    The engine is the one place that decides this (the frontend only relays it)."""


class ContextLengthExceeded(InvalidParameter):
    """The prompt, or the prompt plus max_tokens, does not fit the context length (HTTP 400)."""

    code = "context_length_exceeded"  # OpenAI's error code for it


@dataclass
class EngineRequest:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    arrival_time: float = field(default_factory=time.monotonic)
    # vLLM's prompt_logprobs: the logprob of every prompt token (after the first) and the k most likely
    # tokens at each position; None: not asked (worker.engine.prompt_logprobs)
    prompt_logprobs: int | None = None


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float
    rank: int  # 1 = the most likely token
    top: list[tuple[int, float]]  # the `params.logprobs` most likely (token_id, logprob), best first


class FinishReason:
    STOP = "stop"  # eos, a stop token id, or (decided by the frontend) a stop string
    LENGTH = "length"  # max_tokens or the context length
    ABORT = "abort"  # aborted by the client, a shutdown, or an error


@dataclass
class EngineOutput:
    """New tokens of one choice (index) of one request since the previous event for it."""

    request_id: str
    index: int  # which of the n choices
    new_token_ids: list[int]
    logprobs: list[TokenLogprob] | None  # one per new token when the request asked for logprobs
    finish_reason: str | None = None  # set on the last event of this choice
    stop_token_id: int | None = None  # the eos / stop token that ended it, if any
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache
    error: str | None = None  # set when the engine failed this request
    # on the first event of choice 0 of a request that asked: one entry per prompt token, None for the first
    prompt_logprobs: list[TokenLogprob | None] | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class EngineStats:
    """What `/load` and `/metrics` report. KV figures are in tokens."""

    num_running: int
    num_waiting: int
    kv_tokens_used: int
    kv_tokens_total: int
    cache_hit_tokens: int
    cache_query_tokens: int
    num_preemptions: int
    num_finished: int = 0
    max_running_requests: int = 0
