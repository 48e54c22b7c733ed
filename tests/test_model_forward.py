"""The Llama-family model, the checkpoint loader and the CPU executor, checked against transformers.

Tiny random-weight checkpoints of each supported family are written by transformers itself
(save_pretrained, safetensors) and read back through our loader. transformers in float32 with eager
attention is the oracle: whole prompts in one ragged batch, and the same prompts split into chunks
and single-token decode steps over a paged KV cache with shuffled pages, must give its logits.
"""

from __future__ import annotations

import json
import re
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from helpers_hf import (
    PagedSequence,
    PagePool,
    build_batch,
    hf_logits,
    load_hf_oracle,
    make_hf_checkpoint,
    random_prompts,
)
from worker.config import EngineConfig
from worker.executor.cpu import CPUExecutor
from worker.models.config import CheckpointError, ModelConfig, UnsupportedModelError
from worker.models.loader import load_model

ATOL = 1e-4
KINDS = ["llama", "llama3_scaled", "llama_tied", "qwen2", "qwen3", "mistral"]
VOCAB = 512


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """checkpoint(kind) -> (folder, transformers oracle); each kind is written once per module."""
    cache = {}

    def get(kind: str):
        if kind not in cache:
            folder = make_hf_checkpoint(tmp_path_factory.mktemp(kind), kind)
            cache[kind] = (folder, load_hf_oracle(folder))
        return cache[kind]

    return get


def full_prompt_logits(executor: CPUExecutor, prompts: list[list[int]], page_size: int) -> torch.Tensor:
    """Logits of every position of every prompt, from one ForwardBatch holding all prompts whole."""
    executor.init_kv_cache(executor.num_kv_pages(page_size), page_size)
    pool = PagePool(executor.num_kv_pages(page_size), seed=3)
    seqs = [PagedSequence(p) for p in prompts]
    for seq in seqs:
        pool.grow(seq, len(seq.tokens), page_size)
    return executor.forward(build_batch([(s, len(s.tokens)) for s in seqs], page_size, all_logits=True))


# --------------------------------------------------------------------------- whole prompts
@pytest.mark.parametrize("kind", KINDS)
def test_full_prompt_batch_matches_transformers(checkpoint, kind):
    folder, oracle = checkpoint(kind)
    executor = CPUExecutor(folder, EngineConfig(kv_cache_tokens=128, progress=False))
    prompts = random_prompts([1, 7, 19], VOCAB, seed=11)

    logits = full_prompt_logits(executor, prompts, page_size=4)

    expected = torch.cat([hf_logits(oracle, p) for p in prompts])
    assert logits.dtype == torch.float32
    assert logits.shape == (sum(map(len, prompts)), VOCAB)
    torch.testing.assert_close(logits, expected, atol=ATOL, rtol=0)


def test_sharded_checkpoint_loads_through_index(tmp_path):
    folder = make_hf_checkpoint(tmp_path / "sharded", "qwen2", seed=5, max_shard_size="40KB")
    shards = sorted(p.name for p in folder.glob("*.safetensors"))
    assert (folder / "model.safetensors.index.json").is_file() and len(shards) > 2, shards

    executor = CPUExecutor(folder, EngineConfig(kv_cache_tokens=64, progress=False))
    prompts = random_prompts([6, 10], VOCAB, seed=2)
    logits = full_prompt_logits(executor, prompts, page_size=8)

    oracle = load_hf_oracle(folder)
    torch.testing.assert_close(logits, torch.cat([hf_logits(oracle, p) for p in prompts]), atol=ATOL, rtol=0)


def test_tied_checkpoint_shares_the_embedding_matrix(checkpoint):
    folder, _ = checkpoint("llama_tied")
    assert "lm_head.weight" not in load_file(folder / "model.safetensors")
    model, config = load_model(folder, "cpu", torch.float32, progress=False)
    assert config.tie_word_embeddings
    assert model.lm_head.weight is model.embed_tokens.weight


def test_bfloat16_model_returns_float32_logits_close_to_float32(checkpoint):
    folder, oracle = checkpoint("llama")
    executor = CPUExecutor(folder, EngineConfig(kv_cache_tokens=64, dtype="bfloat16", progress=False))
    assert executor.model.embed_tokens.weight.dtype == torch.bfloat16
    assert executor.kv_caches == [] and executor.model_config.num_hidden_layers == 2
    prompt = random_prompts([12], VOCAB, seed=4)[0]

    logits = full_prompt_logits(executor, [prompt], page_size=4)

    assert logits.dtype == torch.float32
    expected = hf_logits(oracle, prompt)
    # bf16 keeps ~3 significant digits: close to the float32 oracle (measured: 2.5% of the largest
    # logit), nowhere near exact
    assert (logits - expected).abs().max() < 0.05 * expected.abs().max()


# --------------------------------------------------------------------------- chunked prefill + decode
# Per sequence, the tokens computed at each step (0: not scheduled that step). Chunks of prompt first,
# then single-token decode steps that read everything before them from the paged cache.
CHUNK_PLANS = [
    [9, 6] + [1] * 8,  # 23 tokens: prefix chunk, another chunk, decodes
    [4, 3, 1, 1, 1, 1],  # 11 tokens
    [0, 0, 5, 7] + [1] * 5,  # 17 tokens, arriving while the others decode
]


@pytest.mark.parametrize("page_size", [1, 4, 16])
@pytest.mark.parametrize("kind", KINDS)
def test_chunked_prefill_and_decode_over_shuffled_pages_match(checkpoint, kind, page_size):
    folder, oracle = checkpoint(kind)
    prompts = random_prompts([sum(plan) for plan in CHUNK_PLANS], VOCAB, seed=7)
    expected = [hf_logits(oracle, p) for p in prompts]

    executor = CPUExecutor(folder, EngineConfig(kv_cache_tokens=256, progress=False))
    num_pages = executor.num_kv_pages(page_size)
    executor.init_kv_cache(num_pages, page_size)
    for k_cache, v_cache in executor.kv_caches:  # any read of a slot never written turns into NaN
        k_cache.fill_(float("nan"))
        v_cache.fill_(float("nan"))
    pool = PagePool(num_pages, seed=page_size)
    seqs = [PagedSequence(p) for p in prompts]

    checked = 0
    for step in range(max(map(len, CHUNK_PLANS))):
        work = [(s, plan[step]) for s, plan in zip(seqs, CHUNK_PLANS) if step < len(plan) and plan[step]]
        work.sort(key=lambda sn: not (sn[1] == 1 and sn[0].num_computed > 0))  # decodes first
        for seq, n in work:
            pool.grow(seq, seq.num_computed + n, page_size)
        batch = build_batch(work, page_size)

        logits = executor.forward(batch)

        assert logits.shape == (len(work), VOCAB)
        for row, (seq, n) in enumerate(work):
            last_position = seq.num_computed + n - 1
            oracle_row = expected[seqs.index(seq)][last_position]
            torch.testing.assert_close(logits[row], oracle_row, atol=ATOL, rtol=0)
            seq.num_computed += n
            checked += 1
    assert checked == sum(len([n for n in plan if n]) for plan in CHUNK_PLANS)
    # pages really were scattered: no sequence got a run of consecutive page ids
    assert any(s.pages != list(range(s.pages[0], s.pages[0] + len(s.pages))) for s in seqs if len(s.pages) > 1)


# --------------------------------------------------------------------------- executor contract
def test_executor_kv_pool_geometry(checkpoint):
    folder, _ = checkpoint("qwen3")
    executor = CPUExecutor(folder, EngineConfig(kv_cache_tokens=100, progress=False))
    assert executor.name == "cpu" and executor.device == torch.device("cpu")
    assert executor.num_kv_pages(16) == 6
    with pytest.raises(RuntimeError, match="init_kv_cache"):
        executor.forward(build_batch([(_one_page_seq([1, 2]), 2)], page_size=16))

    executor.init_kv_cache(num_pages=6, page_size=16)

    cfg = executor.model_config
    assert len(executor.kv_caches) == cfg.num_hidden_layers
    for k_cache, v_cache in executor.kv_caches:
        assert k_cache.shape == v_cache.shape == (7 * 16, cfg.num_key_value_heads, 32)  # + scratch page 0


def _one_page_seq(tokens: list[int]) -> PagedSequence:
    return PagedSequence(tokens, pages=[1])


# --------------------------------------------------------------------------- config parsing
def _llama_dict(**overrides) -> dict:
    d = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": 128,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 8192,
        "rms_norm_eps": 1e-5,
    }
    d.update(overrides)
    return d


def test_transformers_4_and_5_rope_spellings_parse_alike():
    scaling = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    legacy = ModelConfig.from_hf_config(
        _llama_dict(rope_theta=500000.0, rope_scaling={"type": "llama3", **scaling}, torch_dtype="bfloat16")
    )
    current = ModelConfig.from_hf_config(
        _llama_dict(rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, **scaling}, dtype="bfloat16")
    )
    assert legacy == current
    assert current.rope_theta == 500000.0 and current.rope_scaling == {"rope_type": "llama3", **scaling}
    assert current.torch_dtype == torch.bfloat16 and current.head_dim == 16

    plain = ModelConfig.from_hf_config(_llama_dict(rope_parameters={"rope_type": "default", "rope_theta": 1e6}))
    assert plain.rope_theta == 1e6 and plain.rope_scaling is None


def test_family_switches():
    qwen2 = ModelConfig.from_hf_config(_llama_dict(architectures=["Qwen2ForCausalLM"], model_type="qwen2"))
    assert qwen2.qkv_bias and not qwen2.qk_norm  # Qwen2 configs have no attention_bias key, yet use biases
    qwen3 = ModelConfig.from_hf_config(
        _llama_dict(architectures=["Qwen3ForCausalLM"], model_type="qwen3", head_dim=128, eos_token_id=[5, 7])
    )
    assert qwen3.qk_norm and not qwen3.qkv_bias and qwen3.head_dim == 128 and qwen3.q_size == 512
    assert qwen3.eos_token_ids == [5, 7]
    # no "architectures": the model_type is enough
    assert ModelConfig.from_hf_config(_llama_dict(architectures=None, model_type="mistral")).architecture == (
        "MistralForCausalLM"
    )


@pytest.mark.parametrize(
    "overrides, max_model_len",
    [
        ({"architectures": ["MistralForCausalLM"], "sliding_window": 4096, "max_position_embeddings": 32768}, 4096),
        ({"architectures": ["MistralForCausalLM"], "sliding_window": None, "max_position_embeddings": 32768}, 32768),
        ({"architectures": ["Qwen2ForCausalLM"], "sliding_window": 4096, "use_sliding_window": False}, 8192),
        ({"architectures": ["Qwen2ForCausalLM"], "sliding_window": 4096, "use_sliding_window": True,
          "max_window_layers": 0}, 4096),
        ({"architectures": ["Qwen2ForCausalLM"], "sliding_window": 4096, "use_sliding_window": True,
          "max_window_layers": 2}, 8192),  # every layer below max_window_layers attends fully
    ],
)
def test_sliding_window_caps_max_model_len(overrides, max_model_len):
    config = ModelConfig.from_hf_config(_llama_dict(**overrides))
    assert config.max_model_len == max_model_len
    assert (config.sliding_window is not None) == (max_model_len == 4096)


@pytest.mark.parametrize(
    "overrides, named",
    [
        ({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}, "GPT2LMHeadModel"),
        ({"architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe"}, "Qwen3MoeForCausalLM"),
        ({"num_local_experts": 8}, "mixture-of-experts"),
        ({"hidden_size": None}, "hidden_size"),
        ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "yarn"),
        ({"hidden_act": "gelu"}, "gelu"),
    ],
)
def test_unsupported_configs_say_why(overrides, named):
    with pytest.raises(UnsupportedModelError) as err:
        ModelConfig.from_hf_config(_llama_dict(**overrides))
    assert named in str(err.value)
    assert "Supported architectures: LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM" in str(
        err.value
    )
    assert isinstance(err.value, ValueError)


# --------------------------------------------------------------------------- loader errors
def _copy(folder, tmp_path):
    return shutil.copytree(folder, tmp_path / "copy")


def test_missing_folder_and_empty_folder(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_model(tmp_path / "nope", "cpu", torch.float32, progress=False)
    with pytest.raises(CheckpointError, match="no config.json"):
        load_model(tmp_path, "cpu", torch.float32, progress=False)


def test_unsupported_architecture_checkpoint(checkpoint, tmp_path):
    folder = _copy(checkpoint("llama")[0], tmp_path)
    config = json.loads((folder / "config.json").read_text())
    config.update(architectures=["GPT2LMHeadModel"], model_type="gpt2")
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedModelError, match="GPT2LMHeadModel"):
        CPUExecutor(folder, EngineConfig(kv_cache_tokens=16, progress=False))


def test_bin_only_checkpoint_is_refused_with_a_hint(checkpoint, tmp_path):
    folder = _copy(checkpoint("llama")[0], tmp_path)
    (folder / "model.safetensors").unlink()
    (folder / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"no safetensors weights.*\.bin"):
        load_model(folder, "cpu", torch.float32, progress=False)


def test_missing_tensor_is_named(checkpoint, tmp_path):
    folder = _copy(checkpoint("llama")[0], tmp_path)
    tensors = load_file(folder / "model.safetensors")
    del tensors["model.layers.1.mlp.down_proj.weight"]
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=re.escape("model.layers.1.mlp.down_proj.weight")):
        load_model(folder, "cpu", torch.float32, progress=False)


def test_shape_mismatch_is_named(checkpoint, tmp_path):
    folder = _copy(checkpoint("llama")[0], tmp_path)
    config = json.loads((folder / "config.json").read_text())
    config["intermediate_size"] = 96
    (folder / "config.json").write_text(json.dumps(config))
    expected = r"model\.layers\.0\.mlp\.gate_proj\.weight .*shape \[128, 64\].*\[96, 64\]"
    with pytest.raises(CheckpointError, match=expected):
        load_model(folder, "cpu", torch.float32, progress=False)


def test_absent_lm_head_falls_back_to_tied_embeddings(checkpoint, tmp_path, caplog):
    folder = _copy(checkpoint("llama")[0], tmp_path)  # untied config
    tensors = load_file(folder / "model.safetensors")
    del tensors["lm_head.weight"]
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    model, _ = load_model(folder, "cpu", torch.float32, progress=False)
    assert model.lm_head.weight is model.embed_tokens.weight
    assert "no lm_head.weight" in caplog.text


def test_index_naming_an_absent_shard(tmp_path):
    folder = make_hf_checkpoint(tmp_path / "sharded", "llama", max_shard_size="40KB")
    shard = sorted(folder.glob("model-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(CheckpointError, match=re.escape(shard.name)):
        load_model(folder, "cpu", torch.float32, progress=False)
