"""Finalize (revision 0004) under real faults: SIGKILL after each statement, an old snapshot
blocking index builds, the upgrade's own backend terminated mid-run."""

from __future__ import annotations

import datetime as dt
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import event, insert, text
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.engine.interfaces import DBAPICursor

from oauthmig.config import Settings, settings_from_mapping
from oauthmig.db import make_engine
from oauthmig.demo.data import setup_legacy
from oauthmig.errors import ConfigError
from oauthmig.legacy import legacy_metadata
from oauthmig.rollout.revisions import LOG_TABLE
from tests.forkserver import ForkedProcess, ForkServer
from tests.helpers import invoke, write_config
from tests.helpers.databases import DatabaseFactory, routed_config
from tests.kill_after_ddl import is_ddl

ROOT = Path(__file__).resolve().parent.parent
PG = pytest.mark.parametrize("backend", ["postgresql"], indirect=True)
Catalog = list[tuple[Any, ...]]


def _setup(
    make_database: DatabaseFactory,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    migrate: dict[str, object] | None = None,
    expand: bool = True,
) -> tuple[Settings, str]:
    """Legacy data, expanded and backfilled: the next upgrade runs only the finalize."""
    data = routed_config(make_database("control"), make_database("shard"))
    if migrate:
        data["migrate"] = migrate
    settings = settings_from_mapping(data, {}, "test")
    setup_legacy(settings, apps=20, tokens=120, seed=3)
    cfg = write_config(tmp_path / "oauthmig.toml", data)
    for args in (("upgrade",), ("backfill",)) if expand else ():
        result = invoke(capsys, "--config", cfg, "-d", "control", *args)
        assert result.code == 0, result.err
    return settings, cfg


def _engine(settings: Settings) -> Engine:
    return make_engine(settings.databases["control"], settings)


def _sqlite_ddl(sql: str | None) -> str | None:
    """A table's DDL with its table constraints in name order: a batch-mode rebuild recreates
    them in the order SQLite reflects them, which says nothing about the schema."""
    if sql is None:
        return None
    lines = [line.rstrip().rstrip(",") for line in sql.split("\n")]
    constraints = sorted(line for line in lines if line.lstrip().startswith("CONSTRAINT "))
    return "\n".join([line for line in lines if line not in constraints] + constraints)


def catalog(settings: Settings) -> Catalog:
    """Constraints, indexes (with validity) and column nullability of the three tables."""
    t = settings.tables
    names = [t.application, t.grant, t.token]
    engine = _engine(settings)
    try:
        with engine.connect() as conn:
            if conn.dialect.name == "sqlite":
                return [
                    (r[0], r[1], r[2], _sqlite_ddl(r[3]))
                    for r in conn.execute(
                        text(
                            "SELECT type, name, tbl_name, sql FROM sqlite_master "
                            "WHERE tbl_name IN (:a, :g, :t) ORDER BY type, name"
                        ),
                        {"a": names[0], "g": names[1], "t": names[2]},
                    )
                ]
            rels = "(to_regclass(:a), to_regclass(:g), to_regclass(:t))"
            params = {"a": names[0], "g": names[1], "t": names[2]}
            rows: Catalog = []
            rows += conn.execute(
                text(
                    "SELECT 'constraint', conrelid::regclass::text, conname, "
                    f"pg_get_constraintdef(oid), convalidated FROM pg_constraint "
                    f"WHERE conrelid IN {rels} ORDER BY 2, 3"
                ),
                params,
            ).all()
            rows += conn.execute(
                text(
                    "SELECT 'index', i.indrelid::regclass::text, c.relname, "
                    "pg_get_indexdef(i.indexrelid), i.indisvalid FROM pg_index i "
                    f"JOIN pg_class c ON c.oid = i.indexrelid WHERE i.indrelid IN {rels} "
                    "ORDER BY 2, 3"
                ),
                params,
            ).all()
            rows += conn.execute(
                text(
                    "SELECT 'column', attrelid::regclass::text, attname, "
                    "format_type(atttypid, atttypmod), attnotnull FROM pg_attribute "
                    f"WHERE attrelid IN {rels} AND attnum > 0 AND NOT attisdropped ORDER BY 2, 3"
                ),
                params,
            ).all()
            return [tuple(r) for r in rows]
    finally:
        engine.dispose()


def legacy_insert(settings: Settings) -> None:
    """The provider's pre-oauthmig INSERTs (legacy columns only), rolled back afterwards."""
    t = settings.tables
    md = legacy_metadata(t, ("application", "grant", "token"))
    now = dt.datetime(2025, 6, 1, tzinfo=dt.UTC)
    engine = _engine(settings)
    try:
        with engine.connect() as conn, conn.begin() as tx:
            conn.execute(
                insert(md.tables[t.application]).values(
                    client_id="legacy-insert",
                    client_secret="s3cr3t",
                    name="legacy",
                    redirect_uris="https://legacy.example.com/cb",
                    scopes=["org:read"],
                    date_added=now,
                )
            )
            conn.execute(
                insert(md.tables[t.grant]).values(
                    user_id=1,
                    application_id=1,
                    code="legacy-code",
                    expires_at=now,
                    redirect_uri="https://legacy.example.com/cb",
                    scope_list=[],
                    scopes=0,  # the legacy bit field: NOT NULL, no default
                )
            )
            conn.execute(
                insert(md.tables[t.token]).values(
                    user_id=1,
                    token="legacy-token",
                    refresh_token="legacy-refresh",
                    scope_list=[],
                    date_added=now,
                    scopes=0,
                )
            )
            tx.rollback()
    finally:
        engine.dispose()


def _spawn(server: ForkServer, *args: str, module: str = "oauthmig") -> ForkedProcess:
    return server.spawn(args, module=module, cwd=ROOT)


def _count_ddl(cfg: str, capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, int]:
    seen: list[str] = []

    def record(_conn: Connection, _cursor: DBAPICursor, statement: str, *_args: object) -> None:
        if is_ddl(statement):
            seen.append(statement)

    event.listen(Engine, "after_cursor_execute", record)
    try:
        result = invoke(capsys, "--config", cfg, "-d", "control", *args)
    finally:
        event.remove(Engine, "after_cursor_execute", record)
    return result.code, len(seen)


# ------------------------------------------------------------------ 1. kill after each statement


@pytest.mark.slow
def test_finalize_killed_after_each_statement_converges_and_downgrades_cleanly(
    make_database: DatabaseFactory,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    forkserver: ForkServer,
) -> None:
    settings, cfg = _setup(make_database, tmp_path, capsys)
    before = catalog(settings)
    legacy_insert(settings)
    # Finalize's verify pass creates its state table on its first run only: create it now, so
    # that every run below issues the same DDL.
    assert invoke(capsys, "--config", cfg, "-d", "control", "verify").code in (0, 1)
    code, total = _count_ddl(cfg, capsys, "upgrade")
    assert code == 0
    clean_up = catalog(settings)
    assert clean_up != before
    legacy_insert(settings)  # finalized, and the provider's old code still writes (issue 20)
    code, _ = _count_ddl(cfg, capsys, "downgrade", "--to", "0003")
    assert code == 0
    clean_down = catalog(settings)
    legacy_insert(settings)
    expected = 26 if settings.databases["control"].dialect == "postgresql" else 9
    assert total >= expected, total
    for n in range(1, total + 1):
        killed = _spawn(
            forkserver,
            *(str(n), "--config", cfg, "-d", "control", "upgrade"),
            module="tests.kill_after_ddl",
        )
        _, err = killed.communicate(timeout=120)
        assert killed.returncode == -signal.SIGKILL, (n, err)
        rerun = invoke(capsys, "--config", cfg, "-d", "control", "upgrade")
        assert rerun.code == 0, (n, rerun.err)
        assert catalog(settings) == clean_up, f"after a kill at statement {n} and a rerun"
        down = invoke(capsys, "--config", cfg, "-d", "control", "downgrade", "--to", "0003")
        assert down.code == 0, (n, down.err)
        assert catalog(settings) == clean_down, f"after a kill at statement {n} and a downgrade"
        legacy_insert(settings)


@pytest.mark.slow
def test_downgrade_killed_after_each_statement_converges(
    make_database: DatabaseFactory,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    forkserver: ForkServer,
) -> None:
    settings, cfg = _setup(make_database, tmp_path, capsys)
    assert invoke(capsys, "--config", cfg, "-d", "control", "upgrade").code == 0
    clean_up = catalog(settings)
    code, total = _count_ddl(cfg, capsys, "downgrade", "--to", "0003")
    assert code == 0 and total > 0
    clean_down = catalog(settings)
    for n in range(1, total + 1):
        assert invoke(capsys, "--config", cfg, "-d", "control", "upgrade").code == 0
        killed = _spawn(
            forkserver,
            str(n),
            *("--config", cfg, "-d", "control", "downgrade", "--to", "0003"),
            module="tests.kill_after_ddl",
        )
        _, err = killed.communicate(timeout=120)
        assert killed.returncode == -signal.SIGKILL, (n, err)
        down = invoke(capsys, "--config", cfg, "-d", "control", "downgrade", "--to", "0003")
        assert down.code == 0, (n, down.err)
        assert catalog(settings) == clean_down, f"after a kill at statement {n} and a rerun"
        legacy_insert(settings)
    assert invoke(capsys, "--config", cfg, "-d", "control", "upgrade").code == 0
    assert catalog(settings) == clean_up


@PG
def test_rerun_after_set_not_null_drops_the_stray_helper_check(
    make_database: DatabaseFactory, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The state a lock timeout on DROP CONSTRAINT leaves (NOT NULL set, helper CHECK still
    there), under any name an attempt may have used; downgrade from a partial state as well."""
    settings, cfg = _setup(make_database, tmp_path, capsys)
    app = settings.tables.application
    assert invoke(capsys, "--config", cfg, "-d", "control", "upgrade").code == 0
    clean_up = catalog(settings)
    assert invoke(capsys, "--config", cfg, "-d", "control", "downgrade", "--to", "0003").code == 0
    clean_down = catalog(settings)
    engine = _engine(settings)
    with engine.begin() as conn:
        conn.execute(
            text(
                f"ALTER TABLE {app} ADD CONSTRAINT {app}_grant_types_not_null "
                "CHECK (grant_types IS NOT NULL)"
            )
        )
        conn.execute(
            text(
                f"ALTER TABLE {app} ADD CONSTRAINT older_name_nn "
                "CHECK (application_type IS NOT NULL) NOT VALID"
            )
        )
        conn.execute(text(f"ALTER TABLE {app} ALTER COLUMN grant_types SET NOT NULL"))
    engine.dispose()
    assert invoke(capsys, "--config", cfg, "-d", "control", "upgrade").code == 0
    assert catalog(settings) == clean_up
    # A partial downgrade state: one CHECK gone already, a helper of another name re-added.
    engine = _engine(settings)
    with engine.begin() as conn:
        conn.execute(text(f"ALTER TABLE {app} DROP CONSTRAINT {app}_application_type_check"))
        conn.execute(
            text(f"ALTER TABLE {app} ADD CONSTRAINT stray_nn CHECK (response_types IS NOT NULL)")
        )
    engine.dispose()
    down = invoke(capsys, "--config", cfg, "-d", "control", "downgrade", "--to", "0003")
    assert down.code == 0, down.err
    assert catalog(settings) == clean_down
    legacy_insert(settings)


@pytest.mark.slow
@PG
def test_finalize_among_short_reader_transactions_leaves_no_strays(
    make_database: DatabaseFactory, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Three readers in short transactions on the application table make catalog statements
    time out at random points (each a partial attempt); the end state is still exact."""
    settings, cfg = _setup(
        make_database, tmp_path, capsys, migrate={"lock_timeout": "30ms", "lock_retries": 4}
    )
    stop = threading.Event()
    app = settings.tables.application
    engine = _engine(settings)

    def reader() -> None:
        with engine.connect() as conn:
            while not stop.is_set():
                with conn.begin():
                    conn.execute(text(f"SELECT count(*) FROM {app}"))
                    time.sleep(0.04)

    readers = [threading.Thread(target=reader) for _ in range(3)]
    for r in readers:
        r.start()
    try:
        outcomes = [invoke(capsys, "--config", cfg, "-d", "control", "upgrade") for _ in range(3)]
    finally:
        stop.set()
        for r in readers:
            r.join()
        engine.dispose()
    assert all(o.code in (0, 2) for o in outcomes)
    assert all("lock_timeout" in o.err for o in outcomes if o.code == 2)
    assert invoke(capsys, "--config", cfg, "-d", "control", "upgrade").code == 0
    after_up = catalog(settings)
    assert invoke(capsys, "--config", cfg, "-d", "control", "downgrade", "--to", "0003").code == 0
    legacy_insert(settings)
    assert not [row for row in catalog(settings) if "not_null" in str(row[2])]
    # Same catalog as an undisturbed run on the same database.
    assert invoke(capsys, "--config", cfg, "-d", "control", "upgrade").code == 0
    assert catalog(settings) == after_up


# ------------------------------------------------------------------ 2. old snapshot vs index build


@pytest.fixture
def old_snapshot(
    make_database: DatabaseFactory, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> Iterator[tuple[Settings, str, Connection, int]]:
    """Finalize-ready install plus an unrelated idle-in-transaction session holding an old
    snapshot (REPEATABLE READ, one read of another table): what CREATE INDEX CONCURRENTLY waits
    for."""
    settings, cfg = _setup(
        make_database,
        tmp_path,
        capsys,
        migrate={"lock_timeout": "500ms", "lock_retries": 3, "index_timeout": "2s"},
    )
    engine = _engine(settings)
    with engine.begin() as conn:
        conn.execute(text("CREATE TABLE unrelated_reports (id int)"))
    blocker = engine.connect()
    blocker.execute(text("SET application_name = 'nightly-report'"))
    blocker.commit()
    blocker.execute(text("BEGIN ISOLATION LEVEL REPEATABLE READ"))
    blocker.execute(text("SELECT 1 FROM unrelated_reports"))
    pid = int(blocker.execute(text("SELECT pg_backend_pid()")).scalar_one())
    try:
        yield settings, cfg, blocker, pid
    finally:
        blocker.rollback()
        blocker.close()
        engine.dispose()


def _index(settings: Settings, name: str) -> tuple[int, bool] | None:
    engine = _engine(settings)
    try:
        with engine.connect() as conn:
            row = conn.execute(
                text(
                    "SELECT i.indexrelid::int, i.indisvalid FROM pg_index i JOIN pg_class c "
                    "ON c.oid = i.indexrelid WHERE c.relname = :n"
                ),
                {"n": name},
            ).first()
            return None if row is None else (int(row[0]), bool(row[1]))
    finally:
        engine.dispose()


@PG
def test_index_build_waits_index_timeout_names_the_old_transaction_and_keeps_valid_builds(
    old_snapshot: tuple[Settings, str, Connection, int], capsys: pytest.CaptureFixture[str]
) -> None:
    settings, cfg, blocker, pid = old_snapshot
    token = settings.tables.token
    family, parent = f"{token}_token_family_id_idx", f"{token}_parent_token_id_idx"
    # An earlier attempt finished the first index (built before the long transaction began
    # would be the same): a retry must keep that build, not redo it.
    blocker.rollback()
    engine = _engine(settings)
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(text(f"CREATE INDEX CONCURRENTLY {family} ON {token} (token_family_id)"))
    engine.dispose()
    built = _index(settings, family)
    assert built is not None and built[1] is True
    blocker.execute(text("BEGIN ISOLATION LEVEL REPEATABLE READ"))
    blocker.execute(text("SELECT 1 FROM unrelated_reports"))

    started = time.monotonic()
    failed = invoke(capsys, "--config", cfg, "-d", "control", "upgrade")
    elapsed = time.monotonic() - started
    assert failed.code == 2
    lines = failed.err.strip().splitlines()
    assert len(lines) == 1, failed.err
    line = lines[0]
    assert f"CREATE INDEX CONCURRENTLY {parent} did not finish within index_timeout 2s" in line
    assert (
        f"transaction of pid {pid} (idle in transaction, application_name 'nightly-report'" in line
    )
    assert "open " in line and "rerun `oauthmig upgrade -d control`" in line
    assert "has since been released" not in line and "SELECT" not in line
    # Not retried lock_retries times (each retry would rebuild from scratch): one wait.
    assert elapsed < 2 * 4, elapsed
    engine = _engine(settings)
    with engine.connect() as conn:
        log = conn.execute(
            text(f"SELECT outcome, detail FROM {LOG_TABLE} WHERE revision = '0004'")
        ).one()
        version = conn.execute(text("SELECT version_num FROM oauthmig_version")).scalar_one()
    engine.dispose()
    assert log[0] == "failed" and f"pid {pid}" in log[1]
    assert version == "0003"
    assert _index(settings, family) == built
    left = _index(settings, parent)
    assert left is not None and left[1] is False  # the canceled build is INVALID

    blocker.rollback()
    done = invoke(capsys, "--config", cfg, "-d", "control", "upgrade")
    assert done.code == 0, done.err
    assert _index(settings, family) == built  # the valid build was kept, same index
    rebuilt = _index(settings, parent)
    assert rebuilt is not None and rebuilt[1] is True
    check = invoke(capsys, "--config", cfg, "-d", "control", "status", "--check")
    assert check.code == 0, check.out + check.err


@PG
def test_invalid_index_left_by_offline_sql_is_not_recorded_and_is_rebuilt_online(
    old_snapshot: tuple[Settings, str, Connection, int],
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
) -> None:
    settings, cfg, blocker, _pid = old_snapshot
    token = settings.tables.token
    sql = invoke(capsys, "--config", cfg, "-d", "control", "upgrade", "--sql", "--from", "0003")
    assert sql.code == 0, sql.err
    script = tmp_path / "finalize.sql"
    script.write_text(sql.out)
    url = settings.databases["control"].url
    assert url is not None
    dsn = url.replace("postgresql+psycopg://", "postgresql://")
    psql = subprocess.run(
        ["psql", "-X", "-q", "-v", "ON_ERROR_STOP=1", "-d", dsn, "-f", str(script)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert psql.returncode != 0, psql.stdout + psql.stderr
    assert "canceling statement due to" in psql.stderr  # lock or statement timeout: 2s each
    left = _index(settings, f"{token}_token_family_id_idx")
    assert left is not None and left[1] is False
    engine = _engine(settings)
    with engine.connect() as conn:
        version = conn.execute(text("SELECT version_num FROM oauthmig_version")).scalar_one()
    engine.dispose()
    assert version == "0003"  # never recorded as done

    blocker.rollback()
    # Rerunning the same script now repairs it (drops the INVALID build, rebuilds, checks).
    again = subprocess.run(
        ["psql", "-X", "-q", "-v", "ON_ERROR_STOP=1", "-d", dsn, "-f", str(script)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert again.returncode == 0, again.stderr
    for name in (f"{token}_token_family_id_idx", f"{token}_parent_token_id_idx"):
        state = _index(settings, name)
        assert state is not None and state[1] is True


@PG
def test_online_upgrade_rebuilds_an_invalid_index_left_by_an_offline_run(
    old_snapshot: tuple[Settings, str, Connection, int],
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
) -> None:
    settings, cfg, blocker, _pid = old_snapshot
    token = settings.tables.token
    name = f"{token}_parent_token_id_idx"
    url = settings.databases["control"].url
    assert url is not None
    dsn = url.replace("postgresql+psycopg://", "postgresql://")
    # What a hand-run CREATE INDEX CONCURRENTLY cut short leaves: an INVALID index by our name.
    failed = subprocess.run(
        [
            "psql",
            "-X",
            "-q",
            "-d",
            dsn,
            "-c",
            "SET lock_timeout = '1s'",
            "-c",
            f"CREATE INDEX CONCURRENTLY {name} ON {token} (parent_token_id)",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert "lock timeout" in failed.stderr
    left = _index(settings, name)
    assert left is not None and left[1] is False
    blocker.rollback()
    done = invoke(capsys, "--config", cfg, "-d", "control", "upgrade")
    assert done.code == 0, done.err
    rebuilt = _index(settings, name)
    assert rebuilt is not None and rebuilt[1] is True and rebuilt[0] != left[0]


# ------------------------------------------------------------------ 3. connection lost mid-run


@PG
@pytest.mark.parametrize(
    ("expand", "revision", "statement"),
    [
        (True, "0004", "ADD CONSTRAINT {grant}_code_challenge_method_check"),
        (False, "0001", "ADD COLUMN code_challenge TEXT"),
    ],
    ids=["finalize", "expand"],
)
def test_terminated_upgrade_backend_is_one_line_naming_database_step_and_next_command(
    make_database: DatabaseFactory,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    expand: bool,
    revision: str,
    statement: str,
    forkserver: ForkServer,
) -> None:
    settings, cfg = _setup(
        make_database,
        tmp_path,
        capsys,
        migrate={"lock_timeout": "60s", "lock_retries": 0},
        expand=expand,
    )
    grant = settings.tables.grant
    engine = _engine(settings)
    holder = engine.connect()
    holder.execute(text(f"LOCK TABLE {grant} IN ACCESS SHARE MODE"))
    proc = _spawn(forkserver, "--config", cfg, "-d", "control", "upgrade")
    url = settings.databases["control"].url
    assert url is not None
    dbname = url.rsplit("/", 1)[-1]
    waiting: list[Any] = []
    deadline = time.monotonic() + 60
    with engine.connect() as watcher:
        while not waiting and time.monotonic() < deadline:
            waiting = list(
                watcher.execute(
                    text(
                        "SELECT pid FROM pg_stat_activity WHERE datname = :d AND "
                        "application_name = 'oauthmig' AND wait_event_type = 'Lock'"
                    ),
                    {"d": dbname},
                ).scalars()
            )
            watcher.rollback()
            time.sleep(0.05)
        assert len(waiting) == 1, "the upgrade never waited on the lock"
        watcher.execute(text("SELECT pg_terminate_backend(:p)"), {"p": waiting[0]})
    _, err = proc.communicate(timeout=120)
    holder.rollback()
    holder.close()
    engine.dispose()
    assert proc.returncode == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    display = settings.databases["control"].display_url
    assert lines[0].startswith(
        f"error: database 'control': the connection to {display} was lost during revision "
        f"{revision} (ALTER TABLE {grant} {statement.format(grant=grant)})"
    ), lines[0]
    assert "rerun `oauthmig upgrade -d control` once the database is reachable" in lines[0]
    assert "reconnect" not in err and "Traceback" not in err and "invalid transaction" not in err
    rerun = invoke(capsys, "--config", cfg, "-d", "control", "upgrade")
    assert rerun.code == 0, rerun.err


# ------------------------------------------------------------------ config


def test_index_timeout_is_a_strict_migrate_key() -> None:
    base = routed_config("sqlite:///a.sqlite3", "sqlite:///b.sqlite3")
    assert settings_from_mapping(base, {}, "t").migrate.index_timeout_ms == 30 * 60 * 1000
    custom = {**base, "migrate": {"index_timeout": "2h"}}
    assert settings_from_mapping(custom, {}, "t").migrate.index_timeout_ms == 2 * 3600 * 1000
    for bad, message in (
        (0, "migrate.index_timeout: must be greater than zero"),
        ("soon", "migrate.index_timeout: expected a duration"),
        (True, "migrate.index_timeout: expected a duration"),
    ):
        with pytest.raises(ConfigError, match=message):
            settings_from_mapping({**base, "migrate": {"index_timeout": bad}}, {}, "t")
    example = (ROOT / "config.example.toml").read_text()
    assert 'index_timeout = "30min"' in example


@pytest.mark.parametrize(
    ("statement", "kind"),
    [
        ("ALTER TABLE t ADD CONSTRAINT c CHECK (x IN ('S256'))", "ALTER TABLE t ADD CONSTRAINT c"),
        ("ALTER TABLE t ALTER COLUMN c SET NOT NULL", "ALTER TABLE t ALTER COLUMN c SET NOT NULL"),
        ("UPDATE t SET token = 'tok-secret' WHERE id = 5", "UPDATE t SET token"),
        ("INSERT INTO t (a) VALUES ('client-secret')", "INSERT INTO t"),
        ("SELECT pg_try_advisory_lock(%(k)s)", "SELECT"),
        (
            "CREATE INDEX CONCURRENTLY IF NOT EXISTS i ON t (c)",
            "CREATE INDEX CONCURRENTLY IF NOT EXISTS i ON t",
        ),
    ],
    ids=["check", "set-not-null", "update", "insert", "select", "index"],
)
def test_statement_kind_never_carries_literals(statement: str, kind: str) -> None:
    from oauthmig.rollout.runner import statement_kind

    assert statement_kind(statement) == kind
