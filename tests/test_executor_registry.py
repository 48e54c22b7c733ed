"""Executors by name: `--executor NAME` resolves through one table, and every executor is built the same way."""

import importlib
import inspect

import pytest

from worker.config import EXECUTORS, ConfigError, EngineConfig
from worker.engine.llm_engine import create_executor
from worker.executor import registry
from worker.executor.base import Executor


class RecordingExecutor:
    """Stands in for an executor: records how create_executor built it."""

    def __init__(self, model_path, config):
        self.model_path, self.config = model_path, config


def _importable(name: str) -> bool:
    module_name = registry.EXECUTOR_CLASSES[name].partition(":")[0]
    return importlib.util.find_spec(module_name) is not None


def test_every_executor_the_cli_offers_is_registered():
    assert set(EXECUTORS) - {"auto"} == set(registry.EXECUTOR_CLASSES)


@pytest.mark.parametrize("name", sorted(registry.EXECUTOR_CLASSES))
def test_registered_executors_share_one_constructor(name):
    if not _importable(name):
        pytest.skip(f"{registry.EXECUTOR_CLASSES[name]} is not in this tree")
    cls = registry.executor_class(name)
    assert issubclass(cls, Executor) and cls.name == name
    params = list(inspect.signature(cls.__init__).parameters.values())[1:]
    assert [p.name for p in params[:2]] == ["model_path", "config"]
    assert all(p.default is not inspect.Parameter.empty for p in params[2:])  # extras are optional


def test_create_executor_builds_the_named_class_from_path_and_config(monkeypatch, tmp_path):
    monkeypatch.setitem(registry.EXECUTOR_CLASSES, "recording", f"{__name__}:RecordingExecutor")
    config = EngineConfig(executor="recording")
    executor = create_executor(config, tmp_path)
    assert isinstance(executor, RecordingExecutor)
    assert executor.model_path == tmp_path and executor.config is config


def test_auto_follows_the_device(monkeypatch, tmp_path):
    monkeypatch.setitem(registry.EXECUTOR_CLASSES, "cpu", f"{__name__}:RecordingExecutor")
    assert isinstance(create_executor(EngineConfig(device="cpu"), tmp_path), RecordingExecutor)


def test_an_unknown_executor_is_a_config_error_naming_the_known_ones(tmp_path):
    with pytest.raises(ConfigError, match="unknown executor 'warp'.*cpu, cuda"):
        create_executor(EngineConfig(executor="warp"), tmp_path)
    with pytest.raises(ConfigError, match="--executor must be one of auto, cpu, cuda"):
        EngineConfig(executor="warp").validate()
