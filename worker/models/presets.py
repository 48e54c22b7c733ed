"""Built-in model presets: named Hugging Face configs that `make-checkpoint` turns into checkpoints.

Two kinds:

* small, CPU-fast models for tests and CPU runs (`demo`, `tiny-*`), stored in float32;
* real shapes for GPU benchmarks (`qwen3-0.6b`, `llama3-8b`, ...), whose shape numbers are those of the
  published configs (noted on each), stored in bfloat16.

Every preset is paired with a tokenizer family of worker.models.demo_tokenizer. The special-token ids in
config.json (bos/eos/pad) are that tokenizer's, not the published ones: the built-in tokenizer is small, and
ids must agree between config, generation_config and tokenizer. The real-shape presets therefore have a
model vocab larger than the tokenizer; the ids past it are never produced by encoding and decode to nothing,
like the unused ids at the end of real Qwen vocabularies.

The configs carry the rope settings both the way published checkpoints write them (`rope_theta`,
`rope_scaling`) and the way transformers 5 writes them (`rope_parameters`), and the dtype under both
`torch_dtype` and `dtype`, so readers of either generation load them unchanged.
"""

from __future__ import annotations

import copy
import dataclasses

from worker.models.demo_tokenizer import DEMO_VOCAB_SIZE, family


@dataclasses.dataclass(frozen=True)
class Preset:
    """A built-in model: its architecture config (without token ids) and its tokenizer family."""

    name: str
    description: str
    tokenizer_family: str  # "llama3" | "chatml" | "mistral"
    architecture: dict  # Hugging Face config keys that describe the network
    small: bool  # True: fast on CPU, used by tests

    def hf_config(self) -> dict:
        """The complete config.json contents, token ids included."""
        return build_hf_config(self)


_LLAMA3_ROPE = {
    # Llama 3.1's long-context RoPE scaling (published in Llama-3.1-8B's config.json).
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
    "rope_type": "llama3",
}


def _llama(**overrides) -> dict:
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "attention_bias": False,
        "attention_dropout": 0.0,
        "hidden_act": "silu",
        "initializer_range": 0.02,
        "mlp_bias": False,
        "pretraining_tp": 1,
        "rms_norm_eps": 1e-05,
        "rope_scaling": None,
        "tie_word_embeddings": False,
        "use_cache": True,
    }
    config.update(overrides)
    return config


def _qwen2(**overrides) -> dict:
    config = {
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        "attention_dropout": 0.0,
        "hidden_act": "silu",
        "initializer_range": 0.02,
        "rms_norm_eps": 1e-06,
        "rope_scaling": None,
        "rope_theta": 1000000.0,
        "use_cache": True,
        "use_sliding_window": False,
    }
    config.update(overrides)
    return config


def _qwen3(**overrides) -> dict:
    config = {
        "architectures": ["Qwen3ForCausalLM"],
        "model_type": "qwen3",
        "attention_bias": False,
        "attention_dropout": 0.0,
        "hidden_act": "silu",
        "initializer_range": 0.02,
        "rms_norm_eps": 1e-06,
        "rope_scaling": None,
        "rope_theta": 1000000.0,
        "sliding_window": None,
        "use_cache": True,
        "use_sliding_window": False,
    }
    config.update(overrides)
    return config


def _mistral(**overrides) -> dict:
    config = {
        "architectures": ["MistralForCausalLM"],
        "model_type": "mistral",
        "attention_dropout": 0.0,
        "hidden_act": "silu",
        "initializer_range": 0.02,
        "rms_norm_eps": 1e-05,
        "rope_scaling": None,
        "sliding_window": None,
        "tie_word_embeddings": False,
        "use_cache": True,
    }
    config.update(overrides)
    return config


_PRESET_LIST = [
    # ---------------------------------------------------------------- small, for CPU runs and tests
    Preset(
        "demo",
        "tiny Llama (4 layers, hidden 256) with a Llama-3 chat template; fast on CPU",
        "llama3",
        _llama(
            hidden_size=256,
            intermediate_size=768,
            num_hidden_layers=4,
            num_attention_heads=8,
            num_key_value_heads=4,
            head_dim=32,
            max_position_embeddings=4096,
            rope_theta=500000.0,
            vocab_size=DEMO_VOCAB_SIZE,
            torch_dtype="float32",
        ),
        small=True,
    ),
    Preset(
        "tiny-llama3",
        "2-layer Llama with Llama 3.1 RoPE scaling (original context 256, so all three frequency bands occur)",
        "llama3",
        _llama(
            hidden_size=128,
            intermediate_size=384,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=32,
            max_position_embeddings=4096,
            rope_theta=500000.0,
            rope_scaling={**_LLAMA3_ROPE, "original_max_position_embeddings": 256},
            vocab_size=DEMO_VOCAB_SIZE,
            torch_dtype="float32",
        ),
        small=True,
    ),
    Preset(
        "tiny-qwen2",
        "2-layer Qwen2 (QKV bias, tied embeddings) with ChatML",
        "chatml",
        _qwen2(
            hidden_size=128,
            intermediate_size=384,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=4096,
            max_window_layers=2,
            sliding_window=None,
            tie_word_embeddings=True,
            vocab_size=DEMO_VOCAB_SIZE,
            torch_dtype="float32",
        ),
        small=True,
    ),
    Preset(
        "tiny-qwen3",
        "2-layer Qwen3 (q/k RMSNorm, head_dim 64 != hidden/heads, tied embeddings) with ChatML",
        "chatml",
        _qwen3(
            hidden_size=128,
            intermediate_size=384,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=64,
            max_position_embeddings=4096,
            max_window_layers=2,
            tie_word_embeddings=True,
            vocab_size=DEMO_VOCAB_SIZE,
            torch_dtype="float32",
        ),
        small=True,
    ),
    Preset(
        "tiny-mistral",
        "2-layer Mistral with the [INST] chat format",
        "mistral",
        _mistral(
            hidden_size=128,
            intermediate_size=384,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=32,
            max_position_embeddings=4096,
            rope_theta=1000000.0,
            vocab_size=DEMO_VOCAB_SIZE,
            torch_dtype="float32",
        ),
        small=True,
    ),
    # ---------------------------------------------------------------- real shapes, for the GPU
    Preset(
        "qwen3-0.6b",
        "shape of Qwen/Qwen3-0.6B (0.6B params, tied embeddings)",
        "chatml",
        _qwen3(
            head_dim=128,
            hidden_size=1024,
            intermediate_size=3072,
            max_position_embeddings=40960,
            max_window_layers=28,
            num_attention_heads=16,
            num_hidden_layers=28,
            num_key_value_heads=8,
            rope_theta=1000000,
            tie_word_embeddings=True,
            vocab_size=151936,
            torch_dtype="bfloat16",
        ),
        small=False,
    ),
    Preset(
        "llama3-8b",
        "shape of meta-llama/Llama-3.1-8B (8.0B params, llama3 RoPE scaling)",
        "llama3",
        _llama(
            hidden_size=4096,
            intermediate_size=14336,
            max_position_embeddings=131072,
            num_attention_heads=32,
            num_hidden_layers=32,
            num_key_value_heads=8,
            rope_scaling=dict(_LLAMA3_ROPE),
            rope_theta=500000.0,
            vocab_size=128256,
            torch_dtype="bfloat16",
        ),
        small=False,
    ),
    Preset(
        "qwen2.5-7b",
        "shape of Qwen/Qwen2.5-7B-Instruct (7.6B params, QKV bias)",
        "chatml",
        _qwen2(
            hidden_size=3584,
            intermediate_size=18944,
            max_position_embeddings=32768,
            max_window_layers=28,
            num_attention_heads=28,
            num_hidden_layers=28,
            num_key_value_heads=4,
            sliding_window=131072,
            tie_word_embeddings=False,
            vocab_size=152064,
            torch_dtype="bfloat16",
        ),
        small=False,
    ),
    Preset(
        "qwen2.5-0.5b",
        "shape of Qwen/Qwen2.5-0.5B-Instruct (0.49B params, QKV bias, tied embeddings)",
        "chatml",
        _qwen2(
            hidden_size=896,
            intermediate_size=4864,
            max_position_embeddings=32768,
            max_window_layers=21,
            num_attention_heads=14,
            num_hidden_layers=24,
            num_key_value_heads=2,
            sliding_window=32768,
            tie_word_embeddings=True,
            vocab_size=151936,
            torch_dtype="bfloat16",
        ),
        small=False,
    ),
    Preset(
        "mistral-7b",
        "shape of mistralai/Mistral-7B-Instruct-v0.3 (7.2B params)",
        "mistral",
        _mistral(
            hidden_size=4096,
            intermediate_size=14336,
            max_position_embeddings=32768,
            num_attention_heads=32,
            num_hidden_layers=32,
            num_key_value_heads=8,
            rope_theta=1000000.0,
            vocab_size=32768,
            torch_dtype="bfloat16",
        ),
        small=False,
    ),
]

PRESETS: dict[str, Preset] = {preset.name: preset for preset in _PRESET_LIST}


def preset_names() -> list[str]:
    """Names of all built-in models, small ones first."""
    return [preset.name for preset in _PRESET_LIST]


def is_preset(name: str) -> bool:
    return name in PRESETS


def get_preset(name: str) -> Preset:
    """The preset called `name`, or a ValueError that lists the built-in names."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown built-in model {name!r}; built-ins: {', '.join(preset_names())}") from None


def _rope_parameters(architecture: dict) -> dict:
    """transformers-5 form of the rope settings: rope_scaling (or default) plus rope_theta."""
    scaling = architecture.get("rope_scaling")
    parameters = dict(scaling) if scaling else {"rope_type": "default"}
    parameters["rope_theta"] = architecture["rope_theta"]
    return parameters


def build_hf_config(preset: Preset) -> dict:
    """config.json for a preset: its architecture, the token ids of its tokenizer family, rope and dtype
    in both the published and the transformers-5 spelling."""
    fam = family(preset.tokenizer_family)
    config = copy.deepcopy(preset.architecture)
    config["dtype"] = config["torch_dtype"]
    config["rope_parameters"] = _rope_parameters(config)
    config["bos_token_id"] = _config_bos_id(preset)
    # As published: Llama-3.1 lists every stop id in config.json, Qwen and Mistral only the turn end.
    eos_ids = [fam.token_id(token) for token in fam.generation_eos_tokens]
    config["eos_token_id"] = eos_ids if preset.tokenizer_family == "llama3" else fam.token_id(fam.eos_token)
    return dict(sorted(config.items()))


def _config_bos_id(preset: Preset) -> int:
    """bos_token_id as each family publishes it: the BOS token, or for Qwen (which adds no BOS) the id of
    <|endoftext|>."""
    fam = family(preset.tokenizer_family)
    return fam.token_id(fam.bos_token if fam.bos_token is not None else fam.pad_token)


def generation_config(preset: Preset) -> dict:
    """generation_config.json: every token id that ends generation, plus bos/pad ids."""
    fam = family(preset.tokenizer_family)
    config = {
        "bos_token_id": _config_bos_id(preset),
        "eos_token_id": [fam.token_id(token) for token in fam.generation_eos_tokens],
    }
    if fam.pad_token is not None:
        config["pad_token_id"] = fam.token_id(fam.pad_token)
    return config
