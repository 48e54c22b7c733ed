"""The default token budget of one engine step (`--max-num-batched-tokens`), chosen from measurements.

A step runs every decode row plus prefill chunks up to this many tokens. A larger budget means fewer
steps for the same prefill work: on a small model, where a step's fixed host cost (eager prefill kernels
launched one by one) outweighs its GPU time, that is a straight win. On a large model a big chunk makes
the step long, and every decode row in it waits: time to first token and inter-token gaps grow.

Measured on one H200 (bench/reports/vs_vllm_h200.md, `radixfleet bench vs-vllm`, the served doc-QA stream
of 768 chat requests with 64 in flight over 48 ~3.5k-token documents):
  qwen3-0.6b: 2048 -> 79.6 req/s, TTFT p99 2.06 s; 8192 -> 109.9 req/s, TTFT p99 0.93 s
              (offline nano-vllm workload, T=0.6: 19,617 -> 22,589 tok/s)
  llama3-8b:  2048 -> 62.0 req/s, TTFT p99 3.61 s; 8192 -> 51.3 req/s, TTFT p99 4.38 s
So a GPU (or the sim executor, which stands for one) gets 8192 below SMALL_MODEL_PARAMS parameters and 2048
above; the CPU executor keeps 2048. An explicit --max-num-batched-tokens always wins.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

SMALL_MODEL_PARAMS = 3_000_000_000  # between the two shapes measured (0.6B: 8192 wins, 8B: 2048 wins)
SMALL_MODEL_BUDGET = 8192
DEFAULT_BUDGET = 2048


def default_step_token_budget(executor: str, num_params: int | None) -> int:
    if executor in ("cuda", "sim") and num_params is not None and num_params < SMALL_MODEL_PARAMS:
        return SMALL_MODEL_BUDGET
    return DEFAULT_BUDGET


def model_parameter_count(model_path: Path) -> int | None:
    """From the folder's config.json (no weights read); None when it cannot be worked out."""
    from worker.models.checkpoint_writer import count_parameters

    try:
        return count_parameters(json.loads((Path(model_path) / "config.json").read_text()))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def with_step_token_budget(config, model_path: Path):
    """`config` with max_num_batched_tokens filled in when it was left to the default (None)."""
    if config.max_num_batched_tokens is not None:
        return config
    budget = default_step_token_budget(config.resolved_executor(), model_parameter_count(model_path))
    return dataclasses.replace(config, max_num_batched_tokens=budget)
