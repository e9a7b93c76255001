"""What a backfill job has left on one database, read without scanning its table.

``status`` and the revision gate (``upgrade`` stops before a gated revision while its
backfills are unfinished) ask :func:`remaining`. A full count of a 50-million-row token table
is a multi-gigabyte read, so neither counts unless asked to (``status --exact``). Instead:

* **The job row says how far the job got.** Batches walk the primary key upward and the
  catch-up pass covers rows inserted above the upper bound meanwhile, so rows at or below the
  job's cursor are done and only rows above it can be pending. The row is trusted only for the
  generation of the job's columns it was made on (:func:`column_generation`): after a
  downgrade and upgrade re-created them, every row counts again.
* **A bounded probe** reads the first :data:`PROBE_ROWS` rows above the cursor in id order
  (an index range on the primary key that stops after that many). When the range holds no
  more, its pending rows are counted exactly.
* **Beyond that, an estimate.** On PostgreSQL: the table's rows as the planner estimates them
  (``pg_class.reltuples`` per page times the table's current pages, at most the id span),
  times the share of the id range above the cursor, times the pending share of the probed
  rows. A table never analyzed (``reltuples = -1``) is scaled by the probe's id density
  instead (its ``basis`` says ``probe``). An estimate is never impossible: at least what the
  probe saw, at most the ids above the cursor; ``status`` shows a job's total as at least
  its rows done plus its rows left. SQLite keeps no statistics; there the rows above the
  cursor are counted.
* **The gate needs a yes or no.** Pending rows in the probe say yes. A finished job whose
  probe found none is settled by ``EXISTS`` over the ids above its cursor (an index range that
  stops at the first pending row; only rows inserted since the job finished are there). A job
  that is unfinished or never ran, on a table too big to probe, counts as unfinished:
  ``oauthmig backfill`` settles it.

A row whose id is at or below a finished job's cursor but that became pending afterwards
(an insert whose transaction committed after the catch-up pass read the highest id) is seen
only by ``status --exact``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import case, func, select, text
from sqlalchemy.engine import Connection

from oauthmig.config import Settings
from oauthmig.revision_types import RevisionInfo
from oauthmig.rollout.job_state import EstimateBasis, StoredStatus, read_job
from oauthmig.rollout.jobs import Job, Remaining, exact_remaining, has_columns
from oauthmig.rollout.revisions import history
from oauthmig.version_tables import read_log

#: Rows above the cursor that the probe reads (in id order) before it estimates instead.
PROBE_ROWS = 5_000


def column_generation(
    conn: Connection, settings: Settings, job: Job, revisions: Sequence[RevisionInfo]
) -> str:
    """Identity of the job's columns: revision-log entries adding them, attnums on PostgreSQL.

    Both change when a downgrade drops the columns and an upgrade adds them again, which
    makes saved progress (a cursor over the old columns) meaningless.
    """
    log = read_log(conn)
    parts = [
        f"{r.revision}@{log.get(r.revision, {}).get('updated_at')}"
        for r in revisions
        if any(c.table == job.logical_table and c.name in job.columns for c in r.columns)
    ]
    if conn.dialect.name == "postgresql":
        rows = conn.execute(
            text(
                "SELECT attname, attnum FROM pg_attribute WHERE attrelid = CAST(:t AS regclass) "
                "AND attname = ANY(:c) AND NOT attisdropped ORDER BY attname"
            ),
            {"t": settings.tables.physical(job.logical_table), "c": list(job.columns)},
        ).all()
        parts.append(",".join(f"{r.attname}={r.attnum}" for r in rows))
    if conn.in_transaction():
        conn.rollback()
    return ";".join(parts)


@dataclass(frozen=True, slots=True)
class _Probe:
    """The first rows above the cursor: how many were read, how many of them are pending,
    and the highest id read."""

    seen: int
    pending: int
    last_id: int = 0

    @property
    def exhausted(self) -> bool:
        """The probe read every row above the cursor (its counts are exact)."""
        return self.seen <= PROBE_ROWS


def _probe(conn: Connection, t: Any, job: Job, above: int) -> _Probe:
    window = (
        select(*t.c).where(t.c.id > above).order_by(t.c.id).limit(PROBE_ROWS + 1).subquery("probe")
    )
    pending = func.coalesce(func.sum(case((job.pending(window), 1), else_=0)), 0)
    seen, found, last = conn.execute(
        select(func.count(), pending, func.max(window.c.id)).select_from(window)
    ).one()
    return _Probe(int(seen), int(found), int(last or 0))


def _any_pending(conn: Connection, t: Any, job: Job, above: int) -> bool:
    first = select(t.c.id).where(t.c.id > above, job.pending(t)).order_by(t.c.id).limit(1)
    return conn.execute(first).first() is not None


def _planner_rows(conn: Connection, physical: str) -> float | None:
    """The table's rows as PostgreSQL's planner estimates them (``None``: never analyzed)."""
    row = conn.execute(
        text(
            "SELECT c.reltuples, c.relpages, "
            "  pg_relation_size(c.oid) / current_setting('block_size')::int AS pages "
            "FROM pg_class c WHERE c.oid = to_regclass(:t)"
        ),
        {"t": physical},
    ).one_or_none()
    if row is None or row.relpages <= 0 or row.reltuples < 0:
        return None
    return float(row.reltuples) / float(row.relpages) * max(float(row.pages), 1.0)


def _estimate(
    conn: Connection, t: Any, physical: str, above: int, probe: _Probe
) -> tuple[int, EstimateBasis]:
    """Pending rows above ``above``, scaled from the probe (PostgreSQL), and what the number
    of rows above ``above`` came from.

    Never impossible: the rows above the cursor are at least the probed ones and at most the
    ids above it (ids are unique integers), and the pending ones at least those the probe saw.
    A table the planner has no statistics for (never analyzed: ``reltuples = -1``) is not
    taken as dense: the probe's id density (rows read per id it spanned) scales instead.
    """
    lo, hi = conn.execute(select(func.min(t.c.id), func.max(t.c.id))).one()
    lo, hi = int(lo), int(hi)
    span = hi - lo + 1
    ids_above = hi - max(above, lo - 1)
    planner = _planner_rows(conn, physical)
    basis: EstimateBasis
    if planner is not None:
        basis = "statistics"
        rows_above = min(planner, span) * ids_above / span
    else:
        basis = "probe"
        probed_ids = max(probe.last_id - max(above, lo - 1), 1)
        rows_above = ids_above * min(probe.seen / probed_ids, 1.0)
    rows_above = min(max(rows_above, probe.seen), ids_above)
    return max(round(rows_above * probe.pending / probe.seen), probe.pending), basis


def remaining(
    conn: Connection,
    settings: Settings,
    database: str,
    job: Job,
    *,
    exact: bool = False,
    gate: bool = False,
    revisions: Sequence[RevisionInfo] | None = None,
) -> Remaining:
    """What ``job`` has left on ``database``, without a scan of its table unless ``exact``.

    ``gate``: settle ``pending`` for a finished job whose probe found nothing, with an
    ``EXISTS`` over the ids above its cursor (what a gated revision needs; ``status`` shows
    the estimate instead). ``revisions``: the invocation's catalogue (read when not given).
    """
    if job.logical_table not in settings.tables_on(database):
        return Remaining(0)
    if exact:
        return exact_remaining(conn, settings, database, job)
    physical = settings.tables.physical(job.logical_table)
    if not has_columns(conn, physical, job.columns):
        return Remaining(None, pending=True)
    state = read_job(conn, job.name)
    catalogue = history() if revisions is None else revisions
    trusted = state is not None and state.generation == column_generation(
        conn, settings, job, catalogue
    )
    above = state.cursor if state is not None and trusted else 0
    finished = state is not None and trusted and state.status is StoredStatus.FINISHED
    t = job.table(physical)
    try:
        if conn.dialect.name == "postgresql":
            # Only an index range on the primary key stops early. Without statistics (a table
            # never analyzed, columns just added) the planner may prefer a sequential scan and
            # a sort, or a bitmap of the whole range: rule both out for this transaction.
            conn.execute(text("SET LOCAL enable_seqscan = off"))
            conn.execute(text("SET LOCAL enable_bitmapscan = off"))
        probe = _probe(conn, t, job, above)
        if probe.exhausted:
            return Remaining(probe.pending, pending=probe.pending > 0)
        if conn.dialect.name != "postgresql":
            where = (t.c.id > above) & job.pending(t)
            n = int(conn.execute(select(func.count()).select_from(t).where(where)).scalar_one())
            return Remaining(n, pending=n > 0)
        rows, basis = _estimate(conn, t, physical, above, probe)
        if probe.pending:
            pending = True
        elif finished:
            pending = gate and _any_pending(conn, t, job, above)
        else:
            pending = True  # unfinished, or never ran: nothing cheap rules the rest out
        return Remaining(rows, estimate=True, pending=pending, basis=basis)
    finally:
        if conn.in_transaction():
            conn.rollback()
