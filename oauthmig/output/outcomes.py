"""The lines a command ends with when its work failed somewhere, or is left unfinished.

Each function reads a service's result and returns what to say; the CLI decides the exit code
(:func:`oauthmig.cli.fail_summary`: one failure is its own error line, several are printed
one per line above ``summary``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from oauthmig.html_report import Report
from oauthmig.prune import PruneResult
from oauthmig.rollout.backfill import BackfillResult
from oauthmig.rollout.control import RequestOutcome
from oauthmig.rollout.job_state import RunEnd
from oauthmig.rollout.runner import RunResult
from oauthmig.rollout.status import StatusReport


@dataclass(frozen=True, slots=True)
class Failures:
    """One line per failure (none: nothing failed), and the summary for several."""

    lines: tuple[str, ...]
    summary: str


def run_failures(result: RunResult) -> Failures:
    """upgrade/downgrade: one line per failed database; the summary names the ones that
    completed."""
    failed = [(r.database, r.error) for r in result.failed if r.error is not None]
    names = ", ".join(name for name, _error in failed)
    ok = [r.database for r in result.runs if r.error is None]
    verb = "is" if len(ok) == 1 else "are"
    tail = f"; {', '.join(ok)} completed and {verb} consistent" if ok else ""
    return Failures(
        tuple(error.message for _name, error in failed),
        f"{len(failed)} databases failed: {names}{tail}",
    )


def unscripted(result: RunResult, outcome: str) -> str | None:
    """For runs that write nothing (dry-run, --sql): the first failure and a count, then
    ``outcome``; ``None`` when none failed."""
    failed = [r.error for r in result.failed if r.error is not None]
    if not failed:
        return None
    more = f" (and {len(failed) - 1} more)" if len(failed) > 1 else ""
    return f"{failed[0].message}{more}; {outcome}"


def backfill_failures(result: BackfillResult) -> Failures:
    """One line per failed or cancelled job and database."""
    failed = result.failed
    pairs = ", ".join(f"{r.job} on {r.database}" for r in failed)
    summary = (
        f"{len(failed)} backfills failed: {pairs}; state saved, rerun to resume"
        if all(r.status == RunEnd.FAILED for r in failed)
        else f"{len(failed)} backfills failed or are cancelled: {pairs}; state saved (see above)"
    )
    return Failures(
        tuple(r.message or f"backfill {r.job} failed on {r.database}" for r in failed), summary
    )


def unfinished(result: BackfillResult) -> str | None:
    """What ``--max-runtime`` left (exit 3), or ``None`` when it stopped no job with rows left."""
    if not result.out_of_time:
        return None
    pairs = ", ".join(f"{r.job} on {r.database}" for r in result.out_of_time)
    return (
        f"unfinished: --max-runtime stopped {pairs} with rows left; state saved, run "
        "`oauthmig backfill` again to continue (exit 3)"
    )


def still_running(still: Sequence[RequestOutcome], timeout: float) -> str | None:
    """``backfill pause|cancel --wait``: the jobs still running after ``timeout`` seconds."""
    if not still:
        return None
    pairs = ", ".join(f"{o.job} on {o.database}" for o in still)
    return (
        f"still running after {timeout:g}s: {pairs} (a batch can take up to "
        "statement_timeout); the request stays recorded, check again with `oauthmig status`"
    )


def status_failures(report: StatusReport) -> Failures:
    """The databases status could not read."""
    errors = [d for d in report.databases if d.error]
    return Failures(
        tuple(d.error or f"database {d.database!r} could not be read" for d in errors),
        f"{len(errors)} databases could not be read: {', '.join(d.database for d in errors)}",
    )


def prune_failures(result: PruneResult) -> Failures:
    """The databases prune-grants failed on."""
    failed = result.failed
    return Failures(
        tuple(d.error or f"database {d.database!r} failed" for d in failed),
        f"prune-grants failed on {len(failed)} databases: "
        + ", ".join(d.database for d in failed)
        + "; what was deleted stays deleted, rerun to go on",
    )


def report_brief(data: Report) -> str:
    """One line summing up the HTML report (for the terminal)."""
    finished = sum(1 for j in data.jobs if j.state == "finished")
    live = sum(p.live_grants for p in data.pkce)
    without = sum(p.without_challenge for p in data.pkce)
    sev = data.audit.by_severity
    return (
        f"backfills: {finished} of {len(data.jobs)} finished; PKCE: {without:,} of {live:,} live "
        f"grants without a challenge; audit: {sev['error']:,} errors, {sev['warning']:,} warnings"
    )
