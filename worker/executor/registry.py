"""Executors by name: `--executor NAME` picks one of these, imported only when it is chosen.

The table holds "module:Class" strings rather than classes so that naming an executor never imports
torch, Triton or CUDA (the CLI and the config checks read the names on machines with none of them).
Every class listed takes the same constructor, `Executor(model_path, config: EngineConfig)`
(see worker.executor.base); adding an executor is one line here.
"""

from __future__ import annotations

import importlib

EXECUTOR_CLASSES: dict[str, str] = {
    "cpu": "worker.executor.cpu:CPUExecutor",  # torch reference ops, KV in host memory
    "cuda": "worker.executor.cuda:CUDAExecutor",  # Triton kernels, CUDA graphs
    "sim": "worker.executor.sim:SimExecutor",  # a cost model, no tensors
}


def executor_class(name: str) -> type:
    """The executor class registered as `name` (KeyError naming the known ones when there is none)."""
    try:
        path = EXECUTOR_CLASSES[name]
    except KeyError:
        raise KeyError(f"unknown executor {name!r}; known: {', '.join(EXECUTOR_CLASSES)}") from None
    module_name, _, attribute = path.partition(":")
    return getattr(importlib.import_module(module_name), attribute)
