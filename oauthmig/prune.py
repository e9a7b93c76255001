"""Delete expired authorization codes (grant rows) in short batches: ``oauthmig prune-grants``.

Since revision 0005 the models keep an exchanged code (marked ``consumed_at``) until it would
have expired, so that a replay is recognized and revokes what the code produced. Nothing else
removes those rows, nor the codes that were never exchanged; :func:`prune_grants` does, for a
library caller (an engine, connection or session) and for :func:`prune`, the service behind
the CLI (every configured database hosting the grant table).

A grant is deleted once ``expires_at`` is more than ``older_than`` in the past (default: as
soon as it has expired), consumed or not. Each batch is one short transaction and one
statement, ``DELETE ... WHERE id IN (SELECT id ... WHERE id > :after AND expires_at < :cutoff
ORDER BY id LIMIT :batch) RETURNING id``: a keyset walk over the primary key, never OFFSET and
never one long DELETE. On PostgreSQL each batch runs under ``SET LOCAL lock_timeout`` and
``statement_timeout`` and its subquery takes ``FOR UPDATE SKIP LOCKED``, so a row an exchange is
consuming right now is left for the next run instead of being waited for. A batch that cannot
get its lock in time (or deadlocks, or hits a busy SQLite database) is retried with jittered
exponential backoff; when retries run out, the run stops with what it deleted so far kept.
Deleting is idempotent: an interrupted run is simply run again.
"""

from __future__ import annotations

import contextlib
import math
import random
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import DateTime, case, column, delete, func, inspect, select, table, text
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import DBAPIError, SQLAlchemyError
from sqlalchemy.orm import Session

from oauthmig.config import DEFAULT_TABLES, Settings
from oauthmig.db import for_writing, make_engine, map_db_errors, open_database
from oauthmig.errors import DatabaseError, LockBusyError, LockTimeoutError, OauthmigError
from oauthmig.failures import FailureKind, classify
from oauthmig.pooler import transaction_pooled
from oauthmig.preflight import check_state
from oauthmig.privileges import Command
from oauthmig.revision_types import RevisionInfo
from oauthmig.runlock import RunLock, transaction_lock
from oauthmig.same_database import check_distinct

__all__ = [
    "DEFAULT_BATCH",
    "MAX_BATCH",
    "DatabasePrune",
    "PruneResult",
    "PruneStats",
    "prune",
    "prune_grants",
]

DEFAULT_BATCH = 1000
MAX_BATCH = 100_000
_RETRY_KINDS = (FailureKind.LOCK_TIMEOUT, FailureKind.DEADLOCK, FailureKind.SERIALIZATION)
_MAX_BACKOFF_SECONDS = 5.0

Bind = Engine | Connection | Session


@dataclass(frozen=True, slots=True)
class PruneStats:
    """What :func:`prune_grants` deleted (with ``dry_run``: would delete) on one database.

    ``consumed`` counts the exchanged codes among them and ``kept_consumed`` those kept for
    replay detection (both None without revision 0005's ``consumed_at``); ``kept`` is every
    grant left, live or consumed, that expires after ``cutoff``. ``batches`` counts the
    transactions that deleted rows (dry run: the batches it would take).
    """

    table: str
    cutoff: datetime
    batch: int
    deleted: int
    consumed: int | None
    batches: int
    kept: int
    kept_consumed: int | None
    retries: int
    seconds: float
    dry_run: bool


@contextlib.contextmanager
def _opened(bind: Bind) -> Iterator[Connection | Session]:
    if isinstance(bind, Engine):
        with for_writing(bind.connect()) as conn:
            yield conn
    else:
        yield bind


def _connection(work: Connection | Session) -> Connection:
    return work.connection() if isinstance(work, Session) else work


def _dialect(work: Connection | Session) -> str:
    return _connection(work).dialect.name


def _columns(work: Connection | Session, physical: str) -> set[str]:
    conn = work.connection() if isinstance(work, Session) else work
    insp = inspect(conn)
    if not insp.has_table(physical):
        raise DatabaseError(f"table {physical} does not exist on this database")
    found = {c["name"] for c in insp.get_columns(physical)}
    work.rollback()
    missing = {"id", "expires_at"} - found
    if missing:
        raise DatabaseError(
            f"table {physical} has no {', '.join(sorted(missing))} column; is it the grant table?"
        )
    return found


def _rollback(work: Connection | Session) -> None:
    """Roll back, also on the driver: a COMMIT that SQLite refused (``database is locked``)
    leaves its transaction open while SQLAlchemy already considers it over."""
    work.rollback()
    if isinstance(work, Connection) and not work.closed and not work.invalidated:
        raw = work.connection.driver_connection
        if raw is not None and getattr(raw, "in_transaction", False):
            raw.rollback()


def _retryable(exc: SQLAlchemyError) -> bool:
    return classify(exc) in _RETRY_KINDS


def _grant_table(physical: str, has_consumed: bool) -> Any:
    cols = [column("id"), column("expires_at", DateTime(timezone=True))]
    if has_consumed:
        cols.append(column("consumed_at", DateTime(timezone=True)))
    return table(physical, *cols)


def _set_timeouts(
    work: Connection | Session, lock_timeout_ms: int, statement_timeout_ms: int
) -> None:
    """PostgreSQL: bound the current transaction's lock waits and statements."""
    if _dialect(work) == "postgresql":
        work.execute(text(f"SET LOCAL lock_timeout = '{int(lock_timeout_ms)}ms'"))
        work.execute(text(f"SET LOCAL statement_timeout = '{int(statement_timeout_ms)}ms'"))


def _counts(
    work: Connection | Session, g: Any, where: Any, has_consumed: bool, timeouts: tuple[int, int]
) -> tuple[int, int | None]:
    """(rows, consumed rows or None) matching ``where``, in one short read."""
    try:
        _set_timeouts(work, *timeouts)
        if has_consumed:
            consumed = func.sum(case((g.c.consumed_at.is_not(None), 1), else_=0))
            row = work.execute(select(func.count(), consumed).select_from(g).where(where)).one()
            return int(row[0]), int(row[1] or 0)
        total = work.execute(select(func.count()).select_from(g).where(where)).scalar_one()
        return int(total), None
    finally:
        work.rollback()


def prune_grants(
    bind: Bind,
    *,
    table_name: str = DEFAULT_TABLES["grant"],
    batch: int = DEFAULT_BATCH,
    older_than: timedelta = timedelta(0),
    now: datetime | None = None,
    sleep: float = 0.0,
    lock_timeout_ms: int = 2000,
    statement_timeout_ms: int = 30000,
    max_retries: int = 8,
    dry_run: bool = False,
    on_batch: Callable[[int, int], None] | None = None,
    batch_lock: str | None = None,
) -> PruneStats:
    """Delete the grants of ``table_name`` that expired more than ``older_than`` before
    ``now`` (default: the current time), ``batch`` rows per transaction; see the module doc.

    ``bind`` is an engine (a connection is opened and closed), a connection or a session:
    both are **committed** after every batch, so pass one without unrelated pending work.
    ``sleep`` pauses between batches (seconds, for pacing on a busy primary). Retries a batch
    that hits ``lock_timeout`` (PostgreSQL), a deadlock or a busy SQLite file up to
    ``max_retries`` times, then raises LockTimeoutError (rows deleted so far stay deleted).
    ``on_batch(batches, deleted)`` is called after each batch. With ``dry_run`` nothing is
    written: the counts say what would be deleted and in how many batches. ``batch_lock``
    (PostgreSQL): every batch first waits, under ``lock_timeout``, for the transaction-scoped
    advisory lock of this purpose (a run lock that holds through a transaction pooler).
    """
    if not 1 <= batch <= MAX_BATCH:
        raise ValueError(f"batch must be between 1 and {MAX_BATCH}, got {batch!r}")
    if older_than < timedelta(0):
        raise ValueError("older_than must not be negative")
    if sleep < 0 or not math.isfinite(sleep):
        raise ValueError("sleep must be a finite number of seconds >= 0")
    at = datetime.now(UTC) if now is None else now
    if at.tzinfo is None:
        raise ValueError("now must be timezone-aware")
    cutoff = (at - older_than).astimezone(UTC)
    started = time.monotonic()
    with _opened(bind) as work:
        has_consumed = "consumed_at" in _columns(work, table_name)
        g = _grant_table(table_name, has_consumed)
        timeouts = (lock_timeout_ms, statement_timeout_ms)
        expired = g.c.expires_at < cutoff
        if dry_run:
            deleted, consumed = _counts(work, g, expired, has_consumed, timeouts)
            batches = math.ceil(deleted / batch)
            retries = 0
        else:
            deleted, consumed, batches, retries = _delete_batches(
                work,
                g,
                expired,
                has_consumed,
                batch=batch,
                sleep=sleep,
                lock_timeout_ms=lock_timeout_ms,
                statement_timeout_ms=statement_timeout_ms,
                max_retries=max_retries,
                on_batch=on_batch,
                batch_lock=batch_lock,
            )
        kept, kept_consumed = _counts(work, g, g.c.expires_at >= cutoff, has_consumed, timeouts)
    return PruneStats(
        table_name,
        cutoff,
        batch,
        deleted,
        consumed,
        batches,
        kept,
        kept_consumed,
        retries,
        time.monotonic() - started,
        dry_run,
    )


def _delete_batches(
    work: Connection | Session,
    g: Any,
    expired: Any,
    has_consumed: bool,
    *,
    batch: int,
    sleep: float,
    lock_timeout_ms: int,
    statement_timeout_ms: int,
    max_retries: int,
    on_batch: Callable[[int, int], None] | None,
    batch_lock: str | None = None,
) -> tuple[int, int | None, int, int]:
    postgres = _dialect(work) == "postgresql"
    deleted = batches = retries = 0
    consumed: int | None = 0 if has_consumed else None
    after: int | None = None
    while True:
        window = select(g.c.id).where(expired)
        if after is not None:
            window = window.where(g.c.id > after)
        window = window.order_by(g.c.id).limit(batch)
        if postgres:
            window = window.with_for_update(skip_locked=True)
        returning = [g.c.id] + ([g.c.consumed_at] if has_consumed else [])
        statement = delete(g).where(g.c.id.in_(window.scalar_subquery())).returning(*returning)
        attempt = 0
        while True:
            try:
                _set_timeouts(work, lock_timeout_ms, statement_timeout_ms)
                if batch_lock is not None and postgres:
                    transaction_lock(_connection(work), batch_lock)
                rows = work.execute(statement).all()
                work.commit()
                break
            except DBAPIError as exc:
                _rollback(work)
                if not _retryable(exc) or attempt >= max_retries:
                    if _retryable(exc):
                        raise LockTimeoutError(
                            f"{g.name}: a batch could not get its locks within lock_timeout "
                            f"{int(lock_timeout_ms)}ms after {attempt + 1} attempts; "
                            f"{deleted:,} expired grants were deleted before it; rerun later"
                        ) from None
                    raise
                attempt += 1
                retries += 1
                time.sleep(min(_MAX_BACKOFF_SECONDS, 0.05 * 2**attempt) * random.uniform(0.5, 1))
            except BaseException:
                _rollback(work)
                raise
        if not rows:
            return deleted, consumed, batches, retries
        batches += 1
        deleted += len(rows)
        if consumed is not None:
            consumed += sum(1 for row in rows if row[1] is not None)
        after = max(int(row[0]) for row in rows)
        if on_batch is not None:
            on_batch(batches, deleted)
        if len(rows) < batch:
            return deleted, consumed, batches, retries
        if sleep:
            time.sleep(sleep)


# --------------------------------------------------------------------------- service


@dataclass(frozen=True, slots=True)
class DatabasePrune:
    """The outcome on one database hosting the grant table: stats, or the one-line error."""

    database: str
    stats: PruneStats | None
    error: str | None = None


@dataclass(frozen=True, slots=True)
class PruneResult:
    """``oauthmig prune-grants``: one entry per database hosting the grant table."""

    dry_run: bool
    older_than: timedelta
    batch: int
    databases: tuple[DatabasePrune, ...]

    @property
    def failed(self) -> tuple[DatabasePrune, ...]:
        """The databases where pruning failed."""
        return tuple(d for d in self.databases if d.error is not None)


def prune(
    settings: Settings,
    *,
    batch: int = DEFAULT_BATCH,
    older_than: timedelta = timedelta(0),
    dry_run: bool = False,
    sleep: float | None = None,
    now: datetime | None = None,
    revisions: Sequence[RevisionInfo] = (),
) -> PruneResult:
    """Prune expired grants on every selected database hosting the grant table, one after
    another. Each database is checked as ``upgrade`` checks it first, and holds the
    ``prune-grants`` run lock (one run per database): on ``direct_url`` when the database has
    one; through a transaction pooler without one, each batch takes it for its transaction
    instead (:func:`_run_lock`). A failure on one is recorded and the others go on. ``sleep``
    defaults to ``[backfill] sleep_seconds``. ``revisions`` is the
    revision catalogue the check compares each database with (the caller reads it:
    :class:`oauthmig.rollout.revisions.Catalogue`, which this module does not import, so that
    code inside the OAuth server can call :func:`prune_grants` without loading Alembic).
    """
    hosting = [n for n in settings.database_names() if "grant" in settings.tables_on(n)]
    check_distinct(settings)
    pause = settings.backfill.sleep_seconds if sleep is None else sleep
    at = datetime.now(UTC) if now is None else now
    outcomes: list[DatabasePrune] = []
    for name in hosting:
        db = settings.databases[name]
        try:
            with map_db_errors(db, "prune-grants failed"), open_database(settings, db) as conn:
                check_state(conn, settings, db, revisions, Command.PRUNE_GRANTS)
                if conn.in_transaction():
                    conn.rollback()
                lock: contextlib.AbstractContextManager[str | None] = (
                    contextlib.nullcontext(None) if dry_run else _run_lock(settings, conn, name)
                )
                with lock as batch_lock:
                    stats = prune_grants(
                        for_writing(conn),
                        table_name=settings.tables.grant,
                        batch=batch,
                        older_than=older_than,
                        now=at,
                        sleep=pause,
                        lock_timeout_ms=settings.migrate.lock_timeout_ms,
                        statement_timeout_ms=settings.migrate.statement_timeout_ms,
                        max_retries=settings.migrate.lock_retries,
                        dry_run=dry_run,
                        batch_lock=batch_lock,
                    )
        except OauthmigError as exc:
            message = exc.message
            if not message.startswith("database "):
                message = f"database {name!r}: {message}"
            outcomes.append(DatabasePrune(name, None, message))
            continue
        outcomes.append(DatabasePrune(name, stats))
    return PruneResult(dry_run, older_than, batch, tuple(outcomes))


@contextlib.contextmanager
def _run_lock(settings: Settings, conn: Connection, name: str) -> Iterator[str | None]:
    """The ``prune-grants`` run lock of database ``name`` (``conn`` is on its ``url``); yields
    the purpose each batch must lock for its transaction, or None when the lock is held for
    the run: on ``conn`` itself (SQLite, or a direct PostgreSQL connection), or on a session
    of its own on ``direct_url``. Through a transaction pooler without ``direct_url`` a session
    lock would stay behind on a pooled server session: each batch takes it instead."""
    db = settings.databases[name]
    lock = RunLock("prune-grants", name)
    if conn.dialect.name != "postgresql":
        with lock.hold(conn):
            yield None
        return
    if db.has_direct:
        engine = make_engine(db, settings, direct=True)
        try:
            with engine.connect() as session, lock.hold(session):
                yield None
        finally:
            engine.dispose()
        return
    if not transaction_pooled(conn.engine):
        with lock.hold(conn):
            yield None
        return
    if lock.alive(conn):
        raise LockBusyError(lock.busy_message(conn))
    yield lock.purpose
