"""The fleet: waves, parts and one view of many databases.

oauthmig has no scheduler: CI matrices and Kubernetes Indexed Jobs run the processes, and the
databases themselves (their version tables, job rows and run locks) are the coordination point.

* **Waves** (``[waves]``, :class:`~oauthmig.config.Wave`): ordered groups of databases. A run
  on a wave refuses to start (:class:`~oauthmig.errors.GateError`, one line naming the earlier
  wave's database and why) while a database of an earlier wave failed, or has not reached the
  revision the run targets (head for ``backfill``).
* **Parts** (``--part I/N``): a deterministic share of the selected databases. The selected
  names are ordered by the SHA-256 of their name (never Python's salted ``hash()``), and the
  k-th of them (0-based) goes to part ``k mod N + 1``: stable across runs and hosts given the
  same configuration and selection, and balanced to within one database.
* **One view** (:func:`summary`): every selected database read in parallel, with bounded
  concurrency and a per-database timeout; a database that cannot be read is one line of the
  view, never the end of it.
"""

from __future__ import annotations

import hashlib
import re
import time
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, replace
from enum import StrEnum

from sqlalchemy.engine import Connection

from oauthmig.config import SUMMARY_CONCURRENCY, SUMMARY_TIMEOUT_SECONDS, Settings, Wave
from oauthmig.db import connect, map_db_errors, open_engine, scrub_stored, set_timeouts
from oauthmig.errors import ConfigError, GateError, OauthmigError, UsageError
from oauthmig.revision_types import RevisionInfo, revision_position
from oauthmig.rollout.batches import BATCH_TABLE
from oauthmig.rollout.job_state import JOB_TABLE, ShownStatus
from oauthmig.rollout.jobs import JOBS, job_states
from oauthmig.rollout.remaining import remaining
from oauthmig.rollout.runner import Waiting
from oauthmig.rollout.status import DatabaseStatus, RevisionState
from oauthmig.table_columns import shared_reflection
from oauthmig.version_tables import LOG_TABLE, VERSION_TABLE, read_current, read_log

_PART = re.compile(r"^\s*(\d+)\s*/\s*(\d+)\s*$")

# --------------------------------------------------------------------------- selection


@dataclass(frozen=True, slots=True)
class Part:
    """``--part I/N``: the I-th of N shares (1-based, as GitLab's ``CI_NODE_INDEX``)."""

    index: int
    count: int

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"


def parse_part(text: str) -> Part:
    """``"2/4"`` -> ``Part(2, 4)``; anything else is a usage error saying what to write."""
    match = _PART.match(text)
    if match is None:
        raise UsageError(
            f"--part {text!r}: expected I/N, e.g. --part 2/4 (I from 1 to N; in a Kubernetes "
            "Indexed Job: --part $((JOB_COMPLETION_INDEX + 1))/N)"
        )
    index, count = int(match.group(1)), int(match.group(2))
    if count < 1 or not 1 <= index <= count:
        raise UsageError(
            f"--part {text}: I must be from 1 to N and N at least 1 (I is 1-based; in a "
            "Kubernetes Indexed Job: --part $((JOB_COMPLETION_INDEX + 1))/N)"
        )
    return Part(index, count)


def _rank(name: str) -> tuple[bytes, str]:
    return hashlib.sha256(name.encode()).digest(), name


def part_of(names: Sequence[str], part: Part) -> tuple[str, ...]:
    """The databases of ``names`` that belong to ``part``, in ``names``' order."""
    ordered = sorted(names, key=_rank)
    mine = {n for k, n in enumerate(ordered) if k % part.count == part.index - 1}
    return tuple(n for n in names if n in mine)


@dataclass(frozen=True, slots=True)
class Selection:
    """The databases one run works on, and where they sit in the waves.

    ``settings`` is restricted to ``names`` (``None`` when the selection is empty: a part of
    fewer databases than parts); ``earlier`` are the waves before ``wave``."""

    settings: Settings | None
    names: tuple[str, ...]
    wave: Wave | None
    part: Part | None
    earlier: tuple[Wave, ...]

    def describe(self) -> str:
        """``wave ring1, part 2/4`` (or ``all databases``), for messages."""
        bits = ([f"wave {self.wave.name}"] if self.wave else []) + (
            [f"part {self.part}"] if self.part else []
        )
        return ", ".join(bits) or "all databases"


def find_wave(settings: Settings, name: str) -> tuple[Wave, tuple[Wave, ...]]:
    """The wave called ``name`` and the waves before it; a usage error when there is none."""
    if not settings.waves:
        raise ConfigError(
            f"--wave {name}: no waves are configured; add a [waves] table to {settings.source}"
        )
    for i, wave in enumerate(settings.waves):
        if wave.name == name:
            return wave, settings.waves[:i]
    known = ", ".join(w.name for w in settings.waves)
    raise UsageError(f"--wave {name}: no such wave (waves, in order: {known})")


def select(
    settings: Settings,
    databases: Sequence[str] = (),
    wave: str | None = None,
    part: Part | None = None,
) -> Selection:
    """Apply ``--database``, ``--wave`` and ``--part`` (in that order) to the configured
    databases. ``settings`` must be unrestricted: the waves before ``wave`` are read whole."""
    names = settings.restrict(tuple(databases)).database_names()
    found: Wave | None = None
    earlier: tuple[Wave, ...] = ()
    if wave is not None:
        found, earlier = find_wave(settings, wave)
        names = tuple(n for n in names if n in found.databases)
    if part is not None:
        names = part_of(names, part)
    chosen = settings.restrict(names) if names else None
    return Selection(chosen, names, found, part, earlier)


def wave_of(settings: Settings, database: str) -> str | None:
    """The wave ``database`` belongs to (``None`` when no waves are configured)."""
    for wave in settings.waves:
        if database in wave.databases:
            return wave.name
    return None


# --------------------------------------------------------------------------- reading


def read_databases(
    settings: Settings,
    names: Sequence[str],
    revisions: Sequence[RevisionInfo],
    *,
    concurrency: int = SUMMARY_CONCURRENCY,
    timeout: float = SUMMARY_TIMEOUT_SECONDS,
) -> list[DatabaseStatus]:
    """``status`` of each database of ``names``, read in parallel (at most ``concurrency`` at
    once). Each read runs with ``statement_timeout`` and ``lock_timeout`` capped at
    ``timeout``; one that still has no answer ``timeout`` seconds (plus the connect timeout)
    after it started, or that fails, comes back as a status with its one-line ``error``."""
    ms = max(1, int(timeout * 1000))
    migrate = replace(
        settings.migrate,
        statement_timeout_ms=min(settings.migrate.statement_timeout_ms, ms),
        lock_timeout_ms=min(settings.migrate.lock_timeout_ms, ms),
    )
    capped = replace(settings, migrate=migrate)
    revs = list(revisions)

    def one(name: str) -> DatabaseStatus:
        try:
            return _read_one(capped, name, revs)
        except OauthmigError as exc:
            return _unreadable(settings, name, exc.message)

    pool = ThreadPoolExecutor(max_workers=max(1, min(concurrency, len(names))))
    try:
        futures: list[tuple[str, Future[DatabaseStatus], list[float]]] = []
        for name in names:
            began: list[float] = []

            def timed(name: str = name, began: list[float] = began) -> DatabaseStatus:
                began.append(time.monotonic())
                return one(name)

            futures.append((name, pool.submit(timed), began))
        out: list[DatabaseStatus] = []
        # A read's clock starts when a worker picks it up, not when it was queued.
        grace = timeout + 5.0  # + libpq's connect_timeout (oauthmig.db)
        for name, future, began in futures:
            while True:
                left = (began[0] + grace - time.monotonic()) if began else grace
                try:
                    out.append(future.result(timeout=max(0.05, left)))
                    break
                except FutureTimeout:
                    if began and time.monotonic() >= began[0] + grace:
                        out.append(_unreadable(settings, name, f"no answer within {timeout:g}s"))
                        break
        return out
    finally:
        pool.shutdown(wait=False, cancel_futures=True)


def _read_one(settings: Settings, name: str, revisions: list[RevisionInfo]) -> DatabaseStatus:
    """What the fleet view needs of one database, and no more (no schema checks, live
    grants, compatibility triggers or verify passes: ``status -d NAME`` shows those): its
    revision, failed revisions, the first gated revision that waits, and its backfills."""
    db = settings.databases[name]
    with open_engine(settings, db) as engine, map_db_errors(db), connect(engine, db) as conn:
        m = settings.migrate
        set_timeouts(conn, m.lock_timeout_ms, m.statement_timeout_ms)
        if conn.in_transaction():
            conn.commit()
        # Only reads below: every table they ask the columns of is reflected once, up front.
        routed = settings.tables_on(name)
        jobs = {
            settings.tables.physical(j.logical_table)
            for j in JOBS.values()
            if j.logical_table in routed
        }
        tables = [VERSION_TABLE, LOG_TABLE, JOB_TABLE, BATCH_TABLE, *sorted(jobs)]
        with shared_reflection(conn, tables):
            return _read_reflected(conn, settings, name, revisions)


def _read_reflected(
    conn: Connection, settings: Settings, name: str, revisions: list[RevisionInfo]
) -> DatabaseStatus:
    """:func:`_read_one` on its open connection."""
    db = settings.databases[name]
    current = read_current(conn, name, revisions)
    log = read_log(conn)
    # What each job has left, read once: the gates below are judged from it (as status
    # shows them: estimates, no EXISTS scan for a finished job).
    left = {
        job.name: remaining(conn, settings, name, job, revisions=revisions) for job in JOBS.values()
    }
    routed = settings.tables_on(name)
    cells: list[RevisionState] = []
    waits = False
    for rev in revisions[revision_position(current, revisions) :]:
        row = log.get(rev.revision, {})
        if row.get("outcome") == "failed":
            detail = scrub_stored(row.get("detail"), db.url)
            cells.append(RevisionState(rev.revision, "failed", detail))
            continue
        unfinished = [
            (job, left[job])
            for job in rev.requires_backfills
            if job in left and left[job].pending and rev.applies_to(routed)
        ]
        if unfinished and not waits:
            waits = True
            (first, rows), *others = [(job, r.rows) for job, r in unfinished]
            estimate = any(r.estimate for _job, r in unfinished)
            waiting = Waiting(rev.revision, first, rows, tuple(others), estimate)
            cells.append(RevisionState(rev.revision, "waiting", waiting.describe()))
            continue
        cells.append(RevisionState(rev.revision, "pending"))
    jobs = tuple(job_states(conn, settings, name, left))
    if conn.in_transaction():
        conn.rollback()
    return DatabaseStatus(
        name,
        db.dialect,
        db.display_url,
        settings.tables_on(name),
        current,
        tuple(cells),
        jobs,
        None,
        None,
    )


def _unreadable(settings: Settings, name: str, message: str) -> DatabaseStatus:
    db = settings.databases[name]
    if not message.startswith(f"database {name!r}"):
        message = f"database {name!r}: {message}"
    return DatabaseStatus(
        name,
        db.dialect,
        db.display_url,
        settings.tables_on(name),
        None,
        (),
        (),
        None,
        None,
        message,
    )


# --------------------------------------------------------------------------- the wave gate


def _behind(d: DatabaseStatus, target: str | None, revisions: Sequence[RevisionInfo]) -> str | None:
    """Why database ``d`` keeps the next wave from starting, or ``None``."""
    if d.error:
        return f"cannot be read ({d.error})"
    for cell in d.revisions:
        if cell.state == "failed":
            detail = f" ({cell.detail})" if cell.detail else ""
            return f"failed: revision {cell.revision} failed{detail}"
    for job in d.backfills:
        if job.state in (ShownStatus.FAILED, ShownStatus.CANCELLED):
            return f"failed: backfill {job.job} {job.state}"
    if revision_position(d.current, revisions) < revision_position(target, revisions):
        where = f"is at {d.current or 'base'}, not at {target}"
        waiting = next((c for c in d.revisions if c.state == "waiting"), None)
        if waiting is not None and waiting.detail:
            return f"{where} ({waiting.detail})"
        return where
    return None


def wave_gate(
    settings: Settings,
    selection: Selection,
    target: str | None,
    revisions: Sequence[RevisionInfo],
    command: str,
    *,
    concurrency: int = SUMMARY_CONCURRENCY,
) -> None:
    """Refuse (:class:`GateError`) to start ``selection.wave`` while a database of an earlier
    wave failed or has not reached ``target`` (a revision id; ``None`` is base).

    ``settings``: unrestricted (earlier waves are outside the selection). Reads the earlier
    waves in parallel; the first problem in wave and database order is the message."""
    wave = selection.wave
    if wave is None or not selection.earlier:
        return
    names = [n for w in selection.earlier for n in w.databases]
    found = {
        d.database: d for d in read_databases(settings, names, revisions, concurrency=concurrency)
    }
    for earlier in selection.earlier:
        for name in earlier.databases:
            why = _behind(found[name], target, revisions)
            if why is not None:
                raise GateError(
                    f"wave {wave.name} cannot start: database {name!r} of wave {earlier.name} "
                    f"{why}; finish wave {earlier.name} first (`{command} status --wave "
                    f"{earlier.name}`), nothing was changed"
                )


# --------------------------------------------------------------------------- one view


class FleetState(StrEnum):
    """Where one database stands in the rollout, as the summary counts it."""

    DONE = "done"  # at the last revision, every backfill finished
    PENDING = "pending"  # revisions to apply, nothing in the way
    WAITING = "waiting"  # a gated revision waits for a backfill
    FAILED = "failed"  # a revision or a backfill failed (or was cancelled)
    UNREACHABLE = "unreachable"  # could not be read


class Straggler(StrEnum):
    """Why the summary names a database."""

    FAILED = "failed"
    UNREACHABLE = "unreachable"
    WAITING = "waiting"
    HELD = "held"  # a backfill run holds before its next batch (a failing health check)
    PAUSED = "paused"  # a backfill was paused (by request or --max-runtime)


@dataclass(frozen=True, slots=True)
class DatabaseLine:
    """One database of the summary: its revision, state and (for a straggler) why."""

    database: str
    wave: str | None
    revision: str | None
    state: FleetState
    straggler: Straggler | None
    detail: str | None


@dataclass(frozen=True, slots=True)
class StateCount:
    """How many databases are at ``revision`` (``None``: base) in ``state``."""

    revision: str | None
    state: FleetState
    databases: int


@dataclass(frozen=True, slots=True)
class JobSummary:
    """One backfill job over the fleet: rows left everywhere and the slowest database."""

    job: str
    databases: int  # databases hosting the job's table that could be read
    finished: int
    rows_left: int
    estimate: bool  # some rows_left were estimated, not counted
    slowest: str | None  # the database with the longest ETA (rows left at its own rate)
    slowest_eta_seconds: float | None


@dataclass(frozen=True, slots=True)
class WaveSummary:
    """How far one wave got."""

    wave: str
    implied: bool
    databases: int
    done: int
    failed: int


@dataclass(frozen=True, slots=True)
class FleetSummary:
    """``status --summary``."""

    head: str | None
    selection: str
    counts: tuple[StateCount, ...]
    stragglers: tuple[DatabaseLine, ...]
    jobs: tuple[JobSummary, ...]
    waves: tuple[WaveSummary, ...]
    databases: tuple[DatabaseLine, ...]
    seconds: float

    @property
    def outstanding(self) -> bool:
        """Some database is not done (what ``--check`` fails on)."""
        return any(d.state is not FleetState.DONE for d in self.databases)


def _line(settings: Settings, d: DatabaseStatus, head: str | None) -> DatabaseLine:
    wave = wave_of(settings, d.database)
    if d.error:
        return DatabaseLine(
            d.database, wave, None, FleetState.UNREACHABLE, Straggler.UNREACHABLE, d.error
        )
    failed = next((c for c in d.revisions if c.state == "failed"), None)
    bad_job = next(
        (j for j in d.backfills if j.state in (ShownStatus.FAILED, ShownStatus.CANCELLED)), None
    )
    if failed is not None:
        detail = f"revision {failed.revision} failed" + (
            f": {failed.detail}" if failed.detail else ""
        )
        return DatabaseLine(
            d.database, wave, d.current, FleetState.FAILED, Straggler.FAILED, detail
        )
    if bad_job is not None:
        detail = f"backfill {bad_job.job} {bad_job.state}" + (
            f": {bad_job.last_error}" if bad_job.last_error else ""
        )
        return DatabaseLine(
            d.database, wave, d.current, FleetState.FAILED, Straggler.FAILED, detail
        )
    held = next((j for j in d.backfills if j.held), None)
    paused = next((j for j in d.backfills if j.state is ShownStatus.PAUSED), None)
    # Waiting: the next thing to do on it is a backfill (no revision to apply before the gate).
    first = next((c for c in d.revisions if c.state in ("pending", "waiting")), None)
    waiting = first if first is not None and first.state == "waiting" else None
    if waiting is not None:
        state = FleetState.WAITING
    elif first is not None or d.current != head:
        state = FleetState.PENDING
    else:
        state = FleetState.DONE
    if held is not None:
        return DatabaseLine(
            d.database, wave, d.current, state, Straggler.HELD, f"backfill {held.job}: {held.held}"
        )
    if paused is not None:
        return DatabaseLine(
            d.database, wave, d.current, state, Straggler.PAUSED, f"backfill {paused.job} paused"
        )
    if waiting is not None:
        return DatabaseLine(
            d.database,
            wave,
            d.current,
            state,
            Straggler.WAITING,
            f"revision {waiting.revision} waits: {waiting.detail}",
        )
    return DatabaseLine(d.database, wave, d.current, state, None, None)


def summary(
    settings: Settings,
    selection: Selection,
    revisions: Sequence[RevisionInfo],
    *,
    concurrency: int = SUMMARY_CONCURRENCY,
    timeout: float = SUMMARY_TIMEOUT_SECONDS,
    clock: Callable[[], float] = time.monotonic,
) -> FleetSummary:
    """Read every selected database (in parallel, bounded) and sum up where the fleet stands.

    ``settings``: unrestricted (for the waves); only ``selection.names`` are read."""
    started = clock()
    head = revisions[-1].revision if revisions else None
    statuses = (
        read_databases(
            settings, selection.names, revisions, concurrency=concurrency, timeout=timeout
        )
        if selection.names
        else []
    )
    lines = tuple(_line(settings, d, head) for d in statuses)
    counted = Counter((line.revision, line.state) for line in lines)
    order = {r.revision: i for i, r in enumerate(revisions)}
    counts = tuple(
        StateCount(rev, state, n)
        for (rev, state), n in sorted(
            counted.items(),
            key=lambda kv: (order.get(kv[0][0] or "", -1), list(FleetState).index(kv[0][1])),
        )
    )
    stragglers = tuple(
        sorted(
            (line for line in lines if line.straggler is not None),
            key=lambda line: (
                list(Straggler).index(line.straggler or Straggler.FAILED),
                line.database,
            ),
        )
    )
    jobs: list[JobSummary] = []
    for job in JOBS.values():
        states = [
            (d.database, s)
            for d in statuses
            if not d.error
            for s in d.backfills
            if s.job == job.name
        ]
        if not states:
            continue
        slowest: tuple[str | None, float | None] = (None, None)
        for name, s in states:
            eta = s.history.eta_seconds if s.history is not None else None
            if s.state is ShownStatus.FINISHED or not s.remaining:
                continue
            if eta is not None and (slowest[1] is None or eta > slowest[1]):
                slowest = (name, eta)
            elif slowest[0] is None:
                slowest = (name, None)  # rows left, no rate yet (not started)
        jobs.append(
            JobSummary(
                job.name,
                len(states),
                sum(1 for _n, s in states if s.state is ShownStatus.FINISHED),
                sum(s.remaining or 0 for _n, s in states),
                any(s.estimate for _n, s in states),
                slowest[0],
                slowest[1],
            )
        )
    waves = tuple(
        WaveSummary(
            w.name,
            w.implied,
            sum(1 for line in lines if line.wave == w.name),
            sum(1 for line in lines if line.wave == w.name and line.state is FleetState.DONE),
            sum(
                1
                for line in lines
                if line.wave == w.name and line.state in (FleetState.FAILED, FleetState.UNREACHABLE)
            ),
        )
        for w in settings.waves
        if any(line.wave == w.name for line in lines)
    )
    return FleetSummary(
        head,
        selection.describe(),
        counts,
        stragglers,
        tuple(jobs),
        waves,
        lines,
        clock() - started,
    )
