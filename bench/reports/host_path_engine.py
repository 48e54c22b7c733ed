"""The engine's own host CPU per doc-QA request, in-process: LLMEngine on the sim executor with its modelled
waits skipped (defer_wait), the served bench's prompts tokenized up front, 64 in flight (closed loop), one
untimed pass first (documents cached). No HTTP, no IPC: what the engine process's step loop costs alone.

    OMP_NUM_THREADS=1 PYTHONPATH=TREE python bench/reports/host_path_engine.py [REQUESTS] [--profile]
"""

import cProfile
import pstats
import sys
import time
import uuid

from bench.locust.workloads import DocQA
from worker.config import EngineConfig
from worker.engine.llm_engine import LLMEngine
from worker.engine.protocol import EngineRequest
from worker.sampling_params import SamplingParams

CONCURRENCY = 64


def closed_loop(engine: LLMEngine, prompts: list[list[int]]) -> tuple[int, int]:
    """(requests done, steps) for `prompts` with CONCURRENCY in flight."""
    pending = iter(prompts)
    done = steps = 0

    def add() -> None:
        prompt = next(pending, None)
        if prompt is not None:
            params = SamplingParams(max_tokens=32, temperature=0.6, ignore_eos=True)
            engine.add_request(EngineRequest(uuid.uuid4().hex, prompt, params))

    for _ in range(CONCURRENCY):
        add()
    while engine.has_unfinished():
        steps += 1
        for output in engine.step():
            if output.finish_reason is not None:
                done += 1
                add()
    return done, steps


def main() -> int:
    count = int(next((a for a in sys.argv[1:] if a.isdigit()), 512))
    engine = LLMEngine(EngineConfig(model="qwen3-0.6b", executor="sim", sim_profile="h200-qwen3-0.6b",
                                    max_model_len=8192, progress=False))
    engine.executor.defer_wait = True
    tokenizer = engine.tokenizer
    workload = DocQA(0, 32, documents=48, doc_chars=16000, zipf=0.8)
    prompts = []
    for i in range(2 * count):
        session = workload.session(i)
        text = tokenizer.apply_chat_template([{"role": "system", "content": session.system},
                                              {"role": "user", "content": session.user_turns[0]}])
        prompts.append(tokenizer.encode(text, add_special_tokens=False))
    closed_loop(engine, prompts[count:])
    profiler = cProfile.Profile() if "--profile" in sys.argv else None
    started = time.process_time()
    if profiler:
        profiler.enable()
    done, steps = closed_loop(engine, prompts[:count])
    if profiler:
        profiler.disable()
    cpu = time.process_time() - started
    print(f"{done} requests, {steps} steps: {1000 * cpu / done:.2f} ms CPU per request, {1000 * cpu / steps:.2f} per step")
    if profiler:
        pstats.Stats(profiler).sort_stats("tottime").print_stats(25)
    return 0


if __name__ == "__main__":
    sys.exit(main())
