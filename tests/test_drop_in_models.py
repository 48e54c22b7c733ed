"""Models as clients name them: hub ids from the local Hugging Face cache, generation_config.json
defaults, chat template precedence, and the worker's drop-in flags."""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import pytest

from worker.models.checkpoint_writer import write_checkpoint
from worker.models.registry import resolve_model
from worker.server.drop_in import add_drop_in_arguments, drop_in_options_from_args, sampling_defaults
from worker.tokenizer import Tokenizer

COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture(scope="module")
def demo_folder(tmp_path_factory) -> Path:
    return write_checkpoint("demo", tmp_path_factory.mktemp("demo") / "demo", progress=False)


def _fake_hub_cache(root: Path, repo_id: str, source: Path) -> Path:
    """The layout huggingface_hub writes: models--owner--name/{refs/main, snapshots/<commit>/...}."""
    repo = root / ("models--" + repo_id.replace("/", "--"))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(COMMIT)
    snapshot = repo / "snapshots" / COMMIT
    shutil.copytree(source, snapshot)
    return snapshot


def test_hub_id_resolves_from_the_local_cache(demo_folder, tmp_path, monkeypatch):
    snapshot = _fake_hub_cache(tmp_path / "hub", "Acme/Tiny-Chat", demo_folder)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    assert resolve_model("Acme/Tiny-Chat") == snapshot


def test_missing_hub_id_names_the_cache(tmp_path, monkeypatch):
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(ValueError) as caught:
        resolve_model("Qwen/Qwen3-0.6B")
    message = str(caught.value)
    assert str(tmp_path / "hf" / "hub") in message and "huggingface-cli download Qwen/Qwen3-0.6B" in message


def test_generation_config_defaults(tmp_path):
    (tmp_path / "generation_config.json").write_text(json.dumps(
        {"temperature": 0.6, "top_p": 0.95, "top_k": 20, "do_sample": True, "eos_token_id": [1, 2]}))
    assert sampling_defaults(tmp_path, "auto") == {"temperature": 0.6, "top_p": 0.95, "top_k": 20}
    assert sampling_defaults(tmp_path, "vllm") == {}
    assert sampling_defaults(tmp_path / "missing", "auto") == {}


def test_chat_template_jinja_wins_over_tokenizer_config(demo_folder, tmp_path):
    folder = tmp_path / "both"
    shutil.copytree(demo_folder, folder)
    (folder / "chat_template.jinja").write_text("{% for m in messages %}<{{ m['content'] }}>{% endfor %}")
    tokenizer = Tokenizer.from_folder(folder)
    assert json.loads((folder / "tokenizer_config.json").read_text()).get("chat_template")  # both present
    assert tokenizer.apply_chat_template([{"role": "user", "content": "x"}]) == "<x>"
    override = "{% for m in messages %}[{{ m['content'] }}]{% endfor %}"
    assert tokenizer.apply_chat_template([{"role": "user", "content": "x"}], chat_template=override) == "[x]"


def test_drop_in_flags():
    parser = argparse.ArgumentParser()
    add_drop_in_arguments(parser)
    options = drop_in_options_from_args(parser.parse_args(
        ["--strict-fields", "--tool-call-parser", "hermes", "--reasoning-parser", "qwen3", "--generation-config", "vllm"]))
    assert (options.strict_fields, options.tool_call_parser, options.reasoning_parser, options.generation_config) == (
        True, "hermes", "qwen3", "vllm")
    defaults = drop_in_options_from_args(parser.parse_args([]))
    assert not defaults.strict_fields and defaults.tool_call_parser == "auto" and defaults.reasoning_parser is None
    with pytest.raises(SystemExit):
        parser.parse_args(["--tool-call-parser", "nope"])
