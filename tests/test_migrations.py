"""Routed Alembic upgrades on real SQLite and PostgreSQL databases."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from sqlalchemy import text

from oauthmig.config import Settings, settings_from_mapping
from oauthmig.db import connect, make_engine
from oauthmig.errors import LockBusyError
from oauthmig.rollout.revisions import LOG_TABLE, VERSION_TABLE
from oauthmig.runlock import exclusive_run
from tests.helpers import (
    columns_of,
    data_checksum,
    invoke,
    schema_dump,
    seed_legacy,
    write_config,
)
from tests.helpers.databases import DatabaseFactory, create_legacy, routed_config

GRANT_COLS = {"code_challenge", "code_challenge_method"}
TOKEN_COLS = {
    "token_family_id",
    "parent_token_id",
    "refresh_token_rotated_at",
    "revoked_at",
    "revoked_reason",
}
APP_COLS = {"token_endpoint_auth_method", "grant_types", "response_types", "application_type"}


def _config_file(tmp_path: Path, settings_data: dict[str, object]) -> str:
    return write_config(tmp_path / "oauthmig.toml", settings_data)


@pytest.fixture
def routed(make_database: DatabaseFactory, tmp_path: Path) -> tuple[Settings, str]:
    data = routed_config(make_database("control"), make_database("shard"))
    settings = settings_from_mapping(data, {}, "test")
    create_legacy(settings)
    seed_legacy(settings)
    return settings, _config_file(tmp_path, data)


def test_upgrade_adds_columns_exactly_where_routed(
    routed: tuple[Settings, str], capsys: pytest.CaptureFixture[str]
) -> None:
    settings, cfg = routed
    result = invoke(capsys, "--config", cfg, "upgrade")
    assert result.code == 0, result.err
    t = settings.tables
    assert columns_of(settings, "control", t.grant) >= GRANT_COLS
    assert columns_of(settings, "control", t.token) >= TOKEN_COLS
    assert columns_of(settings, "control", t.application) >= APP_COLS
    assert columns_of(settings, "shard", t.token) >= TOKEN_COLS
    shard_tables = set(schema_dump(settings)["shard"])
    assert t.grant not in shard_tables and t.application not in shard_tables

    status = invoke(capsys, "--config", cfg, "status", "--format", "json")
    assert status.code == 0, status.err
    doc = json.loads(status.out)
    by_db = {d["database"]: d for d in doc["databases"]}
    assert {r: c["state"] for r, c in by_db["control"]["revisions"].items()} == {
        "0001": "applied",
        "0002": "applied",
        "0003": "applied",
        "0004": "waiting",
        "0005": "pending",
        "0006": "pending",
        "0007": "pending",
    }
    assert {r: c["state"] for r, c in by_db["shard"]["revisions"].items()} == {
        "0001": "skipped",
        "0002": "applied",
        "0003": "skipped",
        "0004": "waiting",
        "0005": "pending",
        "0006": "pending",
        "0007": "pending",
    }
    # The expand revisions are in; finalize waits for the backfills, so --check still fails.
    assert by_db["control"]["current"] == by_db["shard"]["current"] == "0003"
    assert "token-families" in by_db["shard"]["revisions"]["0004"]["detail"]
    assert doc["outstanding"] is True
    check = invoke(capsys, "--config", cfg, "status", "--check")
    assert check.code == 1, check.err


def test_status_check_fails_while_pending(
    routed: tuple[Settings, str], capsys: pytest.CaptureFixture[str]
) -> None:
    _, cfg = routed
    before = invoke(capsys, "--config", cfg, "status", "--check")
    assert before.code == 1
    assert "pending" in before.out
    partial = invoke(capsys, "--config", cfg, "upgrade", "--to", "0001")
    assert partial.code == 0, partial.err
    doc = json.loads(invoke(capsys, "--config", cfg, "status", "--format", "json").out)
    states = {
        d["database"]: {r: c["state"] for r, c in d["revisions"].items()} for d in doc["databases"]
    }
    assert states["control"] == {
        "0001": "applied",
        "0002": "pending",
        "0003": "pending",
        "0004": "waiting",
        "0005": "pending",
        "0006": "pending",
        "0007": "pending",
    }
    assert states["shard"] == {
        "0001": "skipped",
        "0002": "pending",
        "0003": "pending",
        "0004": "waiting",
        "0005": "pending",
        "0006": "pending",
        "0007": "pending",
    }


def test_round_trip_keeps_legacy_rows(
    routed: tuple[Settings, str], capsys: pytest.CaptureFixture[str]
) -> None:
    settings, cfg = routed
    legacy_schema = schema_dump(settings)
    legacy_cols = {
        logical: [
            c for c, _, _ in legacy_schema["control"][settings.tables.physical(logical)]["columns"]
        ]
        for logical in ("application", "grant", "token")
    }
    before = data_checksum(settings)
    assert invoke(capsys, "--config", cfg, "upgrade").code == 0
    assert data_checksum(settings, legacy_cols) == before
    down = invoke(capsys, "--config", cfg, "downgrade", "--to", "base")
    assert down.code == 0, down.err
    after_down = schema_dump(settings)
    for db in ("control", "shard"):
        for tname, shape in legacy_schema[db].items():
            assert after_down[db][tname] == shape
    assert data_checksum(settings) == before
    assert invoke(capsys, "--config", cfg, "upgrade").code == 0
    assert data_checksum(settings, legacy_cols) == before
    assert columns_of(settings, "shard", settings.tables.token) >= TOKEN_COLS


def test_dry_run_and_sql_change_nothing(
    routed: tuple[Settings, str], capsys: pytest.CaptureFixture[str]
) -> None:
    settings, cfg = routed
    schema, data = schema_dump(settings), data_checksum(settings)
    dry = invoke(capsys, "--config", cfg, "upgrade", "--dry-run")
    assert dry.code == 0, dry.err
    assert "ADD COLUMN code_challenge" in dry.out and "control" in dry.out and "shard" in dry.out
    # Dry-run looked at the database, so it knows the column is missing: no IF NOT EXISTS.
    assert "IF NOT EXISTS code_challenge" not in dry.out
    sql = invoke(capsys, "--config", cfg, "upgrade", "--sql")
    assert sql.code == 0, sql.err
    assert "-- ===== database: shard" in sql.out and "token_family_id" in sql.out
    dry_json = invoke(capsys, "--config", cfg, "upgrade", "--dry-run", "--format", "json")
    assert json.loads(dry_json.out)["dry_run"] is True
    assert schema_dump(settings) == schema
    assert data_checksum(settings) == data
    for db in ("control", "shard"):
        assert VERSION_TABLE not in schema_dump(settings)[db]
        assert LOG_TABLE not in schema_dump(settings)[db]


def test_dry_run_after_partial_upgrade_shows_only_pending(
    routed: tuple[Settings, str], capsys: pytest.CaptureFixture[str]
) -> None:
    settings, cfg = routed
    assert invoke(capsys, "--config", cfg, "upgrade", "--to", "0002").code == 0
    schema = schema_dump(settings)
    dry = invoke(capsys, "--config", cfg, "upgrade", "--dry-run")
    assert dry.code == 0, dry.err
    assert "token_family_id" not in dry.out and "token_endpoint_auth_method" in dry.out
    assert schema_dump(settings) == schema


def test_sql_needs_no_connection(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = write_config(
        tmp_path / "c.toml",
        routed_config(
            "postgresql+psycopg://u:hunter2@127.0.0.1:1/nowhere",
            "postgresql+psycopg://u:hunter2@127.0.0.1:1/nowhere2",
        ),
    )
    result = invoke(capsys, "--config", cfg, "upgrade", "--sql")
    assert result.code == 0, result.err
    assert "SET lock_timeout = '500ms'" in result.out
    # Offline it cannot look, so the script decides when it runs: add, or adopt and record it.
    assert "ALTER TABLE sentry_apigrant ADD COLUMN code_challenge TEXT" in result.out
    assert "'grant.code_challenge'" in result.out
    assert "hunter2" not in result.out + result.err
    down = invoke(capsys, "--config", cfg, "downgrade", "--to", "base", "--sql")
    assert down.code == 0, down.err
    assert "DROP COLUMN token_family_id" in down.out


def test_adopts_compatible_existing_column_and_keeps_it_on_downgrade(
    routed: tuple[Settings, str], capsys: pytest.CaptureFixture[str]
) -> None:
    settings, cfg = routed
    engine = make_engine(settings.databases["control"], settings)
    with engine.begin() as conn:
        conn.execute(
            text(f"ALTER TABLE {settings.tables.grant} ADD COLUMN code_challenge VARCHAR(128)")
        )
    engine.dispose()
    up = invoke(capsys, "--config", cfg, "upgrade")
    assert up.code == 0, up.err
    assert "adopted grant.code_challenge" in up.out
    assert invoke(capsys, "--config", cfg, "downgrade", "--to", "base").code == 0
    cols = columns_of(settings, "control", settings.tables.grant)
    assert "code_challenge" in cols and "code_challenge_method" not in cols


def test_refuses_incompatible_existing_column(
    routed: tuple[Settings, str], capsys: pytest.CaptureFixture[str]
) -> None:
    settings, cfg = routed
    engine = make_engine(settings.databases["shard"], settings)
    with engine.begin() as conn:
        conn.execute(
            text(f"ALTER TABLE {settings.tables.token} ADD COLUMN parent_token_id VARCHAR(20)")
        )
    engine.dispose()
    schema = schema_dump(settings)
    result = invoke(capsys, "--config", cfg, "-d", "shard", "upgrade")
    assert result.code == 2
    assert (
        f"column {settings.tables.token}.parent_token_id exists as varchar(20), expected bigint"
    ) in result.err
    assert "Traceback" not in result.err
    assert schema_dump(settings)["shard"] == schema["shard"]


def test_missing_routed_table_is_named(
    make_database: DatabaseFactory, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = routed_config(make_database("control"), make_database("shard"))
    settings = settings_from_mapping(data, {}, "test")
    create_legacy(settings.restrict(("control",)))
    make_engine(settings.databases["shard"], settings, create=True).connect().close()
    cfg = write_config(tmp_path / "c.toml", data)
    before = schema_dump(settings)
    result = invoke(capsys, "--config", cfg, "upgrade")
    assert result.code == 2
    lines = result.err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.err
    assert "database 'shard': routed table 'token' (sentry_apitoken) does not exist" in lines[0]
    assert "nothing was changed on any database" in lines[0]
    assert schema_dump(settings) == before  # control was not touched either
    status = invoke(capsys, "--config", cfg, "status")
    assert status.code == 2 and "routed table 'token'" in status.err
    only_control = invoke(capsys, "--config", cfg, "-d", "control", "upgrade")
    assert only_control.code == 0, only_control.err


def test_half_migrated_database_is_reported(
    routed: tuple[Settings, str], capsys: pytest.CaptureFixture[str]
) -> None:
    settings, cfg = routed
    assert invoke(capsys, "--config", cfg, "upgrade", "--to", "0002").code == 0
    engine = make_engine(settings.databases["shard"], settings)
    with engine.begin() as conn:
        conn.execute(text(f"ALTER TABLE {settings.tables.token} DROP COLUMN revoked_at"))
    engine.dispose()
    result = invoke(capsys, "--config", cfg, "upgrade")
    assert result.code == 2
    assert "half-migrated" in result.err and "revoked_at" in result.err


def test_second_run_skips_a_database_while_its_lock_is_held(
    routed: tuple[Settings, str], capsys: pytest.CaptureFixture[str]
) -> None:
    settings, cfg = routed
    db = settings.databases["control"]
    engine = make_engine(db, settings)
    with connect(engine, db) as conn, exclusive_run(conn, db, "upgrade"):
        with (
            pytest.raises(LockBusyError),
            connect(engine, db) as other,
            exclusive_run(other, db, "upgrade"),
        ):
            pass
        # Another runner (overlapping CI jobs, pods) holds it: skipped and said so, exit 0.
        result = invoke(capsys, "--config", cfg, "upgrade")
        assert result.code == 0, result.err
        assert "control: skipped: held by another runner (pid " in result.out
        assert VERSION_TABLE not in schema_dump(settings)["control"]
    engine.dispose()
    assert invoke(capsys, "--config", cfg, "upgrade").code == 0


def test_unknown_revision_in_version_table(
    routed: tuple[Settings, str], capsys: pytest.CaptureFixture[str]
) -> None:
    settings, cfg = routed
    assert invoke(capsys, "--config", cfg, "upgrade").code == 0
    engine = make_engine(settings.databases["control"], settings)
    with engine.begin() as conn:
        conn.execute(text(f"UPDATE {VERSION_TABLE} SET version_num = '9999'"))
    engine.dispose()
    result = invoke(capsys, "--config", cfg, "upgrade")
    assert result.code == 2 and "'9999', which this oauthmig does not know" in result.err


def test_history_lists_revisions(capsys: pytest.CaptureFixture[str]) -> None:
    result = invoke(capsys, "history", "--format", "json")
    assert result.code == 0
    doc = json.loads(result.out)
    assert [r["revision"] for r in doc][:3] == ["0001", "0002", "0003"]
    assert doc[1]["tables"] == ["token"]
    assert "token.token_family_id" in doc[1]["columns"]


def test_upgrade_in_parallel_jobs(
    routed: tuple[Settings, str], capsys: pytest.CaptureFixture[str]
) -> None:
    _settings, cfg = routed
    result = invoke(capsys, "--config", cfg, "upgrade", "--jobs", "2", "--format", "json")
    assert result.code == 0, result.err
    doc = json.loads(result.out)
    assert {d["database"]: d["to"] for d in doc["databases"]} == {
        "control": "0003",
        "shard": "0003",
    }
