"""vLLM's `echo` on /v1/chat/completions, through the openai SDK against a real CPU demo worker.

As vLLM: when the last message is the one the response continues (the assistant's, or any role when no
generation prompt is added) its content starts every choice's content, and streamed, every choice's first
delta carries it; otherwise `echo` changes nothing. The worker runs with --strict-fields, so each 200 here
also shows that `echo` is a field the worker knows rather than one it ignores.
"""

from __future__ import annotations

import openai
import pytest

from worker.server.chat_output import echoed_text
from worker.server.launcher import WorkerProcess
from worker.server.protocol import parse_chat_request

MODEL = "demo"
QUESTION = {"role": "user", "content": "Name a river."}
STARTED = {"role": "assistant", "content": "The longest river is"}


@pytest.fixture(scope="module")
def worker():
    with WorkerProcess(["--model", MODEL, "--device", "cpu", "--kv-cache-tokens", "16384", "--no-progress",
                        "--strict-fields"], env={"OMP_NUM_THREADS": "1"}) as process:
        yield process


@pytest.fixture(scope="module")
def client(worker):
    return openai.OpenAI(base_url=worker.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def create(client, messages, n: int = 1, stream: bool = False, **extra):
    return client.chat.completions.create(model=MODEL, messages=messages, max_tokens=5, temperature=0, n=n,
                                          stream=stream, extra_body={"ignore_eos": True, **extra})


def streamed_contents(chunks, n: int) -> tuple[list[str], list[str]]:
    """Per choice: the first delta's content, and all its deltas' content joined."""
    first: list[str | None] = [None] * n
    joined = [""] * n
    for chunk in chunks:
        for choice in chunk.choices:
            content = choice.delta.content or ""
            if first[choice.index] is None:
                assert choice.delta.role == "assistant"
                first[choice.index] = content
            joined[choice.index] += content
    return first, joined


@pytest.mark.parametrize("options", [
    {"continue_final_message": True, "add_generation_prompt": False},  # the assistant's turn left open
    {},  # a new assistant turn after the assistant's last message: still the response's role, as vLLM
], ids=["continued", "generation-prompt"])
def test_the_assistant_last_message_starts_the_content(client, options):
    messages = [QUESTION, STARTED]
    plain = create(client, messages, **options).choices[0].message.content
    echoed = create(client, messages, echo=True, **options).choices[0].message.content
    assert echoed == STARTED["content"] + plain

    first, joined = streamed_contents(create(client, messages, stream=True, echo=True, **options), 1)
    assert first == [STARTED["content"]] and joined == [echoed]


def test_every_choice_is_echoed(client):
    messages = [QUESTION, STARTED]
    options = {"continue_final_message": True, "add_generation_prompt": False}
    response = create(client, messages, n=2, echo=True, **options)
    assert [c.index for c in response.choices] == [0, 1]
    assert all(c.message.content.startswith(STARTED["content"]) for c in response.choices)
    first, joined = streamed_contents(create(client, messages, n=2, stream=True, echo=True, **options), 2)
    assert first == [STARTED["content"]] * 2
    assert joined == [c.message.content for c in response.choices]


def test_without_a_generation_prompt_the_last_message_is_echoed_whatever_its_role(client):
    plain = create(client, [QUESTION], add_generation_prompt=False).choices[0].message.content
    echoed = create(client, [QUESTION], echo=True, add_generation_prompt=False).choices[0].message.content
    assert echoed == QUESTION["content"] + plain


def test_a_new_turn_after_the_user_echoes_nothing(client):
    plain = create(client, [QUESTION]).choices[0].message.content
    assert create(client, [QUESTION], echo=True).choices[0].message.content == plain
    first, joined = streamed_contents(create(client, [QUESTION], stream=True, echo=True), 1)
    assert first == [""] and joined == [plain]


def test_a_non_boolean_echo_is_a_400_naming_it(client):
    with pytest.raises(openai.BadRequestError) as error:
        create(client, [QUESTION], echo="yes")
    assert error.value.body["param"] == "echo" and "boolean" in error.value.body["message"]


def test_text_parts_of_the_last_message_are_echoed_joined():
    """The content the template saw: parse_messages joins text parts with newlines, and that is echoed."""
    chat = parse_chat_request({"messages": [QUESTION, {"role": "assistant", "content": [
        {"type": "text", "text": "First,"}, {"type": "text", "text": "then"}]}], "echo": True})
    assert echoed_text(chat.echo, chat.messages, chat.add_generation_prompt) == "First,\nthen"
