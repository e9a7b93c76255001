"""``oauthmig report --html``: the service on real SQLite and PostgreSQL databases holding the
demo's data plus planted rows, the HTML escaping, and the page itself in a real headless
Chromium (Debian's ``chromium``; the test fails, never skips, when it is missing)."""

from __future__ import annotations

import json
import os
import re
import shutil
from collections import Counter
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from html.parser import HTMLParser
from itertools import pairwise
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import (
    BigInteger,
    DateTime,
    String,
    Text,
    column,
    func,
    insert,
    inspect,
    select,
    table,
)
from sqlalchemy import text as sql_text
from sqlalchemy.engine import Connection

from oauthmig.columns import StringList
from oauthmig.config import Settings, settings_from_mapping
from oauthmig.db import make_engine
from oauthmig.demo.data import setup_legacy
from oauthmig.html_report import (
    ApplicationPkce,
    DatabaseMetadata,
    DatabasePkce,
    Distribution,
    JobReport,
    Report,
    RuleCount,
    gather_report,
)
from oauthmig.output.html import json_for_script, render_html, safe_link, text
from oauthmig.redirects.audit import AuditFinding, AuditSummary
from oauthmig.redirects.audit import audit as run_audit
from oauthmig.redirects.rules import RULES, Severity
from oauthmig.rollout import runner
from oauthmig.rollout.backfill import backfill
from oauthmig.rollout.job_state import job_table
from oauthmig.rollout.revisions import history
from oauthmig.rollout.status import StatusReport
from tests.helpers import invoke, write_config
from tests.helpers.databases import DatabaseFactory, routed_config

NOW = datetime.now(UTC).replace(microsecond=0)

# A hostile application: its name, client id and redirect URIs would run script, load an
# image or rename the page if the report treated them as markup or made them links.
PWN_APP = 900_003
PWN_NAME = '<script>window.__pwned = "name"</script>'
PWN_CLIENT_ID = 'pwn-"><svg onload="window.__pwned=1">'
PWN_URIS = (
    "javascript:window.__pwned='uri';document.title='pwned'",
    'https://evil.example.com/cb"><img src=x onerror="window.__pwned=\'img\'">',
    "https://evil.example.com/<script>document.title='pwned'</script>",
)
PLANTED_SECRET = "Cs-ghjkmnpqrstvwxzghjkmnpq"
PLANTED_CODE = "Gc-zxwvtsrqpnmkjhgzxwvtsrq"

# Planted PKCE per application: (id, name, live grants with a challenge, live without,
# expired ones without (never counted)).
PKCE_APPS = (
    (900_001, "pkce-everywhere", 3, 0, 1),
    (900_002, "pkce-partial", 2, 1, 0),
    (PWN_APP, PWN_NAME, 0, 2, 0),
)
PAUSED_DONE = 300
PAUSED_LEFT = 17
PAUSED_SECONDS = 600


@dataclass(frozen=True)
class Planted:
    """The demo's data after upgrade and backfill, plus the planted rows."""

    settings: Settings
    cfg: str
    tmp: Path


def _grant_table(settings: Settings) -> Any:
    return table(
        settings.tables.grant,
        column("id", BigInteger),
        column("user_id", BigInteger),
        column("application_id", BigInteger),
        column("code", String),
        column("expires_at", DateTime(timezone=True)),
        column("redirect_uri", String),
        column("scope_list", StringList()),
        column("scopes", BigInteger),
        column("code_challenge", Text),
        column("code_challenge_method", String),
    )


def _app_table(settings: Settings) -> Any:
    return table(
        settings.tables.application,
        column("id", BigInteger),
        column("client_id", String),
        column("client_secret", Text),
        column("name", String),
        column("redirect_uris", Text),
        column("scopes", StringList()),
        column("date_added", DateTime(timezone=True)),
        column("token_endpoint_auth_method", String),
        column("application_type", String),
    )


def _on(settings: Settings, database: str) -> Any:
    return make_engine(settings.databases[database], settings)


def _plant(settings: Settings) -> None:
    engine = _on(settings, "control")
    try:
        with engine.begin() as conn:
            apps, grants = _app_table(settings), _grant_table(settings)
            for app_id, name, _with, _without, _expired in PKCE_APPS:
                pwn = app_id == PWN_APP
                conn.execute(
                    insert(apps).values(
                        id=app_id,
                        client_id=PWN_CLIENT_ID if pwn else f"client-{app_id}",
                        client_secret=PLANTED_SECRET if pwn else None,
                        name=name,
                        redirect_uris="\n".join(PWN_URIS) if pwn else f"https://{name}.io/cb",
                        scopes=[],
                        date_added=NOW,
                    )
                )
            cols = {c["name"]: c for c in inspect(conn).get_columns(settings.tables.application)}
            if cols.get("application_type", {}).get("nullable"):
                # Not covered by the compatibility triggers (as if written before they existed).
                conn.execute(
                    sql_text(
                        f"UPDATE {settings.tables.application} SET "
                        "token_endpoint_auth_method = NULL, grant_types = NULL, "
                        "response_types = NULL, application_type = NULL WHERE id IN ("
                        + ", ".join(str(a[0]) for a in PKCE_APPS)
                        + ")"
                    )
                )
            grant_id = 10_000_000
            for app_id, name, with_, without, expired in PKCE_APPS:
                kinds = [True] * with_ + [False] * without + [None] * expired
                for kind in kinds:
                    grant_id += 1
                    code = PLANTED_CODE if grant_id == 10_000_001 else f"code-{grant_id}"
                    conn.execute(
                        insert(grants).values(
                            id=grant_id,
                            user_id=1,
                            application_id=app_id,
                            code=code,
                            expires_at=NOW + (timedelta(hours=-1 if kind is None else 1)),
                            redirect_uri=f"https://{name}.io/cb"[:255],
                            scope_list=[],
                            scopes=0,
                            code_challenge="E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM"
                            if kind
                            else None,
                            code_challenge_method="S256" if kind else None,
                        )
                    )
            # A paused token-families job: PAUSED_DONE rows done in PAUSED_SECONDS, and
            # PAUSED_LEFT rows left (their family id cleared again).
            t = table(
                settings.tables.token,
                column("id"),
                column("refresh_token"),
                column("token_family_id"),
            )
            ids = (
                conn.execute(
                    select(t.c.id)
                    .where(t.c.refresh_token.is_not(None))
                    .order_by(t.c.id.desc())
                    .limit(PAUSED_LEFT)
                )
                .scalars()
                .all()
            )
            assert len(ids) == PAUSED_LEFT
            conn.execute(t.update().where(t.c.id.in_(ids)).values(token_family_id=None))
            conn.execute(
                job_table.update()
                .where(job_table.c.job == "token-families")
                .values(
                    # Paused before the last PAUSED_LEFT rows: they are above its cursor.
                    status="paused",
                    phase="main",
                    cursor=min(ids) - 1,
                    rows_done=PAUSED_DONE,
                    started_at=NOW - timedelta(hours=2),
                    updated_at=NOW - timedelta(hours=2) + timedelta(seconds=PAUSED_SECONDS),
                    finished_at=None,
                )
            )
    finally:
        engine.dispose()


@pytest.fixture
def planted(make_database: DatabaseFactory, tmp_path: Path) -> Planted:
    """The demo's data (60 applications) after expand and both backfills, then planted rows:
    three applications with known PKCE use and no metadata yet (one hostile), and a paused
    token-families job on control."""
    data = routed_config(make_database("control"), make_database("shard"))
    settings = settings_from_mapping(data, {}, "test")
    setup_legacy(settings, apps=60, tokens=200, seed=11)
    assert not runner.upgrade(settings).failed
    assert not backfill(settings).failed
    _plant(settings)
    return Planted(settings, write_config(tmp_path / "oauthmig.toml", data), tmp_path)


def _count(conn: Connection, statement: Any) -> int:
    return int(conn.execute(statement).scalar_one())


# --------------------------------------------------------------------------- the service


def test_report_gathers_matrix_jobs_pkce_metadata_and_audit(planted: Planted) -> None:
    s = planted.settings
    report = gather_report(s, now=NOW)

    # Matrix: control waits on its paused backfill; shard's is done.
    cells = {
        (d.database, c.revision): c.state for d in report.status.databases for c in d.revisions
    }
    assert cells == {
        ("control", "0001"): "applied",
        ("control", "0002"): "applied",
        ("control", "0003"): "applied",
        ("control", "0004"): "waiting",
        ("shard", "0001"): "skipped",
        ("shard", "0002"): "applied",
        ("shard", "0003"): "skipped",
        ("shard", "0004"): "pending",
        ("control", "0005"): "pending",
        ("control", "0006"): "pending",
        ("shard", "0005"): "pending",
        ("shard", "0006"): "pending",
        ("control", "0007"): "pending",
        ("shard", "0007"): "pending",
    }

    # Jobs, with the rate and ETA derived from what the job table records.
    jobs = {(j.database, j.job): j for j in report.jobs}
    assert set(jobs) == {
        ("control", "token-families"),
        ("control", "client-metadata"),
        ("shard", "token-families"),
    }
    paused = jobs["control", "token-families"]
    assert (paused.state, paused.rows_done, paused.remaining) == (
        "paused",
        PAUSED_DONE,
        PAUSED_LEFT,
    )
    assert paused.elapsed_seconds == PAUSED_SECONDS
    assert paused.rows_per_second == pytest.approx(PAUSED_DONE / PAUSED_SECONDS)
    assert paused.eta_seconds == pytest.approx(PAUSED_LEFT * PAUSED_SECONDS / PAUSED_DONE)
    assert paused.done_fraction == pytest.approx(PAUSED_DONE / (PAUSED_DONE + PAUSED_LEFT))
    stale = jobs["control", "client-metadata"]  # three applications arrived after it finished
    assert (stale.state, stale.remaining) == ("stale", len(PKCE_APPS))
    assert stale.started_at is not None and stale.finished_at is not None
    done = jobs["shard", "token-families"]
    assert (done.state, done.remaining, done.eta_seconds, done.done_fraction) == (
        "finished",
        0,
        0.0,
        1.0,
    )
    assert done.rows_done > 0 and done.rows_per_second is not None

    # PKCE readiness: totals agree with the table, planted applications exactly.
    (pkce,) = report.pkce
    assert pkce.database == "control" and pkce.challenge_column
    g = _grant_table(s)
    live = g.c.expires_at > NOW
    engine = _on(s, "control")
    try:
        with engine.connect() as conn:
            assert pkce.live_grants == _count(conn, select(func.count()).where(live))
            assert pkce.without_challenge == _count(
                conn, select(func.count()).where(live, g.c.code_challenge.is_(None))
            )
            apps_live = _count(
                conn, select(func.count(func.distinct(g.c.application_id))).where(live)
            )
    finally:
        engine.dispose()
    assert pkce.with_challenge == 3 + 2
    assert pkce.applications == apps_live
    # Every demo application with a live grant sends no PKCE (legacy data); planted: one
    # everywhere, one partial, one none.
    assert pkce.applications_partial == 1
    assert pkce.applications_all_pkce == 1
    assert pkce.applications_without_pkce == apps_live - 2
    by_id = {a.application_id: a for a in pkce.listed}
    assert len(pkce.listed) == apps_live  # under the listing limit
    for app_id, name, with_, without, _expired in PKCE_APPS:
        app = by_id[app_id]
        assert (app.name, app.live_grants, app.with_challenge, app.without_challenge) == (
            name,
            with_ + without,
            with_,
            without,
        )
    assert by_id[900_001].readiness == "all" and by_id[900_002].readiness == "partial"
    assert by_id[PWN_APP].readiness == "none" and by_id[PWN_APP].client_id == PWN_CLIENT_ID
    # Those without PKCE first.
    withouts = [a.without_challenge for a in pkce.listed]
    assert withouts == sorted(withouts, reverse=True)

    # Client metadata: the counts of the values stored; the planted apps are not backfilled.
    (meta,) = report.metadata
    assert meta.applications == 60 + len(PKCE_APPS)
    a = _app_table(s)
    engine = _on(s, "control")
    try:
        with engine.connect() as conn:
            stored = conn.execute(select(a.c.token_endpoint_auth_method, a.c.application_type))
            rows = stored.all()
    finally:
        engine.dispose()
    expected = {
        "token_endpoint_auth_method": Counter(r[0] for r in rows),
        "application_type": Counter(r[1] for r in rows),
    }
    for dist in meta.distributions:
        assert dist.present
        assert dict(dist.counts) == dict(expected[dist.column]), dist.column
        assert dict(dist.counts)[None] == len(PKCE_APPS)
        assert [n for _, n in dist.counts] == sorted((n for _, n in dist.counts), reverse=True)
    assert {"none", "client_secret_basic"} <= set(dict(meta.distributions[0].counts))

    # Audit: grouped by rule, with the counts of an audit of its own.
    codes = Counter(f.code for f in run_audit(s, revisions=history(), now=NOW))
    assert {r.code: r.count for r in report.rules} == dict(codes)
    for r in report.rules:
        assert (r.name, r.severity) == (RULES[r.code].name, RULES[r.code].severity.value)
        assert r.help_uri == f"{s.audit.docs_url}#{r.code.lower()}-{r.name}"
    assert report.audit.findings == sum(codes.values()) == len(report.findings)
    assert report.findings_left_out == 0
    pwn = [f for f in report.findings if f.application_id == PWN_APP]
    assert {f.code for f in pwn} >= {"RU006", "RU001"}
    assert {f.uri for f in pwn if f.code == "RU006"} == {PWN_URIS[0]}


def test_findings_are_capped_keeping_the_most_severe(planted: Planted) -> None:
    full = gather_report(planted.settings, now=NOW)
    capped = gather_report(planted.settings, now=NOW, max_findings=5, max_applications=2)
    assert len(capped.findings) == 5 and capped.findings_left_out == full.audit.findings - 5
    assert capped.audit == full.audit and capped.rules == full.rules
    errors = [f for f in full.findings if f.severity is Severity.ERROR]
    assert list(capped.findings) == errors[:5]  # the first five errors, in audit order
    (pkce,) = capped.pkce
    assert len(pkce.listed) == 2 and pkce.applications == full.pkce[0].applications
    assert [a.without_challenge for a in pkce.listed] == [
        a.without_challenge for a in full.pkce[0].listed[:2]
    ]
    assert gather_report(planted.settings, now=NOW, max_findings=0).findings == ()


def test_report_before_any_upgrade_says_what_is_missing(
    make_database: DatabaseFactory, tmp_path: Path
) -> None:
    data = routed_config(make_database("control"), make_database("shard"))
    settings = settings_from_mapping(data, {}, "test")
    setup_legacy(settings, apps=30, tokens=60, seed=3)
    report = gather_report(settings)
    states = {(c.revision, c.state) for d in report.status.databases for c in d.revisions}
    assert states == {
        ("0001", "pending"),
        ("0002", "pending"),
        ("0003", "pending"),
        ("0004", "waiting"),
        ("0005", "pending"),
        ("0006", "pending"),
        ("0007", "pending"),
    }
    assert {j.state for j in report.jobs} == {"waiting for upgrade"}
    assert all(j.done_fraction is None and j.eta_seconds is None for j in report.jobs)
    (pkce,) = report.pkce
    assert not pkce.challenge_column
    assert pkce.live_grants > 0 and pkce.without_challenge == pkce.live_grants
    assert pkce.applications_without_pkce == pkce.applications
    (meta,) = report.metadata
    assert meta.applications == 30
    assert [(d.column, d.present) for d in meta.distributions] == [
        ("token_endpoint_auth_method", False),
        ("application_type", False),
    ]
    page = render_html(report)
    assert "column not added yet" in page and "no grant can carry a challenge" in page


# --------------------------------------------------------------------------- the command


def _stored_secrets(settings: Settings) -> set[str]:
    """Every client secret, grant code and token value stored on every database."""
    found: set[str] = set()
    wanted = {
        settings.tables.application: ("client_secret",),
        settings.tables.grant: ("code",),
        settings.tables.token: ("token", "hashed_token", "refresh_token", "hashed_refresh_token"),
    }
    for name in settings.database_names():
        engine = _on(settings, name)
        try:
            with engine.connect() as conn:
                for physical, cols in wanted.items():
                    logical = {
                        settings.tables.application: "application",
                        settings.tables.grant: "grant",
                        settings.tables.token: "token",
                    }[physical]
                    if logical not in settings.tables_on(name):
                        continue
                    t = table(physical, *(column(c) for c in cols))
                    for row in conn.execute(select(*t.c)):
                        found.update(str(v) for v in row if v)
        finally:
            engine.dispose()
    return found


def test_command_writes_an_escaped_page_without_secrets(
    planted: Planted, capsys: pytest.CaptureFixture[str]
) -> None:
    out = planted.tmp / "report.html"
    result = invoke(capsys, "--config", planted.cfg, "report", "--html", str(out))
    assert result.code == 0, result.err
    assert result.out.startswith(f"wrote the HTML report to {out}\n")
    assert "audit: " in result.out and result.err == ""
    page = out.read_text(encoding="utf-8")
    secrets = _stored_secrets(planted.settings)
    assert PLANTED_SECRET in secrets and PLANTED_CODE in secrets and len(secrets) > 400
    leaked = sorted(s for s in secrets if s in page)
    assert not leaked, leaked[:3]
    # Hostile stored values are text: escaped, never raw markup, never a link.
    for raw in (PWN_NAME, PWN_CLIENT_ID, *PWN_URIS):
        assert raw not in page
    assert text(PWN_NAME) in page and text(PWN_CLIENT_ID) in page
    assert text(PWN_URIS[0]) in page and text(PWN_URIS[2]) in page
    parsed = _parse(page)
    assert parsed.scripts == ["application/json", ""]
    assert not parsed.handlers and not parsed.foreign
    assert all(h.startswith(("#", "https://")) for h in parsed.hrefs), parsed.hrefs
    assert "javascript:" not in " ".join(parsed.hrefs)
    assert "http" not in " ".join(parsed.sources)  # nothing is loaded from anywhere


def test_command_failures_exit_2_and_leave_the_file_alone(
    planted: Planted, capsys: pytest.CaptureFixture[str]
) -> None:
    out = planted.tmp / "report.html"
    out.write_text("old report")
    missing = routed_config(
        planted.settings.databases["control"].url or "",
        f"sqlite:///{planted.tmp / 'gone' / 'shard.sqlite3'}",
    )
    bad_cfg = write_config(planted.tmp / "bad.toml", missing)
    for args in (
        ("--config", bad_cfg, "report", "--html", str(out)),
        ("--config", planted.cfg, "report"),
        ("--config", planted.cfg, "report", "--html", str(planted.tmp)),
        ("--config", planted.cfg, "report", "--html", str(out), "--max-findings", "-1"),
    ):
        result = invoke(capsys, *args)
        assert result.code == 2, (args, result.err)
        assert len(result.err.splitlines()) == 1 and result.err.startswith("error: ")
        assert "Traceback" not in result.err and result.out == ""
        assert out.read_text() == "old report"
    assert sorted(p.name for p in planted.tmp.iterdir() if p.name.startswith(".report")) == []
    result = invoke(capsys, "--config", bad_cfg, "report", "--html", str(out))
    assert "'shard'" in result.err and "does not exist" in result.err


def test_demo_ends_by_writing_the_report(
    make_database: DatabaseFactory, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = write_config(
        tmp_path / "oauthmig.toml", routed_config(make_database("control"), make_database("shard"))
    )
    result = invoke(capsys, "--config", cfg, "demo", "--apps", "40", "--tokens", "100")
    assert result.code == 0, result.err
    path = tmp_path / ".oauthmig" / "report.html"
    last = result.out.strip().splitlines()[-1]
    assert last == f"demo: wrote the report to {path} (open it in a browser)"
    page = path.read_text(encoding="utf-8")
    assert page.startswith("<!DOCTYPE html>") and "Redirect audit" in page


# --------------------------------------------------------------------------- escaping


class _Page(HTMLParser):
    """What a page would run, load or link to."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.scripts: list[str] = []
        self.handlers: list[tuple[str, str]] = []
        self.hrefs: list[str] = []
        self.sources: list[str] = []
        self.foreign: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = {k: v or "" for k, v in attrs}
        if tag == "script":
            self.scripts.append(values.get("type", ""))
        if tag in ("img", "svg", "iframe", "object", "embed", "link", "base", "form"):
            self.foreign.append(tag)
        for name, value in values.items():
            if name.startswith("on"):
                self.handlers.append((tag, name))
            if name == "href":
                self.hrefs.append(value)
            if name in ("src", "srcset", "action", "formaction", "data"):
                self.sources.append(value)


def _parse(page: str) -> _Page:
    parser = _Page()
    parser.feed(page)
    parser.close()
    return parser


def test_text_escapes_markup_quotes_and_invisible_characters() -> None:
    assert text('<a href="x">&\'') == "&lt;a href=&quot;x&quot;&gt;&amp;&#x27;"
    assert text("https://a.io/cb\t\x01\u202e") == "https://a.io/cb\\t\\x01\\u202e"
    assert text("https://bücher.example/") == "https://bücher.example/"
    assert text("\ud800") == "\\ud800"  # a lone surrogate cannot break the UTF-8 file
    assert text(None) == "" and text(42) == "42"


@pytest.mark.parametrize(
    ("url", "safe"),
    [
        ("https://docs.example.com/rules.md#ru001-not-a-uri", True),
        ("http://docs.example.com/rules.md", True),
        ("javascript:alert(1)", False),
        ("JavaScript://%0aalert(1)", False),
        ("data:text/html,<script>alert(1)</script>", False),
        ("https:evil", False),
        ("https://docs.example.com/a b", False),
        ("https://docs.example.com/\u202e", False),
        ("//evil.example.com/", False),
        ("", False),
    ],
)
def test_only_absolute_http_urls_become_links(url: str, safe: bool) -> None:
    assert (safe_link(url) == url) is safe


def test_json_for_script_cannot_close_the_element() -> None:
    value = {"u": "</script><script>alert(1)</script><!-- & \u2028", "n": [1, None]}
    encoded = json_for_script(value)
    assert not any(ch in encoded for ch in "<>&\u2028")
    assert "\\u003c/script\\u003e" in encoded
    import json

    assert json.loads(encoded) == value


def _hostile_report(docs_url: str = "javascript:alert(1)") -> Report:
    """A report whose every stored value is hostile (no database needed)."""
    evil = '"><script>window.__pwned=1</script><img src=x onerror=alert(1)>'
    finding = AuditFinding(
        f"db{evil}",
        7,
        evil,
        f"javascript:{evil}",
        "RU006",
        "forbidden-scheme",
        Severity.ERROR,
        f"message {evil}",
        f"https://n.example/{evil}",
        2,
    )
    summary = AuditSummary(
        1, 1, 0, 1, {"error": 1, "warning": 0, "info": 0}, {"RU006": 1}, {}, (), (f"note {evil}",)
    )
    return Report(
        generated_at=NOW,
        tool_version=evil,
        config_source=evil,
        docs_url=docs_url,
        status=StatusReport((), ()),
        jobs=(JobReport(evil, evil, evil, 1, 2, 1, NOW, NOW, None, evil),),
        pkce=(DatabasePkce(evil, True, 1, 1, 1, 1, 0, (ApplicationPkce(7, evil, evil, 1, 1),)),),
        metadata=(DatabaseMetadata(evil, 1, (Distribution(evil, True, ((evil, 1),)),)),),
        audited=True,
        audit=summary,
        rules=(RuleCount("RU006", "forbidden-scheme", "error", evil, 1, f"{docs_url}#{evil}"),),
        findings=(finding,),
    )


def test_hostile_values_everywhere_render_as_text() -> None:
    page = render_html(_hostile_report())
    parsed = _parse(page)
    assert parsed.scripts == ["application/json", ""]
    assert not parsed.handlers and not parsed.foreign and not parsed.sources
    assert all(h.startswith("#") for h in parsed.hrefs), parsed.hrefs  # docs_url refused
    assert "<script>window.__pwned" not in page and "<img" not in page
    assert page.count(text('"><script>window.__pwned=1</script>')) >= 10
    safe = render_html(_hostile_report("https://docs.example.com/rules.md"))
    links = [h for h in _parse(safe).hrefs if not h.startswith("#")]
    assert links and all(h.startswith("https://docs.example.com/rules.md") for h in links)


def test_job_progress_rate_and_eta_come_from_the_recorded_times() -> None:
    t0 = NOW
    running = JobReport("db", "j", "running", 500, 1000, 1500, t0, t0 + timedelta(seconds=50))
    assert running.rows_per_second == 10.0 and running.eta_seconds == 150.0
    assert running.done_fraction == 0.25
    finished = JobReport(
        "db", "j", "finished", 80, 80, 0, t0, t0 + timedelta(seconds=9), t0 + timedelta(seconds=4)
    )
    assert finished.elapsed_seconds == 4.0 and finished.eta_seconds == 0.0
    assert finished.done_fraction == 1.0
    instant = JobReport("db", "j", "running", 5, 10, 5, t0, t0)
    assert instant.rows_per_second is None and instant.eta_seconds is None
    assert JobReport("db", "j", "not started", 0, 9, 9).eta_seconds is None
    assert JobReport("db", "j", "finished", 0, 0, 0).done_fraction == 1.0


# --------------------------------------------------------------------------- in a browser


def _chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        pytest.fail(
            "the browser test needs Debian's chromium: `make test` installs it "
            "(scripts/test-components), or run `apt-get install -y chromium`",
            pytrace=False,
        )
    return found


AXE_DIR = Path(__file__).resolve().parent / "browser"
AXE_JS = AXE_DIR / "node_modules" / "axe-core" / "axe.min.js"
# axe-core impact levels that fail the report (WCAG 2.x A/AA rules and best practices).
AXE_FAILING = ("serious", "critical")


def _axe_js() -> Path:
    """axe-core's browser bundle, pinned in tests/browser/package.json."""
    if not AXE_JS.is_file():
        pytest.fail(
            "the accessibility test needs axe-core: `make test` installs it "
            "(scripts/test-components), or run `npm ci --prefix tests/browser`",
            pytrace=False,
        )
    pinned = json.loads((AXE_DIR / "package.json").read_text())["dependencies"]["axe-core"]
    installed = json.loads((AXE_JS.parent / "package.json").read_text())["version"]
    if installed != pinned:
        pytest.fail(
            f"axe-core {installed} is installed, tests/browser/package.json pins {pinned}: "
            "run `npm ci --prefix tests/browser`",
            pytrace=False,
        )
    return AXE_JS


def _axe_violations(browser: Any, url: str) -> list[str]:
    """axe-core's serious and critical violations on the page at ``url``, one line each.

    Its own context bypasses the page's Content-Security-Policy (which forbids the injected
    script) and still loads nothing from the network."""
    context = browser.new_context(bypass_csp=True, viewport={"width": 1400, "height": 900})
    try:
        page = context.new_page()
        page.route("**/*", lambda route, request: (
            route.continue_() if request.url == url else route.abort()
        ))  # fmt: skip
        page.goto(url, wait_until="load")
        page.add_script_tag(path=str(_axe_js()))
        result = page.evaluate(
            "async () => { const r = await axe.run(document, {resultTypes: ['violations']});"
            " return {violations: r.violations.map(v => ({id: v.id, impact: v.impact,"
            " help: v.help, nodes: v.nodes.map(n => n.target.join(' ')).slice(0, 3)})),"
            " passes: r.passes.length}; }"
        )
    finally:
        context.close()
    assert result["passes"] > 10  # axe really ran
    return [
        f"{v['impact']} {v['id']}: {v['help']} ({', '.join(v['nodes'])})"
        for v in result["violations"]
        if v["impact"] in AXE_FAILING
    ]


def test_report_in_a_real_browser(
    planted: Planted, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    from playwright.sync_api import ConsoleMessage, Dialog, Error, Request, Route, sync_playwright

    executable = _chromium()
    out = tmp_path / "report.html"
    assert invoke(capsys, "--config", planted.cfg, "report", "--html", str(out)).code == 0
    report = gather_report(planted.settings, now=NOW)
    ru006 = sum(1 for f in report.findings if f.code == "RU006")
    assert ru006 >= 2

    problems: list[str] = []
    requests: list[str] = []
    dialogs: list[str] = []

    def on_console(message: ConsoleMessage) -> None:
        if message.type in ("error", "warning"):
            problems.append(f"console {message.type}: {message.text}")

    def on_page_error(error: Error) -> None:
        problems.append(f"page error: {error}")

    def on_dialog(dialog: Dialog) -> None:
        dialogs.append(dialog.message)
        dialog.dismiss()

    def on_request(route: Route, request: Request) -> None:
        requests.append(request.url)
        if request.url == out.as_uri():
            route.continue_()
        else:
            route.abort()

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=executable, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            page.on("console", on_console)
            page.on("pageerror", on_page_error)
            page.on("dialog", on_dialog)
            page.route("**/*", on_request)
            page.goto(out.as_uri(), wait_until="load")

            assert page.evaluate("typeof window.__pwned") == "undefined"
            assert page.title().startswith("oauthmig report, ")
            assert page.locator("#filters").is_visible()
            # The hostile values are on the page, as text.
            body = page.locator("body").inner_text()
            assert PWN_URIS[0] in body and PWN_NAME in body
            assert page.locator("a[href^='javascript' i]").count() == 0
            assert page.locator("#findings img, #findings script, #findings svg").count() == 0

            rows = page.locator("#findings tbody tr")
            visible = page.locator("#findings tbody tr:not([hidden])")
            total = rows.count()
            assert total == len(report.findings) == visible.count()

            page.select_option("#filter-code", "RU006")
            assert visible.count() == ru006
            assert set(visible.evaluate_all("rs => rs.map(r => r.dataset.code)")) == {"RU006"}
            assert page.locator("#filter-count").inner_text() == (
                f"{ru006} of {total} findings shown"
            )
            page.select_option("#filter-severity", "warning")  # RU006 is an error: none left
            assert visible.count() == 0
            page.select_option("#filter-code", "")
            page.select_option("#filter-severity", "")
            page.fill("#filter-text", "evil.example.com")
            pwn = sum(1 for f in report.findings if "evil.example.com" in f"{f.uri} {f.message}")
            assert pwn >= 2 and visible.count() == pwn
            page.fill("#filter-text", "")
            page.locator("button[data-filter-code='RU006']").click()
            assert visible.count() == ru006

            shot = tmp_path / "report.png"
            page.screenshot(path=str(shot), full_page=True)
            assert shot.stat().st_size > 10_000
            assert page.evaluate("typeof window.__pwned") == "undefined"
            assert page.title().startswith("oauthmig report, ")
            # Accessibility: no serious or critical axe-core violation (issue 22).
            violations = _axe_violations(browser, out.as_uri())
        finally:
            browser.close()
    assert not violations, "\n".join(violations)
    assert not problems, problems
    assert not dialogs, dialogs
    assert requests == [out.as_uri()], requests  # the page loads nothing else


def test_browser_is_installed_by_make_test() -> None:
    """`make test` installs Debian's chromium and the pinned axe-core before the tests (the
    browser test needs both)."""
    setup = (Path(__file__).resolve().parent.parent / "scripts" / "test-components").read_text()
    assert "[chromium]=chromium" in setup
    assert "npm ci --prefix" in setup and "tests/browser" in setup
    assert os.access(_chromium(), os.X_OK)
    assert _axe_js().stat().st_size > 100_000


def test_report_headings_and_progress_bars_are_accessible(planted: Planted) -> None:
    """What axe-core checks in the browser test, checked on the markup too: every progress bar
    has an accessible name, headings never skip a level, no header cell is empty."""
    page = render_html(gather_report(planted.settings, now=NOW))
    bars = re.findall(r'<div class="bar[^"]*" role="progressbar"([^>]*)>', page)
    assert len(bars) >= 4
    assert all(re.search(r'aria-label="[^"]+"', b) for b in bars), bars
    levels = [int(n) for n in re.findall(r"<h([1-6])[\s>]", page)]
    assert levels[0] == 1
    jumps = [(a, b) for a, b in pairwise(levels) if b > a + 1]
    assert not jumps, jumps
    assert not re.search(r"<th(?:\s[^>]*)?>\s*</th>", page)
