"""Offline API: `LLM(model).generate(prompts, sampling_params)` with a progress bar.

    from worker import LLM, SamplingParams
    llm = LLM("demo")
    outs = llm.generate(["Hello"], SamplingParams(temperature=0, max_tokens=16))
    print(outs[0].outputs[0].text)

`SamplingParams(prompt_logprobs=k)` fills `RequestOutput.prompt_logprobs` as vLLM's offline API does: None
for the first prompt token (nothing precedes it), then per token {token_id: Logprob} holding the prompt
token itself and the k most likely tokens at its position (worker.engine.prompt_logprobs computes them).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence as Seq

from tqdm.auto import tqdm

from worker.config import EngineConfig
from worker.engine.llm_engine import LLMEngine, new_request_id
from worker.engine.output import ChoiceTextState
from worker.engine.protocol import EngineOutput, EngineRequest, FinishReason, QueueFullError, TokenLogprob
from worker.sampling_params import SamplingParams
from worker.server.logprobs import TokenTexts


@dataclass
class Logprob:
    """One token's log-probability at one position, as vLLM's offline API gives it."""

    logprob: float
    rank: int  # 1 = the most likely token at that position
    decoded_token: str | None = None


PromptLogprobs = list[dict[int, Logprob] | None]


@dataclass
class CompletionOutput:
    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: str | int | None = None  # the stop string or stop token id that ended it
    logprobs: list[TokenLogprob] | None = None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    num_cached_tokens: int = 0
    prompt_logprobs: PromptLogprobs | None = None  # only when SamplingParams.prompt_logprobs was set

    @property
    def finished(self) -> bool:
        return all(o.finish_reason is not None for o in self.outputs)


class LLM:
    def __init__(self, model: str = "demo", **engine_options):
        """`engine_options` are EngineConfig fields (device, page_size, kv_cache_tokens, policy, ...)."""
        self.engine = LLMEngine(EngineConfig(model=model, **engine_options))
        self._token_texts = TokenTexts(self.engine.tokenizer)  # decoded_token of prompt logprobs

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    def generate(
        self,
        prompts: str | list[str] | list[int] | list[list[int]],
        sampling_params: SamplingParams | Seq[SamplingParams] | None = None,
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        texts, token_lists = self._normalise_prompts(prompts)
        params = self._per_prompt_params(sampling_params, len(token_lists))
        return self._run([(t, ids, p) for t, ids, p in zip(texts, token_lists, params)], use_tqdm)

    def chat(
        self,
        conversations: list[dict] | list[list[dict]],
        sampling_params: SamplingParams | Seq[SamplingParams] | None = None,
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        """Each conversation is a list of {"role", "content"} messages; the chat template is applied."""
        if conversations and isinstance(conversations[0], dict):
            conversations = [conversations]
        prompts = [self.tokenizer.apply_chat_template(c, add_generation_prompt=True) for c in conversations]
        # the template already contains the BOS token, so do not add special tokens again
        token_lists = [self.tokenizer.encode(p, add_special_tokens=False) for p in prompts]
        params = self._per_prompt_params(sampling_params, len(prompts))
        return self._run(list(zip(prompts, token_lists, params)), use_tqdm)

    # ------------------------------------------------------------------ internals
    def _normalise_prompts(self, prompts) -> tuple[list[str | None], list[list[int]]]:
        if isinstance(prompts, str):
            prompts = [prompts]
        elif prompts and isinstance(prompts[0], int):
            prompts = [prompts]
        texts, ids = [], []
        for p in prompts:
            if isinstance(p, str):
                texts.append(p)
                ids.append(self.tokenizer.encode(p))
            else:
                texts.append(None)
                ids.append(list(p))
        return texts, ids

    @staticmethod
    def _per_prompt_params(sampling_params, count: int) -> list[SamplingParams]:
        if sampling_params is None:
            return [SamplingParams() for _ in range(count)]
        if isinstance(sampling_params, SamplingParams):
            return [sampling_params] * count
        if len(sampling_params) != count:
            raise ValueError(f"got {len(sampling_params)} sampling params for {count} prompts")
        return list(sampling_params)

    def _run(self, jobs: list[tuple[str | None, list[int], SamplingParams]], use_tqdm: bool) -> list[RequestOutput]:
        engine = self.engine
        results: dict[str, RequestOutput] = {}
        texts: dict[tuple[str, int], ChoiceTextState] = {}
        order: list[str] = []
        pending = list(reversed(jobs))
        bar = tqdm(total=len(jobs), desc="generating", unit="req", disable=not use_tqdm)
        counted: set[str] = set()
        while pending or engine.has_unfinished():
            while pending:  # submit as much as the waiting queue takes
                text, ids, params = pending[-1]
                rid = new_request_id()
                try:
                    engine.add_request(EngineRequest(rid, ids, params, prompt_logprobs=params.prompt_logprobs))
                except QueueFullError:
                    break
                pending.pop()
                order.append(rid)
                results[rid] = RequestOutput(rid, text, ids, [CompletionOutput(i) for i in range(params.n)])
                for i in range(params.n):
                    texts[(rid, i)] = ChoiceTextState(self.tokenizer, ids, params)
            for out in engine.step():
                result = results[out.request_id]
                if out.prompt_logprobs is not None:  # once per request, with choice 0's first tokens
                    result.prompt_logprobs = self._prompt_logprobs(out.prompt_logprobs)
                if self._apply(result, texts[(out.request_id, out.index)], out):
                    engine.abort_request(out.request_id, out.index)  # a stop string ended this choice
                if result.finished and out.request_id not in counted:
                    counted.add(out.request_id)
                    bar.update(1)
        bar.close()
        return [results[rid] for rid in order]

    def _prompt_logprobs(self, entries: list[TokenLogprob | None]) -> PromptLogprobs:
        """The engine's entries as vLLM's: the prompt token first, then the top k (ranks 1..k) not already in."""
        text = self._token_texts
        result: PromptLogprobs = []
        for entry in entries:
            if entry is None:
                result.append(None)
                continue
            position = {entry.token_id: Logprob(entry.logprob, entry.rank, text(entry.token_id))}
            for rank, (token_id, logprob) in enumerate(entry.top, start=1):
                if token_id not in position:
                    position[token_id] = Logprob(logprob, rank, text(token_id))
            result.append(position)
        return result

    @staticmethod
    def _apply(result: RequestOutput, text_state: ChoiceTextState, out: EngineOutput) -> bool:
        """Fold one engine event into the result. Returns True when a stop string ended a choice the engine
        is still generating, so the caller must abort it there."""
        choice = result.outputs[out.index]
        if choice.finish_reason is not None:
            return False  # already ended by a stop string; this is the engine's abort echo
        result.num_cached_tokens = out.num_cached_tokens
        choice.token_ids.extend(out.new_token_ids)
        if out.logprobs is not None:
            choice.logprobs = (choice.logprobs or []) + list(out.logprobs)
        delta, stop_str = text_state.feed(out.new_token_ids, stop_token_id=out.stop_token_id)
        if stop_str is None and out.finish_reason is not None:
            tail, stop_str = text_state.flush()
            delta += tail
        choice.text += delta
        if stop_str is not None:
            choice.finish_reason = FinishReason.STOP
            choice.stop_reason = stop_str
            return out.finish_reason is None  # abort in the engine only if it is still generating
        if out.finish_reason is not None:
            choice.finish_reason = out.finish_reason
            choice.stop_reason = out.stop_token_id
        return False
