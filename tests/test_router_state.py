"""Pure pieces of the router state: circuit breaker, session pins, request parsing, worker pool."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from router.config import RouterConfig
from router.health import CircuitBreaker
from router.request_parsing import BadRequest, chat_routing_text, parse_request
from router.sessions import SessionTable
from router.worker_pool import LoadReport, WorkerPool, normalize_url


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


# --- circuit breaker --------------------------------------------------------------------------------

def test_breaker_opens_after_threshold_and_half_opens_after_cooldown():
    b = CircuitBreaker(failure_threshold=3, base_cooldown_s=2, max_cooldown_s=5)
    b.record_failure(0.0)
    b.record_failure(0.1)
    assert b.allows(0.2), "two failures: still closed"
    b.record_failure(0.2)
    assert not b.allows(1.0) and b.state(1.0) == "open"
    assert b.allows(2.3) and b.state(2.3) == "half_open"
    b.record_failure(2.3)  # the probe failed: reopen for twice as long
    assert not b.allows(5.0) and b.allows(6.4)
    b.record_failure(6.4)
    assert not b.allows(11.3) and b.allows(11.5), "cooldown is capped at max_cooldown_s"
    b.record_success()
    assert b.state(11.5) == "closed" and b.consecutive_failures == 0


def test_hard_failure_opens_at_once_and_success_resets_the_count():
    b = CircuitBreaker(failure_threshold=3, base_cooldown_s=1)
    b.record_failure(0.0)
    b.record_success()
    b.record_failure(0.0)
    b.record_failure(0.0)
    assert b.allows(0.0)
    b.record_failure(0.0, hard=True)
    assert not b.allows(0.5)


def test_failed_poll_keeps_a_worker_down_until_a_poll_succeeds():
    b = CircuitBreaker(base_cooldown_s=1)
    b.record_poll(False, 0.0, hard=True)
    assert not b.allows(100.0), "no half-open probing while /health says no"
    b.record_poll(True, 100.0)
    assert b.allows(100.0)


# --- sessions -------------------------------------------------------------------------------------------

def test_pins_expire_after_ttl_since_last_use():
    clock = FakeClock()
    table = SessionTable(ttl_s=10, clock=clock)
    table.pin("s", "http://a")
    clock.now = 9
    assert table.get("s") == "http://a"
    table.pin("s", "http://a")  # used again: expiry restarts
    clock.now = 18
    assert table.get("s") == "http://a"
    clock.now = 30
    assert table.get("s") is None and len(table) == 0


def test_pin_table_is_bounded_and_cleans_up():
    clock = FakeClock()
    table = SessionTable(ttl_s=10, max_sessions=3, clock=clock)
    for key in "abcd":
        table.pin(key, f"http://{key}")
    assert len(table) == 3 and table.get("a") is None
    assert table.unpin_worker("http://b") == 1
    clock.now = 11
    assert table.expire() == 2 and len(table) == 0
    with pytest.raises(ValueError):
        SessionTable(ttl_s=0)


# --- request parsing ------------------------------------------------------------------------------------

def test_chat_routing_text_keeps_message_order_and_boundaries():
    a = chat_routing_text([{"role": "user", "content": "ab"}, {"role": "user", "content": "c"}])
    b = chat_routing_text([{"role": "user", "content": "a"}, {"role": "user", "content": "bc"}])
    assert a != b
    parts = chat_routing_text([{"role": "user", "content": [{"type": "text", "text": "x"},
                                                             {"type": "text", "text": "y"}]}])
    assert "xy" in parts
    longer = chat_routing_text([{"role": "system", "content": "S"}, {"role": "user", "content": "q"}])
    assert longer.startswith(chat_routing_text([{"role": "system", "content": "S"}])), \
        "a conversation's routing text extends its earlier turns' (prefix property)"


def test_parse_request_fields_and_session_precedence():
    raw = b'{"model":"m","prompt":"hello","stream":true,"user":"u1","max_tokens":5}'
    parsed = parse_request(raw, "completion", None)
    assert parsed.routing_text == "hello" and parsed.stream and parsed.session_key == "u1"
    assert parse_request(raw, "completion", "hdr").session_key == "hdr", "the header wins over 'user'"
    tokens = parse_request(b'{"prompt":[1,2,3]}', "completion", None).routing_text
    assert tokens == parse_request(b'{"prompt":[1,2,3,4]}', "completion", None).routing_text[:len(tokens)]
    for bad, param in ((b"", None), (b"{", None), (b'{"prompt": 5}', "prompt"), (b'{"prompt": []}', "prompt"),
                       (b'{"prompt": "x", "max_tokens": true}', "max_tokens")):
        with pytest.raises(BadRequest) as info:
            parse_request(bad, "completion", None)
        assert info.value.param == param and info.value.message


@given(st.binary(max_size=200))
def test_parse_request_never_crashes_on_garbage(raw):
    try:
        parse_request(raw, "chat", None)
    except BadRequest:
        pass


# --- worker pool and config -----------------------------------------------------------------------------

def test_worker_urls_are_validated_and_ids_are_stable():
    assert normalize_url(" http://h:1/ ") == "http://h:1"
    for bad in ("h:1", "ftp://h", "http://h:1/v1", ""):
        with pytest.raises(ValueError):
            normalize_url(bad)
    pool = WorkerPool()
    a = pool.add("http://a:1")
    assert pool.add("http://a:1/") is a
    b = pool.add("http://b:1")
    pool.remove("http://a:1")
    c = pool.add("http://c:1")
    assert (a.worker_id, b.worker_id, c.worker_id) == ("w0", "w1", "w2"), "ids are never reused"
    assert a.removed and not a.routable(0.0)


def test_load_report_validation_and_worker_load():
    report = LoadReport.from_json({"running": 3, "waiting": 2, "kv_tokens_total": 1000})
    assert report.kv_tokens_total == 1000
    with pytest.raises(ValueError, match="running"):
        LoadReport.from_json({"running": "many"})
    pool = WorkerPool()
    w = pool.add("http://a:1")
    w.on_dispatch(10)
    assert w.load == 1
    w.report = report
    assert w.load == 5, "the worker's own count wins when other routers feed it"


def test_config_errors_name_the_flag():
    with pytest.raises(ValueError, match="--worker-urls"):
        RouterConfig().validate()
    with pytest.raises(ValueError, match="--policy"):
        RouterConfig(worker_urls=["http://a:1"], policy="magic").validate()
    with pytest.raises(ValueError, match="--worker-dns"):
        RouterConfig(worker_dns="nohostport").validate()
    RouterConfig(admin_key="k").validate()  # workers may come later through the admin API
