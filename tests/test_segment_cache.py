"""worker.server.segment_cache: cached chat-prompt tokenization gives exactly the tokenizer's own ids."""

from __future__ import annotations

import random

import pytest
from tokenizers import AddedToken, pre_tokenizers

from worker.models.checkpoint_writer import write_config_and_tokenizer
from worker.server.segment_cache import SegmentCachedEncoder, segment_boundary_pattern
from worker.tokenizer import Tokenizer

# one preset per template family: llama3 (demo), chatml (qwen), mistral
PRESETS = ("demo", "tiny-qwen3", "tiny-mistral")

PIECES = ["Hello world", " ", "\n\n", "  spaced  ", "don't I'm", "Ünïcödé café 日本語 😀", "e\u0301", "12345.678",
          "def f(x):\n    return x", "\t", "<|im_end|>", "<|im_start|>", "<|eot_id|>", "</s>", "[INST]", "<s>",
          "[/INST]", "<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<think>", "<|", "|>", "im_end"]


@pytest.fixture(scope="module")
def tokenizers_by_preset(tmp_path_factory) -> dict[str, Tokenizer]:
    root = tmp_path_factory.mktemp("segment_cache")
    return {name: Tokenizer.from_folder(write_config_and_tokenizer(name, root / name)) for name in PRESETS}


def document(rng: random.Random, chars: int) -> str:
    words = ["alpha", "beta", "gamma", " delta", "\n", "  ", "x1", "don't", "café", "😀", ".", ",", "\n\n", "e\u0301"]
    text = []
    while sum(map(len, text)) < chars:
        text.append(rng.choice(words) + (" " if rng.random() < 0.7 else ""))
    return "".join(text)


def chats(rng: random.Random, documents: list[str], count: int) -> list[list[dict]]:
    out = []
    for i in range(count):
        messages = [{"role": "system", "content": rng.choice(documents)},
                    {"role": "user", "content": f"Question {i}: " + document(rng, rng.randint(5, 900))}]
        if rng.random() < 0.5:
            messages += [{"role": "assistant", "content": rng.choice(documents)},
                         {"role": "user", "content": document(rng, 40)}]
        out.append(messages)
    return out


@pytest.mark.parametrize("name", PRESETS)
def test_rendered_chats_get_the_tokenizers_ids_and_repeated_documents_hit(tokenizers_by_preset, name):
    tokenizer = tokenizers_by_preset[name]
    encoder = SegmentCachedEncoder(tokenizer, min_segment_chars=64)
    assert encoder.enabled
    rng = random.Random(7)
    documents = [document(rng, 3000) for _ in range(3)]
    for messages in chats(rng, documents, 40):
        text = tokenizer.apply_chat_template(messages)
        assert encoder.encode(text, add_special_tokens=False) == tokenizer.encode(text, add_special_tokens=False)
    assert encoder.hits > 0
    if name != "tiny-mistral":  # Mistral's template writes the system text into the first user turn
        assert encoder.hits > encoder.misses


@pytest.mark.parametrize("name", PRESETS)
def test_any_mix_of_text_and_special_tokens_gets_the_tokenizers_ids(tokenizers_by_preset, name):
    tokenizer = tokenizers_by_preset[name]
    encoder = SegmentCachedEncoder(tokenizer, min_segment_chars=8)
    rng = random.Random(11)
    for _ in range(300):
        text = "".join(rng.choice(PIECES) for _ in range(rng.randint(1, 60)))
        for _ in range(2):  # the second time from the cache
            assert encoder.encode(text, add_special_tokens=False) == tokenizer.encode(text, add_special_tokens=False)


def test_special_tokens_asked_for_are_added_as_the_tokenizer_adds_them(tokenizers_by_preset):
    tokenizer = tokenizers_by_preset["demo"]  # llama3: a BOS on encode
    encoder = SegmentCachedEncoder(tokenizer, min_segment_chars=8)
    text = "<|eot_id|>" + "word " * 400
    assert encoder.encode(text, add_special_tokens=True) == tokenizer.encode(text, add_special_tokens=True)
    assert encoder.encode(text, add_special_tokens=True)[0] == tokenizer.bos_token_id


def test_the_cache_stays_within_its_token_bound(tokenizers_by_preset):
    tokenizer = tokenizers_by_preset["tiny-qwen3"]
    encoder = SegmentCachedEncoder(tokenizer, min_segment_chars=16, max_cached_tokens=300)
    rng = random.Random(3)
    for i in range(30):
        text = tokenizer.apply_chat_template([{"role": "user", "content": f"{i} " + document(rng, 400)}])
        assert encoder.encode(text, add_special_tokens=False) == tokenizer.encode(text, add_special_tokens=False)
        assert encoder._cached_tokens <= 300


def test_tokenizers_whose_pieces_depend_on_their_place_are_encoded_whole(tokenizers_by_preset):
    tokenizer = tokenizers_by_preset["tiny-qwen3"]
    assert segment_boundary_pattern(tokenizer.backend) is not None
    backend = tokenizer.backend.__class__.from_str(tokenizer.backend.to_str())
    # Metaspace prepending only to a text's first piece: cutting the text would change the ids
    backend.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first")
    assert segment_boundary_pattern(backend) is None
    backend = tokenizer.backend.__class__.from_str(tokenizer.backend.to_str())
    backend.add_special_tokens([AddedToken("<sep>", lstrip=True, normalized=False)])  # eats the space before it
    assert segment_boundary_pattern(backend) is None
    backend = tokenizer.backend.__class__.from_str(tokenizer.backend.to_str())
    backend.enable_truncation(128)
    assert segment_boundary_pattern(backend) is None


def test_a_tokenizer_without_a_backend_is_used_as_it_is():
    class Plain:
        def encode(self, text, add_special_tokens=True):
            return [len(text), int(add_special_tokens)]

    encoder = SegmentCachedEncoder(Plain())
    assert not encoder.enabled
    assert encoder.encode("x" * 5000, add_special_tokens=False) == [5000, 0]


def test_async_encoding_sends_only_long_new_parts_to_the_offload_and_gets_the_same_ids(tokenizers_by_preset):
    import asyncio

    tokenizer = tokenizers_by_preset["tiny-qwen3"]
    encoder = SegmentCachedEncoder(tokenizer, min_segment_chars=64)
    offloaded: list[str] = []

    async def offload(part: str) -> list[int]:
        offloaded.append(part)
        await asyncio.sleep(0)
        return tokenizer.encode_long(part, False)

    rng = random.Random(9)
    doc = document(rng, 3000)
    texts = [tokenizer.apply_chat_template([{"role": "system", "content": doc},
                                            {"role": "user", "content": document(rng, n)}]) for n in (50, 2000, 80)]

    async def main():
        return [await encoder.encode_async(text, offload, offload_chars=1000) for text in texts]

    assert asyncio.run(main()) == [tokenizer.encode(t, add_special_tokens=False) for t in texts]
    # the document once (then cached), the 2000-character question; short parts were encoded inline
    assert len(offloaded) == 2 and doc in offloaded[0] and len(offloaded[1]) < 2100
    assert encoder.hits == 2
