"""Property: whatever the arguments and the configuration file, the CLI ends on contract.

Hypothesis drives the real CLI entry point in-process with generated commands, options and
configuration files (valid and invalid keys and values), over a real SQLite database holding
legacy tables and a few PostgreSQL URLs of databases that do not exist or cannot be reached.
Every run must exit with a documented code, print at most one ``error:`` line per database
(plus one summary line when several failed), and never let an exception out (``run`` would
raise it: a traceback).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from oauthmig.config import settings_from_mapping
from tests.helpers import invoke, seed_legacy, write_config
from tests.helpers.databases import create_legacy

DOCUMENTED_EXIT_CODES = {0, 1, 2, 3, 130, 143}

MISSING_PG = [
    "postgresql+psycopg://postgres@127.0.0.1:5432/oauthmig_no_such_database",
    "postgresql+psycopg://postgres:secret@127.0.0.1:1/unreachable",
]

DURATIONS = ["1s", "0s", "0", "-1s", "500ms", "2min", "1e300", "nan", "soon", "", "30"]
INTEGERS = [0, 1, -1, 8, 1000, 2**31, 3]

COMMANDS: list[list[str]] = [
    ["status"],
    ["status", "--check"],
    ["status", "--exact"],
    ["history"],
    ["upgrade"],
    ["upgrade", "--dry-run"],
    ["upgrade", "--sql"],
    ["downgrade", "--dry-run"],
    ["downgrade", "--sql"],
    ["backfill"],
    ["backfill", "--dry-run"],
    ["backfill", "--report"],
    ["backfill", "pause"],
    ["backfill", "resume"],
    ["backfill", "cancel"],
    ["stamp"],
    ["audit-redirects"],
    ["check-redirect"],
    ["prune-grants", "--dry-run"],
    ["report", "--html"],
    ["nonsense"],
    [],
]

EXTRA_ARGS = st.lists(
    st.sampled_from(
        [
            "--format",
            "json",
            "text",
            "csv",
            "sarif",
            "--to",
            "0001",
            "0003",
            "0004",
            "head",
            "base",
            "9999",
            "--from",
            "-d",
            "control",
            "nowhere",
            "--max-runtime",
            "0",
            "1",
            "-5",
            "--batch",
            "--jobs",
            "2",
            "--fail-on",
            "error",
            "never",
            "--min-severity",
            "info",
            "--older-than",
            "1h",
            "token-families",
            "client-metadata",
            "https://app.example.com/cb",
            "http://user:pw@x/cb#frag",
            "--quiet",
            "--verbose",
            "",
        ]
    ),
    max_size=5,
)


@st.composite
def configurations(draw: st.DrawFn, sqlite_url: str) -> dict[str, Any]:
    """A configuration mapping: mostly valid, with a drawn defect or two."""
    databases: dict[str, Any] = {"control": {"url": sqlite_url}}
    if draw(st.booleans()):
        databases["remote"] = {"url": draw(st.sampled_from(MISSING_PG))}
    data: dict[str, Any] = {"databases": databases}
    names = list(databases)
    if draw(st.booleans()):
        data["routing"] = {
            "application": ["control"],
            "grant": ["control"],
            "token": draw(st.lists(st.sampled_from([*names, "ghost"]), min_size=1, unique=True)),
        }
    elif len(names) > 1:
        data["routing"] = {"application": ["control"], "grant": ["control"], "token": names}
    migrate = draw(
        st.dictionaries(
            st.sampled_from(["lock_timeout", "statement_timeout", "index_timeout", "lock_retries"]),
            st.one_of(st.sampled_from(DURATIONS), st.sampled_from(INTEGERS)),
            max_size=2,
        )
    )
    if migrate:
        data["migrate"] = migrate
    backfill = draw(
        st.dictionaries(
            st.sampled_from(["batch_size", "sleep_seconds", "max_duty", "outage_window"]),
            st.one_of(st.sampled_from(DURATIONS), st.sampled_from(INTEGERS)),
            max_size=2,
        )
    )
    if backfill:
        data["backfill"] = backfill
    if draw(st.booleans()):
        data["audit"] = {"ignore": draw(st.lists(st.sampled_from(["RU001", "RU999", "x"])))}
    if draw(st.integers(0, 9)) == 0:
        data["unknown_section"] = {"key": "value"}
    return data


@pytest.fixture
def legacy_sqlite(tmp_path: Path) -> str:
    url = f"sqlite:///{tmp_path / 'control.sqlite3'}"
    base = {
        "databases": {"control": {"url": url}},
        "routing": {"application": ["control"], "grant": ["control"], "token": ["control"]},
    }
    settings_ = settings_from_mapping(base, {}, "test")
    create_legacy(settings_)
    seed_legacy(settings_, rows=20)
    return url


@settings(
    max_examples=40,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(data=st.data())
def test_any_arguments_and_configuration_end_on_contract(
    data: st.DataObject,
    legacy_sqlite: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    config = data.draw(configurations(legacy_sqlite), label="config")
    command = data.draw(st.sampled_from(COMMANDS), label="command")
    extra = data.draw(EXTRA_ARGS, label="extra")
    if command == ["report", "--html"]:
        extra = [str(tmp_path / "report.html"), *extra]
    if command == ["stamp"] and not extra:
        extra = ["0001"]
    cfg = write_config(tmp_path / "oauthmig.toml", config)
    result = invoke(capsys, "--config", cfg, *command, *extra)
    assert result.code in DOCUMENTED_EXIT_CODES, (command, extra, result.code, result.err)
    assert "Traceback" not in result.err and "Traceback" not in result.out
    errors = [line for line in result.err.splitlines() if line.startswith("error:")]
    databases = len(config["databases"])
    assert len(errors) <= databases + (1 if databases > 1 else 0), (command, extra, errors)
    if result.code == 0:
        assert not errors, (command, extra, errors)
