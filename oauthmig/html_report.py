"""What ``oauthmig report`` shows, gathered read-only from every selected database.

:func:`gather_report` checks every selected database first (as every command does: reachable,
routed tables present, known revision, applied columns present) and raises before reading
anything else. Then it collects, into one :class:`Report`:

* the revision × database matrix (:func:`oauthmig.rollout.status.status`);
* each backfill job with its progress and the timestamps its job table records
  (``started_at``, ``updated_at``, ``finished_at``), from which :class:`JobReport` derives an
  average rate (rows done / elapsed, pauses included: the job table records nothing finer) and
  an ETA for the rows left;
* PKCE readiness: live grants (``expires_at > now``) with and without a ``code_challenge`` per
  application, the applications that still send none first;
* the client metadata distribution: applications per ``token_endpoint_auth_method`` and per
  ``application_type`` (NULL is a row the client-metadata backfill has not reached);
* the redirect audit (:func:`oauthmig.redirects.audit.audit`): counts per rule and the findings,
  at most ``max_findings`` of them (the most severe first), the counts always covering every
  finding.

Nothing secret is read: no client secret, token or grant code is selected (the audit computes
``has_secret`` in SQL), and stored errors come through the status service, already scrubbed.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import DateTime, and_, bindparam, case, column, func, inspect, select, table
from sqlalchemy.engine import Connection

from oauthmig import tool_version
from oauthmig.config import Settings
from oauthmig.db import map_db_errors, open_database
from oauthmig.errors import DatabaseError
from oauthmig.privileges import Command
from oauthmig.redirects.audit import AuditFinding, AuditSummary
from oauthmig.redirects.audit import audit as run_audit
from oauthmig.redirects.rule_types import rule_help_uri
from oauthmig.redirects.rules import RULES
from oauthmig.rollout.revisions import Catalogue
from oauthmig.rollout.runner import check_databases
from oauthmig.rollout.status import StatusReport
from oauthmig.rollout.status import status as read_status

__all__ = [
    "DEFAULT_MAX_APPLICATIONS",
    "DEFAULT_MAX_FINDINGS",
    "METADATA_COLUMNS",
    "ApplicationPkce",
    "DatabaseMetadata",
    "DatabasePkce",
    "Distribution",
    "JobReport",
    "Report",
    "RuleCount",
    "gather_report",
]

#: Findings kept for the table of the report (the most severe first); counts cover all.
DEFAULT_MAX_FINDINGS = 10_000
#: Applications listed per database in the PKCE table (those without PKCE first).
DEFAULT_MAX_APPLICATIONS = 500
#: The client metadata columns whose values are counted.
METADATA_COLUMNS: tuple[str, ...] = ("token_endpoint_auth_method", "application_type")

_SEVERITY_RANK = {"error": 0, "warning": 1, "info": 2}
_JOB_TABLE = "oauthmig_backfill_job"

Progress = Callable[[str, int, int], None]


def _aware(value: Any) -> datetime | None:
    """A stored timestamp as an aware UTC datetime (SQLite hands back naive UTC values)."""
    if not isinstance(value, datetime):
        return None
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


@dataclass(frozen=True, slots=True)
class JobReport:
    """One backfill job on one database: its state and counts (as ``status`` shows them) and
    the timestamps of its job-table row (None when the job has never run there)."""

    database: str
    job: str
    state: str
    rows_done: int
    rows_total: int | None
    remaining: int | None
    started_at: datetime | None = None
    updated_at: datetime | None = None
    finished_at: datetime | None = None
    last_error: str | None = None

    @property
    def done_fraction(self) -> float | None:
        """Share of the job's rows done, 0..1: rows done / (rows done + rows left); 1 when
        nothing is left; None while its columns do not exist yet."""
        if self.remaining is None:
            return None
        total = self.rows_done + self.remaining
        return 1.0 if total == 0 else self.rows_done / total

    @property
    def elapsed_seconds(self) -> float | None:
        """Seconds from ``started_at`` to ``finished_at`` (or the last ``updated_at``)."""
        end = self.finished_at or self.updated_at
        if self.started_at is None or end is None:
            return None
        return max(0.0, (end - self.started_at).total_seconds())

    @property
    def rows_per_second(self) -> float | None:
        """Average rate since the job started (pauses included); None before any row or when
        no time has passed."""
        elapsed = self.elapsed_seconds
        if not elapsed or self.rows_done <= 0:
            return None
        return self.rows_done / elapsed

    @property
    def eta_seconds(self) -> float | None:
        """Seconds the rows left take at :attr:`rows_per_second` (0 when none are left; None
        when there is no rate to go by)."""
        if self.remaining is None:
            return None
        if self.remaining == 0:
            return 0.0
        rate = self.rows_per_second
        return None if rate is None else self.remaining / rate


@dataclass(frozen=True, slots=True)
class ApplicationPkce:
    """Live grants of one application: how many carry a PKCE ``code_challenge``.
    ``client_id`` and ``name`` are None when the application table is not on the database
    hosting the grants (or has no such row)."""

    application_id: int | None
    client_id: str | None
    name: str | None
    live_grants: int
    without_challenge: int

    @property
    def with_challenge(self) -> int:
        """Live grants that carry a challenge."""
        return self.live_grants - self.without_challenge

    @property
    def readiness(self) -> str:
        """``none`` (no live grant has a challenge), ``partial`` or ``all``."""
        if self.without_challenge == self.live_grants:
            return "none"
        return "partial" if self.without_challenge else "all"


@dataclass(frozen=True, slots=True)
class DatabasePkce:
    """PKCE readiness on one database hosting ``grant``. ``challenge_column`` is False before
    the expand revision added ``code_challenge`` (then no grant has one). ``listed`` holds at
    most ``max_applications`` applications, those with the most live grants without a
    challenge first."""

    database: str
    challenge_column: bool
    live_grants: int
    without_challenge: int
    applications: int
    applications_without_pkce: int
    applications_partial: int
    listed: tuple[ApplicationPkce, ...]

    @property
    def with_challenge(self) -> int:
        """Live grants that carry a challenge."""
        return self.live_grants - self.without_challenge

    @property
    def applications_all_pkce(self) -> int:
        """Applications whose live grants all carry a challenge."""
        return self.applications - self.applications_without_pkce - self.applications_partial


@dataclass(frozen=True, slots=True)
class Distribution:
    """Applications per value of one metadata column (``None``: not backfilled yet), most
    frequent first. ``present`` is False before the expand revision added the column."""

    column: str
    present: bool
    counts: tuple[tuple[str | None, int], ...]


@dataclass(frozen=True, slots=True)
class DatabaseMetadata:
    """The client metadata distribution on one database hosting ``application``."""

    database: str
    applications: int
    distributions: tuple[Distribution, ...]


@dataclass(frozen=True, slots=True)
class RuleCount:
    """Findings of one rule, with where the rule is documented."""

    code: str
    name: str
    severity: str
    summary: str
    count: int
    help_uri: str


@dataclass(frozen=True, slots=True)
class Report:
    """Everything the HTML report shows. ``findings`` holds at most the ``max_findings`` most
    severe findings, in audit order; ``audit`` counts them all. ``audited`` is False when no
    selected database hosts ``application``."""

    generated_at: datetime
    tool_version: str
    config_source: str
    docs_url: str
    status: StatusReport
    jobs: tuple[JobReport, ...]
    pkce: tuple[DatabasePkce, ...]
    metadata: tuple[DatabaseMetadata, ...]
    audited: bool
    audit: AuditSummary
    rules: tuple[RuleCount, ...]
    findings: tuple[AuditFinding, ...]

    @property
    def findings_left_out(self) -> int:
        """Findings counted but not in :attr:`findings` (over ``max_findings``)."""
        return self.audit.findings - len(self.findings)


# --------------------------------------------------------------------------- reading


@dataclass(frozen=True, slots=True)
class _JobTimes:
    started_at: datetime | None
    updated_at: datetime | None
    finished_at: datetime | None


def _job_times(conn: Connection) -> dict[str, _JobTimes]:
    if not inspect(conn).has_table(_JOB_TABLE):
        return {}
    t = table(
        _JOB_TABLE,
        column("job"),
        column("started_at", DateTime(timezone=True)),
        column("updated_at", DateTime(timezone=True)),
        column("finished_at", DateTime(timezone=True)),
    )
    rows = conn.execute(select(t.c.job, t.c.started_at, t.c.updated_at, t.c.finished_at)).all()
    return {
        str(job): _JobTimes(_aware(started), _aware(updated), _aware(finished))
        for job, started, updated, finished in rows
    }


def _pkce(
    conn: Connection, settings: Settings, database: str, now: datetime, limit: int
) -> DatabasePkce:
    grant_name = settings.tables.grant
    have = {c["name"] for c in inspect(conn).get_columns(grant_name)}
    has_challenge = "code_challenge" in have
    g = table(
        grant_name,
        column("application_id"),
        column("expires_at", DateTime(timezone=True)),
        column("code_challenge"),
    )
    live = g.c.expires_at > bindparam("now", now, type_=DateTime(timezone=True))
    without = (
        func.sum(case((g.c.code_challenge.is_(None), 1), else_=0))
        if has_challenge
        else func.count()
    )
    per_app = (
        select(
            g.c.application_id.label("app"),
            func.count().label("live"),
            without.label("without"),
        )
        .where(live)
        .group_by(g.c.application_id)
        .subquery()
    )
    totals = conn.execute(
        select(
            func.count(),
            func.coalesce(func.sum(per_app.c.live), 0),
            func.coalesce(func.sum(per_app.c.without), 0),
            func.coalesce(func.sum(case((per_app.c.without == per_app.c.live, 1), else_=0)), 0),
            func.coalesce(
                func.sum(
                    case(
                        (and_(per_app.c.without > 0, per_app.c.without < per_app.c.live), 1),
                        else_=0,
                    )
                ),
                0,
            ),
        ).select_from(per_app)
    ).one()
    n_apps, n_live, n_without, n_none, n_partial = (int(v) for v in totals)
    listed: list[ApplicationPkce] = []
    if limit > 0 and n_apps:
        columns: list[Any] = [per_app.c.app, per_app.c.live, per_app.c.without]
        query: Any
        if "application" in settings.tables_on(database):
            app_name = settings.tables.application
            app_cols = {c["name"] for c in inspect(conn).get_columns(app_name)}
            a = table(app_name, column("id"), column("client_id"), column("name"))
            columns.append(a.c.client_id)
            if "name" in app_cols:
                columns.append(a.c.name)
            query = select(*columns).select_from(per_app.outerjoin(a, a.c.id == per_app.c.app))
        else:
            query = select(*columns)
        query = query.order_by(
            per_app.c.without.desc(), per_app.c.live.desc(), per_app.c.app
        ).limit(limit)
        for row in conn.execute(query).mappings():
            client_id = row.get("client_id")
            name = row.get("name")
            listed.append(
                ApplicationPkce(
                    None if row["app"] is None else int(row["app"]),
                    None if client_id is None else str(client_id),
                    None if name is None else str(name),
                    int(row["live"]),
                    int(row["without"]),
                )
            )
    return DatabasePkce(
        database, has_challenge, n_live, n_without, n_apps, n_none, n_partial, tuple(listed)
    )


def _metadata(conn: Connection, settings: Settings, database: str) -> DatabaseMetadata:
    app_name = settings.tables.application
    have = {c["name"] for c in inspect(conn).get_columns(app_name)}
    total = int(conn.execute(select(func.count()).select_from(table(app_name))).scalar_one())
    distributions: list[Distribution] = []
    for name in METADATA_COLUMNS:
        if name not in have:
            distributions.append(Distribution(name, False, ()))
            continue
        t = table(app_name, column(name))
        col = t.c[name]
        rows = conn.execute(select(col, func.count()).group_by(col)).all()
        counts = sorted(
            ((None if v is None else str(v), int(n)) for v, n in rows),
            key=lambda item: (-item[1], item[0] is None, item[0] or ""),
        )
        distributions.append(Distribution(name, True, tuple(counts)))
    return DatabaseMetadata(database, total, tuple(distributions))


def _database_extras(
    settings: Settings, database: str, now: datetime, max_applications: int
) -> tuple[dict[str, _JobTimes], DatabasePkce | None, DatabaseMetadata | None]:
    db = settings.databases[database]
    routed = settings.tables_on(database)
    with map_db_errors(db, "cannot read the report's data"), open_database(settings, db) as conn:
        times = _job_times(conn)
        pkce = _pkce(conn, settings, database, now, max_applications) if "grant" in routed else None
        meta = _metadata(conn, settings, database) if "application" in routed else None
        if conn.in_transaction():
            conn.rollback()
        return times, pkce, meta


def _keep_most_severe(findings: Iterable[AuditFinding], limit: int) -> tuple[AuditFinding, ...]:
    """The ``limit`` most severe findings of the stream (earlier ones first among equals),
    in stream order; memory holds at most ``limit`` findings."""
    if limit <= 0:
        for _ in findings:
            pass
        return ()
    heap: list[tuple[int, int, AuditFinding]] = []
    for seq, finding in enumerate(findings):
        item = (-_SEVERITY_RANK[finding.severity.value], -seq, finding)
        if len(heap) < limit:
            heapq.heappush(heap, item)
        elif item > heap[0]:
            heapq.heapreplace(heap, item)
    return tuple(f for _, _, f in sorted(heap, key=lambda item: -item[1]))


def gather_report(
    settings: Settings,
    *,
    now: datetime | None = None,
    max_findings: int = DEFAULT_MAX_FINDINGS,
    max_applications: int = DEFAULT_MAX_APPLICATIONS,
    progress: Progress | None = None,
    catalogue: Catalogue | None = None,
) -> Report:
    """Read everything the report shows from every selected database (never writes).

    Every database is checked first (:func:`oauthmig.rollout.runner.check_databases`): an
    unreachable or broken one raises :class:`~oauthmig.errors.DatabaseError` before anything
    else is read. ``now`` decides which grants are live (default: the current time);
    ``progress`` is called by the audit after each batch of applications.
    """
    if max_findings < 0 or max_applications < 0:
        raise ValueError("max_findings and max_applications must not be negative")
    moment = now or datetime.now(UTC)
    revisions = (catalogue or Catalogue.load()).revisions
    check_databases(settings, None, revisions, Command.REPORT)
    audit = run_audit(settings, revisions=revisions, now=moment, progress=progress)
    state = read_status(settings, revisions)
    broken = [d for d in state.databases if d.error]
    if broken:
        more = f" (and {len(broken) - 1} more)" if len(broken) > 1 else ""
        raise DatabaseError(f"{broken[0].error}{more}")
    jobs: list[JobReport] = []
    pkce: list[DatabasePkce] = []
    metadata: list[DatabaseMetadata] = []
    for d in state.databases:
        times, db_pkce, db_meta = _database_extras(settings, d.database, moment, max_applications)
        for j in d.backfills:
            t = times.get(j.job) if j.rows_total is not None else None
            jobs.append(
                JobReport(
                    d.database,
                    j.job,
                    j.state,
                    j.rows_done,
                    j.rows_total,
                    j.remaining,
                    t.started_at if t else None,
                    t.updated_at if t else None,
                    t.finished_at if t else None,
                    j.last_error,
                )
            )
        if db_pkce is not None:
            pkce.append(db_pkce)
        if db_meta is not None:
            metadata.append(db_meta)
    findings = _keep_most_severe(iter(audit), max_findings)
    summary = audit.summary()
    rules = tuple(
        RuleCount(
            code,
            RULES[code].name,
            RULES[code].severity.value,
            RULES[code].summary,
            count,
            rule_help_uri(RULES[code], settings.audit.docs_url),
        )
        for code, count in summary.by_code.items()
    )
    return Report(
        generated_at=moment,
        tool_version=tool_version(),
        config_source=settings.source,
        docs_url=settings.audit.docs_url,
        status=state,
        jobs=tuple(jobs),
        pkce=tuple(pkce),
        metadata=tuple(metadata),
        audited=bool(audit.databases),
        audit=summary,
        rules=rules,
        findings=findings,
    )
