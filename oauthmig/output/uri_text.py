"""Redirect URI findings for people: ``check-redirect`` and ``audit-redirects`` text.

Imports the rules and rich, not the audit's database code: ``check-redirect`` needs no
database and loads none.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

from rich.table import Table

from oauthmig.output.consoles import escape, print_table, show
from oauthmig.redact import mask_uri, mask_uris_in_text
from oauthmig.redirects.rule_types import Severity
from oauthmig.redirects.rules import RULES

if TYPE_CHECKING:
    from rich.console import Console

    from oauthmig.redirects.audit import AuditFinding, AuditSummary
    from oauthmig.redirects.rules import UriReport

_SEVERITY_STYLE = {Severity.ERROR: "bold red", Severity.WARNING: "yellow", Severity.INFO: "cyan"}
_VERDICT_STYLE = {"pass": "bold green", "warn": "bold yellow", "fail": "bold red"}


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
