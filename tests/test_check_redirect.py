"""`oauthmig check-redirect`: text and JSON output, exit codes; and every command has help."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click
import jsonschema
import pytest

from oauthmig.cli import cli
from tests.helpers import invoke

CHECK_SCHEMA = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "type": "array",
    "items": {
        "type": "object",
        "additionalProperties": False,
        "required": ["uri", "app_type", "verdict", "normalized", "findings"],
        "properties": {
            "uri": {"type": "string"},
            "app_type": {"enum": ["web", "native"]},
            "verdict": {"enum": ["pass", "warn", "fail"]},
            "normalized": {"type": ["string", "null"]},
            "findings": {
                "type": "array",
                "items": {
                    "type": "object",
                    "additionalProperties": False,
                    "required": ["code", "name", "severity", "message"],
                    "properties": {
                        "code": {"type": "string", "pattern": "^RU[0-9]{3}$"},
                        "name": {"type": "string", "pattern": "^[a-z0-9-]+$"},
                        "severity": {"enum": ["error", "warning", "info"]},
                        "message": {"type": "string", "minLength": 1},
                    },
                },
            },
        },
    },
}


@pytest.fixture(autouse=True)
def _no_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """check-redirect needs no config and no database: point the config at nothing."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("OAUTHMIG_CONFIG", str(tmp_path / "does-not-exist.toml"))


def _json(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, list[dict[str, Any]]]:
    result = invoke(capsys, "check-redirect", "--format", "json", *args)
    document = json.loads(result.out)
    jsonschema.Draft202012Validator(CHECK_SCHEMA).validate(document)
    return result.code, document


@pytest.mark.parametrize(
    ("args", "verdict", "normalized", "codes"),
    [
        (["https://app.example.com/cb"], "pass", "https://app.example.com/cb", []),
        (
            ["HTTPS://App.Example.com:443/a/../cb"],
            "pass",
            "https://app.example.com/cb",
            ["RU014"],
        ),
        (["--app-type", "native", "http://localhost:8080/cb"], "warn", None, ["RU010"]),
        (["https://app.example.com/cb#"], "fail", None, ["RU003"]),
        (["http://app.example.com/cb"], "fail", None, ["RU008"]),
        (["--app-type", "native", "myapp:/cb"], "fail", None, ["RU012"]),
        ([""], "fail", None, ["RU001"]),
    ],
    ids=[
        "pass",
        "info-only-still-pass",
        "native-localhost-warns",
        "fragment-fails",
        "web-http-fails",
        "native-scheme-without-dot-fails",
        "empty-fails",
    ],
)
def test_json_verdict_and_findings(
    capsys: pytest.CaptureFixture[str],
    args: list[str],
    verdict: str,
    normalized: str | None,
    codes: list[str],
) -> None:
    code, document = _json(capsys, *args)
    assert code == (1 if verdict == "fail" else 0)
    (report,) = document
    assert report["verdict"] == verdict
    assert [f["code"] for f in report["findings"]] == codes
    if normalized is not None:
        assert report["normalized"] == normalized


def test_json_keeps_argument_order_and_app_type(capsys: pytest.CaptureFixture[str]) -> None:
    uris = ["com.example.app:/cb", "http://127.0.0.1:8080/cb", "https://[::1]/cb"]
    code, document = _json(capsys, "--app-type", "native", *uris)
    assert code == 0  # RU011 on the last one is a warning
    assert [r["uri"] for r in document] == uris
    assert {r["app_type"] for r in document} == {"native"}
    assert [r["verdict"] for r in document] == ["pass", "pass", "warn"]


@pytest.mark.parametrize(
    ("fail_on", "app_type", "uris", "expected"),
    [
        ("error", "web", ["https://a.example.com/cb"], 0),
        ("error", "native", ["com.example.app://cb"], 0),
        ("warning", "native", ["com.example.app://cb"], 1),
        ("warning", "web", ["https://a.example.com/cb", "HTTPS://A.example.com/cb"], 0),
        ("error", "web", ["https://a.example.com/cb", "https://*.example.com/cb"], 1),
        ("never", "web", ["https://*.example.com/cb"], 0),
    ],
    ids=[
        "error-clean",
        "error-ignores-warning",
        "warning-fails-on-warning",
        "warning-ignores-info",
        "error-one-of-two-fails",
        "never",
    ],
)
def test_exit_code_follows_fail_on(
    capsys: pytest.CaptureFixture[str],
    fail_on: str,
    app_type: str,
    uris: list[str],
    expected: int,
) -> None:
    result = invoke(capsys, "check-redirect", "--app-type", app_type, "--fail-on", fail_on, *uris)
    assert result.code == expected, result.err
    assert ("--fail-on" in result.err) == bool(expected)


def test_text_shows_verdict_normalized_form_and_findings(
    capsys: pytest.CaptureFixture[str],
) -> None:
    result = invoke(
        capsys,
        "check-redirect",
        "https://app.example.com/cb",
        "HTTPS://App.example.com:443/x/../cb#",
    )
    assert result.code == 1
    lines = result.out.splitlines()
    assert lines[0].startswith("PASS https://app.example.com/cb")
    assert "normalized: https://app.example.com/cb" in lines[1]
    assert lines[2].startswith("FAIL HTTPS://App.example.com:443/x/../cb#")
    assert "normalized: https://app.example.com/cb#" in result.out
    assert "RU003 fragment error:" in result.out
    assert "RU014 not-normalized info:" in result.out
    assert "2 URIs: 1 pass, 0 warn, 1 fail" in result.out
    assert "1 of 2 URI(s) at or above --fail-on error" in result.err


def test_text_escapes_markup_and_control_characters(capsys: pytest.CaptureFixture[str]) -> None:
    markup = "https://app.example.com/[bold red]x[/]"
    ansi = "https://app.example.com/\x1b[2Jcb"
    result = invoke(capsys, "check-redirect", markup, ansi)
    assert result.code == 1
    assert markup in result.out  # printed literally, not interpreted
    assert "\x1b" not in result.out
    assert "https://app.example.com/\\x1b[2Jcb" in result.out


def test_json_on_stdout_only(capsys: pytest.CaptureFixture[str]) -> None:
    result = invoke(capsys, "check-redirect", "--format", "json", "https://a.example.com/#")
    assert result.code == 1
    json.loads(result.out)
    assert "at or above" in result.err


def test_needs_at_least_one_uri(capsys: pytest.CaptureFixture[str]) -> None:
    result = invoke(capsys, "check-redirect")
    assert result.code == 2
    assert "URI" in result.err


def test_unknown_app_type_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    result = invoke(capsys, "check-redirect", "--app-type", "spa", "https://a.example.com/")
    assert result.code == 2


# --------------------------------------------------------------------------- every command


def _commands(group: click.Group, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    out: list[tuple[str, ...]] = []
    for name, command in sorted(group.commands.items()):
        out.append((*prefix, name))
        if isinstance(command, click.Group):
            out.extend(_commands(command, (*prefix, name)))
    return out


@pytest.mark.parametrize("path", _commands(cli), ids=lambda p: " ".join(p))
def test_every_command_has_help_with_an_example(
    capsys: pytest.CaptureFixture[str], path: tuple[str, ...]
) -> None:
    result = invoke(capsys, *path, "--help")
    assert result.code == 0, result.err
    assert "Example" in result.out
    assert f"oauthmig {' '.join(path)}" in result.out


def test_new_commands_are_registered() -> None:
    assert {"check-redirect", "audit-redirects"} <= set(cli.commands)


@pytest.mark.parametrize(
    ("app_type", "uri", "codes", "fragment"),
    [
        ("web", "https://app.example.com%40evil.example/cb", ["RU001"], "%40"),
        ("native", "https://b%C3%BCcher.example/cb", ["RU001"], "xn--bcher-kva.example"),
        ("web", "https://bücher.example/cb", ["RU001"], "https://xn--bcher-kva.example/cb"),
        ("native", "https://%E2%82%AC.example/cb", ["RU001"], "xn--lzg.example"),
        ("web", "https://0x7f000001/cb", ["RU017"], "127.0.0.1"),
        ("native", "https://127.1/cb", ["RU017"], "127.0.0.1"),
        ("web", "https://256.256.256.256/cb", ["RU018"], "IPv4"),
        ("native", "https://[v1.fe80::1]/cb", ["RU018"], "IPvFuture"),
        ("web", "https://xn--zz.example/cb", ["RU018"], "xn--zz"),
    ],
)
def test_host_findings_through_the_cli(
    capsys: pytest.CaptureFixture[str], app_type: str, uri: str, codes: list[str], fragment: str
) -> None:
    code, document = _json(capsys, "--app-type", app_type, uri)
    assert code == 1
    (report,) = document
    assert report["verdict"] == "fail"
    findings = report["findings"]
    assert isinstance(findings, list)
    assert [f["code"] for f in findings] == codes
    assert fragment in findings[0]["message"]


def test_private_use_empty_path_warns_and_literal_query_star_passes(
    capsys: pytest.CaptureFixture[str],
) -> None:
    code, document = _json(
        capsys,
        "--app-type",
        "native",
        "com.example.app:",
        "com.example.app:/cb?scope=a*b&x=1",
        "com.example.app:/cb?tenant=*",
    )
    assert code == 1
    assert [r["verdict"] for r in document] == ["warn", "pass", "fail"]
    assert [[f["code"] for f in r["findings"]] for r in document] == [
        ["RU013"],
        [],
        ["RU004"],
    ]
