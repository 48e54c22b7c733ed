"""The engine: scheduler -> forward batch -> executor -> sampler, one iteration per `step()`.

Single-threaded on purpose: the HTTP frontend runs it in its own process and feeds it through IPC
(worker.server), the offline `LLM` API drives it in a loop. It speaks only token ids.

Overlap scheduling (`EngineConfig.overlap_schedule`): a step queues its forward and sampling on the
device and does not wait for them. Its sampled tokens stay on the device; each sampling sequence gets a
placeholder output token (worker.engine.scheduler.launch) and the next step's decode refers to it by its
row in this step's token tensor (the executor swaps the reference for the token on the device). Only
then does the step read back the *previous* step's tokens, fill their placeholders, check stops and emit
outputs (scheduler.resolve). So the host schedules and prepares step N+1 while the device runs step N.
Consequences handled in the scheduler: a sequence at a known limit (max_tokens, context length) is not
scheduled again before its last token is known; an eos is seen one step late, so the sequence may run one
extra decode whose token is dropped and whose slot is never cached. Rows with bad words or a grammar read
their real tokens on the host: a step with such a row queues only its forward, resolves the previous step
while that forward runs, then samples (worker.engine.launched_step), so it still overlaps.
"""

from __future__ import annotations

import dataclasses
import logging
import uuid
from pathlib import Path

from worker.cache.page_pool import PagePool
from worker.cache.radix_cache import RadixCache
from worker.config import ConfigError, EngineConfig
from worker.engine.forward_batch import build_forward_batch, sampling_states
from worker.engine.grammar import GrammarMasks
from worker.engine.launched_step import LaunchedStep, sample_held_back, waits_for_previous_tokens
from worker.engine.prompt_logprobs import (PendingPromptLogprobs, add_prompt_rows, check_prompt_logprobs,
                                           take_prompt_logprobs)
from worker.engine.protocol import ContextLengthExceeded, EngineOutput, EngineRequest, EngineStats, QueueFullError
from worker.engine.sampler import Sampler
from worker.engine.scheduler import ScheduledBatch, Scheduler, SchedulerConfig
from worker.engine.sequence import Sequence
from worker.engine.step_budget import with_step_token_budget
from worker.executor.base import Executor
from worker.executor.registry import executor_class
from worker.sampling_params import InvalidParameter

log = logging.getLogger(__name__)


def create_executor(config: EngineConfig, model_path: Path) -> Executor:
    """The executor `config` names (worker.executor.registry), built as `Executor(model_path, config)`."""
    name = config.resolved_executor()
    try:
        executor_type = executor_class(name)
    except KeyError as error:
        raise ConfigError(error.args[0]) from None
    return executor_type(model_path, config)


def scheduler_config(config: EngineConfig, max_model_len: int) -> SchedulerConfig:
    """The scheduler's settings: every SchedulerConfig field EngineConfig has under the same name, with
    the context length the engine derived (EngineConfig.context_length) instead of the raw setting."""
    shared = {f.name: getattr(config, f.name) for f in dataclasses.fields(SchedulerConfig) if hasattr(config, f.name)}
    shared["max_model_len"] = max_model_len
    return SchedulerConfig(**shared)


class LLMEngine:
    def __init__(self, config: EngineConfig, executor: Executor | None = None):
        from worker.models.config import ModelConfig
        from worker.models.registry import resolve_model
        from worker.tokenizer import Tokenizer

        config.validate()
        self.model_name = config.model
        # the sim executor needs no weights: a built-in name then gives only its config and tokenizer
        self.model_path = resolve_model(config.model, progress=config.progress, weights=config.executor != "sim")
        self.config = config = with_step_token_budget(config, self.model_path)
        self.model_config = ModelConfig.from_folder(self.model_path)
        self.tokenizer = Tokenizer.from_folder(self.model_path)
        self.max_model_len = config.context_length(self.model_config.max_model_len)
        self.executor = executor or create_executor(config, self.model_path)
        num_pages = self.executor.num_kv_pages(config.page_size)
        if num_pages < 2:
            raise ConfigError("the KV budget holds fewer than two pages: raise --kv-cache-tokens or --mem-fraction")
        self.executor.init_kv_cache(num_pages, config.page_size)
        self.cache = RadixCache(PagePool(num_pages, config.page_size), enabled=config.enable_prefix_cache)
        self.kv_tokens_total = num_pages * config.page_size
        self.scheduler = Scheduler(scheduler_config(config, self.max_model_len), self.cache)
        # an executor may return logits over only the first `logits_vocab_size` ids (sim: a small vocab)
        self.logits_width = getattr(self.executor, "logits_vocab_size", None)
        sampler_vocab = self.logits_width or self.model_config.vocab_size
        self.eos_token_ids = tuple(sorted(set(self.tokenizer.eos_token_ids)))
        grammars = GrammarMasks(self.tokenizer, max(sampler_vocab, self.model_config.vocab_size), self.eos_token_ids)
        self.sampler = Sampler(sampler_vocab, self.executor.device, seed=config.seed, grammars=grammars)
        self.scheduler.on_release = lambda seq: self.sampler.penalty_counts.release(seq.seq_id)
        self._eos_set = frozenset(self.eos_token_ids)
        self._requests: dict[str, list[Sequence]] = {}  # request_id -> its choices
        self._pending_outputs: list[EngineOutput] = []  # produced outside step() (aborts)
        # an executor that cannot read sampled tokens on the device runs synchronously
        mode = self.config.overlap_schedule
        wanted = mode == "on" or (mode == "auto" and self.executor.overlap_by_default)
        self.overlap = wanted and self.executor.supports_future_tokens
        self._in_flight: LaunchedStep | None = None  # overlap: the step launched by the last step() call
        self.num_finished = 0
        log.info(
            "engine ready: model=%s executor=%s kv=%d tokens (%d pages of %d) max_model_len=%d overlap=%s",
            self.model_name, self.executor.name, self.kv_tokens_total, num_pages, config.page_size,
            self.max_model_len, self.overlap,
        )

    # ------------------------------------------------------------------ requests in
    def add_request(self, req: EngineRequest) -> None:
        if req.request_id in self._requests:
            raise InvalidParameter("request_id", f"request {req.request_id!r} is already running")
        self._validate_lengths(req)
        check_prompt_logprobs(req.prompt_logprobs, self.logits_width, self.model_config.vocab_size)
        if len(self.scheduler.waiting) >= self.config.max_waiting_requests:
            raise QueueFullError(f"the waiting queue is full ({self.config.max_waiting_requests} requests)")
        choices = [
            Sequence(
                request_id=req.request_id,
                index=i,
                prompt_token_ids=list(req.prompt_token_ids),
                params=req.params,
                arrival_time=req.arrival_time,
                prompt_logprobs=req.prompt_logprobs if i == 0 else None,  # a request's, not a choice's
            )
            for i in range(req.params.n)
        ]
        self._requests[req.request_id] = choices
        first = choices[0]
        first.held_choices = choices[1:]  # they start once the prompt is cached (see Scheduler.update)
        self.scheduler.add(first)

    def _validate_lengths(self, req: EngineRequest) -> None:
        n_prompt = len(req.prompt_token_ids)
        if n_prompt == 0:
            raise InvalidParameter("prompt", "the prompt is empty")
        vocab = self.model_config.vocab_size
        ids = req.prompt_token_ids
        # C-level passes (types, then min and max) instead of a Python loop over thousands of prompt ids
        if not all(issubclass(kind, int) for kind in set(map(type, ids))) or min(ids) < 0 or max(ids) >= vocab:
            raise InvalidParameter("prompt", f"token ids must be integers in [0, {vocab})")
        limit = self.max_model_len
        if n_prompt >= limit:
            raise ContextLengthExceeded(
                "prompt",
                f"This model's maximum context length is {limit} tokens, but the prompt has {n_prompt} tokens. "
                "Shorten the prompt.",
            )
        max_tokens = req.params.max_tokens
        if max_tokens is not None and n_prompt + max_tokens > limit:
            raise ContextLengthExceeded(
                "max_tokens",
                f"This model's maximum context length is {limit} tokens. However, you requested "
                f"{n_prompt + max_tokens} tokens ({n_prompt} in the prompt, {max_tokens} for the completion). "
                f"Lower the maximum completion tokens to at most {limit - n_prompt}.",
            )
        if n_prompt + 1 > self.kv_tokens_total:
            raise InvalidParameter(
                "prompt", f"the prompt ({n_prompt} tokens) exceeds the KV cache ({self.kv_tokens_total} tokens)"
            )

    def abort_request(self, request_id: str, index: int | None = None) -> None:
        """Stop the request (or one of its choices) now and free its KV; an `abort` event follows."""
        if request_id not in self._requests:
            return
        for seq in self.scheduler.abort(request_id, index):
            self._pending_outputs.append(self._output(seq, [], None))
        self._forget_if_done(request_id)

    # ------------------------------------------------------------------ the loop
    def has_unfinished(self) -> bool:
        return bool(self._requests) or bool(self._pending_outputs) or self._in_flight is not None

    def step(self) -> list[EngineOutput]:
        """Schedule and launch one step; return the outputs of the step whose tokens became known.

        Without overlap that is this step. With overlap it is the previous one (see the module docstring):
        the step launched here is resolved by the next call.
        """
        outputs, self._pending_outputs = self._pending_outputs, []
        previous, self._in_flight = self._in_flight, None
        batch = self.scheduler.schedule()
        future_tokens = previous.sample.token_ids if previous is not None and previous.sample is not None else None
        launched = self._launch(batch, future_tokens) if len(batch) else None
        if previous is not None:
            outputs.extend(self._resolve(previous))
        if launched is not None and launched.held is not None:
            sample_held_back(self.sampler, launched)  # grammar / bad words rows now see previous's tokens
        if launched is not None:
            if self.overlap:
                self._in_flight = launched
            else:
                outputs.extend(self._resolve(launched))
        for seq in self.scheduler.take_cut_off():  # ended in schedule() without a new token
            outputs.append(self._output(seq, [], None))
            self._forget_if_done(seq.request_id)
        return outputs

    def _launch(self, batch: ScheduledBatch, future_tokens) -> LaunchedStep:
        """Queue forward + sampling of `batch` on the device and mark the step launched in the scheduler.

        `future_tokens`: the previous step's sampled-token tensor, which decodes of pending tokens read.
        The sampling is held back when a row reads on the host a token still in flight (step() samples it).
        """
        forward_batch, rows = build_forward_batch(batch, self.cache.page_size)
        prompt_rows = add_prompt_rows(forward_batch, batch)  # their logits come after the sampling rows'
        if future_tokens is not None and batch.num_decodes and bool(
            (forward_batch.input_ids[: batch.num_decodes] < 0).any()
        ):
            logits = self.executor.forward(forward_batch, future_tokens=future_tokens)
        else:
            logits = self.executor.forward(forward_batch)
        prompt = PendingPromptLogprobs(logits[len(rows):], prompt_rows) if prompt_rows else None
        logits = logits[: len(rows)]
        # states before launch(): the sampler must see the outputs without this step's placeholders
        if rows and waits_for_previous_tokens(batch, rows):
            held = (logits, sampling_states(batch, rows, self.eos_token_ids))
            return LaunchedStep(self.scheduler.launch(batch, rows), None, prompt, held)
        sample = self.sampler.sample_async(logits, sampling_states(batch, rows, self.eos_token_ids)) if rows else None
        return LaunchedStep(self.scheduler.launch(batch, rows), sample, prompt)

    def _resolve(self, step: LaunchedStep) -> list[EngineOutput]:
        """Read back a launched step's tokens, apply them and its stop conditions; its outputs."""
        if step.prompt_logprobs is not None:
            step.prompt_logprobs.collect()  # before the outputs: the first token's carries them
        if step.sample is None:
            return []
        result = step.sample.result()
        advanced, finished = self.scheduler.resolve(step.seqs, result.token_ids, self._eos_set)
        outputs = []
        for j in advanced:
            lp = result.logprobs[j]
            outputs.append(self._output(step.seqs[j], [result.token_ids[j]], [lp] if lp is not None else None))
        for seq in finished:
            self._forget_if_done(seq.request_id)
        return outputs

    def _output(self, seq: Sequence, new_tokens: list[int], logprobs) -> EngineOutput:
        first = self._requests.get(seq.request_id, [seq])[0]
        return EngineOutput(
            request_id=seq.request_id,
            index=seq.index,
            new_token_ids=new_tokens,
            logprobs=logprobs,
            finish_reason=seq.finish_reason,
            stop_token_id=seq.stop_token_id,
            num_prompt_tokens=len(seq.prompt_token_ids),
            num_cached_tokens=max(first.num_cached_tokens, 0),
            prompt_logprobs=take_prompt_logprobs(seq) if new_tokens else None,
        )

    def _forget_if_done(self, request_id: str) -> None:
        choices = self._requests.get(request_id)
        if choices is not None and all(s.finish_reason is not None for s in choices):
            del self._requests[request_id]
            self.num_finished += 1

    # ------------------------------------------------------------------ introspection
    def stats(self) -> EngineStats:
        s = self.scheduler
        return EngineStats(
            num_running=len(s.running),
            num_waiting=len(s.waiting),
            kv_tokens_used=s.kv_tokens_in_use(),
            kv_tokens_total=self.kv_tokens_total,
            cache_hit_tokens=self.cache.hit_tokens,
            cache_query_tokens=self.cache.query_tokens,
            num_preemptions=s.num_preemptions,
            num_finished=self.num_finished,
            max_running_requests=self.config.max_running_requests,
        )

    def check_invariants(self) -> None:
        self.scheduler.check_invariants()

    def shutdown(self) -> None:
        for request_id in list(self._requests):
            self.abort_request(request_id)
        self.executor.shutdown()


def new_request_id() -> str:
    return uuid.uuid4().hex
