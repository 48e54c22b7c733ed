"""The engine's check of a request's prompt ids (worker.engine.llm_engine.LLMEngine._validate_lengths)."""

import numpy as np
import pytest
from sim_helpers import write_profile

from worker.config import EngineConfig
from worker.engine.llm_engine import LLMEngine
from worker.engine.protocol import EngineRequest
from worker.sampling_params import InvalidParameter, SamplingParams


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    home = tmp_path_factory.mktemp("sim-home")
    mp = pytest.MonkeyPatch()
    mp.setenv("RADIXFLEET_HOME", str(home))
    engine = LLMEngine(EngineConfig(model="tiny-qwen3", executor="sim", sim_profile=str(write_profile(home)),
                                    kv_cache_tokens=8192, progress=False))
    yield engine
    mp.undo()


def add(engine, ids, request_id="r"):
    engine.add_request(EngineRequest(request_id, ids, SamplingParams(max_tokens=1)))
    engine.abort_request(request_id)


@pytest.mark.parametrize("bad", [[5, -1, 7], [5, None, 7], [1.0, 2], [5, np.int64(3)], ["7"]], ids=repr)
def test_ids_that_are_not_vocabulary_integers_are_refused_naming_the_prompt(engine, bad):
    with pytest.raises(InvalidParameter) as error:
        add(engine, bad)
    assert error.value.param == "prompt"


def test_the_vocabulary_bounds_are_exact(engine):
    vocab = engine.model_config.vocab_size
    add(engine, [0, vocab - 1])  # both ends are fine
    with pytest.raises(InvalidParameter, match=r"\[0, %d\)" % vocab):
        add(engine, [0, vocab])


def test_bools_pass_as_before_since_they_are_ints(engine):
    add(engine, [True, 3, False])
