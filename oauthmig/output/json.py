"""Every ``--format json`` document: the shapes, built from the services' results, in one place.

Each command prints one JSON document on stdout; its JSON Schema (draft 2020-12) ships in the
package as ``oauthmig/docs/schemas/<command>.schema.json`` and is checked by the tests against
real runs. The builders take plain data and return plain ``dict``/``list`` values:

=====================================  ===============================================
``status``                              :func:`status_to_dict`
``upgrade`` / ``downgrade``             :func:`runs_to_dict` (also with ``--dry-run``)
``upgrade`` / ``downgrade --sql``       :func:`sql_runs_to_list`
``history``                             :func:`history_to_list`
``backfill``                            :func:`backfill_to_dict` (also with ``--dry-run``)
``backfill --report``                   :func:`report_to_dict`
``backfill pause|resume|cancel``        :func:`requests_to_dict`
``prune-grants``                        :func:`prune_to_dict` (also with ``--dry-run``)
``check-redirect``                      :func:`check_reports_to_list`
``audit-redirects``                     :class:`JsonWriter` (streamed: findings, then summary)
interrupted (Ctrl-C, SIGTERM)           :func:`interrupted_to_dict`
=====================================  ===============================================

This module imports no service at run time (the types are for annotations only), so that the
redirect audit, which must not load Alembic, can write its JSON report from here.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from datetime import date, datetime
from typing import IO, TYPE_CHECKING, Any

from oauthmig.redact import mask_uri, mask_uris_in_text

if TYPE_CHECKING:
    from oauthmig.prune import PruneResult, PruneStats
    from oauthmig.redirects.audit import AuditFinding, AuditSummary
    from oauthmig.redirects.rules import UriReport
    from oauthmig.revision_types import RevisionInfo
    from oauthmig.rollout.backfill import BackfillResult, JobRun
    from oauthmig.rollout.batch_report import JobHistory
    from oauthmig.rollout.batches import BatchRow
    from oauthmig.rollout.control import RequestOutcome
    from oauthmig.rollout.runner import DatabaseRun, RunResult
    from oauthmig.rollout.stamp import StampResult
    from oauthmig.rollout.status import StatusReport
    from oauthmig.runlock import Held

__all__ = [
    "FINDING_FIELDS",
    "JsonWriter",
    "backfill_to_dict",
    "check_report_to_dict",
    "check_reports_to_list",
    "dumps_compact",
    "dumps_indented",
    "finding_to_dict",
    "held_to_dict",
    "history_to_list",
    "interrupted_to_dict",
    "percentile",
    "prune_to_dict",
    "report_to_dict",
    "requests_to_dict",
    "run_to_dict",
    "runs_to_dict",
    "sql_runs_to_list",
    "status_to_dict",
    "summary_to_dict",
    "to_json",
]

#: The fields of one audit finding, in document order (JSON keys and CSV header).
FINDING_FIELDS: tuple[str, ...] = (
    "database",
    "application_id",
    "client_id",
    "uri",
    "code",
    "name",
    "severity",
    "message",
    "normalized",
    "field",
)


def _default(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
    if isinstance(value, datetime | date):
        return value.isoformat()
    if isinstance(value, tuple | set | frozenset):
        return list(value)
    return str(value)


def to_json(value: Any) -> str:
    """Serialize dataclasses, tuples and datetimes as one JSON document."""
    return json.dumps(value, default=_default, indent=2, ensure_ascii=False)


# --------------------------------------------------------------------------- rollout


def run_to_dict(run: DatabaseRun) -> dict[str, Any]:
    """JSON shape of one database's upgrade or downgrade (run, dry run or ``--sql`` script)."""
    return {
        "database": run.database,
        "dialect": run.plan.dialect,
        "from": run.plan.current,
        "to": run.reached if run.reached is not None or run.error is None else None,
        "steps": [
            {
                "revision": s.revision,
                "action": s.action,
                "tables": list(s.tables),
                "adopted": list(s.adopted),
            }
            for s in (run.done or run.plan.steps)
        ],
        "waiting": (
            None
            if run.plan.waiting is None
            else {
                "revision": run.plan.waiting.revision,
                "job": run.plan.waiting.job,
                "remaining_rows": run.plan.waiting.remaining_rows,
                "jobs": [
                    {"job": job, "remaining_rows": rows} for job, rows in run.plan.waiting.jobs
                ],
                "estimate": run.plan.waiting.estimate,
            }
        ),
        "attempts": run.attempts,
        "seconds": round(run.seconds, 3),
        "error": None if run.error is None else run.error.message,
        "sql": run.sql,
        "skipped": None if run.held is None else held_to_dict(run.held),
    }


def held_to_dict(held: Held) -> dict[str, Any]:
    """JSON shape of a database skipped because another runner held its run lock."""
    return {"reason": "held", "pid": held.pid, "message": held.describe()}


def runs_to_dict(result: RunResult, *, dry_run: bool) -> dict[str, Any]:
    """JSON shape of ``upgrade`` and ``downgrade``, run or ``--dry-run``."""
    return {"dry_run": dry_run, "databases": [run_to_dict(r) for r in result.runs]}


def sql_runs_to_list(result: RunResult) -> list[dict[str, Any]]:
    """JSON shape of ``upgrade --sql`` and ``downgrade --sql``: one entry per database."""
    return [run_to_dict(r) for r in result.runs]


def history_to_list(revisions: Sequence[RevisionInfo]) -> list[dict[str, Any]]:
    """JSON shape of ``history``: the revisions, oldest first."""
    return [
        {
            "revision": r.revision,
            "down_revision": r.down_revision,
            "message": r.message,
            "tables": list(r.tables),
            "columns": [f"{c.table}.{c.name}" for c in r.columns],
            "requires_backfills": list(r.requires_backfills),
        }
        for r in revisions
    ]


def status_to_dict(report: StatusReport) -> dict[str, Any]:
    """JSON shape of ``status``."""
    from oauthmig.output.readiness import readiness_to_dict  # loads the config: status only

    return {
        "head": report.revisions[-1].revision if report.revisions else None,
        "outstanding": report.outstanding,
        "exact": report.exact,
        "drift": [
            {
                "revision": found.revision,
                "file_checksum": found.file_checksum,
                "recorded": dict(sorted(found.recorded.items())),
            }
            for found in report.drift
        ],
        "revisions": [
            {
                "revision": r.revision,
                "message": r.message,
                "tables": list(r.tables),
                "requires_backfills": list(r.requires_backfills),
            }
            for r in report.revisions
        ],
        "databases": [
            {
                "database": d.database,
                "dialect": d.dialect,
                "url": d.display_url,
                "tables": list(d.tables),
                "current": d.current,
                "error": d.error,
                "revisions": {
                    c.revision: {
                        "state": c.state,
                        "detail": c.detail,
                        "checksum": c.checksum,
                        "changed": c.changed,
                    }
                    for c in d.revisions
                },
                "backfills": [dataclasses.asdict(j) for j in d.backfills],
                "live_grants": d.live_grants,
                "live_grants_without_pkce": d.live_grants_without_pkce,
                "phase": None if d.phase is None else d.phase.value,
                "compat_tables": list(d.compat_tables),
                "verify": {
                    v.table: {
                        "status": v.status,
                        "rows_checked": v.rows_checked,
                        "problem": v.problem,
                        "finished_at": None if v.finished_at is None else v.finished_at.isoformat(),
                    }
                    for v in d.verify
                },
                "enforcement": readiness_to_dict(d.enforcement),
            }
            for d in report.databases
        ],
    }


def percentile(values: tuple[float, ...], q: float) -> float:
    """The q-quantile (0..1) of values by nearest rank; 0.0 for none."""
    if not values:
        return 0.0
    ordered = sorted(values)
    k = min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))
    return ordered[k]


def _job_dict(r: JobRun) -> dict[str, Any]:
    return {
        "job": r.job,
        "database": r.database,
        "status": r.status,
        "rows_changed": r.rows_changed,
        "rows_total": r.rows_total,
        "batches": r.batches,
        "seconds": round(r.seconds, 3),
        "rows_per_second": round(r.rows_changed / r.seconds, 1) if r.seconds > 0 else None,
        "batch_p50_seconds": round(percentile(r.batch_seconds, 0.5), 4),
        "batch_p99_seconds": round(percentile(r.batch_seconds, 0.99), 4),
        "estimated_seconds": r.estimated_seconds,
        "held_seconds": round(r.held_seconds, 3),
        "message": r.message,
    }


def backfill_to_dict(result: BackfillResult) -> dict[str, Any]:
    """JSON shape of ``backfill`` (run or ``--dry-run``)."""
    return {"dry_run": result.dry_run, "jobs": [_job_dict(r) for r in result.runs]}


def requests_to_dict(action: str, outcomes: Sequence[RequestOutcome]) -> dict[str, Any]:
    """JSON shape of ``backfill pause|resume|cancel``."""
    return {
        "action": action,
        "requests": [
            {
                "job": o.job,
                "database": o.database,
                "state": o.state,
                "running": o.running,
                "recorded": o.recorded,
                "effect": o.effect,
                "request": None
                if o.request is None
                else {"action": o.request.action, "by": o.request.by, "at": o.request.at},
            }
            for o in outcomes
        ],
    }


def _row_dict(r: BatchRow) -> dict[str, Any]:
    return dataclasses.asdict(r)


def report_to_dict(histories: Sequence[JobHistory]) -> dict[str, Any]:
    """JSON shape of ``backfill --report``."""
    return {
        "jobs": [
            {
                "database": h.database,
                "job": h.job,
                "error": h.error,
                "state": None if h.state is None else dataclasses.asdict(h.state),
                "summary": None if h.summary is None else _row_dict(h.summary),
                "recent": [_row_dict(r) for r in h.recent],
            }
            for h in histories
        ]
    }


def interrupted_to_dict(command: str | None, exit_code: int, message: str) -> dict[str, Any]:
    """The document a command with ``--format json`` leaves on stdout when Ctrl-C or SIGTERM
    stops it before it printed its own."""
    return {"interrupted": True, "command": command, "exit_code": exit_code, "message": message}


# --------------------------------------------------------------------------- redirect rules


def check_report_to_dict(report: UriReport) -> dict[str, Any]:
    """JSON shape of one ``check-redirect`` result (see the README); URIs are masked
    (:func:`oauthmig.redact.mask_uri`)."""
    return {
        "uri": mask_uri(report.uri),
        "app_type": report.app_type.value,
        "verdict": report.verdict,
        "normalized": None if report.normalized is None else mask_uri(report.normalized),
        "findings": [
            {
                "code": f.code,
                "name": f.name,
                "severity": f.severity.value,
                "message": mask_uris_in_text(f.message),
            }
            for f in report.findings
        ],
    }


def check_reports_to_list(reports: Sequence[UriReport]) -> list[dict[str, Any]]:
    """JSON shape of ``check-redirect``: one entry per URI, in argument order."""
    return [check_report_to_dict(r) for r in reports]


def finding_to_dict(finding: AuditFinding) -> dict[str, Any]:
    """JSON shape of one audit finding (see the README), keys in :data:`FINDING_FIELDS` order."""
    return {
        "database": finding.database,
        "application_id": finding.application_id,
        "client_id": finding.client_id,
        "uri": finding.uri,
        "code": finding.code,
        "name": finding.name,
        "severity": finding.severity.value,
        "message": finding.message,
        "normalized": finding.normalized,
        "field": finding.field,
    }


def summary_to_dict(summary: AuditSummary) -> dict[str, Any]:
    """JSON shape of an audit summary (also the SARIF run's ``properties.summary``)."""
    return {
        "applications_scanned": summary.applications_scanned,
        "uris_scanned": summary.uris_scanned,
        "metadata_urls_scanned": summary.metadata_urls_scanned,
        "live_grants_checked": summary.live_grants_checked,
        "findings": summary.findings,
        "by_severity": dict(summary.by_severity),
        "by_code": dict(summary.by_code),
        "ignored": dict(summary.ignored),
        "databases": [
            {
                "database": d.database,
                "applications": d.applications,
                "uris": d.uris,
                "metadata_urls": d.metadata_urls,
                "live_grants": d.live_grants,
                "grant_column_length": d.grant_column_length,
                "app_type_source": d.app_type_source,
            }
            for d in summary.databases
        ],
        "notes": list(summary.notes),
    }


def dumps_compact(value: Any) -> str:
    """One JSON value on one line (what the streamed documents hold per finding)."""
    return json.dumps(value, ensure_ascii=False)


def dumps_indented(value: Any, indent: str) -> str:
    """A JSON value indented by two spaces per level, continuation lines prefixed by
    ``indent`` (to nest it in a document written piece by piece)."""
    return json.dumps(value, ensure_ascii=False, indent=2).replace("\n", "\n" + indent)


class JsonWriter:
    """``audit-redirects --format json``: ``{"findings": [...], "summary": {...}}``, written
    incrementally with one finding per line, so that memory does not grow with the number of
    findings (hence the summary comes after them)."""

    def __init__(self, out: IO[str]) -> None:
        self._out = out
        self._first = True

    def begin(self) -> None:
        """Open the document and the findings list."""
        self._out.write('{\n  "findings": [')

    def finding(self, finding: AuditFinding) -> None:
        """Write one finding."""
        sep = "\n    " if self._first else ",\n    "
        self._out.write(sep + dumps_compact(finding_to_dict(finding)))
        self._first = False

    def end(self, summary: AuditSummary) -> None:
        """Close the findings list, write the summary and close the document."""
        close = "]" if self._first else "\n  ]"
        body = dumps_indented(summary_to_dict(summary), "  ")
        self._out.write(f'{close},\n  "summary": {body}\n}}\n')


_PRUNE_FIELDS = (
    "table",
    "cutoff",
    "deleted",
    "consumed_deleted",
    "batches",
    "kept",
    "kept_consumed",
    "retries",
    "seconds",
)


def _prune_stats(stats: PruneStats | None) -> dict[str, Any]:
    if stats is None:  # the database failed: every key is there, null
        return dict.fromkeys(_PRUNE_FIELDS)
    return {
        "table": stats.table,
        "cutoff": stats.cutoff.isoformat(),
        "deleted": stats.deleted,
        "consumed_deleted": stats.consumed,
        "batches": stats.batches,
        "kept": stats.kept,
        "kept_consumed": stats.kept_consumed,
        "retries": stats.retries,
        "seconds": round(stats.seconds, 3),
    }


def prune_to_dict(result: PruneResult) -> dict[str, Any]:
    """JSON shape of ``prune-grants`` (run or ``--dry-run``); a failed database has its
    error and every other key null."""
    return {
        "dry_run": result.dry_run,
        "older_than_seconds": result.older_than.total_seconds(),
        "batch": result.batch,
        "databases": [
            {"database": d.database, "error": d.error} | _prune_stats(d.stats)
            for d in result.databases
        ],
    }


def stamp_to_dict(result: StampResult) -> dict[str, Any]:
    """JSON shape of ``stamp``."""
    return {
        "target": result.target,
        "databases": [
            {
                "database": d.database,
                "dialect": d.dialect,
                "url": d.display_url,
                "from": d.current,
                "to": d.target,
                "stamped": [
                    {
                        "revision": s.revision,
                        "outcome": s.outcome,
                        "tables": list(s.tables),
                        "adopted": list(s.adopted),
                    }
                    for s in d.steps
                ],
            }
            for d in result.databases
        ],
    }
