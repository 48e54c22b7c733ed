"""The step-time cost model of the sim executor, and its least-squares fit.

One engine step on a GPU costs, to a good approximation, a fixed cost plus terms linear in what it computes:

    t = const
      + prefill_step            * (fixed cost of a step with any prefill chunk: it runs eager)
      + prefill_chunks          * (per-chunk cost: metadata, copies, sampling set-up of one prompt chunk)
      + prefill_tokens          * (GEMM cost of one new prompt token)
      + decode_seqs             * (GEMM + sampling cost of one decode row)
      + decode_context_tokens   * (attention: reading one cached K/V token for a decode row)
      + prefill_attention_pairs * (attention: one query-key pair of a prefill chunk)

Why `prefill_step`: decode-only steps replay CUDA graphs, while a prefill or mixed step runs eagerly and pays
the host cost of launching every kernel itself (about 10 ms for llama3-8b on an H200, whatever the chunk
size: calibrate-llama3-8b.log shows 16-token prefills at 14-17 ms against a 5 ms decode floor). `const`
is then the floor of a graphed decode step (the weight read), and `const + prefill_step` that of an eager
one. `prefill_chunks` prices a step that carries many small chunks (questions on a cached document,
admissions) above one with a single chunk of the same total.

`prefill_attention_pairs` is sum over prefill chunks of extend * (prefix + (extend + 1) / 2): the causal
attention work of a chunk of `extend` new tokens over `prefix` cached ones.

Forms: "eager-v2" (the features above, what `fit` writes by default) and "linear-v1" (the older profiles:
no `prefill_step` nor `prefill_chunks`; still loaded, and fittable with `fit(..., form="linear-v1")` to
compare). Coefficients are fitted by non-negative least squares (a negative cost per token would let the
model predict a step faster than an empty one), so a feature the data cannot resolve simply gets 0.

Raw samples (`StepSample`): what `radixfleet bench calibrate` stores in a profile so it can be refitted
offline (`--refit`): per step, the decode rows (count, summed and longest context), every prefill chunk as
(cached prefix, new tokens), the measured seconds, and the grid family that produced it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

FEATURES = ("const", "prefill_step", "prefill_chunks", "prefill_tokens", "decode_seqs", "decode_context_tokens",
            "prefill_attention_pairs")
FORM = "eager-v2"
FORMS = {
    FORM: FEATURES,
    "linear-v1": ("const", "prefill_tokens", "decode_seqs", "decode_context_tokens", "prefill_attention_pairs"),
}


def _check_form(form: str) -> tuple[str, ...]:
    if form not in FORMS:
        raise ValueError(f"cost model form {form!r} is not supported (known: {', '.join(FORMS)})")
    return FORMS[form]


@dataclass(frozen=True)
class StepShape:
    """What one step computes, in the cost model's terms."""

    prefill_tokens: int = 0
    decode_seqs: int = 0
    decode_context_tokens: int = 0
    prefill_attention_pairs: float = 0.0
    prefill_chunks: int = 0

    @classmethod
    def from_chunks(cls, decode_seqs: int, decode_context_tokens: int,
                    chunks: list[tuple[int, int]]) -> "StepShape":
        """From decode rows and prefill chunks given as (cached prefix, new tokens)."""
        tokens = sum(extend for _, extend in chunks)
        pairs = sum(extend * (prefix + (extend + 1) / 2) for prefix, extend in chunks)
        return cls(tokens, decode_seqs, decode_context_tokens, pairs, len(chunks))

    @classmethod
    def from_lengths(cls, seq_lens: list[int], extend_lens: list[int], num_decodes: int) -> "StepShape":
        """From a ForwardBatch's per-sequence lengths (decodes first, then prefill chunks)."""
        return cls.from_chunks(num_decodes, sum(seq_lens[:num_decodes]), chunks_of(seq_lens, extend_lens, num_decodes))

    def value(self, feature: str) -> float:
        if feature == "const":
            return 1.0
        if feature == "prefill_step":
            return 1.0 if self.prefill_chunks else 0.0
        return float(getattr(self, feature))

    def features(self, form: str = FORM) -> list[float]:
        return [self.value(name) for name in _check_form(form)]


def chunks_of(seq_lens: list[int], extend_lens: list[int], num_decodes: int) -> list[tuple[int, int]]:
    """The prefill chunks of a batch as (cached prefix, new tokens)."""
    return [(seq_len - extend, extend) for seq_len, extend in zip(seq_lens[num_decodes:], extend_lens[num_decodes:])]


@dataclass(frozen=True)
class StepSample:
    """One measured step, as stored in a profile's "samples" list (compact keys: a profile holds hundreds)."""

    decode_seqs: int
    decode_context_tokens: int
    decode_context_max: int
    chunks: tuple[tuple[int, int], ...]
    seconds: float
    family: str = ""

    @classmethod
    def from_lengths(cls, seq_lens: list[int], extend_lens: list[int], num_decodes: int, seconds: float,
                     family: str = "") -> "StepSample":
        contexts = seq_lens[:num_decodes]
        return cls(num_decodes, sum(contexts), max(contexts, default=0),
                   tuple(chunks_of(seq_lens, extend_lens, num_decodes)), seconds, family)

    @property
    def shape(self) -> StepShape:
        return StepShape.from_chunks(self.decode_seqs, self.decode_context_tokens, list(self.chunks))

    def to_dict(self) -> dict:
        return {"f": self.family, "d": [self.decode_seqs, self.decode_context_tokens, self.decode_context_max],
                "p": [list(c) for c in self.chunks], "s": self.seconds}

    @classmethod
    def from_dict(cls, data: dict) -> "StepSample":
        try:
            decodes, context, context_max = (int(v) for v in data["d"])
            chunks = tuple((int(prefix), int(extend)) for prefix, extend in data["p"])
            seconds = float(data["s"])
        except (KeyError, TypeError, ValueError) as error:
            raise ValueError(f"a sample needs 'd': [decodes, context, max context], 'p': [[prefix, new], ...] "
                             f"and 's': seconds; got {data!r} ({error})") from None
        if not math.isfinite(seconds) or seconds <= 0:
            raise ValueError(f"a sample's measured seconds must be positive, got {seconds!r}")
        return cls(decodes, context, context_max, chunks, seconds, str(data.get("f", "")))


@dataclass(frozen=True)
class CostModel:
    """Seconds per unit of each feature of its form (FORMS[form] order)."""

    coefficients: tuple[float, ...]
    form: str = FORM

    def __post_init__(self):
        features = _check_form(self.form)
        if len(self.coefficients) != len(features):
            raise ValueError(f"form {self.form!r} has {len(features)} coefficients, got {len(self.coefficients)}")

    @property
    def features(self) -> tuple[str, ...]:
        return FORMS[self.form]

    @classmethod
    def from_dict(cls, data: dict) -> "CostModel":
        """From a profile's "cost_model" object: {"form": ..., "coefficients_s": {feature: seconds}}.
        A missing form is "linear-v1" (profiles written before forms had names other than that one)."""
        form = data.get("form", "linear-v1")
        features = _check_form(form)
        coefficients = data.get("coefficients_s")
        if not isinstance(coefficients, dict):
            raise ValueError("the cost model needs a 'coefficients_s' object mapping features to seconds")
        unknown = set(coefficients) - set(features)
        if unknown:
            raise ValueError(f"unknown cost model feature(s) {sorted(unknown)} for form {form!r}; "
                             f"known: {', '.join(features)}")
        values = []
        for name in features:
            value = coefficients.get(name, 0.0)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ValueError(f"cost model coefficient {name!r} must be a non-negative number, got {value!r}")
            values.append(float(value))
        return cls(tuple(values), form)

    def to_dict(self) -> dict:
        return {"form": self.form, "features": list(self.features),
                "coefficients_s": {name: value for name, value in zip(self.features, self.coefficients)}}

    def step_seconds(self, shape: StepShape) -> float:
        return float(sum(c * x for c, x in zip(self.coefficients, shape.features(self.form))))

    def host_seconds(self, shape: StepShape) -> float:
        """The part of step_seconds taken as host time: the eager step's fixed cost (kernel launches from
        Python), which on a GPU shared by several workers overlaps the others' GPU work. 0 in linear-v1."""
        if "prefill_step" not in self.features:
            return 0.0
        return self.coefficients[self.features.index("prefill_step")] * shape.value("prefill_step")


@dataclass(frozen=True)
class FitResult:
    model: CostModel
    r2: float
    max_rel_error: float
    mean_rel_error: float
    num_samples: int
    by_family: dict = field(default_factory=dict)  # family -> {"steps", "mean_rel_error", "max_rel_error"}

    def quality(self) -> dict:
        quality = {"r2": self.r2, "max_rel_error": self.max_rel_error, "mean_rel_error": self.mean_rel_error,
                   "num_samples": self.num_samples}
        if self.by_family:
            quality["by_family"] = self.by_family
        return quality


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


def fit(shapes: list[StepShape], seconds: list[float], form: str = FORM,
        families: list[str] | None = None) -> FitResult:
    """Fit the cost model to measured step times. Rows are weighted by 1/t so that the fit minimises relative
    error: a 5 ms decode step matters as much as a 200 ms prefill. `families` (one label per step) adds the
    error of each family of steps to the result."""
    features = _check_form(form)
    if len(shapes) != len(seconds):
        raise ValueError(f"{len(shapes)} step shapes but {len(seconds)} times")
    if len(shapes) < len(features):
        raise ValueError(f"need at least {len(features)} measured steps to fit {len(features)} coefficients")
    t = np.asarray(seconds, dtype=np.float64)
    if (t <= 0).any():
        raise ValueError("measured step times must be positive")
    x = np.asarray([s.features(form) for s in shapes], dtype=np.float64)
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
    by_family = {}
    if families is not None:
        labels = np.asarray(families)
        for family in sorted(set(families)):
            errors = relative[labels == family]
            by_family[family] = {"steps": int(errors.size), "mean_rel_error": float(errors.mean()),
                                 "max_rel_error": float(errors.max())}
    return FitResult(CostModel(tuple(float(c) for c in coef), form), r2, float(relative.max()),
                     float(relative.mean()), len(shapes), by_family)


OUTLIER_RATIO = 10.0  # a step this many times slower than the fit is a stall (a JIT compile), not a cost


def fit_samples(samples: list[StepSample], form: str = FORM) -> tuple[FitResult, list[StepSample]]:
    """Fit, then refit without the steps over OUTLIER_RATIO times their prediction (a Triton compile on a new
    shape costs seconds once; the sim should not spread it over every step). Returns the fit and the steps
    it dropped."""
    def fit_of(chosen: list[StepSample]) -> FitResult:
        return fit([s.shape for s in chosen], [s.seconds for s in chosen], form, [s.family for s in chosen])

    result = fit_of(samples)
    kept, dropped = [], []
    for sample in samples:
        stalled = sample.seconds > OUTLIER_RATIO * result.model.step_seconds(sample.shape)
        (dropped if stalled else kept).append(sample)
    if dropped and len(kept) >= len(FORMS[form]):
        result = fit_of(kept)
    else:
        dropped = []
    return result, dropped
