"""Every command that reads or writes a database refuses a broken one before doing anything:
half-migrated, an unknown revision or several rows in the version table, or one database
configured under two names. Exit 2, one line on stderr naming the database and the problem."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest
from sqlalchemy import text
from sqlalchemy.engine import make_url

from oauthmig.config import ClientMetadataDefaults, Settings
from oauthmig.db import make_engine
from oauthmig.rollout import compat
from oauthmig.rollout.job_state import JOB_TABLE
from oauthmig.rollout.revisions import VERSION_TABLE
from tests.helpers import CliResult, data_checksum, invoke, schema_dump, write_config
from tests.helpers.databases import DatabaseFactory, SeededInstall, routed_config


def _exec(settings: Settings, db: str, statement: str) -> None:
    engine = make_engine(settings.databases[db], settings)
    try:
        with engine.begin() as conn:
            conn.execute(text(statement))
    finally:
        engine.dispose()


def _one_line(result: CliResult, *needles: str) -> None:
    assert result.code == 2, (result.out, result.err)
    lines = result.err.strip().splitlines()
    assert len(lines) == 1, result.err
    assert "Traceback" not in result.err
    for needle in needles:
        assert needle in lines[0], lines[0]


def _drop_revoked_at(settings: Settings) -> None:
    _exec(settings, "shard", f"ALTER TABLE {settings.tables.token} DROP COLUMN revoked_at")


def _unknown_revision(settings: Settings) -> None:
    _exec(settings, "shard", f"UPDATE {VERSION_TABLE} SET version_num = '9999'")


def _two_rows(settings: Settings) -> None:
    _exec(settings, "shard", f"INSERT INTO {VERSION_TABLE} (version_num) VALUES ('0001')")


BROKEN: dict[str, tuple[Callable[[Settings], None], str]] = {
    "half-migrated": (_drop_revoked_at, "half-migrated"),
    "unknown-revision": (_unknown_revision, "'9999', which this oauthmig does not know"),
    "two-version-rows": (_two_rows, "has several rows"),
}


@pytest.mark.parametrize("case", list(BROKEN))
def test_broken_database_is_refused_by_status_backfill_and_downgrade(
    case: str,
    make_database: DatabaseFactory,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    seeded_install: SeededInstall,
) -> None:
    settings, cfg = seeded_install(rows=20)
    assert invoke(capsys, "--config", cfg, "upgrade").code == 0
    breaker, problem = BROKEN[case]
    breaker(settings)
    schema, data = schema_dump(settings), data_checksum(settings)

    status = invoke(capsys, "--config", cfg, "status")
    _one_line(status, "database 'shard'", problem)
    _one_line(invoke(capsys, "--config", cfg, "status", "--check"), "database 'shard'", problem)
    _one_line(
        invoke(capsys, "--config", cfg, "status", "--format", "json"), "database 'shard'", problem
    )
    # backfill used to run and write rows here; now it refuses before any job starts, even on
    # the healthy control database.
    _one_line(invoke(capsys, "--config", cfg, "backfill"), "database 'shard'", problem)
    _one_line(invoke(capsys, "--config", cfg, "backfill", "--dry-run"), "database 'shard'", problem)
    _one_line(invoke(capsys, "--config", cfg, "upgrade"), "database 'shard'", problem)
    _one_line(invoke(capsys, "--config", cfg, "upgrade", "--dry-run"), "database 'shard'", problem)
    if case != "half-migrated":  # a half-migrated database is repaired by downgrading it
        _one_line(
            invoke(capsys, "--config", cfg, "downgrade", "--to", "0001"),
            "database 'shard'",
            problem,
        )
    assert schema_dump(settings) == schema
    assert data_checksum(settings) == data
    for db in ("control", "shard"):
        assert JOB_TABLE not in schema_dump(settings)[db]
    # Leaving the broken database out works.
    assert invoke(capsys, "--config", cfg, "-d", "control", "status").code == 0


def test_half_migrated_database_is_repaired_by_the_downgrade_the_error_names(
    make_database: DatabaseFactory,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    seeded_install: SeededInstall,
) -> None:
    settings, cfg = seeded_install(rows=20)
    assert invoke(capsys, "--config", cfg, "upgrade").code == 0
    _drop_revoked_at(settings)
    status = invoke(capsys, "--config", cfg, "status")
    assert "downgrade --to 0001 -d shard" in status.err
    repair = invoke(capsys, "--config", cfg, "-d", "shard", "downgrade", "--to", "0001")
    assert repair.code == 0, repair.err
    assert invoke(capsys, "--config", cfg, "-d", "shard", "upgrade").code == 0
    assert invoke(capsys, "--config", cfg, "status").code == 0


def test_audit_refuses_a_half_migrated_application_database(
    make_database: DatabaseFactory,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    seeded_install: SeededInstall,
) -> None:
    settings, cfg = seeded_install(rows=20)
    assert invoke(capsys, "--config", cfg, "upgrade").code == 0
    # The compatibility trigger reads the column: it goes first, as a hand-made change would.
    dialect = settings.databases["control"].dialect
    target = compat.CompatTarget(
        dialect, "control", {"application": settings.tables.application}, ClientMetadataDefaults()
    )
    for stmt in compat.remove_sql(target, "application"):
        _exec(settings, "control", stmt)
    _exec(settings, "control", f"ALTER TABLE {settings.tables.application} DROP COLUMN grant_types")
    _one_line(
        invoke(capsys, "--config", cfg, "audit-redirects"),
        "database 'control'",
        "half-migrated",
        "grant_types",
    )


def test_online_downgrade_refuses_without_revision_log_proof(
    make_database: DatabaseFactory,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    seeded_install: SeededInstall,
) -> None:
    """Nothing is dropped that the revision log does not prove oauthmig added."""
    settings, cfg = seeded_install(rows=20)
    assert invoke(capsys, "--config", cfg, "upgrade").code == 0
    _exec(settings, "control", "DELETE FROM oauthmig_revision_log WHERE revision = '0001'")
    schema = schema_dump(settings)
    _one_line(
        invoke(capsys, "--config", cfg, "downgrade", "--to", "base"),
        "database 'control'",
        "revision 0001 has no 'applied' row",
    )
    assert schema_dump(settings) == schema


def _same_database_twice(settings: Settings, tmp_path: Path, backend: str) -> str:
    """A config naming the control database twice, spelled differently."""
    url = settings.databases["control"].url or ""
    if backend == "sqlite":
        path = make_url(url).database or ""
        link = tmp_path / "alias.sqlite3"
        os.symlink(path, link)
        other = f"sqlite:///{link}"
    else:
        other = make_url(url).set(host="localhost").render_as_string(hide_password=False)
    data = routed_config(url, other)
    # The audit reads only databases hosting applications: route them to both names.
    data["routing"] = {
        "application": ["control", "shard"],
        "grant": ["control"],
        "token": ["shard"],
    }
    return write_config(tmp_path / "twice.toml", data)


COMMANDS = {
    "status": ["status"],
    "status-check": ["status", "--check"],
    "upgrade": ["upgrade"],
    "upgrade-dry-run": ["upgrade", "--dry-run"],
    "downgrade": ["downgrade", "--to", "base"],
    "backfill": ["backfill"],
    "audit": ["audit-redirects"],
    "report": ["report", "--html", os.devnull],
    "prune-grants": ["prune-grants"],
    "demo": ["demo", "--apps", "5", "--tokens", "5"],
}


def test_one_database_under_two_names_is_refused_by_every_command(
    backend: str,
    make_database: DatabaseFactory,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    seeded_install: SeededInstall,
) -> None:
    settings, _cfg = seeded_install(rows=20)
    cfg = _same_database_twice(settings, tmp_path, backend)
    only_control = settings.restrict(("control",))
    schema, data = schema_dump(only_control), data_checksum(only_control)
    for name, args in COMMANDS.items():
        result = invoke(capsys, "--config", cfg, *args)
        _one_line(result, "databases 'control' and 'shard' are the same database")
        assert schema_dump(only_control) == schema, name
        assert data_checksum(only_control) == data, name
    # Offline SQL needs no connection and cannot tell; one name alone is fine.
    assert invoke(capsys, "--config", cfg, "upgrade", "--sql").code == 0
    assert invoke(capsys, "--config", cfg, "-d", "control", "status").code == 0


def test_distinct_databases_on_one_server_are_not_confused(
    make_database: DatabaseFactory,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    seeded_install: SeededInstall,
) -> None:
    _settings, cfg = seeded_install(rows=20)
    result = invoke(capsys, "--config", cfg, "status")
    assert result.code == 0, result.err
