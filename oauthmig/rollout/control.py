"""Pause, resume and cancel backfill jobs from any shell on any host.

A request is recorded in the job's row of ``oauthmig_backfill_job`` on every selected database
hosting the job's table: ``requested_action`` (pause | resume | cancel), ``requested_by`` (the
OS user and host that asked, ``user@host``; nothing else about the caller is stored) and
``requested_at``. A running backfill, whatever process or host runs it, reads the request
before each batch and every :data:`POLL_SECONDS` while it sleeps between batches, so it stops
within one batch: the batch in flight commits (or rolls back) as a whole, the state is saved.

* **pause** holds the job until ``resume``. A running backfill stops before its next batch,
  saves its state as ``paused`` and exits 0 with ``paused by request (user@host at time)``.
  The hold stays: every later ``oauthmig backfill`` of the job stops before its first batch
  (exit 0, the same line) until it is resumed, so a pause made during an incident also holds
  the deploy pipeline's next scheduled rerun. A job that is not running (paused, failed,
  interrupted, finished, or never started: its job row is created) gets the same hold.
* **resume** withdraws a pause, or a cancel that the running backfill has not acted on yet.
  It starts nothing: the next ``oauthmig backfill`` continues from the saved cursor. A job
  already cancelled is refused (only ``--restart`` undoes a cancel).
* **cancel** stops a running backfill before its next batch and marks the job ``cancelled``;
  a job that is not running is marked at once. Progress is kept, but no run continues it: a
  plain ``oauthmig backfill`` refuses in one line (exit 2) until ``--restart`` starts over.

``status`` shows the last request (who and when) next to each job.
"""

from __future__ import annotations

import getpass
import os
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.engine import Connection
from sqlalchemy.exc import SQLAlchemyError

from oauthmig.config import Settings
from oauthmig.db import (
    db_error_message,
    describe_error,
    for_writing,
    open_database,
    set_timeouts,
)
from oauthmig.errors import OauthmigError, UsageError
from oauthmig.privileges import Command
from oauthmig.rollout.batches import as_utc
from oauthmig.rollout.job_state import (
    JobProgress,
    ShownStatus,
    StoredStatus,
    ensure_job_table,
    job_table,
    new_transaction,
    read_job,
    run_alive,
)
from oauthmig.rollout.jobs import FAMILY_VERSION, JOBS, Job, has_columns
from oauthmig.rollout.revisions import history
from oauthmig.rollout.runner import check_databases

ACTIONS = ("pause", "resume", "cancel")
STOPPING = ("pause", "cancel")  # requests a running backfill obeys
POLL_SECONDS = 1.0  # how often a backfill sleeping between batches looks for a request
CANCELLED = StoredStatus.CANCELLED


def requester() -> str:
    """``user@host`` of this process: the OS user and the host name, printable, no spaces."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = f"uid{os.getuid()}"
    who = f"{user}@{socket.gethostname() or 'unknown-host'}"
    return "".join(ch for ch in who if ch.isprintable() and not ch.isspace())[:255]


def when(at: datetime) -> str:
    """A request time as operators read it: ``2025-01-02 10:00:00Z`` (UTC)."""
    return as_utc(at).astimezone(UTC).strftime("%Y-%m-%d %H:%M:%SZ")


@dataclass(frozen=True, slots=True)
class Request:
    """One recorded request."""

    action: str
    by: str
    at: datetime

    def describe(self) -> str:
        """``alice@host at 2025-01-02 10:00:00Z``."""
        return f"{self.by} at {when(self.at)}"


def _request_of(row: Any) -> Request | None:
    if row is None or row["requested_action"] is None:
        return None
    return Request(
        str(row["requested_action"]),
        str(row["requested_by"] or "unknown"),
        as_utc(row["requested_at"]) if row["requested_at"] is not None else datetime.now(UTC),
    )


_REQUEST_COLUMNS = (
    job_table.c.requested_action,
    job_table.c.requested_by,
    job_table.c.requested_at,
)


def requested_stop(conn: Connection, job: str, *, end: bool = True) -> Request | None:
    """The pause or cancel request in force for ``job`` (one primary-key read), for the runner.

    ``end=False`` leaves the read's transaction open for the caller's next read to share (and
    end): one round trip less per batch.
    """
    row = conn.execute(select(*_REQUEST_COLUMNS).where(job_table.c.job == job)).mappings().first()
    if end and conn.in_transaction():
        conn.commit()
    request = _request_of(row)
    return request if request is not None and request.action in STOPPING else None


def carried_request(conn: Connection, job: str) -> dict[str, Any]:
    """Inside the transaction that resets a job starting over: the request columns the new
    job row keeps. A pause survives ``--restart`` (only ``resume`` lifts it); a cancel is what
    ``--restart`` undoes."""
    query = select(*_REQUEST_COLUMNS).where(job_table.c.job == job)
    if conn.dialect.name == "postgresql":
        query = query.with_for_update()
    row = conn.execute(query).mappings().first()
    if row is not None and row["requested_action"] == "pause":
        return dict(row)
    return {"requested_action": None, "requested_by": None, "requested_at": None}


def paused_message(request: Request, database: str, job: str) -> str:
    """What a backfill stopped by a pause request says (exit 0)."""
    return (
        f"paused by request ({request.describe()}); state saved, "
        f"`oauthmig backfill resume {job} -d {database}` lets it run again"
    )


def cancelled_message(request: Request | None, database: str, job: str) -> str:
    """What a backfill of a cancelled job says (exit 2)."""
    who = f" by request ({request.describe()})" if request is not None else ""
    return (
        f"database {database!r}: backfill {job} was cancelled{who}; its progress is kept but "
        f"no run continues it: `oauthmig backfill --restart {job} -d {database}` starts it over"
    )


def recorded_request(state: JobProgress) -> Request | None:
    """The last request recorded in a job row read by :func:`rollout.jobs.read_job`."""
    if state.requested_action is None:
        return None
    return Request(
        state.requested_action,
        state.requested_by or "unknown",
        state.requested_at or datetime.now(UTC),
    )


# --------------------------------------------------------------------------- the commands


@dataclass(frozen=True, slots=True)
class RequestOutcome:
    """What ``backfill pause|resume|cancel`` did for one job on one database."""

    job: str
    database: str
    action: str
    state: str  # the job's state when asked, as ``status`` shows it
    recorded: bool  # False: nothing to do (already paused, not paused, finished ...)
    effect: str  # what happens next
    request: Request | None  # the request in force afterwards
    running: bool  # a live backfill held the job when asked


def job_targets(settings: Settings, job_names: Sequence[str]) -> list[tuple[str, Job]]:
    """(database, job) for each job (all by default) and selected database hosting its table;
    a usage error for an unknown job or when no selected database hosts any of them."""
    names = list(dict.fromkeys(job_names)) or list(JOBS)
    for n in names:
        if n not in JOBS:
            raise UsageError(f"unknown backfill job {n!r} (jobs: {', '.join(JOBS)})")
    targets = [
        (db, JOBS[n])
        for db in settings.database_names()
        for n in names
        if JOBS[n].logical_table in settings.tables_on(db)
    ]
    if not targets:
        raise UsageError(
            f"no selected database hosts the table of {', '.join(names)}; check -d and [routing]"
        )
    return targets


def _shown_state(status: str | None, alive: bool) -> str:
    if status is None:
        return ShownStatus.NOT_STARTED
    return ShownStatus.INTERRUPTED if status == StoredStatus.RUNNING and not alive else status


def request(
    settings: Settings, action: str, job_names: Sequence[str] = ()
) -> tuple[RequestOutcome, ...]:
    """Record ``action`` for each job (all by default) on every selected database hosting it.

    Every database is checked first (as ``upgrade`` checks it; the job's columns exist; a
    cancelled job cannot be resumed): on any problem nothing is recorded anywhere.
    """
    if action not in ACTIONS:
        raise UsageError(f"unknown request {action!r} (one of {', '.join(ACTIONS)})")
    targets = job_targets(settings, job_names)
    databases = list(dict.fromkeys(db for db, _ in targets))
    check_databases(settings, databases, history(), Command.BACKFILL_CONTROL)
    problems: list[str] = []
    for dbname in databases:
        db = settings.databases[dbname]
        try:
            with open_database(settings, db) as conn:
                for name, job in targets:
                    if name != dbname:
                        continue
                    # A catalog read, not a count: a pause must be instant on any table size.
                    physical = settings.tables.physical(job.logical_table)
                    if not has_columns(conn, physical, job.columns):
                        problems.append(
                            f"database {dbname!r}: {physical} lacks the columns of job "
                            f"{job.name!r}; run `oauthmig upgrade` first"
                        )
                        continue
                    state = read_job(conn, job.name)
                    if (
                        action == "resume"
                        and state is not None
                        and state.status is StoredStatus.CANCELLED
                    ):
                        problems.append(
                            f"database {dbname!r}: backfill {job.name} is cancelled; resume "
                            f"cannot undo a cancel: `oauthmig backfill --restart {job.name} "
                            f"-d {dbname}` starts it over"
                        )
        except SQLAlchemyError as exc:
            problems.append(db_error_message(exc, db))
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise OauthmigError(f"{problems[0]}{more}; nothing was recorded")
    me, now = requester(), datetime.now(UTC)
    out: list[RequestOutcome] = []
    for dbname in databases:
        db = settings.databases[dbname]
        try:
            with open_database(settings, db) as raw:
                conn = for_writing(raw)
                ms = settings.migrate.lock_timeout_ms
                set_timeouts(conn, ms, max(ms, 5000))
                if conn.in_transaction():
                    conn.commit()
                if action != "resume":  # resume writes only where a request is recorded
                    ensure_job_table(conn)
                for name, job in targets:
                    if name == dbname:
                        out.append(_apply(conn, settings, dbname, job, Request(action, me, now)))
        except SQLAlchemyError as exc:
            recorded = ", ".join(f"{o.job} on {o.database}" for o in out if o.recorded)
            raise OauthmigError(
                f"database {dbname!r}: could not record the {action} request: "
                f"{describe_error(exc, db)}"
                + (f" (recorded before it: {recorded})" if recorded else "")
                + "; rerun the command"
            ) from None
    return tuple(out)


def _apply(
    conn: Connection, settings: Settings, database: str, job: Job, req: Request
) -> RequestOutcome:
    """Record one request for one job on one database, and say what it does.

    Stays whole: one decision table, (action, stored state, live run) -> effect, read top to
    bottom inside the transaction that locks the job row.
    """
    alive = run_alive(conn, job.name)
    if req.action == "resume":
        seen = read_job(conn, job.name)  # tolerates a missing or older job table
        if seen is None or seen.requested_action not in STOPPING:
            status = None if seen is None else str(seen.status)
            hint = (
                "; `oauthmig backfill` continues it"
                if status in ("paused", "failed", "running")
                else ""
            )
            return RequestOutcome(
                job.name,
                database,
                req.action,
                _shown_state(status, alive),
                False,
                f"no pause or cancel requested{hint}",
                None if seen is None else recorded_request(seen),
                alive,
            )
    with new_transaction(conn):
        query = select(job_table).where(job_table.c.job == job.name)
        if conn.dialect.name == "postgresql":
            query = query.with_for_update()
        row = conn.execute(query).mappings().first()
        state = dict(row) if row is not None else None
        shown = _shown_state(None if state is None else str(state["status"]), alive)
        before = _request_of(state)
        mine = {"requested_action": req.action, "requested_by": req.by, "requested_at": req.at}

        def outcome(recorded: bool, effect: str, now: Request | None) -> RequestOutcome:
            return RequestOutcome(
                job.name, database, req.action, shown, recorded, effect, now, alive
            )

        def record(**extra: Any) -> None:
            conn.execute(
                job_table.update().where(job_table.c.job == job.name).values(**mine, **extra)
            )

        status = None if state is None else str(state["status"])
        if req.action == "resume":
            if before is None or before.action not in STOPPING:
                hint = (
                    "; `oauthmig backfill` continues it"
                    if status in ("paused", "failed", "running")
                    else ""
                )
                return outcome(False, f"no pause or cancel requested{hint}", before)
            record()
            if alive:
                effect = f"{before.action} withdrawn: the running backfill goes on"
                return outcome(True, effect, req)
            return outcome(
                True,
                f"{before.action} withdrawn: `oauthmig backfill` continues from the saved cursor",
                req,
            )
        if status == CANCELLED:
            return outcome(False, "already cancelled; `--restart` starts it over", before)
        if before is not None and before.action == req.action:
            return outcome(False, f"already requested ({before.describe()})", before)
        if state is None:
            conn.execute(job_table.insert().values(**_placeholder(settings, job, req)))
            if req.action == "pause":
                return outcome(True, "not started: `oauthmig backfill` holds it until resumed", req)
            return outcome(True, "not started: marked cancelled; `--restart` starts it", req)
        if req.action == "pause":
            record()
            if alive:
                return outcome(True, "stops before its next batch, state saved", req)
            if status == "finished":
                effect = "finished: a new pass (for rows added later) waits for resume"
                return outcome(True, effect, req)
            return outcome(True, "the next `oauthmig backfill` stops before its first batch", req)
        if status == "finished" and not alive:
            return outcome(False, "finished: nothing to cancel", before)
        if alive:
            record()
            return outcome(True, "stops before its next batch and is marked cancelled", req)
        record(status=CANCELLED, updated_at=req.at)
        return outcome(True, "marked cancelled; `--restart` starts it over", req)


def _placeholder(settings: Settings, job: Job, req: Request) -> dict[str, Any]:
    """The job row of a job that never ran, holding a request: no progress, no bounds or row
    count yet, no column generation (the first real run initialises it, keeping the request)."""
    return {
        "job": job.name,
        "table_name": settings.tables.physical(job.logical_table),
        "status": "paused" if req.action == "pause" else CANCELLED,
        "phase": "main",
        "cursor": 0,
        "upper_bound": 0,
        "rows_done": 0,
        "rows_total": 0,
        "batches": 0,
        "batch_size": settings.backfill.batch_size,
        "attempts": 0,
        "last_error": None,
        "started_at": req.at,
        "updated_at": req.at,
        "finished_at": None,
        "owner": None,
        "generation": None,
        "version": FAMILY_VERSION,
        "requested_action": req.action,
        "requested_by": req.by,
        "requested_at": req.at,
    }


def wait_stopped(
    settings: Settings, outcomes: Sequence[RequestOutcome], timeout: float
) -> list[RequestOutcome]:
    """Wait until no backfill runs the jobs a pause or cancel was just recorded for; return
    those still running when ``timeout`` seconds have passed."""
    waiting = [o for o in outcomes if o.running and o.request is not None and o.recorded]
    waiting = [o for o in waiting if o.request is not None and o.request.action in STOPPING]
    deadline = time.monotonic() + timeout
    while waiting:
        still: list[RequestOutcome] = []
        for o in waiting:
            with open_database(settings, settings.databases[o.database]) as conn:
                if run_alive(conn, o.job):
                    still.append(o)
        waiting = still
        if not waiting or time.monotonic() >= deadline:
            break
        time.sleep(0.2)
    return waiting
