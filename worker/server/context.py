"""What every handler needs: the engine client, the tokenizer, the served names and the limits."""

from __future__ import annotations

import asyncio
import time
import uuid

from aiohttp import web
from aiohttp.web_protocol import RequestPayloadError

from worker.config import EngineConfig
from worker.sampling_params import SamplingParams
from worker.server.engine_client import EngineClient
from worker.server.errors import ApiError, bad_request, engine_unavailable, model_not_found
from worker.server.generation import Generation
from worker.server.limits import (
    DEFAULT_MAX_GENERATED_TOKENS,
    MAX_BODY_BYTES,
    OFFLOAD_CHARS,
    InputRejected,
    decode_json_body,
)
from worker.server.logprobs import TokenTexts
from worker.server.metrics import WorkerMetrics
from worker.server.protocol import GenerationExtras
from worker.server.reasoning import ReasoningParser
from worker.server.segment_cache import THREAD_SEGMENT_CHARS, SegmentCachedEncoder
from worker.server.structured import tool_call_constraint
from worker.server.tool_parsers import ToolParser, make_tool_parser


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
        max_generated_tokens: int = DEFAULT_MAX_GENERATED_TOKENS,
    ):
        self.config = config
        self.client = client
        self.tokenizer = tokenizer
        self._encoder: SegmentCachedEncoder | None = None  # built for the current tokenizer on first use
        self.token_texts = TokenTexts(tokenizer)
        self.max_model_len = max_model_len
        # n * max_tokens bound of one request; never below the context length, so n=1 is never refused
        self.max_generated_tokens = max(max_generated_tokens, max_model_len)
        self.served_model_names = list(served_model_names or [model_name])
        self.model_name = self.served_model_names[0]  # what responses report in "model"
        self.metrics = WorkerMetrics(self.model_name)
        client.stats_listeners.append(self.metrics.set_stats)
        if client.stats is not None:
            self.metrics.set_stats(client.stats)
        self.created = int(time.time())
        self.draining = False  # set on SIGTERM: no new requests
        self.active_handlers = 0  # generation requests being served (the shutdown waits for them)
        # Drop-in behaviour (serve.py sets these from --strict-fields, --tool-call-parser, --reasoning-parser,
        # --generation-config): refuse unimplemented fields? which output parsers? which sampling defaults?
        self.strict_fields = False
        self.tool_parser: ToolParser | None = make_tool_parser("auto", getattr(tokenizer, "chat_template", None))
        self.reasoning_parser: ReasoningParser | None = None
        self.sampling_defaults: dict = {}  # generation_config.json's, for fields a request leaves out
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

    # The context length, the vocabulary and the waiting queue are checked by the engine alone (it owns
    # those limits); a refusal comes back through Generation.first_updates() as the same 400 / 503.
    # The one frontend-only check is this worker's bound on tokens generated for one request.
    def check_generation_budget(self, prompt_token_ids: list[int], params: SamplingParams,
                                max_tokens_param: str = "max_tokens") -> None:
        """n * max_tokens (or the rest of the context) over `max_generated_tokens` is a 400 naming `n`."""
        per_choice = params.max_tokens if params.max_tokens is not None else self.max_model_len - len(prompt_token_ids)
        if params.n * per_choice > self.max_generated_tokens:
            raise bad_request(
                "n",
                f"n * {max_tokens_param} may generate up to {params.n * per_choice} tokens, over this worker's "
                f"limit of {self.max_generated_tokens}: lower 'n' or set a smaller '{max_tokens_param}'.",
            )

    # ------------------------------------------------------------------ requests
    def new_generation(self, prompt_token_ids: list[int], params: SamplingParams, index_offset: int = 0,
                       param_names: dict[str, str] | None = None) -> Generation:
        """`param_names`: the request's names for the engine's fields ("prompt", "max_tokens") in its 400s."""
        return Generation(self.client, self.tokenizer, prompt_token_ids, params, self.metrics, index_offset,
                          param_names)

    def render_chat(self, messages: list[dict], tools: list | None, add_generation_prompt: bool = True,
                    template_kwargs: dict | None = None, chat_template: str | None = None,
                    continue_final_message: bool = False) -> str:
        """Apply the model's chat template (or the request's `chat_template`); a template error is the
        client's (400 on `messages`, or `chat_template` when the request gave one).

        continue_final_message: the last (assistant) message is left open, so the model continues it: the
        rendering is cut right after that message's text, before the template's end-of-turn."""
        try:
            text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt,
                                                      tools=tools, chat_template=chat_template,
                                                      **(template_kwargs or {}))
        except Exception as error:  # ChatTemplateError, or jinja errors raised by the template itself
            param = "chat_template" if chat_template is not None else "messages"
            raise bad_request(param, f"The chat template could not render these messages: {error}") from None
        if continue_final_message:
            final = (messages[-1].get("content") or "").strip()
            end = text.rfind(final) if final else -1
            if end >= 0:
                text = text[: end + len(final)]
        return text

    def with_sampling_defaults(self, body: dict) -> dict:
        """The body with the model's generation defaults in the sampling fields it leaves out (or null)."""
        if not self.sampling_defaults:
            return body
        return {**body, **{k: v for k, v in self.sampling_defaults.items() if body.get(k) is None}}

    def truncated_prompt(self, prompt_ids: list[int], extras: GenerationExtras) -> list[int]:
        """truncate_prompt_tokens: keep the last k tokens (-1: as many as the context holds)."""
        k = extras.truncate_prompt_tokens
        if k is None:
            return prompt_ids
        if k == -1:
            k = self.max_model_len - 1
        return prompt_ids[-k:] if len(prompt_ids) > k else prompt_ids

    def apply_extras(self, params: SamplingParams, extras: GenerationExtras, tools: list | None = None,
                     tool_choice=None, parallel_tool_calls: bool = True) -> None:
        """Set the request's token-level constraints on `params`: bad words (as token ids), the structured
        output or the grammar tool_choice required / named needs, and special tokens kept for a tool
        parser whose markers are special tokens."""
        if extras.bad_words:
            params.bad_words_token_ids = self._bad_word_ids(extras.bad_words)
        constraint = extras.structured
        if tool_choice is not None and tools:
            constraint = constraint or tool_call_constraint(tools, tool_choice, parallel_tool_calls)
            if tool_choice.mode == "auto" and self.tool_parser is not None and self.tool_parser.needs_special_tokens:
                params.skip_special_tokens = False
        params.structured_output = constraint

    def _bad_word_ids(self, words: list[str]) -> list[list[int]]:
        """Each word's token ids, alone and after a space (how it appears mid-sentence), as vLLM bans them."""
        variants: list[list[int]] = []
        for word in words:
            for text in (word, " " + word.lstrip()):
                ids = self.encode(text, add_special_tokens=False)
                if ids and ids not in variants:
                    variants.append(ids)
        return variants

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """The tokenizer's ids of `text`; long segments seen before (a shared document, earlier turns) are
        not tokenized again (worker.server.segment_cache: the ids are the same)."""
        return self._segment_encoder().encode(text, add_special_tokens)

    def _segment_encoder(self) -> SegmentCachedEncoder:
        if self._encoder is None or self._encoder.tokenizer is not self.tokenizer:
            self._encoder = SegmentCachedEncoder(self.tokenizer)
        return self._encoder

    async def render_chat_off_loop(self, messages: list[dict], tools: list | None, add_generation_prompt: bool = True,
                                   template_kwargs: dict | None = None, chat_template: str | None = None,
                                   continue_final_message: bool = False) -> str:
        """`render_chat`, in a thread when the messages are long."""
        size = sum(len(m["content"]) for m in messages if isinstance(m.get("content"), str))
        return await _off_loop_if_large(size, self.render_chat, messages, tools, add_generation_prompt,
                                        template_kwargs, chat_template, continue_final_message)

    async def encode_off_loop(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """`encode`, in a thread when the text is long, through the tokenizer's GIL-releasing entry point
        (without it the thread would hold the GIL, and the loop, for the whole tokenization). With segment
        caching (chat prompts): cached segments come from the cache, long new ones from a thread."""
        encoder = self._segment_encoder()
        encode_long = getattr(self.tokenizer, "encode_long", None)
        if encode_long is not None and encoder.applies(text, add_special_tokens):
            loop = asyncio.get_running_loop()
            return await encoder.encode_async(
                text, lambda part: loop.run_in_executor(None, encode_long, part, False), THREAD_SEGMENT_CHARS)
        if len(text) <= OFFLOAD_CHARS:
            return self.encode(text, add_special_tokens)
        encode_long = getattr(self.tokenizer, "encode_long", self.tokenizer.encode)
        return await _off_loop_if_large(len(text), encode_long, text, add_special_tokens=add_special_tokens)


async def _off_loop_if_large(size: int, fn, *args, **kwargs):
    """fn(*args, **kwargs), in the default thread pool when `size` (characters) is over OFFLOAD_CHARS.

    A 10 MB prompt takes seconds to tokenize; on the event loop it would stall /health and every
    stream this worker serves. Small inputs stay inline: a thread hop costs more than they do.
    """
    if size <= OFFLOAD_CHARS:
        return fn(*args, **kwargs)
    return await asyncio.get_running_loop().run_in_executor(None, lambda: fn(*args, **kwargs))


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
    """The decoded JSON body within the limits of `worker.server.limits`; 400 (or 413) otherwise."""
    try:
        raw = await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise ApiError(413, f"The request body is larger than the limit of {MAX_BODY_BYTES} bytes.",
                       code="request_too_large") from None
    except RequestPayloadError as error:  # e.g. Content-Encoding: gzip on a body that is not gzip
        reason = str(error).replace("\n", " ").strip()
        raise bad_request(None, f"The request body could not be read ({reason}).") from None
    try:
        if len(raw) > OFFLOAD_CHARS * 16:  # about 1 MB: decode in a thread, as for tokenization
            return await asyncio.get_running_loop().run_in_executor(None, decode_json_body, raw)
        return decode_json_body(raw)
    except InputRejected as error:
        raise ApiError(error.status, f"{error.message}.", code=error.code) from None
