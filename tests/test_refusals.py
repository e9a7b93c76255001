"""Inputs that used to be accepted and are now refused in one line, exit 2 (issue 22 §3)."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import psycopg
import pytest
from sqlalchemy.engine import make_url

from oauthmig.config import settings_from_mapping
from oauthmig.failures import login_refused
from tests.helpers import invoke, schema_dump, seed_legacy, write_config
from tests.helpers.databases import DatabaseFactory, create_legacy, routed_config


def _one_error(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


@pytest.mark.parametrize(
    ("section", "key", "value"),
    [
        ("migrate", "statement_timeout", "0s"),
        ("migrate", "statement_timeout", "0"),
        ("migrate", "statement_timeout", 0),
        ("migrate", "lock_timeout", "0ms"),
        ("migrate", "index_timeout", "0min"),
    ],
)
def test_a_timeout_of_zero_is_refused_naming_its_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], section: str, key: str, value: Any
) -> None:
    data: dict[str, Any] = {
        "databases": {"db": {"url": f"sqlite:///{tmp_path / 'db.sqlite3'}"}},
        section: {key: value},
    }
    cfg = write_config(tmp_path / "oauthmig.toml", data)
    result = invoke(capsys, "--config", cfg, "status")
    assert result.code == 2
    line = _one_error(result.err)
    assert f"{section}.{key}: must be greater than zero" in line, line


@pytest.mark.parametrize("code", ["RU999", "RU000"])
def test_an_unknown_rule_code_in_audit_ignore_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], code: str
) -> None:
    data: dict[str, Any] = {
        "databases": {"db": {"url": f"sqlite:///{tmp_path / 'db.sqlite3'}"}},
        "audit": {"ignore": ["RU001", code]},
    }
    settings = settings_from_mapping(data, {}, "test")
    create_legacy(settings)
    cfg = write_config(tmp_path / "oauthmig.toml", data)
    for args in (["audit-redirects"], ["report", "--html", str(tmp_path / "r.html")]):
        result = invoke(capsys, "--config", cfg, *args)
        assert result.code == 2, result.err
        line = _one_error(result.err)
        assert f"audit.ignore: {code!r} is not a rule code" in line, line
    assert not (tmp_path / "r.html").exists()


def test_a_target_on_the_wrong_side_of_a_database_is_a_usage_error(
    make_database: DatabaseFactory, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = routed_config(make_database("control"), make_database("shard"))
    settings = settings_from_mapping(data, {}, "test")
    create_legacy(settings)
    seed_legacy(settings)
    cfg = write_config(tmp_path / "oauthmig.toml", data)
    assert invoke(capsys, "--config", cfg, "upgrade", "--to", "0002").code == 0
    # Each database tracks its own version: shard alone goes on to 0003.
    assert invoke(capsys, "--config", cfg, "-d", "shard", "upgrade", "--to", "0003").code == 0
    before = schema_dump(settings)
    for args in (
        ["downgrade", "--to", "0003"],  # above control (0002), equal to shard
        ["downgrade", "--to", "0003", "--dry-run"],
        ["-d", "control", "downgrade", "--to", "0005"],
        ["-d", "control", "downgrade", "--to", "head", "--dry-run"],
    ):
        result = invoke(capsys, "--config", cfg, *args)
        assert result.code == 2, (args, result.err)
        line = _one_error(result.err)
        assert "downgrade only goes down" in line and "use `oauthmig upgrade" in line, line
        assert "Traceback" not in result.err
    assert schema_dump(settings) == before
    # The right direction still works, a target equal to the current one is a no-op, and an
    # upgrade --to below a database's revision too (that database is past it).
    assert invoke(capsys, "--config", cfg, "-d", "shard", "upgrade", "--to", "0001").code == 0
    assert invoke(capsys, "--config", cfg, "-d", "shard", "downgrade", "--to", "0003").code == 0
    assert invoke(capsys, "--config", cfg, "downgrade", "--to", "0001").code == 0


@pytest.mark.parametrize(
    ("check_sql", "needle"),
    [
        ("SELEC 1", "SQLSTATE 42601"),
        ("SELECT count(*) FROM no_such_table", "SQLSTATE 42P01"),
        ("SELECT no_such_column FROM pg_class", "SQLSTATE 42703"),
        ("SELECT no_such_function()", "SQLSTATE 42883"),
        ("SELECT 'many'", "not a number"),
    ],
)
def test_a_health_probe_that_cannot_run_is_a_config_error_before_any_batch(
    backend: str,
    make_database: DatabaseFactory,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    check_sql: str,
    needle: str,
) -> None:
    url = make_database("main")
    data: dict[str, Any] = {
        "databases": {"main": {"url": url}},
        "backfill": {"health": {"check_sql": check_sql, "check_max": 10}},
    }
    settings = settings_from_mapping(data, {}, "test")
    create_legacy(settings)
    seed_legacy(settings)
    cfg = write_config(tmp_path / "oauthmig.toml", data)
    assert invoke(capsys, "--config", cfg, "upgrade").code == 0
    before = schema_dump(settings)
    result = invoke(capsys, "--config", cfg, "backfill", "--max-runtime", "600")
    if backend == "sqlite":  # health checks are a documented no-op on SQLite
        assert result.code == 0, result.err
        return
    assert result.code == 2, result.err
    line = _one_error(result.err)
    assert line.startswith("error: backfill.health.check_sql"), line
    assert needle in line, line
    assert schema_dump(settings) == before  # no job table: nothing started


@pytest.mark.parametrize("backend", ["postgresql"], indirect=True)
def test_a_replica_url_that_is_no_standby_or_refuses_the_login_is_a_config_error(
    make_database: DatabaseFactory, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url = make_database("main")
    data: dict[str, Any] = {"databases": {"main": {"url": url}}}
    settings = settings_from_mapping(data, {}, "test")
    create_legacy(settings)
    cfg = write_config(tmp_path / "oauthmig.toml", data)
    assert invoke(capsys, "--config", cfg, "upgrade").code == 0
    before = schema_dump(settings)
    secret = f"s3cr:t{uuid.uuid4().hex[:8]}"  # a ':' in the password
    nobody = f"oauthmig_nobody_{uuid.uuid4().hex[:8]}"
    server = make_url(url)
    cases = [
        (url, "is not a standby"),
        (
            server.set(username=nobody).render_as_string(False).replace("@", f":{secret}@", 1),
            'FATAL: role "',
        ),
        (server.set(database=nobody).render_as_string(False), 'FATAL: database "'),
    ]
    for replica, needle in cases:
        health = {"max_replica_lag": "10s", "replica_urls": [replica]}
        cfg = write_config(tmp_path / "oauthmig.toml", {**data, "backfill": {"health": health}})
        # Refused before the first batch, not held until --max-runtime (exit 3).
        result = invoke(capsys, "--config", cfg, "backfill", "--max-runtime", "20")
        assert result.code == 2, result.err
        line = _one_error(result.err)
        assert "backfill.health.replica_urls" in line and needle in line, line
        assert needle == "is not a standby" or "does not exist" in line, line
        assert secret not in result.err + result.out and "Traceback" not in result.err
        assert schema_dump(settings) == before  # no job table: nothing started


def test_sqlite_directory_and_read_only_file_are_caught_before_any_write(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = tmp_path / "dir.sqlite3"
    folder.mkdir()
    cfg = write_config(tmp_path / "dir.toml", {"databases": {"db": {"url": f"sqlite:///{folder}"}}})
    for args in (["status"], ["upgrade"], ["backfill"]):
        result = invoke(capsys, "--config", cfg, *args)
        assert result.code == 2, result.err
        assert "is a directory, not a SQLite file" in _one_error(result.err)

    path = tmp_path / "legacy.sqlite3"
    data: dict[str, Any] = {"databases": {"db": {"url": f"sqlite:///{path}"}}}
    settings = settings_from_mapping(data, {}, "test")
    create_legacy(settings)
    seed_legacy(settings)
    before = schema_dump(settings)
    path.chmod(0o444)
    cfg = write_config(tmp_path / "ro.toml", data)
    try:
        for args in (["upgrade"], ["upgrade", "--to", "0001"], ["backfill"]):
            result = invoke(capsys, "--config", cfg, *args)
            assert result.code == 2, (args, result.err)
            assert "is read-only; this command writes to it" in result.err, result.err
            assert "Traceback" not in result.err
        # Reading still works.
        assert invoke(capsys, "--config", cfg, "status").code in (0, 1)
    finally:
        path.chmod(0o644)
    assert schema_dump(settings) == before
    assert not list(tmp_path.glob("legacy.sqlite3.*.lock"))

    ro = write_config(
        tmp_path / "mode-ro.toml",
        {"databases": {"db": {"url": f"sqlite:///file:{path}?mode=ro&uri=true"}}},
    )
    result = invoke(capsys, "--config", ro, "upgrade")
    assert result.code == 2, result.err
    assert schema_dump(settings) == before


@pytest.mark.parametrize(
    ("message", "refused"),
    [
        ('FATAL:  password authentication failed for user "oauth"', True),
        ('FATAL:  no pg_hba.conf entry for host "10.0.0.1", user "oauth", database "x"', True),
        ('FATAL:  role "oauth" is not permitted to log in', True),
        ('FATAL:  database "sentry" does not exist', True),
        ("fe_sendauth: no password supplied", True),
        ("Connection refused\n\tIs the server running on that host?", False),
        ("timeout expired", False),
        ("FATAL:  the database system is starting up", False),
        ("failed to resolve host 'replica-1': Name or service not known", False),
    ],
)
def test_login_refused_tells_a_wrong_url_from_an_unreachable_server(
    message: str, refused: bool
) -> None:
    exc = psycopg.OperationalError(f'connection to server at "127.0.0.1" failed: {message}')
    assert login_refused(exc) is refused
