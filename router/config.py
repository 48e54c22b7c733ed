"""RouterConfig: every router setting in one place, with the CLI defaults."""

from __future__ import annotations

from dataclasses import dataclass, field

from router.policies import (
    DEFAULT_BALANCE_ABS,
    DEFAULT_BALANCE_REL,
    DEFAULT_CACHE_THRESHOLD,
    DEFAULT_REQUEST_COST_TOKENS,
    POLICY_NAMES,
)
from router.tree import DEFAULT_CHARS_PER_TOKEN, DEFAULT_CHUNK_CHARS
from router.worker_pool import DEFAULT_KV_TOKENS
from worker.server.access_log import check_mode as check_access_log_mode
from worker.server.limits import MAX_BODY_BYTES


@dataclass
class RouterConfig:
    worker_urls: list[str] = field(default_factory=list)
    host: str = "0.0.0.0"
    port: int = 8000
    policy: str = "cache_aware"
    # cache_aware
    cache_threshold: float = DEFAULT_CACHE_THRESHOLD
    balance_abs_threshold: int = DEFAULT_BALANCE_ABS
    balance_rel_threshold: float = DEFAULT_BALANCE_REL
    request_cost_tokens: float = DEFAULT_REQUEST_COST_TOKENS
    chunk_chars: int = DEFAULT_CHUNK_CHARS
    chars_per_token: float = DEFAULT_CHARS_PER_TOKEN
    default_kv_tokens: int = DEFAULT_KV_TOKENS
    # sessions
    session_header: str = "X-Session-ID"
    session_ttl_s: float = 1800.0
    max_sessions: int = 100_000
    # serving
    max_retries: int = 2
    connect_timeout_s: float = 5.0
    read_timeout_s: float = 600.0  # a non-streamed answer, whole (streams: the reliability block below)
    max_body_bytes: int = MAX_BODY_BYTES  # the worker's limit too (worker/server/limits.py)
    health_interval_s: float = 1.0
    health_timeout_s: float = 2.0
    failure_threshold: int = 3
    breaker_cooldown_s: float = 2.0
    drain_timeout_s: float = 30.0
    # security
    api_key: str | None = None
    admin_key: str | None = None
    # discovery
    worker_dns: str | None = None  # "hostname:port"
    dns_interval_s: float = 5.0
    worker_scheme: str = "http"
    # reliability
    # Streamed requests: longest wait for the worker's response head, i.e. its queueing plus prefill up to
    # the first token. A healthy GPU worker prefills a 128k-token prompt in well under 30 s, a CPU one or
    # a worker at its --max-waiting-requests bound takes longer; 60 s is above both, and ten times sooner
    # than read_timeout_s to notice a worker that accepted but does not answer. Non-streamed requests
    # get their head only when the whole generation is done, so they keep read_timeout_s.
    first_byte_timeout_s: float = 60.0
    # Longest silence between two pieces of a streamed body. A running stream sends a token every decode
    # step (tens of ms); a preempted one waits for KV to free, which under overload takes seconds.
    inter_chunk_timeout_s: float = 60.0
    # sent to the workers as "Authorization: Bearer KEY" (workers started with --api-key)
    worker_api_key: str | None = None
    # hung workers: a worker whose /health times out is taken out of rotation at once; after this many
    # timeouts in a row it is marked down and its unfinished requests are retried elsewhere. A worker
    # marked down that way is routable again only after `health_readmit_after` good polls in a row.
    health_down_after: int = 2
    health_readmit_after: int = 2
    # overload: at most `max_active_requests` proxied at once; the next `max_queued_requests` wait up to
    # `queue_timeout_s` for a slot; beyond either the router answers 503 with Retry-After.
    max_active_requests: int = 4096
    max_queued_requests: int = 4096
    queue_timeout_s: float = 30.0
    # slow clients: a connection must send a complete request head within `header_timeout_s` of opening
    # (or of its previous answer, when kept alive), and its body within `body_timeout_s`.
    header_timeout_s: float = 15.0
    body_timeout_s: float = 60.0
    # open client connections at most (beyond: 503 and close); 0 derives it from the open-file limit
    max_connections: int = 0
    # observability: one line per request on stderr, "json", "text" or "off" (router/access_log.py)
    access_log: str = "off"

    def validate(self) -> None:
        """Raise ValueError naming the bad setting and how to fix it."""
        if self.policy not in POLICY_NAMES:
            raise ValueError(f"--policy {self.policy!r} is unknown: choose one of {', '.join(POLICY_NAMES)}")
        if not 0 <= self.port <= 65535:
            raise ValueError(f"--port must be between 0 and 65535, got {self.port}")
        if not self.worker_urls and not self.worker_dns and self.admin_key is None:
            raise ValueError("no workers: give --worker-urls URL... and/or --worker-dns HOST:PORT, "
                             "or --admin-key to add them later with POST /workers")
        if not 0 <= self.cache_threshold <= 1:
            raise ValueError("--cache-threshold must be between 0 and 1")
        if self.balance_abs_threshold < 0 or self.balance_rel_threshold < 1:
            raise ValueError("--balance-abs-threshold must be >= 0 and --balance-rel-threshold >= 1")
        if self.max_retries < 0:
            raise ValueError("--max-retries must be >= 0")
        if self.max_body_bytes < 1024:
            raise ValueError("--max-body-bytes must be at least 1024")
        if self.worker_dns is not None:
            host, _, port = self.worker_dns.rpartition(":")
            if not host or not port.isdigit():
                raise ValueError(f"--worker-dns {self.worker_dns!r} must be HOST:PORT, e.g. worker:8000")
        if self.first_byte_timeout_s <= 0 or self.inter_chunk_timeout_s <= 0:
            raise ValueError("first_byte_timeout_s and inter_chunk_timeout_s must be > 0 (seconds)")
        if not self.session_header:
            raise ValueError("--session-header must not be empty")
        self.validate_protection()

    def validate_protection(self) -> None:
        """The overload and slow-client settings (the block at the end of the fields)."""
        if self.max_active_requests < 1 or self.max_queued_requests < 0:
            raise ValueError("--max-active-requests must be >= 1 and --max-queued-requests >= 0")
        if self.queue_timeout_s <= 0 or self.header_timeout_s <= 0 or self.body_timeout_s <= 0:
            raise ValueError("--queue-timeout, --header-timeout and --body-timeout must be > 0 (seconds)")
        if self.max_connections < 0:
            raise ValueError("--max-connections must be >= 0 (0: derived from the open-file limit)")
        if self.health_down_after < 1 or self.health_readmit_after < 1:
            raise ValueError("--health-down-after and --health-readmit-after must be >= 1 (polls)")
        check_access_log_mode(self.access_log)
