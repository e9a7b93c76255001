"""The runner as a library: all-or-nothing refusal, plans confirmed under the run's lock,
typed results, and work done once per invocation (on real SQLite and PostgreSQL)."""

from __future__ import annotations

import datetime as dt
import os
import shutil
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from alembic.script import ScriptDirectory
from sqlalchemy import event, insert, text
from sqlalchemy.engine import Connection, Engine

from oauthmig.config import Settings, settings_from_mapping
from oauthmig.db import connect, make_engine
from oauthmig.errors import (
    GateError,
    IncompatibleColumnError,
    MissingTableError,
    PlanRefusedError,
    SchemaStateError,
)
from oauthmig.legacy import legacy_metadata
from oauthmig.resources import revisions_dir
from oauthmig.rollout import revisions, runner
from oauthmig.rollout.backfill import backfill
from oauthmig.rollout.revisions import LOG_TABLE, VERSION_TABLE
from oauthmig.rollout.runner import Mode, PlanOutcome, StepAction
from oauthmig.runlock import exclusive_run
from tests.helpers import data_checksum, invoke, schema_dump, seed_legacy, write_config
from tests.helpers.databases import DatabaseFactory, create_legacy, routed_config


@pytest.fixture
def seeded(make_database: DatabaseFactory, tmp_path: Path) -> tuple[Settings, str]:
    """``control`` (every table) and ``shard`` (token) with seeded legacy tables; config file."""
    data = routed_config(make_database("control"), make_database("shard"))
    settings = settings_from_mapping(data, {}, "test")
    create_legacy(settings)
    seed_legacy(settings)
    return settings, write_config(tmp_path / "oauthmig.toml", data)


def _execute(settings: Settings, database: str, *statements: str) -> None:
    engine = make_engine(settings.databases[database], settings)
    try:
        with engine.begin() as conn:
            for statement in statements:
                conn.execute(text(statement))
    finally:
        engine.dispose()


def _version_rows(settings: Settings) -> dict[str, list[Any]]:
    """Every row of the version table and the revision log, per database (empty if absent)."""
    out: dict[str, list[Any]] = {}
    for name in settings.database_names():
        engine = make_engine(settings.databases[name], settings)
        try:
            with engine.connect() as conn:
                rows: list[Any] = []
                for table_name, order in ((VERSION_TABLE, "version_num"), (LOG_TABLE, "revision")):
                    if conn.dialect.has_table(conn, table_name):
                        query = f"SELECT * FROM {table_name} ORDER BY {order}"
                        rows += [tuple(r) for r in conn.execute(text(query))]
                out[name] = rows
        finally:
            engine.dispose()
    return out


def _snapshot(settings: Settings) -> tuple[Any, ...]:
    return schema_dump(settings), _version_rows(settings), data_checksum(settings)


# --------------------------------------------------------------------------- all or nothing


def test_library_upgrade_refuses_before_writing_anywhere(seeded: tuple[Settings, str]) -> None:
    settings, _cfg = seeded
    # control is first and fine; shard would fail its preflight (a column it cannot adopt).
    token = settings.tables.token
    _execute(settings, "shard", f"ALTER TABLE {token} ADD COLUMN parent_token_id VARCHAR(20)")
    before = _snapshot(settings)
    shown: list[Sequence[PlanOutcome]] = []
    with pytest.raises(PlanRefusedError) as refused:
        runner.upgrade(settings, on_plan=shown.append)
    assert _snapshot(settings) == before  # not even control's version table was created
    (error,) = refused.value.errors
    assert isinstance(error, IncompatibleColumnError)
    assert refused.value.message == (
        f"database 'shard': column {token}.parent_token_id exists as varchar(20), expected "
        "bigint; alter or rename it, then rerun; nothing was changed on any database (fix it, "
        "or leave that database out with -d)"
    )
    (plans,) = shown
    assert [type(p).__name__ for p in plans] == ["DatabasePlan", "IncompatibleColumnError"]
    # Without the broken database the same call goes through.
    result = runner.upgrade(settings.restrict(("control",)))
    assert not result.failed and result.runs[0].reached == "0003"


def test_library_upgrade_names_every_database_it_refuses(seeded: tuple[Settings, str]) -> None:
    settings, _cfg = seeded
    _execute(settings, "control", f"DROP TABLE {settings.tables.grant}")
    _execute(settings, "shard", f"DROP TABLE {settings.tables.token}")
    before = schema_dump(settings), _version_rows(settings)
    with pytest.raises(PlanRefusedError) as refused:
        runner.upgrade(settings, "0002")
    assert (schema_dump(settings), _version_rows(settings)) == before
    assert [type(e) for e in refused.value.errors] == [MissingTableError, MissingTableError]
    assert refused.value.message.startswith("database 'control': routed table 'grant'")
    assert "(and 1 more above); nothing was changed on any database" in refused.value.message


def test_library_downgrade_refuses_before_writing_anywhere(seeded: tuple[Settings, str]) -> None:
    settings, _cfg = seeded
    assert not runner.upgrade(settings, "0002").failed
    # shard's log no longer proves which columns oauthmig added: it cannot be downgraded.
    _execute(settings, "shard", f"DELETE FROM {LOG_TABLE} WHERE revision = '0002'")
    before = _snapshot(settings)
    with pytest.raises(PlanRefusedError) as refused:
        runner.downgrade(settings, "base")
    assert _snapshot(settings) == before  # control kept its columns and its version
    (error,) = refused.value.errors
    assert isinstance(error, SchemaStateError)
    assert "revision 0002 has no 'applied' row" in error.message


def test_a_database_another_runner_holds_is_skipped_and_the_other_goes_on(
    seeded: tuple[Settings, str],
) -> None:
    settings, _cfg = seeded
    db = settings.databases["control"]
    engine = make_engine(db, settings)
    try:
        with connect(engine, db) as conn, exclusive_run(conn, db, "upgrade") as lock:
            result = runner.upgrade(settings)
            holder = (
                lock.holder_pid
                if settings.databases["control"].dialect == "postgresql"
                else os.getpid()
            )
    finally:
        engine.dispose()
    assert not result.failed
    (held,) = result.held
    assert held.database == "control" and held.done == () and held.held is not None
    assert held.held.describe() == f"skipped: held by another runner (pid {holder})"
    shard = next(r for r in result.runs if r.database == "shard")
    assert shard.error is None and shard.reached == "0003"
    assert [s.action for s in shard.done] == [StepAction.SKIP, StepAction.APPLY, StepAction.SKIP]


# --------------------------------------------------------------------------- plan, then run


def test_run_plans_again_when_the_version_moved_after_the_plan(
    seeded: tuple[Settings, str],
) -> None:
    settings, _cfg = seeded
    control = settings.restrict(("control",))

    def another_run_meanwhile(_plans: Sequence[PlanOutcome]) -> None:
        assert not runner.upgrade(control, "0002").failed

    result = runner.upgrade(control, "0003", on_plan=another_run_meanwhile)
    (run,) = result.runs
    assert run.error is None
    assert run.plan.current == "0002" and run.reached == "0003"
    assert [s.revision for s in run.done] == ["0003"]


def _add_token_needing_backfill(settings: Settings, database: str) -> None:
    md = legacy_metadata(settings.tables, ("token",))
    engine = make_engine(settings.databases[database], settings)
    try:
        with engine.begin() as conn:
            conn.execute(
                insert(md.tables[settings.tables.token]).values(
                    id=1_000_003,
                    user_id=1,
                    token="late-token",
                    refresh_token="late-refresh",
                    scope_list=[],
                    date_added=dt.datetime(2025, 1, 1, tzinfo=dt.UTC),
                    scopes=0,
                )
            )
            # Not covered by the compatibility triggers (as if written before they existed).
            t = settings.tables.token
            conn.execute(text(f"UPDATE {t} SET token_family_id = NULL WHERE id = 1000003"))
    finally:
        engine.dispose()


@pytest.mark.parametrize("explicit", [False, True])
def test_a_gate_passed_in_the_plan_is_checked_again_under_the_lock(
    seeded: tuple[Settings, str], explicit: bool
) -> None:
    settings, _cfg = seeded
    assert not runner.upgrade(settings).failed
    assert not backfill(settings).failed

    def legacy_write_meanwhile(plans: Sequence[PlanOutcome]) -> None:
        assert all(isinstance(p, runner.DatabasePlan) and p.waiting is None for p in plans)
        _add_token_needing_backfill(settings, "shard")

    before = _snapshot(settings.restrict(("shard",)))
    result = runner.upgrade(
        settings, "0004" if explicit else "head", on_plan=legacy_write_meanwhile
    )
    runs = {r.database: r for r in result.runs}
    assert runs["control"].error is None
    assert runs["control"].reached == ("0004" if explicit else "0007")
    shard = runs["shard"]
    if explicit:
        assert isinstance(shard.error, GateError)
        assert "revision 0004 requires backfill 'token-families' to finish" in shard.error.message
    else:
        assert shard.error is None and shard.reached == "0003" and shard.done == ()
        assert shard.plan.waiting is not None and shard.plan.waiting.jobs == (
            ("token-families", 1),
        )
    after = _snapshot(settings.restrict(("shard",)))
    assert after[:2] == before[:2]  # shard's schema and version are untouched


# --------------------------------------------------------------------------- work done once


@dataclass
class _Counts:
    """Alembic script directories built, and the gate's COUNT(*) queries per table."""

    tables: tuple[str, ...]
    script_directories: int = 0
    gate_queries: dict[str, int] = field(default_factory=dict)

    def reset(self) -> None:
        self.script_directories = 0
        self.gate_queries = dict.fromkeys(self.tables, 0)


@pytest.fixture
def counts(monkeypatch: pytest.MonkeyPatch, seeded: tuple[Settings, str]) -> Iterator[_Counts]:
    settings, _cfg = seeded
    found = _Counts((settings.tables.token, settings.tables.application))
    found.reset()
    original = ScriptDirectory.__init__

    def counting_init(self: ScriptDirectory, *args: Any, **kwargs: Any) -> None:
        found.script_directories += 1
        original(self, *args, **kwargs)

    def on_execute(
        _conn: Connection, _cursor: Any, statement: str, *_args: Any, **_kwargs: Any
    ) -> None:
        words = " ".join(statement.split())
        if not words.upper().startswith("SELECT COUNT(*)"):
            return
        for physical in found.tables:
            if f"FROM {physical} " in f"{words} ":
                found.gate_queries[physical] += 1

    monkeypatch.setattr(ScriptDirectory, "__init__", counting_init)
    event.listen(Engine, "before_cursor_execute", on_execute)
    try:
        yield found
    finally:
        event.remove(Engine, "before_cursor_execute", on_execute)


def test_upgrade_reads_the_revisions_once_and_counts_each_gate_once(
    seeded: tuple[Settings, str], counts: _Counts, capsys: pytest.CaptureFixture[str]
) -> None:
    settings, cfg = seeded
    token, application = settings.tables.token, settings.tables.application
    assert not runner.upgrade(settings).failed  # expand: 0004 waits on both databases
    assert counts.script_directories == 1
    counts.reset()

    # A no-op upgrade of the two databases: one plan pass, whose plan the run pass reuses.
    result = runner.upgrade(settings)
    assert all(r.error is None and r.done == () and r.plan.waiting for r in result.runs)
    assert counts.script_directories == 1
    assert counts.gate_queries == {token: 2, application: 1}  # one per database hosting it
    counts.reset()
    assert invoke(capsys, "--config", cfg, "upgrade").code == 0
    assert counts.script_directories == 1
    assert counts.gate_queries == {token: 2, application: 1}

    assert not backfill(settings).failed
    counts.reset()
    # Finalize: each gate is counted in the plan pass and once more under the run's lock.
    result = runner.upgrade(settings)
    assert {r.database: r.reached for r in result.runs} == {"control": "0007", "shard": "0007"}
    assert counts.script_directories == 1
    assert counts.gate_queries == {token: 4, application: 2}


# --------------------------------------------------------------------------- 0004 holds still


def test_finalize_scripts_do_not_change_when_later_revisions_arrive(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = settings_from_mapping(
        routed_config(
            f"sqlite:///{tmp_path / 'control.sqlite3'}",
            "postgresql+psycopg://u@127.0.0.1:1/shard",
        ),
        {},
        "test",
    )

    def scripts() -> dict[str, list[str]]:
        result = runner.upgrade(settings, "0004", mode=Mode.SQL)
        assert not result.failed
        # Sorted lines: Alembic's SQLite table rebuild lists constraints in set order.
        return {r.database: sorted((r.sql or "").splitlines()) for r in result.runs}

    before = scripts()
    assert any("CREATE TABLE _alembic_tmp_sentry_apiapplication" in x for x in before["control"])
    # A later revision adds columns to the tables 0004 rebuilds on SQLite.
    later = tmp_path / "revisions"
    shutil.copytree(revisions_dir(), later, ignore=shutil.ignore_patterns("__pycache__"))
    (later / "versions" / "0008_later.py").write_text(
        '"""application and grant: columns added after finalize\n\n'
        'Revision ID: 0008\nRevises: 0007\n"""\n\n'
        "from sqlalchemy import Text\n\n"
        "from oauthmig.rollout.revisions import ColumnSpec, contract, expand, text_like\n\n"
        'revision = "0008"\ndown_revision = "0007"\nbranch_labels = None\ndepends_on = None\n'
        'tables = ("application", "grant")\nrequires_backfills = ()\n'
        "columns = (\n"
        '    ColumnSpec("application", "later_note", Text(), "text", text_like(1)),\n'
        '    ColumnSpec("grant", "consumed_note", Text(), "text", text_like(1)),\n'
        ")\n\n\n"
        "def upgrade() -> None:\n    expand(revision, columns)\n\n\n"
        "def downgrade() -> None:\n    contract(revision, columns)\n"
    )
    monkeypatch.setattr(revisions, "revisions_dir", lambda: later)
    assert [r.revision for r in revisions.history()][-1] == "0008"
    after = scripts()
    assert after == before
    assert not any("later_note" in line for line in after["control"])
