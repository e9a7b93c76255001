"""The import boundaries that keep the layers apart, checked on the real package.

* The provider side (``oauthmig.provider``, ``oauthmig.models``) runs inside the OAuth server:
  importing it loads no Alembic, click or rich. The redirect rules and audit load no Alembic.
  Checked in fresh interpreters, on ``sys.modules``.
* The package's import graph, type-only imports (``if TYPE_CHECKING:``) included, has no cycle
  between modules nor between packages, and no function imports an ``oauthmig`` module (the
  usual way to hide a cycle) unless a comment on or above the import says why.
* Every import follows the layer table (:data:`LAYERS`): a unit imports only units of lower
  layers, plus the few edges :data:`ALLOWED` names with their reason. Checked on the source
  with ``ast``; a planted violation proves the check can fail.
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
    """Top-level names of the packages a fresh interpreter loaded to import ``modules``."""
    imports = "".join(f"import {name}\n" for name in modules)
    return {m.split(".")[0] for m in _loaded_by(imports)}


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
    assert {"oauthmig.redirects.audit", "oauthmig.redirects.rules"} <= set(modules)
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
    type_only: bool = False  # under ``if TYPE_CHECKING:``


def _module_name(path: Path, root: Path = PACKAGE) -> str:
    parts = path.relative_to(root.parent).with_suffix("").parts
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


def _imports(path: Path, modules: set[str], root: Path = PACKAGE) -> list[Import]:
    source = path.read_text()
    lines = source.splitlines()
    found: list[Import] = []
    me = _module_name(path, root)
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

    def visit(node: ast.AST, local: bool, type_only: bool = False) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                for stmt in child.body:
                    visit(ast.Module(body=[stmt], type_ignores=[]), local, True)
                for stmt in child.orelse:
                    visit(ast.Module(body=[stmt], type_ignores=[]), local, type_only)
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
                            Import(
                                me,
                                target,
                                child.lineno,
                                local,
                                explained(child.lineno),
                                type_only,
                            )
                        )
                continue
            visit(child, local or isinstance(child, scopes), type_only)

    visit(ast.parse(source, str(path)), False)
    return found


def _graph(root: Path) -> list[Import]:
    paths = sorted(root.rglob("*.py"))
    modules = {_module_name(p, root) for p in paths}
    edges: list[Import] = []
    for path in paths:
        edges.extend(_imports(path, modules, root))
    return edges


@pytest.fixture(scope="module")
def graph() -> list[Import]:
    edges = _graph(PACKAGE)
    modules = {e.source for e in edges} | {e.target for e in edges}
    assert len(modules) > 30 and len(edges) > 60, "the walk found too little to be meaningful"
    assert any(e.type_only for e in edges), "type-only imports must be part of the graph"
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


def _units(edges: list[Import]) -> list[Import]:
    """The edges between units (a subpackage, or a top-level module), inside-unit ones left out."""
    return [
        Import(_unit(e.source), _unit(e.target), e.line, e.local, e.explained, e.type_only)
        for e in edges
        if _unit(e.source) != _unit(e.target)
    ]


def test_the_package_level_graph_has_no_cycle(graph: list[Import]) -> None:
    cycle = _cycle(_units(graph))
    assert cycle is None, "import cycle between packages: " + " -> ".join(cycle or ())


#: Modules whose functions import what they need when they run, the one exception to "imports
#: at the top", with the reason. The command line starts with every ``oauthmig`` call (``--help``
#: and ``check-redirect`` included): a command loads its services, and with them SQLAlchemy,
#: Alembic, psycopg, the demo data or the HTML report, only when it runs.
DEFERRED_IMPORTS = {
    "oauthmig.cli": "each command imports its services and renderers when it runs",
    "oauthmig.cli_options": "settings and consoles load when a command runs, not for --help",
}


def test_no_function_local_oauthmig_import_without_a_reason(graph: list[Import]) -> None:
    hidden = [
        f"{e.source}:{e.line} imports {e.target}"
        for e in graph
        if e.local and not e.explained and e.source not in DEFERRED_IMPORTS
    ]
    assert not hidden, "function-local imports (move them to the top): " + "; ".join(hidden)


# --------------------------------------------------------------------------- the CLI's start

#: All that ``import oauthmig.cli`` may load beyond the standard library: click and the light
#: modules the command line is declared with (options, errors, configuration parsing, JSON).
CLI_AT_IMPORT = {
    "click",
    "oauthmig",
    "oauthmig.cli",
    "oauthmig.cli_options",
    "oauthmig.config",
    "oauthmig.errors",
    "oauthmig.output",
    "oauthmig.output.json",
    "oauthmig.output.streams",
    "oauthmig.redact",
    "oauthmig.uri",
}


def _loaded_by(code: str) -> set[str]:
    """What a fresh interpreter has loaded after running ``code``: every ``oauthmig`` module by
    its name, every other package beyond the standard library by its top-level name."""
    script = (
        f"{code}\n"
        "import json, sys\n"
        "print(json.dumps(sorted(m for m in sys.modules if not m.startswith('_'))))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr
    loaded: list[str] = json.loads(done.stdout.splitlines()[-1])
    return {
        m if m.startswith("oauthmig") else m.split(".")[0]
        for m in loaded
        if m.split(".")[0] not in sys.stdlib_module_names
    }


def test_importing_the_cli_loads_no_service() -> None:
    loaded = _loaded_by("import oauthmig.cli")
    assert "oauthmig.cli" in loaded  # the check sees what was imported
    assert loaded <= CLI_AT_IMPORT, sorted(loaded - CLI_AT_IMPORT)


def _command_loads(*args: str) -> set[str]:
    """What running ``oauthmig ARGS`` (in this interpreter's environment) loaded."""
    return _loaded_by(
        "import contextlib, io, sys\n"
        "from oauthmig.cli import run\n"
        "with contextlib.redirect_stdout(io.StringIO()):\n"
        f"    code = run({list(args)!r})\n"
        "assert code in (0, 1), code"
    )


def test_each_command_loads_what_it_needs_only() -> None:
    help_loaded = _command_loads("--help")
    assert not {m.split(".")[0] for m in help_loaded} & {"rich", "sqlalchemy", "alembic"}
    check = _command_loads("check-redirect", "https://app.example.com/cb")
    assert "oauthmig.redirects.rules" in check and "rich" in {m.split(".")[0] for m in check}
    assert not {m.split(".")[0] for m in check} & {"sqlalchemy", "alembic", "psycopg"}, sorted(
        check
    )
    history = _command_loads("history")
    assert "alembic" in {m.split(".")[0] for m in history}  # it reads the revision scripts
    heavy = {
        "oauthmig.demo",
        "oauthmig.html_report",
        "oauthmig.redirects.audit",
        "oauthmig.prune",
        "oauthmig.rollout.backfill",
        "oauthmig.rollout.runner",
    }
    for name, loaded in (("check-redirect", check), ("history", history)):
        assert not loaded & heavy, (name, sorted(loaded & heavy))
        assert "psycopg" not in {m.split(".")[0] for m in loaded}, name


# --------------------------------------------------------------------------- the layer table

#: Each unit (a top-level module, or a subpackage with everything inside it) and its layer.
#: A unit imports only units of a lower layer (and :data:`ALLOWED`); nothing imports upward or
#: sideways. The README's "Development" section draws the same table.
LAYERS: dict[str, int] = {
    "oauthmig.errors": 0,
    # 1: leaves that import nothing of oauthmig but the errors
    "oauthmig": 1,  # the version
    "oauthmig.redact": 1,
    "oauthmig.failures": 1,
    "oauthmig.family": 1,
    "oauthmig.columns": 1,
    "oauthmig.resources": 1,
    "oauthmig.uri": 1,
    # 2: settings
    "oauthmig.config": 2,
    # 3-5: databases, the tables every command reads, and the preflight every service runs
    "oauthmig.db": 3,
    "oauthmig.table_columns": 3,  # one reflection of the oauthmig tables, shared by readers
    "oauthmig.legacy": 3,
    "oauthmig.observation_table": 3,  # revision 0007's table: provider writes, rollout reads
    "oauthmig.revision_types": 3,
    "oauthmig.version_tables": 4,
    "oauthmig.pooler": 4,
    "oauthmig.same_database": 4,
    "oauthmig.runlock": 4,
    "oauthmig.privileges": 4,
    "oauthmig.preflight": 5,
    # 6: the services, apart from each other
    "oauthmig.rollout": 6,
    "oauthmig.redirects": 6,
    "oauthmig.provider": 6,
    "oauthmig.prune": 6,
    # 7: what combines services
    "oauthmig.models": 7,  # the provider's models under their short name
    "oauthmig.html_report": 7,  # the HTML report's data: status plus the audit
    # 8: renderers and file writers
    "oauthmig.output": 8,
    # 9-12: the programs
    "oauthmig.demo": 9,
    "oauthmig.cli_options": 10,  # the options and how click parses them
    "oauthmig.cli": 11,
    "oauthmig.__main__": 12,
}

#: The pure redirect modules (no database): what other services may share.
PURE_REDIRECTS = (
    "oauthmig.redirects.rules",
    "oauthmig.redirects.rule_types",
    "oauthmig.redirects.metadata_rules",
    "oauthmig.redirects.hosts",
)

#: Sideways edges allowed on purpose: (importing module prefix, imported module) -> why.
ALLOWED: dict[tuple[str, str], str] = {
    **{
        ("oauthmig.provider", m): "the provider validates URIs with the audit's pure rules"
        for m in PURE_REDIRECTS
    },
    ("oauthmig.rollout.jobs", "oauthmig.redirects.rules"): (
        "the app_type backfill infers with the audit's pure inference (one fact, one place)"
    ),
}


def _unit(module: str) -> str:
    parts = module.split(".")
    return ".".join(parts[:2]) if len(parts) > 2 else module


def _layer_violations(edges: list[Import], layers: dict[str, int]) -> list[str]:
    found: list[str] = []
    seen: set[tuple[str, str]] = set()
    for e in edges:
        src, dst = _unit(e.source), _unit(e.target)
        if src == dst:
            continue
        if src not in layers or dst not in layers:
            found.append(f"{e.source} -> {e.target}: place {src if src not in layers else dst}")
            continue
        if layers[dst] < layers[src]:
            continue
        if any(e.source.startswith(a) and e.target == b for a, b in ALLOWED):
            continue
        if (e.source, e.target) in seen:
            continue
        seen.add((e.source, e.target))
        kind = " (type-only)" if e.type_only else ""
        where = "sideways" if layers[dst] == layers[src] else "upward"
        found.append(f"{e.source}:{e.line} imports {e.target}{kind}: {where}, {src} -> {dst}")
    return found


def test_every_unit_has_a_layer(graph: list[Import]) -> None:
    units = {_unit(_module_name(p)) for p in PACKAGE.rglob("*.py")}
    assert units == set(LAYERS), (
        f"unplaced: {sorted(units - set(LAYERS))}; gone: {sorted(set(LAYERS) - units)}"
    )


def test_imports_follow_the_layer_table(graph: list[Import]) -> None:
    bad = _layer_violations(graph, LAYERS)
    assert not bad, "imports against the layer table:\n" + "\n".join(bad)


def test_a_planted_violation_fails_the_layer_check(tmp_path: Path) -> None:
    """A type-only upward import, a sideways import and a package cycle are each caught."""
    root = tmp_path / "oauthmig"
    (root / "rollout").mkdir(parents=True)
    (root / "redirects").mkdir()
    for init in (root, root / "rollout", root / "redirects"):
        (init / "__init__.py").write_text("")
    (root / "errors.py").write_text("")
    (root / "config.py").write_text(
        "from typing import TYPE_CHECKING\n"
        "from oauthmig.errors import X\n"
        "if TYPE_CHECKING:\n"
        "    from oauthmig.redirects.audit import Y\n"
    )
    (root / "redirects" / "audit.py").write_text("from oauthmig.rollout import jobs\n")
    (root / "rollout" / "jobs.py").write_text("from oauthmig.config import Z\n")
    edges = _graph(root)
    bad = _layer_violations(edges, LAYERS)
    assert bad == [
        "oauthmig.config:4 imports oauthmig.redirects.audit (type-only): upward, "
        "oauthmig.config -> oauthmig.redirects",
        "oauthmig.redirects.audit:1 imports oauthmig.rollout.jobs: sideways, "
        "oauthmig.redirects -> oauthmig.rollout",
    ]
    assert _cycle(_units(edges)) is not None
    assert _cycle(_units([e for e in edges if not e.type_only])) is None


# --------------------------------------------------------------------------- a thin CLI

#: The most lines a command's body may hold (docstring left out): parse, call one service,
#: render. Orchestration goes to the services, rendering to ``oauthmig.output``.
COMMAND_BODY_LINES = 25


def _long_commands(source: str, limit: int = COMMAND_BODY_LINES) -> list[str]:
    """The click commands in ``source`` (functions decorated ``@<group>.command`` or
    ``@<group>.group``) whose body, docstring left out, is longer than ``limit`` lines."""
    found: list[str] = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.FunctionDef):
            continue
        decorators = [d.func if isinstance(d, ast.Call) else d for d in node.decorator_list]
        if not any(
            isinstance(d, ast.Attribute) and d.attr in ("command", "group") for d in decorators
        ):
            continue
        body = node.body[1:] if ast.get_docstring(node) is not None else node.body
        while body and isinstance(body[0], ast.Import | ast.ImportFrom):
            body = body[1:]  # what the command imports when it runs (DEFERRED_IMPORTS)
        if not body:  # the group itself: its help only
            continue
        lines = (node.end_lineno or 0) - body[0].lineno + 1
        if lines > limit:
            found.append(f"{node.name}: {lines} lines")
    return found


def test_command_bodies_are_thin() -> None:
    planted = (
        "@cli.command()\n@click.option('--x')\ndef fat(x):\n    '''Help.'''\n" + "    x += 1\n" * 3
    )
    assert _long_commands(planted, limit=2) == ["fat: 3 lines"]
    assert _long_commands(planted, limit=3) == []
    long = _long_commands((PACKAGE / "cli.py").read_text())
    assert not long, f"commands over {COMMAND_BODY_LINES} lines (move the work out): {long}"
