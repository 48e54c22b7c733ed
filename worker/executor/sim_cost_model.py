"""The step-time cost model of the sim executor, and its least-squares fit.

One engine step on a GPU costs, to a good approximation, a fixed launch/weight-read cost plus terms linear
in what the step computes:

    t = const
      + prefill_tokens          * (GEMM cost of one new prompt token)
      + decode_seqs             * (GEMM + sampling cost of one decode row)
      + decode_context_tokens   * (attention: reading one cached K/V token for a decode row)
      + prefill_attention_pairs * (attention: one query-key pair of a prefill chunk)

`prefill_attention_pairs` is sum over prefill chunks of extend * (prefix + (extend + 1) / 2): the causal
attention work of a chunk of `extend` new tokens over `prefix` cached ones. The weight read is the floor of
a small step (memory bound), which the constant carries; the linear terms take over as the batch grows.
Coefficients are fitted by non-negative least squares (a negative cost per token would let the model predict
a step faster than an empty one), so a feature the data cannot resolve simply gets 0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

FEATURES = ("const", "prefill_tokens", "decode_seqs", "decode_context_tokens", "prefill_attention_pairs")
FORM = "linear-v1"


@dataclass(frozen=True)
class StepShape:
    """What one step computes, in the cost model's terms."""

    prefill_tokens: int = 0
    decode_seqs: int = 0
    decode_context_tokens: int = 0
    prefill_attention_pairs: float = 0.0

    @classmethod
    def from_lengths(cls, seq_lens: list[int], extend_lens: list[int], num_decodes: int) -> "StepShape":
        """From a ForwardBatch's per-sequence lengths (decodes first, then prefill chunks)."""
        decode_context = sum(seq_lens[:num_decodes])
        prefill_tokens = 0
        pairs = 0.0
        for seq_len, extend in zip(seq_lens[num_decodes:], extend_lens[num_decodes:]):
            prefill_tokens += extend
            pairs += extend * (seq_len - extend + (extend + 1) / 2)
        return cls(prefill_tokens, num_decodes, decode_context, pairs)

    def features(self) -> list[float]:
        return [1.0, self.prefill_tokens, self.decode_seqs, self.decode_context_tokens, self.prefill_attention_pairs]


@dataclass(frozen=True)
class CostModel:
    """Seconds per unit of each feature (FEATURES order)."""

    coefficients: tuple[float, ...]

    @classmethod
    def from_dict(cls, data: dict) -> "CostModel":
        """From a profile's "cost_model" object: {"form": "linear-v1", "coefficients_s": {feature: seconds}}."""
        if data.get("form", FORM) != FORM:
            raise ValueError(f"cost model form {data.get('form')!r} is not supported (expected {FORM!r})")
        coefficients = data.get("coefficients_s")
        if not isinstance(coefficients, dict):
            raise ValueError("the cost model needs a 'coefficients_s' object mapping features to seconds")
        unknown = set(coefficients) - set(FEATURES)
        if unknown:
            raise ValueError(f"unknown cost model feature(s) {sorted(unknown)}; known: {', '.join(FEATURES)}")
        values = []
        for name in FEATURES:
            value = coefficients.get(name, 0.0)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ValueError(f"cost model coefficient {name!r} must be a non-negative number, got {value!r}")
            values.append(float(value))
        return cls(tuple(values))

    def to_dict(self) -> dict:
        return {"form": FORM, "features": list(FEATURES),
                "coefficients_s": {name: value for name, value in zip(FEATURES, self.coefficients)}}

    def step_seconds(self, shape: StepShape) -> float:
        return float(sum(c * x for c, x in zip(self.coefficients, shape.features())))


@dataclass(frozen=True)
class FitResult:
    model: CostModel
    r2: float
    max_rel_error: float
    mean_rel_error: float
    num_samples: int

    def quality(self) -> dict:
        return {"r2": self.r2, "max_rel_error": self.max_rel_error, "mean_rel_error": self.mean_rel_error,
                "num_samples": self.num_samples}


def _nnls(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Non-negative least squares by active set: refit without the most negative coefficient until none is."""
    active = list(range(a.shape[1]))
    x = np.zeros(a.shape[1])
    while active:
        solution, *_ = np.linalg.lstsq(a[:, active], b, rcond=None)
        if (solution >= 0).all():
            x[:] = 0
            x[active] = solution
            return x
        active.pop(int(np.argmin(solution)))
    return x


def fit(shapes: list[StepShape], seconds: list[float]) -> FitResult:
    """Fit the cost model to measured step times. Rows are weighted by 1/t so that the fit minimises relative
    error: a 5 ms decode step matters as much as a 200 ms prefill."""
    if len(shapes) != len(seconds):
        raise ValueError(f"{len(shapes)} step shapes but {len(seconds)} times")
    if len(shapes) < len(FEATURES):
        raise ValueError(f"need at least {len(FEATURES)} measured steps to fit {len(FEATURES)} coefficients")
    t = np.asarray(seconds, dtype=np.float64)
    if (t <= 0).any():
        raise ValueError("measured step times must be positive")
    x = np.asarray([s.features() for s in shapes], dtype=np.float64)
    # Scale columns to unit size so the solver sees a well-conditioned problem; unscale after.
    scale = np.abs(x).max(axis=0)
    scale[scale == 0] = 1.0
    weights = 1.0 / t
    coef = _nnls(x / scale * weights[:, None], t * weights) / scale
    predicted = x @ coef
    residual = t - predicted
    total = ((t - t.mean()) ** 2).sum()
    r2 = 1.0 - float((residual**2).sum() / total) if total > 0 else 1.0
    relative = np.abs(residual) / t
    return FitResult(CostModel(tuple(float(c) for c in coef)), r2, float(relative.max()), float(relative.mean()),
                     len(shapes))
