"""Offline (``--sql``) scripts applied for real: psql on PostgreSQL, the sqlite3 shell on SQLite.

The scripts must stop themselves (wrong database, wrong starting revision, unfinished backfill),
record in the revision log what actually happened (adopted columns, decided when they run; the
database clock), and never drop a column oauthmig cannot prove it added.
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text
from sqlalchemy.engine import make_url

from oauthmig.config import Settings
from oauthmig.db import make_engine
from oauthmig.rollout.revisions import LOG_TABLE, VERSION_TABLE
from tests.helpers import columns_of, invoke, schema_dump, write_config
from tests.helpers.databases import DatabaseFactory, SeededInstall

pg_only = pytest.mark.parametrize("backend", ["postgresql"], indirect=True)
sqlite_only = pytest.mark.parametrize("backend", ["sqlite"], indirect=True)


def _sql(settings: Settings, db: str, statement: str) -> list[Any]:
    engine = make_engine(settings.databases[db], settings)
    try:
        with engine.begin() as conn:
            result = conn.execute(text(statement))
            return [tuple(r) for r in result] if result.returns_rows else []
    finally:
        engine.dispose()


def _apply(settings: Settings, db: str, script: Path) -> subprocess.CompletedProcess[str]:
    """Run a script the way a DBA would: psql -v ON_ERROR_STOP=1 -f, or sqlite3 -bail."""
    url = make_url(settings.databases[db].url or "")
    if url.get_backend_name() == "sqlite":
        with script.open() as fh:
            return subprocess.run(
                ["sqlite3", "-bail", str(url.database)],
                stdin=fh,
                capture_output=True,
                text=True,
                timeout=120,
            )
    conninfo = url.set(drivername="postgresql").render_as_string(hide_password=False)
    return subprocess.run(
        ["psql", "-X", "-q", "-v", "ON_ERROR_STOP=1", "-d", conninfo, "-f", str(script)],
        capture_output=True,
        text=True,
        timeout=120,
    )


def _log(settings: Settings, db: str) -> dict[str, tuple[str, str, str | None]]:
    rows = _sql(settings, db, f"SELECT revision, outcome, tables, adopted FROM {LOG_TABLE}")
    return {r[0]: (r[1], r[2], r[3]) for r in rows}


def _version(settings: Settings, db: str) -> list[str]:
    return [r[0] for r in _sql(settings, db, f"SELECT version_num FROM {VERSION_TABLE}")]


def _plant_adoptable(settings: Settings) -> None:
    """Sentry's grant already has redirect_uri; also an adoptable code_challenge varchar(128)."""
    g = settings.tables.grant
    _sql(settings, "control", f"ALTER TABLE {g} ADD COLUMN code_challenge VARCHAR(128)")
    _sql(settings, "control", f"UPDATE {g} SET code_challenge = 'chal-' || id")


def _grant_data(settings: Settings) -> list[Any]:
    g = settings.tables.grant
    return _sql(
        settings, "control", f"SELECT id, redirect_uri, code_challenge FROM {g} ORDER BY id"
    )


def _scripts(capsys: pytest.CaptureFixture[str], cfg: str, out: Path, *args: str) -> None:
    result = invoke(capsys, "--config", cfg, *args, "--sql", "--output-dir", str(out))
    assert result.code == 0, result.err
    assert sorted(p.name for p in out.iterdir()) == ["control.sql", "shard.sql"]


def _provider_sets_methods(settings: Settings) -> None:
    # New provider code writes the method beside the challenge (the pair CHECK of 0004).
    g = settings.tables.grant
    _sql(settings, "control", f"UPDATE {g} SET code_challenge_method = 'S256'")


@pg_only
def test_offline_upgrade_stops_before_backfills_and_matches_online(
    make_database: DatabaseFactory,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    seeded_install: SeededInstall,
) -> None:
    settings, cfg = seeded_install(rows=30, name="c")
    twin, twin_cfg = seeded_install(rows=30, name="twin")
    _plant_adoptable(settings)
    _plant_adoptable(twin)
    out = tmp_path / "sql"
    _scripts(capsys, cfg, out, "upgrade")
    control_sql = (out / "control.sql").read_text()
    assert control_sql.startswith("-- ===== database: control")
    assert "\\set ON_ERROR_STOP on" in control_sql
    assert "2025-" not in control_sql and "now()" in control_sql  # the database clock

    # A control script applied to the shard stops at its first guard and changes nothing.
    before = schema_dump(settings)["shard"]
    wrong = _apply(settings, "shard", out / "control.sql")
    assert wrong.returncode != 0 and "this script is for database control" in wrong.stderr
    assert schema_dump(settings)["shard"] == before

    # Before the backfills: expand applies, 0004's guard raises, psql fails, nothing for 0004.
    early = _apply(settings, "control", out / "control.sql")
    assert early.returncode != 0
    assert "revision 0004 requires backfill token-families to finish" in early.stderr
    assert "then write the rest with `oauthmig upgrade --sql --from 0003 -d control`" in (
        early.stderr
    )
    assert _version(settings, "control") == ["0003"]
    log = _log(settings, "control")
    assert "0004" not in log
    assert log["0001"] == ("applied", "grant", "grant.code_challenge,grant.redirect_uri")
    status = invoke(capsys, "--config", cfg, "-d", "control", "status", "--format", "json")
    assert status.code == 0, status.err

    # Rerunning the same script now refuses at once: the database is no longer at base.
    again = _apply(settings, "control", out / "control.sql")
    assert again.returncode != 0 and "this step starts from base" in again.stderr

    _provider_sets_methods(settings)
    assert invoke(capsys, "--config", cfg, "-d", "control", "backfill").code == 0
    rest = tmp_path / "rest"
    _scripts(capsys, cfg, rest, "upgrade", "--from", "0003")
    done = _apply(settings, "control", rest / "control.sql")
    assert done.returncode == 0, done.stderr
    assert _version(settings, "control") == ["0007"]

    # The same rollout online, on the twin: same schema, same revision log.
    assert invoke(capsys, "--config", twin_cfg, "upgrade").code == 0
    _provider_sets_methods(twin)
    assert invoke(capsys, "--config", twin_cfg, "backfill").code == 0
    assert invoke(capsys, "--config", twin_cfg, "upgrade").code == 0
    assert _log(settings, "control") == _log(twin, "control")
    # Online, finalize ran a verify pass first (its state table); the script relies on the
    # backfill's job state only.
    online = schema_dump(twin)["control"]
    online.pop("oauthmig_verify", None)
    assert schema_dump(settings)["control"] == online
    check = invoke(capsys, "--config", cfg, "-d", "control", "status", "--check")
    assert check.code == 0, check.out + check.err


@pg_only
def test_offline_finalize_is_not_recorded_when_a_step_failed_and_psql_went_on(
    make_database: DatabaseFactory,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    seeded_install: SeededInstall,
) -> None:
    """Without ON_ERROR_STOP (another client, or the line removed) nothing false is recorded."""
    settings, cfg = seeded_install(rows=30, name="c")
    assert invoke(capsys, "--config", cfg, "upgrade").code == 0
    assert invoke(capsys, "--config", cfg, "backfill").code == 0
    out = tmp_path / "sql"
    _scripts(capsys, cfg, out, "upgrade", "--from", "0003")
    script = (out / "control.sql").read_text().replace("\\set ON_ERROR_STOP on\n", "")
    (out / "lenient.sql").write_text(script)
    lenient = str(out / "lenient.sql")
    # A row the application_type CHECK rejects makes one autocommit statement fail.
    a = settings.tables.application
    _sql(settings, "control", f"UPDATE {a} SET application_type = 'bogus' WHERE id = 7")
    url = make_url(settings.databases["control"].url or "").set(drivername="postgresql")
    run = subprocess.run(
        ["psql", "-X", "-q", "-d", url.render_as_string(hide_password=False), "-f", lenient],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0  # psql went on past the errors...
    assert "application_type_check" in run.stderr and "is missing" in run.stderr
    assert _version(settings, "control") == ["0003"]  # ...but 0004 was not recorded
    assert "0004" not in _log(settings, "control")
    _sql(settings, "control", f"UPDATE {a} SET application_type = 'web' WHERE id = 7")
    assert invoke(capsys, "--config", cfg, "upgrade").code == 0
    assert _version(settings, "control") == ["0007"]


@pg_only
def test_pre_existing_columns_survive_online_and_offline_downgrade_after_offline_upgrade(
    make_database: DatabaseFactory,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    seeded_install: SeededInstall,
) -> None:
    settings, cfg = seeded_install(rows=30, name="c")
    _plant_adoptable(settings)
    data = _grant_data(settings)
    g = settings.tables.grant

    def offline_upgrade(tag: str) -> None:
        out = tmp_path / f"up-{tag}"
        _scripts(capsys, cfg, out, "upgrade", "--to", "0003")
        for db in ("control", "shard"):
            applied = _apply(settings, db, out / f"{db}.sql")
            assert applied.returncode == 0, applied.stderr

    offline_upgrade("1")
    assert invoke(capsys, "--config", cfg, "downgrade", "--to", "base").code == 0
    cols = columns_of(settings, "control", g)
    assert {"redirect_uri", "code_challenge"} <= cols and "code_challenge_method" not in cols
    assert _grant_data(settings) == data

    offline_upgrade("2")
    down = tmp_path / "down"
    _scripts(capsys, cfg, down, "downgrade", "--from", "0003", "--to", "base")
    # Every DROP is inside a DO block that asks the revision log first; none is unconditional.
    assert "\nALTER TABLE sentry_apigrant DROP COLUMN" not in (down / "control.sql").read_text()
    for db in ("control", "shard"):
        applied = _apply(settings, db, down / f"{db}.sql")
        assert applied.returncode == 0, applied.stderr
    cols = columns_of(settings, "control", g)
    assert {"redirect_uri", "code_challenge"} <= cols and "code_challenge_method" not in cols
    assert "token_family_id" not in columns_of(settings, "shard", settings.tables.token)
    assert _grant_data(settings) == data
    assert _version(settings, "control") == [] and _log(settings, "control") == {}


@pg_only
def test_offline_downgrade_keeps_columns_when_the_log_cannot_prove_they_were_added(
    make_database: DatabaseFactory,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    seeded_install: SeededInstall,
) -> None:
    """The reported case: `downgrade --to base --sql` on a database upgraded online."""
    settings, cfg = seeded_install(rows=30, name="c")
    _plant_adoptable(settings)
    data = _grant_data(settings)
    assert invoke(capsys, "--config", cfg, "upgrade").code == 0
    # Even with its log row gone, Sentry's redirect_uri must not be dropped.
    _sql(settings, "control", f"DELETE FROM {LOG_TABLE} WHERE revision = '0001'")
    down = tmp_path / "down"
    _scripts(capsys, cfg, down, "downgrade", "--from", "0003", "--to", "base")
    assert "\nALTER TABLE sentry_apigrant DROP COLUMN" not in (down / "control.sql").read_text()
    applied = _apply(settings, "control", down / "control.sql")
    assert applied.returncode == 0, applied.stderr
    assert "kept sentry_apigrant.redirect_uri" in applied.stderr
    assert {"redirect_uri", "code_challenge", "code_challenge_method"} <= columns_of(
        settings, "control", settings.tables.grant
    )
    assert _grant_data(settings) == data
    assert "token_family_id" not in columns_of(settings, "control", settings.tables.token)


@sqlite_only
def test_sqlite_offline_downgrade_that_drops_columns_is_refused(
    make_database: DatabaseFactory,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    seeded_install: SeededInstall,
) -> None:
    _settings, cfg = seeded_install(rows=30, name="c")
    out = tmp_path / "down"
    result = invoke(
        capsys, "--config", cfg, "downgrade", "--to", "base", "--sql", "--output-dir", str(out)
    )
    assert result.code == 2 and result.out == ""
    lines = result.err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.err
    assert (
        "offline downgrade of revision" in lines[0]
        and "run `oauthmig downgrade` online" in (lines[0])
    )
    assert not out.exists()
    only_finalize = invoke(
        capsys, "--config", cfg, "downgrade", "--to", "0003", "--sql", "--from", "0004"
    )
    assert only_finalize.code == 2 and only_finalize.out == ""
    assert "offline downgrades of SQLite databases are not supported" in only_finalize.err


@sqlite_only
def test_sqlite_offline_upgrade_stops_at_gate_and_at_existing_column(
    make_database: DatabaseFactory,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    seeded_install: SeededInstall,
) -> None:
    settings, cfg = seeded_install(rows=30, name="c")
    out = tmp_path / "sql"
    _scripts(capsys, cfg, out, "upgrade")
    wrong = _apply(settings, "shard", out / "control.sql")
    assert wrong.returncode != 0 and "this script is for database control" in wrong.stderr
    assert VERSION_TABLE not in schema_dump(settings)["shard"]

    early = _apply(settings, "shard", out / "shard.sql")
    assert early.returncode != 0
    assert "revision 0004 requires backfill token-families to finish on shard" in early.stderr
    assert _version(settings, "shard") == ["0003"] and "0004" not in _log(settings, "shard")
    # The message says what works: the backfill, then a script from where the database stopped.
    advice = "then write the rest with `oauthmig upgrade --sql --from 0003 -d shard`"
    assert advice in early.stderr, early.stderr
    assert invoke(capsys, "--config", cfg, "-d", "shard", "backfill").code == 0
    # What it used to advise fails: rerunning the stopped script stops at its first step.
    again = _apply(settings, "shard", out / "shard.sql")
    assert again.returncode != 0 and _version(settings, "shard") == ["0003"]
    rest = tmp_path / "rest"
    _scripts(capsys, cfg, rest, "upgrade", "--from", "0003")
    done = _apply(settings, "shard", rest / "shard.sql")
    assert done.returncode == 0, done.stderr
    assert _version(settings, "shard") == ["0007"]

    # SQLite SQL cannot adopt: a pre-existing column stops the script, nothing is recorded.
    _plant_adoptable(settings)
    stopped = _apply(settings, "control", out / "control.sql")
    assert stopped.returncode != 0
    assert "column sentry_apigrant.code_challenge already exists" in stopped.stderr
    assert VERSION_TABLE not in schema_dump(settings)["control"]
    assert "code_challenge_method" not in columns_of(settings, "control", settings.tables.grant)


def test_output_dir_needs_sql(
    make_database: DatabaseFactory,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    seeded_install: SeededInstall,
) -> None:
    _settings, cfg = seeded_install(rows=30, name="c")
    result = invoke(capsys, "--config", cfg, "upgrade", "--output-dir", str(tmp_path / "x"))
    assert result.code == 2 and "--output-dir only applies to --sql" in result.err
    (tmp_path / "file").write_text("")
    clash = invoke(
        capsys, "--config", cfg, "upgrade", "--sql", "--output-dir", str(tmp_path / "file")
    )
    assert clash.code == 2 and "is a file" in clash.err


@pg_only
def test_incompatible_column_adopted_by_an_offline_script_is_caught_online(
    make_database: DatabaseFactory,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    seeded_install: SeededInstall,
) -> None:
    """The script cannot compare types when it adopts; the next online command does."""
    settings, cfg = seeded_install(rows=30, name="c")
    g = settings.tables.grant
    _sql(settings, "control", f"ALTER TABLE {g} ADD COLUMN code_challenge VARCHAR(20)")
    out = tmp_path / "sql"
    _scripts(capsys, cfg, out, "upgrade", "--to", "0003")
    assert _apply(settings, "control", out / "control.sql").returncode == 0
    expected = f"column {g}.code_challenge exists as varchar(20), expected text (or varchar >= 128)"
    for args in (["status"], ["status", "--check"], ["backfill"], ["upgrade"]):
        result = invoke(capsys, "--config", cfg, "-d", "control", *args)
        assert result.code == 2, (args, result.err)
        assert len(result.err.strip().splitlines()) == 1 and expected in result.err, result.err


@pytest.mark.parametrize(
    "args", [("upgrade", "--sql"), ("downgrade", "--to", "base", "--sql")], ids=["up", "down"]
)
def test_pg_script_timeouts_never_outlive_a_transaction_or_a_finalize_step(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], args: tuple[str, ...]
) -> None:
    """Inside each transaction the limits are SET LOCAL (a transaction pooler may apply it);
    session-level SET only outside transactions (the finalize's CONCURRENTLY statements), each
    reset before the next transaction begins and by the end of the script."""
    cfg = write_config(
        tmp_path / "pg.toml",
        {"databases": {"control": {"url": "postgresql://oauth@db.invalid:5432/sentry"}}},
    )
    result = invoke(capsys, "--config", cfg, *args)
    assert result.code == 0, result.err
    in_transaction = session_set = False
    seen_local = seen_session = 0
    for line in result.out.splitlines():
        statement = line.strip().rstrip(";")
        if statement == "BEGIN":
            assert not session_set, "a session-level limit is in force as a transaction begins"
            in_transaction = True
        elif statement == "COMMIT":
            in_transaction = False
        elif statement.startswith("SET LOCAL "):
            assert in_transaction, line
            seen_local += 1
        elif statement.startswith(("SET lock_timeout", "SET statement_timeout")):
            assert not in_transaction, line
            session_set, seen_session = True, seen_session + 1
        elif statement in ("RESET lock_timeout", "RESET statement_timeout"):
            session_set = False
    assert not session_set
    assert seen_local and seen_session  # each revision's transaction, and the finalize
