"""Built-in presets, make-checkpoint and the model registry, checked against transformers as the oracle."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from worker.cli import main as radixfleet
from worker.models import checkpoint_writer, registry
from worker.models.checkpoint_writer import count_parameters, parameter_shapes, write_checkpoint
from worker.models.demo_tokenizer import DEMO_VOCAB_SIZE, family
from worker.models.presets import PRESETS, get_preset, preset_names

transformers = pytest.importorskip("transformers")

SMALL = [name for name in preset_names() if PRESETS[name].small]
REAL = [name for name in preset_names() if not PRESETS[name].small]


@pytest.fixture(scope="module")
def small_checkpoints(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("presets")
    return {name: write_checkpoint(name, root / name, progress=False) for name in SMALL}


def _file_digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def _weight_names(folder: Path) -> set[str]:
    names: set[str] = set()
    for file in folder.glob("*.safetensors"):
        with safe_open(str(file), framework="pt") as handle:
            names.update(handle.keys())
    return names


# ------------------------------------------------------------------------------------ presets
def test_small_presets_are_the_promised_architectures():
    expected = {"demo": "LlamaForCausalLM", "tiny-llama3": "LlamaForCausalLM", "tiny-qwen2": "Qwen2ForCausalLM",
                "tiny-qwen3": "Qwen3ForCausalLM", "tiny-mistral": "MistralForCausalLM"}
    assert {name: PRESETS[name].architecture["architectures"][0] for name in SMALL} == expected
    demo = get_preset("demo").hf_config()
    assert (demo["hidden_size"], demo["num_hidden_layers"], demo["num_attention_heads"],
            demo["num_key_value_heads"], demo["intermediate_size"], demo["max_position_embeddings"]) == (
        256, 4, 8, 4, 768, 4096)
    for name in SMALL:  # the model vocab is exactly the demo tokenizer
        assert PRESETS[name].hf_config()["vocab_size"] == DEMO_VOCAB_SIZE
    qwen3 = get_preset("tiny-qwen3").hf_config()
    assert qwen3["head_dim"] != qwen3["hidden_size"] // qwen3["num_attention_heads"]
    assert get_preset("tiny-qwen2").hf_config()["tie_word_embeddings"] is True
    assert get_preset("tiny-llama3").hf_config()["rope_scaling"]["rope_type"] == "llama3"


@pytest.mark.parametrize(
    "name, params",
    [  # parameter counts of the published models these presets copy the shape of
        ("llama3-8b", 8_030_261_248),
        ("qwen3-0.6b", 596_049_920),
        ("qwen2.5-7b", 7_615_616_512),
        ("qwen2.5-0.5b", 494_032_768),
        ("mistral-7b", 7_248_023_552),
    ],
)
def test_real_shape_parameter_counts(name, params):
    config = get_preset(name).hf_config()
    assert count_parameters(config) == params
    # Independently: transformers builds the same network on the meta device (no memory used).
    hf_config = _hf_config(config)
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(hf_config)
    assert model.num_parameters() == params
    hf_shapes = {key: tuple(value.shape) for key, value in model.state_dict().items()}
    if config["tie_word_embeddings"]:
        hf_shapes.pop("lm_head.weight")
    assert dict(parameter_shapes(config)) == hf_shapes


def _hf_config(config: dict):
    cls = transformers.AutoConfig.for_model(config["model_type"]).__class__
    return cls.from_dict(config)


def test_llama3_8b_keeps_its_rope_scaling_in_transformers(tmp_path):
    config = get_preset("llama3-8b").hf_config()
    (tmp_path / "config.json").write_text(json.dumps(config))
    loaded = transformers.AutoConfig.from_pretrained(tmp_path)
    assert loaded.rope_parameters == {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                      "high_freq_factor": 4.0, "original_max_position_embeddings": 8192,
                                      "rope_theta": 500000.0}
    assert loaded.dtype == torch.bfloat16


def test_config_token_ids_agree_with_the_tokenizer():
    for name in preset_names():
        preset = PRESETS[name]
        fam = family(preset.tokenizer_family)
        config = preset.hf_config()
        eos = config["eos_token_id"]
        eos = eos if isinstance(eos, list) else [eos]
        assert fam.token_id(fam.eos_token) in eos
        assert all(token_id < config["vocab_size"] for token_id in eos + [config["bos_token_id"]])
    mistral = get_preset("mistral-7b").hf_config()
    assert (mistral["bos_token_id"], mistral["eos_token_id"]) == (1, 2)  # as published


# ------------------------------------------------------------------------------------ written folders
@pytest.mark.parametrize("name", SMALL)
def test_small_preset_loads_in_transformers(small_checkpoints, name):
    folder = small_checkpoints[name]
    for required in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                     "special_tokens_map.json", "model.safetensors"):
        assert (folder / required).is_file(), required
    model, info = transformers.AutoModelForCausalLM.from_pretrained(folder, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert type(model).__name__ == PRESETS[name].architecture["architectures"][0]
    assert model.num_parameters() == count_parameters(PRESETS[name].hf_config())
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    assert len(tokenizer) == model.config.vocab_size
    assert tokenizer.chat_template

    # The weights behave as the engine tests need: the next token depends on the context, not just on the
    # last token, and greedy choices are not near-ties.
    generator = torch.Generator().manual_seed(0)
    prompts = torch.randint(0, 3000, (16, 24), generator=generator)
    prompts[:, -1] = 1000
    with torch.no_grad():
        logits = model(prompts).logits[:, -1].float()
    assert len(set(logits.argmax(-1).tolist())) >= 8
    top2 = logits.topk(2).values
    assert (top2[:, 0] - top2[:, 1]).median() > 0.05


def test_tied_presets_store_no_lm_head(small_checkpoints):
    assert "lm_head.weight" not in _weight_names(small_checkpoints["tiny-qwen2"])
    assert "lm_head.weight" in _weight_names(small_checkpoints["demo"])


def test_same_seed_gives_the_same_bytes(tmp_path, small_checkpoints):
    again = write_checkpoint("demo", tmp_path / "again", seed=0, progress=False)
    assert _file_digests(again) == _file_digests(small_checkpoints["demo"])
    other = _file_digests(write_checkpoint("demo", tmp_path / "seed1", seed=1, progress=False))
    first = _file_digests(again)
    assert other["model.safetensors"] != first["model.safetensors"]
    assert other["tokenizer.json"] == first["tokenizer.json"]


def test_dtype_override(tmp_path):
    folder = write_checkpoint("tiny-qwen3", tmp_path / "bf16", dtype="bfloat16", progress=False)
    config = json.loads((folder / "config.json").read_text())
    assert config["torch_dtype"] == config["dtype"] == "bfloat16"
    with safe_open(str(folder / "model.safetensors"), framework="pt") as handle:
        assert handle.get_tensor("model.embed_tokens.weight").dtype == torch.bfloat16
    with pytest.raises(ValueError, match="unsupported dtype"):
        write_checkpoint("tiny-qwen3", tmp_path / "bad", dtype="int8", progress=False)


def test_sharded_checkpoint_loads_like_the_single_file(tmp_path, small_checkpoints):
    limit = 1_000_000
    folder = write_checkpoint("tiny-llama3", tmp_path / "sharded", max_shard_bytes=limit, progress=False)
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    shards = sorted(folder.glob("model-*-of-*.safetensors"))
    assert len(shards) > 1 and not (folder / "model.safetensors").exists()
    assert set(index["weight_map"].values()) == {shard.name for shard in shards}
    assert set(index["weight_map"]) == _weight_names(folder) == {n for n, _ in parameter_shapes(
        get_preset("tiny-llama3").hf_config())}
    for shard in shards:  # a shard exceeds the limit only when it holds one tensor that alone does
        with safe_open(str(shard), framework="pt") as handle:
            sizes = [handle.get_slice(key).get_shape() for key in handle.keys()]
        nbytes = sum(4 * torch.Size(shape).numel() for shape in sizes)
        assert nbytes <= limit or len(sizes) == 1

    sharded, info = transformers.AutoModelForCausalLM.from_pretrained(folder, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    single = transformers.AutoModelForCausalLM.from_pretrained(small_checkpoints["tiny-llama3"])
    ids = torch.tensor([[5, 17, 300, 2999, 42]])
    with torch.no_grad():
        assert torch.equal(sharded(ids).logits, single(ids).logits)


def test_failed_write_leaves_nothing_behind(tmp_path, monkeypatch):
    calls = {"n": 0}
    real = checkpoint_writer.generate_tensor

    def failing(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] > 5:
            raise RuntimeError("disk on fire")
        return real(*args, **kwargs)

    monkeypatch.setattr(checkpoint_writer, "generate_tensor", failing)
    with pytest.raises(RuntimeError, match="disk on fire"):
        write_checkpoint("tiny-qwen2", tmp_path / "model", max_shard_bytes=100_000, progress=False)
    assert list(tmp_path.iterdir()) == []  # neither the folder nor its temporary sibling


def test_existing_folder_is_kept_unless_overwrite(tmp_path):
    out = tmp_path / "model"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not empty"):
        write_checkpoint("tiny-qwen2", out, progress=False)
    assert (out / "notes.txt").read_text() == "mine"
    write_checkpoint("tiny-qwen2", out, progress=False, overwrite=True)
    assert not (out / "notes.txt").exists() and (out / "config.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


# ------------------------------------------------------------------------------------ registry
def test_registry_returns_folders_as_they_are(tmp_path):
    assert registry.resolve_model(str(tmp_path)) == tmp_path


def test_registry_materialises_a_preset_once(tmp_path, monkeypatch):
    monkeypatch.setenv("RADIXFLEET_HOME", str(tmp_path / "home"))
    folder = registry.resolve_model("tiny-qwen3", progress=False)
    assert folder == tmp_path / "home" / "models" / "tiny-qwen3-seed0"
    assert (folder / "model.safetensors").is_file()

    def must_not_write(*args, **kwargs):
        raise AssertionError("the preset was written again")

    monkeypatch.setattr(registry, "write_checkpoint", must_not_write)
    assert registry.resolve_model("tiny-qwen3", progress=False) == folder


def test_registry_concurrent_first_use_writes_one_complete_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("RADIXFLEET_HOME", str(tmp_path))
    writes = []
    real = registry.write_checkpoint
    monkeypatch.setattr(registry, "write_checkpoint", lambda *a, **k: writes.append(a) or real(*a, **k))
    results, errors = [], []

    def resolve():
        try:
            results.append(registry.resolve_model("tiny-qwen2", progress=False))
        except Exception as error:  # pragma: no cover - reported below
            errors.append(error)

    threads = [threading.Thread(target=resolve) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors and len(set(results)) == 1 and len(writes) == 1
    assert (results[0] / "model.safetensors").is_file()


def test_registry_rejects_unknown_names(tmp_path, monkeypatch):
    monkeypatch.setenv("RADIXFLEET_HOME", str(tmp_path))
    with pytest.raises(ValueError, match="neither an existing folder nor a built-in") as error:
        registry.resolve_model("no-such-model")
    assert "demo" in str(error.value) and "llama3-8b" in str(error.value)


# ------------------------------------------------------------------------------------ CLI
def test_cli_lists_presets_with_parameter_counts(capsys):
    assert radixfleet(["make-checkpoint", "--list"]) == 0
    out = capsys.readouterr().out
    for name in preset_names():
        assert name in out
    assert "8.03B" in out and "596M" in out


def test_cli_writes_a_checkpoint(tmp_path, capsys):
    out = tmp_path / "demo"
    assert radixfleet(["make-checkpoint", "--preset", "tiny-mistral", "--out", str(out), "--seed", "3",
                       "--shard-size", "2MB", "--quiet"]) == 0
    assert (out / "model.safetensors.index.json").is_file()
    assert "wrote tiny-mistral" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--preset", "gpt-5", "--out", "X"], "unknown built-in model 'gpt-5'; built-ins: demo"),
        (["--out", "X"], "--preset is required"),
        (["--preset", "demo"], "--out is required"),
        (["--preset", "demo", "--out", "X", "--shard-size", "lots"], "--shard-size"),
    ],
)
def test_cli_rejects_bad_arguments(tmp_path, capsys, argv, message):
    argv = [str(tmp_path / "out") if arg == "X" else arg for arg in argv]
    assert radixfleet(["make-checkpoint", *argv]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_cli_refuses_to_overwrite(tmp_path, capsys):
    (tmp_path / "keep.txt").write_text("x")
    assert radixfleet(["make-checkpoint", "--preset", "demo", "--out", str(tmp_path), "--quiet"]) == 1
    assert "--force" in capsys.readouterr().err
    assert [p.name for p in tmp_path.iterdir()] == ["keep.txt"]


def test_tokenizer_json_is_identical_across_processes():
    code = ("import hashlib; from worker.models.demo_tokenizer import tokenizer_json as t; "
            "print(*(hashlib.sha256(t(f).encode()).hexdigest() for f in ('llama3', 'chatml', 'mistral')))")
    root = Path(__file__).resolve().parents[1]
    digests = set()
    for hash_seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": hash_seed, "PYTHONPATH": str(root)}
        digests.add(subprocess.run([sys.executable, "-c", code], env=env, check=True, capture_output=True,
                                   text=True).stdout)
    assert len(digests) == 1


def test_ids_past_the_tokenizer_are_never_the_greedy_choice():
    # Real-shape presets have a model vocab far larger than the built-in tokenizer: those rows are zero, so
    # their logit (0) loses to the tokenizer's spread-out logits and generated text is never empty.
    config = {"hidden_size": 64, "vocab_size": DEMO_VOCAB_SIZE + 500, "tie_word_embeddings": False}
    lm_head = checkpoint_writer.generate_tensor("lm_head.weight", (config["vocab_size"], 64), config, seed=0,
                                                dtype=torch.float32, tokenizer_size=DEMO_VOCAB_SIZE)
    assert not lm_head[DEMO_VOCAB_SIZE:].any() and lm_head[:DEMO_VOCAB_SIZE].std() > 0
    hidden = torch.randn(256, 64, generator=torch.Generator().manual_seed(0))
    hidden = hidden / hidden.pow(2).mean(-1, keepdim=True).sqrt()  # what the final RMSNorm hands lm_head
    assert (hidden @ lm_head.T).argmax(-1).max() < DEMO_VOCAB_SIZE
