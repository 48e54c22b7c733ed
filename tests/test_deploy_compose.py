"""compose.yaml and the image recipe: what a user relies on when they run `docker compose up`.

Routers wait for healthy workers, nobody is SIGKILLed before its drain ends, models come from a
mounted Hugging Face cache, the monitoring profile mounts files that exist, and the image pins the
tested versions, runs as a non-root user and leaves the virtualenv and results out of its context.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).parent.parent
COMPOSE = yaml.safe_load((ROOT / "compose.yaml").read_text())
SERVICES = COMPOSE["services"]
ROUTERS = ["router", "cpu-router"]
WORKERS = ["worker-0", "worker-1", "cpu-worker"]


def seconds(duration: str) -> float:
    match = re.fullmatch(r"(\d+)(s|m)", duration)
    assert match, f"unexpected duration {duration!r}"
    return int(match[1]) * (60 if match[2] == "m" else 1)


def flag(command: str, name: str) -> float:
    match = re.search(rf"{name}[ =](\S+)", command)
    assert match, f"{name} missing from {command!r}"
    return float(match[1])


@pytest.mark.parametrize("name", ROUTERS)
def test_routers_wait_for_healthy_workers_and_have_a_healthcheck(name):
    router = SERVICES[name]
    assert "/health" in " ".join(router["healthcheck"]["test"])
    workers = [w for w in WORKERS if set(SERVICES[w]["profiles"]) & set(router["profiles"])]
    assert workers and {w: {"condition": "service_healthy"} for w in workers} == router["depends_on"]


@pytest.mark.parametrize("name", WORKERS)
def test_workers_have_a_healthcheck_that_allows_model_loading(name):
    check = SERVICES[name]["healthcheck"]
    assert "/health" in " ".join(check["test"]) and seconds(check["start_period"]) >= 300


@pytest.mark.parametrize("name,drain_flag", [(n, "--drain-timeout") for n in ROUTERS] +
                                             [(n, "--shutdown-timeout") for n in WORKERS])
def test_stop_grace_period_outlasts_the_drain(name, drain_flag):
    service = SERVICES[name]
    assert seconds(service["stop_grace_period"]) > flag(service["command"], drain_flag)


def test_routers_discover_the_workers_of_their_profile():
    assert "gpu-worker" in SERVICES["worker-0"]["networks"]["default"]["aliases"]
    assert flag_host(SERVICES["router"]["command"]) == "gpu-worker"
    assert flag_host(SERVICES["cpu-router"]["command"]) == "cpu-worker"


def flag_host(command: str) -> str:
    return re.search(r"--worker-dns[ =](\S+):\d+", command)[1]


@pytest.mark.parametrize("name", WORKERS)
def test_workers_mount_the_hugging_face_cache_at_hf_home(name):
    volumes = SERVICES[name]["volumes"]
    assert any(re.fullmatch(r"\$\{HF_CACHE:-[^}]+\}:/models/hf(:ro)?", v) for v in volumes), volumes
    assert "HF_HOME=/models/hf" in (ROOT / "Dockerfile").read_text()


def test_monitoring_profile_mounts_files_that_exist():
    for name in ("prometheus", "grafana"):
        service = SERVICES[name]
        assert service["profiles"] == ["monitoring"]
        for volume in service["volumes"]:
            source = volume.split(":")[0]
            assert (ROOT / source).exists(), f"{name} mounts {source}, which does not exist"


def test_image_pins_the_tested_versions():
    cuda = (ROOT / "deploy/docker/constraints-cuda.txt").read_text()
    cpu = (ROOT / "deploy/docker/constraints-cpu.txt").read_text()
    assert re.search(r"^torch==2\.11\.", cuda, re.M) and re.search(r"^triton==3\.6\.", cuda, re.M)
    assert re.search(r"^torch==2\.13\.0\+cpu$", cpu, re.M) and "triton" not in cpu.split("#")[-1]
    for line in (cuda + cpu).splitlines():
        assert not line.strip() or line.startswith("#") or "==" in line, f"unpinned: {line}"
    for requirement in (ROOT / "deploy/docker/requirements.txt").read_text().splitlines():
        if requirement and not requirement.startswith("#"):
            assert re.search(rf"^{re.escape(requirement)}==", cpu, re.M | re.I), requirement


def test_image_runs_as_non_root_with_a_healthcheck():
    dockerfile = (ROOT / "Dockerfile").read_text()
    users = re.findall(r"^USER (\S+)", dockerfile, re.M)
    assert users and users[-1] not in ("root", "0")
    assert re.search(r"^HEALTHCHECK .*\n.*/health", dockerfile, re.M)
    assert "gcc" in dockerfile  # Triton's launcher is compiled at the first kernel launch


def test_dockerignore_keeps_the_build_context_small():
    ignored = set((ROOT / ".dockerignore").read_text().split())
    assert {".venv", ".git", "results", "checkpoints"} <= ignored
