"""POST /v1/completions: prompt(s) -> tokens -> engine -> text completion (or chunks).

A batch of prompts becomes one engine request per prompt; choice `p * n + i` of the response is
choice `i` of prompt `p`, as in the OpenAI API.

`echo` puts the prompt's text before each choice's text; with `logprobs` the prompt's tokens and their
logprobs (the engine's prompt logprobs, the first token's null) also come first in `choices[].logprobs`.
vLLM's `prompt_logprobs` adds `choices[].prompt_logprobs` (as in vLLM, echo with logprobs gives it too).
Streamed, both ride on a choice's first chunk.
"""

from __future__ import annotations

import asyncio
import time

from aiohttp import web

from worker.server.context import CTX_KEY, ServerContext, new_response_id, read_json, usage
from worker.server.extra_fields import ignored_fields_header
from worker.server.generation import ChoiceUpdate, Generation, merge_choice_updates, merge_generations
from worker.server.logprobs import CompletionLogprobs, joined_completion_logprobs, vllm_prompt_logprobs
from worker.server.protocol import CompletionRequest, parse_completion_request
from worker.server.streaming import ClientGone, SSEWriter, end_with_error, json_response


async def completions(request: web.Request) -> web.StreamResponse:
    ctx: ServerContext = request.app[CTX_KEY]
    body = ctx.with_sampling_defaults(await read_json(request))
    completion = parse_completion_request(body, strict=ctx.strict_fields)
    ctx.check_model(completion.model)
    ctx.check_serving()
    extras = completion.extras
    ctx.apply_extras(completion.params, extras)
    add_special = extras.add_special_tokens is not False
    many = len(completion.prompts) > 1
    prompt_ids = []
    for prompt in completion.prompts:
        ids = await ctx.encode_off_loop(prompt, add_special_tokens=add_special) if isinstance(prompt, str) else prompt
        ids = ctx.truncated_prompt(ids, extras)
        ctx.check_generation_budget(ids, completion.params)
        prompt_ids.append(ids)
    n = completion.params.n
    generations = [
        ctx.new_generation(ids, completion.params, index_offset=p * n,
                           param_names={"prompt": f"prompt[{p}]"} if many else None)
        for p, ids in enumerate(prompt_ids)
    ]
    for generation in generations:
        generation.prompt_logprobs = _engine_prompt_logprobs(completion)
    try:
        for generation in generations:
            generation.start()
        # Wait for each prompt's first tokens: a request the engine refuses is still an HTTP error here.
        first = [u for batch in await asyncio.gather(*(g.first_updates() for g in generations)) for u in batch]
        echo = _echo_texts(ctx, completion, prompt_ids)
        if completion.stream:
            return await _stream(request, ctx, completion, generations, first, echo)
        response = await _complete(ctx, completion, generations, first, echo)
        response.headers.update(ignored_fields_header(extras.ignored_fields))
        return response
    finally:
        for generation in generations:
            generation.abort()  # no-op for finished ones; frees the KV of a client that left


def _echo_texts(ctx: ServerContext, completion: CompletionRequest, prompt_ids: list[list[int]]) -> list[str] | None:
    if not completion.echo:
        return None
    return [p if isinstance(p, str) else ctx.tokenizer.decode(ids) for p, ids in zip(completion.prompts, prompt_ids)]


def _engine_prompt_logprobs(completion: CompletionRequest) -> int | None:
    """The top k of prompt logprobs the engine computes: what prompt_logprobs asks, and for echo with
    logprobs the prompt's own top `logprobs` (vLLM: echo alone defaults prompt_logprobs to logprobs)."""
    wanted = [k for k in (completion.extras.prompt_logprobs, completion.logprobs if completion.echo else None)
              if k is not None]
    return max(wanted) if wanted else None


def _with_prompt_parts(ctx: ServerContext, completion: CompletionRequest, generation: Generation, choice: dict,
                       output_logprobs: dict | None) -> dict:
    """A choice's first (or only) object with the prompt's parts added: the echoed prompt's logprobs before
    the output's, and `prompt_logprobs` whenever they were computed (as vLLM, also for echo with logprobs)."""
    entries = generation.prompt_logprob_entries or []
    if completion.echo and completion.logprobs is not None:
        prompt = CompletionLogprobs(ctx.token_texts).format_prompt(generation.prompt_token_ids, entries,
                                                                     completion.logprobs)
        choice["logprobs"] = joined_completion_logprobs(prompt, output_logprobs)
    if generation.prompt_logprobs is not None:
        top_k = completion.extras.prompt_logprobs
        choice["prompt_logprobs"] = vllm_prompt_logprobs(
            entries, completion.logprobs if top_k is None else top_k, ctx.token_texts)
    return choice


def best_choices(totals: list[ChoiceUpdate], best_of: int, keep: int) -> list[ChoiceUpdate]:
    """best_of: of each prompt's `best_of` choices keep the `keep` with the highest cumulative logprob,
    renumbered p * keep + i, most likely first."""
    kept = []
    for p in range(len(totals) // best_of):
        group = totals[p * best_of:(p + 1) * best_of]
        group.sort(key=lambda t: sum(lp.logprob for lp in t.logprobs or []), reverse=True)
        for i, total in enumerate(group[:keep]):
            total.index = p * keep + i
            kept.append(total)
    return kept


def _response_id(completion: CompletionRequest) -> str:
    return f"cmpl-{completion.extras.request_id}" if completion.extras.request_id else new_response_id("cmpl")


def _totals(generations: list[Generation]) -> tuple[int, int, int]:
    return (
        sum(g.num_prompt_tokens for g in generations),
        sum(g.num_completion_tokens for g in generations),
        sum(g.num_cached_tokens for g in generations),
    )


async def _complete(ctx: ServerContext, completion: CompletionRequest, generations: list[Generation],
                    first: list[ChoiceUpdate], echo: list[str] | None) -> web.Response:
    n = completion.params.n
    rest = await asyncio.gather(*(g.run_to_end() for g in generations))
    totals = merge_choice_updates(n * len(generations), first, *rest)
    if completion.keep_n is not None:
        totals, n = best_choices(totals, n, completion.keep_n), completion.keep_n
    choices = []
    for total in totals:
        prefix = echo[total.index // n] if echo else ""
        logprobs = None
        if completion.logprobs is not None:
            logprobs = CompletionLogprobs(ctx.token_texts, len(prefix)).format(total.logprobs or [])
        choices.append(_with_prompt_parts(ctx, completion, generations[total.index // n], {
            "index": total.index,
            "text": prefix + total.text,
            "logprobs": logprobs,
            "finish_reason": total.finish_reason,
            "stop_reason": total.stop_reason,
        }, logprobs))
    return json_response({
        "id": _response_id(completion),
        "object": "text_completion",
        "created": int(time.time()),
        "model": ctx.model_name,
        "choices": choices,
        "usage": usage(*_totals(generations)),
    })


async def _stream(request: web.Request, ctx: ServerContext, completion: CompletionRequest,
                  generations: list[Generation], first: list[ChoiceUpdate], echo: list[str] | None) -> web.StreamResponse:
    writer = SSEWriter(request, headers=ignored_fields_header(completion.extras.ignored_fields))
    n = completion.params.n
    header = {"id": _response_id(completion), "object": "text_completion", "created": int(time.time()),
              "model": ctx.model_name}
    if completion.include_usage or completion.continuous_usage:
        header["usage"] = None
    offsets = [len(echo[i // n]) if echo else 0 for i in range(n * len(generations))]
    logprob_formatters = [CompletionLogprobs(ctx.token_texts, offset) for offset in offsets]
    with_prompt_parts = echo or generations[0].prompt_logprobs is not None
    prompt_pending = set(range(n * len(generations))) if with_prompt_parts else set()

    def chunks(updates: list[ChoiceUpdate]) -> list[dict]:
        events = []
        for update in updates:
            text = update.text
            first = update.index in prompt_pending
            prompt_pending.discard(update.index)
            if first and echo:
                text = echo[update.index // n] + text
            logprobs = None
            if completion.logprobs is not None and update.logprobs:
                logprobs = logprob_formatters[update.index].format(update.logprobs)
            if text or logprobs or update.finish_reason or first:
                choice = {"index": update.index, "text": text, "logprobs": logprobs,
                          "finish_reason": update.finish_reason}
                if first:
                    choice = _with_prompt_parts(ctx, completion, generations[update.index // n], choice, logprobs)
                event = {**header, "choices": [choice]}
                if completion.continuous_usage:
                    event["usage"] = usage(*_totals(generations))
                events.append(event)
        return events

    try:
        await writer.prepare()
        await writer.send(chunks(first))
        try:
            async for updates in merge_generations(generations):
                await writer.send(chunks(updates))
        except ClientGone:
            raise
        except Exception as error:  # noqa: BLE001 - the engine died mid-stream (ApiError), or a bug
            await end_with_error(writer, error)
            return writer.response
        if completion.include_usage or completion.continuous_usage:
            await writer.send([{**header, "choices": [], "usage": usage(*_totals(generations))}])
        await writer.send_done()
    except ClientGone:
        for generation in generations:
            generation.abort()
    return writer.response
