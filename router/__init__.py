"""radixfleet router: one process in front of the workers, sending each request where its prefix is cached.

Module map (one job each):
  cli.py              `radixfleet router` flags, generated from RouterConfig -> app.serve
  config.py           RouterConfig, every setting and its validation
  listen.py           can the router listen on --host/--port (checked before anything starts)
  app.py              aiohttp app: endpoints, the auth middleware, admin API (/workers), lifecycle, drain
  request_parsing.py  read a body once: validate, routing text, session key
  responses.py        the router's own JSON answers and OpenAI error responses
  tree.py             PrefixTree: per-worker approximate cache of routing text (xxhash chunks, LRU)
  policies.py         cache_aware, round_robin, random, power_of_two, least_load, session (pure);
                      a policy that reads the workers' trees also updates them (`dispatched`)
  sessions.py         SessionTable: session pins with expiry (pure)
  worker_pool.py      WorkerState / WorkerPool: load counters, /load report, tree, breaker (pure)
  health.py           CircuitBreaker (pure) and HealthMonitor (polls /health and /load)
  proxy.py            forward with retries before the first byte; byte-for-byte streaming
  upstream.py         lean keep-alive HTTP/1.1 client used on the hot path
  discovery.py        DNS discovery (one name, many workers)
  metrics.py          radixfleet_router_*: live counters, read by a prometheus-client collector at scrape
  launcher.py         `radixfleet up`: workers + router, prefixed logs, restarts, clean stop

Contracts shared with the worker (JSON codec, OpenAI error body, the /load report): worker/contracts.py.
"""
