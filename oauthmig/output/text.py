"""Consoles and renderers: rich tables and progress for people, JSON for machines.

One ``Console`` per stream. When JSON goes to stdout, everything human goes to stderr.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import unicodedata
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import date, datetime
from typing import IO, Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from oauthmig.redirects.audit import AuditFinding, AuditSummary
from oauthmig.redirects.rules import RULES, Severity, UriReport
from oauthmig.rollout.backfill import BackfillResult, JobRun
from oauthmig.rollout.revisions import RevisionInfo
from oauthmig.rollout.runner import DatabasePlan, DatabaseRun, RunResult
from oauthmig.rollout.status import StatusReport


@dataclass(frozen=True, slots=True)
class Consoles:
    """The stdout and stderr consoles of one CLI invocation."""

    out: Console
    err: Console
    quiet: bool = False
    verbose: bool = False

    @classmethod
    def create(cls, *, quiet: bool = False, verbose: bool = False) -> Consoles:
        """Consoles on the real streams (colour only on terminals)."""
        return cls(
            Console(file=sys.stdout, highlight=False, soft_wrap=True),
            Console(file=sys.stderr, highlight=False, soft_wrap=True),
            quiet,
            verbose,
        )

    def human(self, json_on_stdout: bool) -> Console:
        """Where human-readable text goes: stderr when stdout carries JSON."""
        return self.err if json_on_stdout else self.out

    def info(self, message: str, json_on_stdout: bool = False) -> None:
        """A human line, unless ``--quiet``."""
        if not self.quiet:
            self.human(json_on_stdout).print(message)

    def error(self, message: str) -> None:
        """A one-line error on stderr."""
        self.err.print(f"[bold red]error:[/] {escape(message)}")


def plain_console(file: IO[str], width: int = 120) -> Console:
    """A console that writes plain text (no colour, no terminal codes) to a file."""
    return Console(file=file, width=width, highlight=False, no_color=True, color_system=None)


def escape(text: str) -> str:
    """Escape rich markup in text that comes from data or errors."""
    from rich.markup import escape as _escape

    return _escape(text)


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


_PLAIN_MIN_COLUMN = 4  # narrowest a wrapping column may get before the plain layout is used


def _cell_width(cell: object) -> int:
    if isinstance(cell, str):
        from rich.text import Text

        return max((Text.from_markup(line).cell_len for line in cell.split("\n")), default=0)
    return 0


def print_table(console: Console, table: Table) -> None:
    """Print ``table`` without ever cutting the columns marked ``no_wrap`` (identifiers,
    database names, statuses, rule codes).

    Not a terminal (a pipe, a CI log, a file): the table is as wide as its content, nothing
    is wrapped or cut. A terminal: other columns wrap to make room; if even the ``no_wrap``
    columns do not fit, every row is printed as plain ``header: value`` lines instead.
    """
    if not console.is_terminal:
        natural = console.measure(table, options=console.options.update_width(100_000))
        saved = console.width
        console.width = max(saved, natural.maximum)
        try:
            console.print(table)
        finally:
            console.width = saved
        return
    needed = 1  # left border
    for column in table.columns:
        if column.no_wrap:
            width = max([_cell_width(column.header), *map(_cell_width, column.cells)])
        else:
            width = _PLAIN_MIN_COLUMN
        needed += max(width, column.min_width or 0) + 3  # padding and border
    if needed <= console.width:
        for column in table.columns:
            if not column.no_wrap:
                column.overflow = "fold"  # a long word is folded onto the next line, not cut
        console.print(table)
        return
    _print_plain(console, table)


def _print_plain(console: Console, table: Table) -> None:
    if table.title:
        console.print(table.title)
    headers = [str(c.header) for c in table.columns]
    columns = [list(c.cells) for c in table.columns]
    for i in range(table.row_count):
        for header, cells in zip(headers, columns, strict=True):
            cell = cells[i]
            if isinstance(cell, str) and cell:
                value = cell.replace("\n", " ")
                if not header:
                    console.print(value)
                elif len(header) + 2 + _cell_width(value) <= console.width:
                    console.print(f"{header}: {value}")
                else:  # the value on a line of its own, so that short values stay whole
                    console.print(f"{header}:")
                    console.print(f"  {value}")
        console.print()


@contextmanager
def progress_bar(console: Console, enabled: bool) -> Iterator[Callable[[str, int, int], None]]:
    """A rich progress bar (rows, rate, ETA); yields ``update(label, done, total)``."""
    if not enabled or not console.is_terminal:
        yield lambda _label, _done, _total: None
        return
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rate]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=console, transient=False) as bar:
        tasks: dict[str, TaskID] = {}

        def update(label: str, done: int, total: int) -> None:
            if label not in tasks:
                tasks[label] = bar.add_task(label, total=total or None, rate="")
            task = tasks[label]
            elapsed = bar.tasks[task].elapsed or 0.0
            rate = f"{done / elapsed:,.0f} rows/s" if elapsed > 0 else ""
            bar.update(task, completed=done, total=total or None, rate=rate)

        yield update


# --------------------------------------------------------------------------- renderers

_STATE_STYLE = {
    "applied": "green",
    "skipped": "dim",
    "pending": "yellow",
    "waiting": "cyan",
    "failed": "bold red",
    "finished": "green",
    "running": "yellow",
    "paused": "yellow",
    "not started": "yellow",
}


def render_plan(console: Console, plans: list[DatabasePlan | str], direction: str) -> None:
    """The database × revision plan, printed before anything is changed."""
    table = Table(title=f"{direction} plan", title_justify="left", show_lines=False)
    table.add_column("database", no_wrap=True)
    table.add_column("from", no_wrap=True)
    table.add_column("to", no_wrap=True)
    table.add_column("steps")
    for p in plans:
        if isinstance(p, str):
            table.add_row("?", "", "", f"[red]{escape(p)}[/]")
            continue
        steps = ", ".join(
            f"{s.revision} {s.action}" + (f" ({'+'.join(s.tables)})" if s.tables else "")
            for s in p.steps
        )
        if p.waiting:
            sep = ", " if steps else ""
            steps += f"{sep}[cyan]stops before {p.waiting.revision}: {p.waiting.describe()}[/]"
        table.add_row(
            p.database, p.current or "base", p.target or "base", steps or "[dim]up to date[/]"
        )
    print_table(console, table)


def render_run(console: Console, result: RunResult, command: str = "oauthmig") -> None:
    """Summary after an upgrade or downgrade; ``command`` prefixes the advice printed
    (``oauthmig --config FILE``)."""
    waiting: list[str] = []
    for run in result.runs:
        if run.error:
            continue
        if not run.done and not run.plan.steps:
            console.print(f"{run.database}: up to date at {run.reached or 'base'}")
        else:
            parts = []
            for s in run.done:
                label = {
                    "apply": "applied",
                    "skip": "skipped (not routed)",
                    "revert": "reverted",
                }.get(s.action, s.action)
                extra = f", adopted {', '.join(s.adopted)}" if s.adopted else ""
                parts.append(f"{s.revision} {label}{extra}")
            console.print(
                f"{run.database}: {'; '.join(parts) or 'nothing to do'} -> now at "
                f"{run.reached or 'base'} ({run.seconds:.1f}s, "
                f"{run.attempts} attempt{'s' if run.attempts != 1 else ''})"
            )
        if run.plan.waiting:
            w = run.plan.waiting
            waiting.append(run.database)
            console.print(f"{run.database}: [cyan]waiting[/] before {w.revision}: {w.describe()}")
    if waiting:
        only = " ".join(f"-d {escape(name)}" for name in waiting)
        console.print(
            f"run `{escape(command)} backfill {only}`, then `{escape(command)} upgrade` again"
        )


def render_dry_run(console: Console, result: RunResult) -> None:
    """Per database: pending revisions and the SQL they would run."""
    for run in result.runs:
        if run.error:
            continue
        console.rule(
            f"{run.database} ({run.plan.dialect}): "
            f"{run.plan.current or 'base'} -> {run.plan.target or 'base'}"
        )
        if not run.plan.steps:
            console.print("nothing to do")
        else:
            console.print(escape(run.sql or ""), end="")
        if run.plan.waiting:
            w = run.plan.waiting
            console.print(f"-- stops before {w.revision}: {w.describe()}")


def sql_section(run: DatabaseRun) -> str:
    """One database's ``--sql`` script, headed by its name."""
    return (
        f"-- ===== database: {run.database} ({run.plan.dialect}, "
        f"{run.plan.current or 'base'} -> {run.plan.target or 'base'}) =====\n\n"
        + (run.sql or "-- nothing to do\n")
    )


def sql_script(result: RunResult) -> str:
    """``--sql`` output: one commented section per database."""
    return "\n".join(sql_section(run) for run in result.runs if not run.error)


def render_status(console: Console, report: StatusReport) -> None:
    """The revision × database matrix, then backfills and PKCE coverage."""
    table = Table(title="revisions", title_justify="left")
    table.add_column("revision")
    table.add_column("touches")
    for d in report.databases:
        table.add_column(escape(d.database), no_wrap=True)
    for i, rev in enumerate(report.revisions):
        cells = []
        for d in report.databases:
            if d.error:
                cells.append("[red]error[/]")
                continue
            cell = d.revisions[i]
            style = _STATE_STYLE.get(cell.state, "")
            text = cell.state if cell.state != "skipped" else "skipped: not routed"
            if cell.changed:
                text, style = f"{text} (file changed)", "bold red"
            cells.append(f"[{style}]{text}[/]" if style else text)
        table.add_row(f"{rev.revision} {escape(rev.message)}", ", ".join(rev.tables), *cells)
    print_table(console, table)
    for found in report.drift:
        console.print(f"[bold red]drift:[/] {escape(found.describe())}")
    for d in report.databases:
        if d.error:
            continue  # the caller reports it once, on stderr
        for cell in d.revisions:
            if cell.detail and cell.state in ("waiting", "failed"):
                console.print(f"{d.database} {cell.revision} {cell.state}: {escape(cell.detail)}")
        for job in d.backfills:
            total = "?" if job.rows_total is None else f"{job.rows_total:,}"
            approx = "~" if job.estimate else ""
            line = (
                f"{d.database} backfill {job.job}: {job.state}, {job.rows_done:,}/{total} rows"
                + (f", {approx}{job.remaining:,} remaining" if job.remaining else "")
                + (" (estimated; `status --exact` counts)" if job.estimate else "")
            )
            if job.last_error:
                line += f", last error: {job.last_error}"
            console.print(escape(line))
        if d.live_grants is not None:
            console.print(
                f"{d.database}: {d.live_grants_without_pkce:,} of {d.live_grants:,} "
                "live grants have no PKCE challenge"
            )


def render_history(console: Console, revisions: list[RevisionInfo]) -> None:
    """Revisions with the tables they touch and the backfills they require."""
    table = Table(title="revisions (oldest first)", title_justify="left")
    for name in ("revision", "description", "touches", "columns", "requires backfill"):
        table.add_column(name, no_wrap=name == "revision")
    for rev in revisions:
        cols = ", ".join(f"{c.table}.{c.name}" for c in rev.columns)
        table.add_row(
            rev.revision,
            escape(rev.message),
            ", ".join(rev.tables),
            cols,
            ", ".join(rev.requires_backfills) or "-",
        )
    print_table(console, table)


def run_to_dict(run: DatabaseRun) -> dict[str, Any]:
    """JSON shape of one database's run."""
    return {
        "database": run.database,
        "dialect": run.plan.dialect,
        "from": run.plan.current,
        "to": run.reached if run.reached is not None or not run.error else None,
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
        "error": run.error,
        "sql": run.sql,
    }


def status_to_dict(report: StatusReport) -> dict[str, Any]:
    """JSON shape of ``status``."""
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
        "message": r.message,
    }


def backfill_to_dict(result: BackfillResult) -> dict[str, Any]:
    """JSON shape of ``backfill``."""
    return {"dry_run": result.dry_run, "jobs": [_job_dict(r) for r in result.runs]}


def render_backfill(console: Console, result: BackfillResult) -> None:
    """One row per job and database."""
    title = "backfill (dry run: nothing written)" if result.dry_run else "backfill"
    table = Table(title=title, title_justify="left")
    cols = ["job", "database", "status", "rows to change" if result.dry_run else "rows changed"]
    cols += ["estimate"] if result.dry_run else ["batches", "time", "rows/s", "p50/p99 batch"]
    for name in cols:
        table.add_column(name, no_wrap=name in ("job", "database", "status"))
    for r in result.runs:
        style = _STATE_STYLE.get(r.status, "")
        status = f"[{style}]{r.status}[/]" if style else r.status
        if result.dry_run:
            est = f"~{r.estimated_seconds:,.1f}s" if r.estimated_seconds is not None else "-"
            table.add_row(
                r.job,
                escape(r.database),
                status,
                f"{r.rows_changed:,}",
                est + (f" ({escape(r.message)})" if r.message else ""),
            )
        else:
            rate = f"{r.rows_changed / r.seconds:,.0f}" if r.seconds > 0 else "-"
            table.add_row(
                r.job,
                escape(r.database),
                status,
                f"{r.rows_changed:,}",
                str(r.batches),
                f"{r.seconds:.1f}s",
                rate,
                f"{percentile(r.batch_seconds, 0.5):.3f}/{percentile(r.batch_seconds, 0.99):.3f}s",
            )
    print_table(console, table)
    # Failures are reported once, on stderr, by the caller.
    for r in result.runs:
        if r.status == "paused":
            console.print(f"{r.database} {r.job}: paused; state saved, rerun to resume")


# --------------------------------------------------------------------------- redirect rules

_SEVERITY_STYLE = {Severity.ERROR: "bold red", Severity.WARNING: "yellow", Severity.INFO: "cyan"}
_VERDICT_STYLE = {"pass": "bold green", "warn": "bold yellow", "fail": "bold red"}
_NAMED_ESCAPES = {"\t": "\\t", "\n": "\\n", "\r": "\\r"}


def _visible_char(ch: str) -> str:
    if ch in _NAMED_ESCAPES:
        return _NAMED_ESCAPES[ch]
    if ch == " " or unicodedata.category(ch) not in ("Cc", "Cf", "Zs", "Zl", "Zp", "Cs", "Cn"):
        return ch
    code = ord(ch)
    if code < 0x100:
        return f"\\x{code:02x}"
    return f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"


def show(value: str) -> str:
    """Stored data made safe for a terminal: control, format (bidi) and unusual space
    characters spelled as escapes (so a URI with a tab or an ANSI escape can neither hide the
    problem nor drive the terminal), then rich markup escaped."""
    if value.isprintable() and value.isascii():
        return escape(value)
    return escape("".join(_visible_char(ch) for ch in value))


def _severity(severity: Severity) -> str:
    return f"[{_SEVERITY_STYLE[severity]}]{severity.value}[/]"


def render_uri_reports(console: Console, reports: Sequence[UriReport]) -> None:
    """``check-redirect`` text: per URI its verdict, normalized form and findings."""
    for report in reports:
        verdict = report.verdict
        console.print(
            f"[{_VERDICT_STYLE[verdict]}]{verdict.upper():<4}[/] {show(report.uri)} "
            f"[dim]({report.app_type.value} app)[/]"
        )
        normalized = "-" if report.normalized is None else show(report.normalized)
        console.print(f"     [dim]normalized:[/] {normalized}")
        for f in report.findings:
            console.print(f"     {f.code} {f.name} {_severity(f.severity)}: {show(f.message)}")
    counts = {v: sum(1 for r in reports if r.verdict == v) for v in ("pass", "warn", "fail")}
    console.print(
        f"{len(reports)} URI{'s' if len(reports) != 1 else ''}: "
        + ", ".join(f"[{_VERDICT_STYLE[v]}]{n} {v}[/]" for v, n in counts.items())
    )


_AuditRow = tuple[str, str, str]


def _audit_table(console: Console, first: bool, rows: Sequence[tuple[AuditFinding, bool]]) -> Table:
    table = Table(
        title="redirect URI audit" if first else None,
        title_justify="left",
        show_header=first,
        expand=True,
    )
    # Wide enough that "database #id" and "RU001 warning" stay on one line and a client id
    # takes at most three lines; the URI column gets the rest.
    app_w = max(
        max(len(f"{f.database} #{f.application_id}") for f, _ in rows),
        -(-max(len(f.client_id) for f, _ in rows) // 3),
        12,
    )
    rule_w = max(max(len(f"{f.code} {f.severity.value}") for f, _ in rows), 14)
    table.add_column("application", width=app_w, overflow="fold")
    table.add_column("rule", width=rule_w, overflow="fold")
    table.add_column("URI and finding", ratio=1, overflow="fold", min_width=10)
    return table


def _audit_cells(f: AuditFinding, first_of_app: bool) -> _AuditRow:
    app_cell = (
        f"{escape(f.database)} [bold]#{f.application_id}[/]\n[dim]{show(f.client_id)}[/]"
        if first_of_app
        else ""
    )
    rule_cell = f"{f.code} {_severity(f.severity)}\n{f.name}"
    detail = show(f.message)
    if f.uri is not None:
        detail = f"{show(f.uri)}\n[dim]{detail}[/]"
    return app_cell, rule_cell, detail


def _print_audit_chunk(
    console: Console, rows: list[tuple[AuditFinding, bool]], first: bool
) -> None:
    table = _audit_table(console, first, rows)
    needed = sum((c.width or 10) + 3 for c in table.columns) + 1
    if not console.is_terminal or needed > console.width:
        # Piped (a table would be as wide as the longest URI) or a terminal too narrow for a
        # table that cuts nothing: plain aligned blocks, one per application.
        if first:
            console.print("redirect URI audit")
        for f, first_of_app in rows:
            if first_of_app:
                console.print(
                    f"{escape(f.database)} [bold]#{f.application_id}[/] "
                    f"[dim]client_id {show(f.client_id)}[/]"
                )
            severity = f"[{_SEVERITY_STYLE[f.severity]}]{f.severity.value:<7}[/]"
            uri = "" if f.uri is None else f" {show(f.uri)}"
            console.print(f"  {f.code} {severity} {f.name}:{uri}")
            console.print(f"  {'':13} [dim]{show(f.message)}[/]")
        return
    previous: AuditFinding | None = None
    for f, first_of_app in rows:
        if first_of_app and previous is not None:
            table.add_section()
        table.add_row(*_audit_cells(f, first_of_app))
        previous = f
    print_table(console, table)


_SEVERITY_RANK = {Severity.INFO: 0, Severity.WARNING: 1, Severity.ERROR: 2}


def at_least(severity: Severity, minimum: str) -> bool:
    """Whether ``severity`` is ``minimum`` (error, warning or info) or worse."""
    return _SEVERITY_RANK[severity] >= _SEVERITY_RANK[Severity(minimum)]


def render_audit_findings(
    console: Console,
    findings: Iterable[AuditFinding],
    *,
    chunk_applications: int = 200,
    min_severity: str = "info",
) -> int:
    """Stream ``audit-redirects`` findings of ``min_severity`` or worse as tables grouped by
    application: a table is printed every ``chunk_applications`` applications, so memory
    stays bounded. Nothing is cut: piped, the table is as wide as its content; on a
    terminal, a client id takes at most three lines. Returns the number of findings
    rendered."""
    rows: list[tuple[AuditFinding, bool]] = []
    first = True
    apps_in_chunk = 0
    count = 0
    current: tuple[str, int] | None = None
    for f in findings:
        if not at_least(f.severity, min_severity):
            continue
        key = (f.database, f.application_id)
        new_app = key != current
        if new_app:
            if rows and apps_in_chunk >= chunk_applications:
                _print_audit_chunk(console, rows, first)
                rows, first, apps_in_chunk = [], False, 0
            current = key
            apps_in_chunk += 1
        rows.append((f, new_app))
        count += 1
    if rows:
        _print_audit_chunk(console, rows, first)
    return count


def render_audit_summary(
    console: Console, summary: AuditSummary, *, min_severity: str = "info"
) -> None:
    """Counts by severity and by code, ignored codes, databases and notes; with
    ``min_severity`` above info, how many findings the report below leaves out."""
    per_db = ", ".join(
        f"{escape(d.database)} ({d.applications:,} apps, app type from "
        f"{'the application_type column' if d.app_type_source == 'column' else 'redirect URIs'})"
        for d in summary.databases
    )
    console.print(
        f"audited {summary.applications_scanned:,} applications, {summary.uris_scanned:,} "
        f"redirect URIs, {summary.live_grants_checked:,} live grants"
        + (f" on {per_db}" if per_db else "")
    )
    console.print(
        "findings: "
        + ", ".join(
            f"[{_SEVERITY_STYLE[s]}]{summary.by_severity.get(s.value, 0):,} {s.value}[/]"
            for s in Severity
        )
    )
    if summary.by_code:
        table = Table(title="findings by rule", title_justify="left")
        for name in ("code", "name", "severity", "count"):
            table.add_column(name, justify="right" if name == "count" else "left", no_wrap=True)
        for code, n in summary.by_code.items():
            rule = RULES[code]
            table.add_row(code, rule.name, _severity(rule.severity), f"{n:,}")
        print_table(console, table)
    if summary.ignored:
        console.print(
            "ignored ([audit] ignore): "
            + ", ".join(f"{code} x{n:,}" for code, n in summary.ignored.items())
        )
    for note in summary.notes:
        console.print(f"[dim]note: {escape(note)}[/]")
    hidden = {
        s.value: summary.by_severity.get(s.value, 0)
        for s in Severity
        if not at_least(s, min_severity) and summary.by_severity.get(s.value, 0)
    }
    if hidden:
        console.print(
            "[dim]not listed below: "
            + ", ".join(f"{n:,} {sev}" for sev, n in hidden.items())
            + " (--min-severity info lists them)[/]"
        )


def render_audit_brief(console: Console, summary: AuditSummary) -> None:
    """Two lines: counts by severity and the most frequent codes (for ``demo``)."""
    severities = ", ".join(
        f"[{_SEVERITY_STYLE[s]}]{summary.by_severity.get(s.value, 0):,} {s.value}[/]"
        for s in Severity
    )
    console.print(
        f"audit: {summary.applications_scanned:,} applications, "
        f"{summary.uris_scanned:,} redirect URIs: {severities}"
    )
    top = summary.top_codes(5)
    if top:
        console.print(
            "  top rules: "
            + ", ".join(f"{code} {RULES[code].name} x{n:,}" for code, n in top)
            + "  (details: oauthmig audit-redirects)"
        )
