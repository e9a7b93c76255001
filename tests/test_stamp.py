"""``oauthmig stamp`` and revision drift, on real SQLite and PostgreSQL databases.

Stamping follows what a DBA does: apply the ``upgrade --sql`` scripts by hand (psql, the
sqlite3 shell) through a process that keeps none of oauthmig's bookkeeping, then record the
revisions with ``stamp``. Drift is a revision file edited after it was applied: the catalogue
is pointed at a copy of ``revisions/`` for that.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import pytest

from oauthmig.config import Settings
from oauthmig.resources import revisions_dir
from oauthmig.rollout import revisions as catalogue
from oauthmig.rollout.finalize import object_name
from oauthmig.rollout.revisions import LOG_TABLE, STAMPED, VERSION_TABLE, checksum, history
from tests.helpers import (
    assert_matches_schema,
    columns_of,
    invoke,
    schema_dump,
)
from tests.helpers.databases import DatabaseFactory, SeededInstall
from tests.test_offline_sql import _apply, _sql, _version

BOOKKEEPING = (VERSION_TABLE, LOG_TABLE)


def _apply_by_hand(
    capsys: pytest.CaptureFixture[str],
    settings: Settings,
    cfg: str,
    out: Path,
    databases: tuple[str, ...],
    *args: str,
) -> None:
    """Apply ``upgrade --sql`` scripts with psql / sqlite3, then lose the bookkeeping they
    wrote, as SQL run through another change process would not have it."""
    made = invoke(capsys, "--config", cfg, "upgrade", "--sql", "--output-dir", str(out), *args)
    assert made.code == 0, made.err
    for db in databases:
        script = out / f"{db}.sql"
        if settings.databases[db].dialect == "sqlite" and "grant" in settings.tables_on(db):
            _leave_out_adoption(script, "redirect_uri")
        done = _apply(settings, db, script)
        assert done.returncode == 0, done.stderr
        for table in BOOKKEEPING:
            _sql(settings, db, f"DROP TABLE {table}")


def _leave_out_adoption(script: Path, column: str) -> None:
    """SQLite SQL cannot adopt Sentry's own ``grant.redirect_uri``: the DBA leaves out the
    step that would add it (its guard and its ``ADD COLUMN``), as its error message asks."""
    statements = script.read_text().split(";\n")
    guards = {
        m.group(1)
        for stmt in statements
        if column in stmt and (m := re.search(r"(temp\.oauthmig_guard_\d+)\b", stmt))
    }
    kept = [
        stmt
        for stmt in statements
        if column not in stmt and not any(re.search(rf"{g}\b", stmt) for g in guards)
    ]
    assert guards and len(kept) < len(statements)
    script.write_text(";\n".join(kept))


def _log(settings: Settings, db: str) -> dict[str, dict[str, Any]]:
    rows = _sql(
        settings, db, f"SELECT revision, outcome, adopted, detail, checksum FROM {LOG_TABLE}"
    )
    return {
        r[0]: {"outcome": r[1], "adopted": r[2], "detail": r[3], "checksum": r[4]} for r in rows
    }


def test_stamp_records_revisions_whose_sql_was_applied_by_hand(
    make_database: DatabaseFactory,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    seeded_install: SeededInstall,
) -> None:
    settings, cfg = seeded_install(rows=30)
    _apply_by_hand(capsys, settings, cfg, tmp_path / "expand", ("control", "shard"), "--to", "0003")
    assert all(
        table not in schema_dump(settings)[db]
        for db in ("control", "shard")
        for table in BOOKKEEPING
    )

    stamped = invoke(capsys, "--config", cfg, "stamp", "0003", "--format", "json")
    assert stamped.code == 0, stamped.err
    doc = json.loads(stamped.out)
    assert_matches_schema("stamp", doc)
    by_db = {d["database"]: d for d in doc["databases"]}
    assert [(s["revision"], s["outcome"]) for s in by_db["shard"]["stamped"]] == [
        ("0001", "skipped"),
        ("0002", "applied"),
        ("0003", "skipped"),
    ]
    assert by_db["control"]["from"] is None and by_db["control"]["to"] == "0003"
    files = {r.revision: r.checksum for r in history()}
    for db in ("control", "shard"):
        assert _version(settings, db) == ["0003"]
        log = _log(settings, db)
        assert sorted(log) == ["0001", "0002", "0003"]
        assert all(row["checksum"] == files[rev] for rev, row in log.items())
        assert all(row["detail"] == STAMPED for row in log.values())
    # Nothing proves oauthmig added the columns: they are recorded as adopted.
    assert _log(settings, "shard")["0002"]["adopted"].split(",") == [
        "token.token_family_id",
        "token.parent_token_id",
        "token.refresh_token_rotated_at",
        "token.revoked_at",
        "token.revoked_reason",
    ]

    status = json.loads(invoke(capsys, "--config", cfg, "status", "--format", "json").out)
    assert status["drift"] == []
    cells = {d["database"]: d["revisions"] for d in status["databases"]}
    assert cells["control"]["0002"]["state"] == "applied"
    assert cells["control"]["0004"]["state"] == "waiting"
    again = invoke(capsys, "--config", cfg, "stamp", "0003")
    assert again.code == 0 and "control: already at 0003, nothing recorded" in again.out

    # The rollout goes on from the stamped state, online.
    assert invoke(capsys, "--config", cfg, "-q", "backfill").code == 0
    final = invoke(capsys, "--config", cfg, "upgrade")
    assert final.code == 0 and "now at 0007" in final.out, final.out + final.err
    # A downgrade keeps the stamped (adopted) columns.
    assert (
        invoke(capsys, "--config", cfg, "-q", "-d", "shard", "downgrade", "--to", "0001").code == 0
    )
    assert "token_family_id" in columns_of(settings, "shard", settings.tables.token)


def test_stamp_of_finalize_checks_its_constraints_and_indexes(
    make_database: DatabaseFactory,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    seeded_install: SeededInstall,
) -> None:
    settings, cfg = seeded_install(rows=30)
    assert invoke(capsys, "--config", cfg, "-q", "upgrade").code == 0
    assert invoke(capsys, "--config", cfg, "-q", "backfill").code == 0
    # A DBA applies finalize's SQL by hand; the version table stays at 0003, no 0004 row.
    made = invoke(
        capsys,
        "--config",
        cfg,
        "upgrade",
        "--sql",
        "--from",
        "0003",
        "--output-dir",
        str(tmp_path / "fin"),
    )
    assert made.code == 0, made.err
    for db in ("control", "shard"):
        done = _apply(settings, db, tmp_path / "fin" / f"{db}.sql")
        assert done.returncode == 0, done.stderr
        _sql(settings, db, f"UPDATE {VERSION_TABLE} SET version_num = '0003'")
        _sql(settings, db, f"DELETE FROM {LOG_TABLE} WHERE revision = '0004'")
    token = settings.tables.token
    index = object_name(token, "token_family_id_idx")
    _sql(settings, "shard", f"DROP INDEX {index}")

    refused = invoke(capsys, "--config", cfg, "stamp", "head")
    assert refused.code == 2
    assert refused.err.splitlines() == [
        f"error: database 'shard': cannot stamp revision 0004: index {index} on {token} "
        "(token_family_id) is missing or INVALID, so its SQL was not (fully) applied there; "
        "apply it (`oauthmig upgrade --sql -d shard`), or stamp an earlier revision; nothing "
        "was recorded"
    ]
    assert _version(settings, "control") == ["0003"]  # all or nothing

    _sql(settings, "shard", f"CREATE INDEX {index} ON {token} (token_family_id)")
    stamped = invoke(capsys, "--config", cfg, "stamp", "head")
    assert stamped.code == 0, stamped.err
    assert "control: stamped 0004" in stamped.out
    for db in ("control", "shard"):
        assert _version(settings, db) == ["0007"]  # 0004 and the expand revisions after it
        assert _log(settings, db)["0004"]["detail"] == STAMPED
    assert invoke(capsys, "--config", cfg, "status", "--check").code == 0


def test_stamp_refuses_missing_and_incompatible_columns_and_records_nothing(
    make_database: DatabaseFactory,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    seeded_install: SeededInstall,
) -> None:
    settings, cfg = seeded_install(rows=30)
    before = schema_dump(settings)
    missing = invoke(capsys, "--config", cfg, "stamp", "0002")
    assert missing.code == 2
    assert missing.err.splitlines() == [
        "error: database 'control': cannot stamp revision 0001: column "
        "sentry_apigrant.code_challenge is missing, so its SQL was not applied there; apply it "
        "(`oauthmig upgrade --sql -d control`), or stamp an earlier revision; nothing was "
        "recorded (also refused: shard)"
    ]
    assert schema_dump(settings) == before

    # control has the expand columns; shard has one of 0002's columns with the wrong type.
    _apply_by_hand(capsys, settings, cfg, tmp_path / "expand", ("control",), "--to", "0003")
    token = settings.tables.token
    for ddl in (
        "token_family_id VARCHAR(36)",
        "parent_token_id VARCHAR(20)",
        "refresh_token_rotated_at TIMESTAMP",
        "revoked_at TIMESTAMP",
        "revoked_reason VARCHAR(32)",
    ):
        _sql(settings, "shard", f"ALTER TABLE {token} ADD COLUMN {ddl}")
    if settings.databases["shard"].dialect == "postgresql":
        _sql(settings, "shard", f"ALTER TABLE {token} ALTER token_family_id TYPE uuid USING NULL")
        for name in ("refresh_token_rotated_at", "revoked_at"):
            _sql(settings, "shard", f"ALTER TABLE {token} ALTER {name} TYPE timestamptz")
    before = schema_dump(settings)
    wrong = invoke(capsys, "--config", cfg, "stamp", "0003")
    assert wrong.code == 2
    assert wrong.err.splitlines() == [
        "error: database 'shard': column sentry_apitoken.parent_token_id exists as "
        "varchar(20), expected bigint; alter or rename it, then rerun"
    ]
    assert schema_dump(settings) == before  # control was not stamped either

    for bad in ("base", "0009"):
        refused = invoke(capsys, "--config", cfg, "stamp", bad)
        assert refused.code == 2 and len(refused.err.splitlines()) == 1, refused.err
    assert schema_dump(settings) == before


# --------------------------------------------------------------------------- drift


@pytest.fixture
def revisions_copy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A copy of ``revisions/`` that the catalogue and the runner read instead."""
    copy = tmp_path / "revisions"
    shutil.copytree(revisions_dir(), copy, ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setattr(catalogue, "revisions_dir", lambda: copy)
    return copy


def test_status_flags_a_revision_edited_after_it_was_applied(
    make_database: DatabaseFactory,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    revisions_copy: Path,
    seeded_install: SeededInstall,
) -> None:
    _, cfg = seeded_install(rows=30)
    assert invoke(capsys, "--config", cfg, "-q", "upgrade").code == 0
    assert invoke(capsys, "--config", cfg, "-q", "backfill").code == 0
    assert invoke(capsys, "--config", cfg, "-q", "upgrade").code == 0
    assert invoke(capsys, "--config", cfg, "status", "--check").code == 0

    path = revisions_copy / "versions" / "0002_token_rotation.py"
    original = path.read_bytes()
    applied = checksum(path)
    # Line endings alone are no change (a checkout on Windows).
    path.write_bytes(original.replace(b"\n", b"\r\n"))
    assert invoke(capsys, "--config", cfg, "status", "--check").code == 0
    path.write_bytes(original + b"# tightened afterwards\n")
    now = checksum(path)

    doc = json.loads(invoke(capsys, "--config", cfg, "status", "--format", "json").out)
    assert doc["drift"] == [
        {
            "revision": "0002",
            "file_checksum": now,
            "recorded": {"control": applied, "shard": applied},
        }
    ]
    cells = {d["database"]: d["revisions"] for d in doc["databases"]}
    assert cells["shard"]["0002"] == {
        "state": "applied",
        "detail": None,
        "checksum": applied,
        "changed": True,
    }
    assert not cells["shard"]["0001"]["changed"] and cells["shard"]["0001"]["checksum"]

    text = invoke(capsys, "--config", cfg, "status")
    assert text.code == 0
    assert "applied (file changed)" in text.out
    assert "drift: revision 0002 changed since it was applied on control, shard" in text.out
    check = invoke(capsys, "--config", cfg, "status", "--check")
    assert check.code == 1
    assert check.err.splitlines() == [
        f"revision 0002 changed since it was applied on control, shard (checksum recorded "
        f"{applied[:12]}, file now {now[:12]}); restore the file as it was applied: an applied "
        "revision must not change, put new changes in a new revision"
    ]

    path.write_bytes(original)
    assert invoke(capsys, "--config", cfg, "status", "--check").code == 0


def test_log_tables_of_older_versions_get_the_checksum_column(
    make_database: DatabaseFactory,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    seeded_install: SeededInstall,
) -> None:
    settings, cfg = seeded_install(rows=30)
    assert invoke(capsys, "--config", cfg, "-q", "upgrade", "--to", "0001").code == 0
    for db in ("control", "shard"):  # as an oauthmig without checksums left it
        _sql(settings, db, f"ALTER TABLE {LOG_TABLE} DROP COLUMN checksum")
    status = invoke(capsys, "--config", cfg, "status", "--format", "json")
    assert status.code == 0 and json.loads(status.out)["drift"] == []

    assert (
        invoke(capsys, "--config", cfg, "-q", "-d", "control", "upgrade", "--to", "0002").code == 0
    )
    log = _log(settings, "control")
    assert log["0001"]["checksum"] is None  # recorded before checksums: never compared
    assert log["0002"]["checksum"] == checksum(
        revisions_dir() / "versions" / "0002_token_rotation.py"
    )

    # Offline: PostgreSQL scripts add the column; SQLite scripts stop before any change.
    out = tmp_path / "sql"
    made = invoke(
        capsys,
        "--config",
        cfg,
        "-d",
        "shard",
        "upgrade",
        "--sql",
        "--from",
        "0001",
        "--to",
        "0002",
        "--output-dir",
        str(out),
    )
    assert made.code == 0, made.err
    done = _apply(settings, "shard", out / "shard.sql")
    if settings.databases["shard"].dialect == "postgresql":
        assert done.returncode == 0, done.stderr
        assert _log(settings, "shard")["0002"]["checksum"] == log["0002"]["checksum"]
    else:
        assert done.returncode != 0
        assert (
            "lacks column checksum; add it with `ALTER TABLE oauthmig_revision_log" in done.stderr
        )
        assert _version(settings, "shard") == ["0001"]
