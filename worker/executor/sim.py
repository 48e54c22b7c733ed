"""The sim executor: no model tensors; each step takes the time a calibrated cost model says it takes.

Everything else is real: the scheduler, the radix cache, the sampler, the frontend and its HTTP path. So
timing, KV capacity, eviction and cache-hit counters behave as on the GPU the profile was measured on, and
a 2-core machine can host a fleet of simulated workers (worker.sim_fleet).

The profile (`--sim-profile PATH` or a built-in name: a file in worker/executor/sim_profiles/, written by
`radixfleet bench calibrate`) holds the cost model (worker.executor.sim_cost_model) and, optionally, the
GPU memory the worker had, so the KV capacity can follow `--mem-fraction` as on the GPU:

    {"name": "h200-llama3-8b", "model": "llama3-8b", "device": "NVIDIA H200",
     "cost_model": {"form": "eager-v2", "coefficients_s": {"const": 0.005, "prefill_step": 0.01, ...}},
     "memory": {"gpu_total_bytes": ..., "weights_bytes": ..., "reserved_bytes": ...},   (optional)
     "sampling": {"eos_probability": 1e-4},                                              (optional)
     "fit": {"r2": ..., "max_rel_error": ...},
     "samples": [{"f": "decode", "d": [decodes, context, max context], "p": [[prefix, new], ...], "s": 0.006}]}

The cost model's forms ("eager-v2", and the older "linear-v1" that earlier profiles hold) are described in
worker.executor.sim_cost_model; "samples" (the measured steps, for `bench calibrate --refit`) are not read here.

KV capacity: `--kv-cache-tokens` when it is given (differs from its default), else the profile's memory
model at `--mem-fraction` (GPU total * fraction - weights - reserved), else the `--kv-cache-tokens` default.

Logits: the sampler sees only the first `logits_vocab_size` ids, so sampling costs O(that) per row rather
than O(model vocab): on a small CPU, drawing noise over 3k ids for every row is most of a step's host time.
Every row is the same constant: one ordinary text token a little above the rest (greedy repeats it).
End of sequence: by default the first SIM_VOCAB ids only, which hold no eos id in the built-in tokenizers,
so outputs run to max_tokens, as with the random-weight models the GPU figures are measured on (where eos
has odds of about 1 in 128k per token). A profile with `sampling.eos_probability` > 0 widens the ids to
cover the eos ids (at most MAX_SIM_VOCAB) and gives them those odds per token under temperature-1 sampling,
so a sampled eos ends some outputs early; ignore_eos and min_tokens apply as usual.

Waiting: a step lasts max(the host's own work for it, the modelled time), as with the CUDA engine's overlap
scheduling. A standalone worker's engine process sleeps in forward() (no CPU burnt) for the modelled time
less the host CPU time spent since the previous forward. A host that steps many engines in one event loop
sets `defer_wait`; forward() then returns at once and adds the modelled time to `deferred_seconds` (and its
host part, CostModel.host_seconds, to `deferred_host_seconds`), which the host awaits (from the step's start)
before delivering the step's outputs; worker.sim_fleet can also queue the GPU part of the steps of several
workers on one modelled GPU (--workers-per-gpu).

The interface used (documented, so it adapts when executors move to a registry): `SimExecutor(model_path,
config)` with `config` an EngineConfig (sim_profile, kv_cache_tokens, mem_fraction, page_size read), and
the Executor methods of worker.executor.base plus the optional attribute `logits_vocab_size`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from worker.engine.forward_batch import ForwardBatch
from worker.executor.base import Executor
from worker.executor.sim_cost_model import CostModel, StepShape

log = logging.getLogger(__name__)

PROFILES_DIR = Path(__file__).resolve().parent / "sim_profiles"
SIM_VOCAB = 512  # ids the sampler draws from by default
MAX_SIM_VOCAB = 8192  # with eos odds: beyond this the sampler's per-row cost would matter on a small CPU
KV_ELEMENT_BYTES = 2  # bfloat16 K/V, as the CUDA executor stores them


class SimProfileError(ValueError):
    """The sim profile is missing or malformed; the message says which and what to do."""


def builtin_profiles() -> list[str]:
    return sorted(p.stem for p in PROFILES_DIR.glob("*.json"))


@dataclass(frozen=True)
class SimProfile:
    name: str
    cost_model: CostModel
    memory: dict | None = None  # gpu_total_bytes, weights_bytes, reserved_bytes
    eos_probability: float | None = None
    source: str = ""

    @classmethod
    def load(cls, name_or_path: str) -> "SimProfile":
        path = Path(name_or_path).expanduser()
        if not path.is_file():
            builtin = PROFILES_DIR / f"{name_or_path}.json"
            if not builtin.is_file():
                names = ", ".join(builtin_profiles()) or "none shipped yet"
                raise SimProfileError(
                    f"--sim-profile {name_or_path!r} is neither a file nor a built-in profile (built-ins: {names}); "
                    "write one on a GPU with `radixfleet bench calibrate --model M --out PATH`")
            path = builtin
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as error:
            raise SimProfileError(f"sim profile {path} is not readable JSON: {error}") from None
        return cls.from_dict(data, source=str(path))

    @classmethod
    def from_dict(cls, data: dict, source: str = "") -> "SimProfile":
        if not isinstance(data, dict) or not isinstance(data.get("cost_model"), dict):
            raise SimProfileError(f"sim profile {source or '(dict)'} needs a 'cost_model' object")
        try:
            model = CostModel.from_dict(data["cost_model"])
        except ValueError as error:
            raise SimProfileError(f"sim profile {source or '(dict)'}: {error}") from None
        memory = data.get("memory")
        if memory is not None:
            needed = ("gpu_total_bytes", "weights_bytes", "reserved_bytes")
            if not isinstance(memory, dict) or any(not isinstance(memory.get(k), (int, float)) for k in needed):
                raise SimProfileError(f"sim profile {source}: 'memory' needs numbers {', '.join(needed)}")
        eos = (data.get("sampling") or {}).get("eos_probability")
        if eos is not None and not (isinstance(eos, (int, float)) and 0 <= eos < 1):
            raise SimProfileError(f"sim profile {source}: sampling.eos_probability must be in [0, 1), got {eos!r}")
        return cls(str(data.get("name") or Path(source).stem or "sim"), model, memory, eos, source)


def _default_profile_name(model: str) -> str | None:
    """With no --sim-profile: the built-in H200 profile of a built-in model name, if one is shipped."""
    candidate = f"h200-{Path(model).name}"
    return candidate if (PROFILES_DIR / f"{candidate}.json").is_file() else None


def _default_kv_cache_tokens() -> int:
    from worker.config import EngineConfig

    return next(f.default for f in dataclasses.fields(EngineConfig) if f.name == "kv_cache_tokens")


class SimExecutor(Executor):
    name = "sim"

    def __init__(self, model_path: str | Path, config, profile: SimProfile | None = None):
        from worker.config import ConfigError
        from worker.models.config import ModelConfig
        from worker.tokenizer import Tokenizer

        self.config = config
        if profile is None:
            chosen = getattr(config, "sim_profile", None) or _default_profile_name(config.model)
            if chosen is None:
                names = ", ".join(builtin_profiles()) or "none shipped yet"
                raise ConfigError(
                    "--executor sim needs --sim-profile PATH (a calibration JSON written by "
                    f"`radixfleet bench calibrate`) or a built-in profile name ({names})")
            try:
                profile = SimProfile.load(chosen)
            except SimProfileError as error:
                raise ConfigError(str(error)) from None
        self.profile = profile
        self.model_config = ModelConfig.from_folder(model_path)
        tokenizer = Tokenizer.from_folder(model_path)
        self.logits_vocab_size = self._sampled_vocab(tokenizer)
        self._row = self._constant_logits(tokenizer)
        self._logits = self._row.unsqueeze(0).expand(1, -1).contiguous()
        self.kv_cache_tokens = self._kv_budget_tokens()
        self.page_size: int | None = None
        # every modelled time is multiplied by this (a host too slow for the modelled GPU runs a slowed-down
        # fleet faithfully: latencies come out time_scale times longer, throughput time_scale times lower)
        self.time_scale = 1.0
        self.defer_wait = False  # set by a host that awaits the modelled time itself (worker.sim_fleet)
        self.deferred_seconds = 0.0
        self.deferred_host_seconds = 0.0  # of deferred_seconds, the host part (see CostModel.host_seconds)
        self._cpu_at_return: float | None = None  # this thread's CPU time when forward() last returned
        self.num_steps = 0
        self.modelled_seconds = 0.0  # total modelled step time so far

    # ------------------------------------------------------------------ construction helpers
    def kv_bytes_per_token(self) -> int:
        cfg = self.model_config
        return 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * KV_ELEMENT_BYTES

    def _kv_budget_tokens(self) -> int:
        from worker.config import ConfigError

        memory = self.profile.memory
        if self.config.kv_cache_tokens != _default_kv_cache_tokens() or memory is None:
            return int(self.config.kv_cache_tokens)
        budget = memory["gpu_total_bytes"] * self.config.mem_fraction - memory["weights_bytes"] - memory["reserved_bytes"]
        tokens = int(budget // self.kv_bytes_per_token())
        if tokens < 2 * self.config.page_size:
            raise ConfigError(
                f"at --mem-fraction {self.config.mem_fraction} the modelled GPU of profile {self.profile.name!r} "
                "has no room for KV after the weights; raise --mem-fraction or give --kv-cache-tokens")
        return tokens

    def _sampled_vocab(self, tokenizer) -> int:
        vocab = min(self.model_config.vocab_size, tokenizer.vocab_size)
        if self.profile.eos_probability:  # eos wanted: cover the eos ids
            return min(vocab, max(SIM_VOCAB, max(tokenizer.eos_token_ids, default=0) + 1), MAX_SIM_VOCAB)
        return min(vocab, SIM_VOCAB)

    def _constant_logits(self, tokenizer) -> torch.Tensor:
        vocab = self.logits_vocab_size
        eos_ids = sorted({i for i in tokenizer.eos_token_ids if 0 <= i < vocab})
        if self.profile.eos_probability and len(eos_ids) < len(set(tokenizer.eos_token_ids)):
            log.warning("sim: eos ids past the first %d ids are never sampled", vocab)
        filler = next((i for i in tokenizer.encode(" the", add_special_tokens=False) if i < vocab), None)
        if filler is None:  # an id that is text (a special token would decode to nothing)
            filler = next((i for i in range(vocab) if i not in eos_ids and tokenizer.decode([i]).strip()), 0)
        row = torch.zeros(vocab, dtype=torch.float32)
        row[filler] = 1.0  # greedy picks an ordinary word, not a special token at id 0
        p = self.profile.eos_probability or 0.0
        if eos_ids:
            others = (vocab - len(eos_ids) - 1) + math.e  # softmax mass of the non-eos ids
            row[eos_ids] = math.log(p * others / (len(eos_ids) * (1 - p))) if p > 0 else float("-inf")
        return row

    # ------------------------------------------------------------------ Executor
    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    def num_kv_pages(self, page_size: int) -> int:
        return self.kv_cache_tokens // page_size  # page_size is checked by EngineConfig.validate

    def init_kv_cache(self, num_pages: int, page_size: int) -> None:
        self.page_size = page_size  # nothing to allocate: the radix cache's page ids are all we need

    def step_seconds(self, batch: ForwardBatch) -> float:
        return self.step_split(batch)[1]

    def step_split(self, batch: ForwardBatch) -> tuple[float, float]:
        """(host part, whole) of the step's modelled seconds, time scale applied."""
        shape = StepShape.from_lengths(batch.seq_lens, batch.extend_lens, batch.num_decodes)
        model = self.profile.cost_model
        return model.host_seconds(shape) * self.time_scale, model.step_seconds(shape) * self.time_scale

    def forward(self, batch: ForwardBatch, future_tokens: torch.Tensor | None = None) -> torch.Tensor:
        if self.page_size is None:
            raise RuntimeError("SimExecutor.forward called before init_kv_cache")
        host_part, seconds = self.step_split(batch)
        self.num_steps += 1
        self.modelled_seconds += seconds
        if self.defer_wait:
            self.deferred_seconds += seconds
            self.deferred_host_seconds += host_part
        else:
            # The CUDA engine prepares the next step on the host while the GPU runs this one (overlap
            # scheduling), so a step lasts max(host work, device time). The host work since the previous
            # forward returned (this thread's CPU time: waiting for requests does not count) is credited.
            now_cpu = time.thread_time()
            host = now_cpu - self._cpu_at_return if self._cpu_at_return is not None else 0.0
            wait = seconds - min(host, seconds)
            if wait > 0:
                time.sleep(wait)
            self._cpu_at_return = time.thread_time()
        return self._rows(int(batch.logits_indices.shape[0]))

    def take_deferred_seconds(self) -> float:
        """The modelled time of the steps run since the last call (defer_wait mode)."""
        return self.take_deferred()[1]

    def take_deferred(self) -> tuple[float, float]:
        """(host part, whole) of the modelled time of the steps run since the last call (defer_wait mode)."""
        split = (self.deferred_host_seconds, self.deferred_seconds)
        self.deferred_host_seconds = self.deferred_seconds = 0.0
        return split

    def _rows(self, n: int) -> torch.Tensor:
        """n copies of the constant row. A view of one buffer: the sampler never writes into its input."""
        if self._logits.shape[0] < n:
            self._logits = self._row.unsqueeze(0).expand(max(n, 2 * self._logits.shape[0]), -1).contiguous()
        return self._logits[:n]
