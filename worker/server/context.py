"""What every handler needs: the engine client, the tokenizer, the served names and the limits."""

from __future__ import annotations

import json
import time
import uuid

from aiohttp import web

from worker.config import EngineConfig
from worker.sampling_params import SamplingParams
from worker.server.engine_client import RETRY_AFTER_S, EngineClient
from worker.server.errors import ApiError, bad_request, engine_unavailable, model_not_found, overloaded
from worker.server.generation import Generation
from worker.server.logprobs import TokenTexts
from worker.server.metrics import WorkerMetrics


class ServerContext:
    """Shared state of one worker frontend (stored in the aiohttp app)."""

    def __init__(
        self,
        config: EngineConfig,
        client: EngineClient,
        tokenizer,
        model_name: str,
        max_model_len: int,
        served_model_names: list[str] | None = None,
    ):
        self.config = config
        self.client = client
        self.tokenizer = tokenizer
        self.token_texts = TokenTexts(tokenizer)
        self.max_model_len = max_model_len
        self.served_model_names = list(served_model_names or [model_name])
        self.model_name = self.served_model_names[0]  # what responses report in "model"
        self.metrics = WorkerMetrics(self.model_name)
        client.stats_listeners.append(self.metrics.set_stats)
        if client.stats is not None:
            self.metrics.set_stats(client.stats)
        self.created = int(time.time())
        self.draining = False  # set on SIGTERM: no new requests
        self.active_handlers = 0  # generation requests being served (the shutdown waits for them)
        self.default_max_tokens: int | None = None  # chat max_tokens when a request sets none (None: the rest)

    # ------------------------------------------------------------------ checks
    def check_model(self, model: str | None) -> None:
        if model is not None and model not in self.served_model_names:
            raise model_not_found(model, self.served_model_names)

    def check_serving(self) -> None:
        if self.draining:
            raise engine_unavailable("the worker is shutting down")
        if not self.client.healthy:
            raise engine_unavailable(self.client.dead_reason or "the engine is not ready")

    def check_lengths(self, prompt_token_ids: list[int], params: SamplingParams, prompt_param: str,
                      max_tokens_param: str = "max_tokens") -> None:
        """A prompt over the context length, or one with no room for max_tokens, is a 400 naming the field."""
        n = len(prompt_token_ids)
        if n >= self.max_model_len:
            raise bad_request(
                prompt_param,
                f"This model's maximum context length is {self.max_model_len} tokens, but the prompt has {n} "
                f"tokens. Shorten the {prompt_param}.",
                code="context_length_exceeded",
            )
        if params.max_tokens is not None and n + params.max_tokens > self.max_model_len:
            raise bad_request(
                max_tokens_param,
                f"This model's maximum context length is {self.max_model_len} tokens. However, you requested "
                f"{n + params.max_tokens} tokens ({n} in the prompt, {params.max_tokens} for the completion). "
                f"Lower '{max_tokens_param}' to at most {self.max_model_len - n}.",
                code="context_length_exceeded",
            )

    def check_capacity(self, new_requests: int = 1) -> None:
        """503 + Retry-After when the waiting queue is full (counted here, before the engine sees it)."""
        waiting = self.client.num_not_started
        if waiting + new_requests > self.config.max_waiting_requests:
            raise overloaded(RETRY_AFTER_S, waiting)

    # ------------------------------------------------------------------ requests
    def new_generation(self, prompt_token_ids: list[int], params: SamplingParams, index_offset: int = 0) -> Generation:
        return Generation(self.client, self.tokenizer, prompt_token_ids, params, self.metrics, index_offset)

    def render_chat(self, messages: list[dict], tools: list | None, add_generation_prompt: bool = True,
                    template_kwargs: dict | None = None) -> str:
        """Apply the model's chat template; a template error is the client's (400 on `messages`)."""
        try:
            return self.tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt,
                                                      tools=tools, **(template_kwargs or {}))
        except Exception as error:  # ChatTemplateError, or jinja errors raised by the template itself
            raise bad_request("messages", f"The chat template could not render these messages: {error}") from None

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=add_special_tokens))


CTX_KEY: "web.AppKey[ServerContext]" = web.AppKey("radixfleet_ctx", ServerContext)


def new_response_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> dict:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached_tokens},
    }


async def read_json(request: web.Request):
    """The decoded JSON body; 400 when it is not JSON."""
    try:
        raw = await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise ApiError(413, "The request body is too large.", code="request_too_large") from None
    try:
        return json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise bad_request(None, f"The request body is not valid JSON: {error}") from None
