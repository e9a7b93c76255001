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
* one run per job and database. PostgreSQL: a session advisory lock held by the connection
  that runs the batches, re-verified inside every batch's transaction
  (``pg_try_advisory_xact_lock``) together with the run's owner token in the job row; a run
  whose lock or job row was taken over by another run stops at once. SQLite: ``flock``;
* a lost connection (server restart, failover, terminated session, client deadline passed)
  is reconnected with backoff for ``outage_window``; the lock is taken again and the owner
  token checked before the next batch; past the window the job is marked ``failed``;
* on a lock timeout the batch is halved down to one row; a row that stays locked fails the
  job with the blocking session's pid, state and transaction age (never its query text);
* deadlocks, serialization failures and statement timeouts are retried with jittered
  backoff (a statement timeout also halves the batch); other errors mark the job ``failed``;
* the saved progress is valid only for the generation of the job's columns it was made on
  (revision-log entry of the revisions adding them, plus the columns' ``attnum`` on
  PostgreSQL): after a downgrade and upgrade re-created them, the job starts over.

The jobs themselves (what each fills, the job table, the family id formula) are in
:mod:`oauthmig.rollout.jobs`.
"""

from __future__ import annotations

import contextlib
import random
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

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
    connect,
    describe_error,
    exclusive_run,
    for_writing,
    lock_key,
    make_engine,
)
from oauthmig.errors import BackfillError, LockBusyError, OauthmigError, UsageError
from oauthmig.rollout.jobs import (
    FAMILY_VERSION,
    JOBS,
    BatchContext,
    Job,
    ensure_job_table,
    job_table,
    lock_holder,
    new_transaction,
    read_job,
    register_sqlite_functions,
    remaining_rows,
)
from oauthmig.rollout.remaining import column_generation as _generation
from oauthmig.rollout.runner import check_databases, check_routed_tables, lock_blockers

MIN_BATCH, MAX_BATCH = 10, 200_000
MAX_TRANSIENT_RETRIES = 10
LOCKED_ROW_ATTEMPTS = 3  # lock timeouts on a one-row batch before the job fails
DEADLINE_GRACE_SECONDS = 5.0  # client deadline = statement_timeout + this
_LOST_SQLSTATES = ("57P01", "57P02", "57P03", "08006", "08003", "08000", "08001", "08004")


# --------------------------------------------------------------------------- jobs


# --------------------------------------------------------------------------- results


@dataclass(frozen=True, slots=True)
class JobRun:
    """The outcome of one job on one database."""

    job: str
    database: str
    status: str  # finished | paused | failed | skipped | dry-run | up-to-date
    rows_changed: int
    rows_total: int
    batches: int
    seconds: float
    batch_seconds: tuple[float, ...] = ()
    estimated_seconds: float | None = None
    message: str | None = None


@dataclass(frozen=True, slots=True)
class BackfillResult:
    """All job runs of one ``backfill`` invocation."""

    runs: tuple[JobRun, ...]
    dry_run: bool

    @property
    def failed(self) -> tuple[JobRun, ...]:
        """Runs that failed."""
        return tuple(r for r in self.runs if r.status == "failed")


@dataclass(frozen=True, slots=True)
class BackfillOptions:
    """Options of one invocation (CLI flags over config)."""

    batch_size: int | None = None
    sleep_seconds: float | None = None
    max_runtime: float | None = None
    restart: bool = False
    dry_run: bool = False
    jobs: int = 1


Progress = Callable[[str, int, int], None]


@dataclass
class _Stop:
    event: threading.Event = field(default_factory=threading.Event)
    deadline: float | None = None

    def should_stop(self) -> bool:
        return self.event.is_set() or (
            self.deadline is not None and time.monotonic() >= self.deadline
        )


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


def _transient(exc: SQLAlchemyError) -> bool:
    if getattr(exc, "connection_invalidated", False):
        return True
    orig = getattr(exc, "orig", None)
    sqlstate = getattr(orig, "sqlstate", None)
    if sqlstate in ("40P01", "40001", "55P03", "57P01", "08006", "08003", "08000"):
        return True
    return "database is locked" in str(orig)


def _is_statement_timeout(exc: SQLAlchemyError) -> bool:
    return getattr(getattr(exc, "orig", None), "sqlstate", None) == "57014"


def _is_lock_timeout(exc: SQLAlchemyError) -> bool:
    orig = getattr(exc, "orig", None)
    return getattr(orig, "sqlstate", None) == "55P03" or "database is locked" in str(orig)


def _lost(exc: SQLAlchemyError, conn: Connection) -> bool:
    """True if the connection is gone (server restart, terminated session, network)."""
    if getattr(exc, "connection_invalidated", False) or conn.invalidated or conn.closed:
        return True
    if getattr(getattr(exc, "orig", None), "sqlstate", None) in _LOST_SQLSTATES:
        return True
    try:
        return bool(getattr(conn.connection.driver_connection, "closed", False))
    except SQLAlchemyError:
        return True


class _StillHeld(Exception):
    """Reconnected, but this run's previous session still holds the run lock."""


class _TakenOver(BackfillError):
    """Another run holds the lock or owns the job row: this run must stop at once."""


def _row_blockers(conn: Connection, physical: str, lo: int, hi: int) -> str:
    """Who holds the row locks in ``(lo, hi]`` (PostgreSQL): pid, state, transaction age.

    A row locked for update carries the locker's transaction id in ``xmax``; a shared lock
    (multixact) falls back to the table-level report ``upgrade`` gives. Never query text.
    """
    if conn.dialect.name != "postgresql":
        return lock_blockers(conn, [physical])
    parts: list[str] = []
    with contextlib.suppress(SQLAlchemyError):
        rows = conn.execute(
            text(
                "SELECT a.pid, a.state, "
                "  EXTRACT(EPOCH FROM now() - COALESCE(a.xact_start, a.query_start))::int AS age "
                "FROM pg_stat_activity a WHERE a.pid <> pg_backend_pid() "
                "AND a.backend_xid IS NOT NULL AND a.backend_xid::text IN "
                f"(SELECT xmax::text FROM {physical} WHERE id > :lo AND id <= :hi)"
            ),
            {"lo": lo, "hi": hi},
        ).all()
        conn.rollback()
        parts = [f"locked by pid {r.pid} ({r.state}, transaction open {r.age}s)" for r in rows]
    return "; ".join(parts) or lock_blockers(conn, [physical])


def adapt_batch_size(size: int, seconds: float, target: float) -> int:
    """Next batch size: grow gently (≤ +25 %), shrink at once in proportion to a slow batch."""
    ratio = target / max(seconds, 1e-4)
    factor = min(ratio, 1.25) if ratio >= 1 else max(ratio, 0.1)
    return max(MIN_BATCH, min(MAX_BATCH, int(size * factor) or MIN_BATCH))


# --------------------------------------------------------------------------- runner


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
)


@dataclass
class _Runner:
    settings: Settings
    db: DatabaseConfig
    job: Job
    options: BackfillOptions
    progress: Progress | None
    stop: _Stop
    sleep: Callable[[float], None] = time.sleep
    batch_times: list[float] = field(default_factory=list)
    changed: int = 0
    owner: str = field(default_factory=lambda: uuid.uuid4().hex)
    backend_pid: int | None = None
    reconnects: int = 0
    note: str | None = None
    work: Connection | None = None  # the current work connection (replaced on reconnect)

    @property
    def lock_key(self) -> int:
        # Advisory locks are scoped to the current database, so the job name is enough.
        return lock_key(f"backfill {self.job.name}")

    def run(self) -> JobRun:
        """Run the job on its database (holding the run lock) and return the outcome."""
        started = time.monotonic()
        engine = make_engine(self.db, self.settings)
        try:
            if engine.dialect.name == "postgresql":
                return self._run(engine, started)
            with (
                connect(engine, self.db) as lock_conn,
                exclusive_run(lock_conn, self.db, f"backfill {self.job.name}"),
            ):
                return self._run(engine, started)
        finally:
            engine.dispose()

    def _connect(self, engine: Engine, *, reconnect: bool = False) -> Connection:
        """A work connection; on PostgreSQL it also takes (or takes again) the run lock."""
        conn = for_writing(engine.connect())
        try:
            register_sqlite_functions(conn)
            if conn.dialect.name != "postgresql":
                return conn
            m = self.settings.migrate
            with self._deadline(conn):
                conn.execute(text(f"SET lock_timeout = '{int(m.lock_timeout_ms)}ms'"))
                conn.execute(text(f"SET statement_timeout = '{int(m.statement_timeout_ms)}ms'"))
                pid = int(conn.execute(text("SELECT pg_backend_pid()")).scalar_one())
                got = conn.execute(
                    text("SELECT pg_try_advisory_lock(:k)"), {"k": self.lock_key}
                ).scalar()
                conn.commit()
            if not got:
                holder = lock_holder(conn, self.lock_key)
                if reconnect and holder is not None and holder == self.backend_pid:
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
            self.backend_pid = pid
            return conn
        except BaseException:
            with contextlib.suppress(SQLAlchemyError):
                conn.close()
            raise

    def _run(self, engine: Engine, started: float) -> JobRun:
        job, db, bf = self.job, self.db, self.settings.backfill
        physical = self.settings.tables.physical(job.logical_table)
        conn = self._connect(engine)
        state: dict[str, Any] | None = None
        try:
            # A missing table is fixed in the config or the database, not by an upgrade.
            check_routed_tables(conn, self.settings, db.name)
            remaining = remaining_rows(conn, self.settings, db.name, job)
            if remaining < 0:
                raise BackfillError(
                    f"database {db.name!r}: {physical} lacks the columns of job {job.name!r}; "
                    "run `oauthmig upgrade` first"
                )
            ensure_job_table(conn)
            generation = _generation(conn, self.settings, job)
            state = read_job(conn, job.name)
            now = datetime.now(UTC)
            version = FAMILY_VERSION
            if state is not None:
                if state.get("generation") is None or state["generation"] == generation:
                    version = int(state.get("version") or 1)
                if state.get("generation") != generation:
                    self.note = (
                        "saved progress belongs to an earlier generation of the job's columns "
                        "(dropped and re-added by a downgrade and upgrade since); restarted "
                        "from the beginning"
                        if state.get("generation") is not None
                        else "saved progress predates column tracking; restarted from the beginning"
                    )
                    state = None
            if state is not None and state["status"] == "finished" and not self.options.restart:
                if remaining == 0:
                    return JobRun(
                        job.name,
                        db.name,
                        "up-to-date",
                        0,
                        int(state["rows_done"]),
                        0,
                        time.monotonic() - started,
                    )
                state = None  # new NULL rows appeared since: a fresh pass (guarded, cheap)
            if state is None or self.options.restart:
                size = self.options.batch_size or bf.batch_size
                state = {
                    "job": job.name,
                    "table_name": physical,
                    "status": "running",
                    "phase": "main",
                    "cursor": 0,
                    "upper_bound": _max_id(conn, physical),
                    "rows_done": 0,
                    "rows_total": remaining,
                    "batches": 0,
                    "batch_size": size,
                    "attempts": 0,
                    "last_error": None,
                    "started_at": now,
                    "updated_at": now,
                    "finished_at": None,
                    "owner": self.owner,
                    "generation": generation,
                    "version": version,
                }
                with new_transaction(conn):
                    conn.execute(job_table.delete().where(job_table.c.job == job.name))
                    conn.execute(job_table.insert().values(**state))
            else:
                if self.options.batch_size:
                    state["batch_size"] = self.options.batch_size
                # Resuming: what is left is what was done plus what remains.
                state["rows_total"] = int(state["rows_done"]) + remaining
                state["status"] = "running"
                state["version"] = version
                with new_transaction(conn):
                    # Claim the job for this run (we hold the lock: any previous owner is gone).
                    conn.execute(
                        job_table.update()
                        .where(job_table.c.job == job.name)
                        .values(owner=self.owner, generation=generation, version=version)
                    )
                    self._persist(conn, state)
            state["owner"] = self.owner
            conn = self._loop(engine, conn, physical, state, started)
            return self._result(state, started)
        except KeyboardInterrupt:
            self._pause(engine, self.work or conn, state)
            raise
        finally:
            for c in (conn, self.work):
                if c is not None:
                    with contextlib.suppress(SQLAlchemyError):
                        c.close()

    def _pause(self, engine: Engine, conn: Connection, state: dict[str, Any] | None) -> None:
        """Ctrl-C or SIGTERM: record ``paused`` (the open batch, if any, is rolled back)."""
        if state is None:
            return
        # Status only: the progress columns keep what the last committed batch wrote (the
        # in-memory state may already describe the batch that was just rolled back).
        with contextlib.suppress(SQLAlchemyError):
            conn.rollback()
            with new_transaction(conn):
                conn.execute(
                    job_table.update()
                    .where(job_table.c.job == self.job.name, job_table.c.owner == self.owner)
                    .values(status="paused", updated_at=datetime.now(UTC))
                )
            return
        with contextlib.suppress(SQLAlchemyError):
            conn.close()  # releases row locks of a half-done batch before the fresh write
        self._mark(engine, status="paused")

    def _mark(self, engine: Engine, **values: Any) -> None:
        """Record a final state on a fresh connection (the work connection may be broken).

        Only while this run still owns the job; best effort (the server may be down).
        """
        with contextlib.suppress(SQLAlchemyError), engine.begin() as c:
            if c.dialect.name == "postgresql":
                ms = int(self.settings.migrate.lock_timeout_ms)
                c.execute(text(f"SET LOCAL lock_timeout = '{ms}ms'"))
                c.execute(text(f"SET LOCAL statement_timeout = '{max(ms, 5000)}ms'"))
            c.execute(
                job_table.update()
                .where(job_table.c.job == self.job.name, job_table.c.owner == self.owner)
                .values(updated_at=datetime.now(UTC), **values)
            )

    def _persist(self, conn: Connection, state: dict[str, Any]) -> None:
        """Write the job's progress columns from ``state`` (inside the caller's transaction).

        Only while this run owns the job row; otherwise :class:`_TakenOver`.
        """
        state["updated_at"] = datetime.now(UTC)
        result = conn.execute(
            job_table.update()
            .where(job_table.c.job == self.job.name, job_table.c.owner == self.owner)
            .values({name: state[name] for name in _PROGRESS_COLUMNS})
        )
        if result.rowcount != 1:
            raise _TakenOver(self._taken_over_message())

    def _taken_over_message(self) -> str:
        return (
            f"database {self.db.name!r}: backfill {self.job.name} was taken over by another "
            "oauthmig backfill run (the job row names another owner); this run stops and "
            "leaves the job to it"
        )

    def _verify_lock(self, conn: Connection) -> None:
        """Inside a batch's transaction: this session still holds the run lock."""
        if conn.dialect.name != "postgresql":
            return
        ok = conn.execute(
            text("SELECT pg_try_advisory_xact_lock(:k)"), {"k": self.lock_key}
        ).scalar()
        if not ok:
            raise _TakenOver(
                f"database {self.db.name!r}: backfill {self.job.name} lost its run lock to "
                "another oauthmig backfill run; this run stops and leaves the job to it"
            )

    def _deadline(self, conn: Connection) -> ClientDeadline:
        seconds = self.settings.migrate.statement_timeout_ms / 1000 + DEADLINE_GRACE_SECONDS
        return ClientDeadline(conn, seconds)

    def _reconnect(
        self, engine: Engine, conn: Connection, reason: str, state: dict[str, Any]
    ) -> Connection:
        """Reconnect with backoff for the outage window, or mark the job failed and raise.

        The progress in ``state`` is reloaded from the job row: whether the batch in flight
        committed is known only to the server.
        """
        with contextlib.suppress(SQLAlchemyError):
            conn.close()
        window = self.settings.backfill.outage_window_ms / 1000
        began = time.monotonic()
        attempt = 0
        last = reason
        while True:
            attempt += 1
            delay = min(5.0, 0.2 * 2 ** (attempt - 1)) * random.uniform(0.5, 1.0)
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
            self.changed += int(row["rows_done"]) - int(state["rows_done"])
            for name in ("phase", "cursor", "upper_bound", "rows_done", "batches"):
                state[name] = row[name]
            self.reconnects += 1
            return new
        message = (
            f"database {self.db.name!r}: backfill {self.job.name} lost its connection "
            f"({reason}) and could not resume within outage_window "
            f"{window:g}s ({attempt - 1} reconnect attempts; last: {last}); state saved by "
            "the last committed batch, rerun to resume"
        )
        self._mark(engine, status="failed", last_error=message[:2000])
        raise BackfillError(message)

    def _loop(
        self, engine: Engine, conn: Connection, physical: str, state: dict[str, Any], started: float
    ) -> Connection:
        bf: BackfillSettings = self.settings.backfill
        sleep_s = (
            self.options.sleep_seconds
            if self.options.sleep_seconds is not None
            else bf.sleep_seconds
        )
        target = bf.target_batch_seconds
        size = int(state["batch_size"])
        failures = 0
        locked_attempts = 0
        narrowed: tuple[int, int] | None = None  # (size before narrowing, id to get past)
        label = f"{self.db.name} {self.job.name}"
        version = int(state.get("version") or 1)
        while True:
            if self.stop.should_stop():
                self._save(conn, state, "paused")
                return conn
            snapshot = dict(state)  # what the job row holds now
            bound = int(state["upper_bound"])
            lo = int(state["cursor"])
            hi: int | None = None
            deadline = self._deadline(conn)
            try:
                with deadline:
                    hi = _next_hi(conn, physical, lo, bound, size)
                    if conn.in_transaction():
                        conn.commit()
                    if hi is None:
                        if state["phase"] == "main":
                            # Catch-up: rows inserted while the main pass ran.
                            state["phase"] = "catchup"
                            state["upper_bound"] = max(bound, _max_id(conn, physical))
                            conn.commit()
                            if state["upper_bound"] > bound:
                                self._save(conn, state, "running")
                                continue
                        state["phase"] = "done"
                        state["finished_at"] = datetime.now(UTC)
                        self._save(conn, state, "finished")
                        return conn
                    t0 = time.monotonic()
                    with new_transaction(conn):
                        self._verify_lock(conn)
                        ctx = BatchContext(conn, physical, self.settings, self.db.name, version)
                        n = self.job.run_batch(ctx, lo, hi)
                        state["cursor"] = hi
                        state["rows_done"] = int(state["rows_done"]) + n
                        state["batches"] = int(state["batches"]) + 1
                        state["batch_size"] = size
                        # Same transaction as the batch: the cursor never runs ahead of the data.
                        self._persist(conn, state)
                elapsed = time.monotonic() - t0
                self.batch_times.append(elapsed)
                self.changed += n
                failures = 0
                locked_attempts = 0
                size = adapt_batch_size(size, elapsed, target)
                if narrowed is not None and hi >= narrowed[1]:
                    size, narrowed = max(size, narrowed[0]), None  # past the locked range
                if self.progress:
                    self.progress(
                        label,
                        int(state["rows_done"]),
                        max(int(state["rows_total"]), int(state["rows_done"])),
                    )
                pause = max(sleep_s, elapsed * (1 / bf.max_duty - 1))
                if self.stop.deadline is not None:  # --max-runtime bounds the pause too
                    pause = min(pause, self.stop.deadline - time.monotonic())
                if pause > 0:
                    self.sleep(pause)
            except _TakenOver as exc:
                with contextlib.suppress(SQLAlchemyError):
                    conn.rollback()
                raise BackfillError(exc.message) from None
            except SQLAlchemyError as exc:
                with contextlib.suppress(SQLAlchemyError):
                    conn.rollback()
                attempts = int(state["attempts"])
                state.update(snapshot, attempts=attempts)  # the failed batch did not happen
                if deadline.fired or _lost(exc, conn):
                    reason = (
                        f"no answer within the client deadline of {deadline.seconds:g}s "
                        "(statement_timeout + 5s): server process stopped or hung"
                        if deadline.fired
                        else describe_error(exc, self.db)
                    )
                    if deadline.fired:
                        size = max(1, size // 2)
                    state["attempts"] = int(state["attempts"]) + 1
                    conn = self.work = self._reconnect(engine, conn, reason, state)
                    continue
                if _is_lock_timeout(exc) and hi is not None:
                    state["attempts"] = int(state["attempts"]) + 1
                    if size > 1:
                        # Halve toward the locked row; grow back once past it.
                        if narrowed is None:
                            narrowed = (size, hi)
                        size = max(1, size // 2)
                        continue
                    locked_attempts += 1
                    if locked_attempts < LOCKED_ROW_ATTEMPTS:
                        self.sleep(min(5.0, 0.2 * 2**locked_attempts) * random.uniform(0.5, 1.0))
                        continue
                    self._fail(engine, state, self._locked_message(conn, physical, lo, hi, state))
                if _is_statement_timeout(exc):
                    size = max(MIN_BATCH, size // 2)
                if (
                    _is_statement_timeout(exc) or _transient(exc)
                ) and failures < MAX_TRANSIENT_RETRIES:
                    failures += 1
                    state["attempts"] = int(state["attempts"]) + 1
                    self.sleep(min(5.0, 0.05 * 2**failures) * random.uniform(0.5, 1.0))
                    continue
                message = describe_error(exc, self.db)
                # The failed attempt counts too: the stored count is what the message says
                # for this run.
                state["attempts"] = int(state["attempts"]) + 1
                tries = failures + 1
                self._fail(
                    engine,
                    state,
                    f"database {self.db.name!r}: backfill {self.job.name} failed at id > {lo} "
                    f"after {tries} attempt{'s' if tries != 1 else ''}: {message}; "
                    "state saved, rerun to resume",
                    message,
                )

    def _locked_message(
        self, conn: Connection, physical: str, lo: int, hi: int, state: dict[str, Any]
    ) -> str:
        who = _row_blockers(conn, physical, lo, hi)
        ms = self.settings.migrate.lock_timeout_ms
        return (
            f"database {self.db.name!r}: backfill {self.job.name} cannot make progress: "
            f"{physical} id {hi} stays locked (lock_timeout {ms}ms, batch narrowed to one row, "
            f"{state['attempts']} lock attempts); {who}. End that transaction, then rerun to "
            f"resume (state saved at id > {lo})"
        )

    def _fail(
        self, engine: Engine, state: dict[str, Any], message: str, stored: str | None = None
    ) -> None:
        self._mark(
            engine,
            status="failed",
            last_error=(stored or message)[:2000],
            attempts=state["attempts"],
        )
        raise BackfillError(message)

    def _save(self, conn: Connection, state: dict[str, Any], status: str) -> None:
        state["status"] = status
        if status == "finished":
            state["last_error"] = None
        with new_transaction(conn):
            self._persist(conn, state)

    def _result(self, state: dict[str, Any], started: float) -> JobRun:
        return JobRun(
            self.job.name,
            self.db.name,
            str(state["status"]),
            self.changed,
            int(state["rows_total"]),
            len(self.batch_times),
            time.monotonic() - started,
            tuple(self.batch_times),
            message=self.note,
        )


def _dry_run(settings: Settings, db: DatabaseConfig, job: Job) -> JobRun:
    started = time.monotonic()
    engine = make_engine(db, settings)
    try:
        with connect(engine, db) as conn:
            physical = settings.tables.physical(job.logical_table)
            check_routed_tables(conn, settings, db.name)
            n = remaining_rows(conn, settings, db.name, job)
            if n < 0:
                return JobRun(
                    job.name,
                    db.name,
                    "dry-run",
                    0,
                    0,
                    0,
                    0.0,
                    message=f"{physical} lacks the job's columns; run `oauthmig upgrade` first",
                )
            state = read_job(conn, job.name)
            rate: float | None = None
            if state and state["rows_done"] and state["finished_at"] and state["started_at"]:
                spent = (state["finished_at"] - state["started_at"]).total_seconds()
                rate = state["rows_done"] / spent if spent > 0 else None
            if rate is None:
                # No history on this database: assume one target-length batch per batch_size.
                rate = settings.backfill.batch_size / settings.backfill.target_batch_seconds
            bf = settings.backfill
            # Pacing: at least sleep_seconds per batch, and max_duty of the wall time in batches.
            estimate = max(
                n / rate / bf.max_duty, n / rate + bf.sleep_seconds * (n / bf.batch_size)
            )
            return JobRun(
                job.name,
                db.name,
                "dry-run",
                n,
                n,
                0,
                time.monotonic() - started,
                estimated_seconds=round(estimate, 1),
                message=f"assuming {rate:,.0f} rows/s",
            )
    finally:
        engine.dispose()


def backfill(
    settings: Settings,
    job_names: Sequence[str] = (),
    options: BackfillOptions | None = None,
    progress: Progress | None = None,
    stop: threading.Event | None = None,
) -> BackfillResult:
    """Run (or with ``dry_run`` estimate) backfill jobs on every database hosting their table.

    Failures are captured per job and database; other databases go on.
    """
    options = options or BackfillOptions()
    names = list(job_names) or list(JOBS)
    for n in names:
        if n not in JOBS:
            raise UsageError(f"unknown backfill job {n!r} (jobs: {', '.join(JOBS)})")
    # The same preflight as upgrade, on every database a job runs on, before any job writes
    # anywhere (and before --max-runtime starts counting).
    tables = {JOBS[n].logical_table for n in names}
    check_databases(
        settings, [d for d in settings.database_names() if tables & set(settings.tables_on(d))]
    )
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
        try:
            if options.dry_run:
                return _dry_run(settings, db, job)
            return _Runner(settings, db, job, options, progress, stopper).run()
        except OauthmigError as exc:
            return JobRun(job.name, db.name, "failed", 0, 0, 0, 0.0, message=exc.message)
        except SQLAlchemyError as exc:
            return JobRun(
                job.name,
                db.name,
                "failed",
                0,
                0,
                0,
                0.0,
                message=f"database {db.name!r}: {describe_error(exc, db)}",
            )

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


# --------------------------------------------------------------------------- hooks
