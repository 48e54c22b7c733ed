"""Write a built-in preset as a complete Hugging Face checkpoint folder with random weights.

The folder holds config.json, generation_config.json, tokenizer.json, tokenizer_config.json,
special_tokens_map.json and the weights, as one model.safetensors or as shards with
model.safetensors.index.json. Weights are generated tensor by tensor from (seed, tensor name), so the
output is byte-identical for a given seed, dtype and device, and memory stays bounded by one shard plus
one tensor (llama3-8b is 16 GB in bfloat16; it is never held whole).

The folder is written into a temporary sibling and renamed into place at the end, so another process
looking at (or materialising) the same path never sees half a checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file
from tqdm import tqdm

from worker.models.chat_templates import template_for
from worker.models.demo_tokenizer import DEMO_VOCAB_SIZE, family, tokenizer_json
from worker.models.presets import Preset, generation_config, get_preset

DEFAULT_MAX_SHARD_BYTES = 4 * 1024**3

# --- initialisation scales -----------------------------------------------------------------------------
# The weights are random, but the network should still behave like a language model in the ways the engine
# tests depend on: the next token must depend on the whole context (so a wrong cache hit, position or mask
# changes the output), and greedy argmax must not be decided by near-ties (so float32 rounding differences
# between our kernels and transformers do not flip a token).
#
# * Every RMSNorm weight is 1. Linear weights ~ N(0, 1/fan_in) (for the real shapes, d = 1024..4096, this is
#   close to HF's N(0, 0.02)): each sublayer then adds O(1) to the residual stream and attention scores are
#   ~N(0, 1), neither uniform nor one-hot, so every layer and every position matter.
# * Biases ~ N(0, BIAS_STD): big enough that a missing QKV bias changes the output.
# * Untied embeddings ~ N(0, EMBED_STD), the same size as a layer's contribution: the current token counts
#   but does not drown the context.
# * The final RMSNorm makes the hidden state RMS 1, so lm_head rows ~ N(0, LOGIT_STD / sqrt(hidden)) give
#   logits ~ N(0, LOGIT_STD). The expected gap between the two largest of ~3000 such logits is about
#   LOGIT_STD / 4 ~ 0.75, some 1e5 times float32 rounding, and softmax has a clear favourite for sampling
#   tests. Tied models use a smaller TIED_LOGIT_STD: there the embedding is the lm_head, so the current
#   token's own logit gets a boost of ~std**2 * hidden / RMS(residual), and when that beats the largest of the
#   other logits the model repeats its last token forever (with 3.0 the tiny Qwen presets did at once; with
#   2.0 they still fall into runs of one token, but leave them).
BIAS_STD = 0.3
EMBED_STD = 1.0
LOGIT_STD = 3.0
TIED_LOGIT_STD = 2.0

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def parameter_shapes(config: dict) -> list[tuple[str, tuple[int, ...]]]:
    """Hugging Face parameter names and shapes of a Llama-family config, in model order."""
    hidden = config["hidden_size"]
    heads = config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads") or heads
    head_dim = config.get("head_dim") or hidden // heads
    inter = config["intermediate_size"]
    vocab = config["vocab_size"]
    model_type = config["model_type"]
    qkv_bias = model_type == "qwen2" or bool(config.get("attention_bias"))
    o_bias = model_type != "qwen2" and bool(config.get("attention_bias"))
    mlp_bias = bool(config.get("mlp_bias"))
    qk_norm = model_type == "qwen3"

    shapes: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (vocab, hidden))]
    for layer in range(config["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        shapes.append((p + "input_layernorm.weight", (hidden,)))
        for proj, out_features in (("q_proj", heads * head_dim), ("k_proj", kv_heads * head_dim),
                                   ("v_proj", kv_heads * head_dim)):
            shapes.append((p + f"self_attn.{proj}.weight", (out_features, hidden)))
            if qkv_bias:
                shapes.append((p + f"self_attn.{proj}.bias", (out_features,)))
        if qk_norm:
            shapes.append((p + "self_attn.q_norm.weight", (head_dim,)))
            shapes.append((p + "self_attn.k_norm.weight", (head_dim,)))
        shapes.append((p + "self_attn.o_proj.weight", (hidden, heads * head_dim)))
        if o_bias:
            shapes.append((p + "self_attn.o_proj.bias", (hidden,)))
        shapes.append((p + "post_attention_layernorm.weight", (hidden,)))
        for proj, shape in (("gate_proj", (inter, hidden)), ("up_proj", (inter, hidden)),
                            ("down_proj", (hidden, inter))):
            shapes.append((p + f"mlp.{proj}.weight", shape))
            if mlp_bias:
                shapes.append((p + f"mlp.{proj}.bias", (shape[0],)))
    shapes.append(("model.norm.weight", (hidden,)))
    if not config.get("tie_word_embeddings", False):
        shapes.append(("lm_head.weight", (vocab, hidden)))
    return shapes


def count_parameters(config: dict) -> int:
    """Number of parameters (tied embeddings counted once, as `model.num_parameters()` does)."""
    return sum(math.prod(shape) for _, shape in parameter_shapes(config))


def resolve_dtype(dtype: str | torch.dtype | None, default: str) -> str:
    """Normalise a dtype given as a name or torch dtype to one of float32 / float16 / bfloat16."""
    if dtype is None:
        dtype = default
    if isinstance(dtype, torch.dtype):
        for name, value in _DTYPES.items():
            if value == dtype:
                return name
        raise ValueError(f"unsupported dtype {dtype}; use one of {', '.join(_DTYPES)}")
    aliases = {"fp32": "float32", "fp16": "float16", "half": "float16", "bf16": "bfloat16"}
    name = aliases.get(str(dtype).lower(), str(dtype).lower())
    if name not in _DTYPES:
        raise ValueError(f"unsupported dtype {dtype!r}; use one of {', '.join(_DTYPES)}")
    return name


def _tensor_seed(seed: int, name: str) -> int:
    """A per-tensor seed: the same tensor gets the same values whatever else the model contains."""
    digest = hashlib.sha256(f"radixfleet/{seed}/{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def _init_std(name: str, shape: tuple[int, ...], config: dict) -> float | None:
    """Standard deviation of a tensor's normal init; None for norm weights (all ones)."""
    if name.endswith("norm.weight"):
        return None
    if name == "model.embed_tokens.weight" and config.get("tie_word_embeddings"):
        return TIED_LOGIT_STD / math.sqrt(config["hidden_size"])
    if name == "lm_head.weight":
        return LOGIT_STD / math.sqrt(config["hidden_size"])
    if name == "model.embed_tokens.weight":
        return EMBED_STD
    if name.endswith(".bias"):
        return BIAS_STD
    fan_in = shape[1]
    return 1.0 / math.sqrt(fan_in)


def generate_tensor(name: str, shape: tuple[int, ...], config: dict, seed: int, dtype: torch.dtype,
                    device: str = "cpu", tokenizer_size: int | None = None) -> torch.Tensor:
    """One parameter tensor, deterministic in (seed, name, shape, dtype, device); returned on the CPU.

    With `tokenizer_size` smaller than the model vocab (the real-shape presets), the embedding and lm_head
    rows of the ids past the tokenizer are zero: their logit is then always 0, below the largest of the
    tokenizer's ~N(0, LOGIT_STD) logits, so greedy decoding never picks an id that decodes to nothing
    (sampling rarely does), and benchmark output stays readable text.
    """
    std = _init_std(name, shape, config)
    if std is None:
        return torch.ones(shape, dtype=dtype)
    generator = torch.Generator(device=device)
    generator.manual_seed(_tensor_seed(seed, name))
    values = torch.empty(shape, dtype=torch.float32, device=device)
    values.normal_(0.0, std, generator=generator)
    if tokenizer_size is not None and name in ("model.embed_tokens.weight", "lm_head.weight"):
        values[tokenizer_size:] = 0.0
    return values.to(dtype).cpu().contiguous()


def plan_shards(shapes: list[tuple[str, tuple[int, ...]]], bytes_per_element: int,
                max_shard_bytes: int) -> list[list[str]]:
    """Split tensors, in order, into shards of at most `max_shard_bytes` (a larger tensor gets its own)."""
    if max_shard_bytes <= 0:
        raise ValueError(f"max_shard_bytes must be positive, got {max_shard_bytes}")
    shards: list[list[str]] = [[]]
    current = 0
    for name, shape in shapes:
        size = math.prod(shape) * bytes_per_element
        if shards[-1] and current + size > max_shard_bytes:
            shards.append([])
            current = 0
        shards[-1].append(name)
        current += size
    return shards


def tokenizer_files(preset: Preset) -> dict[str, str]:
    """tokenizer.json, tokenizer_config.json and special_tokens_map.json of a preset, as text."""
    fam = family(preset.tokenizer_family)
    added_tokens_decoder = {
        str(fam.token_id(token.content)): {
            "content": token.content,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": token.special,
        }
        for token in fam.tokens
    }
    named = {"bos_token": fam.bos_token, "eos_token": fam.eos_token, "pad_token": fam.pad_token,
             "unk_token": fam.unk_token}
    tokenizer_config = {
        "add_bos_token": fam.add_bos_token,
        "add_eos_token": False,
        "added_tokens_decoder": added_tokens_decoder,
        **named,
        "chat_template": template_for(preset.tokenizer_family),
        "clean_up_tokenization_spaces": False,
        "model_input_names": ["input_ids", "attention_mask"],
        "model_max_length": preset.architecture["max_position_embeddings"],
        # The generic class loads tokenizer.json exactly as written (model-specific classes may rebuild
        # their own pre-tokenizer).
        "tokenizer_class": "PreTrainedTokenizerFast",
    }
    special_tokens_map = {key: value for key, value in named.items() if value is not None}
    return {
        "tokenizer.json": tokenizer_json(preset.tokenizer_family),
        "tokenizer_config.json": _json_text(tokenizer_config),
        "special_tokens_map.json": _json_text(special_tokens_map),
    }


def _json_text(data: dict) -> str:
    return json.dumps(data, indent=2, ensure_ascii=False) + "\n"


def write_checkpoint(preset_name: str, out_dir: str | os.PathLike, seed: int = 0, dtype: str | None = None,
                     max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, device: str = "cpu",
                     progress: bool = True, overwrite: bool = False) -> Path:
    """Write preset `preset_name` with seed `seed` as a Hugging Face folder at `out_dir`; returns its path.

    dtype: "float32" | "float16" | "bfloat16" (default: the preset's own). device: where random numbers are
    drawn ("cuda" is much faster for the real shapes; values then differ from "cpu" ones, each being
    deterministic). An existing non-empty `out_dir` raises FileExistsError unless `overwrite`.
    """
    preset = get_preset(preset_name)
    out_dir = Path(out_dir)
    config = preset.hf_config()
    dtype_name = resolve_dtype(dtype, config["torch_dtype"])
    config["torch_dtype"] = config["dtype"] = dtype_name
    torch_dtype = _DTYPES[dtype_name]
    if _is_nonempty_dir(out_dir) and not overwrite:
        raise FileExistsError(f"{out_dir} already exists and is not empty; remove it or choose another folder")

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    temp_dir = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.partial-", dir=out_dir.parent))
    temp_dir.chmod(0o755)  # mkdtemp makes it private; the checkpoint should read like any other folder
    try:
        _write_metadata(preset, config, temp_dir)
        _write_weights(preset, config, temp_dir, seed, torch_dtype, max_shard_bytes, device, progress)
        _move_into_place(temp_dir, out_dir, overwrite)
    finally:
        if temp_dir.exists():
            shutil.rmtree(temp_dir, ignore_errors=True)
    return out_dir


def write_config_and_tokenizer(preset_name: str, out_dir: str | os.PathLike) -> Path:
    """Write only the config, generation config and tokenizer files of a preset (no weights): what the
    sim executor needs. Atomic like `write_checkpoint`; an existing non-empty `out_dir` raises FileExistsError."""
    preset = get_preset(preset_name)
    out_dir = Path(out_dir)
    if _is_nonempty_dir(out_dir):
        raise FileExistsError(f"{out_dir} already exists and is not empty; remove it or choose another folder")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    temp_dir = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.partial-", dir=out_dir.parent))
    temp_dir.chmod(0o755)
    try:
        _write_metadata(preset, preset.hf_config(), temp_dir)
        _move_into_place(temp_dir, out_dir, overwrite=False)
    finally:
        if temp_dir.exists():
            shutil.rmtree(temp_dir, ignore_errors=True)
    return out_dir


def _is_nonempty_dir(path: Path) -> bool:
    return path.is_dir() and any(path.iterdir())


def _write_metadata(preset: Preset, config: dict, folder: Path) -> None:
    (folder / "config.json").write_text(_json_text(config))
    (folder / "generation_config.json").write_text(_json_text(generation_config(preset)))
    for filename, text in tokenizer_files(preset).items():
        (folder / filename).write_text(text, encoding="utf-8")


def _write_weights(preset: Preset, config: dict, folder: Path, seed: int, dtype: torch.dtype,
                   max_shard_bytes: int, device: str, progress: bool) -> None:
    shapes = parameter_shapes(config)
    shape_of = dict(shapes)
    element_bytes = torch.empty((), dtype=dtype).element_size()
    shards = plan_shards(shapes, element_bytes, max_shard_bytes)
    total_bytes = sum(math.prod(shape) for _, shape in shapes) * element_bytes
    names = (["model.safetensors"] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    weight_map = {}
    with tqdm(total=total_bytes, unit="B", unit_scale=True, unit_divisor=1024, disable=not progress,
              desc=f"writing {preset.name}") as bar:
        for filename, tensor_names in zip(names, shards):
            tensors = {}
            for name in tensor_names:
                tensors[name] = generate_tensor(name, shape_of[name], config, seed, dtype, device,
                                                tokenizer_size=DEMO_VOCAB_SIZE)
                weight_map[name] = filename
                bar.update(tensors[name].numel() * element_bytes)
            save_file(tensors, str(folder / filename), metadata={"format": "pt"})
            (folder / filename).chmod(0o644)  # safetensors creates files private to their owner
            del tensors  # one shard in memory at a time
    if len(shards) > 1:
        index = {"metadata": {"total_size": total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
        (folder / "model.safetensors.index.json").write_text(_json_text(index))


def _move_into_place(temp_dir: Path, out_dir: Path, overwrite: bool) -> None:
    """Rename the finished folder to its final name (atomic on one filesystem)."""
    if out_dir.is_dir() and not any(out_dir.iterdir()):
        out_dir.rmdir()  # an empty placeholder folder is replaced
    if out_dir.exists() and overwrite:
        old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
        os.rename(out_dir, old / "checkpoint")
        os.rename(temp_dir, out_dir)
        shutil.rmtree(old, ignore_errors=True)
        return
    try:
        os.rename(temp_dir, out_dir)
    except OSError as error:
        # Another process finished the same folder first.
        raise FileExistsError(f"{out_dir} appeared while it was being written: {error}") from error
