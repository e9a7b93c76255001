"""Text renderers of ``backfill pause|resume|cancel`` and ``backfill --report`` (their JSON
shapes are in :mod:`oauthmig.output.json`)."""

from __future__ import annotations

from collections.abc import Sequence

from rich.console import Console
from rich.table import Table

from oauthmig.output.consoles import duration_text, escape, print_table
from oauthmig.output.text import history_brief, request_brief
from oauthmig.rollout.batch_report import JobHistory
from oauthmig.rollout.batches import FAILED, BatchRow
from oauthmig.rollout.control import RequestOutcome, when


def render_requests(console: Console, action: str, outcomes: Sequence[RequestOutcome]) -> None:
    """One row per job and database: its state when asked, and what happens next."""
    table = Table(title=f"backfill {action}", title_justify="left")
    for name in ("job", "database", "was", action, "next"):
        table.add_column(name, no_wrap=name in ("job", "database"))
    for o in outcomes:
        done = "recorded" if o.recorded else "nothing to do"
        if o.request is not None and o.recorded:
            done = f"recorded ({o.request.describe()})"
        table.add_row(o.job, escape(o.database), o.state, escape(done), escape(o.effect))
    print_table(console, table)


def _range(r: BatchRow) -> str:
    if r.lo is None:
        return "-"
    return f"({r.lo}, {r.hi if r.hi is not None else '?'}]"


def render_report(console: Console, histories: Sequence[JobHistory]) -> None:
    """Per job and database: state, the summary of its record, and the recent batches."""
    for h in histories:
        title = f"{h.database} backfill {h.job}"
        if h.error:
            continue  # reported once, on stderr, by the caller
        state = h.state
        if state is None:
            console.print(escape(f"{title}: not routed here"))
            continue
        total = "?" if state.rows_total is None else f"{state.rows_total:,}"
        line = f"{title}: {state.state}, {state.rows_done:,}/{total} rows"
        if state.remaining:
            line += f", {state.remaining:,} remaining"
        request = request_brief(state)
        if request:
            line += f", {request}"
        console.print(escape(line))
        stats = state.history
        if stats is None:
            console.print("  no batches recorded yet")
            continue
        older = stats.batches - stats.recorded
        console.print(
            f"  {stats.batches:,} batches ({stats.recorded:,} listed one by one"
            + (f", {older:,} older ones summarized" if older else "")
            + f"), {stats.rows_changed:,} rows changed"
            + (f", {stats.failed_attempts} failed attempts" if stats.failed_attempts else "")
        )
        brief = history_brief(stats)
        if brief:
            console.print(f"  {escape(brief)}")
        if stats.errors:
            errors = ", ".join(f"{cls} x{n}" for cls, n in stats.errors)
            console.print(f"  failed attempts by error class: {escape(errors)}")
        if h.summary is not None:
            s = h.summary
            console.print(
                f"  older batches: {s.batches:,} covering ids {_range(s)}, {s.rows_changed:,} "
                f"rows, {duration_text(s.seconds)} in batches, {when(s.started_at)} to "
                f"{when(s.finished_at)}"
            )
        if not h.recent:
            continue
        table = Table(title=f"{title}: last {len(h.recent)} batches", title_justify="left")
        paced = any(r.pace is not None for r in h.recent)
        names = ("finished", "ids", "rows", "seconds", "attempts", "outcome")
        for name in (*names, "pace") if paced else names:
            table.add_column(name, no_wrap=True)
        for r in h.recent:
            outcome = f"failed: {r.error_class}" if r.outcome == FAILED else r.outcome
            cells = [
                when(r.finished_at),
                _range(r),
                f"{r.rows_changed:,}",
                f"{r.seconds:.3f}",
                str(r.attempts),
                escape(outcome),
            ]
            if paced:
                cells.append("" if r.pace is None else f"{r.pace:.0%}")
            table.add_row(*cells)
        print_table(console, table)
