"""Consoles and renderers for people: rich tables, plain lines and progress bars.

One ``Console`` per stream. When JSON goes to stdout (built by :mod:`oauthmig.output.json`),
everything human goes to stderr.
"""

from __future__ import annotations

import sys
import time
import unicodedata
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import IO, Protocol

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

from oauthmig.output.json import percentile
from oauthmig.output.readiness import readiness_lines
from oauthmig.prune import PruneResult
from oauthmig.redact import mask_uri, mask_uris_in_text
from oauthmig.redirects.audit import AuditFinding, AuditSummary
from oauthmig.redirects.rules import RULES, Severity, UriReport
from oauthmig.rollout.backfill import BackfillResult
from oauthmig.rollout.batches import BatchStats
from oauthmig.rollout.control import STOPPING, when
from oauthmig.rollout.job_state import JobState, RunEnd, ShownStatus
from oauthmig.rollout.pacing import PACED_PREFIX
from oauthmig.rollout.revisions import RevisionInfo
from oauthmig.rollout.runner import (
    DatabasePlan,
    DatabaseRun,
    Direction,
    PlanOutcome,
    RunResult,
    StepAction,
)
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


class ProgressUpdate(Protocol):
    """``update(label, done, total[, note])``: ``note`` (e.g. ``held: replica lag 14.2s >
    10s``) replaces the rate until an update without one."""

    def __call__(self, label: str, done: int, total: int, note: str | None = None, /) -> None: ...


def _no_progress(_label: str, _done: int, _total: int, _note: str | None = None, /) -> None:
    return None


def _note_lines(console: Console) -> ProgressUpdate:
    waiting: dict[str, float] = {}

    def update(label: str, done: int, total: int, note: str | None = None, /) -> None:
        if note and label not in waiting:
            waiting[label] = time.monotonic()
            console.print(escape(f"{label}: {note} (at {done:,}/{total:,} rows)"))
        elif not note and label in waiting:
            held = time.monotonic() - waiting.pop(label)
            console.print(escape(f"{label}: resumed after {held:.1f}s"))

    return update


@contextmanager
def progress_bar(console: Console, enabled: bool) -> Iterator[ProgressUpdate]:
    """A rich progress bar (rows, rate, ETA); yields ``update(label, done, total[, note])``.

    Not on a terminal (CI logs, files) there is no bar, but a line when a task starts waiting
    with a note (``control token-families: held: ...``) and when it goes on again.
    """
    if not enabled:
        yield _no_progress
        return
    if not console.is_terminal:
        yield _note_lines(console)
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

        def update(label: str, done: int, total: int, note: str | None = None, /) -> None:
            if label not in tasks:
                tasks[label] = bar.add_task(label, total=total or None, rate="")
            task = tasks[label]
            elapsed = bar.tasks[task].elapsed or 0.0
            rate = f"{done / elapsed:,.0f} rows/s" if elapsed > 0 else ""
            if note and note.startswith(PACED_PREFIX):
                rate = f"{rate} [yellow]{escape(note)}[/]"
            elif note:
                rate = f"[yellow]{escape(note)}[/]"
            bar.update(task, completed=done, total=total or None, rate=rate)

        yield update


# --------------------------------------------------------------------------- renderers

_REVISION_STYLE = {
    "applied": "green",
    "skipped": "dim",
    "pending": "yellow",
    "waiting": "cyan",
    "failed": "bold red",
}
_RUN_END_STYLE = {
    RunEnd.FAILED: "bold red",
    RunEnd.FINISHED: "green",
    RunEnd.PAUSED: "yellow",
    RunEnd.CANCELLED: "bold red",
}


def duration_text(seconds: float) -> str:
    """``42s``, ``4m12s``, ``3h05m``: a duration as an operator reads it."""
    s = max(0, round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def request_brief(job: JobState) -> str | None:
    """``pause requested by alice@host at 2025-01-02 10:00:00Z`` while one is in force."""
    if job.requested_action not in STOPPING or job.requested_at is None:
        return None
    return f"{job.requested_action} requested by {job.requested_by} at {when(job.requested_at)}"


def history_brief(stats: BatchStats) -> str:
    """Rate, ETA and batch-time percentiles from the batch history, for one line."""
    parts = []
    if stats.rows_per_second is not None:
        parts.append(f"{stats.rows_per_second:,.0f} rows/s")
    if stats.eta_seconds is not None and stats.eta_seconds > 0:
        parts.append(f"ETA {duration_text(stats.eta_seconds)}")
    if stats.p50_seconds is not None and stats.p99_seconds is not None:
        parts.append(f"batch p50/p99 {stats.p50_seconds:.3f}/{stats.p99_seconds:.3f}s")
    if stats.failed_attempts:
        parts.append(f"{stats.failed_attempts} failed attempts")
    return ", ".join(parts)


def render_plan(console: Console, plans: Sequence[PlanOutcome], direction: Direction) -> None:
    """The database × revision plan, printed before anything is changed."""
    table = Table(title=f"{direction} plan", title_justify="left", show_lines=False)
    table.add_column("database", no_wrap=True)
    table.add_column("from", no_wrap=True)
    table.add_column("to", no_wrap=True)
    table.add_column("steps")
    for p in plans:
        if not isinstance(p, DatabasePlan):
            table.add_row("?", "", "", f"[red]{escape(p.message)}[/]")
            continue
        if p.held is not None:
            table.add_row(p.database, "", "", f"[yellow]{escape(p.held.describe())}[/]")
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


_DONE_LABEL = {
    StepAction.APPLY: "applied",
    StepAction.SKIP: "skipped (not routed)",
    StepAction.REVERT: "reverted",
}


def render_run(console: Console, result: RunResult, command: str = "oauthmig") -> None:
    """Summary after an upgrade or downgrade; ``command`` prefixes the advice printed
    (``oauthmig --config FILE``)."""
    waiting: list[str] = []
    for run in result.runs:
        if run.error is not None:
            continue
        if run.held is not None:
            console.print(f"{run.database}: [yellow]{escape(run.held.describe())}[/]")
            continue
        if not run.done and not run.plan.steps:
            console.print(f"{run.database}: up to date at {run.reached or 'base'}")
        else:
            parts = []
            for s in run.done:
                label = _DONE_LABEL[s.action]
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
        if run.error is not None:
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
    return "\n".join(sql_section(run) for run in result.runs if run.error is None)


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
            style = _REVISION_STYLE.get(cell.state, "")
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
            state = str(job.state)
            if job.held and job.held.startswith(PACED_PREFIX):
                # Latency pacing slows a run, never stops it: a stopped run's pace is history.
                if job.state is ShownStatus.RUNNING:
                    state = f"{job.state} ({job.held})"
            elif job.held:
                how = "held" if job.state is ShownStatus.RUNNING else "stopped while held"
                state = f"{job.state} ({how}: {job.held})"
            approx = "~" if job.estimate else ""
            line = (
                f"{d.database} backfill {job.job}: {state}, {job.rows_done:,}/{total} rows"
                + (f", {approx}{job.remaining:,} remaining" if job.remaining else "")
                + (
                    " (estimated; `status --exact` counts)"
                    if job.estimate and job.estimate_basis != "probe"
                    else ""
                )
                + (
                    " (estimated from the first rows above the cursor: the table was never "
                    "analyzed; run ANALYZE, or `status --exact` counts)"
                    if job.estimate_basis == "probe"
                    else ""
                )
            )
            request = request_brief(job)
            if request:
                line += f", {request}"
            if job.history is not None and history_brief(job.history):
                line += f", {history_brief(job.history)}"
            if job.last_error:
                line += f", last error: {job.last_error}"
            console.print(escape(line))
        if d.live_grants is not None:
            console.print(
                f"{d.database}: {d.live_grants_without_pkce:,} of {d.live_grants:,} "
                "live grants have no PKCE challenge"
            )
        if d.phase is not None:
            console.print(escape(f"{d.database} phase: {d.phase_brief()}"))
        for v in d.verify:
            extra = f": {v.problem}" if v.problem else ""
            console.print(escape(f"{d.database} verify {v.table}: {v.status}{extra}"))
        if d.enforcement is not None:
            for line in readiness_lines(d.enforcement):
                console.print(escape(line))


def render_history(console: Console, revisions: Sequence[RevisionInfo]) -> None:
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


def render_backfill(console: Console, result: BackfillResult) -> None:
    """One row per job and database."""
    title = "backfill (dry run: nothing written)" if result.dry_run else "backfill"
    table = Table(title=title, title_justify="left")
    cols = ["job", "database", "status", "rows to change" if result.dry_run else "rows changed"]
    cols += ["estimate"] if result.dry_run else ["batches", "time", "rows/s", "p50/p99 batch"]
    for name in cols:
        table.add_column(name, no_wrap=name in ("job", "database", "status"))
    for r in result.runs:
        style = _RUN_END_STYLE.get(r.status, "")
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
        if r.status is RunEnd.PAUSED and r.message and "paused by request" in r.message:
            console.print(escape(f"{r.database} {r.job}: {r.message}"))
        elif r.status is RunEnd.PAUSED:
            console.print(f"{r.database} {r.job}: paused; state saved, rerun to resume")
        elif r.status is RunEnd.SKIPPED:
            console.print(escape(f"{r.database} {r.job}: {r.message}"))


def render_prune(console: Console, result: PruneResult) -> None:
    """One row per database hosting the grant table."""
    if not result.databases:
        console.print("prune-grants: no selected database hosts the grant table")
        return
    dry = result.dry_run
    table = Table(
        title="prune-grants (dry run: nothing deleted)" if dry else "prune-grants",
        title_justify="left",
    )
    columns = ["database", "table", "expired before", "to delete" if dry else "deleted"]
    columns += ["of them consumed", "batches", "kept (live or in replay window)", "time"]
    for name in columns:
        table.add_column(name, no_wrap=name in ("database", "table"))
    for d in result.databases:
        st = d.stats
        if st is None:
            table.add_row(escape(d.database), "-", "-", "[bold red]failed[/]", "", "", "", "")
            continue
        table.add_row(
            escape(d.database),
            escape(st.table),
            st.cutoff.strftime("%Y-%m-%d %H:%M:%S UTC"),
            f"{st.deleted:,}",
            "-" if st.consumed is None else f"{st.consumed:,}",
            f"{st.batches:,}",
            f"{st.kept:,}"
            + ("" if st.kept_consumed is None else f" ({st.kept_consumed:,} consumed)"),
            f"{st.seconds:.1f}s",
        )
    print_table(console, table)
    if any(d.stats is not None and d.stats.consumed is None for d in result.databases):
        console.print(
            "[dim]note: without revision 0005 exchanged codes are deleted at once; only "
            "unexchanged expired codes are left to prune[/]"
        )


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
    """``check-redirect`` text: per URI its verdict, normalized form and findings (URIs
    masked, :func:`oauthmig.redact.mask_uri`)."""
    for report in reports:
        verdict = report.verdict
        console.print(
            f"[{_VERDICT_STYLE[verdict]}]{verdict.upper():<4}[/] {show(mask_uri(report.uri))} "
            f"[dim]({report.app_type.value} app)[/]"
        )
        normalized = "-" if report.normalized is None else show(mask_uri(report.normalized))
        console.print(f"     [dim]normalized:[/] {normalized}")
        for f in report.findings:
            message = show(mask_uris_in_text(f.message))
            console.print(f"     {f.code} {f.name} {_severity(f.severity)}: {message}")
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
        f"redirect URIs, {summary.live_grants_checked:,} live grants, "
        f"{summary.metadata_urls_scanned:,} metadata URLs" + (f" on {per_db}" if per_db else "")
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
