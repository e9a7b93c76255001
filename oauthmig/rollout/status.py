"""Read-only state of every routed database: revisions, backfills, PKCE coverage of live grants.

Cheap on big tables: what backfills have left is read from their job rows and bounded index
ranges and shown as estimates where it is not counted (:mod:`oauthmig.rollout.remaining`);
``exact`` counts every pending row. Revision files that changed after they were applied are
reported as drift (:func:`oauthmig.rollout.revisions.drift`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import and_, column, func, inspect, select, table
from sqlalchemy.engine import Connection

from oauthmig.config import Settings
from oauthmig.db import connect, map_db_errors, open_engine, scrub_stored, set_timeouts
from oauthmig.errors import OauthmigError
from oauthmig.preflight import check_state
from oauthmig.privileges import Command
from oauthmig.revision_types import RevisionInfo, revision_position
from oauthmig.rollout.batches import as_utc
from oauthmig.rollout.compat import CompatTarget
from oauthmig.rollout.job_state import JobState, ShownStatus
from oauthmig.rollout.jobs import JOBS, job_states
from oauthmig.rollout.readiness import EnforcementReadiness, enforcement_readiness
from oauthmig.rollout.remaining import remaining
from oauthmig.rollout.revisions import Drift, drift, history
from oauthmig.rollout.runner import gate_for
from oauthmig.rollout.verify import Phase, compat_active, phase, read_verify
from oauthmig.same_database import check_distinct
from oauthmig.version_tables import STAMPED, read_log


@dataclass(frozen=True, slots=True)
class RevisionState:
    """One cell of the revision × database matrix."""

    revision: str
    state: str  # applied | skipped | pending | waiting | failed
    detail: str | None = None
    checksum: str | None = None  # of the revision file, as recorded when it was applied
    changed: bool = False  # the file's checksum differs from the recorded one (drift)


@dataclass(frozen=True, slots=True)
class VerifyState:
    """The recorded verify pass of one table (see :mod:`oauthmig.rollout.verify`)."""

    table: str
    status: str
    rows_checked: int
    problem: str | None
    finished_at: datetime | None


@dataclass(frozen=True, slots=True)
class DatabaseStatus:
    """Everything ``status`` knows about one database."""

    database: str
    dialect: str
    display_url: str
    tables: tuple[str, ...]
    current: str | None
    revisions: tuple[RevisionState, ...]
    backfills: tuple[JobState, ...]
    live_grants: int | None
    live_grants_without_pkce: int | None
    error: str | None = None
    drift: tuple[Drift, ...] = ()  # revisions whose file changed since they were applied here
    # Between old and new application code: expand | compat | finalized | contracted.
    phase: Phase | None = None
    compat_tables: tuple[str, ...] = ()  # where the compatibility triggers are installed
    verify: tuple[VerifyState, ...] = ()  # the last verify pass, per table
    # Observe mode's would-be rejections (None where the application table is not routed).
    enforcement: EnforcementReadiness | None = None

    def phase_brief(self) -> str:
        """``compat (compatibility triggers on token, application)`` and the like."""
        if self.phase is None:
            return "unknown"
        on = ", ".join(self.compat_tables)
        return f"{self.phase.value} (compatibility triggers on {on})" if on else self.phase.value

    @property
    def outstanding(self) -> bool:
        """True if anything is pending, waiting or failed (what ``--check`` fails on)."""
        if self.error:
            return True
        if any(r.state in ("pending", "waiting", "failed") for r in self.revisions):
            return True
        return any(j.state is not ShownStatus.FINISHED for j in self.backfills)


@dataclass(frozen=True, slots=True)
class StatusReport:
    """The revision × database matrix and per-database details."""

    revisions: tuple[RevisionInfo, ...]
    databases: tuple[DatabaseStatus, ...]
    drift: tuple[Drift, ...] = ()
    exact: bool = False  # backfill rows were counted, not estimated

    @property
    def outstanding(self) -> bool:
        """True if any database has outstanding work."""
        return any(d.outstanding for d in self.databases)

    def check_failure(self) -> str | None:
        """Why ``status --check`` fails (one line), or ``None``: drift first, then work."""
        if self.drift:
            more = len(self.drift) - 1
            return self.drift[0].describe() + (
                f" (and {more} more changed revision{'s' if more != 1 else ''})" if more else ""
            )
        if self.outstanding:
            return "outstanding work: pending, waiting or failed revisions or backfills"
        return None


def _live_grants(conn: Connection, settings: Settings, db: str) -> tuple[int | None, int | None]:
    if "grant" not in settings.tables_on(db):
        return None, None
    physical = settings.tables.physical("grant")
    names = {c["name"] for c in inspect(conn).get_columns(physical)}
    g = table(physical, column("expires_at"), column("code_challenge"), column("consumed_at"))
    live = g.c.expires_at > datetime.now(UTC)
    if "consumed_at" in names:  # revision 0005 keeps exchanged codes: those are not live
        live = and_(live, g.c.consumed_at.is_(None))
    total = conn.execute(select(func.count()).select_from(g).where(live)).scalar_one()
    if "code_challenge" not in names:
        without = total
    else:
        without = conn.execute(
            select(func.count()).select_from(g).where(and_(live, g.c.code_challenge.is_(None)))
        ).scalar_one()
    conn.rollback()
    return int(total), int(without)


def _revision_states(
    conn: Connection,
    settings: Settings,
    name: str,
    revisions: list[RevisionInfo],
    log: dict[str, dict[str, Any]],
    applied_upto: int,
    changed: set[str],
    exact: bool,
) -> list[RevisionState]:
    """Each revision's state on one database: applied (or adopted, stamped), failed, the first
    one waiting for its backfills, or pending."""
    db = settings.databases[name]
    cells: list[RevisionState] = []
    gate_found = False
    for i, rev in enumerate(revisions):
        row: dict[str, Any] = log.get(rev.revision, {})
        if i < applied_upto:
            state = str(row.get("outcome") or "applied")
            adopted = row.get("adopted")
            detail = str(row["detail"]) if row.get("detail") == STAMPED else None
            if adopted and detail is None:
                detail = f"adopted {adopted}"
            cells.append(
                RevisionState(
                    rev.revision,
                    state,
                    detail,
                    row.get("checksum"),
                    rev.revision in changed,
                )
            )
            continue
        if row.get("outcome") == "failed":
            detail = scrub_stored(row.get("detail"), db.url)
            cells.append(RevisionState(rev.revision, "failed", detail))
            continue
        if not gate_found:
            waiting = gate_for(conn, settings, name, rev, exact=exact, revisions=revisions)
            if waiting is not None:
                gate_found = True
                cells.append(RevisionState(rev.revision, "waiting", waiting.describe()))
                continue
        cells.append(RevisionState(rev.revision, "pending"))
    return cells


def _compat_layer(
    conn: Connection, settings: Settings, name: str, routed: Sequence[str]
) -> tuple[str, ...]:
    """The tables whose compatibility layer is in place on this database."""
    return tuple(
        compat_active(
            conn,
            CompatTarget(
                conn.dialect.name,
                name,
                {lg: settings.tables.physical(lg) for lg in routed},
                settings.backfill.client_metadata,
            ),
        )
    )


def _verify_states(conn: Connection) -> tuple[VerifyState, ...]:
    """What ``oauthmig verify`` recorded on this database, per table."""
    return tuple(
        VerifyState(
            str(v["table_name"]),
            str(v["status"]),
            int(v["rows_checked"]),
            v["problem"],
            as_utc(v["finished_at"]) if v["finished_at"] is not None else None,
        )
        for v in read_verify(conn).values()
    )


def _database_status(
    settings: Settings, name: str, revisions: list[RevisionInfo], exact: bool
) -> DatabaseStatus:
    db = settings.databases[name]
    routed = settings.tables_on(name)
    # A config error or a missing SQLite file fails the command (raised here, as every
    # command does); what goes wrong once the database is reached is reported in its row.
    with open_engine(settings, db) as engine:
        try:
            with map_db_errors(db), connect(engine, db) as conn:
                # Never wait behind a migration's lock (status runs from every CI job); only
                # --exact, which scans on request, may run longer than statement_timeout.
                timeout = 0 if exact else settings.migrate.statement_timeout_ms
                set_timeouts(conn, settings.migrate.lock_timeout_ms, timeout)
                if conn.in_transaction():
                    conn.commit()
                current = check_state(conn, settings, db, revisions, Command.STATUS)
                log = read_log(conn)
                applied_upto = revision_position(current, revisions)
                drifted = tuple(drift(revisions[:applied_upto], {name: log}))
                changed = {d.revision for d in drifted}
                cells = _revision_states(
                    conn, settings, name, revisions, log, applied_upto, changed, exact
                )
                left = {
                    job.name: remaining(conn, settings, name, job, exact=exact, revisions=revisions)
                    for job in JOBS.values()
                }
                jobs: list[JobState] = []
                jobs.extend(job_states(conn, settings, name, left))
                live, without = _live_grants(conn, settings, name)
                layer = _compat_layer(conn, settings, name, routed)
                applied = revisions[:applied_upto]
                stage = phase(
                    any(r.requires_backfills for r in applied),
                    any(r.columns for r in applied),
                    layer,
                )
                checked = _verify_states(conn)
                readiness = enforcement_readiness(conn, settings, name)
                if conn.in_transaction():
                    conn.rollback()
                return DatabaseStatus(
                    name,
                    conn.dialect.name,
                    db.display_url,
                    routed,
                    current,
                    tuple(cells),
                    tuple(jobs),
                    live,
                    without,
                    drift=drifted,
                    phase=stage,
                    compat_tables=layer,
                    verify=checked,
                    enforcement=readiness,
                )
        except OauthmigError as exc:
            return DatabaseStatus(
                name, db.dialect, db.display_url, routed, None, (), (), None, None, exc.message
            )


def status(
    settings: Settings,
    revisions: Sequence[RevisionInfo] | None = None,
    *,
    exact: bool = False,
) -> StatusReport:
    """Read the state of every selected database (never writes); ``revisions``: the
    invocation's catalogue, if it has one.

    ``exact``: count every pending backfill row (a full scan of each job's table) instead of
    estimating from the job rows and bounded index ranges.
    """
    revisions = list(history() if revisions is None else revisions)
    check_distinct(settings)
    databases = tuple(
        _database_status(settings, n, revisions, exact) for n in settings.database_names()
    )
    merged: dict[str, Drift] = {}
    for d in databases:
        for found in d.drift:
            seen = merged.get(found.revision)
            recorded = {**(seen.recorded if seen else {}), **found.recorded}
            merged[found.revision] = Drift(found.revision, found.file_checksum, recorded)
    order = [r.revision for r in revisions]
    return StatusReport(
        tuple(revisions),
        databases,
        tuple(sorted(merged.values(), key=lambda x: order.index(x.revision))),
        exact,
    )
