"""The messages between the HTTP frontend and the engine process: one dataclass per kind.

Each side dispatches on the message's type (a dict from class to handler), so a kind that one side
sends and the other does not handle fails loudly instead of being skipped by an if-chain. Messages
are pickled whole (worker.server.engine_process); slots keep them small and cheap to build.

frontend -> engine: AddRequests | AbortRequests | Shutdown
engine -> frontend: Ready | StartFailed            once, after the model loaded (or did not)
                    StepOutputs                    one per engine step
                    StatsUpdate                    after commands handled while idle
                    Rejected                       a request the engine would not take
                    Fatal                          the loop crashed; the process exits

Outputs travel inside StepOutputs as plain tuples (`encode_outputs`): half the pickling cost of
dataclasses, and pickling holds the engine process's GIL on every step.
"""

from __future__ import annotations

import dataclasses
import enum
import operator
from dataclasses import dataclass

from worker.engine.protocol import EngineOutput, EngineRequest, EngineStats


# ---------------------------------------------------------------------- frontend -> engine
@dataclass(slots=True)
class AddRequests:
    requests: list[EngineRequest]


@dataclass(slots=True)
class AbortRequests:
    targets: list[tuple[str, int | None]]  # (request_id, choice index, or None for every choice)


@dataclass(slots=True)
class Shutdown:
    pass


# ---------------------------------------------------------------------- engine -> frontend
@dataclass(slots=True)
class Ready:
    """The engine loaded its model: what the frontend needs to serve."""

    model_name: str
    max_model_len: int
    pid: int
    model_path: str  # the resolved checkpoint folder (to load the tokenizer when it could not be sent)
    stats: EngineStats
    tokenizer: bytes | None  # the engine's tokenizer, pickled, when it could be


@dataclass(slots=True)
class StartFailed:
    traceback: str


@dataclass(slots=True)
class StepOutputs:
    outputs: list[tuple]  # encode_outputs() rows
    stats: EngineStats | None  # sent at most every STATS_INTERVAL_S while busy


@dataclass(slots=True)
class StatsUpdate:
    stats: EngineStats


class RejectKind(enum.Enum):
    INVALID = "invalid"  # the request is malformed for this engine: HTTP 400 naming `param`
    QUEUE_FULL = "queue_full"  # the waiting queue is full: HTTP 503 + Retry-After
    ERROR = "error"  # the engine failed on it: HTTP 500


@dataclass(slots=True)
class Rejected:
    request_id: str
    kind: RejectKind
    message: str
    param: str | None = None
    code: str | None = None  # an OpenAI error code, when the engine's error names one


@dataclass(slots=True)
class Fatal:
    traceback: str


# ---------------------------------------------------------------------- outputs as tuples
_OUTPUT_FIELDS = tuple(f.name for f in dataclasses.fields(EngineOutput))
_output_as_tuple = operator.attrgetter(*_OUTPUT_FIELDS)


def encode_outputs(outputs: list[EngineOutput]) -> list[tuple]:
    return [_output_as_tuple(output) for output in outputs]


def decode_outputs(rows: list[tuple]) -> list[EngineOutput]:
    return [EngineOutput(*row) for row in rows]
