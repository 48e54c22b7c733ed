"""The drop-in features through the router: a real CPU demo worker behind `radixfleet router`, the openai SDK
in front. The router forwards what the worker serves (/tokenize, /detokenize, /version) and does not refuse
fields the worker accepts."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jsonschema
import openai
import pytest

from tests.test_router_real_workers import _free_port, _wait_healthy
from tests.test_server_openai import get_json, post
from worker.server.launcher import WorkerProcess

ROOT = Path(__file__).parent.parent
pytestmark = [pytest.mark.timeout(240)]
MODEL = "demo"
WEATHER = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 8},
                                            "days": {"type": "integer", "minimum": 1, "maximum": 7}},
           "required": ["city", "days"]}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": WEATHER}}]


@pytest.fixture(scope="module")
def router_url(tmp_path_factory):
    log = (tmp_path_factory.mktemp("logs") / "router.log").open("wb")
    with WorkerProcess(["--model", MODEL, "--device", "cpu", "--kv-cache-tokens", "8192", "--no-progress"],
                       env={"OMP_NUM_THREADS": "1"}) as worker:
        port = _free_port()
        router = subprocess.Popen([sys.executable, "-m", "worker.cli", "router", "--worker-urls", worker.url,
                                   "--port", str(port), "--host", "127.0.0.1"], cwd=ROOT,
                                  env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=log, stderr=subprocess.STDOUT)
        try:
            _wait_healthy(f"http://127.0.0.1:{port}/health", router, 30)
            yield f"http://127.0.0.1:{port}"
        finally:
            router.terminate()
            router.wait(20)


@pytest.fixture(scope="module")
def client(router_url):
    return openai.OpenAI(base_url=router_url + "/v1", api_key="unused", max_retries=0, timeout=120)


def test_tokenize_detokenize_and_version_are_forwarded(router_url):
    status, tokens = post(router_url + "/tokenize", {"model": MODEL, "prompt": "hello world"})
    assert status == 200 and tokens["count"] == len(tokens["tokens"]) > 0
    status, text = post(router_url + "/detokenize", {"model": MODEL, "tokens": tokens["tokens"]})
    assert status == 200 and text["prompt"].endswith("hello world")
    assert get_json(router_url + "/version")["version"]
    status, error = post(router_url + "/tokenize", {"model": MODEL})
    assert status == 400 and error["error"]["param"] == "prompt"  # the worker's own answer, passed through


def test_tool_choice_required_through_the_router(client):
    choice = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "weather?"}],
                                            tools=TOOLS, tool_choice="required", max_tokens=80, temperature=0).choices[0]
    assert choice.finish_reason == "tool_calls"
    jsonschema.validate(json.loads(choice.message.tool_calls[0].function.arguments), WEATHER)


def test_structured_output_and_vllm_fields_through_the_router(client):
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}
    chunks = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "ok?"}], max_tokens=20, temperature=0, stream=True,
        response_format={"type": "json_schema", "json_schema": {"name": "s", "schema": schema}},
        extra_body={"guided_decoding_backend": "xgrammar", "cache_salt": "abc"})
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    jsonschema.validate(json.loads(content), schema)
    completion = client.completions.create(model=MODEL, prompt="Pick:", max_tokens=5, temperature=0,
                                           extra_body={"guided_choice": ["alpha", "beta"], "stream": None})
    assert completion.choices[0].text in ("alpha", "beta")


def test_ignored_fields_are_accepted_through_the_router(client):
    raw = client.chat.completions.with_raw_response.create(
        model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=3,
        extra_body={"bootstrap_host": "10.0.0.1", "bootstrap_room": 1, "stream": None})
    assert raw.parse().choices[0].message.content is not None
    # (the router does not pass the worker's X-Ignored-Fields header on yet: router/proxy.py picks the headers)
