"""Advice printed by the CLI is a command that works when followed, on both backends."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from oauthmig.config import load_settings
from tests.helpers import invoke, schema_dump, write_config
from tests.helpers.databases import DatabaseFactory, SeededInstall, routed_config


def test_upgrade_hint_names_every_unfinished_backfill_and_one_command_that_works(
    make_database: DatabaseFactory, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = routed_config(make_database("control"), make_database("shard"))
    cfg = write_config(tmp_path / "my config.toml", data)
    setup = invoke(
        capsys, "--config", cfg, "demo", "--apps", "30", "--tokens", "200", "--setup-only"
    )
    assert setup.code == 0, setup.err
    expand = invoke(capsys, "--config", cfg, "upgrade")
    assert expand.code == 0, expand.err
    control = re.search(r"^control: waiting before 0004: (.*)$", expand.out, re.M)
    assert control is not None, expand.out
    assert re.fullmatch(
        r"backfill token-families has \d[\d,]* rows left, "
        r"backfill client-metadata has \d[\d,]* rows left",
        control.group(1),
    ), control.group(1)
    assert re.search(r"^shard: waiting before 0004: backfill token-families has", expand.out, re.M)
    advice = re.search(r"^run `(.*?)`, then `(.*?)` again$", expand.out, re.M)
    assert advice is not None, expand.out
    backfill_cmd, upgrade_cmd = advice.groups()
    quoted = shlex.quote(cfg)
    assert backfill_cmd == f"oauthmig --config {quoted} backfill -d control -d shard"
    assert upgrade_cmd == f"oauthmig --config {quoted} upgrade"
    # Followed as printed, the advice finishes the rollout.
    assert invoke(capsys, *shlex.split(backfill_cmd)[1:]).code == 0
    final = invoke(capsys, *shlex.split(upgrade_cmd)[1:])
    assert final.code == 0 and "now at 0007" in final.out, final.out + final.err
    assert "waiting" not in final.out


def test_backfill_on_a_missing_table_advises_the_config_fix_that_works(
    make_database: DatabaseFactory, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = routed_config(make_database("control"), make_database("shard"))
    cfg = write_config(tmp_path / "oauthmig.toml", data)
    assert invoke(capsys, "--config", cfg, "-q", "demo", "--apps", "30", "--setup-only").code == 0
    assert invoke(capsys, "--config", cfg, "-q", "upgrade").code == 0
    routing = data["routing"]
    assert isinstance(routing, dict)
    wrong = dict(data, routing={**routing, "application": ["control", "shard"]})
    bad = write_config(tmp_path / "wrong.toml", wrong)
    before = schema_dump(load_settings(cfg))
    result = invoke(capsys, "--config", bad, "-d", "shard", "backfill", "client-metadata")
    assert result.code == 2
    assert result.err.splitlines() == [
        "error: database 'shard': routed table 'application' (sentry_apiapplication) does not "
        "exist; create it, or remove 'shard' from [routing] application"
    ]
    # `oauthmig upgrade` would not help: it refuses on the same missing table.
    assert "does not exist" in invoke(capsys, "--config", bad, "upgrade").err
    assert schema_dump(load_settings(cfg)) == before
    # The advice, followed (shard removed from [routing] application), works.
    fixed = invoke(capsys, "--config", cfg, "backfill", "client-metadata")
    assert fixed.code == 0, fixed.err


def test_one_attempt_is_singular_and_recorded_as_printed(
    seeded_install: SeededInstall, capsys: pytest.CaptureFixture[str]
) -> None:
    """lock_retries = 0: the upgrade gives up after its one attempt and says so."""
    from sqlalchemy import inspect, text

    from oauthmig.db import make_engine
    from tests.test_safety import _hold_write_lock, _migrate

    settings, cfg = seeded_install(rows=20, migrate=_migrate("200ms", 0))
    blocker = _hold_write_lock(settings)
    try:
        result = invoke(capsys, "--config", cfg, "-d", "control", "upgrade")
    finally:
        blocker.rollback()
        blocker.close()
    assert result.code == 2
    lines = result.err.splitlines()
    assert len(lines) == 1 and "within lock_timeout 200ms after 1 attempt;" in lines[0], lines
    engine = make_engine(settings.databases["control"], settings)
    try:
        with engine.connect() as conn:
            logged = inspect(conn).has_table("oauthmig_revision_log")
            query = text("SELECT detail FROM oauthmig_revision_log WHERE outcome = 'failed'")
            stored = conn.execute(query).all() if logged else []
            dialect = conn.dialect.name
    finally:
        engine.dispose()
    # PostgreSQL records the failure (SQLite cannot: the blocker holds its write lock).
    assert len(stored) == (1 if dialect == "postgresql" else 0)
    assert all("after 1 attempt;" in row[0] for row in stored)
