"""Renderers of the rollout for people: rich tables, plain lines and progress bars.

The consoles and shared helpers are in :mod:`oauthmig.output.consoles`, the redirect
findings in :mod:`oauthmig.output.uri_text`. One ``Console`` per stream. When JSON goes to
stdout (built by :mod:`oauthmig.output.json`), everything human goes to stderr.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Protocol

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

from oauthmig.output.consoles import duration_text, escape, print_table
from oauthmig.output.json import percentile
from oauthmig.output.readiness import readiness_lines
from oauthmig.rollout.control import STOPPING, when
from oauthmig.rollout.job_state import RunEnd, ShownStatus
from oauthmig.rollout.pacing import PACED_PREFIX
from oauthmig.rollout.runner import DatabasePlan, StepAction

if TYPE_CHECKING:
    from oauthmig.prune import PruneResult
    from oauthmig.rollout.backfill import BackfillResult
    from oauthmig.rollout.batches import BatchStats
    from oauthmig.rollout.job_state import JobState
    from oauthmig.rollout.runner import DatabaseRun, Direction, PlanOutcome, RunResult
    from oauthmig.rollout.status import StatusReport


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
