"""The shape of the code: no import cycles at import time, and engine and cache modules kept small.

Both checks read the source with `ast` and import nothing, so they are fast and need no torch.

An import "runs at import time" when it is a statement of the module body (also inside a module-level
`if`, `try`, `with` or class body), not inside a function, and not under `if TYPE_CHECKING:`. Those are
the imports that can meet a half-initialised module: a cycle of them works only as long as every
module in it happens to be entered from the right end, and breaks the day someone imports another
one first. An import moved into the function that needs it, or under TYPE_CHECKING for annotations,
does not count.
"""

from __future__ import annotations

import ast
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("router", "worker", "kernels", "bench")  # the distribution's packages (pyproject.toml)
SIZE_LIMITED = ("worker/engine", "worker/cache")
MAX_LINES = 300


def module_files() -> dict[str, Path]:
    """Dotted module name -> file, for every module of the repository's packages."""
    modules = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            modules[".".join(parts)] = path
    return modules


def _is_type_checking(test: ast.expr) -> bool:
    """`TYPE_CHECKING` or `typing.TYPE_CHECKING` (or any `<x>.TYPE_CHECKING`)."""
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def import_time_imports(tree: ast.Module) -> list[ast.Import | ast.ImportFrom]:
    """The import statements that run when the module is imported (see the module docstring)."""
    found: list[ast.Import | ast.ImportFrom] = []

    def visit(statements: list[ast.stmt]) -> None:
        for node in statements:
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                found.append(node)
            elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                continue  # runs when called, not when imported
            elif isinstance(node, ast.If):
                if not _is_type_checking(node.test):
                    visit(node.body)
                visit(node.orelse)
            elif isinstance(node, ast.Try) or type(node).__name__ == "TryStar":
                visit(node.body)
                for handler in node.handlers:
                    visit(handler.body)
                visit(node.orelse)
                visit(node.finalbody)
            elif isinstance(node, (ast.With, ast.AsyncWith, ast.ClassDef, ast.For, ast.While)):
                visit(node.body)
                visit(getattr(node, "orelse", []))

    visit(tree.body)
    return found


def _resolve(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    """The absolute module an ImportFrom names (relative imports resolved against `module`)."""
    if not node.level:
        return node.module or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def import_graph(modules: dict[str, Path]) -> dict[str, set[str]]:
    """Module -> the repository modules it imports at import time.

    `import a.b` and `from a.b import c` both load a.b (an edge to it); `from a.b import c` loads a.b.c
    too when c is a module. Parent packages are loaded first as well but are left out: a package
    `__init__` that imports its own submodules is the ordinary layout, and its submodules importing a
    sibling through the package finds it already in sys.modules."""
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        targets: set[str] = set()
        for node in import_time_imports(tree):
            if isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names)
            else:
                source = _resolve(name, path.name == "__init__.py", node)
                targets.add(source)
                targets.update(f"{source}.{alias.name}" for alias in node.names)
        graph[name] = {t for t in targets if t in modules and t != name}
    return graph


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected group of two or more modules (Tarjan), each sorted, as one cycle."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[list[str]] = []

    def connect(node: str) -> None:  # recursion depth is bounded by the number of modules (~200)
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph[node]):
            if target not in index:
                connect(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for node in sorted(graph):
        if node not in index:
            connect(node)
    return sorted(groups)


def _describe(group: list[str], graph: dict[str, set[str]]) -> str:
    members = set(group)
    edges = [f"{a} -> {b}" for a in group for b in sorted(graph[a] & members)]
    return "{" + ", ".join(group) + "}: " + "; ".join(edges)


# --------------------------------------------------------------------------- the checker checks itself

def test_the_cycle_finder_sees_a_cycle_and_ignores_what_does_not_run_at_import():
    source = (
        "from typing import TYPE_CHECKING\n"
        "import pkg.a\n"
        "if TYPE_CHECKING:\n    import pkg.c\n"
        "else:\n    import pkg.d\n"
        "try:\n    from . import e\nexcept ImportError:\n    pass\n"
        "def later():\n    import pkg.f\n"
        "class K:\n    from pkg import g\n"
    )
    found = import_time_imports(ast.parse(source))
    names = {alias.name for node in found for alias in node.names} | {
        node.module for node in found if isinstance(node, ast.ImportFrom)}
    assert {"pkg.a", "pkg.d", "e", "g"} <= names
    assert "pkg.c" not in names and "pkg.f" not in names
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert import_cycles(graph) == [["a", "b", "c"]]


def test_relative_imports_resolve_against_the_module_or_package():
    node = ast.parse("from ..cache import kv_manager").body[0]
    assert _resolve("worker.engine.scheduler", False, node) == "worker.cache"
    assert _resolve("worker.engine", True, ast.parse("from . import scheduler").body[0]) == "worker.engine"


# --------------------------------------------------------------------------- the repository

def test_no_import_cycles_at_import_time():
    graph = import_graph(module_files())
    cycles = import_cycles(graph)
    assert not cycles, "import cycles (move an import into the function that needs it, under TYPE_CHECKING, " \
                       "or the shared piece into a module both import):\n" + \
                       "\n".join(_describe(group, graph) for group in cycles)


def _too_long() -> dict[str, int]:
    lengths = {}
    for folder in SIZE_LIMITED:
        for path in sorted((ROOT / folder).rglob("*.py")):
            count = len(path.read_text().splitlines())
            if count > MAX_LINES:
                lengths[str(path.relative_to(ROOT))] = count
    return lengths


def test_the_size_limited_folders_exist():
    # A rename of worker/engine or worker/cache must not turn the size check into one that checks nothing.
    for folder in SIZE_LIMITED:
        assert len(list((ROOT / folder).glob("*.py"))) >= 3, folder


def test_no_engine_or_cache_module_over_300_lines():
    too_long = _too_long()
    assert not too_long, f"over {MAX_LINES} lines (split along a seam): {too_long}"
