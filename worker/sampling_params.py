"""Per-request sampling settings and their validation.

Every invalid value raises `InvalidParameter`, whose message names the field, so the HTTP
frontend can answer 400 with `param` set and the offline API fails with a readable error.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

MAX_LOGPROBS = 20
MAX_N = 128


class InvalidParameter(ValueError):
    """A request field has a value the engine cannot honour."""

    def __init__(self, param: str, message: str):
        super().__init__(f"{param}: {message}")
        self.param = param
        self.message = message


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


STRUCTURED_OUTPUT_KINDS = ("json_schema", "json_object", "regex", "choice", "grammar")


@dataclass(frozen=True)
class StructuredOutput:
    """A constraint on the output text, enforced token by token (worker.engine.grammar).

    `kind`: json_schema (spec: the schema as JSON text), json_object (any JSON object), regex, choice
    (spec: a JSON array of the allowed strings) or grammar (spec: EBNF).
    """

    kind: str
    spec: str = ""


@dataclass
class SamplingParams:
    """How to turn logits into tokens, and when to stop.

    Defaults match the OpenAI API (temperature 1, top_p 1). `temperature == 0` means greedy.
    `max_tokens=None` means "until the context length or a stop condition".
    `priority`: lower values are scheduled first (as in vLLM); only used by the `priority` policy.
    """

    n: int = 1
    max_tokens: int | None = 16
    min_tokens: int = 0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: disabled
    min_p: float = 0.0
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    ignore_eos: bool = False
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    include_stop_str_in_output: bool = False
    logprobs: int | None = None  # None: no logprobs; k >= 0: the sampled token's plus the top k
    skip_special_tokens: bool = True
    priority: int = 0
    # Logit processors (vLLM names): a bias per token id, a whitelist, banned token sequences, a grammar.
    logit_bias: dict[int, float] | None = None
    allowed_token_ids: list[int] | None = None
    bad_words_token_ids: list[list[int]] | None = None  # each: the token ids of one banned word
    structured_output: StructuredOutput | None = None
    # vLLM's offline prompt_logprobs: each prompt token's logprob and the k most likely at its position, in
    # RequestOutput.prompt_logprobs (worker.llm). The HTTP server passes its field to EngineRequest instead.
    prompt_logprobs: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if self.stop is None:
            self.stop = []
        if self.stop_token_ids is None:
            self.stop_token_ids = []
        if self.top_k == -1:
            self.top_k = 0
        self.validate()

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        self._check_int("n", 1, MAX_N)
        if self.max_tokens is not None:
            self._check_int("max_tokens", 1, None)
        self._check_int("min_tokens", 0, None)
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise InvalidParameter("min_tokens", f"must be at most max_tokens ({self.max_tokens}), got {self.min_tokens}")
        self._check_number("temperature", 0.0, 2.0)  # the OpenAI range
        self._check_number("top_p", 0.0, 1.0, low_open=True)
        self._check_int("top_k", 0, None)
        self._check_number("min_p", 0.0, 1.0)
        if self.seed is not None and not _is_int(self.seed):
            raise InvalidParameter("seed", f"must be an integer, got {self.seed!r}")
        self._check_number("presence_penalty", -2.0, 2.0)
        self._check_number("frequency_penalty", -2.0, 2.0)
        self._check_number("repetition_penalty", 0.0, 100.0, low_open=True)
        for name in ("ignore_eos", "include_stop_str_in_output", "skip_special_tokens"):
            if not isinstance(getattr(self, name), bool):
                raise InvalidParameter(name, f"must be a boolean, got {getattr(self, name)!r}")
        if not isinstance(self.stop, list) or not all(isinstance(s, str) for s in self.stop):
            raise InvalidParameter("stop", "must be a string or a list of strings")
        if any(s == "" for s in self.stop):
            raise InvalidParameter("stop", "stop strings must not be empty")
        if len(self.stop) > 16:
            raise InvalidParameter("stop", f"at most 16 stop strings are allowed, got {len(self.stop)}")
        if not isinstance(self.stop_token_ids, list) or not all(_is_int(t) and t >= 0 for t in self.stop_token_ids):
            raise InvalidParameter("stop_token_ids", "must be a list of non-negative integers")
        if self.logprobs is not None:
            self._check_int("logprobs", 0, MAX_LOGPROBS)
        if self.prompt_logprobs is not None:
            self._check_int("prompt_logprobs", 0, MAX_LOGPROBS)
        self._check_int("priority", None, None)
        self._validate_logit_processors()

    def _validate_logit_processors(self) -> None:
        if self.logit_bias is not None:
            if not isinstance(self.logit_bias, dict):
                raise InvalidParameter("logit_bias", "must map token ids to numbers")
            for token, bias in self.logit_bias.items():
                if not _is_int(token) or token < 0:
                    raise InvalidParameter("logit_bias", f"keys must be non-negative token ids, got {token!r}")
                if not _is_number(bias) or not -100.0 <= bias <= 100.0:
                    raise InvalidParameter("logit_bias", f"values must be numbers in [-100, 100], got {bias!r}")
        if self.allowed_token_ids is not None and (
            not isinstance(self.allowed_token_ids, list) or not self.allowed_token_ids
            or not all(_is_int(t) and t >= 0 for t in self.allowed_token_ids)
        ):
            raise InvalidParameter("allowed_token_ids", "must be a non-empty list of non-negative token ids")
        if self.bad_words_token_ids is not None and not all(
            isinstance(ids, list) and ids and all(_is_int(t) and t >= 0 for t in ids) for ids in self.bad_words_token_ids
        ):
            raise InvalidParameter("bad_words", "each bad word must encode to at least one token")
        if self.structured_output is not None and self.structured_output.kind not in STRUCTURED_OUTPUT_KINDS:
            raise InvalidParameter("structured_outputs", f"kind must be one of {', '.join(STRUCTURED_OUTPUT_KINDS)}")

    def _check_int(self, name: str, low: int | None, high: int | None) -> None:
        value = getattr(self, name)
        if not _is_int(value):
            raise InvalidParameter(name, f"must be an integer, got {value!r}")
        if low is not None and value < low:
            raise InvalidParameter(name, f"must be at least {low}, got {value}")
        if high is not None and value > high:
            raise InvalidParameter(name, f"must be at most {high}, got {value}")

    def _check_number(self, name: str, low: float, high: float, low_open: bool = False) -> None:
        value = getattr(self, name)
        if not _is_number(value) or value != value:  # rejects NaN too
            raise InvalidParameter(name, f"must be a number, got {value!r}")
        if (value <= low) if low_open else (value < low):
            bound = "greater than" if low_open else "at least"
            raise InvalidParameter(name, f"must be {bound} {low}, got {value}")
        if value > high:
            raise InvalidParameter(name, f"must be at most {high}, got {value}")
        setattr(self, name, float(value))

    # ------------------------------------------------------------------ derived
    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def uses_penalties(self) -> bool:
        return self.presence_penalty != 0.0 or self.frequency_penalty != 0.0 or self.repetition_penalty != 1.0

    @property
    def uses_logit_processors(self) -> bool:
        """True when logits are changed beyond penalties and min_tokens (bias, whitelist, bad words, grammar)."""
        return bool(self.logit_bias or self.allowed_token_ids or self.bad_words_token_ids or self.structured_output)

    @property
    def needs_output_tokens(self) -> bool:
        """True when sampling reads this sequence's output tokens on the host (under overlap, a step with such
        a row samples only after the previous step is read back: worker/engine/launched_step.py).

        Not penalties: the engine keeps their counts on the device (worker.engine.sampling_penalties)."""
        return bool(self.bad_words_token_ids) or self.structured_output is not None

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in fields(cls)]
