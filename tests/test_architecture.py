"""docs/ARCHITECTURE.md against the code: every name the page gives must be the code's, and its tables whole.

The page is what a newcomer reads first; a path that moved or a metric that was renamed sends them
looking for something that is not there. So every file path the page names must exist, and each of its
contract tables (the `/load` keys, the engine messages, the metrics, the endpoints, the commands, the
executors, the policies, the benchmarks) must list exactly what the code defines: a name added to the
code without a line on the page fails here too, naming the line to add. No server is started: the
modules are imported and their tables, registries and dataclasses read.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGE = ROOT / "docs" / "ARCHITECTURE.md"


@pytest.fixture(scope="module")
def page() -> str:
    return PAGE.read_text()


def section(page: str, title: str) -> str:
    """The text under the heading that contains `title`, up to the next heading of its level or above."""
    lines = page.splitlines()
    for start, line in enumerate(lines):
        match = re.match(r"(#+) ", line)
        if match and title in line:
            level = len(match.group(1))
            body = []
            for following in lines[start + 1:]:
                heading = re.match(r"(#+) ", following)
                if heading and len(heading.group(1)) <= level:
                    break
                body.append(following)
            return "\n".join(body)
    raise AssertionError(f"docs/ARCHITECTURE.md has no heading containing {title!r}")


def tables(text: str) -> list[list[list[str]]]:
    """The markdown tables in `text`, each a list of body rows (header and rule left out), each row its cells."""
    found, current = [], []
    for line in text.splitlines() + [""]:
        if line.startswith("|"):
            current.append([cell.strip() for cell in line.strip().strip("|").split("|")])
        elif current:
            found.append(current[2:])  # current[0] is the header, current[1] the rule
            current = []
    return found


def code(cell: str) -> str:
    """The first `code span` of a cell ('' when there is none)."""
    match = re.search(r"`([^`]+)`", cell)
    return match.group(1) if match else ""


def first_column(text: str, which: int = 0) -> list[str]:
    return [code(row[0]) for row in tables(text)[which]]


def module_of(path: str) -> str:
    """`worker/server/cli.py` -> `worker.server.cli`."""
    return path.removesuffix(".py").replace("/", ".")


# --------------------------------------------------------------------------- the parsing helpers

def test_the_helpers_read_a_section_table():
    text = "# A\n## B `x`\n| k | v |\n|---|---|\n| `one` | 1 |\n| `two` | 2 |\n\n## C\n| `three` |\n"
    body = section(text, "B `x`")
    assert "three" not in body
    assert first_column(body) == ["one", "two"]
    with pytest.raises(AssertionError):
        section(text, "missing")


# --------------------------------------------------------------------------- paths

_BACKTICKED_PATH = re.compile(r"`([\w.-]+/[\w./-]*|[\w-]+\.(?:py|md|yaml|yml|json|toml|sh))`")
_BARE_PATH = re.compile(r"(?<![\w./`-])((?:[\w-]+/)+[\w.-]+\.(?:py|md|yaml|yml|json|toml|sh))\b")


def named_paths(page: str) -> set[str]:
    """Repository paths the page names: code spans holding a path, and bare `dir/file.ext` words."""
    paths = {p for p in _BACKTICKED_PATH.findall(page) if not p.startswith("/")}
    paths.update(_BARE_PATH.findall(page))
    return paths


def test_every_path_the_page_names_exists(page):
    paths = named_paths(page)
    assert len(paths) > 40, sorted(paths)  # the request walk alone names more; fewer means the regex broke
    missing = sorted(p for p in paths if not (ROOT / p).exists())
    assert not missing, f"docs/ARCHITECTURE.md names paths that do not exist: {missing}"


def test_the_path_finder_sees_code_spans_and_bare_paths():
    text = "see `worker/engine/scheduler.py`, `bench/locust/`, bench/reports/README.md and `compose.yaml`; not `/load`"
    assert named_paths(text) == {"worker/engine/scheduler.py", "bench/locust/", "bench/reports/README.md",
                                 "compose.yaml"}


# --------------------------------------------------------------------------- contracts

def test_load_keys_are_the_load_report_fields(page):
    from worker.contracts import LOAD_KEYS, LoadReport

    listed = first_column(section(page, "`GET /load`"))
    assert listed == list(LOAD_KEYS)  # the same keys, in the order the worker writes them
    assert list(LoadReport().to_json()) == listed


def test_engine_messages_are_the_dataclasses_of_engine_messages(page):
    from worker.server import engine_messages

    defined = {name for name, value in vars(engine_messages).items()
               if isinstance(value, type) and dataclasses.is_dataclass(value)
               and value.__module__ == engine_messages.__name__}
    listed = first_column(section(page, "Engine messages"))
    assert sorted(listed) == sorted(defined)


def _worker_families() -> dict[str, str]:
    from worker.engine.protocol import EngineStats
    from worker.server.metrics import PREFIX, WorkerMetrics

    metrics = WorkerMetrics("m", prefix="radixfleet")
    metrics.set_stats(EngineStats(num_running=1, num_waiting=0, kv_tokens_used=1, kv_tokens_total=2,
                                  cache_hit_tokens=0, cache_query_tokens=0, num_preemptions=0))
    return {family.name: family.type for family in metrics.registry.collect() if family.name.startswith(PREFIX)}


def _router_wire_names() -> set[str]:
    """The router's metric names as scraped: a counter family's name with its `_total`."""
    from router.app import RouterState
    from router.config import RouterConfig

    state = RouterState(RouterConfig(worker_urls=["http://127.0.0.1:1"]))
    return {family.name + "_total" if family.type == "counter" else family.name
            for family in state.registry.collect()}


def test_worker_metrics_are_the_families_the_worker_registers(page):
    families = _worker_families()
    listed = first_column(section(page, "Worker metrics"))
    assert sorted(listed) == sorted(families)
    for row in tables(section(page, "Worker metrics"))[0]:  # the type column says what the code registers
        assert row[1].split()[0].strip(",") == families[code(row[0])], row


def test_router_metrics_are_the_families_the_collector_exports(page):
    assert sorted(first_column(section(page, "Router metrics"))) == sorted(_router_wire_names())


def test_every_metric_name_anywhere_on_the_page_exists(page):
    worker = set(_worker_families())
    known = worker | {name + "_total" for name in worker} | _router_wire_names()
    named = set(re.findall(r"radixfleet(?::|_router_)[a-z_]+[a-z]", page))
    assert named, "the page names no metric"
    assert not sorted(named - known), sorted(named - known)


def _routes(source: Path) -> set[str]:
    """`METHOD /path` of every route an aiohttp app module adds (catch-all routes left out)."""
    text = source.read_text()
    return {f"{method.upper()} {path}" for method, path in re.findall(r'add_(get|post|delete)\("([^"]+)"', text)}


def test_endpoints_are_the_routes_of_worker_and_router(page):
    rows = tables(section(page, "Endpoints"))[0]
    router = {code(row[0]) for row in rows if row[1] == "yes"}
    worker = {code(row[0]) for row in rows if row[2] == "yes"}
    assert router == _routes(ROOT / "router" / "app.py")
    assert worker == _routes(ROOT / "worker" / "server" / "app.py")


def test_commands_are_the_cli_subcommands_and_their_modules(page):
    from worker.cli import SUBCOMMANDS

    rows = tables(section(page, "Commands"))[0]
    listed = {code(row[0]).removeprefix("radixfleet "): module_of(code(row[1])) for row in rows}
    assert listed == {name: module for name, (module, _help) in SUBCOMMANDS.items()}


def test_benchmarks_are_the_bench_subcommands(page):
    from bench.cli import BENCHMARKS

    listed = [name.removeprefix("radixfleet bench ") for name in first_column(section(page, "Benchmarks"))]
    assert sorted(listed) == sorted(BENCHMARKS)


def test_executors_are_the_registered_ones_and_their_modules(page):
    from worker.executor.registry import EXECUTOR_CLASSES

    rows = tables(section(page, "Executors"))[0]
    listed = {code(row[0]): module_of(code(row[1])) for row in rows}
    assert listed == {name: path.partition(":")[0] for name, path in EXECUTOR_CLASSES.items()}


def test_policies_are_the_worker_queues_and_the_router_policies(page):
    from router.policies import POLICY_NAMES
    from worker.config import POLICIES
    from worker.engine.waiting_queue import POLICIES as QUEUE_POLICIES

    text = section(page, "Where each policy and setting lives")
    assert first_column(text, 0) == list(POLICIES) == list(QUEUE_POLICIES)
    assert first_column(text, 1) == list(POLICY_NAMES)


def test_the_settings_classes_the_page_points_at_exist(page):
    from router.config import RouterConfig
    from worker.config import EngineConfig

    text = section(page, "Where each policy and setting lives")
    for cls, path in ((EngineConfig, "worker/config.py"), (RouterConfig, "router/config.py")):
        assert f"`{cls.__name__}` in `{path}`" in text
        assert module_of(path) == cls.__module__
