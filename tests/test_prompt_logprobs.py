"""Prompt logprobs (vLLM's `prompt_logprobs`) and completions' `echo` with `logprobs`, against transformers.

Each prompt position's logprob must be log_softmax of transformers' logits at the position before it,
for the engine however it schedules the prompt (chunks, overlap, a cached copy of the prompt, a
preemption in the middle), and through a real CPU worker with the openai SDK, streamed and not. A
request that does not ask is answered as before.
"""

from __future__ import annotations

import random

import openai
import pytest
import torch

from tests.test_server_openai import post
from worker.config import EngineConfig
from worker.engine.llm_engine import LLMEngine
from worker.engine.protocol import EngineRequest
from worker.models.checkpoint_writer import write_checkpoint
from worker.sampling_params import InvalidParameter, SamplingParams
from worker.server.launcher import WorkerProcess

transformers = pytest.importorskip("transformers")
pytestmark = [pytest.mark.timeout(300)]
TOLERANCE = 1e-4  # float32 on both sides; the CPU executor matches transformers to rounding


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-qwen3") / "ckpt"
    write_checkpoint("tiny-qwen3", folder, seed=1, progress=False)
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager")
    return folder, hf.eval()


def hf_log_softmax(hf, token_ids: list[int]) -> torch.Tensor:
    with torch.inference_mode():
        return torch.log_softmax(hf(input_ids=torch.tensor([token_ids])).logits[0].float(), dim=-1)


def random_prompt(length: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(5, 500) for _ in range(length)]


def assert_matches_transformers(hf, prompt: list[int], entries, top_k: int) -> None:
    """entries[i] (i >= 1) is prompt[i]'s logprob, rank and top k from the logits of position i - 1."""
    assert len(entries) == len(prompt) and entries[0] is None
    expected = hf_log_softmax(hf, prompt)
    for i in range(1, len(prompt)):
        row, entry = expected[i - 1], entries[i]
        assert entry.token_id == prompt[i]
        assert abs(entry.logprob - row[prompt[i]].item()) < TOLERANCE, i
        assert entry.rank == int((row > row[prompt[i]]).sum()) + 1
        values, ids = row.topk(top_k)
        assert [t for t, _ in entry.top] == ids.tolist()
        assert all(abs(v - e) < TOLERANCE for (_, v), e in zip(entry.top, values.tolist()))


def make_engine(folder, **overrides) -> LLMEngine:
    options = dict(model=str(folder), device="cpu", page_size=4, kv_cache_tokens=8192, progress=False)
    options.update(overrides)
    return LLMEngine(EngineConfig(**options))


def run(engine: LLMEngine, requests: list[EngineRequest], on_step=None) -> dict:
    """Run to the end; per request id: its outputs (new tokens per choice, prompt logprobs, cached tokens)."""
    results = {r.request_id: {"tokens": {}, "prompt_logprobs": [], "cached": 0} for r in requests}
    for request in requests:
        engine.add_request(request)
    steps = 0
    while engine.has_unfinished():
        for out in engine.step():
            result = results[out.request_id]
            result["tokens"].setdefault(out.index, []).extend(out.new_token_ids)
            result["cached"] = out.num_cached_tokens
            if out.prompt_logprobs is not None:
                result["prompt_logprobs"].append((out.index, out.prompt_logprobs))
        engine.check_invariants()
        steps += 1
        if on_step is not None:
            on_step(engine, steps)
    assert engine.stats().kv_tokens_used == 0
    return results


def greedy(max_tokens: int = 4, n: int = 1) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True, n=n)


# --------------------------------------------------------------------------- the engine
@pytest.mark.parametrize("overlap", ["off", "on"])
@pytest.mark.parametrize("budget", [2048, 16])  # the whole prompt in one step, or in chunks of 16 tokens
def test_engine_prompt_logprobs_equal_transformers(checkpoint, overlap, budget):
    folder, hf = checkpoint
    prompt = random_prompt(41, seed=3)
    engine = make_engine(folder, overlap_schedule=overlap, max_num_batched_tokens=budget)
    result = run(engine, [EngineRequest("a", prompt, greedy(), prompt_logprobs=3)])["a"]
    [(index, entries)] = result["prompt_logprobs"]  # once, on choice 0's first tokens
    assert index == 0
    assert_matches_transformers(hf, prompt, entries, 3)


def test_a_cached_prompt_is_computed_again_and_other_requests_still_hit_the_cache(checkpoint):
    folder, hf = checkpoint
    prompt = random_prompt(33, seed=5)
    engine = make_engine(folder)
    warm = run(engine, [EngineRequest("warm", prompt, greedy())])["warm"]
    asked = run(engine, [EngineRequest("asked", prompt, greedy(), prompt_logprobs=1)])["asked"]
    plain = run(engine, [EngineRequest("plain", prompt, greedy())])["plain"]
    assert asked["cached"] == 0  # the cached copy has K/V but no logits
    assert_matches_transformers(hf, prompt, asked["prompt_logprobs"][0][1], 1)
    assert plain["cached"] > 0 and plain["prompt_logprobs"] == []
    assert warm["tokens"] == asked["tokens"] == plain["tokens"]


def test_a_prompt_longer_than_one_logits_chunk(checkpoint):
    from worker.engine.sequence import PROMPT_LOGITS_PER_STEP

    folder, hf = checkpoint
    prompt = random_prompt(PROMPT_LOGITS_PER_STEP + 90, seed=8)
    result = run(make_engine(folder), [EngineRequest("long", prompt, greedy(2), prompt_logprobs=0)])["long"]
    assert_matches_transformers(hf, prompt, result["prompt_logprobs"][0][1], 0)


def test_preemption_in_the_middle_of_the_prompt_keeps_every_position_once(checkpoint):
    folder, hf = checkpoint
    prompt = random_prompt(50, seed=11)

    def preempt_once(engine, steps):
        running = [s for s in engine.scheduler.running if s.prompt_logprobs is not None]
        if steps == 2 and running:
            assert 0 < len(running[0].prompt_logprob_entries) < len(prompt) - 1
            engine.scheduler.preempt(running[0])

    engine = make_engine(folder, max_num_batched_tokens=16)
    result = run(engine, [EngineRequest("p", prompt, greedy(), prompt_logprobs=2)], on_step=preempt_once)["p"]
    assert engine.stats().num_preemptions == 1
    assert_matches_transformers(hf, prompt, result["prompt_logprobs"][0][1], 2)


def test_n_choices_get_the_prompt_logprobs_once_and_a_plain_request_beside_them_is_unchanged(checkpoint):
    folder, hf = checkpoint
    prompt, other = random_prompt(20, seed=13), random_prompt(25, seed=14)
    alone = run(make_engine(folder), [EngineRequest("plain", other, greedy())])["plain"]
    results = run(make_engine(folder), [EngineRequest("two", prompt, greedy(n=2), prompt_logprobs=1),
                                        EngineRequest("plain", other, greedy())])
    [(index, entries)] = results["two"]["prompt_logprobs"]
    assert index == 0 and set(results["two"]["tokens"]) == {0, 1}
    assert_matches_transformers(hf, prompt, entries, 1)
    assert results["plain"]["tokens"] == alone["tokens"] and results["plain"]["prompt_logprobs"] == []


def test_a_one_token_prompt_has_only_the_leading_none(checkpoint):
    result = run(make_engine(checkpoint[0]), [EngineRequest("one", [42], greedy(), prompt_logprobs=2)])["one"]
    assert result["prompt_logprobs"] == [(0, [None])]


@pytest.mark.parametrize("value", [-1, 21, 2.5, True])
def test_engine_refuses_a_bad_prompt_logprobs(checkpoint, value):
    engine = make_engine(checkpoint[0])
    with pytest.raises(InvalidParameter) as error:
        engine.add_request(EngineRequest("bad", [1, 2, 3], greedy(), prompt_logprobs=value))
    assert error.value.param == "prompt_logprobs"


def test_the_sim_executor_refuses_prompt_logprobs():
    engine = LLMEngine(EngineConfig(model="demo", executor="sim", sim_profile="h200-qwen3-0.6b", progress=False))
    with pytest.raises(InvalidParameter, match="no prompt logprobs") as error:
        engine.add_request(EngineRequest("sim", [1, 2, 3], greedy(), prompt_logprobs=1))
    assert error.value.param == "prompt_logprobs"
    engine.add_request(EngineRequest("plain", [1, 2, 3], greedy()))  # without them it runs as before


# --------------------------------------------------------------------------- a worker, with the openai SDK
@pytest.fixture(scope="module")
def worker(checkpoint):
    args = ["--model", str(checkpoint[0]), "--device", "cpu", "--kv-cache-tokens", "8192", "--no-progress"]
    with WorkerProcess(args, env={"OMP_NUM_THREADS": "1"}) as process:
        yield process


@pytest.fixture(scope="module")
def client(worker):
    return openai.OpenAI(base_url=worker.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def model_name(client) -> str:
    return client.models.list().data[0].id


def assert_vllm_prompt_logprobs(hf, prompt: list[int], positions: list, top_k: int) -> None:
    """vLLM's shape: None, then {token_id: {logprob, rank, decoded_token}} with the prompt token and the top k."""
    assert len(positions) == len(prompt) and positions[0] is None
    expected = hf_log_softmax(hf, prompt)
    for i in range(1, len(prompt)):
        position, row = positions[i], expected[i - 1]
        ids = row.topk(top_k).indices.tolist()
        assert set(position) == {str(prompt[i])} | {str(t) for t in ids}
        own = position[str(prompt[i])]
        assert abs(own["logprob"] - row[prompt[i]].item()) < TOLERANCE
        assert own["rank"] == int((row > row[prompt[i]]).sum()) + 1 and isinstance(own["decoded_token"], str)
        for rank, token_id in enumerate(ids, start=1):
            if token_id != prompt[i]:
                assert position[str(token_id)]["rank"] == rank
                assert abs(position[str(token_id)]["logprob"] - row[token_id].item()) < TOLERANCE


def test_completions_prompt_logprobs_through_the_sdk(client, checkpoint):
    hf = checkpoint[1]
    prompt = random_prompt(18, seed=21)
    model = model_name(client)
    choice = client.completions.create(model=model, prompt=prompt, max_tokens=3, temperature=0,
                                       extra_body={"prompt_logprobs": 2}).choices[0]
    assert_vllm_prompt_logprobs(hf, prompt, choice.prompt_logprobs, 2)
    chunks = list(client.completions.create(model=model, prompt=prompt, max_tokens=3, temperature=0, stream=True,
                                            extra_body={"prompt_logprobs": 2}))
    streamed = [c.choices[0].prompt_logprobs for c in chunks if getattr(c.choices[0], "prompt_logprobs", None)]
    assert streamed == [choice.prompt_logprobs]  # on the first chunk only
    assert "".join(c.choices[0].text for c in chunks) == choice.text


def test_echo_with_logprobs_puts_the_prompt_tokens_first(client, worker, checkpoint):
    hf = checkpoint[1]
    prompt = random_prompt(15, seed=22)
    model = model_name(client)
    plain = client.completions.create(model=model, prompt=prompt, max_tokens=4, temperature=0, logprobs=1).choices[0]
    echoed = client.completions.create(model=model, prompt=prompt, max_tokens=4, temperature=0, logprobs=1,
                                       echo=True).choices[0]
    prompt_text = post(worker.url + "/detokenize", {"tokens": prompt})[1]["prompt"]
    assert echoed.text == prompt_text + plain.text
    logprobs = echoed.logprobs
    assert len(logprobs.tokens) == len(prompt) + 4
    assert logprobs.token_logprobs[0] is None and logprobs.top_logprobs[0] is None
    expected = hf_log_softmax(hf, prompt)
    for i in range(1, len(prompt)):
        assert abs(logprobs.token_logprobs[i] - expected[i - 1, prompt[i]].item()) < TOLERANCE
        assert len(logprobs.top_logprobs[i]) == 1
    assert logprobs.tokens[len(prompt):] == plain.logprobs.tokens
    # the echoed request computed its whole prompt, the plain one reused the cached prefix: rounding apart
    assert logprobs.token_logprobs[len(prompt):] == pytest.approx(plain.logprobs.token_logprobs, abs=TOLERANCE)
    assert logprobs.text_offset[0] == 0 and logprobs.text_offset[len(prompt)] == len(prompt_text)
    assert_vllm_prompt_logprobs(hf, prompt, echoed.prompt_logprobs, 1)  # vLLM adds its field for echo too

    chunks = list(client.completions.create(model=model, prompt=prompt, max_tokens=4, temperature=0, logprobs=1,
                                            echo=True, stream=True))
    parts = [c.choices[0].logprobs for c in chunks if c.choices and c.choices[0].logprobs]
    assert "".join(c.choices[0].text for c in chunks) == echoed.text
    assert [t for p in parts for t in p.tokens] == logprobs.tokens
    assert [v for p in parts for v in p.token_logprobs] == logprobs.token_logprobs
    assert [o for p in parts for o in p.text_offset] == logprobs.text_offset


def test_echo_without_logprobs_only_prepends_the_text(client):
    model = model_name(client)
    plain = client.completions.create(model=model, prompt="The river", max_tokens=4, temperature=0).choices[0]
    echoed = client.completions.create(model=model, prompt="The river", max_tokens=4, temperature=0,
                                       echo=True).choices[0]
    assert echoed.text == "The river" + plain.text and echoed.logprobs is None


def test_chat_prompt_logprobs_cover_the_templated_prompt(client, worker, checkpoint):
    hf = checkpoint[1]
    model = model_name(client)
    messages = [{"role": "user", "content": "Name a river."}]
    status, tokenized = post(worker.url + "/tokenize", {"model": model, "messages": messages})
    assert status == 200
    response = client.chat.completions.create(model=model, messages=messages, max_tokens=3, temperature=0,
                                              extra_body={"prompt_logprobs": 1})
    assert response.usage.prompt_tokens == len(tokenized["tokens"])
    assert_vllm_prompt_logprobs(hf, tokenized["tokens"], response.prompt_logprobs, 1)
    chunks = list(client.chat.completions.create(model=model, messages=messages, max_tokens=3, temperature=0,
                                                 stream=True, extra_body={"prompt_logprobs": 1}))
    streamed = [c.prompt_logprobs for c in chunks if getattr(c, "prompt_logprobs", None)]
    assert streamed == [response.prompt_logprobs]


def test_requests_without_prompt_logprobs_are_unchanged(client, worker):
    model = model_name(client)
    status, body = post(worker.url + "/v1/completions", {"model": model, "prompt": "Hi", "max_tokens": 2})
    assert status == 200 and "prompt_logprobs" not in body["choices"][0]
    status, body = post(worker.url + "/v1/chat/completions",
                        {"model": model, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2})
    assert status == 200 and "prompt_logprobs" not in body


@pytest.mark.parametrize("value", [-1, 21, "2", 1.5])
@pytest.mark.parametrize("endpoint", ["/v1/completions", "/v1/chat/completions"])
def test_a_bad_prompt_logprobs_is_a_400_naming_it(worker, endpoint, value):
    body = {"prompt": "Hi"} if endpoint == "/v1/completions" else {"messages": [{"role": "user", "content": "Hi"}]}
    status, error = post(worker.url + endpoint, {**body, "max_tokens": 2, "prompt_logprobs": value})
    assert status == 400 and error["error"]["param"] == "prompt_logprobs", error
