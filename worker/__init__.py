"""radixfleet worker: a continuous-batching engine with a radix-tree KV cache, and its OpenAI server.

`from worker import LLM, SamplingParams` is the offline API. Imports are lazy so that commands which do
not need torch (the router, the CLI's help) do not pay for it.
"""

__all__ = ["LLM", "SamplingParams", "EngineConfig"]


def __getattr__(name):
    if name == "LLM":
        from worker.llm import LLM

        return LLM
    if name == "SamplingParams":
        from worker.sampling_params import SamplingParams

        return SamplingParams
    if name == "EngineConfig":
        from worker.config import EngineConfig

        return EngineConfig
    raise AttributeError(name)
