"""``oauthmig stamp REV``: record revisions as applied without running them.

For installs whose DBAs applied the revisions' SQL by hand (from ``upgrade --sql`` output,
through their own change process) without the version table and revision log the scripts
also write. Stamping sets the version table to ``REV`` and writes a revision-log row, with
the revision file's checksum, for every revision from the current one up to ``REV``.

Nothing is recorded anywhere unless every selected database has what those revisions create:

* each column a revision adds exists with a compatible type (the same rules, and messages,
  as the upgrade's preflight, :meth:`ColumnSpec.compatible`);
* a revision whose end state is more than columns (finalize: CHECK constraints, NOT NULL,
  indexes) has it, as its ``verify_applied`` reads from the catalog;
* a gated revision's backfills are finished (counted exactly: stamping is a one-off);
* the database is not past ``REV`` already, and the revisions it records as applied are
  intact (the preflight every command runs).

Then each database is stamped in one transaction, under the same per-database lock as
``upgrade``, after checking again. Stamped revisions record every column they add as
*adopted*: nothing proves that oauthmig added them, so a later ``downgrade`` keeps them.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from alembic.runtime.migration import MigrationContext
from sqlalchemy import delete, insert, inspect
from sqlalchemy.engine import Connection
from sqlalchemy.types import TypeEngine

from oauthmig.config import DatabaseConfig, Settings
from oauthmig.db import for_writing, map_db_errors, open_database
from oauthmig.errors import GateError, OauthmigError, SchemaStateError, UsageError
from oauthmig.pooler import require_session
from oauthmig.preflight import check_state
from oauthmig.privileges import Command
from oauthmig.revision_types import RevisionInfo, incompatible_column, revision_position
from oauthmig.rollout.job_state import new_transaction
from oauthmig.rollout.revisions import Catalogue, RevisionTarget, ensure_log_table
from oauthmig.rollout.runner import gate_for
from oauthmig.rollout.verify import verify_connection
from oauthmig.runlock import exclusive_run
from oauthmig.same_database import check_distinct
from oauthmig.version_tables import STAMPED, VERSION_TABLE, revision_log


@dataclass(frozen=True, slots=True)
class StampStep:
    """One revision recorded by ``stamp`` on one database."""

    revision: str
    outcome: str  # applied | skipped (its tables are not routed there)
    tables: tuple[str, ...]
    adopted: tuple[str, ...]  # table.column, recorded as existing before oauthmig


@dataclass(frozen=True, slots=True)
class StampedDatabase:
    """What ``stamp`` recorded (or, before it writes, will record) on one database."""

    database: str
    dialect: str
    display_url: str
    current: str | None  # the revision recorded before
    target: str
    steps: tuple[StampStep, ...]


@dataclass(frozen=True, slots=True)
class StampResult:
    """The outcome of ``stamp`` over every selected database."""

    target: str
    databases: tuple[StampedDatabase, ...]


def _columns(conn: Connection, physical: str) -> dict[str, TypeEngine[Any]]:
    return {c["name"]: c["type"] for c in inspect(conn).get_columns(physical)}


def _check(
    conn: Connection,
    settings: Settings,
    db: DatabaseConfig,
    revisions: list[RevisionInfo],
    target: str,
) -> StampedDatabase:
    """Verify that ``db`` has what the revisions up to ``target`` create; the steps to record.

    Raises the one-line error of the first thing missing; writes nothing.
    """
    current = check_state(conn, settings, db, revisions, Command.STAMP)
    cur_i, tgt_i = revision_position(current, revisions), revision_position(target, revisions)
    if cur_i > tgt_i:
        raise SchemaStateError(
            f"database {db.name!r} is at revision {current}, past {target}: stamp only records "
            f"revisions not recorded yet; to go back, `oauthmig downgrade --to {target} "
            f"-d {db.name}`"
        )
    routed = settings.tables_on(db.name)
    dialect = conn.dialect.name
    found = {t: _columns(conn, settings.tables.physical(t)) for t in routed}
    steps: list[StampStep] = []
    for rev in revisions[cur_i:tgt_i]:
        here = tuple(t for t in rev.tables if t in routed)
        adopted: list[str] = []
        for spec in rev.columns:
            if spec.table not in routed:
                continue
            physical = settings.tables.physical(spec.table)
            existing = found[spec.table].get(spec.name)
            if existing is None:
                raise SchemaStateError(
                    f"database {db.name!r}: cannot stamp revision {rev.revision}: column "
                    f"{physical}.{spec.name} is missing, so its SQL was not applied there; "
                    f"apply it (`oauthmig upgrade --sql -d {db.name}`), or stamp an earlier "
                    "revision; nothing was recorded"
                )
            if not spec.compatible(existing, dialect):
                raise incompatible_column(db.name, physical, spec, existing, dialect)
            adopted.append(f"{spec.table}.{spec.name}")
        if rev.verify_applied is not None and here:
            target_info = RevisionTarget(
                db.name, dialect, routed, settings.tables, settings.migrate, conn
            )
            problems = rev.verify_applied(conn, target_info)
            if problems:
                more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
                raise SchemaStateError(
                    f"database {db.name!r}: cannot stamp revision {rev.revision}: "
                    f"{problems[0]}{more}, so its SQL was not (fully) applied there; apply it "
                    f"(`oauthmig upgrade --sql -d {db.name}`), or stamp an earlier revision; "
                    "nothing was recorded"
                )
        if rev.requires_backfills and here:
            waiting = gate_for(conn, settings, db.name, rev, exact=True)
            if waiting is not None:
                raise GateError(
                    f"database {db.name!r}: cannot stamp revision {rev.revision} before its "
                    f"backfills finish ({waiting.describe()}); run "
                    f"`{waiting.backfill_command(db.name)}` first; nothing was recorded"
                )
            checked = verify_connection(conn, settings, db.name)
            if not checked.passed:
                raise GateError(
                    f"{checked.problem()}; cannot stamp revision {rev.revision} before a verify "
                    f"pass agrees: fix those rows (`oauthmig backfill -d {db.name}`), then "
                    f"`oauthmig verify -d {db.name}`; nothing was recorded"
                )
        outcome = "applied" if here or not rev.tables else "skipped"
        steps.append(StampStep(rev.revision, outcome, here, tuple(adopted)))
    if conn.in_transaction():
        conn.rollback()
    return StampedDatabase(db.name, dialect, db.display_url, current, target, tuple(steps))


def _record(conn: Connection, plan: StampedDatabase, catalogue: Catalogue) -> None:
    """Set the version table to the target and write the steps' log rows (one transaction)."""
    by_id = {r.revision: r for r in catalogue.revisions}
    with new_transaction(conn):
        ensure_log_table(conn)
        mc = MigrationContext.configure(conn, opts={"version_table": VERSION_TABLE})
        mc.stamp(catalogue.script, plan.target)
        now = datetime.now(UTC)
        for step in plan.steps:
            conn.execute(delete(revision_log).where(revision_log.c.revision == step.revision))
            conn.execute(
                insert(revision_log).values(
                    revision=step.revision,
                    outcome=step.outcome,
                    tables=",".join(step.tables),
                    adopted=",".join(step.adopted) or None,
                    detail=STAMPED,
                    updated_at=now,
                    checksum=by_id[step.revision].checksum,
                )
            )


def _on_database(
    settings: Settings, name: str, catalogue: Catalogue, target: str, write: bool
) -> StampedDatabase:
    db = settings.databases[name]
    revisions = list(catalogue.revisions)
    if not write:
        require_session(settings, db, "stamp")
    with map_db_errors(db), open_database(settings, db, direct=True) as conn:
        if not write:
            return _check(conn, settings, db, revisions, target)
        for_writing(conn)
        with exclusive_run(conn, db, "upgrade"):
            plan = _check(conn, settings, db, revisions, target)  # again, under the lock
            if plan.steps:
                _record(conn, plan, catalogue)
            return plan


def stamp(settings: Settings, revision: str, catalogue: Catalogue | None = None) -> StampResult:
    """Record the revisions up to ``revision`` as applied on every selected database.

    All or nothing: every database is checked first, and if any refuses, nothing is
    recorded anywhere (the error names the first; the others are listed).
    """
    cat = catalogue or Catalogue.load()
    target = cat.resolve(revision, "REV")
    if target is None:
        raise UsageError(
            "stamp base: stamp records revisions as applied; to remove what oauthmig added, "
            "`oauthmig downgrade --to base`"
        )
    check_distinct(settings)
    names = settings.database_names()
    refused: list[tuple[str, OauthmigError]] = []
    for name in names:
        try:
            _on_database(settings, name, cat, target, write=False)
        except OauthmigError as exc:
            refused.append((name, exc))
    if refused:
        (_, first), *others = refused
        also = f" (also refused: {', '.join(n for n, _ in others)})" if others else ""
        raise type(first)(first.message + also)
    return StampResult(
        target,
        tuple(_on_database(settings, n, cat, target, write=True) for n in names),
    )
