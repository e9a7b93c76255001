"""The ``audit-redirects`` report as the audit streams it: findings go out as they come.

Machine formats (JSON, CSV, SARIF) are written finding by finding through
:mod:`oauthmig.output.audit_writers`. The text report puts the per-rule summary first, so its
findings wait in a temporary file meanwhile (a spool): memory stays bounded however many
applications there are. :class:`BaselineGate` decides, finding by finding, what a baseline
leaves to report and to fail on, and records the findings for ``--write-baseline``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import pickle
import sys
import tempfile
from collections import Counter
from collections.abc import Callable, Iterator
from typing import IO, Any

from rich.console import Console

from oauthmig.errors import UsageError
from oauthmig.output.audit_writers import SarifWriter, atomic_output, writer_for
from oauthmig.output.baseline import Baseline, BaselineRecorder, BaselineState, load_baseline
from oauthmig.output.consoles import Consoles, escape, plain_console
from oauthmig.output.text import ProgressUpdate, progress_bar
from oauthmig.output.uri_text import at_least, render_audit_findings, render_audit_summary
from oauthmig.redirects.audit import Audit, AuditFinding, AuditSummary, FailOn


@dataclasses.dataclass(slots=True)
class BaselineGate:
    """What ``--baseline`` and ``--write-baseline`` make of each finding."""

    baseline: Baseline | None
    recorder: BaselineRecorder | None
    fmt: str
    new_by_severity: Counter[str] = dataclasses.field(default_factory=Counter)

    def keep(self, finding: AuditFinding) -> BaselineState | None:
        """Record the finding; its baseline state (None without --baseline)."""
        if self.recorder is not None:
            self.recorder.add(finding)
        found = self.baseline.state(finding) if self.baseline is not None else None
        if found != "unchanged":
            self.new_by_severity[finding.severity.value] += 1
        return found

    def noted(self, summary: AuditSummary) -> AuditSummary:
        """The summary, with a note on what the baseline left out."""
        if self.baseline is None:
            return summary
        n = self.baseline.counts
        note = (
            f"baseline {self.baseline.path}: {n['new']:,} new, {n['unchanged']:,} unchanged, "
            f"{len(self.baseline.absent()):,} absent; only new findings are reported"
            f"{' (SARIF marks each)' if self.fmt == 'sarif' else ''} and can fail the run"
        )
        return dataclasses.replace(summary, notes=(*summary.notes, note))

    def failure(self, summary: AuditSummary, fail_on: FailOn) -> str | None:
        """Why the audit fails ``--fail-on`` (with a baseline: on new findings only), or None."""
        if self.baseline is not None:
            errors, warnings = self.new_by_severity["error"], self.new_by_severity["warning"]
            failing = {"error": errors, "warning": errors + warnings, "never": 0}[fail_on]
            if not failing:
                return None
            return (
                f"{errors:,} new error(s), {warnings:,} new warning(s) not in the baseline "
                f"{self.baseline.path}: findings at or above --fail-on {fail_on}"
            )
        if not summary.fails(fail_on):
            return None
        return (
            f"{summary.by_severity['error']:,} error(s), {summary.by_severity['warning']:,} "
            f"warning(s): findings at or above --fail-on {fail_on}"
        )


def stream_machine_report(
    audit: Audit,
    out: IO[str],
    gate: BaselineGate,
    *,
    minimum: str,
    application_table: str,
    docs_url: str,
    sarif_max_results: int,
    close_on_interrupt: bool,
) -> None:
    """Write the JSON, CSV or SARIF document while the audit runs. Ctrl-C with
    ``close_on_interrupt`` (JSON on stdout) still ends the document, so that stdout holds one
    JSON value, then goes on as ``KeyboardInterrupt``."""
    writer = writer_for(
        gate.fmt,
        out,
        application_table=application_table,
        docs_url=docs_url,
        sarif_max_results=sarif_max_results,
    )
    writer.begin()
    try:
        for finding in audit:
            found = gate.keep(finding)
            if not at_least(finding.severity, minimum):
                continue
            if isinstance(writer, SarifWriter):
                writer.finding(finding, found)
            elif found != "unchanged":
                writer.finding(finding)
    except KeyboardInterrupt:
        if close_on_interrupt:
            partial = audit.summary()
            notes = (*partial.notes, "interrupted: the audit stopped before the end")
            writer.end(dataclasses.replace(partial, notes=notes))
        raise
    baseline = gate.baseline
    if baseline is not None and isinstance(writer, SarifWriter):
        for entry in baseline.absent():
            if at_least(entry.severity, minimum):
                writer.absent(entry, baseline.path)
    writer.end(gate.noted(audit.summary()))


def render_text_report(console: Console, audit: Audit, gate: BaselineGate, *, minimum: str) -> None:
    """The text report: the per-rule summary, then the findings kept in a spool meanwhile."""
    with contextlib.closing(tempfile.TemporaryFile()) as spool:
        for finding in audit:
            if gate.keep(finding) != "unchanged" and at_least(finding.severity, minimum):
                pickle.dump(finding, spool)
        render_audit_summary(console, gate.noted(audit.summary()), min_severity=minimum)
        spool.seek(0)
        render_audit_findings(console, _unspool(spool), min_severity=minimum)


def _unspool(spool: IO[bytes]) -> Iterator[Any]:
    while True:
        try:
            yield pickle.load(spool)
        except EOFError:
            return


@dataclasses.dataclass(frozen=True, slots=True)
class AuditOptions:
    """The options of ``audit-redirects``: where the report goes, in which format, what it
    keeps, and what fails the run."""

    fmt: str
    output: str | None
    fail_on: FailOn
    min_severity: str | None
    baseline_path: str | None
    write_baseline: str | None
    sarif_max_results: int

    @property
    def closes_on_interrupt(self) -> bool:
        """JSON on stdout: Ctrl-C still ends the document (stdout holds one JSON value)."""
        return self.output is None and self.fmt == "json"


def write_audit_report(
    c: Consoles,
    options: AuditOptions,
    start: Callable[[ProgressUpdate], Audit],
    *,
    application_table: str,
    docs_url: str,
    on_interrupt_closed: Callable[[], None],
) -> str | None:
    """Run the audit ``start(progress)`` prepares, writing its report as it streams (to
    ``--output`` or stdout), then the baseline file and the summary; return why the run fails
    ``--fail-on``, or None. Refuses a ``--write-baseline`` that names no file before the audit
    runs. ``on_interrupt_closed()`` is called when Ctrl-C ended a JSON document on stdout."""
    machine = options.fmt != "text"
    minimum = options.min_severity or ("info" if machine else "warning")
    baseline = load_baseline(options.baseline_path) if options.baseline_path is not None else None
    target = options.write_baseline
    recorder = BaselineRecorder() if target is not None else None
    if target is not None and (not target.strip() or os.path.isdir(target)):
        # Refused before the audit runs (the file itself is written once it is complete).
        raise UsageError(f"--write-baseline {target!r}: give the name of a file to write")
    gate = BaselineGate(baseline, recorder, options.fmt)
    with contextlib.ExitStack() as stack:
        output = options.output
        sink = stack.enter_context(atomic_output(output)) if output is not None else None
        # Progress (stderr, terminals only) when the report does not go to the terminal.
        show_progress = not c.quiet and (sink is not None or not c.out.is_terminal)
        audit = start(stack.enter_context(progress_bar(c.err, enabled=show_progress)))
        if machine:
            try:
                stream_machine_report(
                    audit,
                    sink if sink is not None else sys.stdout,
                    gate,
                    minimum=minimum,
                    application_table=application_table,
                    docs_url=docs_url,
                    sarif_max_results=options.sarif_max_results,
                    close_on_interrupt=options.closes_on_interrupt,
                )
            except KeyboardInterrupt:
                if options.closes_on_interrupt:
                    on_interrupt_closed()
                raise
        else:
            report_console = c.out if sink is None else plain_console(sink)
            render_text_report(report_console, audit, gate, minimum=minimum)
    summary = gate.noted(audit.summary())
    if recorder is not None and target is not None:
        recorder.write(target)
        if not c.quiet:
            c.err.print(f"wrote the baseline ({recorder.findings:,} findings) to {escape(target)}")
    if sink is not None and not c.quiet:
        c.out.print(f"wrote the {options.fmt} report to {escape(str(options.output))}")
        render_audit_summary(c.out, summary)
    elif machine and not c.quiet:
        render_audit_summary(c.err, summary)
    return gate.failure(summary, options.fail_on)
