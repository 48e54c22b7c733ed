"""One engine request seen from the frontend: token ids in, per-choice text updates out.

`Generation` submits the prompt to the engine, feeds every choice's new tokens to its
`ChoiceTextState` (incremental detokenization + stop strings), aborts a choice in the engine as
soon as a stop string ends it, and yields `ChoiceUpdate`s that the chat and completions endpoints
format. It is shared by both endpoints, streamed or not, and owns the request's metrics.

Updates are coalesced: whatever arrived for a choice since the handler last looked becomes one
update, so a busy frontend sends fewer, larger chunks instead of falling further behind.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass, field
from typing import AsyncIterator

from worker.engine.output import ChoiceTextState
from worker.engine.protocol import EngineOutput, EngineRequest, FinishReason, TokenLogprob
from worker.sampling_params import SamplingParams
from worker.server.engine_client import EngineClient, RequestStream
from worker.server.errors import ApiError
from worker.server.metrics import WorkerMetrics


@dataclass
class ChoiceUpdate:
    """New output of one choice since its previous update."""

    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] | None = None
    finish_reason: str | None = None
    stop_reason: str | int | None = None  # the stop string or stop token id that ended the choice

    def merge(self, other: "ChoiceUpdate") -> None:
        self.text += other.text
        self.token_ids += other.token_ids
        if other.logprobs is not None:
            self.logprobs = (self.logprobs or []) + other.logprobs
        self.finish_reason = other.finish_reason or self.finish_reason
        self.stop_reason = other.stop_reason if other.stop_reason is not None else self.stop_reason


def merge_choice_updates(num_choices: int, *update_lists: list[ChoiceUpdate]) -> list[ChoiceUpdate]:
    """Fold streams of per-choice updates into one total per choice index, in index order."""
    totals = [ChoiceUpdate(i) for i in range(num_choices)]
    for updates in update_lists:
        for update in updates:
            totals[update.index].merge(update)
    return totals


class Generation:
    """Drives one engine request to completion (or abort) for one HTTP handler."""

    def __init__(
        self,
        client: EngineClient,
        tokenizer,
        prompt_token_ids: list[int],
        params: SamplingParams,
        metrics: WorkerMetrics | None = None,
        index_offset: int = 0,
        param_names: dict[str, str] | None = None,
    ):
        self.client = client
        self.params = params
        self.prompt_token_ids = prompt_token_ids
        self.request_id = uuid.uuid4().hex
        self.index_offset = index_offset  # choice i of this prompt is index_offset + i in the response
        self.metrics = metrics
        self.param_names = param_names or {}  # engine field -> this request's field, for the engine's 400s
        self._texts = [ChoiceTextState(tokenizer, prompt_token_ids, params) for _ in range(params.n)]
        self._finished = [False] * params.n
        self.num_prompt_tokens = len(prompt_token_ids)
        self.num_cached_tokens = 0
        self.num_completion_tokens = 0
        self._stream: RequestStream | None = None
        self._arrival = time.monotonic()
        self._last_token_time: float | None = None
        self._first_token_time: float | None = None
        self._scheduled_time: float | None = None  # sent by engines that report it (see worker.server.metrics)
        self._finish_reason_of_first = FinishReason.ABORT  # the metrics label of the request
        self.prompt_logprobs: int | None = None  # top-k of the prompt logprobs to ask for (set before start)
        # what the engine sent with choice 0's first tokens: one entry per prompt token, None first
        self.prompt_logprob_entries: list[TokenLogprob | None] | None = None

    @property
    def finished(self) -> bool:
        return all(self._finished)

    def start(self) -> None:
        """Send the request to the engine (raises ApiError when the engine cannot take it)."""
        self._stream = self.client.submit(EngineRequest(self.request_id, self.prompt_token_ids, self.params,
                                                        prompt_logprobs=self.prompt_logprobs))

    async def first_updates(self) -> list[ChoiceUpdate]:
        """The first updates; raises ApiError if the engine rejected the request."""
        return await self._next()

    async def updates(self) -> AsyncIterator[list[ChoiceUpdate]]:
        """Updates until every choice has finished."""
        while not self.finished:
            yield await self._next()

    async def run_to_end(self) -> list[ChoiceUpdate]:
        """Collect the whole output of every choice (non-streaming responses)."""
        totals = [ChoiceUpdate(self.index_offset + i) for i in range(self.params.n)]
        async for batch in self.updates():
            for update in batch:
                totals[update.index - self.index_offset].merge(update)
        return totals

    def abort(self) -> None:
        """Stop the request in the engine if it is still running (client gone, shutdown)."""
        if not self.finished:
            self.client.abort(self.request_id)
            self._finished = [True] * self.params.n
            if self.metrics is not None:
                self.metrics.observe_finished(self, time.monotonic() - self._arrival, FinishReason.ABORT,
                                              self._decode_seconds())

    # ------------------------------------------------------------------ internals
    async def _next(self) -> list[ChoiceUpdate]:
        try:
            outputs = await self._stream.next_batch()
        except ApiError as error:  # the engine refused the request or died: nothing left to abort or count
            self._finished = [True] * self.params.n
            error.param = self.param_names.get(error.param, error.param)
            raise
        now = time.monotonic()
        updates: dict[int, ChoiceUpdate] = {}
        for output in outputs:
            if self._scheduled_time is None:
                self._scheduled_time = getattr(output, "scheduled_time", None)
            update = self._apply(output)
            if update is None:
                continue
            if update.index in updates:
                updates[update.index].merge(update)
            else:
                updates[update.index] = update
        if any(update.token_ids for update in updates.values()):
            self._observe_token_timing(now, sum(len(u.token_ids) for u in updates.values()))
        if self.finished:
            self.client.release(self.request_id)
            if self.metrics is not None:
                self.metrics.observe_finished(self, now - self._arrival, self._finish_reason_of_first,
                                              self._decode_seconds())
        return [updates[i] for i in sorted(updates)]

    def _apply(self, output: EngineOutput) -> ChoiceUpdate | None:
        """Fold one engine event of one choice into an update (None when the choice already ended)."""
        i = output.index
        if self._finished[i]:
            return None  # the engine's echo of an abort we sent after a stop string
        self.num_cached_tokens = max(self.num_cached_tokens, output.num_cached_tokens)
        if output.prompt_logprobs is not None:
            self.prompt_logprob_entries = output.prompt_logprobs
        self.num_completion_tokens += len(output.new_token_ids)
        text_state = self._texts[i]
        text, stop_str = text_state.feed(output.new_token_ids, output.stop_token_id)
        update = ChoiceUpdate(self.index_offset + i, text, list(output.new_token_ids), output.logprobs)
        if stop_str is None and output.finished:
            tail, stop_str = text_state.flush()
            update.text += tail
        if stop_str is not None:
            update.finish_reason, update.stop_reason = FinishReason.STOP, stop_str
            if not output.finished:
                self.client.abort_choice(self.request_id, i)
        elif output.finished:
            update.finish_reason = output.finish_reason
            update.stop_reason = output.stop_token_id
            if output.error:
                update.finish_reason = FinishReason.ABORT
        if update.finish_reason is not None:
            self._finished[i] = True
            if i == 0:
                self._finish_reason_of_first = update.finish_reason
        return update

    def _observe_token_timing(self, now: float, num_tokens: int) -> None:
        if self.metrics is None:
            self._last_token_time = now
            return
        if self._last_token_time is None:
            self._first_token_time = now
            self.metrics.observe_first_token(self._arrival, now, self._scheduled_time)
        else:
            # Several steps' tokens may arrive together; spread the gap over them.
            gap = (now - self._last_token_time) / max(1, num_tokens)
            for _ in range(min(num_tokens, 64)):
                self.metrics.inter_token_latency.observe(gap)
        self._last_token_time = now

    def _decode_seconds(self) -> float | None:
        if self._first_token_time is None or self._last_token_time is None:
            return None
        return self._last_token_time - self._first_token_time


async def merge_generations(generations: list[Generation]) -> AsyncIterator[list[ChoiceUpdate]]:
    """Interleave the updates of several generations (a /v1/completions batch of prompts)."""
    if len(generations) == 1:
        async for batch in generations[0].updates():
            yield batch
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(generation: Generation) -> None:
        try:
            async for batch in generation.updates():
                queue.put_nowait(batch)
        except BaseException as error:  # noqa: BLE001 - re-raised in the consumer
            queue.put_nowait(error)
            return
        queue.put_nowait(None)

    tasks = [asyncio.ensure_future(pump(g)) for g in generations]
    try:
        remaining = len(tasks)
        while remaining:
            item = await queue.get()
            if item is None:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield item
    finally:
        for task in tasks:
            task.cancel()
