"""The worker through the official `openai` SDK: one real CPU worker (demo model) for the whole module.

The worker runs as a subprocess (`python -m worker.cli worker ...`), engine process included, so these
tests cover the HTTP frontend, the IPC and the engine together as a user meets them.
"""

import asyncio
import json
import time
import urllib.error
import urllib.request

import aiohttp
import openai
import pytest

from worker.server.launcher import WorkerProcess

MODEL = "demo"
LONG_TEXT = " ".join(f"The river number {i} runs past the old mill and into the sea." for i in range(12))


@pytest.fixture(scope="module")
def worker():
    with WorkerProcess(["--model", MODEL, "--device", "cpu", "--kv-cache-tokens", "16384", "--no-progress"],
                       env={"OMP_NUM_THREADS": "1"}) as process:
        yield process


@pytest.fixture(scope="module")
def client(worker):
    return openai.OpenAI(base_url=worker.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def get_json(url: str):
    with urllib.request.urlopen(url, timeout=30) as response:
        return json.loads(response.read())


def post(url: str, body: bytes | dict) -> tuple[int, dict]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def wait_until_idle(worker, timeout_s: float = 60.0) -> dict:
    """Poll /load until the engine has nothing running or waiting (the test fails if it never does)."""
    deadline = time.monotonic() + timeout_s
    load = get_json(worker.url + "/load")
    while load["running"] or load["waiting"]:
        assert time.monotonic() < deadline, f"the engine never became idle: {load}"
        time.sleep(0.05)
        load = get_json(worker.url + "/load")
    return load


def chat(content: str):
    return [{"role": "user", "content": content}]


# ---------------------------------------------------------------------- basics
def test_models_and_health(worker, client):
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert worker.health_status() == 200


def test_chat_completion(client):
    response = client.chat.completions.create(model=MODEL, messages=chat("Hello there"), max_tokens=6,
                                              temperature=0, extra_body={"ignore_eos": True})
    choice = response.choices[0]
    assert choice.message.role == "assistant" and choice.message.content
    assert choice.finish_reason == "length"
    assert response.usage.completion_tokens == 6


def test_chat_stream_matches_non_stream(client):
    kwargs = dict(model=MODEL, messages=chat("Tell me about rivers"), max_tokens=8, temperature=0,
                  extra_body={"ignore_eos": True})
    full = client.chat.completions.create(**kwargs).choices[0].message.content
    chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 8
    assert all(c.usage is None for c in chunks[:-1])


def test_completion_stream_matches_non_stream(client):
    kwargs = dict(model=MODEL, prompt="Once upon a time", max_tokens=8, temperature=0, extra_body={"ignore_eos": True})
    full = client.completions.create(**kwargs)
    assert full.choices[0].finish_reason == "length" and full.usage.completion_tokens == 8
    chunks = list(client.completions.create(stream=True, **kwargs))
    assert "".join(c.choices[0].text for c in chunks) == full.choices[0].text


def test_n_choices(client):
    response = client.completions.create(model=MODEL, prompt="The old mill", max_tokens=5, n=2, temperature=1.0,
                                         seed=7, extra_body={"ignore_eos": True})
    assert sorted(c.index for c in response.choices) == [0, 1]
    assert response.usage.completion_tokens == 10
    stream = client.chat.completions.create(model=MODEL, messages=chat("Two answers"), max_tokens=4, n=2, stream=True,
                                            extra_body={"ignore_eos": True})
    finished = {c.choices[0].index: c.choices[0].finish_reason for c in stream if c.choices[0].finish_reason}
    assert finished == {0: "length", 1: "length"}


def test_batch_of_prompts(client):
    response = client.completions.create(model=MODEL, prompt=["first prompt", "second prompt"], max_tokens=3, n=2,
                                         temperature=0, extra_body={"ignore_eos": True})
    assert sorted(c.index for c in response.choices) == [0, 1, 2, 3]
    by_index = {c.index: c.text for c in response.choices}
    assert by_index[0] == by_index[1] and by_index[2] == by_index[3]  # greedy: each prompt's choices agree


# ---------------------------------------------------------------------- sampling controls
def test_echo_and_every_sampling_extension_are_accepted(client):
    response = client.completions.create(
        model=MODEL, prompt="Echo me", max_tokens=3, echo=True, top_p=0.9, presence_penalty=0.5,
        frequency_penalty=0.5, seed=3,
        extra_body={"ignore_eos": True, "top_k": 5, "min_p": 0.05, "min_tokens": 2, "repetition_penalty": 1.1,
                    "priority": 1, "stop_token_ids": [0], "skip_special_tokens": False},
    )
    assert response.choices[0].text.startswith("Echo me")
    assert response.usage.completion_tokens == 3


def test_stop_string_ends_the_choice(client):
    kwargs = dict(model=MODEL, prompt="The river runs", max_tokens=24, temperature=0, extra_body={"ignore_eos": True})
    text = client.completions.create(**kwargs).choices[0].text
    assert len(text) > 12
    stop = text[8:11]
    stopped = client.completions.create(stop=[stop], **kwargs).choices[0]
    assert stopped.finish_reason == "stop" and stopped.text == text[: text.index(stop)]
    streamed = list(client.completions.create(stop=stop, stream=True, **kwargs))
    assert "".join(c.choices[0].text for c in streamed) == stopped.text
    assert streamed[-1].choices[0].finish_reason == "stop"


def test_stop_string_per_choice_frees_kv(worker, client):
    # Without the per-choice abort the engine would go on to 4000 tokens (a minute on CPU) after the answer.
    kwargs = dict(model=MODEL, prompt="The mill turns", max_tokens=4000, temperature=0, extra_body={"ignore_eos": True})
    text = client.completions.create(**{**kwargs, "max_tokens": 16}).choices[0].text
    stop = text[6:9]
    response = client.completions.create(stop=[stop], n=2, **kwargs)  # greedy: both choices stop early
    assert [(c.finish_reason, c.text) for c in response.choices] == [("stop", text[: text.index(stop)])] * 2
    assert wait_until_idle(worker, timeout_s=30)["kv_tokens_used"] == 0


def test_seed_reproducibility(client):
    def sample(seed):
        return client.completions.create(model=MODEL, prompt="A story:", max_tokens=12, temperature=1.0, seed=seed,
                                         extra_body={"ignore_eos": True}).choices[0].text

    first = sample(1234)
    assert sample(1234) == first
    assert sample(4321) != first


def test_chat_logprobs(client):
    response = client.chat.completions.create(model=MODEL, messages=chat("Count"), max_tokens=5, temperature=0,
                                              logprobs=True, top_logprobs=3, extra_body={"ignore_eos": True})
    content = response.choices[0].logprobs.content
    assert len(content) == 5
    for entry in content:
        assert entry.logprob <= 0 and len(entry.top_logprobs) == 3
        assert entry.top_logprobs[0].logprob == pytest.approx(entry.logprob)  # greedy picks the top token
        assert entry.top_logprobs[0].logprob >= entry.top_logprobs[1].logprob >= entry.top_logprobs[2].logprob
        assert bytes(entry.bytes).decode("utf-8", "replace") == entry.token


def test_completion_logprobs(client):
    response = client.completions.create(model=MODEL, prompt="Count", max_tokens=4, temperature=0, logprobs=2,
                                         extra_body={"ignore_eos": True})
    logprobs = response.choices[0].logprobs
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == len(logprobs.top_logprobs) == 4
    assert all(len(top) <= 2 for top in logprobs.top_logprobs)
    assert logprobs.text_offset[0] == 0


def test_usage_counts_are_exact(worker, client):
    messages = chat("How many tokens is this?")
    counted = post(worker.url + "/tokenize", {"model": MODEL, "messages": messages})[1]["count"]
    with_kwargs = post(worker.url + "/tokenize", {"messages": messages, "chat_template_kwargs": {"unused_flag": True}})
    assert with_kwargs == (200, with_kwargs[1]) and with_kwargs[1]["count"] == counted
    response = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=3,
                                              extra_body={"ignore_eos": True})
    assert (response.usage.prompt_tokens, response.usage.completion_tokens) == (counted, 3)
    assert response.usage.total_tokens == counted + 3
    prompt = "Counting the prompt of a completion"
    status, tokenized = post(worker.url + "/tokenize", {"prompt": prompt})
    assert status == 200
    response = client.completions.create(model=MODEL, prompt=prompt, max_tokens=2, extra_body={"ignore_eos": True})
    assert response.usage.prompt_tokens == tokenized["count"]
    assert post(worker.url + "/detokenize", {"tokens": tokenized["tokens"]})[1]["prompt"].endswith(prompt)


def test_cached_tokens_on_a_shared_prefix(client):
    first = client.completions.create(model=MODEL, prompt=LONG_TEXT + " First question?", max_tokens=2)
    second = client.completions.create(model=MODEL, prompt=LONG_TEXT + " Another question!", max_tokens=2)
    assert first.usage.prompt_tokens > 100
    assert second.usage.prompt_tokens_details.cached_tokens > 64
    assert second.usage.prompt_tokens_details.cached_tokens < second.usage.prompt_tokens


# ---------------------------------------------------------------------- disconnects, load, metrics
def test_client_disconnect_frees_kv(worker):
    async def read_a_little_then_leave():
        body = {"model": MODEL, "prompt": LONG_TEXT, "max_tokens": 400, "stream": True, "ignore_eos": True}
        async with aiohttp.ClientSession() as session:
            async with session.post(worker.url + "/v1/completions", json=body) as response:
                assert response.status == 200
                received = 0
                async for line in response.content:
                    received += line.startswith(b"data: ")
                    if received >= 3:
                        break  # leaving the block closes the connection mid-stream
        return get_json(worker.url + "/load")

    aborted_before = aborted_requests(worker)
    during = asyncio.run(read_a_little_then_leave())
    load = wait_until_idle(worker)
    assert aborted_requests(worker) == aborted_before + 1
    assert load["kv_tokens_used"] == 0, load
    assert load["kv_tokens_total"] > 0
    assert during["kv_tokens_total"] == load["kv_tokens_total"]


def test_non_streaming_client_that_leaves_frees_kv(worker):
    async def leave_while_running():
        body = {"model": MODEL, "prompt": LONG_TEXT, "max_tokens": 400, "ignore_eos": True}
        async with aiohttp.ClientSession() as session:
            request = asyncio.ensure_future(session.post(worker.url + "/v1/completions", json=body))
            while get_json(worker.url + "/load")["running"] == 0:
                assert not request.done(), "the request finished before the client could leave"
                await asyncio.sleep(0.02)
            request.cancel()  # closes the connection while the request is generating

    aborted_before = aborted_requests(worker)
    asyncio.run(leave_while_running())
    assert wait_until_idle(worker)["kv_tokens_used"] == 0
    assert aborted_requests(worker) == aborted_before + 1  # aborted when the client left, not run to the end


def aborted_requests(worker) -> float:
    with urllib.request.urlopen(worker.url + "/metrics", timeout=10) as response:
        for line in response.read().decode().splitlines():
            if line.startswith("radixfleet:request_success_total{") and 'finished_reason="abort"' in line:
                return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_load_and_metrics(worker):
    load = get_json(worker.url + "/load")
    assert set(load) == {"running", "waiting", "kv_tokens_used", "kv_tokens_total", "cache_hit_tokens",
                         "cache_query_tokens", "num_preemptions"}
    assert load["cache_query_tokens"] >= load["cache_hit_tokens"] > 0
    with urllib.request.urlopen(worker.url + "/metrics", timeout=10) as response:
        text = response.read().decode()
    for name in ("num_requests_running", "num_requests_waiting", "kv_cache_usage_perc", "prefix_cache_queries_total",
                 "prefix_cache_hits_total", "num_preemptions_total", "time_to_first_token_seconds_bucket",
                 "inter_token_latency_seconds_bucket", "e2e_request_latency_seconds_count"):
        assert f"radixfleet:{name}" in text, name


# ---------------------------------------------------------------------- invalid input
@pytest.mark.parametrize(
    "path, body, status, param",
    [
        ("/v1/chat/completions", b"{not json", 400, None),
        ("/v1/chat/completions", {"model": MODEL, "messages": "hi"}, 400, "messages"),
        ("/v1/chat/completions", {"model": MODEL, "messages": chat("x"), "temperature": "hot"}, 400, "temperature"),
        ("/v1/chat/completions", {"model": MODEL, "messages": chat("x"), "max_tokens": -1}, 400, "max_tokens"),
        ("/v1/chat/completions", {"model": MODEL, "messages": chat("x"), "max_tokens": 10**12}, 400, "max_tokens"),
        ("/v1/chat/completions", {"model": MODEL, "messages": chat("x"), "n": 10**6}, 400, "n"),
        ("/v1/chat/completions", {"model": MODEL, "messages": chat("x"), "logit_bias": {"x": 1}}, 400, "logit_bias"),
        ("/v1/chat/completions", {"model": "no-such-model", "messages": chat("x")}, 404, "model"),
        ("/v1/completions", {"model": MODEL, "prompt": "x", "logprobs": 99}, 400, "logprobs"),
        ("/v1/completions", {"model": MODEL, "prompt": [10**9]}, 400, "prompt"),
        ("/v1/completions", {"model": MODEL, "prompt": "word " * 50000}, 400, "prompt"),
        ("/v1/completions", [1, 2, 3], 400, None),
        ("/v1/nothing-here", {}, 404, None),
    ],
)
def test_invalid_requests_get_openai_errors(worker, path, body, status, param):
    got_status, error = post(worker.url + path, body)
    assert got_status == status, error
    assert set(error["error"]) == {"message", "type", "param", "code"} and error["error"]["message"]
    assert error["error"]["param"] == param


def test_sdk_raises_its_usual_errors_and_worker_keeps_serving(client):
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=MODEL, messages=chat("x"), temperature=5)
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gpt-5", prompt="x")
    assert client.completions.create(model=MODEL, prompt="still alive", max_tokens=2).choices[0].text is not None


# ---------------------------------------------------------------------- concurrency
def test_64_concurrent_streams_all_finish_correctly(worker, client):
    prompts = [f"Where does river {i % 8} go?" for i in range(64)]
    expected = {
        p: client.completions.create(model=MODEL, prompt=p, max_tokens=6, temperature=0,
                                     extra_body={"ignore_eos": True}).choices[0].text
        for p in sorted(set(prompts))
    }

    async def one(aclient, prompt):
        stream = await aclient.completions.create(model=MODEL, prompt=prompt, max_tokens=6, temperature=0, stream=True,
                                                  stream_options={"include_usage": True},
                                                  extra_body={"ignore_eos": True})
        text, usage, finish = "", None, None
        async for chunk in stream:
            if chunk.choices:
                text += chunk.choices[0].text
                finish = chunk.choices[0].finish_reason or finish
            if chunk.usage:
                usage = chunk.usage
        return prompt, text, finish, usage

    async def run_all():
        aclient = openai.AsyncOpenAI(base_url=worker.url + "/v1", api_key="unused", max_retries=0, timeout=300)
        try:
            return await asyncio.gather(*(one(aclient, p) for p in prompts))
        finally:
            await aclient.close()

    results = asyncio.run(run_all())
    assert len(results) == 64
    for prompt, text, finish, usage in results:
        assert finish == "length" and usage.completion_tokens == 6
        if prompt in expected:
            assert text == expected[prompt], prompt
    wait_until_idle(worker)
