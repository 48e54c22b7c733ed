"""Load a local Hugging Face checkpoint folder into `LlamaForCausalLM`.

Reads `model.safetensors`, or the shards named by `model.safetensors.index.json`, with the
`safetensors` library, and copies each Hugging Face tensor into our (possibly fused) parameter:
q/k/v projections become row blocks of `qkv_proj`, gate/up become row blocks of `gate_up_proj`.
Everything is checked before it is used: a missing folder, config.json, weight file or tensor, or a
tensor whose shape disagrees with config.json, is reported with its name and what to do.
"""

from __future__ import annotations

import contextlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import torch
from safetensors import SafetensorError, safe_open
from tqdm.auto import tqdm

import kernels.torch_ref as torch_ref
from worker.models.config import CheckpointError, ModelConfig, parse_dtype
from worker.models.llama import LlamaForCausalLM

logger = logging.getLogger(__name__)

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"

# Checkpoint tensors that carry nothing we need (old Llama exports saved the RoPE frequencies).
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


@dataclass(frozen=True)
class WeightTarget:
    """Where one checkpoint tensor goes: rows [start, start + rows) of our parameter `param`."""

    param: str
    start: int = 0
    rows: int | None = None  # None: the whole parameter


def checkpoint_layout(config: ModelConfig) -> dict[str, WeightTarget]:
    """Hugging Face tensor name -> where it lands in LlamaForCausalLM, for every tensor we need."""
    q, kv, inter = config.q_size, config.kv_size, config.intermediate_size
    layout = {
        "model.embed_tokens.weight": WeightTarget("embed_tokens.weight"),
        "model.norm.weight": WeightTarget("norm.weight"),
        "lm_head.weight": WeightTarget("lm_head.weight"),
    }
    for i in range(config.num_hidden_layers):
        hf, ours = f"model.layers.{i}.", f"layers.{i}."
        qkv_kinds = ("weight", "bias") if config.qkv_bias else ("weight",)
        for kind in qkv_kinds:
            fused = f"{ours}self_attn.qkv_proj.{kind}"
            layout[f"{hf}self_attn.q_proj.{kind}"] = WeightTarget(fused, 0, q)
            layout[f"{hf}self_attn.k_proj.{kind}"] = WeightTarget(fused, q, kv)
            layout[f"{hf}self_attn.v_proj.{kind}"] = WeightTarget(fused, q + kv, kv)
        layout[f"{hf}self_attn.o_proj.weight"] = WeightTarget(f"{ours}self_attn.o_proj.weight")
        if config.qk_norm:
            layout[f"{hf}self_attn.q_norm.weight"] = WeightTarget(f"{ours}self_attn.q_norm.weight")
            layout[f"{hf}self_attn.k_norm.weight"] = WeightTarget(f"{ours}self_attn.k_norm.weight")
        layout[f"{hf}mlp.gate_proj.weight"] = WeightTarget(f"{ours}mlp.gate_up_proj.weight", 0, inter)
        layout[f"{hf}mlp.up_proj.weight"] = WeightTarget(f"{ours}mlp.gate_up_proj.weight", inter, inter)
        layout[f"{hf}mlp.down_proj.weight"] = WeightTarget(f"{ours}mlp.down_proj.weight")
        for norm in ("input_layernorm", "post_attention_layernorm"):
            layout[f"{hf}{norm}.weight"] = WeightTarget(f"{ours}{norm}.weight")
    return layout


def find_tensor_files(folder: str | Path) -> dict[str, Path]:
    """Tensor name -> the safetensors file holding it (from the index, or from the files' headers)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"model folder {str(folder)!r} does not exist (or is not a directory)")
    index_path = folder / INDEX_FILE
    if index_path.is_file():
        try:
            weight_map = json.loads(index_path.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise CheckpointError(f"{index_path} is not a valid safetensors index (needs 'weight_map')") from exc
        shards = {name: folder / file for name, file in weight_map.items()}
        absent = sorted({p.name for p in shards.values() if not p.is_file()})
        if absent:
            raise CheckpointError(f"{index_path.name} names shard file(s) missing from {folder}: {', '.join(absent)}")
        return shards

    files = [folder / SINGLE_FILE] if (folder / SINGLE_FILE).is_file() else sorted(folder.glob("*.safetensors"))
    if not files:
        has_bin = any(folder.glob("*.bin")) or any(folder.glob("*.pt")) or any(folder.glob("*.pth"))
        hint = (
            " It holds PyTorch .bin/.pt weights, which are not supported: convert them to safetensors "
            "(e.g. load with transformers and save_pretrained(..., safe_serialization=True))."
            if has_bin
            else ""
        )
        raise CheckpointError(
            f"no safetensors weights in {folder} (expected {SINGLE_FILE} or {INDEX_FILE} with shards).{hint}"
        )
    locations: dict[str, Path] = {}
    for path in files:
        with _open_safetensors(path) as f:
            for name in f.keys():
                locations[name] = path
    return locations


@contextlib.contextmanager
def _open_safetensors(path: Path, device: str = "cpu"):
    """safe_open, with a corrupt or truncated file reported by name (the library's message names none)."""
    try:
        with safe_open(str(path), framework="pt", device=device) as f:
            yield f
    except (SafetensorError, OSError) as error:
        raise CheckpointError(
            f"{path} is not a readable safetensors file ({error}); it may be truncated or corrupt: "
            "download or copy it again"
        ) from error


def _check_model_dtype_device(model: LlamaForCausalLM, device: torch.device, dtype: torch.dtype) -> None:
    param = model.embed_tokens.weight
    if param.dtype != dtype or param.device.type != device.type:
        raise ValueError(
            f"model parameters are {param.dtype} on {param.device}, but loading was asked for {dtype} on "
            f"{device}: build LlamaForCausalLM(config, dtype=..., device=...) with the same values"
        )


def load_weights(
    model: LlamaForCausalLM,
    folder: str | Path,
    device: torch.device | str,
    dtype: torch.dtype | str,
    progress: bool = True,
) -> None:
    """Fill `model` (built with the same `device` and `dtype`) from the checkpoint in `folder`.

    Tensors are read straight onto `device` and cast to `dtype`. lm_head is tied to the input
    embeddings when config.json says so, or when the checkpoint has no lm_head.weight.
    """
    folder, device, dtype = Path(folder), torch.device(device), parse_dtype(dtype)
    _check_model_dtype_device(model, device, dtype)
    locations = find_tensor_files(folder)
    layout = checkpoint_layout(model.config)

    if model.config.tie_word_embeddings or "lm_head.weight" not in locations:
        if not model.config.tie_word_embeddings:
            logger.warning("%s has no lm_head.weight: tying the LM head to the input embeddings", folder)
        layout.pop("lm_head.weight")
        model.tie_embeddings()

    missing = [name for name in layout if name not in locations]
    if missing:
        shown = ", ".join(missing[:5]) + (f" (and {len(missing) - 5} more)" if len(missing) > 5 else "")
        raise CheckpointError(
            f"checkpoint in {folder} lacks tensor(s) required by its config.json: {shown}. "
            "The weights may be incomplete or belong to a different model."
        )
    unexpected = [
        name for name in locations
        if name not in layout and name != "lm_head.weight" and not name.endswith(_IGNORED_SUFFIXES)
    ]
    if unexpected:
        logger.warning(
            "ignoring %d checkpoint tensor(s) the model does not use, e.g. %s", len(unexpected), unexpected[:3]
        )

    params = dict(model.named_parameters())
    by_file: dict[Path, list[str]] = {}
    for name in layout:
        by_file.setdefault(locations[name], []).append(name)

    read_device = "cpu" if device.type == "cpu" else str(device)
    with tqdm(total=len(layout), desc="Loading weights", unit="tensor", disable=not progress) as bar:
        for path, names in by_file.items():
            bar.set_postfix_str(path.name)
            with _open_safetensors(path, read_device) as f:
                for name in names:
                    _copy_tensor(f, name, path, layout[name], params)
                    bar.update()


def _copy_tensor(f, name: str, path: Path, target: WeightTarget, params: dict[str, torch.nn.Parameter]) -> None:
    """Copy checkpoint tensor `name` into its (slice of a) parameter, after checking its shape."""
    param = params[target.param].data
    dest = param if target.rows is None else param.narrow(0, target.start, target.rows)
    shape = tuple(f.get_slice(name).get_shape())
    if shape != tuple(dest.shape):
        raise CheckpointError(
            f"tensor {name} in {path.name} has shape {list(shape)}, but config.json implies "
            f"{list(dest.shape)}: config.json and the weights do not match"
        )
    with torch.no_grad():
        dest.copy_(f.get_tensor(name))


def load_model(
    folder: str | Path,
    device: torch.device | str,
    dtype: torch.dtype | str | None,
    progress: bool = True,
    ops: ModuleType | None = None,
) -> tuple[LlamaForCausalLM, ModelConfig]:
    """Read config.json, build the model on `device` in `dtype` (None: the checkpoint's own dtype,
    else float32) and load its weights. `ops` defaults to kernels.torch_ref."""
    config = ModelConfig.from_folder(folder)
    find_tensor_files(folder)  # fail on missing weights before allocating a large model
    device = torch.device(device)
    dtype = parse_dtype(dtype) or config.torch_dtype or torch.float32
    model = LlamaForCausalLM(config, ops=ops or torch_ref, dtype=dtype, device=device)
    load_weights(model, folder, device, dtype, progress=progress)
    model.requires_grad_(False)
    model.eval()
    return model, config
