"""The shape of the library: `core` never imports the app, and its module-level imports form no
cycle (a cycle kept alive by imports inside functions is how the loader once depended on the
organism that depends on the loader)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CORE = ROOT / "core"


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _resolve(module: str, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    package = module.split(".")
    is_package = (ROOT.joinpath(*package) / "__init__.py").is_file()
    base = package if is_package else package[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join([*base, *([node.module] if node.module else [])])


def _top_level_imports(path: Path) -> set[str]:
    """Modules imported when ``path`` is imported: top-level statements only, skipping
    ``if TYPE_CHECKING:`` blocks (function bodies run later and cannot make an import cycle)."""
    module = _module_name(path)
    found: set[str] = set()

    def visit(statements: list[ast.stmt]) -> None:
        for node in statements:
            if isinstance(node, ast.Import):
                found.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = _resolve(module, node)
                found.add(base)
                found.update(f"{base}.{alias.name}" for alias in node.names)
            elif isinstance(node, ast.If):
                test = ast.unparse(node.test)
                if "TYPE_CHECKING" not in test:
                    visit(node.body)
                visit(node.orelse)
            elif isinstance(node, (ast.Try,)):
                visit(node.body)
                for handler in node.handlers:
                    visit(handler.body)
                visit(node.orelse)
                visit(node.finalbody)
    visit(ast.parse(path.read_text(encoding="utf-8")).body)
    return found


def _graph() -> dict[str, set[str]]:
    files = {_module_name(p): p for p in CORE.rglob("*.py")}
    graph = {}
    for name, path in files.items():
        graph[name] = {m for m in _top_level_imports(path) if m in files and m != name}
    return graph


def test_core_never_imports_the_app() -> None:
    offenders = []
    for path in CORE.rglob("*.py"):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):  # anywhere, function bodies included
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else [])
            for n in names:
                if n.split(".")[0] in ("ui", "pages", "streamlit", "app"):
                    offenders.append(f"{path.relative_to(ROOT)} imports {n}")
    assert not offenders, offenders


def test_no_import_cycle_in_core() -> None:
    graph = _graph()
    state: dict[str, int] = {}
    stack: list[str] = []

    def dfs(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                cycle = dfs(nxt)
                if cycle:
                    return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = dfs(node)
            assert cycle is None, " -> ".join(cycle)


def test_the_cycle_finder_finds_a_cycle(tmp_path, monkeypatch) -> None:
    """The check above must be able to fail: a planted two-module cycle is reported."""
    pkg = tmp_path / "core"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from core import b\n")
    (pkg / "b.py").write_text("import core.a\n")
    monkeypatch.setattr(__import__(__name__), "ROOT", tmp_path)
    monkeypatch.setattr(__import__(__name__), "CORE", pkg)
    with pytest.raises(AssertionError, match="core.a -> core.b -> core.a|core.b -> core.a -> core.b"):
        test_no_import_cycle_in_core()


def test_loader_does_not_know_the_organism() -> None:
    """The named-source catalog sits above the loader: loading code never imports the organism."""
    graph = _graph()
    for module in ("core.models", "core.loader"):
        if module in graph:
            assert not any(m.startswith("core.organism") for m in graph[module]), graph[module]
