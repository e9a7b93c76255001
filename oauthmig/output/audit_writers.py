"""The ``audit-redirects`` reports for machines: JSON, CSV and SARIF 2.1.0.

The documents are written incrementally, so that memory does not grow with the number of
findings: a writer gets :meth:`ReportWriter.begin`, one :meth:`ReportWriter.finding` call per
finding as the audit produces it, then :meth:`ReportWriter.end` with the summary. Hence the
summary comes *after* the findings in the JSON document (``{"findings": [...], "summary":
{...}}``; object key order carries no meaning in JSON) and in the SARIF run's ``properties``.
The JSON shapes (of findings and summary, also inside SARIF, and the JSON writer itself) are in
:mod:`oauthmig.output.json`.

CSV cells that a spreadsheet would run as a formula (starting with ``=``, ``+``, ``-``, ``@``,
tab or carriage return) get a leading ``'`` (OWASP CSV injection guidance): stored redirect
URIs are chosen by whoever registered the client. JSON and SARIF carry the values unchanged.

Nothing here reads a secret: the findings never hold one.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import os
import tempfile
from typing import IO, TYPE_CHECKING, Any, Protocol

from oauthmig import tool_version
from oauthmig.config import DEFAULT_DOCS_URL, SARIF_MAX_RESULTS
from oauthmig.output.files import output_file
from oauthmig.output.json import (
    FINDING_FIELDS,
    JsonWriter,
    dumps_compact,
    dumps_indented,
    finding_to_dict,
    summary_to_dict,
)
from oauthmig.redirects.audit import AuditFinding, AuditSummary
from oauthmig.redirects.rule_types import rule_anchor, rule_help_uri
from oauthmig.redirects.rules import RULES, Rule, Severity

if TYPE_CHECKING:
    from oauthmig.output.baseline import BaselineEntry, BaselineState

__all__ = [
    "ARTIFACT_BASE_ID",
    "ARTIFACT_BASE_URI",
    "FINDING_FIELDS",
    "INFORMATION_URI",
    "RULES_DOC",
    "SARIF_MAX_RESULTS",
    "SARIF_SCHEMA_URI",
    "CsvWriter",
    "JsonWriter",
    "ReportWriter",
    "SarifWriter",
    "atomic_output",
    "finding_fingerprint",
    "rule_anchor",
    "rule_help_uri",
    "sarif_rule",
    "tool_version",
    "writer_for",
]

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
_BASELINE_FINGERPRINT_KEY = "oauthmig/baseline/v1"


# --------------------------------------------------------------------------- rule documentation


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
    help_uri = rule_help_uri(rule, docs_url)
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
    if finding.field is not None:
        return f"metadata:{finding.field}"
    if finding.line is not None:
        return f"line:{finding.line}"
    return "grant" if finding.uri is not None else "application"


def finding_fingerprint(finding: AuditFinding) -> str:
    """A digest of (database, application id, position, code, URI): the same finding keeps it
    from one audit to the next. The position is the line of ``redirect_uris`` (blank lines
    and identical URIs on different lines differ), ``grant`` for a live grant's URI (RU103),
    ``metadata:<field>`` for a client metadata finding (RU105-RU110) or ``application``.
    Two findings with the same digest (one line, one code, two messages) are told apart by
    the occurrence count that :class:`SarifWriter` appends."""
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
    ``redirect_uris``, rule).

    At most ``max_results`` results (GitHub code scanning's limit,
    :data:`SARIF_MAX_RESULTS`) are written, the most severe first: results wait in one
    temporary file per level (memory stays constant) and are written errors first, then
    warnings, then notes, each in audit order. When some are left out, the run's invocation
    carries a ``toolExecutionNotification`` saying how many, of which levels, and how to get
    them all. With a baseline (``--baseline``), each result carries ``baselineState`` (``new``
    or ``unchanged``) and :meth:`absent` adds the baseline's findings no longer found
    (``absent``, SARIF 2.1.0 §3.27.24)."""

    def __init__(
        self,
        out: IO[str],
        application_table: str,
        docs_url: str = DEFAULT_DOCS_URL,
        *,
        max_results: int = SARIF_MAX_RESULTS,
    ) -> None:
        if max_results < 1:
            raise ValueError("max_results must be at least 1")
        self._out = out
        self._table = application_table
        self._docs_url = docs_url
        self._max_results = max_results
        self._rule_index = {code: i for i, code in enumerate(RULES)}
        self._app: tuple[str, int] | None = None
        self._seen: dict[str, int] = {}
        self._spills: dict[str, IO[str]] = {}
        self._counts: dict[str, int] = {level: 0 for level in _SARIF_LEVEL.values()}

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
            + "".join(f"  {dumps_compact(k)}: {dumps_compact(v)},\n" for k, v in head.items())
            + '  "runs": [\n    {\n'
            + f'      "tool": {{"driver": {dumps_indented(driver, "      ")}}},\n'
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
                                "field": f.field,
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
                "field": f.field,
            },
        }

    def _spill(self, level: str, result: dict[str, Any]) -> None:
        spill = self._spills.get(level)
        if spill is None:
            # Closed once written out (end), or with the writer.
            spill = tempfile.TemporaryFile("w+", encoding="utf-8")  # noqa: SIM115
            self._spills[level] = spill
        spill.write(dumps_compact(result) + "\n")
        self._counts[level] += 1

    def finding(self, finding: AuditFinding, baseline_state: BaselineState | None = None) -> None:
        result = self._result(finding)
        if baseline_state is not None:
            result["baselineState"] = baseline_state
        self._spill(result["level"], result)

    def absent(self, entry: BaselineEntry, baseline_path: str) -> None:
        """A result for a baseline finding this audit no longer produces."""
        what = f"{entry.uri}: " if entry.uri else ""
        self._spill(
            _SARIF_LEVEL[entry.severity],
            {
                "ruleId": entry.code,
                **({"ruleIndex": self._rule_index[entry.code]} if entry.code in RULES else {}),
                "level": _SARIF_LEVEL[entry.severity],
                "message": {
                    "text": f"{what}no longer found (it is in the baseline {baseline_path})"
                },
                "baselineState": "absent",
                "locations": [
                    {
                        "physicalLocation": {
                            "artifactLocation": {
                                "uri": f"{entry.database}/{self._table}",
                                "uriBaseId": ARTIFACT_BASE_ID,
                            },
                            "region": {"startLine": 1, "startColumn": 1},
                        },
                        "logicalLocations": [
                            {
                                "fullyQualifiedName": (
                                    f"{entry.database}/{self._table}/client_id={entry.client_id}"
                                ),
                                "kind": "object",
                                "properties": {
                                    "database": entry.database,
                                    "table": self._table,
                                    "clientId": entry.client_id,
                                    "field": entry.field,
                                },
                            }
                        ],
                    }
                ],
                "partialFingerprints": {
                    _FINGERPRINT_KEY: f"{entry.fingerprint[:32]}:absent",
                    _BASELINE_FINGERPRINT_KEY: entry.fingerprint,
                },
                "properties": {"uri": entry.uri, "severity": entry.severity.value},
            },
        )

    def _write_results(self) -> tuple[int, dict[str, int]]:
        """Write the kept results, most severe first; returns (written, left out per level)."""
        written = 0
        left: dict[str, int] = {}
        for level in _SARIF_LEVEL.values():
            spill = self._spills.get(level)
            if spill is None:
                continue
            spill.seek(0)
            for line in spill:
                if written >= self._max_results:
                    left[level] = left.get(level, 0) + 1
                    continue
                sep = "\n        " if written == 0 else ",\n        "
                self._out.write(sep + line.rstrip("\n"))
                written += 1
            spill.close()
        self._spills.clear()
        return written, left

    def end(self, summary: AuditSummary) -> None:
        written, left = self._write_results()
        close = "]" if written == 0 else "\n      ]"
        invocation: dict[str, Any] = {"executionSuccessful": True}
        if left:
            total = written + sum(left.values())
            levels = ", ".join(f"{n:,} {level}" for level, n in left.items())
            invocation["toolExecutionNotifications"] = [
                {
                    "descriptor": {"id": "oauthmig/results-capped"},
                    "level": "warning",
                    "message": {
                        "text": f"{total - written:,} of {total:,} results left out ({levels}): "
                        f"GitHub code scanning accepts at most {self._max_results:,} results per "
                        "run, so the most severe were kept; `oauthmig audit-redirects --format "
                        "json` or `--format csv` writes every finding"
                    },
                    "properties": {"leftOut": left, "kept": written, "total": total},
                }
            ]
        bases = {
            ARTIFACT_BASE_ID: {
                "uri": ARTIFACT_BASE_URI,
                "description": {
                    "text": "oauthmig databases: <database>/<table> is a table of a configured "
                    "database, a result's line is the row id"
                },
            }
        }
        summary_json = dumps_indented(summary_to_dict(summary), "      ")
        self._out.write(
            f"{close},\n"
            f'      "originalUriBaseIds": {dumps_compact(bases)},\n'
            f'      "invocations": [{dumps_compact(invocation)}],\n'
            f'      "properties": {{"summary": {summary_json}}}\n'
            "    }\n  ]\n}\n"
        )


def writer_for(
    fmt: str,
    out: IO[str],
    *,
    application_table: str,
    docs_url: str = DEFAULT_DOCS_URL,
    sarif_max_results: int = SARIF_MAX_RESULTS,
) -> ReportWriter:
    """The writer of a machine format (``json``, ``csv`` or ``sarif``); ``docs_url`` is the
    absolute URL of the rules reference that SARIF links each rule to."""
    if fmt == "json":
        return JsonWriter(out)
    if fmt == "csv":
        return CsvWriter(out)
    if fmt == "sarif":
        return SarifWriter(out, application_table, docs_url, max_results=sarif_max_results)
    raise ValueError(f"unknown report format {fmt!r}")


def atomic_output(path: str | os.PathLike[str]) -> contextlib.AbstractContextManager[IO[str]]:
    """The report file behind ``--output``: :func:`oauthmig.output.files.output_file` (atomic for
    regular files, direct for devices and FIFOs, symlinks resolved, directories refused)."""
    return output_file(path)
