"""Batched, resumable, adaptive backfills (modelled on GitLab's batched background migrations).

Mechanics, per job and database:

* keyset batches over the primary key: ``id > lo AND id <= hi`` where ``hi`` is the largest of
  the next ``batch_size`` ids (an index range read, never OFFSET); each batch is one short
  transaction whose UPDATE is guarded by ``... IS NULL``, so a repeated batch is harmless;
* the upper bound is fixed when the job starts; a final catch-up pass then covers rows
  inserted meanwhile, so the job terminates under concurrent inserts;
* the batch size adapts toward ``target_batch_seconds`` (grows by at most 25 % per batch,
  shrinks at once in proportion to a slow batch, halves on a statement timeout);
* state (cursor, bounds, phase, rows done, attempts, last error) lives in
  ``oauthmig_backfill_job`` **in the target database** and is updated in the same transaction
  as each batch, so Ctrl-C, a crash or ``kill -9`` resumes exactly where it stopped;
* pacing: after each batch the runner sleeps at least ``sleep_seconds`` and at least as long
  as keeps the share of time spent in batches at or under ``max_duty`` (0.5: sleep as long as
  the last batch took), so live traffic gets the server half the time;
* one run per job and database (:class:`~oauthmig.runlock.RunLock`). PostgreSQL: a session
  advisory lock, held by the connection that runs the batches, or with a ``direct_url`` by a
  connection of its own on it while the batches go through ``url`` (which may be a transaction
  pooler); re-verified inside every batch's transaction (:meth:`RunLock.verify`) together with
  the run's owner token in the job row; a run whose lock or job row was taken over by another
  run stops at once. SQLite: ``flock``;
* a lost connection (server restart, failover, terminated session, client deadline passed)
  is reconnected with backoff for ``outage_window``; the lock is taken again and the owner
  token checked before the next batch; past the window the job is marked ``failed``;
* on a lock timeout the batch is halved down to one row; a row that stays locked fails the
  job with the blocking session's pid, state and transaction age (never its query text);
* deadlocks, serialization failures and statement timeouts are retried with jittered
  backoff (a statement timeout also halves the batch); other errors mark the job ``failed``;
* the saved progress is valid only for the generation of the job's columns it was made on
  (revision-log entry of the revisions adding them, plus the columns' ``attnum`` on
  PostgreSQL): after a downgrade and upgrade re-created them, the job starts over;
* health checks (``[backfill.health]``, :mod:`oauthmig.rollout.health`): between batches, at
  most every ``health_interval``; while one fails the run holds with no transaction open
  (only its session's run lock), records the reason in the job row (``held_reason``) and
  probes again every interval until healthy, a stop request or ``--max-runtime``.

The jobs themselves (what each fills, the job table, the family id formula) are in
:mod:`oauthmig.rollout.jobs`.
"""

from __future__ import annotations

import contextlib
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, NoReturn, Protocol

from sqlalchemy import (
    and_,
    column,
    func,
    select,
    table,
    text,
)
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import SQLAlchemyError

from oauthmig.config import BackfillSettings, DatabaseConfig, Settings
from oauthmig.db import (
    ClientDeadline,
    backoff_delay,
    connect,
    describe_error,
    for_writing,
    lock_blockers,
    make_engine,
    map_db_errors,
    open_database,
    open_engine,
    set_timeouts,
)
from oauthmig.errors import BackfillError, ConfigError, LockBusyError, OauthmigError, UsageError
from oauthmig.failures import FailureKind, classify
from oauthmig.pooler import require_session
from oauthmig.preflight import check_routed_tables
from oauthmig.privileges import Command
from oauthmig.revision_types import RevisionInfo
from oauthmig.rollout.batches import BatchLog, ensure_batch_table, error_class, reset_history
from oauthmig.rollout.control import (
    POLL_SECONDS,
    Request,
    cancelled_message,
    carried_request,
    paused_message,
    recorded_request,
    requested_stop,
)
from oauthmig.rollout.health import HealthMonitor, HealthReading
from oauthmig.rollout.health import validate as validate_health
from oauthmig.rollout.job_state import (
    JobPhase,
    JobProgress,
    RunEnd,
    StoredStatus,
    ensure_job_table,
    job_table,
    new_transaction,
    read_job,
    run_lock,
)
from oauthmig.rollout.jobs import (
    FAMILY_VERSION,
    JOBS,
    BatchContext,
    Job,
    register_sqlite_functions,
    remaining_rows,
)
from oauthmig.rollout.pacing import PACED_PREFIX, Pacer
from oauthmig.rollout.remaining import column_generation
from oauthmig.rollout.revisions import Catalogue
from oauthmig.rollout.runner import check_databases, held_upgrade
from oauthmig.runlock import Held, RunLock

MIN_BATCH, MAX_BATCH = 10, 200_000
MAX_TRANSIENT_RETRIES = 10
LOCKED_ROW_ATTEMPTS = 3  # lock timeouts on a one-row batch before the job fails
DEADLINE_GRACE_SECONDS = 5.0  # client deadline = statement_timeout + this


# --------------------------------------------------------------------------- jobs


# --------------------------------------------------------------------------- results


@dataclass(frozen=True, slots=True)
class JobRun:
    """The outcome of one job on one database."""

    job: str
    database: str
    status: RunEnd
    rows_changed: int
    rows_total: int
    batches: int
    seconds: float
    batch_seconds: tuple[float, ...] = ()
    estimated_seconds: float | None = None
    message: str | None = None
    held_seconds: float = 0.0  # time spent holding on failed health checks
    #: Paused because --max-runtime ran out (rows are left); a pause request is not this.
    out_of_time: bool = False
    held: Held | None = None  # skipped: another runner holds this job's (or the upgrade) lock


@dataclass(frozen=True, slots=True)
class JobSample:
    """What one job on one database looks like now: sent to ``observe`` after each batch,
    on every health check while held, and when the run ends (``--metrics-file``)."""

    job: str
    database: str
    #: running | held while the run goes on; how it ended: finished | up-to-date | paused
    #: (a pause request or --max-runtime) | interrupted (Ctrl-C, SIGTERM) | cancelled | failed
    state: str
    rows_done: int
    rows_left: int  # -1: unknown (the run failed before it could count)
    batches: int
    batch_seconds: float | None  # the last batch's duration, if any ran in this process
    held_probe: str = ""
    held_reason: str = ""
    held_seconds: float = 0.0  # how long the current hold has lasted
    pace: float | None = None  # latency pacing's current pace (1: full speed); None: off


@dataclass(frozen=True, slots=True)
class BackfillResult:
    """All job runs of one ``backfill`` invocation."""

    runs: tuple[JobRun, ...]
    dry_run: bool

    @property
    def failed(self) -> tuple[JobRun, ...]:
        """Runs that failed, or stopped because their job is cancelled (exit 2)."""
        return tuple(r for r in self.runs if r.status in (RunEnd.FAILED, RunEnd.CANCELLED))

    @property
    def out_of_time(self) -> tuple[JobRun, ...]:
        """Runs that ``--max-runtime`` stopped with rows left (exit 3: run again)."""
        return tuple(r for r in self.runs if r.out_of_time)


@dataclass(frozen=True, slots=True)
class BackfillOptions:
    """Options of one invocation (CLI flags over config)."""

    batch_size: int | None = None
    sleep_seconds: float | None = None
    max_runtime: float | None = None
    restart: bool = False
    dry_run: bool = False
    jobs: int = 1


class Progress(Protocol):
    """Progress callback: ``(label, rows done, rows total, note)``; ``note`` is None, or what
    the run waits for, such as ``held: replica lag 14.2s > 10s``."""

    def __call__(self, label: str, done: int, total: int, note: str | None, /) -> None: ...


Observer = Callable[[JobSample], None]


@dataclass
class _Stop:
    event: threading.Event = field(default_factory=threading.Event)
    deadline: float | None = None

    def should_stop(self) -> bool:
        return self.event.is_set() or self.out_of_time()

    def out_of_time(self) -> bool:
        """``--max-runtime`` is over."""
        return self.deadline is not None and time.monotonic() >= self.deadline


# --------------------------------------------------------------------------- helpers


def _max_id(conn: Connection, physical: str) -> int:
    t = table(physical, column("id"))
    value = conn.execute(select(func.max(t.c.id))).scalar()
    return int(value or 0)


def _next_hi(conn: Connection, physical: str, lo: int, bound: int, size: int) -> int | None:
    """The largest of the next ``size`` ids after ``lo`` (capped at ``bound``): a keyset read."""
    t = table(physical, column("id"))
    window = (
        select(t.c.id)
        .where(and_(t.c.id > lo, t.c.id <= bound))
        .order_by(t.c.id)
        .limit(size)
        .subquery()
    )
    value = conn.execute(select(func.max(window.c.id))).scalar()
    return None if value is None else int(value)


def _lost(exc: SQLAlchemyError, conn: Connection) -> bool:
    """True if the connection is gone (server restart, terminated session, network)."""
    if conn.invalidated or conn.closed or classify(exc) is FailureKind.CONNECTION_LOST:
        return True
    try:
        return bool(getattr(conn.connection.driver_connection, "closed", False))
    except SQLAlchemyError:
        return True


class _StillHeld(Exception):
    """Reconnected, but this run's previous session still holds the run lock."""


class _TakenOver(BackfillError):
    """Another run holds the lock or owns the job row: this run must stop at once."""


def adapt_batch_size(size: int, seconds: float, target: float) -> int:
    """Next batch size: grow gently (≤ +25 %), shrink at once in proportion to a slow batch."""
    ratio = target / max(seconds, 1e-4)
    factor = min(ratio, 1.25) if ratio >= 1 else max(ratio, 0.1)
    return max(MIN_BATCH, min(MAX_BATCH, int(size * factor) or MIN_BATCH))


# --------------------------------------------------------------------------- runner


@dataclass(slots=True)
class _Pace:
    """How one run sizes and retries its batches (changes batch by batch)."""

    size: int
    version: int  # the job version: which family id formula the batches write
    sleep_seconds: float
    failures: int = 0  # transient failures in a row
    locked_attempts: int = 0  # lock timeouts in a row on a one-row batch
    narrowed: tuple[int, int] | None = None  # (size before narrowing, id to get past)


@dataclass(slots=True)
class _Attempt:
    """One turn of the loop: the range it tried and when (for a failure's record)."""

    lo: int  # the cursor and bound the job row held when the turn began
    bound: int
    began: datetime
    deadline: ClientDeadline
    hi: int | None = None


_PROGRESS_COLUMNS = (
    "status",
    "phase",
    "cursor",
    "upper_bound",
    "rows_done",
    "rows_total",
    "batches",
    "batch_size",
    "attempts",
    "last_error",
    "finished_at",
    "updated_at",
    "held_reason",
)


@dataclass
class _Runner:
    settings: Settings
    db: DatabaseConfig
    job: Job
    options: BackfillOptions
    progress: Progress | None
    stop: _Stop
    revisions: Sequence[RevisionInfo]  # the catalogue: a job's progress is tied to them
    sleep: Callable[[float], None] = time.sleep
    batch_times: list[float] = field(default_factory=list)
    changed: int = 0
    owner: str = field(default_factory=lambda: uuid.uuid4().hex)
    lock: RunLock = field(init=False)
    lock_engine: Engine | None = None  # direct_url: the run lock's own session, not the batches'
    lock_conn: Connection | None = None
    reconnects: int = 0
    note: str | None = None
    by_request: bool = False  # stopped by `oauthmig backfill pause|cancel`
    work: Connection | None = None  # the current work connection (replaced on reconnect)
    state: JobProgress | None = None  # what the job row holds (or will, once committed)
    observe: Observer | None = None
    health: HealthMonitor | None = None
    pacer: Pacer | None = None
    log: BatchLog = field(init=False)  # the batch history this run writes

    def __post_init__(self) -> None:
        self.log = BatchLog(self.job.name, self.owner, self.settings.backfill.keep_batches)
        self.lock = run_lock(self.job.name, self.db.name)

    def run(self) -> JobRun:
        """Run the job on its database (holding the run lock) and return the outcome."""
        started = time.monotonic()
        physical = self.settings.tables.physical(self.job.logical_table)
        self.health = HealthMonitor(self.settings.backfill.health, self.db, physical)
        self.pacer = Pacer.for_database(self.settings.backfill, self.db, physical)
        try:
            with open_engine(self.settings, self.db) as engine:
                if engine.dialect.name == "postgresql":
                    if self.db.has_direct:
                        self.lock_engine = make_engine(self.db, self.settings, direct=True)
                    try:
                        return self._run(engine, started)
                    finally:
                        self._drop_lock_conn()
                        if self.lock_engine is not None:
                            self.lock_engine.dispose()
                with connect(engine, self.db) as lock_conn, self.lock.hold(lock_conn):
                    return self._run(engine, started)
        except KeyboardInterrupt:
            self._report_end("interrupted")
            raise
        except LockBusyError:
            raise  # another runner holds the job: its own samples describe it
        except BaseException:
            self._report_end("failed")
            raise
        finally:
            self.health.close()
            self.pacer.close()

    def _drop_lock_conn(self) -> None:
        conn, self.lock_conn = self.lock_conn, None
        if conn is not None:
            self.lock.release()
            with contextlib.suppress(SQLAlchemyError):
                conn.close()

    def _take_lock(self, conn: Connection) -> bool:
        """Take the run lock: on the work connection ``conn``, or with a ``direct_url`` on a
        session of its own there (kept when it still holds the lock: a reconnect after the
        batch connection alone was lost)."""
        if self.lock_engine is None:
            return self.lock.try_acquire(conn)
        if self.lock_conn is not None:
            held = self.lock.verify(conn)
            conn.rollback()
            if held:
                return True
            self._drop_lock_conn()
        lock_conn = self.lock_engine.connect()
        try:
            with self._deadline(lock_conn):
                got = self.lock.try_acquire(lock_conn)
        except BaseException:
            with contextlib.suppress(SQLAlchemyError):
                lock_conn.close()
            raise
        if got:
            self.lock_conn = lock_conn
        else:
            lock_conn.close()
        return got

    def _report_end(self, status: str) -> None:
        """Tell the observer how a run that raised ended (every other end is reported where
        it happens), so that ``--metrics-file`` never keeps saying ``running``."""
        if self.observe is None:
            return
        if self.state is not None:
            self._report(self.state, status, bar=False)
            return
        self.observe(JobSample(self.job.name, self.db.name, status, 0, -1, 0, None))

    def _connect(self, engine: Engine, *, reconnect: bool = False) -> Connection:
        """A work connection; on PostgreSQL it also takes (or takes again) the run lock."""
        conn = for_writing(engine.connect())
        try:
            register_sqlite_functions(conn)
            if conn.dialect.name != "postgresql":
                return conn
            m = self.settings.migrate
            previous = self.lock.holder_pid
            with self._deadline(conn):
                set_timeouts(conn, m.lock_timeout_ms, m.statement_timeout_ms)
                got = self._take_lock(conn)
            if not got:
                holder = self.lock.holder(conn)
                if reconnect and holder is not None and holder == previous:
                    # Our own abandoned session (hung, or still being torn down): ask it to
                    # go, and try again while the outage window lasts.
                    with contextlib.suppress(SQLAlchemyError):
                        conn.execute(text("SELECT pg_terminate_backend(:p)"), {"p": holder})
                        conn.commit()
                    raise _StillHeld(
                        f"the previous session (pid {holder}) still holds the run lock"
                    )
                if reconnect:
                    raise BackfillError(
                        f"database {self.db.name!r}: backfill {self.job.name} lost its run lock "
                        f"while its connection was down: another oauthmig backfill run "
                        f"(pid {holder}) holds it now; this run stops and leaves the job to it"
                    )
                raise LockBusyError(
                    f"database {self.db.name!r}: another oauthmig backfill {self.job.name} run "
                    "holds the lock; wait for it to finish (see pg_stat_activity, "
                    "application_name = 'oauthmig')"
                )
            return conn
        except BaseException:
            with contextlib.suppress(SQLAlchemyError):
                conn.close()
            raise

    def _run(self, engine: Engine, started: float) -> JobRun:
        """Check the database, then resume the saved progress or start afresh, claim the job
        for this run and run its batches (:meth:`_loop`)."""
        job, db = self.job, self.db
        physical = self.settings.tables.physical(job.logical_table)
        conn = self._connect(engine)
        try:
            remaining, generation = self._check_ready(conn, physical)
            saved = read_job(conn, job.name)
            if (
                saved is not None
                and saved.status is StoredStatus.CANCELLED
                and not self.options.restart
            ):
                message = cancelled_message(recorded_request(saved), db.name, job.name)
                seconds = time.monotonic() - started
                self._report(saved, "cancelled", bar=False)
                return JobRun(
                    job.name, db.name, RunEnd.CANCELLED, 0, 0, 0, seconds, message=message
                )
            saved, version = self._same_generation(saved, generation)
            if (
                saved is not None
                and saved.status is StoredStatus.FINISHED
                and not self.options.restart
            ):
                if remaining == 0:
                    self._report(saved, "up-to-date")
                    return JobRun(
                        job.name,
                        db.name,
                        RunEnd.UP_TO_DATE,
                        0,
                        saved.rows_done,
                        0,
                        time.monotonic() - started,
                    )
                saved = None  # new NULL rows appeared since: a fresh pass (guarded, cheap)
            if saved is None or self.options.restart:
                self._start(conn, physical, remaining, generation, version)
            else:
                self._resume(conn, saved, remaining, generation, version)
            conn = self._loop(engine, conn, physical, started)
            assert self.state is not None
            self._report(self.state, str(self.state.status))
            return self._result(started)
        except KeyboardInterrupt:
            self._pause(engine, self.work or conn)
            raise
        finally:
            for c in (conn, self.work):
                if c is not None:
                    with contextlib.suppress(SQLAlchemyError):
                        c.close()

    def _check_ready(self, conn: Connection, physical: str) -> tuple[int, str]:
        """The rows left and the generation of the job's columns, once the database is ready:
        its table routed and present, the job's columns added, the job tables there."""
        # A missing table is fixed in the config or the database, not by an upgrade.
        check_routed_tables(conn, self.settings, self.db.name)
        remaining = remaining_rows(conn, self.settings, self.db.name, self.job)
        if remaining < 0:
            raise BackfillError(
                f"database {self.db.name!r}: {physical} lacks the columns of job "
                f"{self.job.name!r}; run `oauthmig upgrade` first"
            )
        ensure_job_table(conn)
        ensure_batch_table(conn)
        return remaining, column_generation(conn, self.settings, self.job, self.revisions)

    def _same_generation(
        self, saved: JobProgress | None, generation: str
    ) -> tuple[JobProgress | None, int]:
        """The saved progress if it belongs to this generation of the job's columns (else
        ``None``, with a note), and the job version (family id formula) the run uses."""
        version = FAMILY_VERSION
        if saved is None:
            return None, version
        if saved.generation is None or saved.generation == generation:
            version = saved.version or 1
        if saved.generation == generation:
            return saved, version
        # (A row that only holds a request for a job that never ran has nothing to restart:
        # no run ever owned it.)
        if saved.owner is not None or saved.batches:
            self.note = (
                "saved progress belongs to an earlier generation of the job's "
                "columns (dropped and re-added by a downgrade and upgrade since); "
                "restarted from the beginning"
                if saved.generation is not None
                else "saved progress predates column tracking; restarted from the beginning"
            )
        return None, version

    def _start(
        self, conn: Connection, physical: str, remaining: int, generation: str, version: int
    ) -> None:
        """A fresh pass: a new job row owned by this run (a pending pause request is kept),
        the upper bound fixed now, the batch history reset."""
        now = datetime.now(UTC)
        self.state = JobProgress(
            job=self.job.name,
            table_name=physical,
            status=StoredStatus.RUNNING,
            phase=JobPhase.MAIN,
            cursor=0,
            upper_bound=_max_id(conn, physical),
            rows_done=0,
            rows_total=remaining,
            batches=0,
            batch_size=self.options.batch_size or self.settings.backfill.batch_size,
            attempts=0,
            last_error=None,
            started_at=now,
            updated_at=now,
            finished_at=None,
            owner=self.owner,
            generation=generation,
            version=version,
            held_reason=None,
        )
        with new_transaction(conn):
            carried = carried_request(conn, self.job.name)  # a pause outlives --restart
            conn.execute(job_table.delete().where(job_table.c.job == self.job.name))
            self.state = replace(self.state, **carried)
            conn.execute(job_table.insert().values(**self.state.values()))
            reset_history(conn, self.job.name)  # a new record for the new pass

    def _resume(
        self,
        conn: Connection,
        saved: JobProgress,
        remaining: int,
        generation: str,
        version: int,
    ) -> None:
        """Go on from the saved progress, and claim the job row for this run."""
        self.state = replace(
            saved,
            batch_size=self.options.batch_size or saved.batch_size,
            # Resuming: what is left is what was done plus what remains.
            rows_total=saved.rows_done + remaining,
            status=StoredStatus.RUNNING,
            owner=self.owner,
            generation=generation,
            version=version,
            held_reason=None,
        )
        with new_transaction(conn):
            # Claim the job for this run (we hold the lock: any previous owner is gone).
            conn.execute(
                job_table.update()
                .where(job_table.c.job == self.job.name)
                .values(owner=self.owner, generation=generation, version=version)
            )
            self._persist(conn)

    def _pause(self, engine: Engine, conn: Connection) -> None:
        """Ctrl-C or SIGTERM: record ``paused`` (the open batch, if any, is rolled back)."""
        if self.state is None:
            return
        # Status only: the progress columns keep what the last committed batch wrote (the
        # in-memory state may already describe the batch that was just rolled back).
        with contextlib.suppress(SQLAlchemyError):
            conn.rollback()
            with new_transaction(conn):
                conn.execute(
                    job_table.update()
                    .where(job_table.c.job == self.job.name, job_table.c.owner == self.owner)
                    .values(status=StoredStatus.PAUSED.value, updated_at=datetime.now(UTC))
                )
            return
        with contextlib.suppress(SQLAlchemyError):
            conn.close()  # releases row locks of a half-done batch before the fresh write
        self._mark(engine, status=StoredStatus.PAUSED)

    def _mark(self, engine: Engine, **values: Any) -> None:
        """Record a final state on a fresh connection (the work connection may be broken).

        Only while this run still owns the job; best effort (the server may be down).
        """
        with contextlib.suppress(SQLAlchemyError), engine.begin() as c:
            ms = self.settings.migrate.lock_timeout_ms
            set_timeouts(c, ms, max(ms, 5000), local=True)
            c.execute(
                job_table.update()
                .where(job_table.c.job == self.job.name, job_table.c.owner == self.owner)
                .values(
                    updated_at=datetime.now(UTC),
                    **{k: v.value if isinstance(v, StrEnum) else v for k, v in values.items()},
                )
            )

    def _persist(self, conn: Connection) -> None:
        """Write the job's progress columns from :attr:`state` (inside the caller's
        transaction). Only while this run owns the job row; otherwise :class:`_TakenOver`.
        """
        assert self.state is not None
        self.state = replace(self.state, updated_at=datetime.now(UTC))
        result = conn.execute(
            job_table.update()
            .where(job_table.c.job == self.job.name, job_table.c.owner == self.owner)
            .values(self.state.values(_PROGRESS_COLUMNS))
        )
        if result.rowcount != 1:
            raise _TakenOver(self._taken_over_message())

    def _taken_over_message(self) -> str:
        return (
            f"database {self.db.name!r}: backfill {self.job.name} was taken over by another "
            "oauthmig backfill run (the job row names another owner); this run stops and "
            "leaves the job to it"
        )

    def _retake_lock(self) -> bool:
        """``direct_url``: the lock's own session ended (terminated, idle timeout, network)
        and no other run holds the lock: take it again on a new session. Safe because the
        batch that asks also checks the owner token in the job row: a run that held the lock
        meanwhile and claimed the job has changed it."""
        assert self.lock_engine is not None
        self._drop_lock_conn()
        try:
            lock_conn = self.lock_engine.connect()
        except SQLAlchemyError:
            return False
        try:
            with self._deadline(lock_conn):
                got = self.lock.try_acquire(lock_conn)
        except SQLAlchemyError:
            got = False
        if got:
            self.lock_conn = lock_conn
        else:
            with contextlib.suppress(SQLAlchemyError):
                lock_conn.close()
        return got

    def _verify_lock(self, conn: Connection) -> None:
        """Inside a batch's transaction: this run still holds the run lock."""
        if self.lock.verify(conn):
            return
        if self.lock_engine is None or not self._retake_lock():
            raise _TakenOver(
                f"database {self.db.name!r}: backfill {self.job.name} lost its run lock to "
                "another oauthmig backfill run; this run stops and leaves the job to it"
            )

    def _deadline(self, conn: Connection) -> ClientDeadline:
        seconds = self.settings.migrate.statement_timeout_ms / 1000 + DEADLINE_GRACE_SECONDS
        return ClientDeadline(conn, seconds)

    def _reconnect(self, engine: Engine, conn: Connection, reason: str) -> Connection:
        """Reconnect with backoff for the outage window, or mark the job failed and raise.

        The progress in :attr:`state` is reloaded from the job row: whether the batch in flight
        committed is known only to the server.
        """
        assert self.state is not None
        with contextlib.suppress(SQLAlchemyError):
            conn.close()
        window = self.settings.backfill.outage_window_ms / 1000
        began = time.monotonic()
        attempt = 0
        last = reason
        while True:
            attempt += 1
            delay = backoff_delay(attempt - 1, base=0.2, cap=5.0)
            left = window - (time.monotonic() - began)
            if left <= 0:
                break
            self.sleep(min(delay, left))
            if self.stop.event.is_set():
                raise KeyboardInterrupt
            try:
                new = self._connect(engine, reconnect=True)
            except _StillHeld as exc:
                last = str(exc)
                continue
            except SQLAlchemyError as exc:
                last = describe_error(exc, self.db)
                continue
            try:
                row = (
                    new.execute(select(job_table).where(job_table.c.job == self.job.name))
                    .mappings()
                    .first()
                )
                new.commit()
            except SQLAlchemyError as exc:
                last = describe_error(exc, self.db)
                with contextlib.suppress(SQLAlchemyError):
                    new.close()
                continue
            if row is None or row["owner"] != self.owner:
                with contextlib.suppress(SQLAlchemyError):
                    new.close()
                raise _TakenOver(self._taken_over_message())
            stored = JobProgress.from_row(row)
            self.changed += stored.rows_done - self.state.rows_done
            self.state = replace(
                self.state,
                phase=stored.phase,
                cursor=stored.cursor,
                upper_bound=stored.upper_bound,
                rows_done=stored.rows_done,
                batches=stored.batches,
            )
            self.reconnects += 1
            return new
        message = (
            f"database {self.db.name!r}: backfill {self.job.name} lost its connection "
            f"({reason}) and could not resume within outage_window "
            f"{window:g}s ({attempt - 1} reconnect attempts; last: {last}); state saved by "
            "the last committed batch, rerun to resume"
        )
        self._mark(engine, status=StoredStatus.FAILED, last_error=message[:2000])
        raise BackfillError(message)

    def _loop(self, engine: Engine, conn: Connection, physical: str, started: float) -> Connection:
        """Run batches until the job is finished, stopped or failed; the connection it ends on.

        Each turn: stop if asked, hold while a health check fails, then one step (the next
        range, its batch, the rest after it); a step that raised goes to
        :meth:`_after_failure`, which retries, narrows, reconnects or fails the job.
        """
        assert self.state is not None
        bf: BackfillSettings = self.settings.backfill
        sleep_s = (
            self.options.sleep_seconds
            if self.options.sleep_seconds is not None
            else bf.sleep_seconds
        )
        pace = _Pace(
            size=self.state.batch_size,
            version=self.state.version or 1,
            sleep_seconds=sleep_s,
        )
        assert self.pacer is not None
        self.log.pace = self.pacer.next().rate if self.pacer.active else None
        self._report(self.state, "running", bar=False)
        while True:
            if self.stop.should_stop():
                self._save(conn, StoredStatus.PAUSED)
                return conn
            snapshot = self.state  # what the job row holds now
            attempt = _Attempt(
                snapshot.cursor, snapshot.upper_bound, datetime.now(UTC), self._deadline(conn)
            )
            try:
                if self._held(conn):
                    continue  # asked to stop while held: saved as paused above
                # Latency pacing's baseline (about 2 s, once): after the health checks, so a
                # held job says why at once; a stop during it is obeyed at the top.
                if not self.pacer.start(self.stop.should_stop):
                    continue
                conn, ended = self._step(engine, conn, physical, pace, attempt)
                if ended:
                    return conn
            except _TakenOver as exc:
                with contextlib.suppress(SQLAlchemyError):
                    conn.rollback()
                raise BackfillError(exc.message) from None
            except SQLAlchemyError as exc:
                conn = self._after_failure(engine, conn, physical, exc, snapshot, pace, attempt)

    def _step(
        self, engine: Engine, conn: Connection, physical: str, pace: _Pace, attempt: _Attempt
    ) -> tuple[Connection, bool]:
        """One turn of the loop: obey a request, find the next range (or end the pass), run
        its batch and rest. The connection to go on with, and whether the loop ends."""
        assert self.state is not None
        with attempt.deadline:
            # A pause or cancel from anywhere; the read shares _next_hi's transaction.
            wanted = requested_stop(conn, self.job.name, end=False)
            if wanted is not None:
                return self._obey(conn, wanted), True
            attempt.hi = _next_hi(conn, physical, attempt.lo, attempt.bound, pace.size)
            if conn.in_transaction():
                conn.commit()
            if attempt.hi is None:
                return conn, self._end_pass(conn, physical, attempt.bound)
            rows, t0 = self._run_batch(conn, physical, pace, attempt, attempt.hi)
        elapsed = time.monotonic() - t0
        pause = self._after_batch(rows, elapsed, pace, attempt.hi)
        if pause > 0:
            conn = self.work = self._rest(engine, conn, pause)
        return conn, False

    def _end_pass(self, conn: Connection, physical: str, bound: int) -> bool:
        """No rows left up to ``bound``. After the main pass, a catch-up pass covers the rows
        inserted meanwhile (``False``: go on); else the job is finished (``True``)."""
        assert self.state is not None
        if self.state.phase is JobPhase.MAIN:
            self.state = replace(
                self.state,
                phase=JobPhase.CATCHUP,
                upper_bound=max(bound, _max_id(conn, physical)),
            )
            conn.commit()
            if self.state.upper_bound > bound:
                self._save(conn, StoredStatus.RUNNING)
                return False
        self.state = replace(self.state, phase=JobPhase.DONE, finished_at=datetime.now(UTC))
        self._save(conn, StoredStatus.FINISHED)
        return True

    def _run_batch(
        self, conn: Connection, physical: str, pace: _Pace, attempt: _Attempt, hi: int
    ) -> tuple[int, float]:
        """Fill ``lo < id <= hi`` in one transaction that also checks the run lock and saves
        the progress; the rows changed and when the batch began (``time.monotonic``)."""
        assert self.state is not None
        lo = attempt.lo
        t0, attempt.began = time.monotonic(), datetime.now(UTC)
        with new_transaction(conn):
            self._verify_lock(conn)
            ctx = BatchContext(conn, physical, self.settings, self.db.name, pace.version)
            n = self.job.run_batch(ctx, lo, hi)
            self.state = replace(
                self.state,
                cursor=hi,
                rows_done=self.state.rows_done + n,
                batches=self.state.batches + 1,
                batch_size=pace.size,
                held_reason=self.pacer.reason or None if self.pacer is not None else None,
            )
            # Same transaction as the batch: the cursor never runs ahead of the data, and the
            # batch's history row exists exactly when the batch committed.
            self._persist(conn)
            self.log.committed(conn, lo, hi, n, time.monotonic() - t0, attempt.began)
        return n, t0

    def _after_batch(self, rows: int, elapsed: float, pace: _Pace, hi: int) -> float:
        """Count a committed batch, size the next one, report; the seconds to rest now."""
        assert self.state is not None
        self.batch_times.append(elapsed)
        self.changed += rows
        pace.failures = 0
        pace.locked_attempts = 0
        assert self.pacer is not None
        latency = self.pacer.next()  # latency pacing: scales the target and the duty cycle
        self.log.pace = latency.rate if self.pacer.active else None
        pace.size = adapt_batch_size(pace.size, elapsed, latency.target_seconds)
        if pace.narrowed is not None and hi >= pace.narrowed[1]:
            pace.size, pace.narrowed = max(pace.size, pace.narrowed[0]), None  # past the lock
        self._report(self.state, "running", elapsed)
        pause = max(pace.sleep_seconds, elapsed * (1 / latency.duty - 1))
        if self.stop.deadline is not None:  # --max-runtime bounds the pause too
            pause = min(pause, self.stop.deadline - time.monotonic())
        return pause

    def _after_failure(
        self,
        engine: Engine,
        conn: Connection,
        physical: str,
        exc: SQLAlchemyError,
        snapshot: JobProgress,
        pace: _Pace,
        attempt: _Attempt,
    ) -> Connection:
        """A step raised: reconnect if the connection is lost, narrow on a lock timeout, retry
        what is transient (with backoff), else fail the job. The connection to go on with."""
        assert self.state is not None
        with contextlib.suppress(SQLAlchemyError):
            conn.rollback()
        # The failed batch did not happen; its attempt counts (and a hold that ended before it
        # stays ended).
        self.state = replace(
            snapshot, attempts=self.state.attempts + 1, held_reason=self.state.held_reason
        )
        lo, hi, deadline = attempt.lo, attempt.hi, attempt.deadline
        lost = deadline.fired or _lost(exc, conn)
        cls = "client deadline" if deadline.fired else error_class(exc)
        self.log.failed(None if lost else conn, lo, hi, cls, attempt.began)
        if lost:
            reason = self._lost_reason(deadline, exc)
            if deadline.fired:
                pace.size = max(1, pace.size // 2)
            conn = self.work = self._reconnect(engine, conn, reason)
            return conn
        kind = classify(exc)
        if kind is FailureKind.LOCK_TIMEOUT and hi is not None:
            if pace.size > 1:
                # Halve toward the locked row; grow back once past it.
                if pace.narrowed is None:
                    pace.narrowed = (pace.size, hi)
                pace.size = max(1, pace.size // 2)
                return conn
            pace.locked_attempts += 1
            if pace.locked_attempts < LOCKED_ROW_ATTEMPTS:
                self.sleep(backoff_delay(pace.locked_attempts, base=0.2, cap=5.0))
                return conn
            self._fail(engine, self._locked_message(conn, physical, lo, hi))
        if kind is FailureKind.STATEMENT_TIMEOUT:
            pace.size = max(MIN_BATCH, pace.size // 2)
        if kind.transient and pace.failures < MAX_TRANSIENT_RETRIES:
            pace.failures += 1
            self.sleep(backoff_delay(pace.failures, base=0.05, cap=5.0))
            return conn
        message = describe_error(exc, self.db)
        # The failed attempt counts too: the stored count is what the message says for this run.
        tries = pace.failures + 1
        self._fail(
            engine,
            f"database {self.db.name!r}: backfill {self.job.name} failed at id > {lo} "
            f"after {tries} attempt{'s' if tries != 1 else ''}: {message}; "
            "state saved, rerun to resume",
            message,
        )

    def _report(
        self,
        state: JobProgress,
        status: str,
        batch_seconds: float | None = None,
        held: HealthReading | None = None,
        held_for: float = 0.0,
        *,
        bar: bool = True,
    ) -> None:
        """Tell the observer where the job stands, and the progress callback too (``bar``)
        while the job runs: after a batch, and when a hold starts, goes on or ends."""
        done = state.rows_done
        total = max(state.rows_total, done)
        if self.progress and bar and status in ("running", "held"):
            note = f"held: {held.reason}" if held is not None else self._pace_note()
            self.progress(f"{self.db.name} {self.job.name}", done, total, note)
        if self.observe:
            self.observe(
                JobSample(
                    self.job.name,
                    self.db.name,
                    status,
                    done,
                    0 if status in ("finished", "up-to-date") else total - done,
                    state.batches,
                    batch_seconds
                    if batch_seconds is not None
                    else (self.batch_times[-1] if self.batch_times else None),
                    held.probe or "" if held is not None else "",
                    held.reason if held is not None else "",
                    held_for,
                    self.pacer.rate if self.pacer is not None and self.pacer.active else None,
                )
            )

    def _pace_note(self) -> str | None:
        return (self.pacer.reason or None) if self.pacer is not None else None

    def _held(self, conn: Connection) -> bool:
        """Between batches: hold while health checks fail (:meth:`HealthMonitor.hold`), with
        the reason in the job row, the progress line and the observer. True when asked to
        stop while held (Ctrl-C and SIGTERM raise instead)."""
        if self.health is None or not self.health.due():
            return False
        if conn.in_transaction():
            conn.commit()  # nothing stays open while held

        def report(reading: HealthReading | None, seconds: float) -> None:
            assert self.state is not None
            status = "running" if reading is None else "held"
            self._report(self.state, status, held=reading, held_for=seconds)

        requested = False

        def wait(seconds: float) -> bool:
            # A pause or cancel request ends a hold too: the loop obeys it before any batch.
            nonlocal requested
            if self._wait(seconds):
                return True
            requested = requested_stop(conn, self.job.name) is not None
            return requested

        stopped = self.health.hold(lambda r: self._set_held(conn, r), report, wait)
        if requested:
            self._set_held(conn, None)  # stopped by the request, not by the health checks
            return False
        if stopped is not None:
            note = f"stopped while held by health checks: {stopped}"
            self.note = f"{self.note}; {note}" if self.note else note
        return stopped is not None

    def _set_held(self, conn: Connection, reason: str | None) -> None:
        """Record (or clear) the hold reason in the job row, in its own short transaction."""
        assert self.state is not None
        if reason is None and self.state.held_reason is None:
            return
        stored = None if reason is None else reason[:2000]
        with self._deadline(conn), new_transaction(conn):
            result = conn.execute(
                job_table.update()
                .where(job_table.c.job == self.job.name, job_table.c.owner == self.owner)
                .values(held_reason=stored, updated_at=datetime.now(UTC))
            )
            if result.rowcount != 1:
                raise _TakenOver(self._taken_over_message())
        self.state = replace(self.state, held_reason=stored)

    def _wait(self, seconds: float) -> bool:
        """Wait ``seconds`` (less if ``--max-runtime`` ends first); True if the run must stop.
        A stop request from another thread ends the wait at once."""
        if self.stop.deadline is not None:
            seconds = min(seconds, max(0.0, self.stop.deadline - time.monotonic()))
        self.stop.event.wait(seconds)
        return self.stop.should_stop()

    def _obey(self, conn: Connection, request: Request) -> Connection:
        """A pause or cancel request: stop before the next batch, state saved."""
        self.by_request = True
        if request.action == "pause":
            self._save(conn, StoredStatus.PAUSED)
            message = paused_message(request, self.db.name, self.job.name)
        else:
            self._save(conn, StoredStatus.CANCELLED)
            message = cancelled_message(request, self.db.name, self.job.name)
        self.note = f"{self.note}; {message}" if self.note else message
        return conn

    def _rest(self, engine: Engine, conn: Connection, seconds: float) -> Connection:
        """The pause between batches, cut short when a pause or cancel request arrives.

        Returns the work connection: a new one (through :meth:`_reconnect`, run lock taken
        again) if the connection was lost meanwhile.
        """
        assert self.state is not None
        end = time.monotonic() + seconds
        while (left := end - time.monotonic()) > 0:
            self.sleep(min(left, POLL_SECONDS))
            if self.stop.event.is_set() or end - time.monotonic() <= 0:
                return conn
            deadline = self._deadline(conn)
            try:
                with deadline:
                    if requested_stop(conn, self.job.name) is not None:
                        return conn
            except SQLAlchemyError as exc:
                with contextlib.suppress(SQLAlchemyError):
                    conn.rollback()
                if not (deadline.fired or _lost(exc, conn)):
                    return conn  # the next batch meets the same error and deals with it
                self.state = replace(self.state, attempts=self.state.attempts + 1)
                return self._reconnect(engine, conn, self._lost_reason(deadline, exc))
        return conn

    def _lost_reason(self, deadline: ClientDeadline, exc: SQLAlchemyError) -> str:
        if deadline.fired:
            return (
                f"no answer within the client deadline of {deadline.seconds:g}s "
                "(statement_timeout + 5s): server process stopped or hung"
            )
        return describe_error(exc, self.db)

    def _locked_message(self, conn: Connection, physical: str, lo: int, hi: int) -> str:
        assert self.state is not None
        who = lock_blockers(conn, [physical], id_range=(lo, hi))
        ms = self.settings.migrate.lock_timeout_ms
        return (
            f"database {self.db.name!r}: backfill {self.job.name} cannot make progress: "
            f"{physical} id {hi} stays locked (lock_timeout {ms}ms, batch narrowed to one row, "
            f"{self.state.attempts} lock attempts); {who}. End that transaction, then rerun to "
            f"resume (state saved at id > {lo})"
        )

    def _fail(self, engine: Engine, message: str, stored: str | None = None) -> NoReturn:
        assert self.state is not None
        self._mark(
            engine,
            status=StoredStatus.FAILED,
            last_error=(stored or message)[:2000],
            attempts=self.state.attempts,
        )
        raise BackfillError(message)

    def _save(self, conn: Connection, status: StoredStatus) -> None:
        assert self.state is not None
        self.state = replace(self.state, status=status)
        if status is StoredStatus.FINISHED:
            self.state = replace(self.state, last_error=None)
        if status is not StoredStatus.RUNNING and (self.state.held_reason or "").startswith(
            PACED_PREFIX
        ):
            self.state = replace(self.state, held_reason=None)  # a pace is only while running
        with new_transaction(conn):
            self._persist(conn)

    def _result(self, started: float) -> JobRun:
        assert self.state is not None
        out_of_time = (
            self.state.status is StoredStatus.PAUSED
            and not self.by_request
            and not self.stop.event.is_set()
            and self.stop.out_of_time()
        )
        if out_of_time:
            left = max(0, self.state.rows_total - self.state.rows_done)
            note = f"stopped by --max-runtime with about {left:,} rows left; rerun to continue"
            self.note = f"{self.note}; {note}" if self.note else note
        return JobRun(
            self.job.name,
            self.db.name,
            RunEnd(self.state.status),
            self.changed,
            self.state.rows_total,
            len(self.batch_times),
            time.monotonic() - started,
            tuple(self.batch_times),
            message=self.note,
            held_seconds=self.health.held_seconds if self.health is not None else 0.0,
            out_of_time=out_of_time,
        )


def _dry_run(settings: Settings, db: DatabaseConfig, job: Job) -> JobRun:
    started = time.monotonic()
    with open_database(settings, db) as conn:
        physical = settings.tables.physical(job.logical_table)
        check_routed_tables(conn, settings, db.name)
        n = remaining_rows(conn, settings, db.name, job)
        if n < 0:
            return JobRun(
                job.name,
                db.name,
                RunEnd.DRY_RUN,
                0,
                0,
                0,
                0.0,
                message=f"{physical} lacks the job's columns; run `oauthmig upgrade` first",
            )
        saved = read_job(conn, job.name)
        rate: float | None = None
        if saved and saved.rows_done and saved.finished_at:
            spent = (saved.finished_at - saved.started_at).total_seconds()
            rate = saved.rows_done / spent if spent > 0 else None
        if rate is None:
            # No history on this database: assume one target-length batch per batch_size.
            rate = settings.backfill.batch_size / settings.backfill.target_batch_seconds
        bf = settings.backfill
        # Pacing: at least sleep_seconds per batch, and max_duty of the wall time in batches.
        duty = bf.duty(paced=db.dialect == "postgresql" and bf.max_latency_ratio > 0)
        estimate = max(n / rate / duty, n / rate + bf.sleep_seconds * (n / bf.batch_size))
        return JobRun(
            job.name,
            db.name,
            RunEnd.DRY_RUN,
            n,
            n,
            0,
            time.monotonic() - started,
            estimated_seconds=round(estimate, 1),
            message=f"assuming {rate:,.0f} rows/s",
        )


def backfill(
    settings: Settings,
    job_names: Sequence[str] = (),
    options: BackfillOptions | None = None,
    progress: Progress | None = None,
    stop: threading.Event | None = None,
    revisions: Sequence[RevisionInfo] | None = None,
    observe: Observer | None = None,
) -> BackfillResult:
    """Run (or with ``dry_run`` estimate) backfill jobs on every database hosting their table.

    Failures are captured per job and database; other databases go on. ``revisions``: the
    invocation's catalogue, if it has one. ``observe`` receives a :class:`JobSample` after
    each batch, on each health check while held, and at the end of each job's run (from worker
    threads with ``jobs`` > 1).
    """
    options = options or BackfillOptions()
    names = list(job_names) or list(JOBS)
    for n in names:
        if n not in JOBS:
            raise UsageError(f"unknown backfill job {n!r} (jobs: {', '.join(JOBS)})")
    health = settings.backfill.health
    if health.enabled and health.replica_error and not options.dry_run:
        raise ConfigError(health.replica_error)
    # The same preflight as upgrade, on every database a job runs on, before any job writes
    # anywhere (and before --max-runtime starts counting).
    tables = {JOBS[n].logical_table for n in names}
    if revisions is None:
        revisions = Catalogue.load().revisions
    hosting = [d for d in settings.database_names() if tables & set(settings.tables_on(d))]
    if not options.dry_run:
        for name in hosting:
            require_session(settings, settings.databases[name], "backfill")
    # Databases another runner is upgrading (overlapping CI jobs or pods) are left to it.
    held: dict[str, Held] = {}
    if not options.dry_run:
        for name in hosting:
            found = _held_upgrade(settings, settings.databases[name])
            if found is not None:
                held[name] = found
    check_databases(
        settings,
        [n for n in hosting if n not in held],
        revisions,
        Command.DRY_RUN if options.dry_run else Command.BACKFILL,
    )
    # A health probe that cannot work as configured is a config error, before any batch.
    for dbname in hosting:
        validate_health(health, settings.databases[dbname])
    stopper = _Stop(
        stop or threading.Event(),
        None if options.max_runtime is None else time.monotonic() + options.max_runtime,
    )
    work: list[tuple[DatabaseConfig, Job]] = []
    for dbname in settings.database_names():
        routed = settings.tables_on(dbname)
        for n in names:
            if JOBS[n].logical_table in routed:
                work.append((settings.databases[dbname], JOBS[n]))

    def one(item: tuple[DatabaseConfig, Job]) -> JobRun:
        db, job = item
        if db.name in held:
            return _skipped(job, db, held[db.name])
        try:
            with map_db_errors(db):
                if options.dry_run:
                    return _dry_run(settings, db, job)
                return _Runner(
                    settings, db, job, options, progress, stopper, revisions, observe=observe
                ).run()
        except LockBusyError as exc:
            found = _held_job(settings, db, job)
            if found is not None:
                return _skipped(job, db, found)
            return JobRun(job.name, db.name, RunEnd.FAILED, 0, 0, 0, 0.0, message=exc.message)
        except OauthmigError as exc:
            return JobRun(job.name, db.name, RunEnd.FAILED, 0, 0, 0, 0.0, message=exc.message)

    if options.jobs > 1 and len(work) > 1:
        pool = ThreadPoolExecutor(max_workers=options.jobs)
        try:
            runs = list(pool.map(one, work))
        except KeyboardInterrupt:
            stopper.event.set()  # workers pause after their current batch and save state
            pool.shutdown(wait=True)
            raise
        pool.shutdown()
    else:
        runs = [one(item) for item in work]
    return BackfillResult(tuple(runs), options.dry_run)


def _skipped(job: Job, db: DatabaseConfig, held: Held) -> JobRun:
    return JobRun(
        job.name, db.name, RunEnd.SKIPPED, 0, 0, 0, 0.0, message=held.describe(), held=held
    )


def _held_upgrade(settings: Settings, db: DatabaseConfig) -> Held | None:
    """Another runner holds ``db``'s upgrade lock (its columns may be changing)."""
    with map_db_errors(db), open_database(settings, db) as conn:
        return held_upgrade(conn, db.name)


def _held_job(settings: Settings, db: DatabaseConfig, job: Job) -> Held | None:
    """Who holds the run lock of ``job`` on ``db``, after this run could not take it."""
    try:
        with map_db_errors(db), open_database(settings, db) as conn:
            return run_lock(job.name, db.name).held_elsewhere(conn) or Held(
                db.name, f"backfill {job.name}", None
            )
    except OauthmigError:
        return Held(db.name, f"backfill {job.name}", None)


# --------------------------------------------------------------------------- hooks
