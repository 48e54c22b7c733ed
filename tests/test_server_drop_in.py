"""A real CPU demo worker as a drop-in for clients written for OpenAI / vLLM, through the official SDK:
extra fields, structured outputs, tool calls (enforced and parsed, streamed and not), reasoning, /version.

The demo model has random weights; outputs are made meaningful by constrained decoding (a schema, a regex)
so the parsing and formatting around them can be checked exactly.
"""

from __future__ import annotations

import json
import re
import urllib.request

import jsonschema
import openai
import pytest

from worker.server.launcher import WorkerProcess

MODEL = "demo"
MESSAGES = [{"role": "user", "content": "What is the weather like?"}]
WEATHER = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 8}, "days": {"type": "integer", "minimum": 1, "maximum": 7}},
    "required": ["city", "days"],
}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "forecast", "parameters": WEATHER}},
    {"type": "function", "function": {"name": "get_time", "parameters": {
        "type": "object", "properties": {"zone": {"enum": ["UTC", "CET"]}}, "required": ["zone"]}}},
]
# what the demo model's family (Llama 3.1 JSON) writes for a call, forced with a regex
LLAMA_CALL_REGEX = r'\{"name": "get_weather", "parameters": \{"city": "[a-z]{1,6}", "days": [1-7]\}\}'


@pytest.fixture(scope="module")
def worker():
    with WorkerProcess(["--model", MODEL, "--device", "cpu", "--kv-cache-tokens", "16384", "--no-progress",
                        "--reasoning-parser", "qwen3"], env={"OMP_NUM_THREADS": "1"}) as process:
        yield process


@pytest.fixture(scope="module")
def client(worker):
    return openai.OpenAI(base_url=worker.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def create(client, **kwargs):
    kwargs.setdefault("model", MODEL)
    kwargs.setdefault("messages", MESSAGES)
    kwargs.setdefault("max_tokens", 120)
    kwargs.setdefault("temperature", 0)
    return client.chat.completions.create(**kwargs)


def streamed_message(client, **kwargs) -> tuple[dict, str]:
    """The message a stream adds up to (content, reasoning_content, tool_calls by index) and its finish reason."""
    message = {"content": "", "reasoning_content": "", "tool_calls": {}}
    finish = None
    for chunk in create(client, stream=True, **kwargs):
        if not chunk.choices:
            continue
        choice = chunk.choices[0]
        delta = choice.delta
        message["content"] += delta.content or ""
        message["reasoning_content"] += getattr(delta, "reasoning_content", None) or ""
        for call in delta.tool_calls or []:
            entry = message["tool_calls"].setdefault(call.index, {"name": "", "arguments": ""})
            entry["name"] += call.function.name or ""
            entry["arguments"] += call.function.arguments or ""
        finish = choice.finish_reason or finish
    return message, finish


def calls_of(message) -> list[tuple[str, dict]]:
    return [(c.function.name, json.loads(c.function.arguments)) for c in message.tool_calls or []]


# ---------------------------------------------------------------------- extra fields
def test_unimplemented_fields_are_ignored_and_listed_in_a_header(client):
    raw = client.chat.completions.with_raw_response.create(
        model=MODEL, messages=MESSAGES, max_tokens=4, extra_body={"cache_salt": "s", "bootstrap_room": 7})
    assert raw.headers["x-ignored-fields"] == "cache_salt, bootstrap_room"
    assert raw.parse().choices[0].message.content is not None
    plain = client.chat.completions.with_raw_response.create(model=MODEL, messages=MESSAGES, max_tokens=2, user="u")
    assert "x-ignored-fields" not in plain.headers


def test_logit_bias_allowed_token_ids_and_bad_words_change_the_output(client):
    tokenize = json.loads(_post(client, "/tokenize", {"prompt": " sunny", "add_special_tokens": False}))
    token = tokenize["tokens"][0]
    forced = create(client, max_tokens=4, logit_bias={str(token): 100}, extra_body={"ignore_eos": True})
    assert forced.choices[0].message.content.strip() == _decode(client, [token] * 4).strip()
    allowed = json.loads(_post(client, "/tokenize", {"prompt": " rain snow wind", "add_special_tokens": False}))["tokens"]
    limited = client.completions.create(model=MODEL, prompt="Today:", max_tokens=8, temperature=1.0, seed=3,
                                        logprobs=0, extra_body={"allowed_token_ids": allowed, "ignore_eos": True})
    assert set(_completion_ids(client, limited)) <= set(allowed)
    free = create(client, max_tokens=12, extra_body={"ignore_eos": True}).choices[0].message.content
    word = free.split()[1]
    banned = create(client, max_tokens=12, extra_body={"ignore_eos": True, "bad_words": [word]})
    assert word not in banned.choices[0].message.content.split()


def _completion_ids(client, completion) -> list[int]:
    text_tokens = completion.choices[0].logprobs.tokens
    vocab = {}
    for text in set(text_tokens):
        vocab[text] = json.loads(_post(client, "/tokenize", {"prompt": text, "add_special_tokens": False}))["tokens"]
    return [t for text in text_tokens for t in vocab[text]]


def test_truncate_prompt_tokens_request_id_and_chat_template(client):
    truncated = create(client, max_tokens=1, extra_body={"truncate_prompt_tokens": 5, "request_id": "abc123"})
    assert truncated.usage.prompt_tokens == 5
    assert truncated.id == "chatcmpl-abc123"
    templated = create(client, max_tokens=1, extra_body={"chat_template": "{% for m in messages %}{{ m.content }}{% endfor %}"})
    expected = json.loads(_post(client, "/tokenize", {"prompt": MESSAGES[0]["content"], "add_special_tokens": False}))
    assert templated.usage.prompt_tokens == expected["count"]


def test_continue_final_message_leaves_the_last_turn_open(client):
    messages = MESSAGES + [{"role": "assistant", "content": "It is"}]
    closed = create(client, messages=messages, max_tokens=1, extra_body={"add_generation_prompt": False})
    opened = create(client, messages=messages, max_tokens=1,
                    extra_body={"continue_final_message": True, "add_generation_prompt": False})
    assert opened.usage.prompt_tokens == closed.usage.prompt_tokens - 1  # no <|eot_id|> after "It is"
    with pytest.raises(openai.BadRequestError, match="cannot both be true"):
        create(client, messages=messages, extra_body={"continue_final_message": True, "add_generation_prompt": True})


def test_best_of_keeps_the_most_likely_choices(client):
    completion = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=6, temperature=1.0,
                                           seed=9, n=2, best_of=5, logprobs=0)
    assert [c.index for c in completion.choices] == [0, 1]
    totals = [sum(c.logprobs.token_logprobs) for c in completion.choices]
    assert totals[0] >= totals[1]
    plain = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=6, temperature=1.0, best_of=3)
    assert len(plain.choices) == 1 and plain.choices[0].logprobs is None
    with pytest.raises(openai.BadRequestError, match="cannot be streamed"):
        client.completions.create(model=MODEL, prompt="x", best_of=2, stream=True)
    with pytest.raises(openai.BadRequestError, match="at least 'n'"):
        client.completions.create(model=MODEL, prompt="x", best_of=1, n=2)


# ---------------------------------------------------------------------- structured outputs
SCHEMA = {"type": "object", "properties": {"answer": {"enum": ["yes", "no"]}, "score": {"type": "integer",
          "minimum": 0, "maximum": 100}, "note": {"type": "string", "maxLength": 10}},
          "required": ["answer", "score", "note"]}


@pytest.mark.parametrize("stream", [False, True])
def test_response_format_json_schema_validates(client, stream):
    response_format = {"type": "json_schema", "json_schema": {"name": "verdict", "schema": SCHEMA, "strict": True}}
    if stream:
        message, finish = streamed_message(client, response_format=response_format, temperature=1.0, seed=5)
        content = message["content"]
    else:
        choice = create(client, response_format=response_format, temperature=1.0, seed=5).choices[0]
        content, finish = choice.message.content, choice.finish_reason
    assert finish == "stop"
    jsonschema.validate(json.loads(content), SCHEMA)


def test_vllm_guided_fields(client):
    content = create(client, extra_body={"guided_json": SCHEMA}).choices[0].message.content
    jsonschema.validate(json.loads(content), SCHEMA)
    assert create(client, extra_body={"guided_choice": ["left", "right"]}).choices[0].message.content in ("left", "right")
    assert re.fullmatch(r"\d{4}-\d{2}", create(client, extra_body={"guided_regex": r"\d{4}-\d{2}"}).choices[0].message.content)
    chosen = create(client, extra_body={"structured_outputs": {"choice": ["up", "down"]}}).choices[0].message.content
    assert chosen in ("up", "down")
    completion = client.completions.create(model=MODEL, prompt="Year:", max_tokens=10, temperature=0,
                                           extra_body={"guided_regex": "[0-9]{4}"})
    assert re.fullmatch("[0-9]{4}", completion.choices[0].text)


def test_invalid_schemas_and_conflicting_constraints_get_400(client):
    with pytest.raises(openai.BadRequestError) as caught:
        create(client, response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nope"}}})
    assert caught.value.body["param"] == "response_format" and "nope" in caught.value.body["message"]
    with pytest.raises(openai.BadRequestError) as caught:
        create(client, extra_body={"guided_regex": "a(b"})
    assert caught.value.body["param"] == "guided_regex"
    with pytest.raises(openai.BadRequestError, match="not both"):
        create(client, extra_body={"guided_regex": "a", "guided_choice": ["b"]})


# ---------------------------------------------------------------------- tools
def test_tool_choice_required_returns_a_valid_call(client):
    choice = create(client, tools=TOOLS, tool_choice="required", temperature=1.0, seed=11).choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.tool_calls
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
    for name, arguments in calls_of(choice.message):
        jsonschema.validate(arguments, schemas[name])
    assert choice.message.tool_calls[0].id.startswith("call_")


def test_named_tool_choice_and_single_call_without_parallel(client):
    named = create(client, tools=TOOLS, tool_choice={"type": "function", "function": {"name": "get_weather"}}).choices[0]
    ((name, arguments),) = calls_of(named.message)
    assert name == "get_weather"
    jsonschema.validate(arguments, WEATHER)
    single = create(client, tools=TOOLS, tool_choice="required", parallel_tool_calls=False, temperature=1.0, seed=2)
    assert len(single.choices[0].message.tool_calls) == 1
    with pytest.raises(openai.BadRequestError, match="not in 'tools'"):
        create(client, tools=TOOLS, tool_choice={"type": "function", "function": {"name": "nope"}})


@pytest.mark.parametrize("tool_choice", ["required", "auto"])
def test_streamed_tool_call_deltas_reassemble_to_the_non_streamed_result(client, tool_choice):
    # auto: the model's own format (Llama 3.1 JSON for the demo model) read back by the llama3_json parser
    extra = {"extra_body": {"guided_regex": LLAMA_CALL_REGEX}} if tool_choice == "auto" else {}
    whole = create(client, tools=TOOLS, tool_choice=tool_choice, seed=4, temperature=1.0, **extra).choices[0]
    message, finish = streamed_message(client, tools=TOOLS, tool_choice=tool_choice, seed=4, temperature=1.0, **extra)
    assert whole.finish_reason == finish == "tool_calls"
    streamed_calls = [(c["name"], json.loads(c["arguments"])) for _, c in sorted(message["tool_calls"].items())]
    assert streamed_calls == calls_of(whole.message) and streamed_calls
    assert (message["content"] or None) == whole.message.content


def test_tool_choice_none_leaves_the_text_alone(client):
    choice = create(client, tools=TOOLS, tool_choice="none", extra_body={"guided_regex": LLAMA_CALL_REGEX}).choices[0]
    assert not choice.message.tool_calls and choice.message.content.startswith('{"name": "get_weather"')


# ---------------------------------------------------------------------- reasoning
@pytest.mark.parametrize("stream", [False, True])
def test_reasoning_content_split_off(client, stream):
    extra = {"extra_body": {"guided_regex": r"<think>[a-z]{2,8} [a-z]{2,8}</think>[a-z]{2,8}"}}
    if stream:
        message, _ = streamed_message(client, **extra)
        reasoning, content = message["reasoning_content"], message["content"]
    else:
        message = create(client, **extra).choices[0].message
        reasoning, content = message.reasoning_content, message.content
    assert re.fullmatch(r"[a-z]{2,8} [a-z]{2,8}", reasoning) and re.fullmatch(r"[a-z]{2,8}", content)


# ---------------------------------------------------------------------- helpers and small endpoints
def _post(client, path: str, body: dict) -> str:
    request = urllib.request.Request(str(client.base_url).replace("/v1/", "") + path, data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return response.read().decode()


def _decode(client, tokens: list[int]) -> str:
    return json.loads(_post(client, "/detokenize", {"tokens": tokens}))["prompt"]


def test_tokenize_takes_vllm_fields(client):
    messages = MESSAGES + [{"role": "assistant", "content": "It is"}]
    opened = json.loads(_post(client, "/tokenize", {"messages": messages, "continue_final_message": True,
                                                     "add_generation_prompt": False, "return_token_strs": True}))
    closed = json.loads(_post(client, "/tokenize", {"messages": messages, "add_generation_prompt": False}))
    assert opened["count"] == closed["count"] - 1 and len(opened["token_strs"]) == opened["count"]
    assert "".join(opened["token_strs"]).endswith("It is")


def test_version(worker):
    with urllib.request.urlopen(worker.url + "/version", timeout=10) as response:
        assert json.loads(response.read())["version"]


# ---------------------------------------------------------------------- LangChain
def test_langchain_bind_tools_required_and_structured_output(worker):
    from langchain_openai import ChatOpenAI
    from pydantic import BaseModel, Field

    class GetWeather(BaseModel):
        """Forecast for a city."""

        city: str = Field(max_length=8)
        days: int = Field(ge=1, le=7)

    class Verdict(BaseModel):
        answer: bool
        score: int = Field(ge=0, le=10)

    llm = ChatOpenAI(base_url=worker.url + "/v1", api_key="unused", model=MODEL, temperature=0, max_tokens=120,
                     max_retries=0)
    message = llm.bind_tools([GetWeather], tool_choice="required").invoke("Weather in Paris?")
    assert message.tool_calls and message.tool_calls[0]["name"] == "GetWeather"
    jsonschema.validate(message.tool_calls[0]["args"], GetWeather.model_json_schema())
    verdict = llm.with_structured_output(Verdict).invoke("Is it good?")
    assert isinstance(verdict, Verdict) and 0 <= verdict.score <= 10
