"""The rollout beside a live provider: its unchanged code writes in a separate process through
the whole rollout (and a downgrade to base and up again), never fails, and every row it writes
gets the new columns' values from the compatibility triggers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text

from oauthmig.config import Settings
from oauthmig.db import make_engine
from oauthmig.family import family_id
from oauthmig.rollout.compat import side_table
from tests.helpers import invoke, seed_legacy, write_config
from tests.helpers.databases import create_legacy, routed_config

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.slow


class WriterProcess:
    """tests/legacy_writer.py in its own interpreter, stopped by a file."""

    def __init__(self, tmp: Path, cfg: str, mode: str, tag: str = "") -> None:
        self.stop_file = tmp / f"stop-{mode}{tag}"
        self.report = tmp / f"report-{mode}{tag}.json"
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tests.legacy_writer",
                cfg,
                str(self.stop_file),
                str(self.report),
                mode,
            ],
            cwd=ROOT,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        ready = self.report.with_name(self.report.name + ".READY")
        deadline = time.monotonic() + 120
        while not ready.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.proc.kill()  # before reading: a live writer would block the read
                err = self.proc.stderr.read().decode() if self.proc.stderr else ""
                pytest.fail(f"the {mode} writer did not start: {err[-2000:]}")
            time.sleep(0.05)

    def stop(self) -> dict[str, Any]:
        self.stop_file.write_text("stop")
        try:
            self.proc.wait(timeout=300)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
        assert self.proc.returncode == 0, (
            self.proc.stderr.read().decode() if self.proc.stderr else ""
        )
        report: dict[str, Any] = json.loads(self.report.read_text())
        return report


def _settings(make_database: Any, tmp_path: Path) -> tuple[Settings, str]:
    from oauthmig.config import settings_from_mapping

    data = routed_config(make_database("control"), make_database("shard"))
    # The provider writes all the time: give the migration's lock waits some room.
    data["migrate"] = {"lock_timeout": "5s", "lock_retries": 10, "statement_timeout": "60s"}
    settings = settings_from_mapping(data, {}, "test")
    create_legacy(settings)
    return settings, write_config(tmp_path / "oauthmig.toml", data)


def _cli(capsys: pytest.CaptureFixture[str], cfg: str, *args: str) -> None:
    result = invoke(capsys, "--config", cfg, *args)
    assert result.code == 0, (args, result.out, result.err)


def _scalar(settings: Settings, db: str, sql: str) -> Any:
    engine = make_engine(settings.databases[db], settings)
    try:
        with engine.connect() as conn:
            return conn.execute(text(sql)).scalar()
    finally:
        engine.dispose()


def _rows(settings: Settings, db: str, sql: str) -> list[Any]:
    engine = make_engine(settings.databases[db], settings)
    try:
        with engine.connect() as conn:
            return list(conn.execute(text(sql)).all())
    finally:
        engine.dispose()


def _assert_converged(
    settings: Settings, report: dict[str, Any], libraries: Sequence[dict[str, Any]] = ()
) -> None:
    t = settings.tables
    for db in settings.database_names():
        assert (
            _scalar(
                settings,
                db,
                f"SELECT count(*) FROM {t.token} WHERE token_family_id IS NULL AND "
                "(refresh_token IS NOT NULL OR hashed_refresh_token IS NOT NULL)",
            )
            == 0
        )
        # The writer's tokens carry the documented formula (or a family the library chose).
        ids = report["inserted"].get(db, {}).get("token", [])
        assert ids, f"the writer wrote no token on {db}"
        fams = dict(_rows(settings, db, f"SELECT id, token_family_id FROM {t.token}"))
        legacy = [i for i in ids if i in fams]
        assert legacy
        for row_id in legacy[-20:]:
            value = fams[row_id]
            assert str(value).replace("-", "") == family_id(t.token, row_id, db).hex
    metadata = (
        "token_endpoint_auth_method IS NULL OR grant_types IS NULL OR response_types IS NULL "
        "OR application_type IS NULL"
    )
    assert (
        _scalar(settings, "control", f"SELECT count(*) FROM {t.application} WHERE {metadata}") == 0
    )
    apps = report["inserted"]["control"]["application"]
    rows = {
        r[0]: r[1:]
        for r in _rows(
            settings,
            "control",
            "SELECT id, client_secret, token_endpoint_auth_method, grant_types "
            f"FROM {t.application}",
        )
    }
    for app_id in apps[-10:]:
        secret, method, grants = rows[app_id]
        assert method == ("none" if secret is None else "client_secret_basic")
        assert "refresh_token" in (grants if isinstance(grants, list) else json.loads(grants))
    if libraries:
        _assert_library_rows(settings, libraries)


def _assert_library_rows(settings: Settings, libraries: Sequence[dict[str, Any]]) -> None:
    """Every row the new library wrote is there with the new columns set; the last library
    (deployed after the expand) supplied them itself: the layer filled none of its rows."""
    t = settings.tables
    tokens = {
        r[0]: r[1:]
        for r in _rows(
            settings, "control", f"SELECT id, token_family_id, parent_token_id FROM {t.token}"
        )
    }
    apps = dict(
        _rows(settings, "control", f"SELECT id, token_endpoint_auth_method FROM {t.application}")
    )
    for lib in libraries:
        mine = lib["inserted"]["control"]
        assert mine["token"] and mine["application"]
        for row_id in mine["token"]:
            assert tokens[row_id][0] is not None, row_id
        for app_id in mine["application"]:
            assert apps[app_id] == "none", app_id
    last = libraries[-1]["inserted"]["control"]
    # The flow records the exchanged token, then its rotation: same family, parent set.
    pairs = last["token"]
    assert len(pairs) % 2 == 0
    for issued, rotated in zip(pairs[::2], pairs[1::2], strict=True):
        family, parent = tokens[rotated]
        assert parent == issued and str(family) == str(tokens[issued][0])
        assert str(family).replace("-", "") != family_id(t.token, issued, "control").hex
    for logical in ("token", "application"):
        filled = {
            r[0] for r in _rows(settings, "control", f"SELECT row_id FROM {side_table(logical)}")
        }
        assert not filled & set(last[logical]), logical


def _version(settings: Settings, db: str) -> Any:
    return _scalar(settings, db, "SELECT version_num FROM oauthmig_version")


@pytest.mark.parametrize("with_library", [False, True], ids=["legacy", "legacy+library"])
def test_legacy_writer_through_the_whole_rollout(
    make_database: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str], with_library: bool
) -> None:
    settings, cfg = _settings(make_database, tmp_path)
    writer = WriterProcess(tmp_path, cfg, "legacy")
    # New code runs beside the old from the expand on (its application rows name the metadata
    # columns, which exist from 0003); a downgrade past the expand rolls it back first (README
    # "Order of deploys"), and it is deployed again after the re-expand.
    library = None
    libraries: list[dict[str, Any]] = []
    try:
        _cli(capsys, cfg, "upgrade")
        assert _version(settings, "control") == "0003"  # the gate waits for the backfills
        if with_library:
            library = WriterProcess(tmp_path, cfg, "library", "-1")
        _cli(capsys, cfg, "backfill")
        _cli(capsys, cfg, "upgrade")
        assert _version(settings, "control") == "0007"  # finalize applied while it writes
        assert _version(settings, "shard") == "0007"
        if library is not None:
            libraries.append(library.stop())
            library = None
        _cli(capsys, cfg, "downgrade", "--to", "base")
        t = settings.tables
        for db in settings.database_names():
            names = _rows(
                settings,
                db,
                "SELECT tgname FROM pg_trigger WHERE tgname LIKE 'oauthmig%'"
                if settings.databases[db].dialect == "postgresql"
                else "SELECT name FROM sqlite_master WHERE name LIKE 'oauthmig_compat%'",
            )
            assert names == [], f"left behind on {db}: {names}"
        assert "token_family_id" not in str(
            _rows(settings, "control", f"SELECT * FROM {t.token} LIMIT 0")
        )
        _cli(capsys, cfg, "upgrade")
        if with_library:
            library = WriterProcess(tmp_path, cfg, "library", "-2")
        _cli(capsys, cfg, "backfill")
        _cli(capsys, cfg, "upgrade")
        assert _version(settings, "control") == "0007"
        if library is not None:
            # Rows the library wrote on the finalized schema, not only during the expand.
            done = _library_tokens(settings)
            _wait_for("library writes after finalize", lambda: _library_tokens(settings) > done)
    finally:
        report = writer.stop()
        if library is not None:
            libraries.append(library.stop())
    assert report["failed"] == 0, report["failures"]
    assert report["writes"] > 0
    for lib in libraries:
        assert lib["failed"] == 0, lib["failures"]
        assert lib["writes"] > 0
    assert len(libraries) == (2 if with_library else 0)
    _assert_converged(settings, report, libraries)
    # The layer recorded what it filled.
    assert _scalar(settings, "control", f"SELECT count(*) FROM {side_table('token')}") > 0
    assert _scalar(settings, "control", f"SELECT count(*) FROM {side_table('application')}") > 0


def _wait_for(what: str, predicate: Any, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.05)


def _triggers(settings: Settings, db: str) -> list[Any]:
    return _rows(
        settings,
        db,
        "SELECT tgname FROM pg_trigger WHERE tgname LIKE 'oauthmig%'"
        if settings.databases[db].dialect == "postgresql"
        else "SELECT name FROM sqlite_master WHERE type = 'trigger' AND name LIKE 'oauthmig%'",
    )


def test_contract_refuses_while_legacy_code_writes_and_succeeds_once_only_the_library_does(
    make_database: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    settings, cfg = _settings(make_database, tmp_path)
    for command in ("upgrade", "backfill", "upgrade"):
        _cli(capsys, cfg, command)
    assert _version(settings, "control") == "0007"
    since = datetime.now(UTC) - timedelta(seconds=1)
    legacy = WriterProcess(tmp_path, cfg, "legacy")
    library = None
    try:
        _wait_for(
            "rows filled by the compatibility layer",
            lambda: (
                _scalar(settings, "shard", f"SELECT count(*) FROM {side_table('token')}") > 0
                and _scalar(
                    settings, "control", f"SELECT count(*) FROM {side_table('application')}"
                )
                > 0
            ),
        )
        refused = invoke(capsys, "--config", cfg, "contract", "--since", since.isoformat())
        assert refused.code == 2, refused
        line = refused.err.strip()
        assert "\n" not in line
        assert "old code still writes" in line and "newest id" in line
        assert settings.tables.token in line or settings.tables.application in line
        assert all(_triggers(settings, db) for db in settings.database_names())  # kept
        legacy_report = legacy.stop()
        switched = datetime.now(UTC) + timedelta(milliseconds=10)
        library = WriterProcess(tmp_path, cfg, "library")
        _wait_for("library writes", lambda: _library_tokens(settings) > 0)
        done = invoke(
            capsys, "--config", cfg, "contract", "--since", switched.isoformat(), "--format", "json"
        )
        assert done.code == 0, done.err
        removed = {d["database"]: d["removed"] for d in json.loads(done.out)}
        assert removed == {"control": ["token", "application"], "shard": ["token"]}
    finally:
        if legacy.proc.poll() is None:
            legacy.stop()
        library_report = library.stop() if library is not None else None
    assert legacy_report["failed"] == 0, legacy_report["failures"]
    assert library_report is not None and library_report["failed"] == 0, library_report
    for db in settings.database_names():
        assert _triggers(settings, db) == []
    # Contracted: status names the phase.
    status = invoke(capsys, "--config", cfg, "status", "--format", "json")
    assert status.code == 0, status.err
    phases = {d["database"]: d["phase"] for d in json.loads(status.out)["databases"]}
    assert phases == {"control": "contracted", "shard": "contracted"}


def _library_tokens(settings: Settings) -> int:
    return int(
        _scalar(
            settings,
            "control",
            f"SELECT count(*) FROM {settings.tables.token} WHERE parent_token_id IS NOT NULL",
        )
    )


def test_verify_names_the_first_offending_ids_and_finalize_waits_for_it(
    make_database: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    settings, cfg = _settings(make_database, tmp_path)
    seed_legacy(settings, rows=30)
    _cli(capsys, cfg, "upgrade")
    t = settings.tables.token
    before = invoke(capsys, "--config", cfg, "verify", "--format", "json")
    assert before.code == 1, before
    doc = json.loads(before.out)
    first = _rows(settings, "control", f"SELECT min(id) FROM {t} WHERE refresh_token IS NOT NULL")[
        0
    ][0]
    control = next(d for d in doc if d["database"] == "control")
    token = next(x for x in control["tables"] if x["table"] == "token")
    assert token["status"] == "failed"
    assert f"first ids {first}," in token["problem"]
    _cli(capsys, cfg, "backfill")
    # A family lost after the backfill (not through the provider's writes): the backfill's own
    # bookkeeping says done, verify does not.
    ids = [
        r[0]
        for r in _rows(
            settings, "shard", f"SELECT id FROM {t} WHERE refresh_token IS NOT NULL ORDER BY id"
        )
    ]
    engine = make_engine(settings.databases["shard"], settings)
    with engine.begin() as conn:
        conn.execute(
            text(f"UPDATE {t} SET parent_token_id = :p WHERE id = :i"), {"p": ids[0], "i": ids[3]}
        )
    engine.dispose()
    refused = invoke(capsys, "--config", cfg, "upgrade")
    assert refused.code == 2, refused
    assert f"parent_token_id points outside their family: first ids {ids[3]}" in refused.err
    assert _version(settings, "shard") == "0003"
    with make_engine(settings.databases["shard"], settings).begin() as conn:
        conn.execute(text(f"UPDATE {t} SET parent_token_id = NULL"))
    ok = invoke(capsys, "--config", cfg, "verify")
    assert ok.code == 0, ok
    _cli(capsys, cfg, "upgrade")
    assert _version(settings, "shard") == "0007"
    status = json.loads(invoke(capsys, "--config", cfg, "status", "--format", "json").out)
    shard = next(d for d in status["databases"] if d["database"] == "shard")
    assert shard["phase"] == "finalized"
    assert shard["verify"]["token"]["status"] == "passed"
