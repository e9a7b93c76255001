"""The batch history of backfill jobs: one row per batch in ``oauthmig_backfill_batch``.

Every database that runs a backfill keeps the record of its own batches, next to the job table:

* a **committed** row per batch (job, run, id range ``(lo, hi]``, rows changed, seconds up to
  the commit, attempts it took, start and end time), inserted in the batch's own transaction:
  the row exists if and only if the batch committed, whatever happened to the process;
* a **failed** row per failed attempt (its range, the attempt's error class: the SQLSTATE and
  the driver's exception class, never an error text, a parameter or row data), written after
  the rollback in its own short transaction. When that is impossible (the connection is gone,
  or SQLite's write lock is what failed) it is written with the next committed batch;
* a **summary** row per job: the record is bounded to the last ``[backfill] keep_batches``
  rows per job. Every :data:`PRUNE_EVERY` committed batches, inside that batch's transaction,
  at most :data:`PRUNE_STEP` of the oldest rows beyond the limit are folded into the summary
  row (batches, rows, range, seconds, attempts, first start, last end) and deleted, so the
  table stays within ``keep_batches + PRUNE_EVERY + 1`` rows per job and its totals still
  add up to the job's: ``sum(batches)`` of committed and summary rows is the job's batch
  count, ``sum(rows_changed)`` its rows done, ``max(hi)`` its cursor.

A job that starts over (``--restart``, new column generation, a new pass after it finished)
starts a new record: its rows are deleted in the transaction that resets the job row.

Rate, ETA and batch-time percentiles (:func:`batch_stats`) come from this table: p50/p99 over
the batches still recorded one by one, the rate over the wall time of the latest run (pauses
between batches included: the pace the job really keeps), the ETA from that rate.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    BigInteger,
    Column,
    DateTime,
    Float,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    delete,
    func,
    insert,
    inspect,
    null,
    select,
    text,
    update,
)
from sqlalchemy.engine import Connection
from sqlalchemy.exc import SQLAlchemyError

from oauthmig.failures import sqlstate
from oauthmig.runlock import transaction_lock

BATCH_TABLE = "oauthmig_backfill_batch"

PRUNE_EVERY = 20  # committed batches between two prunes of the record
PRUNE_STEP = 200  # most rows one prune folds into the summary and deletes

COMMITTED, FAILED, SUMMARY = "committed", "failed", "summary"

_md = MetaData()

batch_table = Table(
    BATCH_TABLE,
    _md,
    Column("id", BigInteger().with_variant(Integer, "sqlite"), primary_key=True),
    Column("job", String(64), nullable=False),
    Column("run_id", String(32), nullable=True),  # the run's owner token (job table "owner")
    Column("outcome", String(16), nullable=False),  # committed | failed | summary
    Column("lo", BigInteger, nullable=True),
    Column("hi", BigInteger, nullable=True),
    Column("batches", Integer, nullable=False),  # 1; a summary row: the batches it stands for
    Column("rows_changed", BigInteger, nullable=False),
    Column("seconds", Float, nullable=False),
    Column("attempts", Integer, nullable=False),
    Column("error_class", String(64), nullable=True),
    Column("started_at", DateTime(timezone=True), nullable=False),
    Column("finished_at", DateTime(timezone=True), nullable=False),
    # Latency pacing's pace for the batch (1: full speed); NULL: pacing off (added by issue 24:
    # ensure_batch_table adds it to older tables).
    Column("pace", Float, nullable=True),
    Index("ix_oauthmig_backfill_batch_job", "job", "id"),
)


@dataclass(frozen=True, slots=True)
class BatchRow:
    """One row of the batch history."""

    outcome: str
    lo: int | None
    hi: int | None
    batches: int
    rows_changed: int
    seconds: float
    attempts: int
    error_class: str | None
    started_at: datetime
    finished_at: datetime
    pace: float | None = None  # latency pacing's pace for a committed batch; None: off


@dataclass(frozen=True, slots=True)
class BatchStats:
    """What the batch history says about one job on one database."""

    batches: int  # committed batches of the job's current record, summarized ones included
    recorded: int  # committed batches still recorded one by one (the p50/p99 window)
    rows_changed: int
    failed_attempts: int  # failed attempts still recorded
    p50_seconds: float | None
    p99_seconds: float | None
    rows_per_second: float | None  # over the latest run's wall time, pauses included
    eta_seconds: float | None  # rows remaining at that rate (0 when none remain)
    last_batch_at: datetime | None
    errors: tuple[tuple[str, int], ...] = ()  # (error class, failed attempts), most first


def error_class(exc: BaseException) -> str:
    """The sanitized class of a batch error: SQLSTATE (or SQLite error name) and the driver's
    exception class, e.g. ``55P03 LockNotAvailable``; never message text."""
    orig = getattr(exc, "orig", None) or exc
    code = sqlstate(exc) or getattr(orig, "sqlite_errorname", None)
    name = type(orig).__name__
    return (f"{code} {name}" if code else name)[:64]


def ensure_batch_table(conn: Connection) -> None:
    """Create the batch table if it does not exist (in its own transaction)."""
    if conn.in_transaction():
        conn.commit()
    with conn.begin():
        transaction_lock(conn, "backfill-schema")  # jobs may start together (--jobs)
        _md.create_all(conn, checkfirst=True)
        if "pace" not in {c["name"] for c in inspect(conn).get_columns(BATCH_TABLE)}:
            kind = "double precision" if conn.dialect.name == "postgresql" else "REAL"
            conn.execute(text(f"ALTER TABLE {BATCH_TABLE} ADD COLUMN pace {kind}"))


def has_batch_table(conn: Connection) -> bool:
    """Whether this database has a batch history at all (read-only callers)."""
    found = inspect(conn).has_table(BATCH_TABLE)
    if conn.in_transaction():
        conn.rollback()
    return bool(found)


def reset_history(conn: Connection, job: str) -> None:
    """Forget the record of ``job`` (inside the caller's transaction: a job starting over)."""
    conn.execute(delete(batch_table).where(batch_table.c.job == job))


@dataclass
class BatchLog:
    """Writes the history of one run of one job; see the module docstring for the rules."""

    job: str
    run_id: str
    keep: int
    tries: int = 0  # failed attempts since the last committed batch
    deferred: list[dict[str, Any]] = field(default_factory=list)
    since_prune: int = 0
    pace: float | None = None  # the pace the next batches run at (latency pacing)

    def committed(
        self, conn: Connection, lo: int, hi: int, rows: int, seconds: float, started: datetime
    ) -> None:
        """Record a batch inside its own transaction (so the row commits with the batch)."""
        row = self._row(COMMITTED, lo, hi, started, rows=rows, seconds=seconds)
        row["attempts"] = self.tries + 1
        conn.execute(insert(batch_table), [*self.deferred, row])
        self.deferred.clear()
        self.tries = 0
        self.since_prune += 1
        if self.since_prune >= min(PRUNE_EVERY, self.keep):
            self.since_prune = 0
            prune(conn, self.job, self.keep)

    def failed(
        self,
        conn: Connection | None,
        lo: int,
        hi: int | None,
        error: str,
        started: datetime,
    ) -> None:
        """Record a failed attempt after its rollback, in a short transaction of its own.

        With no usable connection (``None``) the row waits for the next committed batch.
        """
        self.tries += 1
        row = self._row(FAILED, lo, hi, started, error=error)
        if conn is None or error.startswith("SQLITE_BUSY"):
            self.deferred.append(row)
            return
        try:
            if conn.in_transaction():
                conn.rollback()
            with conn.begin():
                conn.execute(insert(batch_table), [*self.deferred, row])
            self.deferred.clear()
        except SQLAlchemyError:
            with contextlib.suppress(SQLAlchemyError):
                conn.rollback()
            self.deferred.append(row)

    def _row(
        self,
        outcome: str,
        lo: int,
        hi: int | None,
        started: datetime,
        *,
        rows: int = 0,
        seconds: float | None = None,
        error: str | None = None,
    ) -> dict[str, Any]:
        now = datetime.now(UTC)
        return {
            "job": self.job,
            "run_id": self.run_id,
            "outcome": outcome,
            "lo": lo,
            "hi": hi,
            "batches": 1 if outcome == COMMITTED else 0,
            "rows_changed": rows,
            "seconds": (now - started).total_seconds() if seconds is None else seconds,
            "attempts": 1,
            "error_class": error,
            "pace": self.pace if outcome == COMMITTED else None,
            "started_at": started,
            "finished_at": now,
        }


def prune(conn: Connection, job: str, keep: int) -> int:
    """Fold the oldest rows of ``job`` beyond the newest ``keep`` into its summary row and
    delete them, at most :data:`PRUNE_STEP` per call (inside the caller's transaction).
    Returns how many rows were removed."""
    b = batch_table.c
    detail = (b.job == job) & (b.outcome != SUMMARY)
    newest_kept = conn.execute(
        select(b.id).where(detail).order_by(b.id.desc()).limit(1).offset(keep - 1)
    ).scalar()
    if newest_kept is None:
        return 0
    step_end = conn.execute(
        select(b.id).where(detail).order_by(b.id).limit(1).offset(PRUNE_STEP)
    ).scalar()
    cutoff = int(newest_kept) if step_end is None else min(int(newest_kept), int(step_end))
    old = detail & (b.id < cutoff)
    agg = conn.execute(
        select(
            func.count(),
            func.coalesce(func.sum(b.batches), 0),
            func.coalesce(func.sum(b.rows_changed), 0),
            func.min(b.lo),
            func.max(b.hi),
            func.coalesce(func.sum(b.seconds), 0.0),
            func.coalesce(func.sum(b.attempts), 0),
            func.min(b.started_at),
            func.max(b.finished_at),
        ).where(old, b.outcome == COMMITTED)
    ).one()
    removed = int(conn.execute(delete(batch_table).where(old)).rowcount)
    if not agg[0]:
        return removed  # only failed attempts were old: their retries are counted already
    summary = (
        conn.execute(select(batch_table).where(b.job == job, b.outcome == SUMMARY))
        .mappings()
        .first()
    )
    if summary is None:
        conn.execute(
            insert(batch_table).values(
                job=job,
                run_id=None,
                outcome=SUMMARY,
                lo=agg[3],
                hi=agg[4],
                batches=int(agg[1]),
                rows_changed=int(agg[2]),
                seconds=float(agg[5]),
                attempts=int(agg[6]),
                error_class=None,
                started_at=agg[7],
                finished_at=agg[8],
            )
        )
        return removed
    conn.execute(
        update(batch_table)
        .where(b.id == summary["id"])
        .values(
            lo=_least(summary["lo"], agg[3]),
            hi=max(int(summary["hi"] or 0), int(agg[4] or 0)),
            batches=int(summary["batches"]) + int(agg[1]),
            rows_changed=int(summary["rows_changed"]) + int(agg[2]),
            seconds=float(summary["seconds"]) + float(agg[5]),
            attempts=int(summary["attempts"]) + int(agg[6]),
            started_at=min(as_utc(summary["started_at"]), as_utc(agg[7])),
            finished_at=max(as_utc(summary["finished_at"]), as_utc(agg[8])),
        )
    )
    return removed


def _least(a: int | None, b: int | None) -> int | None:
    values = [int(v) for v in (a, b) if v is not None]
    return min(values) if values else None


def as_utc(value: datetime) -> datetime:
    """Timestamps read back from SQLite are naive; every timestamp oauthmig writes is UTC."""
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


def _to_row(r: Any) -> BatchRow:
    return BatchRow(
        str(r.outcome),
        None if r.lo is None else int(r.lo),
        None if r.hi is None else int(r.hi),
        int(r.batches),
        int(r.rows_changed),
        float(r.seconds),
        int(r.attempts),
        r.error_class,
        as_utc(r.started_at),
        as_utc(r.finished_at),
        None if r.pace is None else float(r.pace),
    )


def read_history(conn: Connection, job: str) -> tuple[list[BatchRow], list[str | None]]:
    """Every row of ``job``'s record, oldest first, and the run each row belongs to."""
    b = batch_table.c
    # A table from before issue 24 has no pace column until the next backfill adds it.
    paced = "pace" in {c["name"] for c in inspect(conn).get_columns(BATCH_TABLE)}
    result = conn.execute(
        select(
            b.pace if paced else null().label("pace"),
            b.outcome,
            b.run_id,
            b.lo,
            b.hi,
            b.batches,
            b.rows_changed,
            b.seconds,
            b.attempts,
            b.error_class,
            b.started_at,
            b.finished_at,
        )
        .where(b.job == job)
        .order_by(b.id)
    ).all()
    if conn.in_transaction():
        conn.rollback()
    return [_to_row(r) for r in result], [r.run_id for r in result]


def percentile(values: Sequence[float], q: float) -> float | None:
    """The q-quantile (0..1) of ``values`` by nearest rank; ``None`` for none."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def summarize(
    rows: Sequence[BatchRow], runs: Sequence[str | None], remaining: int | None
) -> BatchStats | None:
    """Stats of one job's record (see the module docstring); ``None`` for an empty record."""
    if not rows:
        return None
    committed = [(r, run) for r, run in zip(rows, runs, strict=True) if r.outcome == COMMITTED]
    counted = [r for r in rows if r.outcome in (COMMITTED, SUMMARY)]
    failed = [r for r in rows if r.outcome == FAILED]
    rate: float | None = None
    if committed:
        latest = committed[-1][1]
        mine = [r for r, run in committed if run == latest]
        span = (mine[-1].finished_at - mine[0].started_at).total_seconds()
        if span > 0:
            rate = sum(r.rows_changed for r in mine) / span
    eta: float | None = None
    if remaining == 0:
        eta = 0.0
    elif remaining is not None and remaining > 0 and rate:
        eta = remaining / rate
    errors: dict[str, int] = {}
    for r in failed:
        key = r.error_class or "unknown"
        errors[key] = errors.get(key, 0) + 1
    durations = [r.seconds for r, _ in committed]
    p50, p99 = percentile(durations, 0.5), percentile(durations, 0.99)
    return BatchStats(
        batches=sum(r.batches for r in counted),
        recorded=len(committed),
        rows_changed=sum(r.rows_changed for r in counted),
        failed_attempts=len(failed),
        p50_seconds=None if p50 is None else round(p50, 6),
        p99_seconds=None if p99 is None else round(p99, 6),
        rows_per_second=None if rate is None else round(rate, 1),
        eta_seconds=None if eta is None else round(eta, 1),
        last_batch_at=max((r.finished_at for r in rows if r.outcome != SUMMARY), default=None),
        errors=tuple(sorted(errors.items(), key=lambda kv: (-kv[1], kv[0]))),
    )


def batch_stats(conn: Connection, job: str, remaining: int | None) -> BatchStats | None:
    """:func:`summarize` of ``job``'s record on this connection's database (read-only)."""
    if not has_batch_table(conn):
        return None
    rows, runs = read_history(conn, job)
    return summarize(rows, runs, remaining)
