"""litellm against a real CPU worker and through the router (the fixtures of the openai SDK tests).

litellm is called as a user of an OpenAI-compatible server calls it (`model="openai/<name>"`, `api_base`),
offline: its model cost map is read from the package (LITELLM_LOCAL_MODEL_COST_MAP), and every socket this
process opens to anything but loopback is refused and recorded, so a litellm that tried to reach the
network at import or call time fails `test_litellm_never_left_loopback`.
"""

from __future__ import annotations

import json
import os
import socket

import jsonschema
import pytest

from tests.test_router_drop_in import TOOLS, WEATHER, router_url  # noqa: F401 - router_url is a fixture
from tests.test_server_openai import worker  # noqa: F401 - a fixture: one demo CPU worker

pytestmark = [pytest.mark.timeout(300)]
MODEL = "demo"
LOOPBACK = {"127.0.0.1", "::1", "localhost"}


@pytest.fixture(scope="module")
def network_attempts():
    """Every non-loopback connect or name lookup of this process while the module runs (each refused)."""
    attempts: list = []
    connect, getaddrinfo = socket.socket.connect, socket.getaddrinfo

    def guarded_connect(sock, address):
        if isinstance(address, tuple) and address[0] not in LOOPBACK:
            attempts.append(address)
            raise OSError(f"test_litellm: no network beyond loopback ({address})")
        return connect(sock, address)

    def guarded_getaddrinfo(host, *args, **kwargs):
        if host is not None and host not in LOOPBACK:
            attempts.append(host)
            raise socket.gaierror(f"test_litellm: no name lookups beyond loopback ({host})")
        return getaddrinfo(host, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(socket.socket, "connect", guarded_connect)
        patch.setattr(socket, "getaddrinfo", guarded_getaddrinfo)
        yield attempts


@pytest.fixture(scope="module")
def litellm(network_attempts):
    # read at import: the packaged model cost map instead of downloading the current one
    os.environ["LITELLM_LOCAL_MODEL_COST_MAP"] = "True"
    module = pytest.importorskip("litellm")
    module.telemetry = False
    return module


@pytest.fixture(scope="module", params=["worker", "router"])
def api_base(request):
    """The worker's /v1 directly, then the router's in front of another demo worker."""
    url = request.getfixturevalue("worker").url if request.param == "worker" else request.getfixturevalue("router_url")
    return url + "/v1"


def complete(litellm, api_base: str, **kwargs):
    kwargs.setdefault("messages", [{"role": "user", "content": "Name a river."}])
    return litellm.completion(model=f"openai/{MODEL}", api_base=api_base, api_key="unused", temperature=0,
                              num_retries=0, timeout=120, **kwargs)


def test_plain_and_streamed_completions_agree(litellm, api_base):
    response = complete(litellm, api_base, max_tokens=6)
    choice = response.choices[0]
    assert choice.finish_reason == "length" and choice.message.content
    assert response.usage.completion_tokens == 6 and response.usage.prompt_tokens > 0
    chunks = list(complete(litellm, api_base, max_tokens=6, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == choice.message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["length"]


def test_tool_choice_required_returns_a_call_whose_arguments_validate(litellm, api_base):
    choice = complete(litellm, api_base, messages=[{"role": "user", "content": "Weather in Oslo?"}], tools=TOOLS,
                      tool_choice="required", max_tokens=80).choices[0]
    assert choice.finish_reason == "tool_calls"
    [call] = choice.message.tool_calls
    assert call.function.name == "get_weather"
    jsonschema.validate(json.loads(call.function.arguments), WEATHER)


def test_response_format_json_schema_output_validates(litellm, api_base):
    schema = {"type": "object", "properties": {"river": {"type": "string", "maxLength": 12},
                                               "length_km": {"type": "integer", "minimum": 1}},
              "required": ["river", "length_km"], "additionalProperties": False}
    response_format = {"type": "json_schema", "json_schema": {"name": "river", "schema": schema, "strict": True}}
    choice = complete(litellm, api_base, response_format=response_format, max_tokens=60).choices[0]
    assert choice.finish_reason == "stop"
    jsonschema.validate(json.loads(choice.message.content), schema)


def test_litellm_never_left_loopback(litellm, api_base, network_attempts):
    assert network_attempts == []
