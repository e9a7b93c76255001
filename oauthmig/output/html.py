"""The HTML rendering of a :class:`oauthmig.html_report.Report`: one self-contained page.

:func:`render_html` is a pure function of the report. The page needs no network: CSS and the
small filtering script are inline, and a Content-Security-Policy allows that script alone (by
its SHA-256), no other script, no connection and no form. Stored values (redirect URIs, client
ids, application names, stored errors) are data, never markup:

* every value goes through :func:`text`: control, format (bidi) and unusual space characters
  are spelled as escapes (``\\t``, ``\\x01``, ``\\u202e``), then :func:`html.escape` escapes
  ``& < > " '``; attribute values are always quoted;
* no stored URI is ever a link: only the rules reference links out, and only to an absolute
  ``http``/``https`` URL (:func:`safe_link`);
* what the script needs comes as JSON in ``<script type="application/json">`` with ``<``,
  ``>`` and ``&`` written as ``\\u003c``, ``\\u003e``, ``\\u0026`` (:func:`json_for_script`),
  so no value can close the element; the script reads it with ``JSON.parse`` and builds
  elements with ``textContent``; event listeners are attached by the script, never written
  as attributes.

Without JavaScript the page shows everything; the filters of the findings table need it.
"""

from __future__ import annotations

import base64
import hashlib
import html
import json
import unicodedata
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from typing import Any

from oauthmig.config import ENFORCEMENT_CHECKS
from oauthmig.html_report import (
    ApplicationPkce,
    DatabaseMetadata,
    DatabasePkce,
    Distribution,
    JobReport,
    Report,
    RuleCount,
)
from oauthmig.redirects.audit import AuditFinding
from oauthmig.rollout.readiness import EnforcementReadiness
from oauthmig.rollout.status import DatabaseStatus, RevisionState

__all__ = ["json_for_script", "render_html", "safe_link", "text"]

_NAMED_ESCAPES = {"\t": "\\t", "\n": "\\n", "\r": "\\r"}
_HIDDEN_CATEGORIES = ("Cc", "Cf", "Zs", "Zl", "Zp", "Cs", "Cn", "Co")
_STATE_CLASS = {
    "applied": "ok",
    "finished": "ok",
    "skipped": "muted",
    "waiting for upgrade": "muted",
    "pending": "warn",
    "not started": "warn",
    "paused": "warn",
    "stale": "warn",
    "waiting": "wait",
    "running": "run",
    "failed": "bad",
}
_SEVERITIES = ("error", "warning", "info")
NOT_BACKFILLED = "not backfilled"
_OPEN_ROWS = 25  # longer per-application tables start folded


# --------------------------------------------------------------------------- escaping


def _visible_char(ch: str) -> str:
    if ch in _NAMED_ESCAPES:
        return _NAMED_ESCAPES[ch]
    if ch == " " or unicodedata.category(ch) not in _HIDDEN_CATEGORIES:
        return ch
    code = ord(ch)
    if code < 0x100:
        return f"\\x{code:02x}"
    return f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"


def text(value: object) -> str:
    """A value as HTML text or a quoted attribute value: invisible characters spelled as
    escapes (so a tab, a NUL or a bidi override in a stored URI shows), then HTML-escaped."""
    raw = "" if value is None else str(value)
    if not (raw.isprintable() and raw.isascii()):
        raw = "".join(_visible_char(ch) for ch in raw)
    return html.escape(raw, quote=True)


def safe_link(url: str) -> str | None:
    """``url`` if it is an absolute ``http`` or ``https`` URL (safe to put in ``href``),
    else None."""
    scheme, sep, rest = url.partition(":")
    if not sep or scheme.lower() not in ("http", "https") or not rest.startswith("//"):
        return None
    if any(ch.isspace() or unicodedata.category(ch) in _HIDDEN_CATEGORIES for ch in url):
        return None
    return url


def json_for_script(value: Any) -> str:
    """``value`` as JSON that is safe inside ``<script type="application/json">``: ASCII
    only, with ``<``, ``>`` and ``&`` as ``\\u003c``, ``\\u003e``, ``\\u0026`` (so neither
    ``</script>`` nor ``<!--`` can occur), and the line separators U+2028/U+2029 escaped."""
    encoded = json.dumps(value, ensure_ascii=True, separators=(",", ":"), sort_keys=True)
    return encoded.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


# --------------------------------------------------------------------------- formatting


def _int(n: int | None) -> str:
    return "–" if n is None else f"{n:,}"


def _when(value: datetime | None) -> str:
    if value is None:
        return "–"
    return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "–"
    s = round(seconds)
    if s < 1:
        return "under 1s"
    parts: list[str] = []
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        if s >= size:
            parts.append(f"{s // size}{unit}")
            s %= size
        if len(parts) == 2:
            break
    return " ".join(parts)


def _rate(rows_per_second: float | None) -> str:
    if rows_per_second is None:
        return "–"
    if rows_per_second >= 100:
        return f"{rows_per_second:,.0f} rows/s"
    return f"{rows_per_second:,.1f} rows/s"


def _percent(fraction: float | None) -> str:
    if fraction is None:
        return "–"
    value = 100.0 * fraction
    if 0 < value < 0.1:
        return "<0.1%"
    if 99.9 < value < 100:
        return ">99.9%"
    return f"{value:.1f}%"


def _bar(fraction: float | None, label: str, css: str = "") -> str:
    """A progress bar; its width is a number formatted here, never a stored value. ``label``
    (plain text, escaped here) is its accessible name (WAI-ARIA: a progressbar needs one)."""
    if fraction is None:
        return '<div class="bar empty" aria-hidden="true"></div>'
    width = f"{max(0.0, min(1.0, fraction)) * 100:.1f}"
    return (
        f'<div class="bar {css}" role="progressbar" aria-label="{text(label)}" '
        f'aria-valuemin="0" aria-valuemax="100" aria-valuenow="{width}">'
        f'<span style="width:{width}%"></span></div>'
    )


def _state(state: str, label: str | None = None) -> str:
    key = state if state in _STATE_CLASS else state.split(" ", 1)[0].rstrip(":")
    css = _STATE_CLASS.get(key, "warn")
    if state.startswith("running (no live process"):
        css = "bad"
    return f'<span class="state {css}">{text(label or state)}</span>'


def _ident(value: str | None) -> str:
    """A long identifier (a client_id) on one line, cut with an ellipsis on screen; the whole
    value stays in the page (text filter, copy) and in its tooltip."""
    if not value:
        return "–"
    return f'<code class="ident" title="{text(value)}">{text(value)}</code>'


def _severity(severity: str) -> str:
    return f'<span class="sev {text(severity)}">{text(severity)}</span>'


def _table(head: Sequence[str], rows: Iterable[str], css: str = "", tid: str = "") -> str:
    ident = f' id="{text(tid)}"' if tid else ""
    cls = f' class="{text(css)}"' if css else ""
    cells = "".join(f"<th>{h}</th>" for h in head)
    body = "".join(rows)
    return f"<table{ident}{cls}><thead><tr>{cells}</tr></thead><tbody>{body}</tbody></table>"


# --------------------------------------------------------------------------- sections


def _overview(report: Report) -> str:
    status = report.status
    head = status.revisions[-1].revision if status.revisions else "–"
    at_head = sum(1 for d in status.databases if d.current == head)
    outstanding = status.outstanding
    finished = sum(1 for j in report.jobs if j.state == "finished")
    live = sum(p.live_grants for p in report.pkce)
    with_pkce = sum(p.with_challenge for p in report.pkce)
    sev = report.audit.by_severity
    cards = [
        (
            "Revisions",
            f"{at_head} of {len(status.databases)} databases at {text(head)}",
            "outstanding work" if outstanding else "nothing outstanding",
            "warn" if outstanding else "ok",
        ),
        (
            "Backfills",
            f"{finished} of {len(report.jobs)} jobs finished",
            f"{_int(sum(j.remaining or 0 for j in report.jobs))} rows left",
            "ok" if finished == len(report.jobs) else "warn",
        ),
        (
            "PKCE",
            f"{_percent(with_pkce / live if live else None)} of live grants use it",
            f"{_int(live - with_pkce)} of {_int(live)} live grants without a challenge",
            "ok" if live == with_pkce else "warn",
        ),
        (
            "Redirect audit",
            f"{_int(sev.get('error', 0))} errors, {_int(sev.get('warning', 0))} warnings",
            f"{_int(report.audit.applications_scanned)} applications, "
            f"{_int(report.audit.uris_scanned)} URIs",
            "bad" if sev.get("error", 0) else "warn" if sev.get("warning", 0) else "ok",
        ),
    ]
    body = "".join(
        f'<div class="card {css}"><h3>{title}</h3><p class="big">{main}</p><p>{sub}</p></div>'
        for title, main, sub, css in cards
    )
    return f'<section id="overview"><h2>Overview</h2><div class="cards">{body}</div></section>'


def _cell(d: DatabaseStatus, cell: RevisionState) -> str:
    label = "skipped: not routed" if cell.state == "skipped" else cell.state
    detail = f'<div class="detail">{text(cell.detail)}</div>' if cell.detail else ""
    return f'<td class="cell {_STATE_CLASS.get(cell.state, "warn")}">{text(label)}{detail}</td>'


def _matrix(report: Report) -> str:
    status = report.status
    head = ["revision", "touches"] + [
        f'{text(d.database)}<div class="detail">{text(d.dialect)} · current '
        f"{text(d.current or 'base')}</div>"
        f'<div class="detail phase">phase: {text(d.phase_brief())}</div>'
        for d in status.databases
    ]
    rows = []
    for i, rev in enumerate(status.revisions):
        cells = "".join(_cell(d, d.revisions[i]) for d in status.databases)
        rows.append(
            f'<tr><th scope="row">{text(rev.revision)} '
            f'<span class="msg">{text(rev.message)}</span></th>'
            f"<td>{text(', '.join(rev.tables))}</td>{cells}</tr>"
        )
    urls = "".join(
        f"<li><strong>{text(d.database)}</strong>: <code>{text(d.display_url)}</code> "
        f"(tables: {text(', '.join(d.tables) or 'none')})</li>"
        for d in status.databases
    )
    legend = " ".join(
        _state(s, label)
        for s, label in (
            ("applied", "applied"),
            ("skipped", "skipped: not routed"),
            ("pending", "pending"),
            ("waiting", "waiting for a backfill"),
            ("failed", "failed"),
        )
    )
    return (
        '<section id="revisions"><h2>Revisions × databases</h2>'
        f'<p class="legend">{legend}</p>'
        f'{_table(head, rows, "matrix")}<ul class="urls">{urls}</ul></section>'
    )


def _job_row(j: JobReport) -> str:
    if j.eta_seconds == 0:
        eta = "done"
    else:
        eta = _duration(j.eta_seconds)
        if j.eta_seconds is not None and j.state != "running":
            eta += " once running"
    error = f'<div class="detail err">{text(j.last_error)}</div>' if j.last_error else ""
    css = "ok" if j.state == "finished" else "bad" if j.state == "failed" else ""
    return (
        f"<tr><td>{text(j.database)}</td><td>{text(j.job)}</td><td>{_state(j.state)}{error}</td>"
        f'<td class="progress">{_bar(j.done_fraction, f"{j.database} {j.job} progress", css)}'
        f'<span class="pct">{_percent(j.done_fraction)}</span></td>'
        f'<td class="num">{_int(j.rows_done)}</td><td class="num">{_int(j.remaining)}</td>'
        f'<td class="num">{_rate(j.rows_per_second)}</td><td class="num">{text(eta)}</td>'
        f'<td class="when">{_when(j.started_at)}</td>'
        f'<td class="when">{_when(j.finished_at or j.updated_at)}</td></tr>'
    )


def _backfills(report: Report) -> str:
    if not report.jobs:
        body = "<p>No backfill job applies to the selected databases.</p>"
    else:
        body = _table(
            [
                "database",
                "job",
                "state",
                "progress",
                "rows done",
                "rows left",
                "rate",
                "ETA",
                "started",
                "last update",
            ],
            (_job_row(j) for j in report.jobs),
            "jobs",
        )
    return (
        '<section id="backfills"><h2>Backfills</h2>'
        '<p class="note">Rate: rows done / time since the job started (pauses included), from '
        "the job table of each database; the ETA is the rows left at that rate.</p>"
        f"{body}</section>"
    )


def _pkce_app_row(app: ApplicationPkce) -> str:
    label = {"none": "no PKCE", "partial": "partial", "all": "PKCE"}[app.readiness]
    css = {"none": "bad", "partial": "warn", "all": "ok"}[app.readiness]
    fraction = app.with_challenge / app.live_grants if app.live_grants else None
    return (
        f'<tr><td class="num">{_int(app.application_id)}</td>'
        f"<td>{_ident(app.client_id)}</td><td>{text(app.name or '–')}</td>"
        f'<td class="num">{_int(app.live_grants)}</td>'
        f'<td class="num">{_int(app.with_challenge)}</td>'
        f'<td class="num">{_int(app.without_challenge)}</td>'
        f'<td class="progress">'
        f"{_bar(fraction, f'application {app.application_id}: live grants with PKCE', css)}</td>"
        f'<td><span class="state {css}">{label}</span></td></tr>'
    )


def _pkce_database(p: DatabasePkce) -> str:
    fraction = p.with_challenge / p.live_grants if p.live_grants else None
    lines = [
        f"<h3>{text(p.database)}</h3>",
        f'<div class="summary">{_bar(fraction, f"{p.database}: live grants with PKCE", "ok")}<p>'
        f"<strong>{_int(p.with_challenge)}</strong> of {_int(p.live_grants)} live grants carry "
        f"a code_challenge ({_percent(fraction)}); <strong>{_int(p.without_challenge)}</strong> "
        "do not.</p></div>",
        f"<p>{_int(p.applications)} applications hold live grants: "
        f"<strong>{_int(p.applications_without_pkce)}</strong> send no PKCE at all, "
        f"{_int(p.applications_partial)} send it on some grants, "
        f"{_int(p.applications_all_pkce)} on every grant.</p>",
    ]
    if not p.challenge_column:
        lines.append(
            '<p class="note warn">The grant table has no code_challenge column yet (revision '
            "0001 pending): no grant can carry a challenge; run <code>oauthmig upgrade</code>."
            "</p>"
        )
    if p.listed:
        opened = " open" if len(p.listed) <= _OPEN_ROWS else ""
        lines.append(
            f"<details{opened}><summary>{_int(len(p.listed))} applications with live grants, "
            "those without PKCE first</summary>"
        )
        lines.append(
            _table(
                [
                    "application",
                    "client_id",
                    "name",
                    "live grants",
                    "with PKCE",
                    "without",
                    "share with PKCE",
                    "sends PKCE",
                ],
                (_pkce_app_row(a) for a in p.listed),
                "pkce",
            )
        )
        lines.append("</details>")
        left = p.applications - len(p.listed)
        if left > 0:
            lines.append(f'<p class="note">{_int(left)} more applications not listed.</p>')
    return "".join(lines)


def _pkce(report: Report) -> str:
    if not report.pkce:
        body = "<p>No selected database hosts the grant table.</p>"
    else:
        body = "".join(_pkce_database(p) for p in report.pkce)
    return (
        '<section id="pkce"><h2>PKCE readiness</h2>'
        '<p class="note">Live grants (not expired) with and without a PKCE code_challenge, per '
        "application; applications that still send no PKCE come first.</p>"
        f"{body}</section>"
    )


def _enforcement_database(r: EnforcementReadiness) -> str:
    lines = [f"<h3>{text(r.database)}</h3>"]
    if not r.recording:
        lines.append(
            '<p class="note warn">Nothing recorded: revision 0007 (the observe-mode record) is '
            "not applied here yet; run <code>oauthmig upgrade</code>.</p>"
        )
        return "".join(lines)
    rows = []
    for check in ENFORCEMENT_CHECKS:
        found = r.applications.get(check, ())
        name = f"<code>{text(check)}</code> ({text(r.modes.get(check, '?'))})"
        if not found:
            state = (
                '<span class="state ok">ready</span> observe mode saw no application it would '
                "reject"
                if check in r.observed
                else '<span class="state warn">not observed</span> set it to observe, globally '
                "or per client, to see who it would reject"
            )
            rows.append(f'<tr><td>{name}</td><td colspan="4">{state}</td></tr>')
            continue
        for w in found:
            rows.append(
                f"<tr><td>{name}</td>"
                f'<td>{_ident(w.client_id)} <span class="muted">id {_int(w.application_id)}'
                "</span></td>"
                f'<td class="num">{_int(w.count)}</td><td>{text(_when(w.first_seen))}</td>'
                f"<td>{text(_when(w.last_seen))}</td></tr>"
            )
        if check in r.truncated:
            rows.append(
                f'<tr><td>{name}</td><td colspan="4" class="muted">'
                "more applications not listed</td></tr>"
            )
    lines.append(
        _table(
            ["check", "would reject", "requests", "first seen", "last seen"],
            rows,
            "enforcement",
        )
    )
    return "".join(lines)


def _enforcement(report: Report) -> str:
    found = [d.enforcement for d in report.status.databases if d.enforcement is not None]
    if not found:
        body = "<p>No selected database hosts the application table.</p>"
    else:
        body = "".join(_enforcement_database(r) for r in found)
    return (
        '<section id="enforcement"><h2>Enforcement readiness</h2>'
        '<p class="note">Per check of the enforcement policy, the applications that observe '
        "mode saw it would reject under enforce (last 30 days): flip a check to "
        "<code>enforce</code> once its list is empty, or holds only clients you accept to "
        "turn away.</p>"
        f"{body}</section>"
    )


def _distribution(dist: Distribution, total: int) -> str:
    title = text(dist.column)
    if not dist.present:
        return (
            f'<div class="dist"><h4>{title}</h4><p class="note warn">column not added yet '
            "(revision 0003 pending); run <code>oauthmig upgrade</code>.</p></div>"
        )
    rows = []
    for value, count in dist.counts:
        label = (
            f'<span class="muted">{NOT_BACKFILLED}</span>'
            if value is None
            else f"<code>{text(value)}</code>"
        )
        fraction = count / total if total else None
        css = "warn" if value is None else "ok"
        rows.append(
            f'<tr><td>{label}</td><td class="num">{_int(count)}</td>'
            f'<td class="progress">'
            f"{_bar(fraction, f'{dist.column} {NOT_BACKFILLED if value is None else value}', css)}"
            f'<span class="pct">{_percent(fraction)}</span></td></tr>'
        )
    if not rows:
        rows.append('<tr><td colspan="3">no applications</td></tr>')
    counts = _table(["value", "applications", "share"], rows)
    return f'<div class="dist"><h4>{title}</h4>{counts}</div>'


def _metadata_database(m: DatabaseMetadata) -> str:
    dists = "".join(_distribution(d, m.applications) for d in m.distributions)
    return (
        f"<h3>{text(m.database)}</h3><p>{_int(m.applications)} applications.</p>"
        f'<div class="dists">{dists}</div>'
    )


def _metadata(report: Report) -> str:
    if not report.metadata:
        body = "<p>No selected database hosts the application table.</p>"
    else:
        body = "".join(_metadata_database(m) for m in report.metadata)
    return (
        '<section id="metadata"><h2>Client metadata</h2>'
        '<p class="note">Applications per RFC 7591 token_endpoint_auth_method and OpenID '
        "Connect application_type; “not backfilled” is a row the client-metadata backfill has "
        "not reached yet.</p>"
        f"{body}</section>"
    )


def _rule_link(code: str, help_uri: str) -> str:
    link = safe_link(help_uri)
    if link is None:
        return f"<code>{text(code)}</code>"
    return (
        f'<a href="{text(link)}" rel="noopener noreferrer" target="_blank">'
        f"<code>{text(code)}</code></a>"
    )


def _rule_row(r: RuleCount) -> str:
    return (
        f"<tr><td>{_rule_link(r.code, r.help_uri)}</td><td>{text(r.name)}</td>"
        f'<td>{_severity(r.severity)}</td><td class="num">{_int(r.count)}</td>'
        f"<td>{text(r.summary)}</td>"
        f'<td><button type="button" class="js-only" hidden data-filter-code="{text(r.code)}">'
        "show findings</button></td></tr>"
    )


def _finding_row(f: AuditFinding, links: dict[str, str]) -> str:
    uri = "–" if f.uri is None else f"<code>{text(f.uri)}</code>"
    if f.normalized is not None and f.normalized != f.uri:
        uri += f'<div class="detail">normalized: <code>{text(f.normalized)}</code></div>'
    line = "" if f.line is None else f'<div class="detail">line {f.line}</div>'
    return (
        f'<tr data-code="{text(f.code)}" data-severity="{text(f.severity.value)}">'
        f"<td>{_severity(f.severity.value)}</td>"
        f"<td>{_rule_link(f.code, links.get(f.code, ''))}"
        f'<div class="detail">{text(f.name)}</div></td>'
        f'<td>{text(f.database)}</td><td class="num">{_int(f.application_id)}</td>'
        f"<td>{_ident(f.client_id)}</td><td>{uri}{line}</td>"
        f"<td>{text(f.message)}</td></tr>"
    )


def _audit(report: Report) -> str:
    a = report.audit
    if not report.audited:
        return (
            '<section id="audit"><h2>Redirect audit</h2><p>No selected database hosts the '
            "application table: nothing was audited.</p></section>"
        )
    sev = " ".join(
        f"{_severity(s)} <strong>{_int(a.by_severity.get(s, 0))}</strong>" for s in _SEVERITIES
    )
    parts = [
        '<section id="audit"><h2>Redirect audit</h2>',
        f"<p>{_int(a.applications_scanned)} applications, {_int(a.uris_scanned)} redirect URIs "
        f"and {_int(a.live_grants_checked)} live grant URIs checked against the redirect "
        f"rules: {_int(a.findings)} findings. {sev}</p>",
    ]
    if a.notes:
        parts.append(
            '<ul class="notes">' + "".join(f"<li>{text(n)}</li>" for n in a.notes) + "</ul>"
        )
    if a.ignored:
        ignored = ", ".join(f"{text(code)} ({_int(n)})" for code, n in a.ignored.items())
        parts.append(f'<p class="note">Ignored by [audit] ignore: {ignored}.</p>')
    if report.rules:
        parts.append("<h3>By rule</h3>")
        parts.append(
            _table(
                ["rule", "name", "severity", "findings", "what it means", "filter"],
                (_rule_row(r) for r in report.rules),
                "rules",
            )
        )
    parts.append("<h3>Findings</h3>")
    if not report.findings:
        parts.append("<p>No findings.</p>")
    else:
        if report.findings_left_out:
            parts.append(
                f'<p class="note warn">The table holds the {_int(len(report.findings))} most '
                f"severe of {_int(a.findings)} findings; "
                "<code>oauthmig audit-redirects --format csv --output findings.csv</code> "
                "writes every one.</p>"
            )
        parts.append(
            '<div id="filters" class="filters" hidden>'
            '<label>rule <select id="filter-code"><option value="">all rules</option></select>'
            "</label>"
            '<label>severity <select id="filter-severity"><option value="">all</option>'
            + "".join(f'<option value="{s}">{s}</option>' for s in _SEVERITIES)
            + "</select></label>"
            '<label>text <input id="filter-text" type="search" placeholder="URI, client id, '
            'message…" autocomplete="off"></label>'
            '<span id="filter-count" class="count" aria-live="polite"></span></div>'
        )
        links = {r.code: r.help_uri for r in report.rules}
        parts.append(
            _table(
                ["severity", "rule", "database", "application", "client_id", "URI", "message"],
                (_finding_row(f, links) for f in report.findings),
                "findings",
                "findings",
            )
        )
    parts.append("</section>")
    return "".join(parts)


# --------------------------------------------------------------------------- page


_CSS = """
:root{--ok:#1a7f37;--ok-bg:#dafbe1;--warn:#9a6700;--warn-bg:#fff8c5;--bad:#cf222e;
--bad-bg:#ffebe9;--wait:#0550ae;--wait-bg:#ddf4ff;--muted:#57606a;--muted-bg:#f0f2f4;
--line:#d0d7de;--fg:#1f2328;--bg:#fff}
*{box-sizing:border-box}
body{margin:0;font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;
color:var(--fg);background:var(--bg)}
header{padding:16px 24px;border-bottom:1px solid var(--line);background:#f6f8fa}
header h1{margin:0 0 4px;font-size:20px}
header p{margin:0;color:var(--muted)}
nav{margin-top:8px}nav a{margin-right:14px}
main{padding:8px 24px 48px;max-width:1600px}
h2{margin:28px 0 8px;font-size:18px;border-bottom:1px solid var(--line);padding-bottom:4px}
h3{margin:18px 0 6px;font-size:15px}h4{margin:8px 0 4px;font-size:13px}
table{border-collapse:collapse;margin:6px 0 10px;width:auto;max-width:100%}
th,td{border:1px solid var(--line);padding:4px 8px;text-align:left;vertical-align:top}
thead th{background:#f6f8fa;font-weight:600}
td.num{text-align:right;white-space:nowrap;font-variant-numeric:tabular-nums}
code{font:12px/1.4 ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;word-break:break-all}
code.ident{display:inline-block;max-width:20ch;overflow:hidden;text-overflow:ellipsis;
white-space:nowrap;vertical-align:bottom;word-break:normal}
summary{cursor:pointer;margin:6px 0;color:var(--wait)}
a code,td.rule code{word-break:normal;white-space:nowrap}
button{white-space:nowrap}
.detail{font-size:12px;color:var(--muted);margin-top:2px;word-break:break-word}
.detail.err{color:var(--bad)}
.msg{font-weight:normal;color:var(--muted)}
.note{color:var(--muted)}.note.warn{color:var(--warn)}
.muted{color:var(--muted)}
.cards{display:flex;flex-wrap:wrap;gap:12px;margin-top:16px}
.card{flex:1 1 220px;border:1px solid var(--line);border-left-width:6px;border-radius:6px;
padding:8px 12px}
.card h3{margin:0;font-size:13px;color:var(--muted);text-transform:uppercase}
.card p{margin:2px 0}.card .big{font-size:18px;font-weight:600}
.card.ok{border-left-color:var(--ok)}.card.warn{border-left-color:var(--warn)}
.card.bad{border-left-color:var(--bad)}
.cell.ok,.state.ok{background:var(--ok-bg);color:var(--ok)}
.cell.warn,.state.warn{background:var(--warn-bg);color:var(--warn)}
.cell.bad,.state.bad{background:var(--bad-bg);color:var(--bad)}
.cell.wait,.state.wait,.cell.run,.state.run{background:var(--wait-bg);color:var(--wait)}
.cell.muted,.state.muted{background:var(--muted-bg);color:var(--muted)}
.state{display:inline-block;padding:0 6px;border-radius:10px;font-size:12px;font-weight:600}
.legend .state{margin-right:4px}
.sev{display:inline-block;padding:0 6px;border-radius:10px;font-size:12px;font-weight:600}
.sev.error{background:var(--bad-bg);color:var(--bad)}
.sev.warning{background:var(--warn-bg);color:var(--warn)}
.sev.info{background:var(--wait-bg);color:var(--wait)}
.bar{display:inline-block;width:160px;height:10px;border-radius:5px;background:var(--muted-bg);
overflow:hidden;vertical-align:middle;border:1px solid var(--line)}
.bar span{display:block;height:100%;background:var(--wait)}
.bar.ok span{background:var(--ok)}.bar.warn span{background:#d4a72c}
.bar.bad span{background:var(--bad)}.bar.empty{background:repeating-linear-gradient(45deg,
var(--muted-bg),var(--muted-bg) 4px,#fff 4px,#fff 8px)}
.pct{margin-left:6px;font-size:12px;font-variant-numeric:tabular-nums}
td.progress,td.when{white-space:nowrap}
.summary{display:flex;align-items:center;gap:10px}.summary p{margin:0}
.dists{display:flex;flex-wrap:wrap;gap:24px}
.filters{display:flex;flex-wrap:wrap;gap:14px;align-items:center;margin:8px 0;padding:8px;
background:#f6f8fa;border:1px solid var(--line);border-radius:6px}
.filters input{width:260px}.count{color:var(--muted)}
ul.urls,ul.notes{margin:4px 0;padding-left:20px;color:var(--muted)}
footer{padding:12px 24px;color:var(--muted);border-top:1px solid var(--line)}
""".strip()

_SCRIPT = """
(function () {
  "use strict";
  var data = JSON.parse(document.getElementById("oauthmig-data").textContent);
  var table = document.getElementById("findings");
  var buttons = document.querySelectorAll("button[data-filter-code]");
  if (!table) {
    return;
  }
  var rows = Array.prototype.slice.call(table.tBodies[0].rows);
  var texts = rows.map(function (row) { return row.textContent.toLowerCase(); });
  var code = document.getElementById("filter-code");
  var severity = document.getElementById("filter-severity");
  var search = document.getElementById("filter-text");
  var count = document.getElementById("filter-count");
  var inTable = {};
  rows.forEach(function (row) {
    inTable[row.dataset.code] = (inTable[row.dataset.code] || 0) + 1;
  });
  data.rules.forEach(function (rule) {
    if (!inTable[rule.code]) {
      return;
    }
    var option = document.createElement("option");
    option.value = rule.code;
    option.textContent = rule.code + " " + rule.name + " (" + inTable[rule.code] + ")";
    code.appendChild(option);
  });
  function apply() {
    var c = code.value;
    var s = severity.value;
    var q = search.value.trim().toLowerCase();
    var shown = 0;
    rows.forEach(function (row, i) {
      var match = (!c || row.dataset.code === c) && (!s || row.dataset.severity === s) &&
        (!q || texts[i].indexOf(q) !== -1);
      row.hidden = !match;
      if (match) {
        shown += 1;
      }
    });
    count.textContent = shown + " of " + rows.length + " findings shown";
  }
  code.addEventListener("change", apply);
  severity.addEventListener("change", apply);
  search.addEventListener("input", apply);
  Array.prototype.forEach.call(buttons, function (button) {
    if (!inTable[button.dataset.filterCode]) {
      return;
    }
    button.hidden = false;
    button.addEventListener("click", function () {
      code.value = button.dataset.filterCode;
      severity.value = "";
      search.value = "";
      apply();
      table.scrollIntoView();
    });
  });
  document.getElementById("filters").hidden = false;
  apply();
})();
""".strip()


def _script_hash(script: str) -> str:
    digest = hashlib.sha256(script.encode("utf-8")).digest()
    return "sha256-" + base64.b64encode(digest).decode("ascii")


_CSP = (
    "default-src 'none'; "
    f"script-src '{_script_hash(_SCRIPT)}'; "
    "style-src 'unsafe-inline'; base-uri 'none'; form-action 'none'"
)


def _script_data(report: Report) -> dict[str, Any]:
    """What the filtering script reads, and a machine-readable digest of the page."""
    return {
        "generated_at": report.generated_at.astimezone(UTC).isoformat(),
        "tool_version": report.tool_version,
        "rules": [
            {
                "code": r.code,
                "name": r.name,
                "severity": r.severity,
                "count": r.count,
                "help_uri": r.help_uri,
            }
            for r in report.rules
        ],
        "findings": {
            "total": report.audit.findings,
            "in_table": len(report.findings),
            "by_severity": dict(report.audit.by_severity),
        },
        "databases": [d.database for d in report.status.databases],
    }


def render_html(report: Report) -> str:
    """The report as one self-contained HTML document (UTF-8 text)."""
    generated = _when(report.generated_at)
    sections = [
        _overview(report),
        _matrix(report),
        _backfills(report),
        _pkce(report),
        _metadata(report),
        _enforcement(report),
        _audit(report),
    ]
    nav = "".join(
        f'<a href="#{ident}">{label}</a>'
        for ident, label in (
            ("revisions", "Revisions"),
            ("backfills", "Backfills"),
            ("pkce", "PKCE"),
            ("metadata", "Client metadata"),
            ("enforcement", "Enforcement"),
            ("audit", "Redirect audit"),
        )
    )
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f'<meta http-equiv="Content-Security-Policy" content="{text(_CSP)}">'
        '<meta name="referrer" content="no-referrer">'
        f"<title>oauthmig report, {text(generated)}</title>"
        f"<style>{_CSS}</style></head><body>"
        "<header><h1>oauthmig rollout report</h1>"
        f"<p>Generated {text(generated)} by oauthmig {text(report.tool_version)} from the "
        f"configuration {text(report.config_source)}; read-only.</p>"
        f"<nav>{nav}</nav></header>"
        f"<main>{''.join(sections)}</main>"
        "<footer>Rule reference: "
        + _docs_link(report.docs_url)
        + ". Nothing secret is in this file: no client secret, token or grant code is read, "
        "and database URLs are shown with their passwords masked.</footer>"
        '<script type="application/json" id="oauthmig-data">'
        f"{json_for_script(_script_data(report))}</script>"
        f"<script>{_SCRIPT}</script>"
        "</body></html>\n"
    )


def _docs_link(url: str) -> str:
    link = safe_link(url)
    if link is None:
        return f"<code>{text(url)}</code>"
    return f'<a href="{text(link)}" rel="noopener noreferrer" target="_blank">{text(link)}</a>'
