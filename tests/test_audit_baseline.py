"""audit-redirects in CI on real data: the baseline, and SARIF within GitHub's limits (issue 22).

``--write-baseline`` records today's findings by a stable fingerprint; ``--baseline`` reports
and fails only on new ones, and SARIF marks every result new, unchanged or absent. SARIF keeps
at most 25,000 results (GitHub code scanning rejects runs over that), the most severe first,
with a notification saying what was left out.
"""

from __future__ import annotations

import io
import json
from datetime import timedelta
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from sqlalchemy import column, delete, table, update

from oauthmig.config import Settings
from oauthmig.output.audit_writers import SARIF_MAX_RESULTS, SarifWriter
from oauthmig.output.baseline import baseline_fingerprint
from oauthmig.redirects.audit import AuditFinding, AuditSummary
from oauthmig.redirects.rules import RULES, Severity
from oauthmig.resources import schemas_dir
from tests.helpers import invoke
from tests.helpers.databases import DatabaseFactory
from tests.test_audit import (
    NOW,
    _assert_code_scanning_shape,
    _empty,
    _execute,
    _insert_apps,
    _insert_grants,
    _sarif_validator,
)

BASELINE_SCHEMA = json.loads((schemas_dir() / "audit-baseline.schema.json").read_text())
SECRET = "pqzxkvPlantedUserinfoSecret"

# Today's data: a userinfo URI (RU005, with a secret), a wildcard (RU004), http (RU008), two
# blank lines of one application (RU014 twice, one fingerprint), a clean one.
TODAY = [
    (10, f"https://deploy:{SECRET}@a.example.com/cb", "s"),
    (11, "https://*.example.com/cb", "s"),
    (12, "http://c.example.com/cb\n\n\nhttps://c.example.com/cb", "s"),
    (13, "https://ok.example.com/cb", "s"),
]


def _run(capsys: pytest.CaptureFixture[str], cfg: str, *args: str) -> tuple[int, str, str]:
    result = invoke(capsys, "--config", cfg, "audit-redirects", *args)
    return result.code, result.out, result.err


def _sarif(capsys: pytest.CaptureFixture[str], cfg: str, *args: str) -> dict[str, Any]:
    code, out, err = _run(capsys, cfg, "--format", "sarif", *args)
    assert code in (0, 1), err
    log: dict[str, Any] = json.loads(out)
    _sarif_validator().validate(log)
    return log


def _delete_apps(settings: Settings) -> None:
    _execute(settings, "control", delete(table(settings.tables.application)))


def test_adoption_path_write_then_fail_only_on_new_findings(
    make_database: DatabaseFactory, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    settings, cfg = _empty(make_database, tmp_path)
    _insert_apps(settings, TODAY)
    baseline = tmp_path / "audit-baseline.json"

    # Day one: the audit fails on existing data; --write-baseline records it all.
    code, _out, err = _run(capsys, cfg, "--write-baseline", str(baseline))
    assert code == 1, err
    assert "wrote the baseline (5 findings)" in err
    document = json.loads(baseline.read_text())
    jsonschema.Draft202012Validator(BASELINE_SCHEMA).validate(document)
    entries = document["findings"]
    assert [e["fingerprint"] for e in entries] == sorted(e["fingerprint"] for e in entries)
    assert {e["code"]: e["count"] for e in entries if e["code"] == "RU014"} == {"RU014": 2}
    assert SECRET not in baseline.read_text()
    assert "https://***@a.example.com/cb" in baseline.read_text()

    # CI from then on: nothing new, exit 0, nothing reported, in every format.
    code, out, err = _run(capsys, cfg, "--baseline", str(baseline), "--format", "json")
    assert code == 0, err
    report = json.loads(out)
    assert report["findings"] == []
    assert report["summary"]["findings"] == 5  # the counts still cover everything
    assert any("5 unchanged" in n and "0 new" in n for n in report["summary"]["notes"])
    code, out, _ = _run(capsys, cfg, "--baseline", str(baseline), "--format", "csv")
    assert code == 0 and out.count("\n") == 1  # the header only
    code, out, _ = _run(capsys, cfg, "--baseline", str(baseline))
    assert code == 0 and "RU004" not in out.split("baseline")[-1]

    # The same data under other ids and in another row order: still nothing new.
    _delete_apps(settings)
    moved = [(100 + 7 * i, uris, s) for i, (_, uris, s) in enumerate(TODAY[::-1])]
    _insert_apps(settings, moved)
    app = table(
        settings.tables.application, column("id"), column("client_id"), column("redirect_uris")
    )
    for (new_id, _, _), (old_id, _, _) in zip(moved, TODAY[::-1], strict=True):
        _execute(
            settings,
            "control",
            update(app).where(app.c.id == new_id).values(client_id=f"client-{old_id}"),
        )
    code, out, err = _run(capsys, cfg, "--baseline", str(baseline), "--format", "json")
    assert code == 0, err
    assert json.loads(out)["findings"] == []

    # A new error and one blank line more: only those are reported, and fail the run.
    _insert_apps(settings, [(500, "https://user@new.example.com/cb", "s")])
    _execute(
        settings,
        "control",
        update(app)
        .where(app.c.client_id == "client-12")
        .values(redirect_uris="http://c.example.com/cb\n\n\n\nhttps://c.example.com/cb"),
    )
    code, out, err = _run(capsys, cfg, "--baseline", str(baseline), "--format", "json")
    assert code == 1
    assert "1 new error(s), 0 new warning(s) not in the baseline" in err
    new = json.loads(out)["findings"]
    assert sorted((f["client_id"], f["code"]) for f in new) == [
        ("client-12", "RU014"),
        ("client-500", "RU005"),
    ]
    # --fail-on warning still counts only new findings; never never fails.
    assert _run(capsys, cfg, "--baseline", str(baseline), "--fail-on", "never")[0] == 0

    # SARIF: every result with its baselineState, and the fixed one as absent.
    _execute(settings, "control", delete(app).where(app.c.client_id == "client-11"))
    log = _sarif(capsys, cfg, "--baseline", str(baseline))
    (run,) = log["runs"]
    states: dict[str, list[str]] = {}
    for res in run["results"]:
        states.setdefault(res["baselineState"], []).append(res["ruleId"])
    assert sorted(states["new"]) == ["RU005", "RU014"]
    assert sorted(states["absent"]) == ["RU004"]
    assert sorted(states["unchanged"]) == ["RU005", "RU008", "RU014", "RU014"]
    absent = next(r for r in run["results"] if r["baselineState"] == "absent")
    assert "no longer found" in absent["message"]["text"]
    assert "client-11" in json.dumps(absent["locations"])
    _assert_code_scanning_shape({**log, "runs": [{**run, "results": [
        r for r in run["results"] if r["baselineState"] != "absent"
    ]}]})  # fmt: skip

    # Rewriting the baseline adopts the new state.
    assert _run(capsys, cfg, "--baseline", str(baseline), "--write-baseline", str(baseline))[0]
    assert _run(capsys, cfg, "--baseline", str(baseline))[0] == 0


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "no such file"),
        ("{not json", "is not JSON"),
        ("[]", "is not an oauthmig audit baseline"),
        ('{"tool": "oauthmig", "version": 9, "findings": []}', "has version 9"),
        ('{"tool": "oauthmig", "version": 1}', "has no findings list"),
        (
            '{"tool": "oauthmig", "version": 1, '
            '"findings": [{"fingerprint": "x", "code": "RU001"}]}',
            "is not 64 lowercase hex digits",
        ),
        (
            '{"tool": "oauthmig", "version": 1, "findings": [{"fingerprint": "'
            + "a" * 64
            + '", "code": "RU001", "count": 0}]}',
            "is not a positive integer",
        ),
        ("\udcff", "is not UTF-8 text"),
        ("DIR", "is a directory"),
    ],
)
def test_bad_baseline_file_is_one_line_exit_2_and_writes_nothing(
    make_database: DatabaseFactory,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    content: str | None,
    message: str,
) -> None:
    settings, cfg = _empty(make_database, tmp_path)
    _insert_apps(settings, TODAY[:1])
    path = tmp_path / "baseline.json"
    if content == "DIR":
        path.mkdir()
    elif content is not None:
        path.write_bytes(content.encode("utf-8", "surrogateescape"))
    report = tmp_path / "report.sarif"
    code, out, err = _run(
        capsys, cfg, "--baseline", str(path), "--format", "sarif", "--output", str(report)
    )
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith("error: --baseline ")
    assert message in err and "--write-baseline" in err
    assert not report.exists()


def test_fingerprint_ignores_ids_lines_and_messages() -> None:
    base = AuditFinding(
        "control", 7, "client-7", "https://a.example.com/cb", "RU008", "https-required",
        Severity.ERROR, "web applications must use https", "https://a.example.com/cb", 1,
    )  # fmt: skip
    moved = AuditFinding(
        "control", 99, "client-7", "https://a.example.com/cb", "RU008", "https-required",
        Severity.ERROR, "another wording", "https://a.example.com/cb", 3,
    )  # fmt: skip
    assert baseline_fingerprint(base) == baseline_fingerprint(moved)
    for other in (
        AuditFinding("shard", 7, "client-7", base.uri, "RU008", "", Severity.ERROR, "", base.uri),
        AuditFinding("control", 7, "client-8", base.uri, "RU008", "", Severity.ERROR, "", base.uri),
        AuditFinding("control", 7, "client-7", base.uri, "RU004", "", Severity.ERROR, "", base.uri),
        AuditFinding("control", 7, "client-7", "https://b.example.com/cb", "RU008", "",
                     Severity.ERROR, "", "https://b.example.com/cb"),
    ):  # fmt: skip
        assert baseline_fingerprint(other) != baseline_fingerprint(base)


# --------------------------------------------------------------------------- SARIF size


def _finding(i: int, severity: Severity) -> AuditFinding:
    code = {Severity.ERROR: "RU005", Severity.WARNING: "RU010", Severity.INFO: "RU014"}[severity]
    uri = f"https://a{i}.example.com/cb"
    return AuditFinding(
        "control", i + 1, f"client-{i}", uri, code, RULES[code].name, severity, "m", uri, 1
    )


def test_sarif_keeps_the_25000_most_severe_of_30000_results() -> None:
    """Generated in-process: 30,000 findings (errors arriving last) through the real writer."""
    pattern = [Severity.INFO] * 2 + [Severity.WARNING] * 7 + [Severity.ERROR] * 1
    findings = [_finding(i, pattern[(i * 10) // 30_000]) for i in range(30_000)]
    counts = {s: sum(1 for f in findings if f.severity is s) for s in Severity}
    assert counts == {Severity.ERROR: 3_000, Severity.WARNING: 21_000, Severity.INFO: 6_000}
    out = io.StringIO()
    writer = SarifWriter(out, "sentry_apiapplication")
    writer.begin()
    for f in findings:
        writer.finding(f)
    writer.end(AuditSummary(30_000, 30_000, 0, 30_000, {}, {}, {}, (), ()))
    log = json.loads(out.getvalue())
    (run,) = log["runs"]
    results = run["results"]
    assert len(results) == SARIF_MAX_RESULTS == 25_000
    levels = [r["level"] for r in results]
    assert levels == ["error"] * 3_000 + ["warning"] * 21_000 + ["note"] * 1_000
    # Within a level, audit order is kept.
    ids = [r["locations"][0]["logicalLocations"][0]["name"] for r in results[:3_000]]
    assert ids == sorted(ids, key=int)
    (invocation,) = run["invocations"]
    (note,) = invocation["toolExecutionNotifications"]
    assert note["level"] == "warning"
    assert "5,000 of 30,000 results left out (5,000 note)" in note["message"]["text"]
    assert note["properties"]["leftOut"] == {"note": 5_000}
    _assert_code_scanning_shape(log)


def test_sarif_cap_on_a_real_database_with_a_smaller_configured_cap(
    make_database: DatabaseFactory, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    settings, cfg = _empty(make_database, tmp_path)
    _insert_apps(
        settings,
        [(i, "http://localhost/cb", None) for i in range(1, 4)]  # native: RU010 warnings
        + [(i, "https://App.example.com/cb", "s") for i in range(4, 6)]  # RU014 info
        + [(9, "https://u:p@a.example.com/cb", "s")],  # RU005 error, last in audit order
    )
    _insert_grants(settings, [(1, 9, "https://gone.example.com/cb", NOW + timedelta(days=1))])
    log = _sarif(capsys, cfg, "--sarif-max-results", "3")
    (run,) = log["runs"]
    assert [r["level"] for r in run["results"]] == ["error", "warning", "warning"]
    assert run["results"][0]["ruleId"] == "RU005"
    assert "https://***@a.example.com/cb" in run["results"][0]["message"]["text"]
    (note,) = run["invocations"][0]["toolExecutionNotifications"]
    assert "left out" in note["message"]["text"] and "--format" in note["message"]["text"]
    _assert_code_scanning_shape(log)
    everything = _sarif(capsys, cfg)
    assert "toolExecutionNotifications" not in everything["runs"][0]["invocations"][0]
    assert len(everything["runs"][0]["results"]) > 3
    bad = _run(capsys, cfg, "--format", "sarif", "--sarif-max-results", "25001")
    assert bad[0] == 2


def test_write_baseline_into_a_directory_is_refused_before_the_audit(
    make_database: DatabaseFactory, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    settings, cfg = _empty(make_database, tmp_path)
    _insert_apps(settings, TODAY[:1])
    report = tmp_path / "report.json"
    code, out, err = _run(
        capsys, cfg, "--write-baseline", str(tmp_path), "--format", "json", "-o", str(report)
    )
    assert code == 2 and out == "" and err.count("\n") == 1
    assert "--write-baseline" in err and not report.exists()
