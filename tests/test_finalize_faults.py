"""Finalize (revision 0004) under real faults: SIGKILL after each statement, an old snapshot
blocking index builds, the upgrade's own backend terminated mid-run."""

from __future__ import annotations

import datetime as dt
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import event, insert, text
from sqlalchemy.engine import Connection, Engine

from oauthmig.config import Settings, settings_from_mapping
from oauthmig.db import make_engine
from oauthmig.demo import setup_legacy
from oauthmig.errors import ConfigError
from oauthmig.legacy import legacy_metadata
from oauthmig.migrations import LOG_TABLE
from tests.conftest import DatabaseFactory, routed_config
from tests.helpers import invoke, write_config
from tests.kill_after_ddl import is_ddl

ROOT = Path(__file__).resolve().parent.parent
PG = pytest.mark.parametrize("backend", ["postgresql"], indirect=True)
Catalog = list[tuple[Any, ...]]


def _setup(
    make_database: DatabaseFactory,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    migrate: dict[str, object] | None = None,
) -> tuple[Settings, str]:
    """Legacy data, expanded and backfilled: the next upgrade runs only the finalize."""
    data = routed_config(make_database("control"), make_database("shard"))
    if migrate:
        data["migrate"] = migrate
    settings = settings_from_mapping(data, {}, "test")
    setup_legacy(settings, apps=20, tokens=120, seed=3)
    cfg = write_config(tmp_path / "oauthmig.toml", data)
    for args in (("upgrade",), ("backfill",)):
        result = invoke(capsys, "--config", cfg, "-d", "control", *args)
        assert result.code == 0, result.err
    return settings, cfg


def _engine(settings: Settings) -> Engine:
    return make_engine(settings.databases["control"], settings)


def catalog(settings: Settings) -> Catalog:
    """Constraints, indexes (with validity) and column nullability of the three tables."""
    t = settings.tables
    names = [t.application, t.grant, t.token]
    engine = _engine(settings)
    try:
        with engine.connect() as conn:
            if conn.dialect.name == "sqlite":
                return [
                    tuple(r)
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
                )
            )
            conn.execute(
                insert(md.tables[t.token]).values(
                    user_id=1,
                    token="legacy-token",
                    refresh_token="legacy-refresh",
                    scope_list=[],
                    date_added=now,
                )
            )
            tx.rollback()
    finally:
        engine.dispose()


def _spawn(*args: str, module: str = "oauthmig") -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(
        [sys.executable, "-m", module, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=ROOT,
    )


def _count_ddl(cfg: str, capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, int]:
    seen: list[str] = []

    def record(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        if is_ddl(statement):
            seen.append(statement)

    event.listen(Engine, "after_cursor_execute", record)
    try:
        result = invoke(capsys, "--config", cfg, "-d", "control", *args)
    finally:
        event.remove(Engine, "after_cursor_execute", record)
    return result.code, len(seen)


# ------------------------------------------------------------------ 1. kill after each statement


def test_finalize_killed_after_each_statement_converges_and_downgrades_cleanly(
    make_database: DatabaseFactory, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    settings, cfg = _setup(make_database, tmp_path, capsys)
    before = catalog(settings)
    legacy_insert(settings)
    code, total = _count_ddl(cfg, capsys, "upgrade")
    assert code == 0
    clean_up = catalog(settings)
    assert clean_up != before
    with pytest.raises(Exception, match=r"(?i)null|check"):
        legacy_insert(settings)  # finalized: metadata is required now
    code, _ = _count_ddl(cfg, capsys, "downgrade", "--to", "0003")
    assert code == 0
    clean_down = catalog(settings)
    legacy_insert(settings)
    expected = 26 if settings.databases["control"].dialect == "postgresql" else 9
    assert total >= expected, total
    for n in range(1, total + 1):
        killed = _spawn(
            str(n), "--config", cfg, "-d", "control", "upgrade", module="tests.kill_after_ddl"
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
                f"ALTER TABLE {app} ADD CONSTRAINT {app}_grant_types_not_null CHECK (grant_types IS NOT NULL)"
            )
        )
        conn.execute(
            text(
                f"ALTER TABLE {app} ADD CONSTRAINT older_name_nn CHECK (application_type IS NOT NULL) NOT VALID"
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
