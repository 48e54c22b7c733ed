"""Request parsing of the worker's OpenAI endpoints: what is accepted, and 400s that name the field."""

import pytest

from worker.server.errors import ApiError
from worker.server.protocol import (
    parse_chat_request,
    parse_completion_request,
    parse_detokenize_request,
    parse_tokenize_request,
)

CHAT = {"model": "demo", "messages": [{"role": "user", "content": "hi"}]}


def rejects(parse, body, param):
    with pytest.raises(ApiError) as caught:
        parse(body)
    assert caught.value.status == 400
    assert caught.value.param == param, caught.value.message
    return caught.value


def test_completion_defaults_follow_openai():
    request = parse_completion_request({"model": "demo", "prompt": "Hello"})
    assert request.prompts == ["Hello"]
    assert request.params.max_tokens == 16 and request.params.temperature == 1.0 and request.params.n == 1
    assert not request.stream and request.logprobs is None


def test_completion_prompt_shapes():
    assert parse_completion_request({"prompt": [1, 2, 3]}).prompts == [[1, 2, 3]]
    assert parse_completion_request({"prompt": ["a", "b"]}).prompts == ["a", "b"]
    assert parse_completion_request({"prompt": [[1], [2, 3]]}).prompts == [[1], [2, 3]]
    rejects(parse_completion_request, {"prompt": []}, "prompt")
    rejects(parse_completion_request, {"prompt": 5}, "prompt")
    rejects(parse_completion_request, {"prompt": ["a", 3]}, "prompt[1]")
    rejects(parse_completion_request, {"prompt": [1, -2]}, "prompt")
    rejects(parse_completion_request, {}, "prompt")


def test_sampling_fields_reach_sampling_params():
    body = {
        "prompt": "x", "n": 2, "max_tokens": 7, "temperature": 0.5, "top_p": 0.9, "top_k": 5, "min_p": 0.1,
        "seed": 3, "presence_penalty": 0.5, "frequency_penalty": -0.5, "ignore_eos": True, "min_tokens": 2,
        "stop": "END", "stop_token_ids": [4], "priority": -1, "logprobs": 3,
    }
    params = parse_completion_request(body).params
    assert (params.n, params.max_tokens, params.temperature, params.top_p, params.top_k) == (2, 7, 0.5, 0.9, 5)
    assert (params.min_p, params.seed, params.presence_penalty, params.frequency_penalty) == (0.1, 3, 0.5, -0.5)
    assert params.ignore_eos and params.min_tokens == 2 and params.stop == ["END"] and params.stop_token_ids == [4]
    assert params.priority == -1 and params.logprobs == 3


def test_null_means_default():
    params = parse_chat_request({**CHAT, "temperature": None, "max_tokens": None, "stop": None, "seed": None}).params
    assert params.temperature == 1.0 and params.max_tokens is None and params.stop == [] and params.seed is None


@pytest.mark.parametrize(
    "field, value",
    [
        ("temperature", "hot"), ("temperature", -1), ("temperature", 1e308), ("top_p", 0), ("top_p", 2),
        ("max_tokens", -5), ("max_tokens", 0), ("max_tokens", 1.5), ("max_tokens", "10"), ("n", 0), ("n", 10**6),
        ("n", True), ("seed", 2**80), ("seed", "1"), ("stop", 7), ("stop", [""]), ("stop_token_ids", [-1]),
        ("presence_penalty", 3), ("frequency_penalty", "x"), ("top_k", -3), ("min_p", 2), ("ignore_eos", "yes"),
        ("priority", 0.5), ("stream", "true"), ("logit_bias", {"5": 10}),
    ],
)
def test_chat_rejects_bad_values_naming_the_field(field, value):
    error = rejects(parse_chat_request, {**CHAT, field: value}, field)
    assert field in error.message


def test_chat_token_limits_and_logprobs_use_the_client_names():
    assert parse_chat_request({**CHAT, "max_completion_tokens": 9}).params.max_tokens == 9
    rejects(parse_chat_request, {**CHAT, "max_completion_tokens": -1}, "max_completion_tokens")
    request = parse_chat_request({**CHAT, "logprobs": True, "top_logprobs": 4})
    assert request.logprobs and request.params.logprobs == 4
    assert parse_chat_request({**CHAT, "logprobs": True}).params.logprobs == 0
    assert parse_chat_request(CHAT).params.logprobs is None
    rejects(parse_chat_request, {**CHAT, "logprobs": True, "top_logprobs": 50}, "top_logprobs")
    rejects(parse_chat_request, {**CHAT, "top_logprobs": 2}, "top_logprobs")
    rejects(parse_chat_request, {**CHAT, "logprobs": 3}, "logprobs")


def test_messages_are_checked_and_text_parts_flattened():
    parts = [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]
    request = parse_chat_request({"messages": [{"role": "user", "content": parts}]})
    assert request.messages[0]["content"] == "a\nb"
    rejects(parse_chat_request, {"messages": []}, "messages")
    rejects(parse_chat_request, {"messages": "hi"}, "messages")
    rejects(parse_chat_request, {"messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role")
    rejects(parse_chat_request, {"messages": [{"role": "user", "content": 5}]}, "messages[0].content")
    rejects(parse_chat_request, {"messages": [{"role": "user"}]}, "messages[0].content")
    image = [{"type": "image_url", "image_url": {"url": "http://x"}}]
    rejects(parse_chat_request, {"messages": [{"role": "user", "content": image}]}, "messages[0].content[0]")


def test_chat_template_kwargs():
    assert parse_chat_request({**CHAT, "chat_template_kwargs": {"enable_thinking": False}}).chat_template_kwargs == {
        "enable_thinking": False}
    rejects(parse_chat_request, {**CHAT, "chat_template_kwargs": "x"}, "chat_template_kwargs")


def test_unknown_fields_rejected_but_harmless_openai_fields_accepted():
    rejects(parse_chat_request, {**CHAT, "max_token": 5}, "max_token")
    parse_chat_request({**CHAT, "user": "u1", "metadata": {"a": "b"}, "store": False, "parallel_tool_calls": True})


def test_stream_options():
    assert parse_chat_request({**CHAT, "stream": True, "stream_options": {"include_usage": True}}).include_usage
    rejects(parse_chat_request, {**CHAT, "stream_options": {"include_usage": True}}, "stream_options")
    rejects(parse_chat_request, {**CHAT, "stream": True, "stream_options": {"include_usage": "y"}},
            "stream_options.include_usage")


def test_body_must_be_an_object():
    rejects(parse_chat_request, [1, 2], None)
    rejects(parse_completion_request, "prompt", None)


def test_tokenize_and_detokenize_bodies():
    assert parse_tokenize_request({"prompt": "hi"}).add_special_tokens is True
    assert parse_tokenize_request({"messages": CHAT["messages"]}).add_special_tokens is False
    rejects(parse_tokenize_request, {}, "prompt")
    assert parse_detokenize_request({"tokens": [1, 2]}).tokens == [1, 2]
    rejects(parse_detokenize_request, {"tokens": [1, "a"]}, "tokens")
