"""The import boundaries that keep the layers apart, checked on the real package.

* The provider side (``oauthmig.provider``, ``oauthmig.models``) runs inside the OAuth server:
  importing it loads no Alembic, click or rich. The redirect rules and audit load no Alembic.
  Checked in fresh interpreters, on ``sys.modules``.
* The package's import graph (runtime imports only: ``if TYPE_CHECKING:`` blocks are left out)
  has no cycle, and no function imports an ``oauthmig`` module (the usual way to hide a cycle)
  unless a comment on or above the import says why. Checked on the source with ``ast``.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "oauthmig"


def _loaded_after_import(modules: list[str]) -> set[str]:
    """Top-level names in ``sys.modules`` after a fresh interpreter imports ``modules``."""
    code = (
        "import importlib, json, sys\n"
        f"for name in {modules!r}:\n"
        "    importlib.import_module(name)\n"
        "print(json.dumps(sorted({m.split('.')[0] for m in sys.modules})))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr
    loaded: list[str] = json.loads(done.stdout)
    return set(loaded)


def _modules_of(package: str) -> list[str]:
    folder = PACKAGE.joinpath(*package.split(".")[1:])
    inside = sorted(f"{package}.{p.stem}" for p in folder.glob("*.py") if p.stem != "__init__")
    return [package, *inside]


def test_provider_side_loads_no_alembic_click_or_rich() -> None:
    modules = [*_modules_of("oauthmig.provider"), "oauthmig.models"]
    assert {"oauthmig.provider.models", "oauthmig.provider.pkce"} <= set(modules)
    loaded = _loaded_after_import(modules)
    assert "sqlalchemy" in loaded  # the check sees what was imported
    assert not loaded & {"alembic", "click", "rich"}, sorted(loaded & {"alembic", "click", "rich"})


def test_redirect_rules_and_audit_load_no_alembic() -> None:
    modules = _modules_of("oauthmig.redirects")
    assert {"oauthmig.redirects.audit", "oauthmig.redirects.reports"} <= set(modules)
    loaded = _loaded_after_import(modules)
    assert "sqlalchemy" in loaded
    assert "alembic" not in loaded


# --------------------------------------------------------------------------- the import graph


@dataclass(frozen=True)
class Import:
    """One runtime import of an ``oauthmig`` module."""

    source: str  # importing module
    target: str  # imported module
    line: int
    local: bool  # inside a function or class body
    explained: bool  # a comment (not a bare noqa) on the import's line or the line above


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _resolve(name: str, modules: set[str]) -> str | None:
    """The module ``name`` is, or the module that defines it (``oauthmig.x.func`` -> x)."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def _imports(path: Path, modules: set[str]) -> list[Import]:
    source = path.read_text()
    lines = source.splitlines()
    found: list[Import] = []
    me = _module_name(path)
    package = me if path.name == "__init__.py" else me.rpartition(".")[0]

    def explained(lineno: int) -> bool:
        above = lines[lineno - 2].strip() if lineno >= 2 else ""
        comments = [lines[lineno - 1].partition("#")[2], above[1:] if above[:1] == "#" else ""]
        return any(c.strip() and not c.strip().startswith(("noqa", "type:")) for c in comments)

    def absolute(node: ast.ImportFrom) -> str:
        if node.level == 0:
            return node.module or ""
        base = package.split(".")
        base = base[: len(base) - (node.level - 1)]
        return ".".join([*base, *([node.module] if node.module else [])])

    scopes = ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef

    def visit(node: ast.AST, local: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                for stmt in child.orelse:
                    visit(stmt, local)
                continue
            if isinstance(child, ast.Import | ast.ImportFrom):
                names: list[str] = []
                if isinstance(child, ast.Import):
                    names = [a.name for a in child.names]
                else:
                    names = [f"{absolute(child)}.{a.name}" for a in child.names]
                for name in names:
                    target = _resolve(name, modules) if name.startswith("oauthmig") else None
                    if target is not None and target != me:
                        found.append(
                            Import(me, target, child.lineno, local, explained(child.lineno))
                        )
                continue
            visit(child, local or isinstance(child, scopes))

    visit(ast.parse(source, str(path)), False)
    return found


@pytest.fixture(scope="module")
def graph() -> list[Import]:
    paths = sorted(PACKAGE.rglob("*.py"))
    modules = {_module_name(p) for p in paths}
    edges: list[Import] = []
    for path in paths:
        edges.extend(_imports(path, modules))
    assert len(modules) > 30 and len(edges) > 60, "the walk found too little to be meaningful"
    return edges


def _cycle(edges: list[Import]) -> list[str] | None:
    """One import cycle (as a module path ending where it starts), or None."""
    after: dict[str, set[str]] = {}
    for e in edges:
        after.setdefault(e.source, set()).add(e.target)
        # Importing a.b.c first runs the packages a and a.b.
        parts = e.target.split(".")
        for i in range(1, len(parts)):
            after.setdefault(e.target, set()).add(".".join(parts[:i]))
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def walk(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(after.get(node, ())):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt]
            if nxt not in state and (found := walk(nxt)) is not None:
                return found
        path.pop()
        state[node] = 2
        return None

    for start in sorted(after):
        if start not in state and (found := walk(start)) is not None:
            return found
    return None


def test_cycle_finder_finds_a_cycle() -> None:
    def edge(a: str, b: str) -> Import:
        return Import(a, b, 1, False, False)

    assert _cycle([edge("p.a", "p.b"), edge("p.b", "p.c")]) is None
    assert _cycle([edge("p.a", "p.b"), edge("p.b", "p.c"), edge("p.c", "p.a")]) == [
        "p.a",
        "p.b",
        "p.c",
        "p.a",
    ]
    # A package whose __init__ imports a submodule that imports the package back.
    assert _cycle([edge("p", "p.m"), edge("p.m", "q")]) == ["p", "p.m", "p"]


def test_the_package_import_graph_has_no_cycle(graph: list[Import]) -> None:
    cycle = _cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle or ())


def test_no_function_local_oauthmig_import_without_a_reason(graph: list[Import]) -> None:
    hidden = [
        f"{e.source}:{e.line} imports {e.target}" for e in graph if e.local and not e.explained
    ]
    assert not hidden, "function-local imports (move them to the top): " + "; ".join(hidden)
