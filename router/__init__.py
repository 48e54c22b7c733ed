"""radixfleet router: one process in front of the workers, sending each request where its prefix is cached.

Module map (one job each):
  cli.py              `radixfleet router` arguments -> RouterConfig -> app.serve
  config.py           RouterConfig, every setting and its validation
  app.py              aiohttp app: endpoints, auth, admin API (/workers), lifecycle, graceful drain
  request_parsing.py  read a body once: validate, routing text, session key; OpenAI error bodies
  tree.py             PrefixTree: per-worker approximate cache of routing text (xxhash chunks, LRU)
  policies.py         cache_aware, round_robin, random, power_of_two, least_load, session (pure)
  sessions.py         SessionTable: session pins with expiry (pure)
  worker_pool.py      WorkerState / WorkerPool: load counters, /load report, tree, breaker (pure)
  health.py           CircuitBreaker (pure) and HealthMonitor (polls /health and /load)
  proxy.py            forward with retries before the first byte; byte-for-byte streaming
  upstream.py         lean keep-alive HTTP/1.1 client used on the hot path
  discovery.py        DNS discovery (one name, many workers)
  metrics.py          radixfleet_router_* Prometheus text
  launcher.py         `radixfleet up`: workers + router, prefixed logs, restarts, clean stop
"""
