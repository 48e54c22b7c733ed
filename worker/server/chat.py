"""POST /v1/chat/completions: messages -> chat template -> tokens -> engine -> chat completion (or chunks).

Each choice's text is split by `ChoiceOutput` into content, reasoning_content (with --reasoning-parser)
and tool_calls (tool_choice auto with a tool-call parser, or required / named enforced by a grammar).
vLLM's `prompt_logprobs` adds a top-level `prompt_logprobs` (streamed: on the first chunk).
vLLM's `echo` puts the last message's content before each choice's content when that message is the one
being continued (worker.server.chat_output.echoed_text); streamed, each choice's first delta carries it.
"""

from __future__ import annotations

import time

from aiohttp import web

from worker.server.chat_output import ChoiceOutput, echoed_text, finish_reason_with_calls, with_echo
from worker.server.context import CTX_KEY, ServerContext, new_response_id, read_json, usage
from worker.server.extra_fields import ignored_fields_header
from worker.server.generation import ChoiceUpdate, Generation, merge_choice_updates
from worker.server.logprobs import chat_logprobs, vllm_prompt_logprobs
from worker.server.protocol import ChatRequest, parse_chat_request
from worker.server.streaming import ClientGone, SSEWriter, end_with_error, json_response


async def chat_completions(request: web.Request) -> web.StreamResponse:
    ctx: ServerContext = request.app[CTX_KEY]
    body = ctx.with_sampling_defaults(await read_json(request))
    chat = parse_chat_request(body, strict=ctx.strict_fields)
    ctx.check_model(chat.model)
    ctx.check_serving()
    prompt = await ctx.render_chat_off_loop(chat.messages, chat.tools, chat.add_generation_prompt,
                                            chat.chat_template_kwargs, chat.chat_template, chat.continue_final_message)
    # The template writes the BOS and other special tokens itself (unless the client asks for them again).
    prompt_ids = await ctx.encode_off_loop(prompt, add_special_tokens=bool(chat.extras.add_special_tokens))
    prompt_ids = ctx.truncated_prompt(prompt_ids, chat.extras)
    ctx.apply_extras(chat.params, chat.extras, chat.tools, chat.tool_choice, chat.parallel_tool_calls)
    max_name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    if chat.params.max_tokens is None and ctx.default_max_tokens is not None:  # worker --default-max-tokens
        chat.params.max_tokens = max(1, min(ctx.default_max_tokens, ctx.max_model_len - len(prompt_ids)))
    ctx.check_generation_budget(prompt_ids, chat.params, max_name)
    generation = ctx.new_generation(prompt_ids, chat.params, param_names={"prompt": "messages", "max_tokens": max_name})
    generation.prompt_logprobs = chat.extras.prompt_logprobs
    generation.start()
    try:
        first = await generation.first_updates()  # raises ApiError when the engine refuses the request
        if chat.stream:
            return await _stream(request, ctx, chat, generation, first)
        response = _complete(ctx, chat, generation, first + await generation.run_to_end())
        response.headers.update(ignored_fields_header(chat.extras.ignored_fields))
        return response
    finally:
        generation.abort()  # no-op when it finished; frees the KV of a client that left


def _outputs(ctx: ServerContext, chat: ChatRequest) -> list[ChoiceOutput]:
    return [ChoiceOutput(ctx.reasoning_parser, chat.tool_choice, ctx.tool_parser, chat.parallel_tool_calls)
            for _ in range(chat.params.n)]


def _response_id(chat: ChatRequest) -> str:
    return f"chatcmpl-{chat.extras.request_id}" if chat.extras.request_id else new_response_id("chatcmpl")


def _prompt_logprobs(ctx: ServerContext, chat: ChatRequest, generation: Generation) -> dict:
    """{"prompt_logprobs": [...]} when the request asked for them, else {} (the response is unchanged)."""
    if chat.extras.prompt_logprobs is None:
        return {}
    entries = generation.prompt_logprob_entries or []
    return {"prompt_logprobs": vllm_prompt_logprobs(entries, chat.extras.prompt_logprobs, ctx.token_texts)}


def _echo(chat: ChatRequest) -> str:
    return echoed_text(chat.echo, chat.messages, chat.add_generation_prompt)


def _complete(ctx: ServerContext, chat: ChatRequest, generation: Generation, updates: list[ChoiceUpdate]) -> web.Response:
    choices = []
    outputs = _outputs(ctx, chat)
    echo = _echo(chat)
    for total in merge_choice_updates(chat.params.n, updates):
        output = outputs[total.index]
        choices.append({
            "index": total.index,
            "message": with_echo(output.message(total.text), echo),
            "logprobs": chat_logprobs(total.logprobs or [], ctx.token_texts) if chat.logprobs else None,
            "finish_reason": finish_reason_with_calls(total.finish_reason, output.calls, chat.tool_choice),
            "stop_reason": total.stop_reason,
        })
    return json_response({
        "id": _response_id(chat),
        "object": "chat.completion",
        "created": int(time.time()),
        "model": ctx.model_name,
        "choices": choices,
        "usage": usage(generation.num_prompt_tokens, generation.num_completion_tokens, generation.num_cached_tokens),
        **_prompt_logprobs(ctx, chat, generation),
    })


async def _stream(request: web.Request, ctx: ServerContext, chat: ChatRequest, generation: Generation,
                  first: list[ChoiceUpdate]) -> web.StreamResponse:
    writer = SSEWriter(request, headers=ignored_fields_header(chat.extras.ignored_fields))
    header = {
        "id": _response_id(chat),
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": ctx.model_name,
    }
    if chat.include_usage or chat.continuous_usage:
        header["usage"] = None  # as OpenAI: every chunk has "usage", null but in the last one
    outputs = _outputs(ctx, chat)

    def chunk(index: int, delta: dict, logprobs=None, finish_reason=None) -> dict:
        event = {**header, "choices": [{"index": index, "delta": delta, "logprobs": logprobs,
                                        "finish_reason": finish_reason}]}
        if chat.continuous_usage:
            event["usage"] = usage(generation.num_prompt_tokens, generation.num_completion_tokens,
                                   generation.num_cached_tokens)
        return event

    def chunks(updates: list[ChoiceUpdate]) -> list[dict]:
        events = []
        for update in updates:
            output = outputs[update.index]
            logprobs = chat_logprobs(update.logprobs, ctx.token_texts) if chat.logprobs and update.logprobs else None
            deltas = output.feed(update.text) if update.text else []
            if update.finish_reason:
                deltas += output.finish()
            if logprobs and not deltas:
                deltas = [{}]  # the tokens' logprobs go out even while their text is held back
            for j, delta in enumerate(deltas):
                events.append(chunk(update.index, delta, logprobs if j == 0 else None))
            if update.finish_reason:
                reason = finish_reason_with_calls(update.finish_reason, output.calls, chat.tool_choice)
                events.append(chunk(update.index, {}, None, reason))
        return events

    try:
        await writer.prepare()
        roles = [chunk(i, {"role": "assistant", "content": _echo(chat)}) for i in range(chat.params.n)]
        roles[0].update(_prompt_logprobs(ctx, chat, generation))
        await writer.send(roles + chunks(first))
        try:
            async for updates in generation.updates():
                await writer.send(chunks(updates))
        except ClientGone:
            raise
        except Exception as error:  # noqa: BLE001 - the engine died mid-stream (ApiError), or a bug
            await end_with_error(writer, error)
            return writer.response
        if chat.include_usage or chat.continuous_usage:
            await writer.send([{**header, "choices": [], "usage": usage(
                generation.num_prompt_tokens, generation.num_completion_tokens, generation.num_cached_tokens)}])
        await writer.send_done()
    except ClientGone:
        generation.abort()
    return writer.response
