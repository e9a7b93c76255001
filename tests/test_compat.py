"""The rollout beside a live provider: its unchanged code writes in a separate process through
the whole rollout (and a downgrade to base and up again), never fails, and every row it writes
gets the new columns' values from the compatibility triggers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text

from oauthmig.config import Settings
from oauthmig.db import make_engine
from oauthmig.family import family_id
from oauthmig.rollout.compat import side_table
from tests.conftest import create_legacy, routed_config
from tests.helpers import invoke, write_config

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.slow


class WriterProcess:
    """tests/legacy_writer.py in its own interpreter, stopped by a file."""

    def __init__(self, tmp: Path, cfg: str, mode: str) -> None:
        self.stop_file = tmp / f"stop-{mode}"
        self.report = tmp / f"report-{mode}.json"
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
                err = self.proc.stderr.read().decode() if self.proc.stderr else ""
                self.proc.kill()
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


def _assert_converged(settings: Settings, report: dict[str, Any]) -> None:
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


def _version(settings: Settings, db: str) -> Any:
    return _scalar(settings, db, "SELECT version_num FROM oauthmig_version")


def test_legacy_writer_through_the_whole_rollout(
    make_database: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    settings, cfg = _settings(make_database, tmp_path)
    writer = WriterProcess(tmp_path, cfg, "legacy")
    try:
        _cli(capsys, cfg, "upgrade")
        assert _version(settings, "control") == "0003"  # the gate waits for the backfills
        _cli(capsys, cfg, "backfill")
        _cli(capsys, cfg, "upgrade")
        assert _version(settings, "control") == "0006"  # finalize applied while it writes
        assert _version(settings, "shard") == "0006"
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
        _cli(capsys, cfg, "backfill")
        _cli(capsys, cfg, "upgrade")
        assert _version(settings, "control") == "0006"
    finally:
        report = writer.stop()
    assert report["failed"] == 0, report["failures"]
    assert report["writes"] > 0
    _assert_converged(settings, report)
    # The layer recorded what it filled.
    assert _scalar(settings, "control", f"SELECT count(*) FROM {side_table('token')}") > 0
    assert _scalar(settings, "control", f"SELECT count(*) FROM {side_table('application')}") > 0
