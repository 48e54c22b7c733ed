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
        ("priority", 0.5), ("stream", "true"), ("logit_bias", {"x": 10}), ("logit_bias", {"5": 1000}),
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


def test_unknown_fields_ignored_or_rejected_when_strict_and_harmless_openai_fields_accepted():
    assert parse_chat_request({**CHAT, "max_token": 5}).extras.ignored_fields == ["max_token"]
    rejects(lambda body: parse_chat_request(body, strict=True), {**CHAT, "max_token": 5}, "max_token")
    accepted = {**CHAT, "user": "u1", "metadata": {"a": "b"}, "store": False, "parallel_tool_calls": True}
    assert parse_chat_request(accepted, strict=True).extras.ignored_fields == []


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


# ---------------------------------------------------------------------- bounded input (worker.server.limits)
from worker.server.limits import (  # noqa: E402 - grouped with the tests that use them
    MAX_BODY_BYTES,
    MAX_JSON_DEPTH,
    MAX_TOKEN_ID,
    InputRejected,
    decode_json_body,
    header_value_ok,
    json_depth_exceeds,
)


def decode_rejects(raw: bytes, status: int = 400) -> str:
    with pytest.raises(InputRejected) as caught:
        decode_json_body(raw)
    assert caught.value.status == status
    return caught.value.message


def test_body_nested_past_the_depth_limit_is_refused_before_parsing():
    assert "deeper than" in decode_rejects(b"[" * 990 + b"]" * 990)
    assert "deeper than" in decode_rejects(b'{"a":' * 200 + b"1" + b"}" * 200)
    assert decode_json_body(b"[" * MAX_JSON_DEPTH + b"]" * MAX_JSON_DEPTH) is not None
    # Brackets inside strings are text, not nesting (a prompt about code may hold thousands).
    assert decode_json_body(b'{"prompt": "' + b"[{" * 5000 + b'"}')["prompt"].startswith("[{[{")
    assert json_depth_exceeds(b'["\\"[[[[[[[[[[["' + b"]" * 3, max_depth=2) is False


def test_huge_integers_nan_and_bad_unicode_are_400s():
    assert "digits" in decode_rejects(b'{"max_tokens": ' + b"9" * 5000 + b"}")
    assert "digits" in decode_rejects(b'{"seed": -' + b"1" * 30 + b"}")
    assert decode_json_body(b'{"seed": -9223372036854775808}')["seed"] == -(2**63)
    assert "finite" in decode_rejects(b'{"temperature": NaN}')
    assert "finite" in decode_rejects(b'{"temperature": -Infinity}')
    assert "UTF-8" in decode_rejects(b'{"prompt": "\xff\xfe"}')
    assert "surrogate" in decode_rejects(b'{"prompt": "a\\ud800b"}')
    assert "surrogate" in decode_rejects(b'{"messages": [{"role": "user", "content": "\\udfff"}]}')
    assert "surrogate" in decode_rejects(b'{"\\ud800": 1}')
    assert decode_json_body(b'{"prompt": "\\ud83d\\ude00"}')["prompt"] == "\U0001F600"  # a valid pair
    assert "not valid JSON" in decode_rejects(b'{"prompt": "unterminated')
    assert "empty" in decode_rejects(b"  ")


def test_body_over_the_shared_limit_is_413():
    assert "limit" in decode_rejects(b" " * (MAX_BODY_BYTES + 1), status=413)


def test_header_value_check():
    assert header_value_ok("req-123\tabc") and header_value_ok("caf\u00e9")
    assert not header_value_ok("caf\u00e9\u2603") and not header_value_ok("a\rb") and not header_value_ok("a\x7f")


def test_numeric_fields_have_upper_bounds():
    rejects(parse_completion_request, {"prompt": "x", "max_tokens": 2**40}, "max_tokens")
    rejects(parse_chat_request, {**CHAT, "max_completion_tokens": 2**40}, "max_completion_tokens")
    rejects(parse_completion_request, {"prompt": "x", "top_k": 2**40}, "top_k")
    rejects(parse_completion_request, {"prompt": "x", "min_tokens": 2**40}, "min_tokens")
    rejects(parse_completion_request, {"prompt": "x", "priority": 2**40}, "priority")
    rejects(parse_completion_request, {"prompt": "x", "seed": 2**63}, "seed")
    rejects(parse_completion_request, {"prompt": "x", "logprobs": 2**40}, "logprobs")
    rejects(parse_chat_request, {**CHAT, "logprobs": True, "top_logprobs": 21}, "top_logprobs")
    rejects(parse_completion_request, {"prompt": [1, MAX_TOKEN_ID + 1]}, "prompt")
    rejects(parse_completion_request, {"prompt": "x", "stop": "s" * 1025}, "stop")
    rejects(parse_completion_request, {"prompt": "x", "stop": ["ok", "s" * 1025]}, "stop")
    rejects(parse_completion_request, {"prompt": "x", "stop_token_ids": list(range(1025))}, "stop_token_ids")
    rejects(parse_completion_request, {"prompt": "x", "stop_token_ids": [2**40]}, "stop_token_ids")
    rejects(parse_completion_request, {"prompt": ["a"] * 3, "n": 100}, "n")
    for name in ("temperature", "top_p", "presence_penalty", "frequency_penalty", "repetition_penalty"):
        rejects(parse_completion_request, {"prompt": "x", name: 1e300}, name)
    assert parse_completion_request({"prompt": "x", "stop": "s" * 1024, "top_k": MAX_TOKEN_ID}).params.top_k == MAX_TOKEN_ID
