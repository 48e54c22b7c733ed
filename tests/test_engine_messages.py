"""The typed messages between the HTTP frontend and the engine process, and the refusals they carry."""

import asyncio
import pickle

import pytest

from worker.config import EngineConfig
from worker.engine.protocol import (
    ContextLengthExceeded,
    EngineOutput,
    EngineRequest,
    EngineStats,
    QueueFullError,
    TokenLogprob,
)
from worker.sampling_params import InvalidParameter, SamplingParams
from worker.server import engine_messages as m
from worker.server.engine_client import EngineClient, RequestStream
from worker.server.engine_process import EngineLoop
from worker.server.errors import ApiError

STATS = EngineStats(1, 2, 3, 4, 5, 6, 7)


class FakeEngine:
    """Refuses requests by id, the way LLMEngine.add_request does."""

    def __init__(self):
        self.added, self.aborted = [], []

    def add_request(self, request):
        refusals = {
            "long": ContextLengthExceeded("prompt", "too long"),
            "odd": InvalidParameter("prompt", "token ids must be integers"),
            "full": QueueFullError("the waiting queue is full (1 requests)"),
            "boom": ZeroDivisionError("division by zero"),
        }
        if request.request_id in refusals:
            raise refusals[request.request_id]
        self.added.append(request.request_id)

    def abort_request(self, request_id, index=None):
        self.aborted.append((request_id, index))


class Collect:
    def __init__(self):
        self.messages = []

    def put(self, message):
        self.messages.append(message)


def request(request_id: str) -> EngineRequest:
    return EngineRequest(request_id, [1, 2, 3], SamplingParams(max_tokens=4))


@pytest.mark.parametrize(
    "message",
    [
        m.AddRequests([request("a")]),
        m.AbortRequests([("a", None), ("b", 1)]),
        m.Shutdown(),
        m.Ready("demo", 2048, 123, "/models/demo", STATS, b"tok"),
        m.StartFailed("Traceback ..."),
        m.StepOutputs(m.encode_outputs([EngineOutput("a", 0, [5], None)]), STATS),
        m.StatsUpdate(STATS),
        m.Rejected("a", m.RejectKind.INVALID, "too long", "prompt", "context_length_exceeded"),
        m.Fatal("Traceback ..."),
    ],
)
def test_every_message_crosses_the_pipe_unchanged(message):
    assert pickle.loads(pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)) == message


def test_outputs_survive_the_tuple_encoding():
    outputs = [
        EngineOutput("a", 1, [7, 8], [TokenLogprob(7, -0.5, 1, [(7, -0.5)])], "length", None, 3, 2),
        EngineOutput("b", 0, [], None, "abort", error="engine failed"),
    ]
    assert m.decode_outputs(pickle.loads(pickle.dumps(m.encode_outputs(outputs)))) == outputs


def test_the_engine_loop_applies_commands_and_reports_each_refusal_by_kind():
    engine, sender = FakeEngine(), Collect()
    loop = EngineLoop(engine, commands=None, sender=sender)
    loop._handle(m.AddRequests([request(i) for i in ("ok", "long", "odd", "full", "boom")]))
    loop._handle(m.AbortRequests([("ok", None), ("ok", 2)]))
    assert engine.added == ["ok"] and engine.aborted == [("ok", None), ("ok", 2)]
    assert [(r.request_id, r.kind, r.param, r.code) for r in sender.messages] == [
        ("long", m.RejectKind.INVALID, "prompt", "context_length_exceeded"),
        ("odd", m.RejectKind.INVALID, "prompt", None),
        ("full", m.RejectKind.QUEUE_FULL, None, None),
        ("boom", m.RejectKind.ERROR, None, None),
    ]
    assert "ZeroDivisionError" in sender.messages[-1].message
    loop._handle(m.Shutdown())
    assert not loop.running


def test_a_message_of_an_unknown_kind_fails_loudly():
    loop = EngineLoop(FakeEngine(), commands=None, sender=Collect())
    with pytest.raises(KeyError):
        loop._handle(("add", [request("a")]))  # the old tuple form is not silently ignored


def _refusal(rejected: m.Rejected) -> ApiError:
    """The error a request's stream ends with when the engine sends `rejected` for it."""
    client = EngineClient(EngineConfig())
    client._dispatch(m.StatsUpdate(STATS))
    stream = client._streams[rejected.request_id] = RequestStream(rejected.request_id, 1)
    client._dispatch(rejected)
    assert rejected.request_id not in client._streams
    with pytest.raises(ApiError) as caught:
        asyncio.run(stream.next_batch())
    return caught.value


def test_a_full_queue_in_the_engine_is_a_503_with_retry_after():
    error = _refusal(m.Rejected("r", m.RejectKind.QUEUE_FULL, "the waiting queue is full"))
    assert error.status == 503 and error.code == "queue_full" and int(error.headers["Retry-After"]) >= 1
    assert "2 requests are already waiting" in error.message  # the engine's last reported queue


def test_an_invalid_request_is_a_400_naming_the_field_and_code():
    error = _refusal(m.Rejected("r", m.RejectKind.INVALID, "too long", "prompt", "context_length_exceeded"))
    assert (error.status, error.param, error.code, error.message) == (400, "prompt", "context_length_exceeded",
                                                                      "too long")


def test_an_engine_failure_on_a_request_is_a_500():
    error = _refusal(m.Rejected("r", m.RejectKind.ERROR, "ZeroDivisionError: division by zero"))
    assert error.status == 500 and "ZeroDivisionError" in error.message


# ---------------------------------------------------------------------- the engine decides
@pytest.fixture(scope="module")
def small_engine(tmp_path_factory):
    from worker.engine.llm_engine import LLMEngine
    from worker.models.checkpoint_writer import write_checkpoint

    folder = write_checkpoint("tiny-llama3", tmp_path_factory.mktemp("tiny") / "ckpt", seed=1, progress=False)
    return LLMEngine(EngineConfig(model=str(folder), device="cpu", page_size=4, kv_cache_tokens=256,
                                  max_model_len=32, max_waiting_requests=1, progress=False))


def test_the_engine_refuses_what_does_not_fit_the_context_naming_field_and_code(small_engine):
    with pytest.raises(ContextLengthExceeded) as long_prompt:
        small_engine.add_request(EngineRequest("long", [1] * 32, SamplingParams()))
    assert long_prompt.value.param == "prompt" and long_prompt.value.code == "context_length_exceeded"
    assert "maximum context length is 32 tokens" in long_prompt.value.message
    with pytest.raises(ContextLengthExceeded) as too_many:
        small_engine.add_request(EngineRequest("many", [1] * 20, SamplingParams(max_tokens=13)))
    assert too_many.value.param == "max_tokens" and "at most 12" in too_many.value.message
    assert not small_engine.has_unfinished()


def test_the_engine_is_the_one_that_says_the_queue_is_full(small_engine):
    small_engine.add_request(EngineRequest("first", [1, 2, 3], SamplingParams(max_tokens=2)))
    with pytest.raises(QueueFullError):
        small_engine.add_request(EngineRequest("second", [1, 2, 3], SamplingParams(max_tokens=2)))
    while small_engine.has_unfinished():
        small_engine.step()
    small_engine.add_request(EngineRequest("second", [1, 2, 3], SamplingParams(max_tokens=2)))  # room again
    while small_engine.has_unfinished():
        small_engine.step()


class NoText:
    def decode(self, ids, skip_special_tokens=True):
        return ""


def test_a_refusal_names_the_field_as_the_request_spelled_it():
    """The engine says "prompt" / "max_tokens"; a chat client sent "messages" / "max_completion_tokens"."""
    from worker.server.generation import Generation

    async def refused(engine_param: str) -> ApiError:
        client = EngineClient(EngineConfig())
        client.info, client._loop = object(), asyncio.get_running_loop()  # healthy, without a process
        client._flush = lambda: None
        generation = Generation(client, NoText(), [1, 2], SamplingParams(),
                                param_names={"prompt": "messages", "max_tokens": "max_completion_tokens"})
        generation.start()
        client._dispatch(m.Rejected(generation.request_id, m.RejectKind.INVALID, "too long", engine_param))
        with pytest.raises(ApiError) as caught:
            await generation.first_updates()
        return caught.value

    assert asyncio.run(refused("prompt")).param == "messages"
    assert asyncio.run(refused("max_tokens")).param == "max_completion_tokens"
    assert asyncio.run(refused("temperature")).param == "temperature"
