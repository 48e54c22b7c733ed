"""OpenAI request bodies: parsing, type checks and translation to `SamplingParams`.

Each parser takes the decoded JSON body and returns a plain request object, or raises
`ApiError(400)` whose `param` names the offending field. Rules, as OpenAI applies them:
  * a field set to `null` means "use the default";
  * a known field of the wrong type or out of range is rejected with a message saying what is expected;
  * a field this server does not implement is accepted, logged and listed in the response's
    X-Ignored-Fields header, as vLLM does (`strict=True`, the worker's --strict-fields, refuses it with
    "Unrecognized request argument supplied"); see worker.server.extra_fields.
Range checks of sampling fields live in `SamplingParams.validate`; here we only map their error
back to the name the client used (`max_completion_tokens`, `top_logprobs`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from worker.sampling_params import MAX_LOGPROBS, InvalidParameter, SamplingParams, StructuredOutput
from worker.server.errors import bad_request
from worker.server.extra_fields import NO_EFFECT_FIELDS, unknown_fields
from worker.server.structured import STRUCTURED_FIELDS, ToolChoice, parse_tool_choice, parse_tools, structured_output
from worker.server.limits import MAX_PRIORITY, MAX_STOP_STRING_CHARS, MAX_STOP_TOKEN_IDS, MAX_TOKEN_ID

# Sampling fields passed to SamplingParams under the same name (vLLM-style extensions included).
_SAMPLING_FIELDS = (
    "n",
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "seed",
    "presence_penalty",
    "frequency_penalty",
    "repetition_penalty",
    "ignore_eos",
    "min_tokens",
    "stop",
    "stop_token_ids",
    "include_stop_str_in_output",
    "skip_special_tokens",
    "priority",
)
# Fields every generation endpoint reads (vLLM's names for its extensions).
_COMMON_FIELDS = {
    "model", "stream", "stream_options", "max_tokens", "logit_bias", "allowed_token_ids", "bad_words",
    "truncate_prompt_tokens", "add_special_tokens", "request_id", "prompt_logprobs", *_SAMPLING_FIELDS, *STRUCTURED_FIELDS,
    *NO_EFFECT_FIELDS,
}
COMPLETION_FIELDS = _COMMON_FIELDS | {"prompt", "logprobs", "echo", "suffix", "best_of"}
CHAT_FIELDS = _COMMON_FIELDS | {
    "messages",
    "max_completion_tokens",
    "logprobs",
    "top_logprobs",
    "tools",
    "tool_choice",
    "parallel_tool_calls",
    "add_generation_prompt",
    "continue_final_message",
    "chat_template",
    "chat_template_kwargs",
    "documents",
    "echo",
}
SEED_RANGE = (-(2**63), 2**63 - 1)
MAX_PROMPTS_PER_REQUEST = 256  # prompts in one /v1/completions batch
MAX_CHOICES_PER_REQUEST = 256  # n * prompts: each choice is a sequence in the engine


@dataclass
class CompletionRequest:
    model: str | None
    prompts: list[str | list[int]]  # one engine request per prompt
    params: SamplingParams
    stream: bool = False
    include_usage: bool = False
    echo: bool = False
    logprobs: int | None = None  # top-k alternatives per token; None: no logprobs
    continuous_usage: bool = False  # usage (so far) in every streamed chunk
    extras: "GenerationExtras" = field(default_factory=lambda: GenerationExtras())
    keep_n: int | None = None  # best_of > n: params.n is best_of, the response keeps the keep_n most likely


@dataclass
class GenerationExtras:
    """vLLM-style fields both generation endpoints take, applied by the handler once it has the tokenizer."""

    ignored_fields: list[str] = field(default_factory=list)  # accepted, not acted on (X-Ignored-Fields)
    add_special_tokens: bool | None = None  # None: the endpoint's default (completions yes, chat no)
    truncate_prompt_tokens: int | None = None  # keep only the last k prompt tokens
    bad_words: list[str] = field(default_factory=list)
    request_id: str | None = None  # the client's id, used as the response id
    structured: StructuredOutput | None = None
    structured_param: str | None = None  # the field the constraint came from (for error messages)
    prompt_logprobs: int | None = None  # vLLM's: the logprob and top k of every prompt token


@dataclass
class ChatRequest:
    model: str | None
    messages: list[dict]
    params: SamplingParams
    stream: bool = False
    include_usage: bool = False
    logprobs: bool = False
    top_logprobs: int = 0
    tools: list[dict] | None = None
    add_generation_prompt: bool = True
    continuous_usage: bool = False  # usage (so far) in every streamed chunk
    chat_template_kwargs: dict | None = None  # extra template variables, e.g. {"enable_thinking": false}
    tool_choice: ToolChoice = field(default_factory=ToolChoice)
    parallel_tool_calls: bool = True
    continue_final_message: bool = False  # render the last (assistant) message open, to be continued
    chat_template: str | None = None  # a template for this request instead of the model's
    extras: GenerationExtras = field(default_factory=GenerationExtras)
    echo: bool = False  # vLLM's: the continued last message's content starts the response's content


@dataclass
class TokenizeRequest:
    model: str | None
    prompt: str | None = None
    messages: list[dict] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True
    tools: list[dict] | None = None
    chat_template_kwargs: dict | None = None
    chat_template: str | None = None
    continue_final_message: bool = False
    return_token_strs: bool = False  # also the text of each token (vLLM's field)
    ignored_fields: list[str] = field(default_factory=list)


@dataclass
class DetokenizeRequest:
    model: str | None
    tokens: list[int] = field(default_factory=list)


# ---------------------------------------------------------------------- type checks
def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__.replace("dict", "object").replace("list", "array")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def expect_object(body: Any) -> dict:
    if not isinstance(body, dict):
        raise bad_request(None, f"The request body must be a JSON object, got {_type_name(body)}.")
    return body


def _reject_unknown(body: dict, allowed: set[str]) -> None:
    for name in body:
        if name not in allowed:
            raise bad_request(name, f"Unrecognized request argument supplied: {name}")


def _get(body: dict, name: str, kind: type | tuple, default: Any, what: str) -> Any:
    """body[name] if present and not null, checked against `kind` (bool is never an int here)."""
    value = body.get(name)
    if value is None:
        return default
    ok = isinstance(value, kind) and not (isinstance(value, bool) and bool not in _as_tuple(kind))
    if not ok:
        raise bad_request(name, f"'{name}' must be {what}, got {_type_name(value)} {_short(value)}.")
    return value


def _as_tuple(kind: type | tuple) -> tuple:
    return kind if isinstance(kind, tuple) else (kind,)


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _get_model(body: dict) -> str | None:
    return _get(body, "model", str, None, "a string")


def _get_stream(body: dict) -> tuple[bool, bool, bool]:
    """(stream, include_usage, continuous_usage_stats): the vLLM extension puts usage in every chunk."""
    stream = _get(body, "stream", bool, False, "a boolean")
    options = _get(body, "stream_options", dict, None, "an object")
    include_usage = continuous = False
    if options is not None:
        if not stream:
            raise bad_request("stream_options", "'stream_options' is only allowed when 'stream' is true.")
        for key in options:
            if key not in ("include_usage", "continuous_usage_stats"):
                raise bad_request(f"stream_options.{key}", f"Unrecognized stream option: {key}")
        include_usage = options.get("include_usage") or False
        continuous = options.get("continuous_usage_stats") or False
        for name, value in (("include_usage", include_usage), ("continuous_usage_stats", continuous)):
            if not isinstance(value, bool):
                raise bad_request(f"stream_options.{name}", f"'{name}' must be a boolean.")
    return stream, include_usage, continuous


def _logit_bias(body: dict) -> dict[int, float] | None:
    """OpenAI's logit_bias: token ids as JSON object keys (strings) -> a bias in [-100, 100]."""
    bias = _get(body, "logit_bias", dict, None, "an object")
    if not bias:
        return None
    parsed = {}
    for key, value in bias.items():
        token = int(key) if isinstance(key, str) and key.isdigit() else None
        if token is None or token > MAX_TOKEN_ID:
            raise bad_request("logit_bias", f"'logit_bias' keys must be token ids, got {_short(key)}.")
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not -100 <= value <= 100:
            raise bad_request("logit_bias", f"'logit_bias' values must be numbers in [-100, 100], got {_short(value)}.")
        parsed[token] = float(value)
    return parsed


def _extras(body: dict, ignored: list[str]) -> GenerationExtras:
    """The vLLM extension fields shared by both endpoints, type-checked."""
    bad_words = _get(body, "bad_words", list, [], "an array of strings")
    if not all(isinstance(w, str) and w for w in bad_words):
        raise bad_request("bad_words", "'bad_words' must be an array of non-empty strings.")
    truncate = _positive_int_or_none(body, "truncate_prompt_tokens")
    if truncate is not None and (truncate < -1 or truncate == 0):
        raise bad_request("truncate_prompt_tokens", "'truncate_prompt_tokens' must be a positive number of "
                          "tokens, or -1 for the context length.")
    constraint, constraint_param = structured_output(body)
    prompt_logprobs = _positive_int_or_none(body, "prompt_logprobs")
    if prompt_logprobs is not None and not 0 <= prompt_logprobs <= MAX_LOGPROBS:
        raise bad_request("prompt_logprobs", f"'prompt_logprobs' must be between 0 and {MAX_LOGPROBS}, got "
                          f"{prompt_logprobs} (-1, the whole vocabulary, is not supported).")
    return GenerationExtras(
        ignored_fields=ignored,
        add_special_tokens=_get(body, "add_special_tokens", bool, None, "a boolean"),
        truncate_prompt_tokens=truncate,
        bad_words=list(bad_words),
        request_id=_get(body, "request_id", str, None, "a string"),
        structured=constraint,
        structured_param=constraint_param,
        prompt_logprobs=prompt_logprobs,
    )


def _allowed_token_ids(body: dict) -> list[int] | None:
    ids = _get(body, "allowed_token_ids", list, None, "an array of token ids")
    if ids is not None and (not ids or not all(_is_int(t) and 0 <= t <= MAX_TOKEN_ID for t in ids)):
        raise bad_request("allowed_token_ids", "'allowed_token_ids' must be a non-empty array of token ids.")
    return ids


def _sampling_params(body: dict, max_tokens: int | None, max_tokens_name: str, logprobs: int | None,
                     logprobs_name: str) -> SamplingParams:
    """Build SamplingParams from the body; its validation errors name the field the client sent."""
    kwargs = {name: body[name] for name in _SAMPLING_FIELDS if body.get(name) is not None}
    if "stop" in kwargs and not isinstance(kwargs["stop"], (str, list)):
        raise bad_request("stop", f"'stop' must be a string or an array of strings, got {_type_name(kwargs['stop'])}.")
    if "seed" in kwargs and _is_int(kwargs["seed"]) and not (SEED_RANGE[0] <= kwargs["seed"] <= SEED_RANGE[1]):
        raise bad_request("seed", f"'seed' must fit in a signed 64-bit integer, got {kwargs['seed']}.")
    if "top_k" in kwargs and kwargs["top_k"] == -1:
        kwargs["top_k"] = 0  # vLLM spelling of "disabled"
    _check_bounds(kwargs)
    try:
        return SamplingParams(max_tokens=max_tokens, logprobs=logprobs, logit_bias=_logit_bias(body),
                              allowed_token_ids=_allowed_token_ids(body), **kwargs)
    except InvalidParameter as error:
        param = {"max_tokens": max_tokens_name, "logprobs": logprobs_name}.get(error.param, error.param)
        raise bad_request(param, f"'{param}' {error.message}.") from None
    except TypeError as error:  # a list where a scalar belongs, caught by a comparison inside validate()
        raise bad_request(None, f"Invalid sampling parameter: {error}") from None


def _check_bounds(kwargs: dict) -> None:
    """Upper bounds SamplingParams leaves open: past them a value only costs the engine time or memory."""
    for name, low, high in (("top_k", 0, MAX_TOKEN_ID), ("min_tokens", 0, MAX_TOKEN_ID),
                            ("priority", -MAX_PRIORITY, MAX_PRIORITY)):
        value = kwargs.get(name)
        if _is_int(value) and not (low <= value <= high):
            raise bad_request(name, f"'{name}' must be between {low} and {high}, got {value}.")
    stop = kwargs.get("stop")
    for text in [stop] if isinstance(stop, str) else stop if isinstance(stop, list) else []:
        if isinstance(text, str) and len(text) > MAX_STOP_STRING_CHARS:
            raise bad_request("stop", f"each stop string must be at most {MAX_STOP_STRING_CHARS} characters, "
                              f"got one of {len(text)}.")
    stop_ids = kwargs.get("stop_token_ids")
    if isinstance(stop_ids, list):
        if len(stop_ids) > MAX_STOP_TOKEN_IDS:
            raise bad_request("stop_token_ids", f"at most {MAX_STOP_TOKEN_IDS} stop token ids are allowed, "
                              f"got {len(stop_ids)}.")
        if any(_is_int(t) and t > MAX_TOKEN_ID for t in stop_ids):
            raise bad_request("stop_token_ids", f"token ids must be at most {MAX_TOKEN_ID}.")


def _positive_int_or_none(body: dict, name: str) -> int | None:
    """An integer field (token counts, logprobs): a type error or a value beyond 32 bits is a 400."""
    value = body.get(name)
    if value is not None and not _is_int(value):
        raise bad_request(name, f"'{name}' must be an integer, got {_type_name(value)} {_short(value)}.")
    if value is not None and abs(value) > MAX_TOKEN_ID:
        raise bad_request(name, f"'{name}' must be at most {MAX_TOKEN_ID}, got {value}.")
    return value


# ---------------------------------------------------------------------- /v1/completions
def parse_completion_request(body: Any, strict: bool = False) -> CompletionRequest:
    body = expect_object(body)
    ignored = unknown_fields(body, COMPLETION_FIELDS, strict)
    model = _get_model(body)
    stream, include_usage, continuous_usage = _get_stream(body)
    prompts = _parse_prompts(body.get("prompt"))
    if _get(body, "suffix", str, None, "a string"):
        raise bad_request("suffix", "'suffix' is not supported by this server.")
    echo = _get(body, "echo", bool, False, "a boolean")
    logprobs = _positive_int_or_none(body, "logprobs")
    if logprobs is not None and not (0 <= logprobs <= MAX_LOGPROBS):
        raise bad_request("logprobs", f"'logprobs' must be between 0 and {MAX_LOGPROBS}, got {logprobs}.")
    max_tokens = _positive_int_or_none(body, "max_tokens")
    params = _sampling_params(body, 16 if max_tokens is None else max_tokens, "max_tokens", logprobs, "logprobs")
    best_of = _positive_int_or_none(body, "best_of")
    if best_of is not None and best_of < params.n:
        raise bad_request("best_of", f"'best_of' must be at least 'n' ({params.n}), got {best_of}.")
    if best_of is not None and best_of > params.n:
        if stream:
            raise bad_request("best_of", "'best_of' greater than 'n' cannot be streamed: the best choices are "
                              "known only at the end.")
        # the engine samples best_of choices with their logprobs; the response keeps the n most likely
        user_n, params.n = params.n, best_of
        if params.logprobs is None:
            params.logprobs = 0
        _check_choice_count(params.n, len(prompts))
        return CompletionRequest(model, prompts, params, stream, include_usage, echo, logprobs, continuous_usage,
                                 _extras(body, ignored), keep_n=user_n)
    _check_choice_count(params.n, len(prompts))
    return CompletionRequest(model, prompts, params, stream, include_usage, echo, logprobs, continuous_usage,
                             _extras(body, ignored))


def _check_choice_count(n: int, num_prompts: int) -> None:
    if n * num_prompts > MAX_CHOICES_PER_REQUEST:
        raise bad_request("n", f"n * (number of prompts) must be at most {MAX_CHOICES_PER_REQUEST}, got "
                          f"{n} * {num_prompts}.")


def _parse_prompts(prompt: Any) -> list[str | list[int]]:
    """str | [str, ...] | [int, ...] | [[int, ...], ...] -> a list of prompts."""
    if prompt is None:
        raise bad_request("prompt", "'prompt' is required.")
    if isinstance(prompt, str):
        return [prompt]
    if not isinstance(prompt, list) or not prompt:
        raise bad_request("prompt", "'prompt' must be a string, an array of strings, an array of token ids "
                          "or an array of arrays of token ids (not empty).")
    if all(_is_int(t) for t in prompt):
        return [_token_ids(prompt, "prompt")]
    if len(prompt) > MAX_PROMPTS_PER_REQUEST:
        raise bad_request("prompt", f"at most {MAX_PROMPTS_PER_REQUEST} prompts per request, got {len(prompt)}.")
    prompts: list[str | list[int]] = []
    for i, item in enumerate(prompt):
        if isinstance(item, str):
            prompts.append(item)
        elif isinstance(item, list) and item and all(_is_int(t) for t in item):
            prompts.append(_token_ids(item, f"prompt[{i}]"))
        else:
            raise bad_request(f"prompt[{i}]", "each prompt must be a string or a non-empty array of token ids.")
    return prompts


def _token_ids(ids: list, param: str) -> list[int]:
    if any(t < 0 or t > MAX_TOKEN_ID for t in ids):
        raise bad_request(param, f"token ids must be integers between 0 and {MAX_TOKEN_ID}.")
    return list(ids)


# ---------------------------------------------------------------------- /v1/chat/completions
def parse_chat_request(body: Any, strict: bool = False) -> ChatRequest:
    body = expect_object(body)
    ignored = unknown_fields(body, CHAT_FIELDS, strict)
    model = _get_model(body)
    stream, include_usage, continuous_usage = _get_stream(body)
    messages = parse_messages(body.get("messages"))
    tools = parse_tools(body.get("tools"))
    tool_choice = parse_tool_choice(body.get("tool_choice"), tools)
    parallel_tool_calls = _get(body, "parallel_tool_calls", bool, True, "a boolean")
    logprobs = _get(body, "logprobs", bool, False, "a boolean")
    top_logprobs = _positive_int_or_none(body, "top_logprobs")
    if top_logprobs is not None:
        if not logprobs:
            raise bad_request("top_logprobs", "'top_logprobs' needs 'logprobs' set to true.")
        if not (0 <= top_logprobs <= MAX_LOGPROBS):
            raise bad_request("top_logprobs", f"'top_logprobs' must be between 0 and {MAX_LOGPROBS}, got {top_logprobs}.")
    # max_completion_tokens is the current OpenAI name; max_tokens the deprecated one. The first set wins.
    max_name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = _positive_int_or_none(body, max_name)
    params = _sampling_params(body, max_tokens, max_name, (top_logprobs or 0) if logprobs else None, "top_logprobs")
    add_generation_prompt = _get(body, "add_generation_prompt", bool, True, "a boolean")
    continue_final = _get(body, "continue_final_message", bool, False, "a boolean")
    if continue_final:
        if body.get("add_generation_prompt"):
            raise bad_request("continue_final_message", "'continue_final_message' and 'add_generation_prompt' "
                              "cannot both be true: continue the last message or start a new one.")
        if messages[-1]["role"] != "assistant":
            raise bad_request("continue_final_message", "'continue_final_message' needs the last message to be "
                              "the assistant's.")
        add_generation_prompt = False
    template_kwargs = dict(_get(body, "chat_template_kwargs", dict, {}, "an object"))
    documents = _get(body, "documents", list, None, "an array of objects")
    if documents is not None:
        template_kwargs["documents"] = documents
    extras = _extras(body, ignored)
    if extras.structured is not None and tool_choice.mode in ("required", "named"):
        raise bad_request(extras.structured_param, f"'{extras.structured_param}' cannot be combined with "
                          f"tool_choice {tool_choice.mode!r}: the call's arguments already follow the tool's schema.")
    return ChatRequest(model, messages, params, stream, include_usage, logprobs, top_logprobs or 0, tools,
                       add_generation_prompt, continuous_usage, template_kwargs or None, tool_choice,
                       parallel_tool_calls, continue_final, _get(body, "chat_template", str, None, "a string"), extras,
                       _get(body, "echo", bool, False, "a boolean"))


CHAT_ROLES = ("system", "developer", "user", "assistant", "tool")


def parse_messages(messages: Any, param: str = "messages") -> list[dict]:
    """Check the messages and flatten text content parts into plain strings (what templates expect)."""
    if not isinstance(messages, list) or not messages:
        raise bad_request(param, f"'{param}' must be a non-empty array of message objects.")
    parsed = []
    for i, message in enumerate(messages):
        where = f"{param}[{i}]"
        if not isinstance(message, dict):
            raise bad_request(where, f"each message must be an object, got {_type_name(message)}.")
        role = message.get("role")
        if role not in CHAT_ROLES:
            raise bad_request(f"{where}.role", f"'role' must be one of {', '.join(CHAT_ROLES)}, got {_short(role)}.")
        content = message.get("content")
        if isinstance(content, list):
            content = _flatten_parts(content, f"{where}.content")
        elif content is None:
            if role != "assistant":
                raise bad_request(f"{where}.content", "'content' is required for this role.")
        elif not isinstance(content, str):
            raise bad_request(f"{where}.content", f"'content' must be a string or an array of parts, "
                              f"got {_type_name(content)}.")
        parsed.append({**message, "content": content})
    return parsed


def _flatten_parts(parts: list, where: str) -> str:
    texts = []
    for j, part in enumerate(parts):
        if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
            kind = part.get("type") if isinstance(part, dict) else _type_name(part)
            raise bad_request(f"{where}[{j}]", f"only text content parts are supported, got {_short(kind)}.")
        texts.append(part["text"])
    return "\n".join(texts)


# ---------------------------------------------------------------------- /tokenize, /detokenize
TOKENIZE_FIELDS = {"model", "prompt", "messages", "add_special_tokens", "add_generation_prompt", "tools",
                   "chat_template", "chat_template_kwargs", "continue_final_message", "return_token_strs"}


def parse_tokenize_request(body: Any, strict: bool = False) -> TokenizeRequest:
    body = expect_object(body)
    ignored = unknown_fields(body, TOKENIZE_FIELDS, strict)
    model = _get_model(body)
    prompt = _get(body, "prompt", str, None, "a string")
    messages = parse_messages(body["messages"]) if body.get("messages") is not None else None
    if (prompt is None) == (messages is None):
        raise bad_request("prompt", "give exactly one of 'prompt' (a string) or 'messages' (chat messages).")
    return TokenizeRequest(
        model,
        prompt,
        messages,
        add_special_tokens=_get(body, "add_special_tokens", bool, messages is None, "a boolean"),
        add_generation_prompt=_get(body, "add_generation_prompt", bool, True, "a boolean"),
        tools=_get(body, "tools", list, None, "an array"),
        chat_template_kwargs=_get(body, "chat_template_kwargs", dict, None, "an object"),
        chat_template=_get(body, "chat_template", str, None, "a string"),
        continue_final_message=_get(body, "continue_final_message", bool, False, "a boolean"),
        return_token_strs=_get(body, "return_token_strs", bool, False, "a boolean"),
        ignored_fields=ignored,
    )


def parse_detokenize_request(body: Any) -> DetokenizeRequest:
    body = expect_object(body)
    _reject_unknown(body, {"model", "tokens"})
    tokens = body.get("tokens")
    if not isinstance(tokens, list) or not all(_is_int(t) and t >= 0 for t in tokens):
        raise bad_request("tokens", "'tokens' must be an array of non-negative integer token ids.")
    return DetokenizeRequest(_get_model(body), tokens)

