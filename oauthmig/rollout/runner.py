"""Routed Alembic runner: one linear revision history applied to every routed database.

Online, ``--dry-run`` and ``--sql`` all run the same revision code through Alembic: online
against a connection, the other two in Alembic's offline mode writing SQL to a buffer
(``--dry-run`` additionally reads the current revision and existing columns, read-only).
The catalogue and the revision API are in :mod:`oauthmig.rollout.revisions`.
"""

from __future__ import annotations

import contextlib
import io
import random
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any

from alembic import command
from alembic.config import Config
from sqlalchemy import (
    delete,
    insert,
    inspect,
    text,
)
from sqlalchemy.engine import Connection
from sqlalchemy.exc import DBAPIError, PendingRollbackError, SQLAlchemyError
from sqlalchemy.types import TypeEngine

from oauthmig.config import DatabaseConfig, MigrateSettings, Settings
from oauthmig.db import connect, describe_error, exclusive_run, for_writing, lock_key, make_engine
from oauthmig.errors import (
    ConnectionLostError,
    DatabaseError,
    GateError,
    LockBusyError,
    LockTimeoutError,
    MissingTableError,
    OauthmigError,
    RevisionFailedError,
    SchemaStateError,
    UsageError,
)
from oauthmig.resources import revisions_dir
from oauthmig.rollout.jobs import JOBS, run_alive
from oauthmig.rollout.offline import (
    database_guard,
    gate_guards,
    version_guard,
)
from oauthmig.rollout.remaining import remaining
from oauthmig.rollout.revisions import (
    CONNECTION_KEY,
    LOG_TABLE,
    TARGET_KEY,
    VERSION_TABLE,
    RevisionInfo,
    RevisionTarget,
    ensure_log_table,
    history,
    incompatible_column,
    log_metadata,
    read_current,
    read_log,
    resolve_revision,
    revision_log,
    revision_position,
)

# --------------------------------------------------------------------------- results


@dataclass(frozen=True, slots=True)
class Waiting:
    """A gated revision that waits for unfinished backfills on one database: ``job`` is the
    first, ``also`` the others (job, rows left)."""

    revision: str
    job: str
    remaining_rows: int | None  # None: the backfill cannot have run yet (columns missing)
    also: tuple[tuple[str, int | None], ...] = ()
    estimate: bool = False  # the row counts are estimates (see rollout.remaining)

    @property
    def jobs(self) -> tuple[tuple[str, int | None], ...]:
        """Every unfinished backfill with its rows left (``None``: cannot have run yet)."""
        return ((self.job, self.remaining_rows), *self.also)

    def describe(self) -> str:
        """``backfill X has N rows left`` (``~N`` when estimated) or ``backfill X has not run
        yet``, for every job."""
        approx = "~" if self.estimate else ""
        return ", ".join(
            f"backfill {job} has not run yet"
            if rows is None
            else f"backfill {job} has {approx}{rows:,} row{'s' if rows != 1 else ''} left"
            for job, rows in self.jobs
        )

    def backfill_command(self, database: str) -> str:
        """The one command that runs every backfill this revision waits for."""
        names = "" if len(self.jobs) > 1 else f" {self.job}"
        return f"oauthmig backfill{names} -d {database}"


@dataclass(frozen=True, slots=True)
class PlannedStep:
    """One revision to apply (or revert) on one database."""

    revision: str
    message: str
    action: str  # "apply", "skip" (not routed) or "revert"
    tables: tuple[str, ...]
    adopted: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class DatabasePlan:
    """What an upgrade or downgrade does on one database."""

    database: str
    dialect: str
    display_url: str
    current: str | None
    target: str | None
    steps: tuple[PlannedStep, ...]
    waiting: Waiting | None = None


@dataclass(frozen=True, slots=True)
class DatabaseRun:
    """The outcome on one database."""

    database: str
    plan: DatabasePlan
    done: tuple[PlannedStep, ...]
    reached: str | None
    attempts: int
    seconds: float
    error: str | None = None
    sql: str | None = None


@dataclass(frozen=True, slots=True)
class RunResult:
    """The outcome of upgrade/downgrade over every selected database."""

    direction: str
    mode: str  # "online", "dry-run" or "sql"
    runs: tuple[DatabaseRun, ...]

    @property
    def failed(self) -> tuple[DatabaseRun, ...]:
        """Runs that ended in an error."""
        return tuple(r for r in self.runs if r.error)


def check_routed_tables(conn: Connection, settings: Settings, database: str) -> None:
    """Raise :class:`MissingTableError` naming the first routed table absent from ``database``."""
    existing = set(inspect(conn).get_table_names())
    if conn.in_transaction():
        conn.rollback()
    for logical in settings.tables_on(database):
        physical = settings.tables.physical(logical)
        if physical not in existing:
            raise MissingTableError(
                f"database {database!r}: routed table {logical!r} ({physical}) does not exist; "
                f"create it, or remove {database!r} from [routing] {logical}"
            )


def preflight(
    conn: Connection,
    settings: Settings,
    db: DatabaseConfig,
    revisions: Sequence[RevisionInfo],
    current: str | None,
    pending: Sequence[RevisionInfo],
    reverting: Sequence[RevisionInfo] = (),
) -> None:
    """Refuse, before writing anything, what would fail midway.

    Checks that every routed table exists, that applied revisions' columns are present (else the
    database is half-migrated), and that pending columns that already exist can be adopted.
    Revisions being reverted may miss columns (that is how a half-migrated database is
    repaired), but their revision log row must prove which columns oauthmig added.
    """
    insp = inspect(conn)
    routed = settings.tables_on(db.name)
    check_routed_tables(conn, settings, db.name)
    columns: dict[str, dict[str, TypeEngine[Any]]] = {}
    for logical in routed:
        physical = settings.tables.physical(logical)
        columns[logical] = {c["name"]: c["type"] for c in insp.get_columns(physical)}
    reverted = {r.revision for r in reverting}
    log = read_log(conn) if reverting else {}
    for rev in reverting:
        row = log.get(rev.revision)
        if any(c.table in routed for c in rev.columns) and (
            row is None or row.get("outcome") != "applied"
        ):
            raise SchemaStateError(
                f"database {db.name!r}: revision {rev.revision} has no 'applied' row in "
                f"{LOG_TABLE}, so nothing proves which of its columns oauthmig added (and which "
                "existed before); restore the row, or drop the columns by hand"
            )
    for rev in revisions[: revision_position(current, revisions)]:
        if rev.revision in reverted:
            continue
        for spec in rev.columns:
            if spec.table in routed and spec.name not in columns[spec.table]:
                raise SchemaStateError(
                    f"database {db.name!r}: revision {rev.revision} is recorded as applied but "
                    f"{settings.tables.physical(spec.table)}.{spec.name} is missing "
                    f"(half-migrated); restore the column, or `oauthmig downgrade --to "
                    f"{rev.down_revision or 'base'} -d {db.name}` then upgrade again"
                )
            found = columns[spec.table].get(spec.name) if spec.table in routed else None
            if found is not None and not spec.compatible(found, conn.dialect.name):
                # Only an adoption by an offline script, which cannot compare types, gets here.
                raise incompatible_column(
                    db.name, settings.tables.physical(spec.table), spec, found, conn.dialect.name
                )
    for rev in pending:
        for spec in rev.columns:
            if spec.table not in routed:
                continue
            found = columns[spec.table].get(spec.name)
            if found is not None and not spec.compatible(found, conn.dialect.name):
                raise incompatible_column(
                    db.name, settings.tables.physical(spec.table), spec, found, conn.dialect.name
                )
    if conn.in_transaction():
        conn.rollback()


def check_state(
    conn: Connection, settings: Settings, db: DatabaseConfig, revisions: Sequence[RevisionInfo]
) -> str | None:
    """The preflight every command that reads or writes a database runs; the current revision.

    Raises (:class:`SchemaStateError`, :class:`MissingTableError`) when a routed table is
    missing, the version table names an unknown revision or holds several rows, or a column
    of an applied revision is missing (half-migrated).
    """
    check_routed_tables(conn, settings, db.name)
    current = read_current(conn, db.name, revisions)
    preflight(conn, settings, db, revisions, current, [])
    return current


def check_databases(settings: Settings, names: Sequence[str] | None = None) -> None:
    """Run :func:`check_state` on each database (all selected by default); raise the first error.

    Also refuses two configured names that reach the same database.
    """
    from oauthmig.identity import check_distinct

    chosen = list(settings.database_names() if names is None else names)
    check_distinct(settings, chosen)
    revisions = history()
    for name in chosen:
        db = settings.databases[name]
        engine = make_engine(db, settings)
        try:
            with connect(engine, db) as conn:
                check_state(conn, settings, db, revisions)
        except SQLAlchemyError as exc:
            raise DatabaseError(f"database {name!r}: {describe_error(exc, db)}") from None
        finally:
            engine.dispose()


def refuse_downgrade_during_backfill(
    conn: Connection, settings: Settings, database: str, revisions: Sequence[RevisionInfo]
) -> None:
    """Downgrade guard: refuse to revert a revision whose columns a running backfill fills.

    On PostgreSQL the guard also takes those jobs' run locks on the downgrade's connection
    (released when it closes), so no backfill can start on them during the downgrade.
    """
    for rev in revisions:
        for job in JOBS.values():
            if job.logical_table not in settings.tables_on(database):
                continue
            if not any(c.table == job.logical_table and c.name in job.columns for c in rev.columns):
                continue
            if conn.dialect.name == "postgresql":
                busy = not conn.execute(
                    text("SELECT pg_try_advisory_lock(:k)"),
                    {"k": lock_key(f"backfill {job.name}")},
                ).scalar()
                conn.commit()
            else:
                busy = run_alive(conn, job)
            if busy:
                raise LockBusyError(
                    f"database {database!r}: cannot downgrade revision {rev.revision} while "
                    f"backfill {job.name} is running on its columns; wait for it to finish or "
                    "stop it (Ctrl-C saves its state), then rerun the downgrade"
                )


def gate_for(
    conn: Connection, settings: Settings, db: str, rev: RevisionInfo, *, exact: bool = False
) -> Waiting | None:
    """The unfinished backfill ``rev`` waits for on database ``db``, if any.

    Reads the job rows and index ranges above their cursors, never the whole table
    (:mod:`oauthmig.rollout.remaining`); ``exact`` counts every pending row instead.
    """
    routed = settings.tables_on(db)
    if not any(t in routed for t in rev.tables):
        return None
    unfinished: list[tuple[str, int | None]] = []
    estimate = False
    for job in rev.requires_backfills:
        spec = JOBS.get(job)
        if spec is None:
            raise RevisionFailedError(f"revision {rev.revision}: unknown backfill job {job!r}")
        left = remaining(conn, settings, db, spec, exact=exact, gate=True)
        if left.pending:
            unfinished.append((job, left.rows))
            estimate = estimate or left.estimate
    if not unfinished:
        return None
    (first, rows), *others = unfinished
    return Waiting(rev.revision, first, rows, tuple(others), estimate)


def _plan(
    conn: Connection,
    settings: Settings,
    db: DatabaseConfig,
    revisions: Sequence[RevisionInfo],
    target: str | None,
    direction: str,
    explicit_target: bool,
) -> tuple[DatabasePlan, list[RevisionInfo]]:
    current = read_current(conn, db.name, revisions)
    cur_i, tgt_i = revision_position(current, revisions), revision_position(target, revisions)
    routed = settings.tables_on(db.name)
    steps: list[PlannedStep] = []
    chosen: list[RevisionInfo] = []
    waiting: Waiting | None = None
    if direction == "upgrade":
        for rev in revisions[cur_i:tgt_i]:
            waiting = gate_for(conn, settings, db.name, rev)
            if waiting is not None:
                if explicit_target:
                    needs = " and ".join(
                        f"backfill {job!r} to finish" for job, _rows in waiting.jobs
                    )
                    raise GateError(
                        f"database {db.name!r}: revision {rev.revision} requires {needs} "
                        f"({waiting.describe()}); run "
                        f"`{waiting.backfill_command(db.name)}` first"
                    )
                break
            here = tuple(x for x in rev.tables if x in routed)
            steps.append(
                PlannedStep(
                    rev.revision, rev.message, "apply" if here or not rev.tables else "skip", here
                )
            )
            chosen.append(rev)
    else:
        for rev in reversed(revisions[tgt_i:cur_i]):
            here = tuple(x for x in rev.tables if x in routed)
            steps.append(PlannedStep(rev.revision, rev.message, "revert", here))
            chosen.append(rev)
    reach = (
        (chosen[-1].revision if direction == "upgrade" else chosen[-1].down_revision)
        if chosen
        else current
    )
    plan = DatabasePlan(
        db.name, conn.dialect.name, db.display_url, current, reach, tuple(steps), waiting
    )
    return plan, chosen


# --------------------------------------------------------------------------- running


def _alembic_config(
    target: RevisionTarget, conn: Connection | None, buffer: io.StringIO | None = None
) -> Config:
    cfg = Config(output_buffer=buffer) if buffer is not None else Config()
    cfg.set_main_option("script_location", str(revisions_dir()))
    cfg.attributes[TARGET_KEY] = target
    if conn is not None:
        cfg.attributes[CONNECTION_KEY] = conn
    return cfg


def _is_lock_timeout(exc: BaseException) -> bool:
    orig = getattr(exc, "orig", None)
    sqlstate = getattr(orig, "sqlstate", None)
    if sqlstate == "55P03":  # lock_not_available, raised by lock_timeout
        return True
    return "database is locked" in str(orig or exc)


def is_connection_lost(exc: BaseException) -> bool:
    """Whether ``exc`` means the session is gone (killed backend, server restart, network)."""
    if isinstance(exc, PendingRollbackError):
        return True  # SQLAlchemy's follow-up error on a connection invalidated by a loss
    if isinstance(exc, DBAPIError) and exc.connection_invalidated:
        return True
    sqlstate = getattr(getattr(exc, "orig", None), "sqlstate", None) or ""
    # 08xxx connection exceptions; 57P01-03 admin shutdown, crash shutdown, cannot connect now.
    return sqlstate.startswith("08") or sqlstate in ("57P01", "57P02", "57P03")


def statement_kind(statement: str | None) -> str | None:
    """The leading keywords and names of a statement (``ALTER TABLE t ADD CONSTRAINT c``),
    never a literal or a parameter."""
    if not statement:
        return None
    words: list[str] = []
    for word in statement.split():
        if len(words) == 9 or not word.replace("_", "").replace(".", "").isalnum():
            break
        if word.isdigit() or word.upper() in ("CHECK", "VALUES", "WHERE", "FROM"):
            break  # what follows are expressions and values
        words.append(word)
    return " ".join(words) or None


def _rerun_command(req: RunRequest, db: str) -> str:
    if req.direction == "downgrade":
        return f"oauthmig downgrade --to {req.target} -d {db}"
    to = f" --to {req.target}" if req.explicit_target else ""
    return f"oauthmig upgrade{to} -d {db}"


def connection_lost_message(
    req: RunRequest, db: DatabaseConfig, during: str, exc: BaseException | None = None
) -> str:
    """One line: which database's connection was lost, during what, and what to run next."""
    statement: str | None = None
    seen: BaseException | None = exc
    while seen is not None and statement is None:
        # The driver error may be wrapped: Alembic's autocommit block raises SQLAlchemy's
        # PendingRollbackError from its cleanup, with the lost statement as its context.
        statement = getattr(seen, "statement", None)
        seen = seen.__cause__ or seen.__context__
    kind = statement_kind(statement)
    what = f"{during} ({kind})" if kind else during
    return (
        f"database {db.name!r}: the connection to {db.display_url} was lost during {what}; "
        "revisions already done are kept and an interrupted finalize resumes where it stopped: "
        f"rerun `{_rerun_command(req, db.name)}` once the database is reachable"
    )


def _step_after_loss(
    conn: Connection,
    db: DatabaseConfig,
    revisions: Sequence[RevisionInfo],
    plan: DatabasePlan,
    direction: str,
) -> str:
    """``revision N`` that was running when the connection dropped, read over a new connection
    (the old one is gone); from the plan alone when the database cannot be reached."""
    with contextlib.suppress(SQLAlchemyError, OauthmigError):
        with conn.engine.connect() as fresh:
            current = read_current(fresh, db.name, revisions)
        step = _next_step(revisions, current, direction)
        if step is not None:
            return f"revision {step.revision}"
    revs = [s.revision for s in plan.steps]
    return f"revision {revs[0]}" if len(revs) == 1 else f"one of revisions {', '.join(revs)}"


def lock_blockers(conn: Connection, physical_tables: Sequence[str]) -> str:
    """Who holds locks on the tables (PostgreSQL); never includes query text (may hold secrets)."""
    if conn.dialect.name != "postgresql":
        return "another connection is writing to the SQLite database"
    parts: list[str] = []
    with contextlib.suppress(SQLAlchemyError):
        rows = conn.execute(
            text(
                "SELECT c.relname, a.pid, a.state, l.mode, "
                "  EXTRACT(EPOCH FROM now() - COALESCE(a.xact_start, a.query_start))::int AS age "
                "FROM pg_locks l JOIN pg_class c ON c.oid = l.relation "
                "JOIN pg_stat_activity a ON a.pid = l.pid "
                "WHERE l.granted AND l.pid <> pg_backend_pid() AND c.relname = ANY(:names) "
                "ORDER BY age DESC NULLS LAST LIMIT 5"
            ),
            {"names": list(physical_tables)},
        ).all()
        conn.rollback()
        for r in rows:
            parts.append(
                f"{r.relname} locked by pid {r.pid} ({r.state}, {r.mode}, "
                f"transaction open {r.age}s)"
            )
    return "; ".join(parts) or "a conflicting lock was held and has since been released"


def _record_failure(conn: Connection, rev: str, message: str) -> None:
    with contextlib.suppress(SQLAlchemyError):
        if conn.in_transaction():
            conn.rollback()
        with conn.begin():
            log_metadata.create_all(conn, checkfirst=True)
            conn.execute(delete(revision_log).where(revision_log.c.revision == rev))
            conn.execute(
                insert(revision_log).values(
                    revision=rev,
                    outcome="failed",
                    tables="",
                    adopted=None,
                    detail=message[:2000],
                    updated_at=datetime.now(UTC),
                )
            )


def _apply_session_timeouts(conn: Connection, migrate: MigrateSettings) -> None:
    if conn.dialect.name == "postgresql":
        # Session level, so every statement of every revision transaction is bounded.
        conn.execute(text(f"SET lock_timeout = '{int(migrate.lock_timeout_ms)}ms'"))
        conn.execute(text(f"SET statement_timeout = '{int(migrate.statement_timeout_ms)}ms'"))
        conn.commit()


@dataclass(frozen=True, slots=True)
class RunRequest:
    """Picklable description of one database's run (so ``--jobs`` can use processes)."""

    settings: Settings
    database: str
    direction: str
    target: str
    mode: str
    explicit_target: bool
    from_revision: str | None = None


def run_database(req: RunRequest, sleep: Callable[[float], None] = time.sleep) -> DatabaseRun:
    """Upgrade or downgrade one database; errors are captured into the result, never raised."""
    settings, db = req.settings, req.settings.databases[req.database]
    started = time.monotonic()
    revisions = history()
    empty_plan = DatabasePlan(db.name, db.dialect, db.display_url, None, None, ())
    try:
        target = resolve_revision(req.target, revisions)
        if req.mode == "sql":
            return _run_offline(req, db, revisions, target, started)
        engine = make_engine(db, settings)
        try:
            with connect(engine, db) as conn:
                if req.mode == "dry-run":
                    return _run_dry(req, conn, db, revisions, target, started)
                with exclusive_run(conn, db, "upgrade"):
                    return _run_online(req, conn, db, revisions, target, started, sleep)
        finally:
            engine.dispose()
    except OauthmigError as exc:
        return DatabaseRun(
            db.name,
            empty_plan,
            (),
            None,
            0,
            time.monotonic() - started,
            exc.message,
        )
    except SQLAlchemyError as exc:
        if is_connection_lost(exc):
            message = connection_lost_message(req, db, req.direction, exc)
        else:
            message = f"database {db.name!r}: {describe_error(exc, db)}"
        return DatabaseRun(db.name, empty_plan, (), None, 0, time.monotonic() - started, message)


def _target_for(
    db: DatabaseConfig, settings: Settings, conn: Connection | None, log: dict[str, dict[str, Any]]
) -> RevisionTarget:
    previously = {
        rev: tuple(filter(None, (row.get("adopted") or "").split(","))) for rev, row in log.items()
    }
    return RevisionTarget(
        db.name,
        conn.dialect.name if conn is not None else db.dialect,
        settings.tables_on(db.name),
        settings.tables,
        settings.migrate,
        conn,
        previously,
    )


def _run_online(
    req: RunRequest,
    conn: Connection,
    db: DatabaseConfig,
    revisions: list[RevisionInfo],
    target: str | None,
    started: float,
    sleep: Callable[[float], None],
) -> DatabaseRun:
    settings = req.settings
    plan, chosen = _plan(conn, settings, db, revisions, target, req.direction, req.explicit_target)
    pending = chosen if req.direction == "upgrade" else []
    reverting = chosen if req.direction == "downgrade" else []
    preflight(conn, settings, db, revisions, plan.current, pending, reverting)
    if not chosen:
        return DatabaseRun(db.name, plan, (), plan.current, 0, time.monotonic() - started)
    if req.direction == "downgrade":
        refuse_downgrade_during_backfill(conn, settings, db.name, chosen)
    _apply_session_timeouts(conn, settings.migrate)
    for_writing(conn)
    stop = plan.target if plan.target is not None else "base"
    attempts = 0
    retries = settings.migrate.lock_retries
    while True:
        attempts += 1
        try:
            with conn.begin():
                ensure_log_table(conn)
            rt = _target_for(db, settings, conn, read_log(conn))
            cfg = _alembic_config(rt, conn)
            if req.direction == "upgrade":
                command.upgrade(cfg, stop)
            else:
                command.downgrade(cfg, stop)
            break
        except (DBAPIError, PendingRollbackError) as exc:
            with contextlib.suppress(SQLAlchemyError):
                conn.rollback()
            if is_connection_lost(exc):
                step = _step_after_loss(conn, db, revisions, plan, req.direction)
                raise ConnectionLostError(connection_lost_message(req, db, step, exc)) from None
            assert isinstance(exc, DBAPIError)
            reached_now = read_current(conn, db.name, revisions)
            failing = _next_step(revisions, reached_now, req.direction)
            routed = settings.tables_on(db.name)
            physical = [
                settings.tables.physical(t)
                for t in (failing.tables if failing else ())
                if t in routed
            ]
            if _is_lock_timeout(exc) and attempts <= retries:
                # Nothing is held while we wait: the failed revision's transaction is rolled back.
                delay = min(30.0, 0.2 * (2 ** (attempts - 1))) * random.uniform(0.5, 1.0)
                sleep(delay)
                continue
            if _is_lock_timeout(exc):
                who = lock_blockers(conn, physical)
                message = (
                    f"database {db.name!r}: revision {failing.revision if failing else '?'} could "
                    f"not lock {', '.join(physical) or 'its tables'} within lock_timeout "
                    f"{settings.migrate.lock_timeout_ms}ms after {attempts} "
                    f"attempt{'s' if attempts != 1 else ''}; {who}. "
                    "Rerun when the blocking transaction has finished"
                )
                if failing:
                    _record_failure(conn, failing.revision, message)
                raise LockTimeoutError(message) from None
            message = (
                f"database {db.name!r}: revision {failing.revision if failing else '?'} "
                f"failed: {describe_error(exc, db)}"
            )
            if failing:
                _record_failure(conn, failing.revision, message)
            raise RevisionFailedError(message) from None
        except DatabaseError as exc:
            # Raised by revision code with its own message (e.g. an index build that outlasted
            # index_timeout): not retried, since waiting longer was the whole budget.
            with contextlib.suppress(SQLAlchemyError):
                conn.rollback()
            failing = _next_step(revisions, read_current(conn, db.name, revisions), req.direction)
            if failing:
                _record_failure(conn, failing.revision, exc.message)
            raise
    reached = read_current(conn, db.name, revisions)
    log = read_log(conn)
    done = tuple(
        replace(
            s,
            adopted=tuple(filter(None, (log.get(s.revision, {}).get("adopted") or "").split(","))),
        )
        for s in plan.steps
    )
    if plan.waiting is not None:
        # Planned before the expand revisions ran: now the backfills' rows can be counted.
        gated = next(r for r in revisions if r.revision == plan.waiting.revision)
        plan = replace(plan, waiting=gate_for(conn, settings, db.name, gated) or plan.waiting)
    return DatabaseRun(db.name, plan, done, reached, attempts, time.monotonic() - started)


def _next_step(
    revisions: Sequence[RevisionInfo], current: str | None, direction: str
) -> RevisionInfo | None:
    i = revision_position(current, revisions)
    if direction == "upgrade":
        return revisions[i] if i < len(revisions) else None
    return revisions[i - 1] if i > 0 else None


def _offline_sql(rt: RevisionTarget, direction: str, start: str | None, stop: str | None) -> str:
    buffer = io.StringIO()
    cfg = _alembic_config(rt, None, buffer)
    if direction == "upgrade":
        rng = f"{start}:{stop or 'base'}" if start else (stop or "base")
        if stop is None or start == stop:
            return ""
        command.upgrade(cfg, rng, sql=True)
    else:
        if start is None or start == stop:
            return ""
        command.downgrade(cfg, f"{start}:{stop or 'base'}", sql=True)
    return buffer.getvalue()


def _guarded_sql(
    settings: Settings,
    db: DatabaseConfig,
    rt: RevisionTarget,
    direction: str,
    selected: Sequence[RevisionInfo],
) -> str:
    """``--sql``: one transaction per revision, each opened by its run-time guards."""
    rt.guarded = True
    parts: list[str] = []
    for i, rev in enumerate(selected):
        rt.header = i == 0
        rt.header_guards = database_guard(db, rt.sqlite_guards) if i == 0 else []
        begins = rev.down_revision if direction == "upgrade" else rev.revision
        guards = database_guard(db, rt.sqlite_guards)
        guards += version_guard(db, VERSION_TABLE, begins, rt.sqlite_guards)
        if direction == "upgrade" and rev.requires_backfills:
            guards += gate_guards(
                settings, db, rev.revision, rev.requires_backfills, rt.sqlite_guards
            )
        rt.step_guards = guards
        ends = rev.revision if direction == "upgrade" else rev.down_revision
        parts.append(_offline_sql(rt, direction, begins, ends))
    return "".join(parts)


def _script_header(db: DatabaseConfig, direction: str, start: str | None, stop: str | None) -> str:
    span = f"{start or 'base'} -> {stop or 'base'}"
    if db.dialect == "postgresql":
        how = (
            f"-- Apply to database {db.name!r} only, with psql: psql -v ON_ERROR_STOP=1 -f FILE.\n"
            "-- The next line is a psql command; any other client stops at it, before any change.\n"
            "\\set ON_ERROR_STOP on\n"
        )
    else:
        how = (
            f"-- Apply to database {db.name!r} only, with the sqlite3 shell: "
            "sqlite3 -bail FILE.sqlite3 < FILE.sql\n"
            "-- (-bail: stop at the first failing statement; its transaction is not committed).\n"
        )
    return (
        f"-- oauthmig {direction} {span}, generated offline for database {db.name!r}.\n"
        "-- Each revision is one transaction opened by run-time guards: it fails, and records\n"
        "-- nothing, on another database, from another revision or before its backfills.\n" + how
    )


def _run_offline(
    req: RunRequest,
    db: DatabaseConfig,
    revisions: list[RevisionInfo],
    target: str | None,
    started: float,
) -> DatabaseRun:
    if db.dialect not in ("postgresql", "sqlite"):
        raise DatabaseError(db.url_error or f"database {db.name!r}: unknown dialect")
    start = resolve_revision(req.from_revision, revisions, "--from") if req.from_revision else None
    if req.direction == "downgrade" and req.from_revision is None:
        start = revisions[-1].revision if revisions else None
    rt = RevisionTarget(
        db.name,
        db.dialect,
        req.settings.tables_on(db.name),
        req.settings.tables,
        req.settings.migrate,
        None,
    )
    s_i, t_i = revision_position(start, revisions), revision_position(target, revisions)
    routed = rt.routed
    if req.direction == "upgrade":
        sel = revisions[s_i:t_i]
        steps = tuple(
            PlannedStep(
                r.revision,
                r.message,
                "apply" if any(t in routed for t in r.tables) or not r.tables else "skip",
                tuple(t for t in r.tables if t in routed),
            )
            for r in sel
        )
    else:
        sel = list(reversed(revisions[t_i:s_i]))
        steps = tuple(
            PlannedStep(r.revision, r.message, "revert", tuple(t for t in r.tables if t in routed))
            for r in sel
        )
        if db.dialect == "sqlite":
            _refuse_sqlite_offline_drops(db, sel, routed)
    plan = DatabasePlan(db.name, db.dialect, db.display_url, start, target, steps)
    sql = _guarded_sql(req.settings, db, rt, req.direction, sel)
    if sql:
        sql = _script_header(db, req.direction, start, target) + sql
    return DatabaseRun(db.name, plan, (), None, 0, time.monotonic() - started, sql=sql)


def _refuse_sqlite_offline_drops(
    db: DatabaseConfig, reverting: Sequence[RevisionInfo], routed: Sequence[str]
) -> None:
    # SQLite SQL cannot branch on the revision log when it runs, and its finalize revert
    # rebuilds tables from a schema offline mode cannot reflect: downgrade SQLite online.
    for rev in reverting:
        cols = [f"{c.table}.{c.name}" for c in rev.columns if c.table in routed]
        if cols:
            raise UsageError(
                f"database {db.name!r}: an offline downgrade of revision {rev.revision} would drop "
                f"{', '.join(cols)}, which may have existed before oauthmig (adopted), and SQLite "
                "SQL cannot check the revision log when it runs; run `oauthmig downgrade` online, "
                f"or leave {db.name!r} out with -d"
            )
    if any(rev.tables and any(t in routed for t in rev.tables) for rev in reverting):
        raise UsageError(
            f"database {db.name!r}: offline downgrades of SQLite databases are not supported "
            "(reverting rebuilds tables from a schema the script cannot read); run `oauthmig "
            f"downgrade` online, or leave {db.name!r} out with -d"
        )


def _run_dry(
    req: RunRequest,
    conn: Connection,
    db: DatabaseConfig,
    revisions: list[RevisionInfo],
    target: str | None,
    started: float,
) -> DatabaseRun:
    settings = req.settings
    plan, chosen = _plan(conn, settings, db, revisions, target, req.direction, req.explicit_target)
    up = req.direction == "upgrade"
    preflight(
        conn, settings, db, revisions, plan.current, chosen if up else [], [] if up else chosen
    )
    rt = _target_for(db, settings, conn, read_log(conn))
    sql = _offline_sql(rt, req.direction, plan.current, plan.target) if chosen else ""
    if conn.in_transaction():
        conn.rollback()
    return DatabaseRun(db.name, plan, (), plan.current, 0, time.monotonic() - started, sql=sql)


def _requests(
    settings: Settings,
    direction: str,
    target: str,
    mode: str,
    explicit_target: bool,
    from_revision: str | None,
) -> list[RunRequest]:
    return [
        RunRequest(settings, name, direction, target, mode, explicit_target, from_revision)
        for name in settings.database_names()
    ]


def _execute(
    reqs: list[RunRequest], jobs: int, on_done: Callable[[DatabaseRun], None] | None
) -> list[DatabaseRun]:
    runs: list[DatabaseRun] = []
    if jobs > 1 and len(reqs) > 1:
        # Alembic's ``op``/``context`` proxies are module globals: parallel databases need
        # processes, not threads.
        with ProcessPoolExecutor(max_workers=min(jobs, len(reqs))) as pool:
            for run in pool.map(run_database, reqs):
                runs.append(run)
                if on_done:
                    on_done(run)
        return runs
    for req in reqs:
        run = run_database(req)
        runs.append(run)
        if on_done:
            on_done(run)
    return runs


def _refuse_shared(settings: Settings, mode: str) -> None:
    if mode != "sql":  # offline needs no connection, and cannot tell
        from oauthmig.identity import check_distinct

        check_distinct(settings)


def upgrade(
    settings: Settings,
    target: str = "head",
    *,
    mode: str = "online",
    jobs: int = 1,
    from_revision: str | None = None,
    on_done: Callable[[DatabaseRun], None] | None = None,
) -> RunResult:
    """Upgrade every selected database to ``target`` (``mode``: online, dry-run or sql)."""
    explicit = target not in ("head", "heads")
    resolve_revision(target, history())
    _refuse_shared(settings, mode)
    reqs = _requests(settings, "upgrade", target, mode, explicit, from_revision)
    return RunResult("upgrade", mode, tuple(_execute(reqs, jobs, on_done)))


def downgrade(
    settings: Settings,
    target: str,
    *,
    mode: str = "online",
    jobs: int = 1,
    from_revision: str | None = None,
    on_done: Callable[[DatabaseRun], None] | None = None,
) -> RunResult:
    """Downgrade every selected database to ``target`` (a revision or ``base``)."""
    resolve_revision(target, history())
    _refuse_shared(settings, mode)
    reqs = _requests(settings, "downgrade", target, mode, True, from_revision)
    return RunResult("downgrade", mode, tuple(_execute(reqs, jobs, on_done)))


def plan(settings: Settings, direction: str, target: str) -> list[DatabasePlan | str]:
    """Read-only plan per database, checked as the run will check it (tables, columns, gates).

    A database that cannot be planned yields its one-line error instead, so that the CLI can
    refuse before writing anything anywhere.
    """
    from oauthmig.identity import check_distinct

    revisions = history()
    resolved = resolve_revision(target, revisions)
    explicit = target not in ("head", "heads") or direction == "downgrade"
    check_distinct(settings)
    out: list[DatabasePlan | str] = []
    for name in settings.database_names():
        db = settings.databases[name]
        try:
            engine = make_engine(db, settings)
            try:
                with connect(engine, db) as conn:
                    p, chosen = _plan(conn, settings, db, revisions, resolved, direction, explicit)
                    preflight(
                        conn,
                        settings,
                        db,
                        revisions,
                        p.current,
                        chosen if direction == "upgrade" else [],
                        chosen if direction == "downgrade" else [],
                    )
                    out.append(p)
            finally:
                engine.dispose()
        except OauthmigError as exc:
            out.append(exc.message)
        except SQLAlchemyError as exc:
            out.append(f"database {name!r}: {describe_error(exc, db)}")
    return out
