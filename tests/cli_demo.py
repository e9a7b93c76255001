"""Shared demo databases and subprocess helpers for the CLI contract tests.

The demo state is built once per backend and module (setup + expand upgrade: 0004 waits for
both backfills), then used read-only by tests that only run failing commands, or copied.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select, table, text
from sqlalchemy.engine import make_url

from oauthmig.cli import run
from oauthmig.config import Settings, load_settings
from oauthmig.db import make_engine
from tests.helpers import schema_dump, write_config
from tests.helpers.databases import PG_ADMIN_URL, PgPool, routed_config

OAUTHMIG = [sys.executable, "-m", "oauthmig"]
STATE_TABLES = (
    "oauthmig_version",
    "oauthmig_revision_log",
    "oauthmig_backfill_job",
    "oauthmig_backfill_batch",
)


@dataclass(frozen=True)
class Proc:
    """Exit code and streams of one real subprocess."""

    args: tuple[str, ...]
    code: int
    out: str
    err: str


@dataclass(frozen=True)
class Demo:
    """A demo installation: its config file, settings and working directory."""

    backend: str
    config: str
    settings: Settings
    cwd: Path


def cli_env(**extra: str) -> dict[str, str]:
    """The environment for a CLI subprocess: no config from the caller, fixed width."""
    env = {k: v for k, v in os.environ.items() if k not in ("OAUTHMIG_CONFIG", "COLUMNS")}
    env.update({"COLUMNS": "80", "LINES": "25", "NO_COLOR": "1", "TERM": "dumb"}, **extra)
    return env


def run_cli(
    args: Sequence[str], cwd: Path, env: dict[str, str] | None = None, timeout: float = 120
) -> Proc:
    """Run ``python -m oauthmig ARGS`` as a real process."""
    done = subprocess.run(
        [*OAUTHMIG, *args],
        cwd=cwd,
        env=env or cli_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    return Proc(tuple(args), done.returncode, done.stdout, done.stderr)


def run_many(
    cases: Sequence[tuple[Sequence[str], Path, dict[str, str] | None]], workers: int = 4
) -> list[Proc]:
    """Run several CLI processes, a few at a time (each waits mostly on its imports)."""
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(lambda c: run_cli(c[0], c[1], c[2]), cases))


# A launcher that imports the CLI once, then forks one child per command: each child is a
# real process (own file descriptors, environment, working directory and exit status) running
# the console-script entry point, without paying ~1 s of imports per command on a loaded
# machine. Spawned with a fresh interpreter, so that nothing of pytest is inherited.
_LAUNCHER = r"""
import json, os, sys
import oauthmig.redirects.audit, oauthmig.rollout.backfill, oauthmig.cli, oauthmig.output.text
import oauthmig.demo.data, oauthmig.rollout.runner, oauthmig.rollout.status, psycopg
import sqlalchemy.dialects.postgresql.psycopg
import sqlalchemy.dialects.sqlite
jobs = [json.loads(line) for line in sys.stdin]
running = {}
codes = [None] * len(jobs)
def reap():
    pid, status = os.wait()
    codes[running.pop(pid)] = os.waitstatus_to_exitcode(status)
for i, job in enumerate(jobs):
    while len(running) >= job["workers"]:
        reap()
    pid = os.fork()
    if pid == 0:
        code = 70
        try:
            os.chdir(job["cwd"])
            os.environ.clear()
            os.environ.update(job["env"])
            for fd, path in ((1, job["out"]), (2, job["err"])):
                f = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
                os.dup2(f, fd)
                os.close(f)
            devnull = os.open(os.devnull, os.O_RDONLY)
            os.dup2(devnull, 0)
            sys.stdin = open(0, closefd=False)
            sys.stdout = open(1, "w", encoding="utf-8", closefd=False)
            sys.stderr = open(2, "w", encoding="utf-8", closefd=False)
            sys.argv = ["oauthmig", *job["args"]]
            try:
                oauthmig.cli.main()
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else 1
        except BaseException:
            import traceback
            traceback.print_exc()
        finally:
            for stream in (sys.stdout, sys.stderr):
                try:
                    stream.flush()
                except Exception:
                    pass
            os._exit(code)
    running[pid] = i
while running:
    reap()
print(json.dumps(codes))
"""


def run_forked(
    cases: Sequence[tuple[Sequence[str], Path, dict[str, str] | None]],
    scratch: Path,
    workers: int = 3,
    stdout_files: Sequence[Path | None] = (),
) -> list[Proc]:
    """Run many CLI commands as real child processes of one launcher (see ``_LAUNCHER``);
    ``workers=1`` runs them one after the other, in order. ``stdout_files[i]``, if given,
    receives the stdout of command i (as ``> FILE`` would)."""
    import json

    scratch.mkdir(parents=True, exist_ok=True)
    lines = []
    for i, (args, cwd, env) in enumerate(cases):
        job = {
            "args": list(args),
            "cwd": str(cwd),
            "env": env or cli_env(),
            "out": str(
                stdout_files[i]
                if i < len(stdout_files) and stdout_files[i] is not None
                else scratch / f"{i}.out"
            ),
            "err": str(scratch / f"{i}.err"),
            "workers": workers,
        }
        lines.append(json.dumps(job))
    done = subprocess.run(
        [sys.executable, "-c", _LAUNCHER],
        input="\n".join(lines) + "\n",
        capture_output=True,
        text=True,
        timeout=600,
        check=True,
    )
    codes = json.loads(done.stdout)
    return [
        Proc(
            tuple(args),
            codes[i],
            ""
            if i < len(stdout_files) and stdout_files[i] is not None
            else (scratch / f"{i}.out").read_text(),
            (scratch / f"{i}.err").read_text(),
        )
        for i, (args, _cwd, _env) in enumerate(cases)
    ]


def demo_installation(
    request: pytest.FixtureRequest, backend: str, folder: Path, *, apps: int = 40
) -> Iterator[Demo]:
    """Create control + shard on ``backend``, fill them with the demo's legacy data and run
    the expand upgrade (in-process: the subprocesses are what the tests look at)."""
    pool: PgPool | None = request.getfixturevalue("pg_pool") if backend == "postgresql" else None
    names = [pool.acquire(), pool.acquire()] if pool is not None else []
    if names:
        urls = [
            make_url(PG_ADMIN_URL).set(database=n).render_as_string(hide_password=False)
            for n in names
        ]
    else:
        urls = [f"sqlite:///{folder / 'control.sqlite3'}", f"sqlite:///{folder / 'shard.sqlite3'}"]
    cfg = write_config(folder / "oauthmig.toml", routed_config(*urls))
    try:
        for args in (
            ["--config", cfg, "-q", "demo", "--apps", str(apps), "--tokens", "300", "--setup-only"],
            ["--config", cfg, "-q", "upgrade"],
        ):
            code = run(args)
            assert code == 0, args
        yield Demo(backend, cfg, load_settings(cfg), folder)
    finally:
        for name in names:
            assert pool is not None
            pool.release(name)


def fingerprint(settings: Settings) -> dict[str, Any]:
    """:func:`tests.helpers.schema_dump` plus a digest of the rows of oauthmig's own state
    tables and the provider's tables, per database: equal before and after means nothing was
    written that matters."""
    out = schema_dump(settings)
    for name, db in out.items():
        engine = make_engine(settings.databases[name], settings)
        try:
            with engine.connect() as conn:
                for t, entry in db.items():
                    if t in STATE_TABLES or t.startswith("sentry_"):
                        rows = conn.execute(select(text("*")).select_from(table(t))).all()
                        digest = hashlib.sha256(repr(sorted(map(repr, rows))).encode())
                        entry["rows"] = (len(rows), digest.hexdigest())
        finally:
            engine.dispose()
    return out
