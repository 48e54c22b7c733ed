"""`radixfleet router` flags: generated from RouterConfig, and mistakes answered before anything starts."""

import dataclasses
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from router.cli import FOREIGN_FLAGS, config_from_args, flag_name
from router.config import RouterConfig
from worker.cli import build_parser

ROOT = Path(__file__).parent.parent
FIELDS = [item.name for item in dataclasses.fields(RouterConfig)]


def parse(*argv: str):
    parser, _ = build_parser(["router", *argv])
    return parser.parse_args(["router", *argv])


def router_cli(*argv: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "worker.cli", "router", *argv], capture_output=True, text=True,
                          timeout=60, cwd=ROOT, env={**os.environ, "RADIXFLEET_API_KEY": "",
                                                     "RADIXFLEET_ADMIN_KEY": "", **(env or {})})


def test_every_setting_has_a_flag_defaulting_to_the_dataclass(monkeypatch):
    monkeypatch.delenv("RADIXFLEET_API_KEY", raising=False)
    monkeypatch.delenv("RADIXFLEET_ADMIN_KEY", raising=False)
    assert config_from_args(parse()) == RouterConfig()
    names = {flag_name(name) for name in FIELDS}
    assert len(names) == len(FIELDS), "two settings would share a flag"
    assert {"--session-ttl", "--drain-timeout", "--health-timeout", "--breaker-cooldown", "--max-sessions",
            "--chars-per-token", "--failure-threshold", "--worker-scheme"} <= names


def test_flags_reach_the_config():
    config = config_from_args(parse("--worker-urls", "http://a:1,http://b:2", "http://c:3", "--port", "9001",
                                    "--policy", "round_robin", "--health-timeout", "0.5", "--max-sessions", "10",
                                    "--breaker-cooldown", "7", "--worker-scheme", "https", "--api-key", "k"))
    assert config.worker_urls == ["http://a:1", "http://b:2", "http://c:3"]
    assert (config.port, config.policy, config.health_timeout_s, config.max_sessions) == (9001, "round_robin", 0.5, 10)
    assert (config.breaker_cooldown_s, config.worker_scheme, config.api_key) == (7.0, "https", "k")


def test_keys_come_from_the_environment_and_help_never_shows_them(monkeypatch):
    monkeypatch.setenv("RADIXFLEET_API_KEY", "sk-secret")
    assert config_from_args(parse()).api_key == "sk-secret"
    monkeypatch.setenv("RADIXFLEET_API_KEY", "")
    assert config_from_args(parse()).api_key is None, "an empty variable means no key"
    out = router_cli("--help", env={"RADIXFLEET_API_KEY": "sk-secret"})
    assert out.returncode == 0 and "sk-secret" not in out.stdout and "$RADIXFLEET_API_KEY" in out.stdout
    for name in FIELDS:  # argparse wraps help text, so look at it as one line
        text = " ".join(out.stdout.split())
        assert flag_name(name) in text
    assert " ".join(out.stdout.split()).count("(default:") == len(FIELDS) + 1, "every flag shows its default"


def test_an_unknown_flag_gets_the_router_usage_and_the_closest_flag():
    out = router_cli("--worker-urls", "http://127.0.0.1:1", "--polcy", "random")
    assert out.returncode == 2
    assert out.stderr.startswith("usage: radixfleet router")
    assert "did you mean --policy?" in out.stderr
    out = router_cli("http://127.0.0.1:1")
    assert out.returncode == 2 and "--worker-urls" in out.stderr.splitlines()[-1]


@pytest.mark.parametrize("flag", ["--prometheus-port", "--max-payload-size"])
def test_another_routers_flag_says_what_to_use_in_one_line(flag):
    out = router_cli("--worker-urls", "http://127.0.0.1:1", f"{flag}=9000")
    assert out.returncode == 2
    assert out.stderr.splitlines() == [f"radixfleet router: {flag} is not a radixfleet router flag: "
                                       f"{FOREIGN_FLAGS[flag]}"]


def test_a_port_in_use_exits_at_once_with_one_line_naming_port():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        # The worker url is unreachable: were the router to start, it would run until the timeout.
        out = router_cli("--worker-urls", "http://127.0.0.1:1", "--host", "127.0.0.1", "--port", str(port))
    assert out.returncode == 2
    lines = out.stderr.splitlines()
    assert len(lines) == 1 and "--port" in lines[0] and str(port) in lines[0] and "Traceback" not in out.stderr
