"""The model shape, read from a Hugging Face `config.json`.

`ModelConfig` is the one place that knows how the supported architectures spell their settings:
Llama 2/3 (with llama3 RoPE scaling), Mistral, Qwen2/2.5 (QKV bias) and Qwen3 (per-head q/k RMSNorm,
`head_dim` independent of hidden/heads). It accepts both the transformers 4.x spelling of RoPE settings
(`rope_theta` + `rope_scaling`) and the 5.x one (`rope_parameters`). Anything else is refused up front
with an `UnsupportedModelError` that says what is wrong, so no half-understood checkpoint is ever run.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

#: architecture name (config.json "architectures") -> model_type (config.json "model_type")
SUPPORTED_ARCHITECTURES: dict[str, str] = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
}
_ARCHITECTURE_BY_MODEL_TYPE = {v: k for k, v in SUPPORTED_ARCHITECTURES.items()}

#: RoPE variants the reference ops implement (kernels.torch_ref.rope_inv_freq)
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")
_LLAMA3_ROPE_FIELDS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")

_REQUIRED_FIELDS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
)

# Keys that mark a mixture-of-experts model; we only run dense MLPs.
_MOE_KEYS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_intermediate_size")


class CheckpointError(ValueError):
    """The folder is not a checkpoint we can load (missing files, tensors, or wrong shapes)."""


class UnsupportedModelError(CheckpointError):
    """The checkpoint's config describes a model this engine does not implement."""


def _supported_list() -> str:
    return ", ".join(SUPPORTED_ARCHITECTURES)


def _unsupported(reason: str) -> UnsupportedModelError:
    return UnsupportedModelError(f"{reason}. Supported architectures: {_supported_list()}.")


_DTYPES = {
    "float32": torch.float32,
    "float": torch.float32,
    "float16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
}


def parse_dtype(value: Any) -> torch.dtype | None:
    """'bfloat16' / 'torch.bfloat16' / torch.bfloat16 -> torch.bfloat16; None stays None."""
    if value is None or isinstance(value, torch.dtype):
        return value
    name = str(value).removeprefix("torch.")
    if name not in _DTYPES:
        raise _unsupported(f"unsupported dtype {value!r} (expected one of {', '.join(sorted(_DTYPES))})")
    return _DTYPES[name]


@dataclass
class ModelConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict | None  # None, or {"rope_type": "linear"|"llama3", ...}
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool
    qk_norm: bool
    sliding_window: int | None = None  # set only when the checkpoint really uses a window
    torch_dtype: torch.dtype | None = None  # the dtype the weights were saved in
    bos_token_id: int | None = None
    eos_token_ids: list[int] = field(default_factory=list)

    # ------------------------------------------------------------------ derived sizes
    @property
    def model_type(self) -> str:
        return SUPPORTED_ARCHITECTURES[self.architecture]

    @property
    def q_size(self) -> int:
        return self.num_attention_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_key_value_heads * self.head_dim

    @property
    def max_model_len(self) -> int:
        """Longest sequence (prompt + output) we can run with exact results.

        Sliding-window attention is not implemented: we always attend to the whole context. That is
        exactly what a windowed model computes as long as the sequence fits in the window, so when the
        checkpoint uses a window we cap the usable length at it instead of silently diverging beyond.
        """
        if self.sliding_window is not None:
            return min(self.max_position_embeddings, self.sliding_window)
        return self.max_position_embeddings

    # ------------------------------------------------------------------ parsing
    @classmethod
    def from_folder(cls, folder: str | Path) -> "ModelConfig":
        """Read `<folder>/config.json`; raise CheckpointError when the folder or file is missing."""
        folder = Path(folder)
        if not folder.is_dir():
            raise CheckpointError(f"model folder {str(folder)!r} does not exist (or is not a directory)")
        path = folder / "config.json"
        if not path.is_file():
            raise CheckpointError(
                f"{str(folder)!r} has no config.json: expected a Hugging Face checkpoint folder "
                "(config.json + *.safetensors + tokenizer files)"
            )
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise CheckpointError(f"{path} is not valid JSON: {exc}") from exc
        if not isinstance(data, dict):
            raise CheckpointError(f"{path} must hold a JSON object, got {type(data).__name__}")
        return cls.from_hf_config(data)

    @classmethod
    def from_hf_config(cls, d: dict) -> "ModelConfig":
        """Parse a config.json dict (transformers 4.x or 5.x spelling)."""
        architecture = _architecture(d)
        if any(d.get(key) for key in _MOE_KEYS):
            raise _unsupported(f"{architecture} config describes a mixture-of-experts model (MoE is not supported)")
        if d.get("quantization_config"):
            method = d["quantization_config"].get("quant_method", "unknown")
            raise _unsupported(f"quantized checkpoints are not supported (quantization_config: {method})")
        missing = [k for k in _REQUIRED_FIELDS if d.get(k) is None]
        if missing:
            raise _unsupported(f"config.json of {architecture} lacks required field(s): {', '.join(missing)}")
        act = d.get("hidden_act", "silu")
        if act != "silu":
            raise _unsupported(f"hidden_act {act!r} is not supported (only 'silu')")
        if d.get("mlp_bias"):
            raise _unsupported("mlp_bias=true is not supported")

        hidden = int(d["hidden_size"])
        heads = int(d["num_attention_heads"])
        kv_heads = int(d.get("num_key_value_heads") or heads)
        if heads % kv_heads:
            raise _unsupported(f"num_attention_heads={heads} is not a multiple of num_key_value_heads={kv_heads}")
        head_dim = d.get("head_dim") or hidden // heads
        rope_theta, rope_scaling = _rope_settings(d)
        model_type = SUPPORTED_ARCHITECTURES[architecture]
        eos = d.get("eos_token_id")
        eos_ids = [] if eos is None else [int(e) for e in (eos if isinstance(eos, list) else [eos])]

        return cls(
            architecture=architecture,
            vocab_size=int(d["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(d["intermediate_size"]),
            num_hidden_layers=int(d["num_hidden_layers"]),
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
            head_dim=int(head_dim),
            rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            max_position_embeddings=int(d.get("max_position_embeddings") or 2048),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            # Qwen2 always has q/k/v biases (its config has no attention_bias key); others opt in.
            qkv_bias=True if model_type == "qwen2" else bool(d.get("attention_bias", False)),
            qk_norm=model_type == "qwen3",
            sliding_window=_used_sliding_window(d, model_type),
            torch_dtype=parse_dtype(d.get("dtype") or d.get("torch_dtype")),
            bos_token_id=d.get("bos_token_id"),
            eos_token_ids=eos_ids,
        )


def _architecture(d: dict) -> str:
    """The supported architecture this config names, from "architectures" or else "model_type"."""
    archs = d.get("architectures") or []
    if isinstance(archs, str):
        archs = [archs]
    for arch in archs:
        if arch in SUPPORTED_ARCHITECTURES:
            return arch
    if archs:
        raise _unsupported(f"architecture {', '.join(map(str, archs))} is not supported")
    model_type = d.get("model_type")
    if model_type in _ARCHITECTURE_BY_MODEL_TYPE:
        return _ARCHITECTURE_BY_MODEL_TYPE[model_type]
    if model_type is None:
        raise _unsupported("config.json names no 'architectures' and no 'model_type'")
    raise _unsupported(f"model_type {model_type!r} is not supported")


def _rope_settings(d: dict) -> tuple[float, dict | None]:
    """(rope_theta, rope_scaling) from either `rope_parameters` (5.x) or `rope_theta`/`rope_scaling` (4.x)."""
    params = d.get("rope_parameters")
    if params:
        if not isinstance(params, dict) or ("rope_type" not in params and "rope_theta" not in params):
            # 5.x also allows one dict per layer type (e.g. sliding/full): not a shape we run.
            raise _unsupported(f"rope_parameters {params!r} are not supported (expected one rope_type dict)")
        theta = params.get("rope_theta", d.get("rope_theta", 10000.0))
        scaling = {k: v for k, v in params.items() if k != "rope_theta"}
    else:
        theta = d.get("rope_theta", 10000.0)
        scaling = dict(d["rope_scaling"]) if d.get("rope_scaling") else {}

    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind not in SUPPORTED_ROPE_TYPES:
        raise _unsupported(f"rope type {kind!r} is not supported (supported: {', '.join(SUPPORTED_ROPE_TYPES)})")
    partial = float(d.get("partial_rotary_factor", scaling.get("partial_rotary_factor", 1.0)) or 1.0)
    if partial != 1.0:
        raise _unsupported(f"partial_rotary_factor={partial} is not supported (only 1.0)")
    if kind == "default":
        return float(theta), None
    need = ("factor",) if kind == "linear" else _LLAMA3_ROPE_FIELDS
    missing = [k for k in need if scaling.get(k) is None]
    if missing:
        raise _unsupported(f"rope type {kind!r} lacks field(s): {', '.join(missing)}")
    normalized = {"rope_type": kind, **{k: scaling[k] for k in need}}
    return float(theta), normalized


def _used_sliding_window(d: dict, model_type: str) -> int | None:
    """The attention window the checkpoint really applies, or None when every layer attends fully."""
    window = d.get("sliding_window")
    if not window:
        return None
    if model_type in ("qwen2", "qwen3"):
        # Qwen only windows when use_sliding_window is on, and then only some layers.
        if not d.get("use_sliding_window", False):
            return None
        layer_types = d.get("layer_types")
        if layer_types is not None:
            if "sliding_attention" not in layer_types:
                return None
        elif int(d.get("max_window_layers", 0)) >= int(d["num_hidden_layers"]):
            return None
    elif model_type == "llama":
        return None
    max_pos = int(d.get("max_position_embeddings") or 0)
    if max_pos and int(window) >= max_pos:
        return None  # the window never binds
    return int(window)
