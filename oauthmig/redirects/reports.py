"""Machine-readable documents for the redirect rules: JSON, CSV and SARIF 2.1.0.

``check-redirect --format json`` is one small list (:func:`check_report_to_dict`). The
``audit-redirects`` documents are written incrementally, so that memory does not grow with the
number of findings: a writer gets :meth:`ReportWriter.begin`, one :meth:`ReportWriter.finding`
call per finding as the audit produces it, then :meth:`ReportWriter.end` with the summary.
Hence the summary comes *after* the findings in the JSON document
(``{"findings": [...], "summary": {...}}``; the two keys the README documents, object key order
carries no meaning in JSON) and in the SARIF run's ``properties``.

CSV cells that a spreadsheet would run as a formula (starting with ``=``, ``+``, ``-``, ``@``,
tab or carriage return) get a leading ``'`` (OWASP CSV injection guidance): stored redirect
URIs are chosen by whoever registered the client. JSON and SARIF carry the values unchanged.

Nothing here reads a secret: the findings never hold one.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import json
import os
import re
from importlib import metadata
from typing import IO, Any, Protocol

from oauthmig.config import DEFAULT_DOCS_URL
from oauthmig.output.files import output_file
from oauthmig.redirects.audit import AuditFinding, AuditSummary
from oauthmig.redirects.rules import RULES, Rule, Severity, UriReport

__all__ = [
    "ARTIFACT_BASE_ID",
    "ARTIFACT_BASE_URI",
    "FINDING_FIELDS",
    "FORMATS",
    "INFORMATION_URI",
    "RULES_DOC",
    "SARIF_SCHEMA_URI",
    "CsvWriter",
    "JsonWriter",
    "ReportWriter",
    "SarifWriter",
    "atomic_output",
    "check_report_to_dict",
    "finding_fingerprint",
    "finding_to_dict",
    "rule_anchor",
    "sarif_rule",
    "summary_to_dict",
    "tool_version",
    "writer_for",
]

#: The fields of one audit finding, in document order (JSON keys and CSV header).
FINDING_FIELDS: tuple[str, ...] = (
    "database",
    "application_id",
    "client_id",
    "uri",
    "code",
    "name",
    "severity",
    "message",
    "normalized",
)
FORMATS: tuple[str, ...] = ("json", "csv", "sarif")
#: Where the rules are documented, relative to the project root.
RULES_DOC = "docs/rules.md"
SARIF_SCHEMA_URI = "https://json.schemastore.org/sarif-2.1.0.json"
SARIF_VERSION = "2.1.0"
#: The tool's home page (SARIF ``tool.driver.informationUri``).
INFORMATION_URI = "https://github.com/oauthmig/oauthmig"
#: SARIF artifacts are database tables: ``<database>/<table>`` relative to this base, i.e.
#: ``oauthmig:///control/sentry_apiapplication``. Relative, because GitHub code scanning rejects
#: an upload whose absolute artifact URIs use another scheme than its source root (file:).
ARTIFACT_BASE_ID = "OAUTHMIG_DATABASES"
ARTIFACT_BASE_URI = "oauthmig:///"
_SARIF_LEVEL = {Severity.ERROR: "error", Severity.WARNING: "warning", Severity.INFO: "note"}
# GitHub code scanning only reads primaryLocationLineHash; the second key names the scheme.
_FINGERPRINT_KEY = "primaryLocationLineHash"
_FINGERPRINT_SCHEME_KEY = "oauthmig/v2"


def tool_version() -> str:
    """The installed oauthmig version."""
    try:
        return metadata.version("oauthmig")
    except metadata.PackageNotFoundError:  # pragma: no cover - running from a bare checkout
        return "0+unknown"


# --------------------------------------------------------------------------- plain shapes


def check_report_to_dict(report: UriReport) -> dict[str, Any]:
    """JSON shape of one ``check-redirect`` result (see the README)."""
    return {
        "uri": report.uri,
        "app_type": report.app_type.value,
        "verdict": report.verdict,
        "normalized": report.normalized,
        "findings": [
            {"code": f.code, "name": f.name, "severity": f.severity.value, "message": f.message}
            for f in report.findings
        ],
    }


def finding_to_dict(finding: AuditFinding) -> dict[str, Any]:
    """JSON shape of one audit finding (see the README), keys in :data:`FINDING_FIELDS` order."""
    return {
        "database": finding.database,
        "application_id": finding.application_id,
        "client_id": finding.client_id,
        "uri": finding.uri,
        "code": finding.code,
        "name": finding.name,
        "severity": finding.severity.value,
        "message": finding.message,
        "normalized": finding.normalized,
    }


def summary_to_dict(summary: AuditSummary) -> dict[str, Any]:
    """JSON shape of an audit summary."""
    return {
        "applications_scanned": summary.applications_scanned,
        "uris_scanned": summary.uris_scanned,
        "live_grants_checked": summary.live_grants_checked,
        "findings": summary.findings,
        "by_severity": dict(summary.by_severity),
        "by_code": dict(summary.by_code),
        "ignored": dict(summary.ignored),
        "databases": [
            {
                "database": d.database,
                "applications": d.applications,
                "uris": d.uris,
                "live_grants": d.live_grants,
                "grant_column_length": d.grant_column_length,
                "app_type_source": d.app_type_source,
            }
            for d in summary.databases
        ],
        "notes": list(summary.notes),
    }


# --------------------------------------------------------------------------- rule documentation


def rule_anchor(rule: Rule) -> str:
    """The GitHub-style anchor of the rule's section in ``docs/rules.md``."""
    heading = f"{rule.code} {rule.name}".lower()
    return re.sub(r"[^a-z0-9 _-]", "", heading).replace(" ", "-")


def _unwrap(text: str) -> str:
    return " ".join(text.replace("``", "`").split())


def _doc_parts(rule: Rule) -> tuple[str, str, str]:
    """(why, anti-pattern, fix) from the rule's docstring."""
    why: list[str] = []
    anti = fix = ""
    for paragraph in rule.doc.split("\n\n"):
        if paragraph.lstrip().startswith("Anti-pattern"):
            head, sep, tail = paragraph.partition("\nFix:")
            anti = _unwrap(head)
            fix = _unwrap("Fix:" + tail) if sep else ""
        elif paragraph.lstrip().startswith("Fix:"):
            fix = _unwrap(paragraph)
        else:
            why.append(_unwrap(paragraph))
    return " ".join(why), anti, fix


# GitHub code scanning limits shortDescription and fullDescription to 1024 characters.
_MAX_DESCRIPTION = 1024


def _first_sentences(text: str, limit: int) -> str:
    """``text`` if it fits in ``limit`` characters, else its longest prefix of whole sentences
    that does (with an ellipsis when even the first sentence is too long)."""
    if len(text) <= limit:
        return text
    cut = text.rfind(". ", 0, limit)
    if cut < 0:
        return text[: limit - 1] + "…"
    return text[: cut + 1]


def sarif_rule(rule: Rule, docs_url: str = DEFAULT_DOCS_URL) -> dict[str, Any]:
    """The SARIF ``reportingDescriptor`` of one rule; ``helpUri`` is ``docs_url#<anchor>``
    (``docs_url`` being the absolute URL of ``docs/rules.md``, ``[audit] docs_url``)."""
    why, anti, fix = _doc_parts(rule)
    help_uri = f"{docs_url}#{rule_anchor(rule)}"
    labelled = [
        (label.strip(), body.strip())
        for label, _, body in (part.partition(":") for part in (anti, fix) if part)
    ]
    labelled.append(("Reference", rule.rfc))
    full = why or rule.summary
    short_full = _first_sentences(full, _MAX_DESCRIPTION)
    help_doc = {
        "text": "\n".join([full] + [f"{label}: {body}" for label, body in labelled]),
        "markdown": "\n\n".join(
            [full]
            + [f"**{label}:** {body}" for label, body in labelled]
            + [f"[{rule.code} {rule.name} in the rules reference]({help_uri})"]
        ),
    }
    return {
        "id": rule.code,
        "name": rule.name,
        "shortDescription": {"text": rule.summary},
        "fullDescription": {"text": short_full},
        "helpUri": help_uri,
        "help": help_doc,
        "defaultConfiguration": {"level": _SARIF_LEVEL[rule.severity]},
        "properties": {"severity": rule.severity.value, "rfc": rule.rfc},
    }


def _position(finding: AuditFinding) -> str:
    if finding.line is not None:
        return f"line:{finding.line}"
    return "grant" if finding.uri is not None else "application"


def finding_fingerprint(finding: AuditFinding) -> str:
    """A digest of (database, application id, position, code, URI): the same finding keeps it
    from one audit to the next. The position is the line of ``redirect_uris`` (blank lines
    and identical URIs on different lines differ), ``grant`` for a live grant's URI (RU103) or
    ``application``. Two findings with the same digest (one line, one code, two messages) are
    told apart by the occurrence count that :class:`SarifWriter` appends."""
    key = "\x1f".join(
        (
            finding.database,
            str(finding.application_id),
            _position(finding),
            finding.code,
            finding.uri or "",
        )
    )
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()[:32]


# --------------------------------------------------------------------------- writers


class ReportWriter(Protocol):
    """Writes one audit document incrementally."""

    def begin(self) -> None:
        """Write whatever precedes the first finding."""

    def finding(self, finding: AuditFinding) -> None:
        """Write one finding."""

    def end(self, summary: AuditSummary) -> None:
        """Write the summary and close the document."""


def _dumps(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False)


def _indented(value: Any, indent: str) -> str:
    return json.dumps(value, ensure_ascii=False, indent=2).replace("\n", "\n" + indent)


class JsonWriter:
    """``{"findings": [...], "summary": {...}}``, one finding per line."""

    def __init__(self, out: IO[str]) -> None:
        self._out = out
        self._first = True

    def begin(self) -> None:
        self._out.write('{\n  "findings": [')

    def finding(self, finding: AuditFinding) -> None:
        self._out.write(("\n    " if self._first else ",\n    ") + _dumps(finding_to_dict(finding)))
        self._first = False

    def end(self, summary: AuditSummary) -> None:
        close = "]" if self._first else "\n  ]"
        self._out.write(f'{close},\n  "summary": {_indented(summary_to_dict(summary), "  ")}\n}}\n')


_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def _cell(value: object) -> object:
    if isinstance(value, str) and value.startswith(_FORMULA_START):
        return "'" + value
    return "" if value is None else value


class CsvWriter:
    """A header row of :data:`FINDING_FIELDS`, then one row per finding (RFC 4180)."""

    def __init__(self, out: IO[str]) -> None:
        self._writer = csv.writer(out)

    def begin(self) -> None:
        self._writer.writerow(FINDING_FIELDS)

    def finding(self, finding: AuditFinding) -> None:
        self._writer.writerow([_cell(v) for v in finding_to_dict(finding).values()])

    def end(self, summary: AuditSummary) -> None:
        """CSV has no place for the summary; the CLI prints it for people."""


class SarifWriter:
    """A SARIF 2.1.0 log with one run: every rule in ``tool.driver.rules``, one result per
    finding, in the shape GitHub code scanning ingests.

    There is no source file, so each result has exactly one location whose physical location
    is the application table, ``<database>/<table>`` relative to the base ``OAUTHMIG_DATABASES``
    (``oauthmig:///``), with the row's id as its line (``region.startLine``; ids below 1 use
    line 1), and whose logical location is the row, ``<database>/<table>/<id>``, kind
    ``object``. ``partialFingerprints.primaryLocationLineHash`` is
    ``<finding_fingerprint>:<occurrence>``, unique per (database, application, line of
    ``redirect_uris``, rule)."""

    def __init__(
        self, out: IO[str], application_table: str, docs_url: str = DEFAULT_DOCS_URL
    ) -> None:
        self._out = out
        self._table = application_table
        self._docs_url = docs_url
        self._first = True
        self._rule_index = {code: i for i, code in enumerate(RULES)}
        self._app: tuple[str, int] | None = None
        self._seen: dict[str, int] = {}

    def begin(self) -> None:
        driver = {
            "name": "oauthmig",
            "version": tool_version(),
            "informationUri": INFORMATION_URI,
            "rules": [sarif_rule(rule, self._docs_url) for rule in RULES.values()],
        }
        head = {"$schema": SARIF_SCHEMA_URI, "version": SARIF_VERSION}
        self._out.write(
            "{\n"
            + "".join(f"  {_dumps(k)}: {_dumps(v)},\n" for k, v in head.items())
            + '  "runs": [\n    {\n'
            + f'      "tool": {{"driver": {_indented(driver, "      ")}}},\n'
            + '      "results": ['
        )

    def _occurrence(self, f: AuditFinding, digest: str) -> int:
        app = (f.database, f.application_id)
        if app != self._app:  # findings arrive grouped by application
            self._app = app
            self._seen = {}
        count = self._seen.get(digest, 0) + 1
        self._seen[digest] = count
        return count

    def _result(self, f: AuditFinding) -> dict[str, Any]:
        text = f"{f.uri}: {f.message}" if f.uri is not None else f.message
        digest = finding_fingerprint(f)
        row_line = f.application_id if f.application_id >= 1 else 1
        return {
            "ruleId": f.code,
            "ruleIndex": self._rule_index[f.code],
            "level": _SARIF_LEVEL[f.severity],
            "message": {"text": text},
            "locations": [
                {
                    "physicalLocation": {
                        "artifactLocation": {
                            "uri": f"{f.database}/{self._table}",
                            "uriBaseId": ARTIFACT_BASE_ID,
                        },
                        "region": {
                            "startLine": row_line,
                            "startColumn": 1,
                            "endLine": row_line,
                            "endColumn": 2,
                        },
                    },
                    "logicalLocations": [
                        {
                            "name": str(f.application_id),
                            "fullyQualifiedName": (
                                f"{f.database}/{self._table}/{f.application_id}"
                            ),
                            "kind": "object",
                            "properties": {
                                "database": f.database,
                                "table": self._table,
                                "applicationId": f.application_id,
                                "clientId": f.client_id,
                                "redirectUrisLine": f.line,
                            },
                        }
                    ],
                }
            ],
            "partialFingerprints": {
                _FINGERPRINT_KEY: f"{digest}:{self._occurrence(f, digest)}",
                _FINGERPRINT_SCHEME_KEY: digest,
            },
            "properties": {
                "uri": f.uri,
                "normalized": f.normalized,
                "severity": f.severity.value,
                "redirectUrisLine": f.line,
            },
        }

    def finding(self, finding: AuditFinding) -> None:
        sep = "\n        " if self._first else ",\n        "
        self._out.write(sep + _dumps(self._result(finding)))
        self._first = False

    def end(self, summary: AuditSummary) -> None:
        close = "]" if self._first else "\n      ]"
        invocation = {"executionSuccessful": True}
        bases = {
            ARTIFACT_BASE_ID: {
                "uri": ARTIFACT_BASE_URI,
                "description": {
                    "text": "oauthmig databases: <database>/<table> is a table of a configured "
                    "database, a result's line is the row id"
                },
            }
        }
        self._out.write(
            f"{close},\n"
            f'      "originalUriBaseIds": {_dumps(bases)},\n'
            f'      "invocations": [{_dumps(invocation)}],\n'
            f'      "properties": {{"summary": {_indented(summary_to_dict(summary), "      ")}}}\n'
            "    }\n  ]\n}\n"
        )


def writer_for(
    fmt: str, out: IO[str], *, application_table: str, docs_url: str = DEFAULT_DOCS_URL
) -> ReportWriter:
    """The writer of a machine format (``json``, ``csv`` or ``sarif``); ``docs_url`` is the
    absolute URL of the rules reference that SARIF links each rule to."""
    if fmt == "json":
        return JsonWriter(out)
    if fmt == "csv":
        return CsvWriter(out)
    if fmt == "sarif":
        return SarifWriter(out, application_table, docs_url)
    raise ValueError(f"unknown report format {fmt!r}")


def atomic_output(path: str | os.PathLike[str]) -> contextlib.AbstractContextManager[IO[str]]:
    """The report file behind ``--output``: :func:`oauthmig.output.files.output_file` (atomic for
    regular files, direct for devices and FIFOs, symlinks resolved, directories refused)."""
    return output_file(path)
