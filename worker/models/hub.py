"""Hugging Face hub ids (`Qwen/Qwen3-0.6B`) resolved from the local Hugging Face cache, never downloaded.

The cache is where `huggingface-cli download` / transformers put models: $HF_HUB_CACHE, else
$HF_HOME/hub, else ~/.cache/huggingface/hub. A model that is not there is an error naming that folder
and the command that would fetch it.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

# owner/name, as the hub spells repository ids
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")


def looks_like_hub_id(name: str) -> bool:
    return bool(_HUB_ID.match(name)) and not Path(name).expanduser().exists()


def hub_cache_dir() -> Path:
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    home = Path(os.environ["HF_HOME"]).expanduser() if os.environ.get("HF_HOME") else Path.home() / ".cache" / "huggingface"
    return home / "hub"


def resolve_hub_id(repo_id: str, revision: str | None = None) -> Path:
    """The snapshot folder of `repo_id` in the local cache; ValueError naming the cache when it is not there."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    cache = hub_cache_dir()
    try:
        folder = Path(snapshot_download(repo_id, revision=revision, cache_dir=cache, local_files_only=True))
    except (LocalEntryNotFoundError, FileNotFoundError, OSError):
        raise ValueError(
            f"--model {repo_id!r} looks like a Hugging Face hub id, but it is not in the local Hugging Face cache "
            f"({cache}); this worker does not download models. Fetch it first "
            f"(huggingface-cli download {repo_id}), set HF_HUB_CACHE / HF_HOME to the cache that holds it, "
            "or give the checkpoint folder itself."
        ) from None
    if not (folder / "config.json").is_file():
        raise ValueError(f"{repo_id!r} in the Hugging Face cache ({folder}) has no config.json; download the "
                         "whole model (huggingface-cli download " + repo_id + ")")
    return folder
