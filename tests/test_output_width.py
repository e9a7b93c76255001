"""Output that fits: piped at 80 columns and on terminals of any width, no job name, database
name, status word or rule code is ever cut."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from rich.console import Console

from oauthmig.config import Settings, load_settings
from oauthmig.output.text import render_backfill, render_status
from oauthmig.output.uri_text import render_audit_findings, render_audit_summary
from oauthmig.redirects.audit import AuditFinding, AuditSummary, audit
from oauthmig.rollout.backfill import BackfillOptions, BackfillResult, backfill
from oauthmig.rollout.revisions import history
from oauthmig.rollout.status import StatusReport, status
from tests.cli_demo import Demo, demo_installation, run_forked
from tests.helpers import write_config

pytestmark = pytest.mark.xdist_group("output_width")  # one worker builds the demo fixture

# Long, realistic database names: they must survive every width.
LONG = {"control": "control_plane_primary", "shard": "token_shard_eu_west_0042"}


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def demo(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Demo]:
    """The demo (expanded, both backfills pending) under long database names."""
    folder = tmp_path_factory.mktemp("width")
    for built in demo_installation(request, request.param, folder):
        data = json.loads(json.dumps(_config(built.settings)))
        cfg = write_config(folder / "long.toml", data)
        yield Demo(built.backend, cfg, load_settings(cfg), folder)


def _config(settings: Settings) -> dict[str, object]:
    urls = {LONG[n]: {"url": settings.databases[n].url} for n in ("control", "shard")}
    return {
        "databases": urls,
        "routing": {
            "application": [LONG["control"]],
            "grant": [LONG["control"]],
            "token": [LONG["control"], LONG["shard"]],
        },
    }


def _assert_whole(text: str, words: set[str]) -> None:
    assert "…" not in text, text
    lines = text.splitlines()
    for word in words:
        assert any(word in line for line in lines), (word, text)


def _rule_codes(settings: Settings) -> set[str]:
    return {f.code for f in audit(settings, revisions=history())}


def test_piped_at_80_columns_nothing_is_cut(demo: Demo, tmp_path: Path) -> None:
    cfg = demo.config
    status_out, audit_out, audit_info, backfill_out, after = run_forked(
        [
            (["--config", cfg, "status"], tmp_path, None),
            (["--config", cfg, "audit-redirects"], tmp_path, None),
            (["--config", cfg, "audit-redirects", "--min-severity", "info"], tmp_path, None),
            (["--config", cfg, "backfill", "--max-runtime", "60"], tmp_path, None),
            (["--config", cfg, "status"], tmp_path, None),
        ],
        tmp_path / "streams",
        workers=1,
    )
    names = set(LONG.values())
    assert status_out.code == 0, status_out.err
    _assert_whole(status_out.out, names | {"applied", "skipped: not routed", "waiting"})
    _assert_whole(status_out.out, {"token-families", "client-metadata", "not started"})
    codes = _rule_codes(demo.settings)
    assert audit_out.code == 1 and audit_info.code == 1
    _assert_whole(audit_out.out, codes | {LONG["control"]})  # the per-rule summary: every code
    _assert_whole(audit_info.out, codes | {LONG["control"]})
    assert audit_info.out.count("\n") > audit_out.out.count("\n")  # info findings listed too
    assert backfill_out.code == 0, backfill_out.err
    _assert_whole(backfill_out.out, names | {"token-families", "client-metadata", "finished"})
    _assert_whole(after.out, names | {"applied", "finished", "pending"})


@pytest.fixture(scope="module")
def outputs(demo: Demo) -> tuple[StatusReport, list[AuditFinding], AuditSummary, BackfillResult]:
    """What the three commands render, read once per backend."""
    settings = demo.settings
    run = audit(settings, revisions=history())
    findings = list(run)
    dry = backfill(settings, options=BackfillOptions(dry_run=True))
    return status(settings), findings, run.summary(), dry


@pytest.mark.parametrize("width", [120, 80, 60, 40, 24])
def test_terminals_of_any_width_cut_nothing(
    outputs: tuple[StatusReport, list[AuditFinding], AuditSummary, BackfillResult], width: int
) -> None:
    report, findings, summary, dry = outputs
    buffer = io.StringIO()
    console = Console(file=buffer, width=width, force_terminal=True, color_system=None)
    render_status(console, report)
    render_audit_summary(console, summary, min_severity="info")
    render_audit_findings(console, findings)
    render_backfill(console, dry)
    text = buffer.getvalue()
    words = set(LONG.values()) | {"token-families", "client-metadata"}
    words |= {f.code for f in findings}
    for d in report.databases:
        words |= {"skipped: not routed" if c.state == "skipped" else c.state for c in d.revisions}
    _assert_whole(text, words)
    if width >= 80:
        # A client id takes at most three lines: its first third is on one line.
        client_id = max((f.client_id for f in findings), key=len)
        third = client_id[: -(-len(client_id) // 3)]
        assert any(third in line for line in text.splitlines()), text
