"""Configuration: resolution order, validation, and one-line errors for bad input."""

from __future__ import annotations

from pathlib import Path

import pytest

from oauthmig.config import load_settings, parse_duration_ms
from oauthmig.errors import ConfigError
from tests.helpers import invoke

SECRET = "s3cr3t-pa55"
GOOD_DB = '[databases.control]\nurl = "sqlite:///x.sqlite3"\n'

MALFORMED: list[tuple[str, str, str]] = [
    ("toml-syntax", "[databases.control\nurl = 1", "invalid TOML"),
    ("unknown-top-key", GOOD_DB + "[colour]\nx = 1\n", "colour: unknown key"),
    ("no-databases", "[routing]\ntoken = ['x']\n", "databases: at least one database"),
    ("db-not-table", "databases = 3\n", "databases: expected a table"),
    (
        "url-and-env",
        '[databases.a]\nurl = "sqlite:///a"\nurl_env = "A"\n',
        "databases.a: set exactly one of url or url_env",
    ),
    ("neither-url", "[databases.a]\n", "databases.a: set exactly one of url or url_env"),
    (
        "unknown-db-key",
        '[databases.a]\nurl = "sqlite:///a"\nport = 5\n',
        "databases.a.port: unknown key",
    ),
    (
        "bad-url",
        '[databases.a]\nurl = "not a url at all"\n',
        "databases.a.url: not a valid database URL",
    ),
    (
        "mysql-url",
        f'[databases.a]\nurl = "mysql://u:{SECRET}@h/db"\n',
        "databases.a.url: unsupported database 'mysql'",
    ),
    (
        "pg-driver",
        f'[databases.a]\nurl = "postgresql+asyncpg://u:{SECRET}@h/db"\n',
        "databases.a.url: driver 'asyncpg' is not supported",
    ),
    (
        "pg-no-dbname",
        f'[databases.a]\nurl = "postgresql://u:{SECRET}@h"\n',
        "databases.a.url: the PostgreSQL URL names no database",
    ),
    ("bad-db-name", '[databases."a b"]\nurl = "sqlite:///a"\n', "databases.a b: database names"),
    (
        "routing-unknown-db",
        GOOD_DB + "[routing]\napplication = ['control']\ngrant = ['control']\ntoken = ['nope']\n",
        "routing.token: unknown database 'nope'",
    ),
    (
        "routing-empty",
        GOOD_DB + "[routing]\napplication = ['control']\ngrant = []\ntoken = ['control']\n",
        "routing.grant: table is routed to no database",
    ),
    (
        "routing-missing-table",
        GOOD_DB + '[databases.two]\nurl = "sqlite:///y"\n'
        "[routing]\napplication = ['control']\ngrant = ['control']\n",
        "routing.token: table is routed to no database",
    ),
    (
        "routing-unknown-table",
        GOOD_DB + "[routing]\nsessions = ['control']\n",
        "routing.sessions: unknown key",
    ),
    (
        "routing-duplicate",
        GOOD_DB + "[routing]\napplication = ['control']\ngrant = ['control']\n"
        "token = ['control', 'control']\n",
        "routing.token: a database is listed twice",
    ),
    (
        "table-not-identifier",
        GOOD_DB + '[tables]\ntoken = "api token; drop"\n',
        "tables.token: 'api token; drop' is not a plain SQL name",
    ),
    (
        "table-same-name",
        GOOD_DB + '[tables]\ntoken = "sentry_apigrant"\n',
        "tables: two logical tables map to the same physical table",
    ),
    (
        "lock-timeout-text",
        GOOD_DB + '[migrate]\nlock_timeout = "soon"\n',
        "migrate.lock_timeout: expected a duration",
    ),
    (
        "lock-timeout-zero",
        GOOD_DB + '[migrate]\nlock_timeout = "0s"\n',
        "migrate.lock_timeout: must be greater than zero",
    ),
    (
        "retries-negative",
        GOOD_DB + "[migrate]\nlock_retries = -1\n",
        "migrate.lock_retries: must be between 0 and 100",
    ),
    (
        "retries-text",
        GOOD_DB + '[migrate]\nlock_retries = "many"\n',
        "migrate.lock_retries: expected a whole number",
    ),
    (
        "batch-zero",
        GOOD_DB + "[backfill]\nbatch_size = 0\n",
        "backfill.batch_size: must be between 1 and",
    ),
    (
        "auth-method",
        GOOD_DB + '[backfill.client_metadata]\nconfidential_auth_method = "none"\n',
        "backfill.client_metadata.confidential_auth_method: 'none' is not one of",
    ),
    (
        "grant-type",
        GOOD_DB + '[backfill.client_metadata]\ngrant_types = ["magic"]\n',
        "backfill.client_metadata.grant_types: 'magic' is not one of",
    ),
    (
        "audit-ignore",
        GOOD_DB + '[audit]\nignore = ["W001"]\n',
        "audit.ignore: 'W001' is not a rule code",
    ),
    (
        "direct-url-and-env",
        '[databases.a]\nurl = "postgresql://u@h/db"\ndirect_url = "postgresql://u@d/db"\n'
        'direct_url_env = "A"\n',
        "databases.a: set at most one of direct_url or direct_url_env",
    ),
    (
        "direct-url-bad",
        '[databases.a]\nurl = "postgresql://u@h/db"\ndirect_url = "not a url at all"\n',
        "databases.a.direct_url: not a valid database URL",
    ),
    (
        "direct-url-mysql",
        f'[databases.a]\nurl = "postgresql://u@h/db"\ndirect_url = "mysql://u:{SECRET}@h/db"\n',
        "databases.a.direct_url: unsupported database 'mysql'",
    ),
    (
        "direct-url-sqlite",
        '[databases.a]\nurl = "sqlite:///a"\ndirect_url = "sqlite:///b"\n',
        "databases.a.direct_url: only PostgreSQL databases have a direct URL",
    ),
    (
        "direct-url-on-sqlite",
        f'[databases.a]\nurl = "sqlite:///a"\ndirect_url = "postgresql://u:{SECRET}@h/db"\n',
        "databases.a.direct_url: url is not PostgreSQL",
    ),
    (
        "direct-url-env-name",
        '[databases.a]\nurl = "postgresql://u@h/db"\ndirect_url_env = "not a name"\n',
        "databases.a.direct_url_env: expected an environment variable name",
    ),
    (
        "env-missing",
        '[databases.a]\nurl_env = "OAUTHMIG_TEST_UNSET_VAR"\n',
        "databases.a.url_env: environment variable OAUTHMIG_TEST_UNSET_VAR is not set",
    ),
]


@pytest.mark.parametrize(("case", "content", "expected"), MALFORMED, ids=[m[0] for m in MALFORMED])
def test_malformed_config_is_one_line_exit_2(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    case: str,
    content: str,
    expected: str,
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("OAUTHMIG_TEST_UNSET_VAR", raising=False)
    cfg = tmp_path / "bad.toml"
    cfg.write_text(content)
    result = invoke(capsys, "--config", str(cfg), "status")
    assert result.code == 2, (case, result)
    lines = result.err.strip().splitlines()
    assert len(lines) == 1, result.err
    assert expected in lines[0]
    assert "Traceback" not in result.err and SECRET not in result.err + result.out
    assert result.out == ""
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.toml"]  # nothing written


def test_missing_config_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    result = invoke(capsys, "--config", str(tmp_path / "nope.toml"), "status")
    assert result.code == 2 and "does not exist" in result.err


def test_resolution_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    local = tmp_path / "oauthmig.toml"
    local.write_text('[databases.local]\nurl = "sqlite:///local.sqlite3"\n')
    env_file = tmp_path / "env.toml"
    env_file.write_text('[databases.fromenv]\nurl = "sqlite:///env.sqlite3"\n')
    explicit = tmp_path / "explicit.toml"
    explicit.write_text('[databases.explicit]\nurl = "sqlite:///e.sqlite3"\n')
    assert list(load_settings(None, {}, tmp_path).databases) == ["local"]
    env = {"OAUTHMIG_CONFIG": str(env_file)}
    assert list(load_settings(None, env, tmp_path).databases) == ["fromenv"]
    assert list(load_settings(str(explicit), env, tmp_path).databases) == ["explicit"]
    empty = tmp_path / "empty"
    empty.mkdir()
    default = load_settings(None, {}, empty)
    assert list(default.databases) == ["control", "shard"]
    assert default.tables_on("control") == ("application", "grant", "token")
    assert default.tables_on("shard") == ("token",)


def test_url_env_is_read_and_password_hidden(tmp_path: Path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text('[databases.eu]\nurl_env = "EU_URL"\n')
    s = load_settings(str(cfg), {"EU_URL": f"postgresql://oauth:{SECRET}@db:5432/sentry"}, tmp_path)
    db = s.databases["eu"]
    assert db.display_url == "postgresql+psycopg://oauth:***@db:5432/sentry"
    assert SECRET not in repr(db.display_url)


def test_direct_url_env_is_read_and_password_hidden(tmp_path: Path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text(
        '[databases.eu]\nurl = "postgresql://oauth@pgbouncer:6432/sentry"\n'
        'direct_url_env = "EU_DIRECT"\n'
    )
    env = {"EU_DIRECT": f"postgresql://oauth:{SECRET}@db:5432/sentry"}
    db = load_settings(str(cfg), env, tmp_path).databases["eu"]
    assert db.direct_display_url == "postgresql+psycopg://oauth:***@db:5432/sentry"
    assert db.session_url == f"postgresql+psycopg://oauth:{SECRET}@db:5432/sentry"
    assert SECRET not in repr(db)
    plain = load_settings(str(cfg), {}, tmp_path).databases["eu"]  # resolved lazily
    assert plain.has_direct and plain.direct_url is None
    assert plain.direct_url_error == (
        "databases.eu.direct_url_env: environment variable EU_DIRECT is not set"
    )


def test_unset_direct_url_env_stops_session_work_only(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("OAUTHMIG_TEST_UNSET_VAR", raising=False)
    cfg = tmp_path / "c.toml"
    cfg.write_text(
        '[databases.a]\nurl = "postgresql://u@127.0.0.1:1/db"\n'
        'direct_url_env = "OAUTHMIG_TEST_UNSET_VAR"\n'
    )
    for args in (("upgrade",), ("stamp", "0001"), ("backfill",)):
        result = invoke(capsys, "--config", str(cfg), *args)
        assert result.code == 2, (args, result)
        assert "Traceback" not in result.err
        message = result.err.strip().splitlines()[-1]
        assert "databases.a.direct_url_env: environment variable OAUTHMIG_TEST_UNSET_VAR" in (
            message
        ), (args, result.err)


def test_unknown_database_option(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    result = invoke(capsys, "-d", "nope", "status")
    assert result.code == 2
    assert "--database nope: no such database (configured: control, shard)" in result.err


@pytest.mark.parametrize(
    ("value", "ms"),
    [("2s", 2000), ("500ms", 500), ("1m", 60000), (3, 3000), (0.25, 250), ("1.5s", 1500)],
)
def test_durations(value: object, ms: int) -> None:
    assert parse_duration_ms(value, "k") == ms


def test_bad_duration_names_key() -> None:
    with pytest.raises(ConfigError, match=r"migrate\.statement_timeout"):
        parse_duration_ms(True, "migrate.statement_timeout")


def test_unreachable_postgres_hides_password(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'[databases.control]\nurl = "postgresql://oauth:{SECRET}@127.0.0.1:1/sentry"\n')
    for args in (
        ("status",),
        ("upgrade",),
        ("upgrade", "--dry-run"),
        ("downgrade", "--to", "base"),
    ):
        result = invoke(capsys, "--config", str(cfg), *args)
        assert result.code == 2, args
        assert (
            "database 'control' (postgresql+psycopg://oauth:***@127.0.0.1:1/sentry) is "
            "unreachable" in result.err
        )
        assert SECRET not in result.err + result.out
        assert "Traceback" not in result.err


def test_bad_arguments_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    assert invoke(capsys, "upgrade", "--dry-run", "--sql").code == 2
    assert invoke(capsys, "upgrade", "--jobs", "0").code == 2
    bad_rev = invoke(capsys, "upgrade", "--sql", "--to", "zzz")
    assert bad_rev.code == 2 and "--to zzz: unknown revision" in bad_rev.err
    assert invoke(capsys, "no-such-command").code == 2
    assert list(tmp_path.iterdir()) == []
