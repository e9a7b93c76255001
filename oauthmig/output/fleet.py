"""``status --summary`` (text and JSON) and the waves block of ``status``.

Like :mod:`oauthmig.output.json`, this module imports no service at run time (the types are
for annotations only).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.table import Table

from oauthmig.output.consoles import duration_text, escape, print_table
from oauthmig.output.json import status_to_dict
from oauthmig.output.text import render_status

if TYPE_CHECKING:
    from oauthmig.config import Wave
    from oauthmig.rollout.fleet import FleetSummary
    from oauthmig.rollout.status import StatusReport


_STATE_STYLE = {
    "done": "green",
    "failed": "bold red",
    "unreachable": "bold red",
    "waiting": "cyan",
    "pending": "yellow",
}


def render_summary(console: Console, s: FleetSummary) -> None:
    """Counts per revision and state, the stragglers by name, the backfills, the waves."""
    n = len(s.databases)
    console.print(
        f"fleet: {n} database{'s' if n != 1 else ''} ({escape(s.selection)}), head "
        f"{s.head or 'base'}, read in {s.seconds:.1f}s"
    )
    table = Table(title="databases by revision and state", title_justify="left")
    for name in ("revision", "state", "databases"):
        table.add_column(name, no_wrap=True, justify="right" if name == "databases" else "left")
    for c in s.counts:
        style = _STATE_STYLE.get(c.state, "")
        table.add_row(c.revision or "base", f"[{style}]{c.state}[/]", str(c.databases))
    print_table(console, table)
    if s.waves:
        waves = Table(title="waves, in order", title_justify="left")
        for name in ("wave", "databases", "done", "failed"):
            waves.add_column(name, no_wrap=True)
        for w in s.waves:
            label = f"{escape(w.wave)} (implied)" if w.implied else escape(w.wave)
            failed = f"[bold red]{w.failed}[/]" if w.failed else "0"
            waves.add_row(label, str(w.databases), str(w.done), failed)
        print_table(console, waves)
    if s.jobs:
        jobs = Table(title="backfills", title_justify="left")
        for name in ("job", "finished", "rows left", "slowest database", "its ETA"):
            jobs.add_column(name, no_wrap=name in ("job", "slowest database"))
        for j in s.jobs:
            approx = "~" if j.estimate else ""
            eta = "-" if j.slowest_eta_seconds is None else duration_text(j.slowest_eta_seconds)
            jobs.add_row(
                j.job,
                f"{j.finished}/{j.databases}",
                f"{approx}{j.rows_left:,}",
                escape(j.slowest or "-"),
                eta if j.slowest else "-",
            )
        print_table(console, jobs)
    if s.stragglers:
        console.print(f"stragglers ({len(s.stragglers)}):")
        for line in s.stragglers:
            style = "bold red" if line.straggler in ("failed", "unreachable") else "yellow"
            what = f"{escape(line.database)}: {escape(line.detail or '')}"
            console.print(f"  [{style}]{line.straggler}[/] {what}")
    else:
        console.print("no stragglers")


def summary_to_dict(s: FleetSummary) -> dict[str, Any]:
    """JSON shape of ``status --summary`` (``docs/schemas/status-summary.schema.json``)."""
    return {
        "head": s.head,
        "selection": s.selection,
        "outstanding": s.outstanding,
        "seconds": round(s.seconds, 3),
        "counts": [
            {"revision": c.revision, "state": str(c.state), "databases": c.databases}
            for c in s.counts
        ],
        "stragglers": [
            {"database": line.database, "reason": str(line.straggler), "detail": line.detail}
            for line in s.stragglers
        ],
        "backfills": [
            {
                "job": j.job,
                "databases": j.databases,
                "finished": j.finished,
                "rows_left": j.rows_left,
                "estimate": j.estimate,
                "slowest_database": j.slowest,
                "slowest_eta_seconds": j.slowest_eta_seconds,
            }
            for j in s.jobs
        ],
        "waves": [
            {
                "wave": w.wave,
                "implied": w.implied,
                "databases": w.databases,
                "done": w.done,
                "failed": w.failed,
            }
            for w in s.waves
        ],
        "databases": [
            {
                "database": line.database,
                "wave": line.wave,
                "revision": line.revision,
                "state": str(line.state),
                "straggler": None if line.straggler is None else str(line.straggler),
                "detail": line.detail,
            }
            for line in s.databases
        ],
    }


def wave_progress(report: StatusReport, waves: Sequence[Wave]) -> list[dict[str, Any]]:
    """Per wave (in order) of the databases ``status`` read: how many, at head, failed."""
    head = report.revisions[-1].revision if report.revisions else None
    out: list[dict[str, Any]] = []
    for w in waves:
        mine = [d for d in report.databases if d.database in w.databases]
        if not mine:
            continue
        failed = [
            d
            for d in mine
            if d.error
            or any(c.state == "failed" for c in d.revisions)
            or any(j.state in ("failed", "cancelled") for j in d.backfills)
        ]
        done = [d for d in mine if d not in failed and d.current == head and not d.outstanding]
        out.append(
            {
                "wave": w.name,
                "implied": w.implied,
                "databases": len(mine),
                "done": len(done),
                "failed": len(failed),
            }
        )
    return out


def render_waves(console: Console, report: StatusReport, waves: Sequence[Wave]) -> None:
    """One line per wave, in order: ``canary: 1/1 done``; nothing when none are configured."""
    for w in wave_progress(report, waves):
        failed = f", [bold red]{w['failed']} failed[/]" if w["failed"] else ""
        implied = " (implied)" if w["implied"] else ""
        console.print(
            f"wave {escape(w['wave'])}{implied}: {w['done']}/{w['databases']} done{failed}"
        )


def status_with_waves_to_dict(report: StatusReport, waves: Sequence[Wave]) -> dict[str, Any]:
    """``status --format json``: the status document with each wave's progress."""
    return {**status_to_dict(report), "waves": wave_progress(report, waves)}


def render_status_with_waves(console: Console, report: StatusReport, waves: Sequence[Wave]) -> None:
    """``status``: the matrix, then one line per wave."""
    render_status(console, report)
    render_waves(console, report, waves)
