"""``audit-redirects`` with the client metadata rules (RU105-RU110) on real SQLite and
PostgreSQL: legacy URL columns before any upgrade, every rule after the rollout (revision 0006
included), the RU109 hint before 0006, all four report formats, masked credentials."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import column, table, update

from oauthmig.config import Settings
from oauthmig.redirects.metadata_rules import METADATA_RULE_CODES
from tests.helpers import invoke
from tests.helpers.databases import DatabaseFactory
from tests.test_audit import (
    _assert_code_scanning_shape,
    _audit_json,
    _empty,
    _execute,
    _insert_apps,
    _sarif_validator,
)

PASSWORD = "CANARY-url-password-9c1d"
QUERY_TOKEN = "CANARY-query-token-77ab"


def _set(settings: Settings, app_id: int, **values: Any) -> None:
    apps = table(settings.tables.application, column("id"), *(column(k) for k in values))
    _execute(settings, "control", update(apps).where(apps.c.id == app_id).values(**values))


def _metadata_findings(document: dict[str, Any]) -> list[dict[str, Any]]:
    return [f for f in document["findings"] if f["code"] in METADATA_RULE_CODES]


@pytest.fixture
def legacy_apps(make_database: DatabaseFactory, tmp_path: Path) -> tuple[Settings, str]:
    """Legacy tables, applications whose Sentry URL columns hold each kind of problem."""
    settings, cfg = _empty(make_database, tmp_path)
    _insert_apps(
        settings,
        [(i, f"https://a{i}.example.com/cb", "secret" if i % 2 else None) for i in range(1, 7)],
    )
    _set(settings, 1, homepage_url="www.a1.example.com")
    _set(settings, 2, homepage_url="http://a2.example.com/", privacy_url="javascript:alert(1)")
    _set(settings, 3, terms_url=f"https://legal:{PASSWORD}@a3.example.com/terms")
    _set(settings, 4, privacy_url="https://a4.example.com/legal#privacy")
    _set(
        settings,
        5,
        homepage_url="https://a5.example.com/",
        privacy_url=f"https://a5.example.com/p?access_token={QUERY_TOKEN}",
        terms_url="  ",
    )
    return settings, cfg


def test_legacy_url_columns_are_audited_before_any_upgrade(
    legacy_apps: tuple[Settings, str], capsys: pytest.CaptureFixture[str]
) -> None:
    _, cfg = legacy_apps
    document = _audit_json(capsys, cfg)
    found = {(f["application_id"], f["field"], f["code"]) for f in _metadata_findings(document)}
    assert found == {
        (1, "client_uri", "RU105"),
        (2, "client_uri", "RU106"),
        (2, "policy_uri", "RU106"),
        (3, "tos_uri", "RU107"),
        (4, "policy_uri", "RU108"),
    }
    # Redirect findings keep field null; the summary counts the metadata URLs that are set.
    assert all(f["field"] is None for f in document["findings"] if f["code"] < "RU105")
    assert document["summary"]["metadata_urls_scanned"] == 7  # the blank terms_url is unset
    assert document["summary"]["databases"][0]["metadata_urls"] == 7
    ru107 = next(f for f in document["findings"] if f["code"] == "RU107")
    assert ru107["uri"] == "https://***@a3.example.com/terms"


def test_every_metadata_rule_after_the_rollout_in_every_format(
    legacy_apps: tuple[Settings, str], capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    settings, cfg = legacy_apps
    for command in (("upgrade",), ("backfill",), ("upgrade",)):
        result = invoke(capsys, "--config", cfg, *command)
        assert result.code == 0, result.err
    _set(settings, 5, jwks_uri="http://a5.example.com/jwks.json", logo_uri="https://cdn.example/l")
    _set(settings, 1, token_endpoint_auth_method="private_key_jwt")  # no jwks_uri
    _set(settings, 3, token_endpoint_auth_method="none")  # app 3 holds a secret
    _set(settings, 6, token_endpoint_auth_method="private_key_jwt")
    _set(settings, 6, jwks_uri="https://a6.example.com/jwks.json")  # fine

    document = _audit_json(capsys, cfg)
    found = {(f["application_id"], f["field"], f["code"]) for f in _metadata_findings(document)}
    assert (5, "jwks_uri", "RU106") in found
    assert (1, "token_endpoint_auth_method", "RU109") in found
    assert (3, "token_endpoint_auth_method", "RU110") in found
    assert {code for _, _, code in found} == set(METADATA_RULE_CODES)
    assert not [f for f in found if f[0] == 6]
    ru109 = next(f for f in document["findings"] if f["code"] == "RU109")
    assert "revision 0006" not in ru109["message"] and ru109["uri"] is None

    outputs: list[str] = []
    for fmt in ("text", "csv", "sarif"):
        target = tmp_path / f"report.{fmt}"
        result = invoke(
            capsys,
            "--config",
            cfg,
            "audit-redirects",
            "--format",
            fmt,
            "--min-severity",
            "info",
            "-o",
            str(target),
        )
        assert result.code == 1, result.err
        outputs += [result.out, result.err, target.read_text(encoding="utf-8")]
    text_report, csv_report, sarif_report = outputs[2], outputs[5], outputs[8]
    for code in METADATA_RULE_CODES:
        assert code in text_report
    assert "jwks_uri uses http:" in text_report
    rows = list(csv.DictReader(io.StringIO(csv_report, newline="")))
    assert {(r["application_id"], r["field"], r["code"]) for r in rows if r["field"]} == {
        (str(a), f, c) for a, f, c in found
    }
    log = json.loads(sarif_report)
    _sarif_validator().validate(log)
    _assert_code_scanning_shape(log)
    results = [r for r in log["runs"][0]["results"] if r["ruleId"] in METADATA_RULE_CODES]
    assert len(results) == len(found)
    assert {r["properties"]["field"] for r in results} == {f for _, f, _ in found}
    hashes = [r["partialFingerprints"]["primaryLocationLineHash"] for r in results]
    assert len(set(hashes)) == len(hashes)
    # Two RU106 findings on app 2 (client_uri, policy_uri) are told apart by their field.
    app2 = [r for r in results if r["locations"][0]["logicalLocations"][0]["name"] == "2"]
    assert len({r["partialFingerprints"]["oauthmig/v2"] for r in app2}) == 2
    for output in (*outputs, json.dumps(document)):
        assert PASSWORD not in output and QUERY_TOKEN not in output


def test_private_key_jwt_before_revision_0006_says_the_column_is_coming(
    legacy_apps: tuple[Settings, str], capsys: pytest.CaptureFixture[str]
) -> None:
    settings, cfg = legacy_apps
    assert invoke(capsys, "--config", cfg, "upgrade", "--to", "0003").code == 0
    _set(settings, 1, token_endpoint_auth_method="private_key_jwt")
    (ru109,) = [f for f in _audit_json(capsys, cfg)["findings"] if f["code"] == "RU109"]
    assert "revision 0006" in ru109["message"]


def test_ignore_silences_metadata_rules(
    make_database: DatabaseFactory, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    settings, cfg = _empty(make_database, tmp_path, audit={"ignore": ["RU106", "RU108"]})
    _insert_apps(settings, [(1, "https://a.example.com/cb", None)])
    _set(settings, 1, homepage_url="http://a.example.com/", privacy_url="https://a.example.com/#p")
    document = _audit_json(capsys, cfg)
    assert _metadata_findings(document) == []
    assert document["summary"]["ignored"] == {"RU106": 1, "RU108": 1}
