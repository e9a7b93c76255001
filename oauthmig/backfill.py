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
* one run per job and database (advisory lock on PostgreSQL, ``flock`` on SQLite);
* transient errors (deadlock, serialization failure, lock timeout, lost connection) are
  retried with jittered backoff; a persistent failure marks the job ``failed`` and raises.

The token family id of a legacy token is :func:`family_id` ``(table, id)``: UUIDv3 (RFC 4122
§4.3, MD5) of ``"<table>:<id>"`` in :data:`FAMILY_NAMESPACE`. PostgreSQL computes it in SQL
with ``md5()``; SQLite calls the same Python function registered on the connection.
"""

from __future__ import annotations

import contextlib
import functools
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
    BigInteger,
    Column,
    DateTime,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    and_,
    bindparam,
    column,
    func,
    inspect,
    or_,
    select,
    table,
    text,
    update,
)
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import DBAPIError, SQLAlchemyError
from sqlalchemy.sql.elements import ColumnElement

from oauthmig.config import BackfillSettings, DatabaseConfig, Settings
from oauthmig.db import (
    connect,
    describe_error,
    exclusive_run,
    for_writing,
    lock_key,
    make_engine,
)
from oauthmig.errors import BackfillError, OauthmigError, UsageError
from oauthmig.migrations import BACKFILL_GATES, check_routed_tables
from oauthmig.redirect_rules import infer_app_type, split_redirect_uris
from oauthmig.status import BACKFILL_STATUS, JobState
from oauthmig.types import StringList

JOB_TABLE = "oauthmig_backfill_job"
FAMILY_NAMESPACE = uuid.UUID("6f1c1d1e-8a34-4c55-9b6e-0a7e5d1f2c3b")
MIN_BATCH, MAX_BATCH = 10, 200_000
MAX_TRANSIENT_RETRIES = 10
_SQLITE_FAMILY_FN = "oauthmig_family_id"
_SQLITE_APP_TYPE_FN = "oauthmig_app_type"

_md = MetaData()
job_table = Table(
    JOB_TABLE,
    _md,
    Column("job", String(64), primary_key=True),
    Column("table_name", String(63), nullable=False),
    Column("status", String(16), nullable=False),  # running | paused | finished | failed
    Column("phase", String(16), nullable=False),  # main | catchup | done
    Column("cursor", BigInteger, nullable=False),
    Column("upper_bound", BigInteger, nullable=False),
    Column("rows_done", BigInteger, nullable=False),
    Column("rows_total", BigInteger, nullable=False),
    Column("batches", Integer, nullable=False),
    Column("batch_size", Integer, nullable=False),
    Column("attempts", Integer, nullable=False),
    Column("last_error", Text, nullable=True),
    Column("started_at", DateTime(timezone=True), nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False),
    Column("finished_at", DateTime(timezone=True), nullable=True),
)


def family_id(table_name: str, row_id: int) -> uuid.UUID:
    """The deterministic family id of legacy token ``row_id`` in ``table_name``.

    UUIDv3 of ``"<table>:<id>"`` in :data:`FAMILY_NAMESPACE`: one family per legacy token,
    because legacy refreshes rewrote rows in place and kept no lineage.
    """
    return uuid.uuid3(FAMILY_NAMESPACE, f"{table_name}:{row_id}")


def _pg_family_sql(table_name: str) -> str:
    # UUIDv3 in SQL: md5(namespace bytes || name), then version nibble 3 (hex digit 13) and
    # variant 10xx (hex digit 17: d -> (d & 3) | 8, done by translate). md5 is written twice.
    ns = FAMILY_NAMESPACE.hex
    h = f"md5(decode('{ns}', 'hex') || convert_to('{table_name}:' || id::text, 'UTF8'))"
    return (
        f"overlay(overlay({h} placing '3' from 13 for 1) placing "
        f"translate(substr({h}, 17, 1), '0123456789abcdef', '89ab89ab89ab89ab') "
        "from 17 for 1)::uuid"
    )


# --------------------------------------------------------------------------- jobs


@dataclass(frozen=True, slots=True)
class BatchContext:
    """What a job's batch function needs."""

    conn: Connection
    physical: str
    settings: Settings


@dataclass(frozen=True, slots=True)
class Job:
    """A backfill job over one logical table."""

    name: str
    logical_table: str
    description: str
    columns: tuple[str, ...]
    table: Callable[[str], Any]  # physical name -> lightweight table with the job's columns
    pending: Callable[[Any], ColumnElement[bool]]
    run_batch: Callable[[BatchContext, int, int], int]


def _token_table(physical: str) -> Any:
    return table(physical, column("id"), column("refresh_token"), column("token_family_id"))


def _token_pending(t: Any) -> ColumnElement[bool]:
    return and_(t.c.refresh_token.is_not(None), t.c.token_family_id.is_(None))


def _token_batch(ctx: BatchContext, lo: int, hi: int) -> int:
    t = _token_table(ctx.physical)
    where = and_(t.c.id > lo, t.c.id <= hi, _token_pending(t))
    if ctx.conn.dialect.name == "postgresql":
        value: Any = text(_pg_family_sql(ctx.physical))
    else:
        value = getattr(func, _SQLITE_FAMILY_FN)(ctx.physical, t.c.id)
    result = ctx.conn.execute(update(t).where(where).values(token_family_id=value))
    return int(result.rowcount)


def _app_table(physical: str) -> Any:
    return table(
        physical,
        column("id"),
        column("client_secret"),
        column("redirect_uris"),
        column("token_endpoint_auth_method"),
        column("grant_types", StringList()),
        column("response_types", StringList()),
        column("application_type"),
    )


def _app_pending(t: Any) -> ColumnElement[bool]:
    return or_(
        t.c.token_endpoint_auth_method.is_(None),
        t.c.grant_types.is_(None),
        t.c.response_types.is_(None),
        t.c.application_type.is_(None),
    )


def infer_application_type(redirect_uris: str | None) -> str:
    """``native`` when the stored redirect URIs are native-style, else ``web`` (DESIGN §5).

    The same inference ``audit-redirects`` uses (:func:`redirect_rules.infer_app_type`).
    """
    return str(infer_app_type(split_redirect_uris(redirect_uris)))


def _app_batch(ctx: BatchContext, lo: int, hi: int) -> int:
    t = _app_table(ctx.physical)
    cm = ctx.settings.backfill.client_metadata
    where = and_(t.c.id > lo, t.c.id <= hi, _app_pending(t))
    # The app type needs the redirect rules (Python); the ids and URIs of one batch are read,
    # classified, and written back in one statement per type: no per-row round trips.
    rows = ctx.conn.execute(
        select(t.c.id, t.c.redirect_uris, t.c.application_type).where(where)
    ).all()
    by_type: dict[str, list[int]] = {"web": [], "native": []}
    for row in rows:
        by_type[infer_application_type(row.redirect_uris)].append(int(row.id))
    changed = 0
    for app_type, ids in by_type.items():
        if not ids:
            continue
        stmt = (
            update(t)
            .where(and_(where, t.c.id.in_(bindparam("ids", expanding=True))))
            .values(
                token_endpoint_auth_method=func.coalesce(
                    t.c.token_endpoint_auth_method,
                    text(
                        f"CASE WHEN client_secret IS NULL OR client_secret = '' THEN 'none' "
                        f"ELSE '{cm.confidential_auth_method}' END"
                    ),
                ),
                grant_types=func.coalesce(
                    t.c.grant_types, bindparam("gt", list(cm.grant_types), StringList())
                ),
                response_types=func.coalesce(
                    t.c.response_types, bindparam("rt", list(cm.response_types), StringList())
                ),
                application_type=func.coalesce(t.c.application_type, app_type),
            )
        )
        changed += int(ctx.conn.execute(stmt, {"ids": ids}).rowcount)
    return changed


JOBS: dict[str, Job] = {
    "token-families": Job(
        "token-families",
        "token",
        "token_family_id for every legacy token with a refresh token (one family per token)",
        ("token_family_id", "refresh_token"),
        _token_table,
        _token_pending,
        _token_batch,
    ),
    "client-metadata": Job(
        "client-metadata",
        "application",
        "token_endpoint_auth_method, grant_types, response_types, application_type",
        ("token_endpoint_auth_method", "grant_types", "response_types", "application_type"),
        _app_table,
        _app_pending,
        _app_batch,
    ),
}


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


def _txn(conn: Connection) -> Any:
    """A new transaction, ending the implicit one a preceding read may have begun."""
    if conn.in_transaction():
        conn.commit()
    return conn.begin()


def _register_sqlite_functions(conn: Connection) -> None:
    if conn.dialect.name != "sqlite":
        return
    raw = conn.connection.driver_connection
    assert raw is not None

    def fam(table_name: str, row_id: int) -> str:
        return family_id(table_name, int(row_id)).hex

    raw.create_function(_SQLITE_FAMILY_FN, 2, fam, deterministic=True)


def _has_columns(conn: Connection, physical: str, names: Sequence[str]) -> bool:
    insp = inspect(conn)
    have = {c["name"] for c in insp.get_columns(physical)} if insp.has_table(physical) else set()
    if conn.in_transaction():
        conn.rollback()
    return all(n in have for n in names)


def remaining_rows(conn: Connection, settings: Settings, database: str, job: Job) -> int:
    """Rows of ``job`` still to backfill on ``database``.

    0 where its table is not routed there; -1 while the table lacks the job's columns (the
    expand revision has not run, so neither can the backfill).
    """
    if job.logical_table not in settings.tables_on(database):
        return 0
    physical = settings.tables.physical(job.logical_table)
    if not _has_columns(conn, physical, job.columns):
        return -1
    t = job.table(physical)
    n = conn.execute(select(func.count()).select_from(t).where(job.pending(t))).scalar_one()
    if conn.in_transaction():
        conn.rollback()
    return int(n)


def _read_job(conn: Connection, name: str) -> dict[str, Any] | None:
    if not inspect(conn).has_table(JOB_TABLE):
        return None
    row = conn.execute(select(job_table).where(job_table.c.job == name)).mappings().first()
    if conn.in_transaction():
        conn.rollback()
    return dict(row) if row else None


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


def _transient(exc: DBAPIError) -> bool:
    if exc.connection_invalidated:
        return True
    sqlstate = getattr(exc.orig, "sqlstate", None)
    if sqlstate in ("40P01", "40001", "55P03", "57P01", "08006", "08003", "08000"):
        return True
    return "database is locked" in str(exc.orig)


def _is_statement_timeout(exc: DBAPIError) -> bool:
    return getattr(exc.orig, "sqlstate", None) == "57014"


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

    def run(self) -> JobRun:
        started = time.monotonic()
        engine = make_engine(self.db, self.settings)
        try:
            with (
                connect(engine, self.db) as lock_conn,
                exclusive_run(lock_conn, self.db, f"backfill {self.job.name}"),
            ):
                return self._run(engine, started)
        finally:
            engine.dispose()

    def _connect(self, engine: Engine) -> Connection:
        conn = for_writing(engine.connect())
        _register_sqlite_functions(conn)
        if conn.dialect.name == "postgresql":
            m = self.settings.migrate
            conn.execute(text(f"SET lock_timeout = '{int(m.lock_timeout_ms)}ms'"))
            conn.execute(text(f"SET statement_timeout = '{int(m.statement_timeout_ms)}ms'"))
            conn.commit()
        return conn

    def _run(self, engine: Engine, started: float) -> JobRun:
        job, db, bf = self.job, self.db, self.settings.backfill
        physical = self.settings.tables.physical(job.logical_table)
        conn = self._connect(engine)
        try:
            # A missing table is fixed in the config or the database, not by an upgrade.
            check_routed_tables(conn, self.settings, db.name)
            remaining = remaining_rows(conn, self.settings, db.name, job)
            if remaining < 0:
                raise BackfillError(
                    f"database {db.name!r}: {physical} lacks the columns of job {job.name!r}; "
                    "run `oauthmig upgrade` first"
                )
            with _txn(conn):
                if conn.dialect.name == "postgresql":
                    # Jobs of one database may start together (--jobs): serialize the CREATE.
                    conn.execute(
                        text("SELECT pg_advisory_xact_lock(:k)"), {"k": lock_key("backfill-schema")}
                    )
                _md.create_all(conn, checkfirst=True)
            state = _read_job(conn, job.name)
            now = datetime.now(UTC)
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
                }
                with _txn(conn):
                    conn.execute(job_table.delete().where(job_table.c.job == job.name))
                    conn.execute(job_table.insert().values(**state))
            else:
                if self.options.batch_size:
                    state["batch_size"] = self.options.batch_size
                # Resuming: what is left is what was done plus what remains.
                state["rows_total"] = int(state["rows_done"]) + remaining
                state["status"] = "running"
                with _txn(conn):
                    self._persist(conn, state)
            conn = self._loop(engine, conn, physical, state, started)
            return self._result(state, started)
        except KeyboardInterrupt:
            self._mark(engine, status="paused")
            raise
        finally:
            with contextlib.suppress(SQLAlchemyError):
                conn.close()

    def _mark(self, engine: Engine, **values: Any) -> None:
        """Record a final state on a fresh connection (the work connection may be broken)."""
        with contextlib.suppress(SQLAlchemyError), engine.begin() as c:
            c.execute(
                job_table.update()
                .where(job_table.c.job == self.job.name)
                .values(updated_at=datetime.now(UTC), **values)
            )

    def _persist(self, conn: Connection, state: dict[str, Any]) -> None:
        """Write the job's progress columns from ``state`` (inside the caller's transaction)."""
        state["updated_at"] = datetime.now(UTC)
        conn.execute(
            job_table.update()
            .where(job_table.c.job == self.job.name)
            .values({name: state[name] for name in _PROGRESS_COLUMNS})
        )

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
        label = f"{self.db.name} {self.job.name}"
        while True:
            if self.stop.should_stop():
                self._save(conn, state, "paused")
                return conn
            bound = int(state["upper_bound"])
            lo = int(state["cursor"])
            try:
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
                with _txn(conn):
                    n = self.job.run_batch(BatchContext(conn, physical, self.settings), lo, hi)
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
                size = adapt_batch_size(size, elapsed, target)
                if self.progress:
                    self.progress(
                        label,
                        int(state["rows_done"]),
                        max(int(state["rows_total"]), int(state["rows_done"])),
                    )
                if sleep_s > 0:
                    self.sleep(sleep_s)
            except DBAPIError as exc:
                with contextlib.suppress(SQLAlchemyError):
                    conn.rollback()
                if _is_statement_timeout(exc):
                    size = max(MIN_BATCH, size // 2)
                if (
                    _is_statement_timeout(exc) or _transient(exc)
                ) and failures < MAX_TRANSIENT_RETRIES:
                    failures += 1
                    state["attempts"] = int(state["attempts"]) + 1
                    if exc.connection_invalidated or conn.invalidated or conn.closed:
                        with contextlib.suppress(SQLAlchemyError):
                            conn.close()
                        self.sleep(min(5.0, 0.1 * 2**failures) * random.uniform(0.5, 1.0))
                        conn = self._connect(engine)
                    else:
                        self.sleep(min(5.0, 0.05 * 2**failures) * random.uniform(0.5, 1.0))
                    continue
                message = describe_error(exc, self.db)
                # The failed attempt counts too: the stored count is what the message says
                # for this run.
                state["attempts"] = int(state["attempts"]) + 1
                self._mark(
                    engine, status="failed", last_error=message[:2000], attempts=state["attempts"]
                )
                tries = failures + 1
                raise BackfillError(
                    f"database {self.db.name!r}: backfill {self.job.name} failed at id > {lo} "
                    f"after {tries} attempt{'s' if tries != 1 else ''}: {message}; "
                    "state saved, rerun to resume"
                ) from None

    def _save(self, conn: Connection, state: dict[str, Any], status: str) -> None:
        state["status"] = status
        if status == "finished":
            state["last_error"] = None
        with _txn(conn):
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
            state = _read_job(conn, job.name)
            rate: float | None = None
            if state and state["rows_done"] and state["finished_at"] and state["started_at"]:
                spent = (state["finished_at"] - state["started_at"]).total_seconds()
                rate = state["rows_done"] / spent if spent > 0 else None
            if rate is None:
                # No history on this database: assume one target-length batch per batch_size.
                rate = settings.backfill.batch_size / settings.backfill.target_batch_seconds
            estimate = n / rate + settings.backfill.sleep_seconds * (
                n / settings.backfill.batch_size
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


def job_states(conn: Connection, settings: Settings, database: str) -> list[JobState]:
    """Per-job state on one database, for ``status``."""
    out: list[JobState] = []
    for job in JOBS.values():
        if job.logical_table not in settings.tables_on(database):
            continue
        remaining = remaining_rows(conn, settings, database, job)
        if remaining < 0:
            out.append(JobState(job.name, "waiting for upgrade", 0, None, None))
            continue
        state = _read_job(conn, job.name)
        if state is None:
            out.append(
                JobState(
                    job.name,
                    "finished" if remaining == 0 else "not started",
                    0,
                    remaining,
                    remaining,
                )
            )
            continue
        status = str(state["status"])
        if status == "finished" and remaining > 0:
            status = "stale"  # rows needing the backfill appeared after it finished
        out.append(
            JobState(
                job.name,
                status,
                int(state["rows_done"]),
                int(state["rows_total"]),
                remaining,
                state["last_error"],
            )
        )
    return out


for _job in JOBS.values():
    BACKFILL_GATES[_job.name] = functools.partial(remaining_rows, job=_job)
BACKFILL_STATUS.append(job_states)
