"""The offline API's prompt logprobs, vLLM-shaped: `SamplingParams(prompt_logprobs=k)` ->
`RequestOutput.prompt_logprobs`, None first, then per prompt token {token_id: Logprob(logprob, rank,
decoded_token)} holding the prompt token and the k most likely, checked against transformers."""

from __future__ import annotations

import pytest

from tests.test_prompt_logprobs import TOLERANCE, checkpoint, hf_log_softmax, random_prompt  # noqa: F401
from worker.llm import LLM, Logprob
from worker.sampling_params import InvalidParameter, SamplingParams

pytest.importorskip("transformers")
pytestmark = [pytest.mark.timeout(300)]


@pytest.fixture(scope="module")
def llm(checkpoint):  # noqa: F811 - the fixture imported above
    return LLM(str(checkpoint[0]), device="cpu", page_size=4, kv_cache_tokens=8192, progress=False)


def greedy(**options) -> SamplingParams:
    return SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True, **options)


def assert_vllm_shape(llm, hf, prompt: list[int], positions: list, top_k: int) -> None:
    assert len(positions) == len(prompt) and positions[0] is None
    expected = hf_log_softmax(hf, prompt)
    for i in range(1, len(prompt)):
        position, row = positions[i], expected[i - 1]
        top_ids = row.topk(top_k).indices.tolist()
        assert set(position) == {prompt[i], *top_ids}
        assert all(isinstance(value, Logprob) for value in position.values())
        own = position[prompt[i]]
        assert abs(own.logprob - row[prompt[i]].item()) < TOLERANCE
        assert own.rank == int((row > row[prompt[i]]).sum()) + 1
        for rank, token_id in enumerate(top_ids, start=1):
            assert position[token_id].rank == rank or token_id == prompt[i]
            assert abs(position[token_id].logprob - row[token_id].item()) < TOLERANCE
        assert all(value.decoded_token == llm.tokenizer.decode([t], skip_special_tokens=False)
                   for t, value in position.items())


def test_generate_gives_prompt_logprobs_as_vllm(llm, checkpoint):  # noqa: F811
    prompt = random_prompt(23, seed=31)
    [out] = llm.generate([prompt], greedy(prompt_logprobs=3), use_tqdm=False)
    assert_vllm_shape(llm, checkpoint[1], prompt, out.prompt_logprobs, 3)


def test_zero_gives_only_the_prompt_tokens(llm, checkpoint):  # noqa: F811
    prompt = random_prompt(12, seed=32)
    [out] = llm.generate(prompt, greedy(prompt_logprobs=0), use_tqdm=False)
    assert [list(p) if p else p for p in out.prompt_logprobs] == [None] + [[t] for t in prompt[1:]]
    assert_vllm_shape(llm, checkpoint[1], prompt, out.prompt_logprobs, 0)


def test_a_batch_where_one_prompt_asks_and_n_choices(llm, checkpoint):  # noqa: F811
    asked, plain = random_prompt(18, seed=33), random_prompt(14, seed=34)
    alone = llm.generate([plain], greedy(), use_tqdm=False)[0]
    outs = llm.generate([asked, plain], [greedy(prompt_logprobs=2, n=2), greedy()], use_tqdm=False)
    assert_vllm_shape(llm, checkpoint[1], asked, outs[0].prompt_logprobs, 2)
    assert len(outs[0].outputs) == 2
    assert outs[1].prompt_logprobs is None  # not asked: as before
    assert [o.token_ids for o in outs[1].outputs] == [o.token_ids for o in alone.outputs]


def test_text_prompts_and_chat_cover_the_prompt_token_ids(llm, checkpoint):  # noqa: F811
    [text] = llm.generate("The river runs", greedy(prompt_logprobs=1), use_tqdm=False)
    assert_vllm_shape(llm, checkpoint[1], text.prompt_token_ids, text.prompt_logprobs, 1)
    [chat] = llm.chat([{"role": "user", "content": "Name a river."}], greedy(prompt_logprobs=1), use_tqdm=False)
    assert_vllm_shape(llm, checkpoint[1], chat.prompt_token_ids, chat.prompt_logprobs, 1)


@pytest.mark.parametrize("value", [-1, 21, 1.5, True])
def test_a_bad_prompt_logprobs_names_the_field(value):
    with pytest.raises(InvalidParameter) as error:
        SamplingParams(prompt_logprobs=value)
    assert error.value.param == "prompt_logprobs"


def test_the_sim_executor_refuses_them_with_a_message():
    llm = LLM("demo", executor="sim", sim_profile="h200-qwen3-0.6b", progress=False)
    with pytest.raises(InvalidParameter, match="no prompt logprobs") as error:
        llm.generate([[1, 2, 3]], greedy(prompt_logprobs=1), use_tqdm=False)
    assert error.value.param == "prompt_logprobs"
