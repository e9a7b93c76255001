"""Routed Alembic runner: one linear revision history applied to every routed database.

Online, ``--dry-run`` and ``--sql`` all run the same revision code through Alembic: online
against a connection, the other two in Alembic's offline mode writing SQL to a buffer
(``--dry-run`` additionally reads the current revision and existing columns, read-only).
Online runs are all or nothing across databases: every selected database is planned and checked
first, and if any cannot be, nothing is written anywhere (:class:`PlanRefusedError`); each
database then runs its plan, confirmed under its run lock. The catalogue and the revision API
are in :mod:`oauthmig.rollout.revisions`, the preflight checks every command runs in
:mod:`oauthmig.preflight`.
"""

from __future__ import annotations

import contextlib
import io
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from alembic.config import Config
from alembic.runtime.environment import EnvironmentContext
from alembic.script import ScriptDirectory
from sqlalchemy import (
    delete,
    insert,
)
from sqlalchemy.engine import Connection
from sqlalchemy.exc import DBAPIError, PendingRollbackError, SQLAlchemyError

from oauthmig.config import DatabaseConfig, MigrateSettings, Settings
from oauthmig.db import (
    backoff_delay,
    db_error_message,
    for_writing,
    lock_blockers,
    map_db_errors,
    open_database,
    set_timeouts,
)
from oauthmig.errors import (
    ConnectionLostError,
    DatabaseError,
    GateError,
    LockBusyError,
    LockTimeoutError,
    OauthmigError,
    PlanRefusedError,
    RevisionFailedError,
    UsageError,
)
from oauthmig.failures import FailureKind, classify
from oauthmig.pooler import require_session
from oauthmig.preflight import check_state, preflight
from oauthmig.privileges import Command, check_privileges
from oauthmig.revision_types import RevisionInfo, revision_position
from oauthmig.rollout.jobs import JOBS
from oauthmig.rollout.offline import (
    database_guard,
    gate_guards,
    version_guard,
)
from oauthmig.rollout.remaining import remaining
from oauthmig.rollout.revisions import (
    CONNECTION_KEY,
    TARGET_KEY,
    Catalogue,
    RevisionTarget,
    ensure_log_table,
)
from oauthmig.rollout.verify import verify_connection
from oauthmig.runlock import Held, RunLock
from oauthmig.same_database import check_distinct
from oauthmig.version_tables import (
    VERSION_TABLE,
    log_metadata,
    read_current,
    read_log,
    revision_log,
)

# --------------------------------------------------------------------------- results


class Direction(StrEnum):
    """Which way a run goes through the history."""

    UPGRADE = "upgrade"
    DOWNGRADE = "downgrade"


_COMMANDS = {Direction.UPGRADE: Command.UPGRADE, Direction.DOWNGRADE: Command.DOWNGRADE}


class Mode(StrEnum):
    """How a run reaches the databases: ``online`` writes; ``dry-run`` connects read-only and
    renders the SQL; ``sql`` renders guarded scripts without connecting."""

    ONLINE = "online"
    DRY_RUN = "dry-run"
    SQL = "sql"


class StepAction(StrEnum):
    """What a planned step does on one database."""

    APPLY = "apply"
    SKIP = "skip"  # upgrade of a revision none of whose tables is routed there: recorded only
    REVERT = "revert"


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
    action: StepAction
    tables: tuple[str, ...]
    adopted: tuple[str, ...] = ()


def planned_step(rev: RevisionInfo, routed: Sequence[str], direction: Direction) -> PlannedStep:
    """The step ``rev`` is on a database hosting ``routed`` tables (see
    :meth:`RevisionInfo.applies_to`)."""
    if direction is Direction.DOWNGRADE:
        action = StepAction.REVERT
    else:
        action = StepAction.APPLY if rev.applies_to(routed) else StepAction.SKIP
    return PlannedStep(rev.revision, rev.message, action, rev.tables_on(routed))


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
    held: Held | None = None  # another runner holds the database's upgrade lock: skipped


#: What planning one database gave: its plan, or why it cannot be planned.
PlanOutcome = DatabasePlan | OauthmigError


@dataclass(frozen=True, slots=True)
class DatabaseRun:
    """The outcome on one database; ``error`` is why it failed (its message is one line)."""

    database: str
    plan: DatabasePlan
    done: tuple[PlannedStep, ...]
    reached: str | None
    attempts: int
    seconds: float
    error: OauthmigError | None = None
    sql: str | None = None
    held: Held | None = None  # skipped: another runner holds the database's upgrade lock


@dataclass(frozen=True, slots=True)
class RunResult:
    """The outcome of upgrade/downgrade over every selected database."""

    direction: Direction
    mode: Mode
    runs: tuple[DatabaseRun, ...]

    @property
    def failed(self) -> tuple[DatabaseRun, ...]:
        """Runs that ended in an error."""
        return tuple(r for r in self.runs if r.error is not None)

    @property
    def held(self) -> tuple[DatabaseRun, ...]:
        """Databases skipped because another runner held their upgrade lock."""
        return tuple(r for r in self.runs if r.held is not None)


def check_databases(
    settings: Settings,
    names: Sequence[str] | None,
    revisions: Sequence[RevisionInfo],
    command: Command | None = None,
) -> None:
    """Run :func:`~oauthmig.preflight.check_state` on each database (all selected when
    ``names`` is ``None``); raise the first error. Also refuses two configured names that reach
    the same database. With ``command``, also the role's privileges for it (PostgreSQL).
    """
    chosen = list(settings.database_names() if names is None else names)
    check_distinct(settings, chosen)
    for name in chosen:
        db = settings.databases[name]
        with map_db_errors(db), open_database(settings, db) as conn:
            check_state(conn, settings, db, revisions, command)


def refuse_downgrade_during_backfill(
    conn: Connection, settings: Settings, database: str, revisions: Sequence[RevisionInfo]
) -> None:
    """Downgrade guard: refuse to revert a revision whose columns a running backfill fills.

    On PostgreSQL the guard also takes those jobs' run locks on the downgrade's connection
    (its session connection; released when it closes), so no backfill can start on them
    during the downgrade.
    """
    for rev in revisions:
        for job in JOBS.values():
            if job.logical_table not in settings.tables_on(database):
                continue
            if not any(c.table == job.logical_table and c.name in job.columns for c in rev.columns):
                continue
            lock = RunLock(f"backfill {job.name}", database)
            if conn.dialect.name == "postgresql":
                busy = not lock.try_acquire(conn)
            else:
                busy = lock.alive(conn)
            if busy:
                raise LockBusyError(
                    f"database {database!r}: cannot downgrade revision {rev.revision} while "
                    f"backfill {job.name} is running on its columns; wait for it to finish or "
                    "stop it (Ctrl-C saves its state), then rerun the downgrade"
                )


def gate_for(
    conn: Connection,
    settings: Settings,
    db: str,
    rev: RevisionInfo,
    *,
    exact: bool = False,
    revisions: Sequence[RevisionInfo] | None = None,
) -> Waiting | None:
    """The unfinished backfill ``rev`` waits for on database ``db``, if any.

    Reads the job rows and index ranges above their cursors, never the whole table
    (:mod:`oauthmig.rollout.remaining`); ``exact`` counts every pending row instead.
    ``revisions``: the invocation's catalogue (read when not given).
    """
    if not rev.requires_backfills or not rev.applies_to(settings.tables_on(db)):
        return None
    unfinished: list[tuple[str, int | None]] = []
    estimate = False
    for job in rev.requires_backfills:
        spec = JOBS.get(job)
        if spec is None:
            raise RevisionFailedError(f"revision {rev.revision}: unknown backfill job {job!r}")
        left = remaining(conn, settings, db, spec, exact=exact, gate=True, revisions=revisions)
        if left.pending:
            unfinished.append((job, left.rows))
            estimate = estimate or left.estimate
    if not unfinished:
        return None
    (first, rows), *others = unfinished
    return Waiting(rev.revision, first, rows, tuple(others), estimate)


def _gate_error(db: DatabaseConfig, waiting: Waiting) -> GateError:
    needs = " and ".join(f"backfill {job!r} to finish" for job, _rows in waiting.jobs)
    return GateError(
        f"database {db.name!r}: revision {waiting.revision} requires {needs} "
        f"({waiting.describe()}); run `{waiting.backfill_command(db.name)}` first"
    )


def _plan(
    conn: Connection,
    settings: Settings,
    db: DatabaseConfig,
    revisions: Sequence[RevisionInfo],
    target: str | None,
    direction: Direction,
    explicit_target: bool,
) -> tuple[DatabasePlan, list[RevisionInfo]]:
    """The plan on one database and the revisions it runs, checked as the run will check it
    (routed tables, applied and adoptable columns, gates): raises what the run would fail on."""
    current = read_current(conn, db.name, revisions)
    cur_i, tgt_i = revision_position(current, revisions), revision_position(target, revisions)
    routed = settings.tables_on(db.name)
    chosen: list[RevisionInfo] = []
    waiting: Waiting | None = None
    up = direction is Direction.UPGRADE
    if tgt_i > cur_i and not up:
        # Each database has its own version: the target is judged against this one's. (An
        # upgrade --to below a database's revision stays a no-op: that database is past it.)
        raise UsageError(
            f"database {db.name!r} is at {current or 'base'}, below --to {target or 'base'}: "
            f"downgrade only goes down; use `oauthmig upgrade --to {target or 'base'}`, or "
            f"leave {db.name!r} out with -d"
        )
    if up:
        for rev in revisions[cur_i:tgt_i]:
            waiting = gate_for(conn, settings, db.name, rev, revisions=revisions)
            if waiting is not None:
                if explicit_target:
                    raise _gate_error(db, waiting)
                break
            chosen.append(rev)
    else:
        chosen = list(reversed(revisions[tgt_i:cur_i]))
    reach = (
        (chosen[-1].revision if direction is Direction.UPGRADE else chosen[-1].down_revision)
        if chosen
        else current
    )
    steps = tuple(planned_step(rev, routed, direction) for rev in chosen)
    plan = DatabasePlan(db.name, conn.dialect.name, db.display_url, current, reach, steps, waiting)
    preflight(conn, settings, db, revisions, current, chosen if up else [], [] if up else chosen)
    return plan, chosen


def _confirm_plan(
    conn: Connection,
    req: RunRequest,
    db: DatabaseConfig,
    revisions: Sequence[RevisionInfo],
    target: str | None,
) -> tuple[DatabasePlan, list[RevisionInfo]]:
    """Under the run's lock: the plan of the plan pass, re-checked where it can have changed.

    Another run may have moved the version table since (then the database is planned again),
    and rows that need a backfill may have appeared since a gate was passed (every gated step
    is checked again). Columns and tables are not looked at again: only DDL changes them.
    """
    planned = req.plan
    if planned is None or read_current(conn, db.name, revisions) != planned.current:
        return _plan(conn, req.settings, db, revisions, target, req.direction, req.explicit_target)
    by_id = {r.revision: r for r in revisions}
    chosen = [by_id[s.revision] for s in planned.steps]
    if req.direction is Direction.DOWNGRADE:
        return planned, chosen
    for i, rev in enumerate(chosen):
        waiting = gate_for(conn, req.settings, db.name, rev, revisions=revisions)
        if waiting is None:
            continue
        if req.explicit_target:
            raise _gate_error(db, waiting)
        reach = chosen[i - 1].revision if i else planned.current
        return replace(planned, target=reach, steps=planned.steps[:i], waiting=waiting), chosen[:i]
    for rev in chosen:
        refuse_unverified(conn, req.settings, db, rev)
    return planned, chosen


def refuse_unverified(
    conn: Connection, settings: Settings, db: DatabaseConfig, rev: RevisionInfo
) -> None:
    """Before a revision that needs the backfills (finalize): a verify pass must agree that
    every row has its values (:mod:`oauthmig.rollout.verify`), or the run is refused."""
    if not rev.requires_backfills or not rev.applies_to(settings.tables_on(db.name)):
        return
    result = verify_connection(conn, settings, db.name)
    if not result.passed:
        raise GateError(
            f"{result.problem()}; revision {rev.revision} needs a passing verify: run "
            f"`oauthmig backfill -d {db.name}` (or fix those rows), then `oauthmig verify -d "
            f"{db.name}`; nothing was changed"
        )


# --------------------------------------------------------------------------- running


def _alembic_config(
    script: ScriptDirectory,
    target: RevisionTarget,
    conn: Connection | None,
    buffer: io.StringIO | None = None,
) -> Config:
    cfg = Config(output_buffer=buffer) if buffer is not None else Config()
    cfg.set_main_option("script_location", script.dir)
    cfg.attributes[TARGET_KEY] = target
    if conn is not None:
        cfg.attributes[CONNECTION_KEY] = conn
    return cfg


def _alembic(
    script: ScriptDirectory,
    cfg: Config,
    direction: Direction,
    destination: str,
    *,
    sql: bool = False,
    starting: str | None = None,
) -> None:
    """``alembic upgrade``/``downgrade`` to ``destination`` through the catalogue's script
    directory (Alembic's commands would read ``revisions/`` again for every call)."""

    def steps(rev: Any, _context: Any) -> Any:
        if direction is Direction.UPGRADE:
            return script._upgrade_revs(destination, rev)
        return script._downgrade_revs(destination, rev)

    with EnvironmentContext(
        cfg,
        script,
        fn=steps,
        as_sql=sql,
        starting_rev=starting,
        destination_rev=destination,
    ):
        script.run_env()


def _is_lock_timeout(exc: BaseException) -> bool:
    return classify(exc) is FailureKind.LOCK_TIMEOUT


def is_connection_lost(exc: BaseException) -> bool:
    """Whether ``exc`` means the session is gone (killed backend, server restart, network)."""
    return classify(exc) is FailureKind.CONNECTION_LOST


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
    if req.direction is Direction.DOWNGRADE:
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
    direction: Direction,
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
        # Every revision transaction begins with SET LOCAL: nothing outlives it. (Finalize's
        # statements outside a transaction set and reset their own: see rollout.finalize.)
        set_timeouts(conn, migrate.lock_timeout_ms, migrate.statement_timeout_ms)
        if conn.in_transaction():
            conn.commit()


@dataclass(frozen=True, slots=True)
class RunRequest:
    """Picklable description of one database's run (so ``--jobs`` can use processes);
    ``plan`` is what the plan pass found (online runs), confirmed under the run's lock."""

    settings: Settings
    database: str
    direction: Direction
    target: str
    mode: Mode
    explicit_target: bool
    from_revision: str | None = None
    plan: DatabasePlan | None = None


def _as_error(exc: SQLAlchemyError, db: DatabaseConfig) -> DatabaseError:
    return DatabaseError(db_error_message(exc, db))


def run_database(
    req: RunRequest,
    sleep: Callable[[float], None] = time.sleep,
    catalogue: Catalogue | None = None,
) -> DatabaseRun:
    """Upgrade or downgrade one database; errors are captured into the result, never raised.

    ``catalogue`` is the invocation's (a worker process of ``--jobs`` reads its own).
    """
    settings, db = req.settings, req.settings.databases[req.database]
    started = time.monotonic()
    empty_plan = DatabasePlan(db.name, db.dialect, db.display_url, None, None, ())
    error: OauthmigError
    try:
        cat = catalogue or Catalogue.load()
        target = cat.resolve(req.target)
        if req.mode is Mode.SQL:
            return _run_offline(req, db, cat, target, started)
        if req.mode is Mode.ONLINE:
            require_session(settings, db, str(req.direction))
        with open_database(settings, db, direct=req.mode is Mode.ONLINE) as conn:
            if req.mode is Mode.DRY_RUN:
                return _run_dry(req, conn, db, cat, target, started)
            lock = RunLock("upgrade", db.name)
            if not lock.try_acquire(conn):
                if req.direction is Direction.DOWNGRADE:
                    raise LockBusyError(lock.busy_message(conn))
                # Another runner upgrades this database (overlapping CI jobs or pods): skip it.
                held = lock.held_elsewhere(conn) or Held(db.name, "upgrade", None)
                return _held_run(db, held, time.monotonic() - started)
            try:
                return _run_online(req, conn, db, cat, target, started, sleep)
            finally:
                lock.release()
    except OauthmigError as exc:
        error = exc
    except SQLAlchemyError as exc:
        if is_connection_lost(exc):
            error = ConnectionLostError(connection_lost_message(req, db, req.direction, exc))
        else:
            error = _as_error(exc, db)
    # Kept in a result: without the traceback, which holds the run's frames (and connections).
    error = error.with_traceback(None)
    return DatabaseRun(db.name, empty_plan, (), None, 0, time.monotonic() - started, error)


def _held_run(db: DatabaseConfig, held: Held, seconds: float) -> DatabaseRun:
    plan = DatabasePlan(db.name, db.dialect, db.display_url, None, None, (), held=held)
    return DatabaseRun(db.name, plan, (), None, 0, seconds, held=held)


def held_upgrade(conn: Connection, database: str) -> Held | None:
    """Another runner holds ``database``'s upgrade lock (read on any connection)."""
    return RunLock("upgrade", database).held_elsewhere(conn)


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
        client_metadata=settings.backfill.client_metadata,
    )


def _run_online(
    req: RunRequest,
    conn: Connection,
    db: DatabaseConfig,
    cat: Catalogue,
    target: str | None,
    started: float,
    sleep: Callable[[float], None],
) -> DatabaseRun:
    settings, revisions = req.settings, cat.revisions
    plan, chosen = _confirm_plan(conn, req, db, revisions, target)
    if not chosen:
        return DatabaseRun(db.name, plan, (), plan.current, 0, time.monotonic() - started)
    if req.direction is Direction.DOWNGRADE:
        refuse_downgrade_during_backfill(conn, settings, db.name, chosen)
    _apply_session_timeouts(conn, settings.migrate)
    for_writing(conn)
    stop = plan.target if plan.target is not None else "base"
    attempts = 0
    while True:
        attempts += 1
        try:
            with conn.begin():
                ensure_log_table(conn)
            rt = _target_for(db, settings, conn, read_log(conn))
            _alembic(cat.script, _alembic_config(cat.script, rt, conn), req.direction, stop)
            break
        except (DBAPIError, PendingRollbackError) as exc:
            with contextlib.suppress(SQLAlchemyError):
                conn.rollback()
            _give_up_unless_lock_wait(req, conn, db, cat, plan, exc, attempts)
            # Nothing is held while we wait: the failed revision's transaction is rolled back.
            sleep(backoff_delay(attempts - 1, base=0.2, cap=30.0))
        except DatabaseError as exc:
            # Raised by revision code with its own message (e.g. an index build that outlasted
            # index_timeout): not retried, since waiting longer was the whole budget.
            with contextlib.suppress(SQLAlchemyError):
                conn.rollback()
            failing = _next_step(revisions, read_current(conn, db.name, revisions), req.direction)
            if failing:
                _record_failure(conn, failing.revision, exc.message)
            raise
    return _ran(conn, settings, db, cat, plan, attempts, started)


def _give_up_unless_lock_wait(
    req: RunRequest,
    conn: Connection,
    db: DatabaseConfig,
    cat: Catalogue,
    plan: DatabasePlan,
    exc: DBAPIError | PendingRollbackError,
    attempts: int,
) -> None:
    """A revision failed on the driver: return when it waited for a lock and may be tried
    again (``lock_retries``); else record the failure in the revision log and raise."""
    settings, revisions = req.settings, cat.revisions
    if is_connection_lost(exc):
        step = _step_after_loss(conn, db, revisions, plan, req.direction)
        raise ConnectionLostError(connection_lost_message(req, db, step, exc)) from None
    assert isinstance(exc, DBAPIError)
    reached_now = read_current(conn, db.name, revisions)
    failing = _next_step(revisions, reached_now, req.direction)
    routed = settings.tables_on(db.name)
    here = failing.tables_on(routed) if failing else ()
    physical = [settings.tables.physical(t) for t in here]
    if _is_lock_timeout(exc) and attempts <= settings.migrate.lock_retries:
        return
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
    message = db_error_message(exc, db, f"revision {failing.revision if failing else '?'} failed")
    if failing:
        _record_failure(conn, failing.revision, message)
    raise RevisionFailedError(message) from None


def _ran(
    conn: Connection,
    settings: Settings,
    db: DatabaseConfig,
    cat: Catalogue,
    plan: DatabasePlan,
    attempts: int,
    started: float,
) -> DatabaseRun:
    """What a run that went through reached: the revision now recorded, the steps with the
    columns they adopted, and the gate counted again if it was planned before its columns."""
    revisions = cat.revisions
    reached = read_current(conn, db.name, revisions)
    log = read_log(conn)
    done = tuple(
        replace(
            s,
            adopted=tuple(filter(None, (log.get(s.revision, {}).get("adopted") or "").split(","))),
        )
        for s in plan.steps
    )
    if plan.waiting is not None and any(rows is None for _job, rows in plan.waiting.jobs):
        # Planned before the expand revisions ran: now the backfills' rows can be counted.
        gated = cat.get(plan.waiting.revision)
        again = gate_for(conn, settings, db.name, gated, revisions=cat.revisions)
        plan = replace(plan, waiting=again or plan.waiting)
    return DatabaseRun(db.name, plan, done, reached, attempts, time.monotonic() - started)


def _next_step(
    revisions: Sequence[RevisionInfo], current: str | None, direction: Direction
) -> RevisionInfo | None:
    i = revision_position(current, revisions)
    if direction is Direction.UPGRADE:
        return revisions[i] if i < len(revisions) else None
    return revisions[i - 1] if i > 0 else None


def _offline_sql(
    script: ScriptDirectory,
    rt: RevisionTarget,
    direction: Direction,
    start: str | None,
    stop: str | None,
) -> str:
    buffer = io.StringIO()
    cfg = _alembic_config(script, rt, None, buffer)
    if start == stop or (direction is Direction.UPGRADE and stop is None):
        return ""
    if direction is Direction.DOWNGRADE and start is None:
        return ""
    _alembic(script, cfg, direction, stop or "base", sql=True, starting=start)
    return buffer.getvalue()


def _guarded_sql(
    settings: Settings,
    db: DatabaseConfig,
    script: ScriptDirectory,
    rt: RevisionTarget,
    direction: Direction,
    selected: Sequence[RevisionInfo],
) -> str:
    """``--sql``: one transaction per revision, each opened by its run-time guards."""
    rt.guarded = True
    parts: list[str] = []
    for i, rev in enumerate(selected):
        rt.header = i == 0
        rt.header_guards = database_guard(db, rt.sqlite_guards) if i == 0 else []
        up = direction is Direction.UPGRADE
        begins = rev.down_revision if up else rev.revision
        guards = database_guard(db, rt.sqlite_guards)
        guards += version_guard(db, VERSION_TABLE, begins, rt.sqlite_guards)
        if up and rev.requires_backfills:
            guards += gate_guards(
                settings, db, rev.revision, rev.requires_backfills, rt.sqlite_guards, begins
            )
        rt.step_guards = guards
        ends = rev.revision if up else rev.down_revision
        parts.append(_offline_sql(script, rt, direction, begins, ends))
    return "".join(parts)


def _script_header(
    db: DatabaseConfig, direction: Direction, start: str | None, stop: str | None
) -> str:
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
    cat: Catalogue,
    target: str | None,
    started: float,
) -> DatabaseRun:
    if db.dialect not in ("postgresql", "sqlite"):
        raise DatabaseError(db.url_error or f"database {db.name!r}: unknown dialect")
    revisions = cat.revisions
    start = cat.resolve(req.from_revision, "--from") if req.from_revision else None
    if req.direction is Direction.DOWNGRADE and req.from_revision is None:
        start = revisions[-1].revision if revisions else None
    rt = RevisionTarget(
        db.name,
        db.dialect,
        req.settings.tables_on(db.name),
        req.settings.tables,
        req.settings.migrate,
        None,
        client_metadata=req.settings.backfill.client_metadata,
    )
    s_i, t_i = revision_position(start, revisions), revision_position(target, revisions)
    if req.direction is Direction.UPGRADE:
        sel = list(revisions[s_i:t_i])
    else:
        sel = list(reversed(revisions[t_i:s_i]))
        if db.dialect == "sqlite":
            _refuse_sqlite_offline_drops(db, sel, rt.routed)
    steps = tuple(planned_step(r, rt.routed, req.direction) for r in sel)
    plan = DatabasePlan(db.name, db.dialect, db.display_url, start, target, steps)
    sql = _guarded_sql(req.settings, db, cat.script, rt, req.direction, sel)
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
    if any(rev.tables_on(routed) for rev in reverting):
        raise UsageError(
            f"database {db.name!r}: offline downgrades of SQLite databases are not supported "
            "(reverting rebuilds tables from a schema the script cannot read); run `oauthmig "
            f"downgrade` online, or leave {db.name!r} out with -d"
        )


def _run_dry(
    req: RunRequest,
    conn: Connection,
    db: DatabaseConfig,
    cat: Catalogue,
    target: str | None,
    started: float,
) -> DatabaseRun:
    settings = req.settings
    check_privileges(conn, settings, db, Command.DRY_RUN)
    plan, chosen = _plan(
        conn, settings, db, cat.revisions, target, req.direction, req.explicit_target
    )
    rt = _target_for(db, settings, conn, read_log(conn))
    sql = _offline_sql(cat.script, rt, req.direction, plan.current, plan.target) if chosen else ""
    if conn.in_transaction():
        conn.rollback()
    return DatabaseRun(db.name, plan, (), plan.current, 0, time.monotonic() - started, sql=sql)


def _execute(
    reqs: list[RunRequest],
    jobs: int,
    on_done: Callable[[DatabaseRun], None] | None,
    cat: Catalogue,
) -> list[DatabaseRun]:
    runs: list[DatabaseRun] = []
    if jobs > 1 and len(reqs) > 1:
        # Alembic's ``op``/``context`` proxies are module globals: parallel databases need
        # processes, not threads (each reads the catalogue itself: it does not pickle).
        with ProcessPoolExecutor(max_workers=min(jobs, len(reqs))) as pool:
            for run in pool.map(run_database, reqs):
                runs.append(run)
                if on_done:
                    on_done(run)
        return runs
    for req in reqs:
        run = run_database(req, catalogue=cat)
        runs.append(run)
        if on_done:
            on_done(run)
    return runs


def _retry_held(
    reqs: list[RunRequest], runs: list[DatabaseRun], cat: Catalogue
) -> list[DatabaseRun]:
    """Once more, at the end, for the databases another runner held: a holder that only
    found a gate still closed may have let go just after its backfill finished elsewhere.
    Planned again under the lock; still held: skipped."""
    by_name = {r.database: r for r in reqs}
    out: list[DatabaseRun] = []
    for run in runs:
        if run.held is not None and run.database in by_name:
            again = run_database(replace(by_name[run.database], plan=None), catalogue=cat)
            out.append(again)
        else:
            out.append(run)
    return out


def plan(
    settings: Settings,
    direction: Direction,
    target: str,
    *,
    catalogue: Catalogue | None = None,
    session: bool = False,
) -> list[PlanOutcome]:
    """Read-only plan per selected database, checked as the run will check it (tables,
    columns, gates); a database that cannot be planned yields the error instead. With
    ``session`` (the plan of an online run) a database whose session connection goes through a
    transaction pooler cannot be planned either (:func:`~oauthmig.pooler.require_session`).

    Refuses two configured names that reach one database (raises).
    """
    cat = catalogue or Catalogue.load()
    resolved = cat.resolve(target)
    explicit = target not in ("head", "heads") or direction is Direction.DOWNGRADE
    up = direction is Direction.UPGRADE
    check_distinct(settings)
    out: list[PlanOutcome] = []
    for name in settings.database_names():
        db = settings.databases[name]
        try:
            if session:
                require_session(settings, db, str(direction))
            with map_db_errors(db), open_database(settings, db, direct=session) as conn:
                held = held_upgrade(conn, name) if session and up else None
                if held is not None:
                    out.append(
                        DatabasePlan(
                            name, conn.dialect.name, db.display_url, None, None, (), held=held
                        )
                    )
                    continue
                if session:
                    check_privileges(conn, settings, db, _COMMANDS[direction])
                try:
                    out.append(
                        _plan(conn, settings, db, cat.revisions, resolved, direction, explicit)[0]
                    )
                except OauthmigError:
                    # Read while another runner was changing it: that runner owns it now.
                    if conn.in_transaction():
                        conn.rollback()
                    held = held_upgrade(conn, name) if session and up else None
                    if held is None:
                        raise
                    out.append(
                        DatabasePlan(
                            name, conn.dialect.name, db.display_url, None, None, (), held=held
                        )
                    )
        except OauthmigError as exc:
            out.append(exc.with_traceback(None))
    return out


def _run(
    settings: Settings,
    direction: Direction,
    target: str,
    mode: Mode,
    jobs: int,
    from_revision: str | None,
    catalogue: Catalogue | None,
    on_plan: Callable[[Sequence[PlanOutcome]], None] | None,
    on_done: Callable[[DatabaseRun], None] | None,
) -> RunResult:
    cat = catalogue or Catalogue.load()
    cat.resolve(target)
    if from_revision is not None:
        cat.resolve(from_revision, "--from")
    explicit = target not in ("head", "heads") or direction is Direction.DOWNGRADE
    plans: dict[str, DatabasePlan] = {}
    if mode is Mode.ONLINE:
        # All or nothing: every database is planned before any is written to.
        planned = plan(settings, direction, target, catalogue=cat, session=True)
        if on_plan is not None:
            on_plan(planned)
        errors = [p for p in planned if isinstance(p, OauthmigError)]
        if errors:
            raise PlanRefusedError(errors)
        # A database another runner held when planned is planned again under its lock.
        plans = {p.database: p for p in planned if isinstance(p, DatabasePlan) and not p.held}
    elif mode is Mode.DRY_RUN:
        check_distinct(settings)  # offline (--sql) needs no connection, and cannot tell
    reqs = [
        RunRequest(
            settings, name, direction, target, mode, explicit, from_revision, plans.get(name)
        )
        for name in settings.database_names()
    ]
    runs = _execute(reqs, jobs, on_done, cat)
    if mode is Mode.ONLINE and direction is Direction.UPGRADE:
        runs = _retry_held(reqs, runs, cat)
    return RunResult(direction, mode, tuple(runs))


def upgrade(
    settings: Settings,
    target: str = "head",
    *,
    mode: Mode = Mode.ONLINE,
    jobs: int = 1,
    from_revision: str | None = None,
    catalogue: Catalogue | None = None,
    on_plan: Callable[[Sequence[PlanOutcome]], None] | None = None,
    on_done: Callable[[DatabaseRun], None] | None = None,
) -> RunResult:
    """Upgrade every selected database to ``target``.

    Online, every database is planned and checked first (:func:`plan`, shown to ``on_plan``);
    if any cannot be, :class:`PlanRefusedError` is raised before anything is written anywhere.
    Otherwise each database runs its plan (confirmed under its run lock) and its outcome,
    failure included, is in the result. ``catalogue``: the invocation's, if it has one.
    """
    return _run(
        settings,
        Direction.UPGRADE,
        target,
        mode,
        jobs,
        from_revision,
        catalogue,
        on_plan,
        on_done,
    )


def downgrade(
    settings: Settings,
    target: str,
    *,
    mode: Mode = Mode.ONLINE,
    jobs: int = 1,
    from_revision: str | None = None,
    catalogue: Catalogue | None = None,
    on_plan: Callable[[Sequence[PlanOutcome]], None] | None = None,
    on_done: Callable[[DatabaseRun], None] | None = None,
) -> RunResult:
    """Downgrade every selected database to ``target`` (a revision or ``base``); all or
    nothing online, as :func:`upgrade`."""
    return _run(
        settings,
        Direction.DOWNGRADE,
        target,
        mode,
        jobs,
        from_revision,
        catalogue,
        on_plan,
        on_done,
    )


def migrate(
    settings: Settings,
    direction: Direction,
    target: str,
    *,
    mode: Mode = Mode.ONLINE,
    jobs: int = 1,
    from_revision: str | None = None,
    catalogue: Catalogue | None = None,
    on_plan: Callable[[Sequence[PlanOutcome]], None] | None = None,
    on_done: Callable[[DatabaseRun], None] | None = None,
) -> RunResult:
    """:func:`upgrade` or :func:`downgrade`, as ``direction`` says."""
    return _run(settings, direction, target, mode, jobs, from_revision, catalogue, on_plan, on_done)
