"""Turn a `--model` argument into a checkpoint folder.

`resolve_model(name_or_path)`: an existing folder is used as is; a hub id already in the local Hugging
Face cache is its snapshot folder (nothing is downloaded); a built-in preset name is written once
(seed 0, the preset's dtype) to ``$RADIXFLEET_HOME/models/<name>-seed0`` and reused afterwards
(RADIXFLEET_HOME defaults to ~/.cache/radixfleet). Workers starting together on one machine take a file
lock, so one of them writes the checkpoint while the others wait for it.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path
from typing import Iterator

from worker.models.checkpoint_writer import write_checkpoint, write_config_and_tokenizer
from worker.models.presets import is_preset, preset_names

DEFAULT_HOME = "~/.cache/radixfleet"
BUILTIN_SEED = 0


def radixfleet_home() -> Path:
    """Where radixfleet keeps its files: $RADIXFLEET_HOME, else ~/.cache/radixfleet."""
    return Path(os.environ.get("RADIXFLEET_HOME") or DEFAULT_HOME).expanduser()


def builtin_model_dir(name: str) -> Path:
    """The folder a built-in model is materialised into."""
    return radixfleet_home() / "models" / f"{name}-seed{BUILTIN_SEED}"


def resolve_model(name_or_path: str, progress: bool = True, weights: bool = True) -> Path:
    """The checkpoint folder for a `--model` value: a folder, or a built-in name (written on first use).

    `weights=False` (the sim executor): a built-in name gives a folder with only its config and tokenizer.
    """
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    if is_preset(name_or_path):
        return _materialise(name_or_path, progress) if weights else _materialise_config(name_or_path)
    cached = hub_cache_folder(name_or_path)
    if cached is not None:
        return cached
    hint = ""
    if _looks_like_hub_id(name_or_path):
        hint = (f". It looks like a Hugging Face hub id: radixfleet does not download, so hub ids must already be "
                f"in the local Hugging Face cache ({hub_cache_root()}; e.g. `huggingface-cli download "
                f"{name_or_path}` on a machine with network access, then copy the cache or the folder here)")
    raise ValueError(
        f"--model {name_or_path!r} is neither an existing folder nor a built-in model; give the path of a "
        f"Hugging Face checkpoint folder or one of the built-ins: {', '.join(preset_names())}{hint}"
    )


def _looks_like_hub_id(value: str) -> bool:
    owner, sep, name = value.partition("/")
    return bool(sep and owner and name and "/" not in name and not value.startswith((".", "~")))


def hub_cache_root() -> Path:
    """The Hugging Face hub cache: $HF_HUB_CACHE, else $HF_HOME/hub, else ~/.cache/huggingface/hub."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    return Path(os.environ.get("HF_HOME") or "~/.cache/huggingface").expanduser() / "hub"


def hub_cache_folder(hub_id: str) -> Path | None:
    """The snapshot folder of a hub id already in the local cache (refs/main, else the only snapshot)."""
    if not _looks_like_hub_id(hub_id):
        return None
    repo = hub_cache_root() / f"models--{hub_id.replace('/', '--')}"
    ref = repo / "refs" / "main"
    if ref.is_file():
        snapshot = repo / "snapshots" / ref.read_text().strip()
        if snapshot.is_dir():
            return snapshot
    snapshots = sorted(p for p in (repo / "snapshots").glob("*") if p.is_dir())
    return snapshots[0] if len(snapshots) == 1 else None


def _is_complete(folder: Path) -> bool:
    has_weights = (folder / "model.safetensors").is_file() or (folder / "model.safetensors.index.json").is_file()
    return has_weights and (folder / "config.json").is_file() and (folder / "tokenizer.json").is_file()


def _materialise(name: str, progress: bool) -> Path:
    folder = builtin_model_dir(name)
    if _is_complete(folder):
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    with _exclusive_lock(folder.parent / f".{folder.name}.lock"):
        if _is_complete(folder):  # another process wrote it while we waited
            return folder
        if folder.exists() and any(folder.iterdir()):
            raise ValueError(f"{folder} exists but is not a complete checkpoint; delete it and start again")
        if progress:
            print(f"radixfleet: writing built-in model {name!r} to {folder} (first use only)", flush=True)
        try:
            write_checkpoint(name, folder, seed=BUILTIN_SEED, progress=progress)
        except FileExistsError:
            # A process that does not take the lock (e.g. another radixfleet version) finished first.
            if not _is_complete(folder):
                raise
    return folder


def _materialise_config(name: str) -> Path:
    """A built-in model's config + tokenizer files, without weights, in ``<home>/models/<name>-config``."""
    folder = radixfleet_home() / "models" / f"{name}-config"
    if (folder / "config.json").is_file() and (folder / "tokenizer.json").is_file():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    with _exclusive_lock(folder.parent / f".{folder.name}.lock"):
        if not (folder / "config.json").is_file():
            write_config_and_tokenizer(name, folder)
    return folder


@contextlib.contextmanager
def _exclusive_lock(lock_path: Path) -> Iterator[None]:
    """Hold an exclusive advisory lock on `lock_path` (released when the process exits, even on a crash)."""
    with open(lock_path, "a+") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
