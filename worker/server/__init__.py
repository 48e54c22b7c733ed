"""The worker's OpenAI-compatible HTTP server: one engine behind /v1/chat/completions and /v1/completions.

Two processes. The frontend (aiohttp on uvloop) speaks HTTP and text; the engine process runs
`LLMEngine.step()` and speaks token ids. Modules, by job:

  cli.py            `radixfleet worker` flags (generated from EngineConfig) -> serve.py
  serve.py          lifecycle: start the engine process, listen, drain on SIGTERM, stop
  engine_process.py the engine loop in its own process and the IPC message format
  engine_client.py  the frontend's asyncio handle on that process (submit, abort, per-request streams)
  app.py            routes, the OpenAI error middleware, /v1/models /health /load /metrics /tokenize /detokenize
  chat.py           /v1/chat/completions (chat template, streamed or not)
  completions.py    /v1/completions (prompt batches, echo, streamed or not)
  generation.py     one engine request as per-choice text updates (detokenization, stop strings)
  protocol.py       request bodies: type checks, 400s naming the field, SamplingParams
  context.py        shared state of the frontend and the length / capacity checks
  logprobs.py       the two OpenAI logprobs shapes
  streaming.py      server-sent events
  metrics.py        Prometheus metrics (radixfleet: names)
  errors.py         OpenAI error objects
  launcher.py       start a worker subprocess and wait until it serves (tests, benchmarks)
"""
