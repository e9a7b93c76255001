"""The built wheel and sdist are complete: installed non-editable, the CLI runs anywhere.

The sdist is built from the repository and the wheel from that sdist (as ``python -m build``
does), so a file missing from either fails here. The wheel goes into a fresh virtualenv that
sees no repository: its third-party dependencies come from this test run's own environment
(appended to ``sys.path`` after the venv's site-packages, so the wheel's ``oauthmig`` wins and
no network is needed), and every command runs from an empty temporary directory.
"""

from __future__ import annotations

import json
import os
import shutil
import site
import subprocess
import sys
import tarfile
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
# One worker builds the wheel and venv (module fixture) and runs every test here, first.
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("packaging")]


def _shipped_files() -> dict[str, str]:
    """Installed path in the wheel -> path in the repository, for every non-module file the
    CLI reads at run time and every revision."""
    files = {
        "oauthmig/py.typed": "oauthmig/py.typed",
        "oauthmig/docs/rules.md": "docs/rules.md",
        "oauthmig/revisions/env.py": "revisions/env.py",
        "oauthmig/revisions/script.py.mako": "revisions/script.py.mako",
    }
    for path in sorted((REPO / "docs" / "schemas").glob("*.schema.json")):
        files[f"oauthmig/docs/schemas/{path.name}"] = f"docs/schemas/{path.name}"
    for path in sorted((REPO / "revisions" / "versions").glob("*.py")):
        files[f"oauthmig/revisions/versions/{path.name}"] = f"revisions/versions/{path.name}"
    for path in sorted((REPO / "oauthmig").glob("*.py")):
        files[f"oauthmig/{path.name}"] = f"oauthmig/{path.name}"
    return files


@dataclass(frozen=True)
class Installed:
    """A fresh venv with the wheel installed, and what was built."""

    wheel: Path
    sdist: Path
    python: Path
    cli: Path
    venv: Path


def _run(args: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def _clean_env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OAUTHMIG_", "PYTHON"))}
    env.pop("VIRTUAL_ENV", None)
    env["HOME"] = str(home)
    env["NO_COLOR"] = "1"
    return env


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Installed]:
    """Build sdist + wheel (offline, no build isolation) and install the wheel into a new venv."""
    root = tmp_path_factory.mktemp("packaging")
    dist = root / "dist"
    env = _clean_env(root)
    # A clean copy of the checkout: build leftovers (an old *.egg-info/SOURCES.txt) would let
    # setuptools find files that a fresh clone's build would miss.
    source = root / "source"
    shutil.copytree(
        REPO,
        source,
        ignore=shutil.ignore_patterns(
            ".git",
            ".venv",
            "*.egg-info",
            "build",
            "dist",
            "__pycache__",
            ".*_cache",
            ".oauthmig",
            ".hypothesis",  # written by property tests, perhaps right now by another worker
        ),
    )
    # python -m build makes the sdist, then the wheel from the unpacked sdist.
    built = _run(
        [sys.executable, "-m", "build", "--no-isolation", "--outdir", str(dist), str(source)],
        root,
        env,
    )
    assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-3000:]
    wheels = list(dist.glob("oauthmig-*.whl"))
    sdists = list(dist.glob("oauthmig-*.tar.gz"))
    assert len(wheels) == 1 and len(sdists) == 1, sorted(p.name for p in dist.iterdir())

    venv = root / "venv"
    made = _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], root, env)
    assert made.returncode == 0, made.stderr
    python = venv / "bin" / "python"
    purelib = _run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], root, env
    )
    target_site = Path(purelib.stdout.strip())
    # Dependencies (click, SQLAlchemy, alembic, rich, psycopg) from this environment, appended
    # after the venv's own site-packages. A .pth line only extends sys.path: the .pth files of
    # that directory (such as an editable install of oauthmig) are not processed.
    deps = [p for p in site.getsitepackages() if Path(p).is_dir()]
    (target_site / "oauthmig_test_deps.pth").write_text("\n".join(deps) + "\n")
    pip = _run(
        [
            sys.executable,
            "-m",
            "pip",
            "--python",
            str(python),
            "install",
            "--no-deps",
            "--no-index",
            "--no-compile",
            str(wheels[0]),
        ],
        root,
        env,
    )
    assert pip.returncode == 0, pip.stdout[-2000:] + pip.stderr[-2000:]
    yield Installed(wheels[0], sdists[0], python, venv / "bin" / "oauthmig", venv)


def test_wheel_holds_every_file_the_cli_needs(installed: Installed) -> None:
    with zipfile.ZipFile(installed.wheel) as wheel:
        names = set(wheel.namelist())
        missing = sorted(set(_shipped_files()) - names)
        assert not missing, f"missing from the wheel: {missing}"
        for inside, source in _shipped_files().items():
            assert wheel.read(inside) == (REPO / source).read_bytes(), inside
        # Only the package: no stray top-level revisions/ or docs/ in site-packages.
        assert {n.split("/")[0] for n in names} == {
            "oauthmig",
            f"{installed.wheel.name.split('-')[0]}-{installed.wheel.name.split('-')[1]}.dist-info",
        }


def test_sdist_holds_the_revisions_and_docs(installed: Installed) -> None:
    with tarfile.open(installed.sdist) as sdist:
        prefix = sdist.getnames()[0].split("/")[0]
        names = {n.removeprefix(prefix + "/") for n in sdist.getnames()}
    needed = {source for source in _shipped_files().values()} | {
        "pyproject.toml",
        "README.md",
        "config.example.toml",
        "tests/conftest.py",
    }
    assert not sorted(needed - names), f"missing from the sdist: {sorted(needed - names)}"


def test_installed_wheel_runs_from_an_empty_directory(installed: Installed, tmp_path: Path) -> None:
    work = tmp_path / "empty"
    work.mkdir()
    env = _clean_env(tmp_path)

    where = _run(
        [str(installed.python), "-c", "import oauthmig; print(oauthmig.__file__)"], work, env
    )
    assert where.returncode == 0, where.stderr
    assert Path(where.stdout.strip()).is_relative_to(installed.venv), where.stdout

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        result = _run([str(installed.cli), *args], work, env)
        assert result.returncode == 0, (args, result.stdout[-2000:], result.stderr[-2000:])
        assert "Traceback" not in result.stderr, result.stderr
        return result

    history = cli("history")
    assert "0001" in history.stdout and "0004" in history.stdout
    offline = cli("upgrade", "--sql")
    assert "-- ===== database: control" in offline.stdout
    assert "code_challenge" in offline.stdout
    assert not (work / ".oauthmig").exists() or not any((work / ".oauthmig").iterdir())

    cli("demo", "--apps", "60", "--tokens", "300")
    status = cli("status", "--format", "json")
    assert json.loads(status.stdout)
    schema = Path(
        _run(
            [
                str(installed.python),
                "-c",
                "from oauthmig.resources import json_schema; print(json_schema('status'))",
            ],
            work,
            env,
        ).stdout.strip()
    )
    assert schema.is_relative_to(installed.venv), schema
    assert json.loads(schema.read_text())["$schema"].endswith("/draft/2020-12/schema")

    sarif = cli("audit-redirects", "--format", "sarif", "--fail-on", "never")
    document = json.loads(sarif.stdout)
    assert document["version"] == "2.1.0"
    assert document["runs"][0]["results"], "the demo data holds findings"
    assert all(rule["helpUri"] for rule in document["runs"][0]["tool"]["driver"]["rules"])

    helped = cli("audit-redirects", "--help")
    assert "docs/rules.md" not in helped.stdout.replace("oauthmig/docs/rules.md", "")
    rules_md = Path(
        _run(
            [
                str(installed.python),
                "-c",
                "from oauthmig.resources import rules_doc; print(rules_doc())",
            ],
            work,
            env,
        ).stdout.strip()
    )
    assert rules_md.is_relative_to(installed.venv) and rules_md.read_text().startswith("#")


def test_a_wheel_without_its_revisions_fails_early_with_one_line(
    installed: Installed, tmp_path: Path
) -> None:
    """A broken install (revisions removed) is a one-line error, and demo creates nothing."""
    work = tmp_path / "empty"
    work.mkdir()
    env = _clean_env(tmp_path)
    site_dir = Path(
        _run(
            [
                str(installed.python),
                "-c",
                "import oauthmig, os; print(os.path.dirname(oauthmig.__file__))",
            ],
            work,
            env,
        ).stdout.strip()
    )
    env_py = site_dir / "revisions" / "env.py"
    saved = env_py.read_bytes()
    env_py.unlink()
    try:
        for args in (["history"], ["upgrade", "--sql"], ["demo", "--apps", "5", "--tokens", "5"]):
            result = _run([str(installed.cli), *args], work, env)
            assert result.returncode == 2, (args, result.stderr)
            assert "Traceback" not in result.stderr
            assert "installed without its revisions" in result.stderr
            assert len(result.stderr.strip().splitlines()) == 1, result.stderr
        assert not (work / ".oauthmig").exists(), "demo created databases before failing"
    finally:
        env_py.write_bytes(saved)
