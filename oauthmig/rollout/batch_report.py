"""``oauthmig backfill --report``: the batch history of each job on each database (read-only).

Per job and database: the job's state as ``status`` shows it (with rate, ETA and batch-time
percentiles from :mod:`oauthmig.rollout.batches`), the summary row standing for batches
older than ``[backfill] keep_batches``, and the most recent batches and failed attempts.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from oauthmig.config import Settings
from oauthmig.db import map_db_errors, open_database
from oauthmig.errors import OauthmigError
from oauthmig.preflight import check_state
from oauthmig.rollout.batches import SUMMARY, BatchRow, has_batch_table, read_history
from oauthmig.rollout.control import job_targets
from oauthmig.rollout.job_state import JobState
from oauthmig.rollout.jobs import job_states
from oauthmig.rollout.revisions import history
from oauthmig.same_database import check_distinct

DEFAULT_LAST = 20  # recent batches listed per job unless --last says otherwise


@dataclass(frozen=True, slots=True)
class JobHistory:
    """The record of one job on one database."""

    database: str
    job: str
    state: JobState | None  # None when the database could not be read
    summary: BatchRow | None  # batches older than keep_batches, folded into one row
    recent: tuple[BatchRow, ...]  # newest first
    error: str | None = None


def backfill_report(
    settings: Settings, job_names: Sequence[str] = (), last: int = DEFAULT_LAST
) -> tuple[JobHistory, ...]:
    """The history of each job (all by default) on every selected database hosting it."""
    targets = job_targets(settings, job_names)
    databases = list(dict.fromkeys(db for db, _ in targets))
    check_distinct(settings, databases)
    revisions = history()
    out: list[JobHistory] = []
    for dbname in databases:
        names = [job.name for db, job in targets if db == dbname]
        db = settings.databases[dbname]
        try:
            with map_db_errors(db), open_database(settings, db) as conn:
                check_state(conn, settings, db, revisions)
                states = {s.job: s for s in job_states(conn, settings, dbname)}
                recorded = has_batch_table(conn)
                for name in names:
                    summary: BatchRow | None = None
                    recent: list[BatchRow] = []
                    if recorded:
                        rows, _ = read_history(conn, name)
                        summary = next((r for r in rows if r.outcome == SUMMARY), None)
                        detail = [r for r in rows if r.outcome != SUMMARY]
                        recent = detail[::-1][:last]
                    out.append(JobHistory(dbname, name, states.get(name), summary, tuple(recent)))
        except OauthmigError as exc:
            out.extend(JobHistory(dbname, n, None, None, (), exc.message) for n in names)
    return tuple(out)
