"""Small sim profiles written by the tests themselves (the shipped profiles are real GPU fits only)."""

import json
from pathlib import Path


def write_profile(folder: Path, name: str = "test", const_s: float = 0.001, per_token_s: float = 1e-6,
                  **extra) -> Path:
    path = Path(folder) / f"{name}.json"
    profile = {"name": name, "cost_model": {"form": "linear-v1", "coefficients_s": {
        "const": const_s, "prefill_tokens": per_token_s, "decode_seqs": per_token_s}}}
    profile.update(extra)
    path.write_text(json.dumps(profile))
    return path
