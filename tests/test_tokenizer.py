"""worker.tokenizer.Tokenizer against transformers' AutoTokenizer on the built-in checkpoints."""

from __future__ import annotations

import json
import pickle
import shutil
import unicodedata
from pathlib import Path

import pytest

from worker.models.checkpoint_writer import write_checkpoint
from worker.models.demo_tokenizer import DEMO_VOCAB_SIZE
from worker.tokenizer import ChatTemplateError, Tokenizer

transformers = pytest.importorskip("transformers")

# One checkpoint per template family; tiny-qwen2 and tiny-qwen3 differ in how transformers picks the
# tokenizer class (Qwen2Tokenizer rebuilds the pipeline from its own code, qwen3 loads tokenizer.json).
FAMILIES = {"demo": "llama3", "tiny-qwen2": "chatml", "tiny-qwen3": "chatml", "tiny-mistral": "mistral"}

TEXTS = [
    "Hello world",
    "",
    " ",
    "   leading spaces",
    "trailing spaces   ",
    "tabs\tand\nnewlines\n\n\n",
    "\r\n windows line\r\nends",
    "Ünïcödé café naïve 日本語 😀 emoji ½ ∑",
    "e\u0301 (a combining accent, not NFC)",
    "12345 + 678.9 = 3.14159; 1,000,000 and 2024-06-01 at 23:59",
    "don't I'm we'll THEY'RE it's",
    "x" * 40 + " " + "ab" * 20,
    "<|eot_id|> <|begin_of_text|> inside <|im_start|>user text<|im_end|></s>[INST]",
    '<tool_call>{"a": 1}</tool_call> <think>why</think>',
    "def f(x):\n    return x ** 2  # square\n",
]

CONVERSATIONS = [
    [{"role": "user", "content": "Hi"}],
    [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "4."},
        {"role": "user", "content": "  And 3+3?  "},
    ],
    [
        {"role": "user", "content": "first"},
        {"role": "assistant", "content": "second"},
        {"role": "user", "content": [{"type": "text", "text": "part one, "}, {"type": "text", "text": "part two"}]},
    ],
    [
        {"role": "system", "content": "Use tools when useful."},
        {"role": "user", "content": "Weather in Oslo?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}},
            {"id": "c2", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Bergen"}}},
        ]},
        {"role": "tool", "tool_call_id": "c1", "content": '{"temp": 3}'},
        {"role": "tool", "tool_call_id": "c2", "content": '{"temp": 5}'},
        {"role": "user", "content": "Thanks! Ça va?"},
    ],
]

TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Weather <now> & later, in °C",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tokenizers")
    return {name: write_checkpoint(name, root / name, progress=False) for name in FAMILIES}


@pytest.fixture(scope="module")
def pairs(folders):
    """(ours, transformers') tokenizer per checkpoint."""
    return {name: (Tokenizer.from_folder(path), transformers.AutoTokenizer.from_pretrained(path))
            for name, path in folders.items()}


@pytest.mark.parametrize("name", FAMILIES)
def test_encode_matches_transformers(pairs, name):
    ours, theirs = pairs[name]
    for text in TEXTS:
        for add_special_tokens in (True, False):
            assert ours.encode(text, add_special_tokens=add_special_tokens) == theirs.encode(
                text, add_special_tokens=add_special_tokens), (text, add_special_tokens)


@pytest.mark.parametrize("name", FAMILIES)
def test_decode_matches_transformers_and_round_trips(pairs, name):
    ours, theirs = pairs[name]
    for text in TEXTS:
        ids = ours.encode(text, add_special_tokens=True)
        for skip in (True, False):
            assert ours.decode(ids, skip_special_tokens=skip) == theirs.decode(ids, skip_special_tokens=skip)
        # Byte-level BPE loses nothing; the ChatML family NFC-normalises first, as Qwen does.
        expected = unicodedata.normalize("NFC", text) if FAMILIES[name] == "chatml" else text
        assert ours.decode(ours.encode(text, add_special_tokens=False), skip_special_tokens=False) == expected


def test_bos_is_added_the_way_each_family_does(pairs):
    demo, qwen, mistral = pairs["demo"][0], pairs["tiny-qwen3"][0], pairs["tiny-mistral"][0]
    assert demo.encode("hi")[0] == demo.bos_token_id == demo.token_to_id("<|begin_of_text|>")
    assert demo.encode("hi", add_special_tokens=False)[0] != demo.bos_token_id
    assert qwen.bos_token_id is None and qwen.encode("hi") == qwen.encode("hi", add_special_tokens=False)
    assert mistral.encode("hi")[:1] == [1] and mistral.bos_token_id == 1


def test_special_ids(pairs):
    demo = pairs["demo"][0]
    ids = {token: demo.token_to_id(token) for token in ("<|eot_id|>", "<|end_of_text|>", "<|eom_id|>")}
    assert sorted(demo.eos_token_ids) == sorted(ids.values())
    assert demo.pad_token_id == demo.token_to_id("<|finetune_right_pad_id|>")
    assert demo.vocab_size == len(demo) == DEMO_VOCAB_SIZE
    assert {demo.bos_token_id, *ids.values(), demo.token_to_id("<|start_header_id|>")} <= set(demo.all_special_ids)
    qwen = pairs["tiny-qwen2"][0]
    assert sorted(qwen.eos_token_ids) == sorted([qwen.token_to_id("<|im_end|>"), qwen.token_to_id("<|endoftext|>")])
    assert qwen.token_to_id("<think>") not in qwen.all_special_ids  # added, but not special (kept by decode)
    assert qwen.decode(qwen.encode("<think>hm</think>")) == "<think>hm</think>"
    assert qwen.decode(qwen.encode("<|im_start|>hm<|im_end|>")) == "hm"


def test_ids_beyond_the_tokenizer_decode_to_nothing(pairs):
    ours = pairs["demo"][0]
    ids = ours.encode("hello", add_special_tokens=False)
    assert ours.decode([*ids, DEMO_VOCAB_SIZE, 150_000, -1]) == ours.decode(ids) == "hello"
    assert ours.convert_ids_to_tokens([ids[0], 150_000]) == [ours.convert_ids_to_tokens(ids[0]), None]
    assert ours.convert_ids_to_tokens(ours.bos_token_id) == "<|begin_of_text|>"


@pytest.mark.parametrize("name", FAMILIES)
def test_chat_template_matches_transformers(pairs, name):
    ours, theirs = pairs[name]
    for conversation in CONVERSATIONS:
        for add_generation_prompt in (True, False):
            for tools in (None, TOOLS):
                expected = theirs.apply_chat_template(conversation, tokenize=False, tools=tools,
                                                      add_generation_prompt=add_generation_prompt)
                rendered = ours.apply_chat_template(conversation, add_generation_prompt=add_generation_prompt,
                                                    tools=tools)
                assert rendered == expected
                # ... and so does the token sequence the engine gets.
                assert ours.encode(rendered, add_special_tokens=False) == theirs.apply_chat_template(
                    conversation, tokenize=True, return_dict=False, tools=tools,
                    add_generation_prompt=add_generation_prompt)


def test_chat_formats(pairs):
    conversation = CONVERSATIONS[1]
    llama3 = pairs["demo"][0].apply_chat_template(conversation)
    assert llama3.startswith("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nYou are terse.<|eot_id|>")
    assert llama3.endswith("And 3+3?<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n")
    chatml = pairs["tiny-qwen3"][0].apply_chat_template(conversation, add_generation_prompt=False)
    assert chatml.startswith("<|im_start|>system\nYou are terse.<|im_end|>\n<|im_start|>user\n")
    assert chatml.endswith("<|im_start|>user\n  And 3+3?  <|im_end|>\n")
    mistral = pairs["tiny-mistral"][0].apply_chat_template(conversation)
    assert mistral == "<s>[INST] What is 2+2?[/INST] 4.</s>[INST] You are terse.\n\n  And 3+3?  [/INST]"


def test_template_sees_kwargs_and_transformers_helpers(folders, tmp_path):
    folder = _copy_with_template(
        folders["demo"], tmp_path,
        "{{ bos_token }}{{ greeting }} {{ messages[0]['content'] | tojson }} {{ {'b': 1, 'a': '<é>'} | tojson(sort_keys=True) }}"
        "{% generation %} {{ strftime_now('%Y') | length }}{% endgeneration %}{% for m in messages %}{% break %}{% endfor %}",
    )
    ours = Tokenizer.from_folder(folder)
    theirs = transformers.AutoTokenizer.from_pretrained(folder)
    messages = [{"role": "user", "content": "naïve <b>"}]
    rendered = ours.apply_chat_template(messages, greeting="hey")
    assert rendered == theirs.apply_chat_template(messages, tokenize=False, greeting="hey")
    assert rendered == '<|begin_of_text|>hey "naïve <b>" {"a": "<é>", "b": 1} 4'


def test_chat_template_errors_are_clear(folders, tmp_path):
    ours = Tokenizer.from_folder(folders["tiny-mistral"])
    with pytest.raises(ChatTemplateError, match="no role narrator"):
        ours.apply_chat_template([{"role": "narrator", "content": "Once"}])
    with pytest.raises(ChatTemplateError, match="non-empty list"):
        ours.apply_chat_template([])
    with pytest.raises(ChatTemplateError, match=r"messages\[1\]"):
        ours.apply_chat_template([{"role": "user", "content": "a"}, "b"])
    with pytest.raises(ChatTemplateError, match="tools must be"):
        ours.apply_chat_template([{"role": "user", "content": "a"}], tools="get_weather")

    broken = Tokenizer.from_folder(_copy_with_template(folders["demo"], tmp_path / "broken", "{% for m in messages %}"))
    with pytest.raises(ChatTemplateError, match="not valid Jinja"):
        broken.apply_chat_template([{"role": "user", "content": "a"}])
    refusing = Tokenizer.from_folder(_copy_with_template(
        folders["demo"], tmp_path / "refusing", "{{ raise_exception('roles must alternate') }}"))
    with pytest.raises(ChatTemplateError, match="roles must alternate"):
        refusing.apply_chat_template([{"role": "user", "content": "a"}])
    sandboxed = Tokenizer.from_folder(_copy_with_template(
        folders["demo"], tmp_path / "sandboxed", "{{ messages.__class__.__mro__ }}"))
    with pytest.raises(ChatTemplateError):
        sandboxed.apply_chat_template([{"role": "user", "content": "a"}])
    assert issubclass(ChatTemplateError, ValueError)


def test_folder_without_chat_template(folders, tmp_path):
    folder = _copy_with_template(folders["demo"], tmp_path, None)
    ours = Tokenizer.from_folder(folder)
    assert ours.chat_template is None
    assert ours.encode("hi") == Tokenizer.from_folder(folders["demo"]).encode("hi")
    with pytest.raises(ChatTemplateError, match="has no chat template"):
        ours.apply_chat_template([{"role": "user", "content": "hi"}])


def test_chat_template_jinja_file_is_used(folders, tmp_path):
    folder = _copy_with_template(folders["demo"], tmp_path, None)
    (folder / "chat_template.jinja").write_text("{% for m in messages %}[{{ m['content'] }}]{% endfor %}")
    assert Tokenizer.from_folder(folder).apply_chat_template([{"role": "user", "content": "x"}]) == "[x]"


def test_tokenizer_survives_pickling(pairs):
    # The engine process sends its tokenizer to the frontend process.
    ours = pairs["tiny-qwen2"][0]
    copy = pickle.loads(pickle.dumps(ours))
    assert copy.encode(TEXTS[7]) == ours.encode(TEXTS[7])
    assert copy.apply_chat_template(CONVERSATIONS[1]) == ours.apply_chat_template(CONVERSATIONS[1])
    assert copy.eos_token_ids == ours.eos_token_ids


def test_missing_tokenizer_json_is_reported(tmp_path):
    with pytest.raises(FileNotFoundError, match="has no tokenizer.json"):
        Tokenizer.from_folder(tmp_path)


def _copy_with_template(source: Path, target: Path, template: str | None) -> Path:
    """A copy of the tokenizer files of `source` whose chat template is `template` (None: no template)."""
    target.mkdir(parents=True, exist_ok=True)
    for name in ("config.json", "tokenizer.json", "special_tokens_map.json", "generation_config.json"):
        shutil.copy(source / name, target / name)
    config = json.loads((source / "tokenizer_config.json").read_text())
    config.pop("chat_template")
    if template is not None:
        config["chat_template"] = template
    (target / "tokenizer_config.json").write_text(json.dumps(config))
    return target
