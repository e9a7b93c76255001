"""A backfill job's state: the job table and its rows, and the three words for a job's status.

What the table stores (:class:`StoredStatus`), how one run ended (:class:`RunEnd`) and what
``status`` shows (:class:`ShownStatus`) are three closed sets that share their values where
they mean the same thing. The jobs themselves (what each fills) are in
:mod:`oauthmig.rollout.jobs`; the runner that moves a job's state forward is
:mod:`oauthmig.rollout.backfill`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields, replace
from datetime import datetime
from enum import StrEnum
from typing import Any, Literal

from sqlalchemy import (
    BigInteger,
    Column,
    DateTime,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    inspect,
    select,
    text,
)
from sqlalchemy.engine import Connection

from oauthmig.db import scrub_stored
from oauthmig.errors import SchemaStateError
from oauthmig.rollout.batches import BatchStats, as_utc
from oauthmig.runlock import RunLock, transaction_lock


class StoredStatus(StrEnum):
    """What the job table stores for a job (its ``status`` column).

    ``cancelled``: by ``oauthmig backfill cancel``, until ``--restart``.
    """

    RUNNING = "running"
    PAUSED = "paused"
    FINISHED = "finished"
    FAILED = "failed"
    CANCELLED = "cancelled"


class RunEnd(StrEnum):
    """How one run of a job on one database ended (:class:`~oauthmig.rollout.backfill.JobRun`):
    a stored status it left, or ``dry-run`` (estimated, nothing written), ``up-to-date``
    (finished before, nothing new) or ``skipped`` (another runner held it)."""

    FINISHED = "finished"
    PAUSED = "paused"
    CANCELLED = "cancelled"
    FAILED = "failed"
    DRY_RUN = "dry-run"
    UP_TO_DATE = "up-to-date"
    SKIPPED = "skipped"  # another runner held the job or the database (runlock.Held)


class ShownStatus(StrEnum):
    """What ``status`` shows for a job: the stored status, or what it derives from the stored
    row and the table: ``interrupted`` (stored ``running``, but no process holds the run lock),
    ``stale`` (finished, but rows needing it appeared since), ``not started`` (no row) and
    ``waiting for upgrade`` (the table lacks the job's columns)."""

    RUNNING = "running"
    PAUSED = "paused"
    FINISHED = "finished"
    FAILED = "failed"
    CANCELLED = "cancelled"
    INTERRUPTED = "running (no live process: interrupted)"
    STALE = "stale"
    NOT_STARTED = "not started"
    WAITING_FOR_UPGRADE = "waiting for upgrade"


class JobPhase(StrEnum):
    """Where a job's pass is: the main pass to the bound fixed at start, the catch-up pass
    over rows inserted meanwhile, or done."""

    MAIN = "main"
    CATCHUP = "catchup"
    DONE = "done"


#: What an estimate of rows left came from: the planner's statistics of the table, or (a table
#: never analyzed) the id density of the rows the bounded probe read.
EstimateBasis = Literal["statistics", "probe"]


@dataclass(frozen=True, slots=True)
class JobState:
    """Progress of one backfill job on one database, as ``status`` shows it."""

    job: str
    state: ShownStatus
    rows_done: int
    rows_total: int | None
    remaining: int | None
    last_error: str | None = None
    held: str | None = None  # why a live run holds before its next batch (health checks)
    # The last pause / resume / cancel request (rollout.control): action, OS user@host, when.
    requested_action: str | None = None
    requested_by: str | None = None
    requested_at: datetime | None = None
    history: BatchStats | None = None  # rate, ETA, p50/p99 from the batch table
    # remaining (and rows_total where the job has no row yet) is an estimate; see Remaining
    estimate: bool = False
    estimate_basis: EstimateBasis | None = None  # what the estimate came from (None: counted)


JOB_TABLE = "oauthmig_backfill_job"

_md = MetaData()


job_table = Table(
    JOB_TABLE,
    _md,
    Column("job", String(64), primary_key=True),
    Column("table_name", String(63), nullable=False),
    Column("status", String(16), nullable=False),  # StoredStatus
    Column("phase", String(16), nullable=False),  # JobPhase
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
    # Added later (older job tables get them on first use): the run that owns the job, the
    # column generation its progress belongs to, the job version (family id formula); the
    # last operator request (pause | resume | cancel), who made it (OS user@host) and when.
    Column("owner", String(32), nullable=True),
    Column("generation", Text, nullable=True),
    Column("version", Integer, nullable=True),
    # Set while a live run holds between batches because a health check failed (the reason).
    Column("held_reason", Text, nullable=True),
    # The last operator request (pause | resume | cancel), who made it (OS user@host) and when.
    Column("requested_action", String(16), nullable=True),
    Column("requested_by", String(255), nullable=True),
    Column("requested_at", DateTime(timezone=True), nullable=True),
)


_LATER_COLUMNS = (
    "owner",
    "generation",
    "version",
    "held_reason",
    "requested_action",
    "requested_by",
    "requested_at",
)


@dataclass(frozen=True, slots=True)
class JobProgress:
    """One row of the job table: a job's saved progress on one database.

    ``owner``, ``generation``, ``version``, ``held_reason`` and the ``requested_*`` columns
    are ``None`` when the row predates them (job tables of older versions lack those columns
    until a run adds them).
    """

    job: str
    table_name: str
    status: StoredStatus
    phase: JobPhase
    cursor: int
    upper_bound: int
    rows_done: int
    rows_total: int
    batches: int
    batch_size: int
    attempts: int
    last_error: str | None
    started_at: datetime
    updated_at: datetime
    finished_at: datetime | None
    owner: str | None = None
    generation: str | None = None
    version: int | None = None
    held_reason: str | None = None
    requested_action: str | None = None  # the last pause/resume/cancel request (rollout.control)
    requested_by: str | None = None
    requested_at: datetime | None = None

    @classmethod
    def from_row(cls, row: Mapping[Any, Any]) -> JobProgress:
        """Parse a job-table row (a later column missing from ``row`` reads as ``None``)."""
        status = next((s for s in StoredStatus if s.value == row["status"]), None)
        phase = next((p for p in JobPhase if p.value == row["phase"]), None)
        if status is None or phase is None:
            raise SchemaStateError(
                f"{JOB_TABLE}: job {row['job']!r} has status {row['status']!r} and phase "
                f"{row['phase']!r}, which this oauthmig does not know; use the version that "
                f"wrote it, or `oauthmig backfill {row['job']} --restart`"
            )
        return cls(
            job=str(row["job"]),
            table_name=str(row["table_name"]),
            status=status,
            phase=phase,
            cursor=int(row["cursor"]),
            upper_bound=int(row["upper_bound"]),
            rows_done=int(row["rows_done"]),
            rows_total=int(row["rows_total"]),
            batches=int(row["batches"]),
            batch_size=int(row["batch_size"]),
            attempts=int(row["attempts"]),
            last_error=row["last_error"],
            started_at=row["started_at"],
            updated_at=row["updated_at"],
            finished_at=row["finished_at"],
            owner=row.get("owner"),
            generation=row.get("generation"),
            version=None if row.get("version") is None else int(row["version"]),
            held_reason=row.get("held_reason"),
            requested_action=row.get("requested_action"),
            requested_by=row.get("requested_by"),
            requested_at=None if row.get("requested_at") is None else as_utc(row["requested_at"]),
        )

    def values(self, names: Sequence[str] | None = None) -> dict[str, Any]:
        """Column values to write (all columns by default), enums as their stored strings."""
        chosen = [f.name for f in fields(self)] if names is None else names
        out = {name: getattr(self, name) for name in chosen}
        for name in ("status", "phase"):
            if name in out:
                out[name] = out[name].value
        return out


def new_transaction(conn: Connection) -> Any:
    """A new transaction, ending the implicit one a preceding read may have begun."""
    if conn.in_transaction():
        conn.commit()
    return conn.begin()


def read_job(conn: Connection, name: str) -> JobProgress | None:
    """The saved progress of job ``name`` on this database (``None``: no job table or row)."""
    insp = inspect(conn)
    if not insp.has_table(JOB_TABLE):
        return None
    have = {c["name"] for c in insp.get_columns(JOB_TABLE)}  # older tables lack later columns
    cols = [c for c in job_table.c if c.name in have]
    row = conn.execute(select(*cols).where(job_table.c.job == name)).mappings().first()
    if conn.in_transaction():
        conn.rollback()
    if not row:
        return None
    progress = JobProgress.from_row(row)
    # Older versions stored raw driver text; a resumed run writes the scrubbed text back.
    return replace(
        progress,
        last_error=scrub_stored(progress.last_error, conn.engine.url),
        held_reason=scrub_stored(progress.held_reason, conn.engine.url),
    )


def run_lock(job: str, database: str) -> RunLock:
    """The run lock of a backfill of ``job`` on ``database`` (one run per job and database)."""
    return RunLock(f"backfill {job}", database)


def run_alive(conn: Connection, job: str) -> bool:
    """Whether a backfill run of ``job`` holds its lock on this database right now."""
    return run_lock(job, "").alive(conn)


def ensure_job_table(conn: Connection) -> None:
    """Create the job table, or add the columns newer versions use to an older one."""
    with new_transaction(conn):
        transaction_lock(conn, "backfill-schema")  # jobs may start together (--jobs)
        _md.create_all(conn, checkfirst=True)
        have = {c["name"] for c in inspect(conn).get_columns(JOB_TABLE)}
        for name in _LATER_COLUMNS:
            if name not in have:
                sql_type = job_table.c[name].type.compile(dialect=conn.dialect)
                conn.execute(text(f"ALTER TABLE {JOB_TABLE} ADD COLUMN {name} {sql_type}"))
