"""The ``audit-redirects`` baseline: adopt an audit on real data, fail only on new findings.

``--write-baseline FILE`` records every finding of the audit by a stable fingerprint;
``--baseline FILE`` then classifies each finding as ``new`` (not in the baseline) or
``unchanged``, and each baseline entry no longer found as ``absent`` (SARIF 2.1.0 §3.27.24
``baselineState``).

The fingerprint (:func:`baseline_fingerprint`) is a SHA-256 over (database, client_id, rule
code, metadata field, URI), the URI being the finding's normalized form when it has one (else
the URI as stored, or nothing for a finding about the whole application), masked
(:func:`oauthmig.redact.mask_uri`). It does not depend on the order rows are read in, on the ids
the database assigned, on the line of ``redirect_uris`` a URI is on or on the wording of the
message: re-creating an application with the same client_id, moving a URI to another line or
upgrading oauthmig keeps it. Several findings with one fingerprint (two blank lines of one
application, say) are counted: the baseline holds the count, and only findings beyond it are
new.

The file is JSON (``docs/schemas/audit-baseline.schema.json``), sorted by fingerprint so that
it diffs well in review. It holds no secret: fingerprints are hashes of masked text, and the
URIs it shows for people are masked.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import Counter
from dataclasses import dataclass
from typing import Any, Literal

from oauthmig.errors import UsageError
from oauthmig.output.files import output_file
from oauthmig.redact import mask_uri
from oauthmig.redirects.audit import AuditFinding
from oauthmig.redirects.rules import RULES, Severity

__all__ = [
    "BASELINE_VERSION",
    "Baseline",
    "BaselineEntry",
    "BaselineRecorder",
    "BaselineState",
    "baseline_fingerprint",
    "load_baseline",
]

BASELINE_VERSION = 1
BaselineState = Literal["new", "unchanged", "absent"]
_SEVERITIES = {s.value: s for s in Severity}


def _fingerprint_uri(finding: AuditFinding) -> str:
    uri = finding.normalized if finding.normalized is not None else finding.uri
    return "" if uri is None else mask_uri(uri)


def baseline_fingerprint(finding: AuditFinding) -> str:
    """The stable fingerprint of a finding (see the module docstring): 64 hex digits."""
    key = "\x1f".join(
        (
            f"oauthmig-baseline/v{BASELINE_VERSION}",
            finding.database,
            finding.client_id,
            finding.code,
            finding.field or "",
            _fingerprint_uri(finding),
        )
    )
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()


@dataclass(frozen=True, slots=True)
class BaselineEntry:
    """One fingerprint of a baseline, the number of findings it stands for, and what people
    read in review (the URI masked)."""

    fingerprint: str
    count: int
    database: str
    client_id: str
    code: str
    severity: Severity
    field: str | None
    uri: str | None


def _entry_to_dict(e: BaselineEntry) -> dict[str, Any]:
    return {
        "fingerprint": e.fingerprint,
        "count": e.count,
        "database": e.database,
        "client_id": e.client_id,
        "code": e.code,
        "severity": e.severity.value,
        "field": e.field,
        "uri": e.uri,
    }


class Baseline:
    """A loaded baseline, matched against the findings of one audit as they stream by."""

    def __init__(self, path: str, entries: dict[str, BaselineEntry]) -> None:
        self.path = path
        self.entries = entries
        self._seen: Counter[str] = Counter()
        self.counts: Counter[BaselineState] = Counter()

    def state(self, finding: AuditFinding) -> BaselineState:
        """``unchanged`` while the baseline holds more findings of this fingerprint than were
        seen so far, else ``new``."""
        fingerprint = baseline_fingerprint(finding)
        self._seen[fingerprint] += 1
        entry = self.entries.get(fingerprint)
        state: BaselineState = (
            "unchanged" if entry is not None and self._seen[fingerprint] <= entry.count else "new"
        )
        self.counts[state] += 1
        return state

    def absent(self) -> list[BaselineEntry]:
        """The baseline's findings this audit did not produce (after it ended), one entry per
        missing finding, in fingerprint order."""
        out: list[BaselineEntry] = []
        for fingerprint, entry in sorted(self.entries.items()):
            missing = entry.count - min(entry.count, self._seen.get(fingerprint, 0))
            out.extend([entry] * missing)
        return out


def _bad(path: str, why: str) -> UsageError:
    return UsageError(
        f"--baseline {path}: {why}; write one with `oauthmig audit-redirects --write-baseline "
        f"{path}`"
    )


def _entry(path: str, raw: object) -> BaselineEntry:
    if not isinstance(raw, dict):
        raise _bad(path, "each entry of findings must be an object")
    try:
        fingerprint = raw["fingerprint"]
        count = raw.get("count", 1)
        code = raw["code"]
        severity = _SEVERITIES.get(raw.get("severity", ""))
        if severity is None and code in RULES:
            severity = RULES[code].severity
    except KeyError as exc:
        raise _bad(path, f"an entry has no {exc.args[0]!r}") from None
    if not (
        isinstance(fingerprint, str)
        and len(fingerprint) == 64
        and all(c in "0123456789abcdef" for c in fingerprint)
    ):
        raise _bad(path, "a fingerprint is not 64 lowercase hex digits")
    if not isinstance(count, int) or isinstance(count, bool) or count < 1:
        raise _bad(path, f"the count of {fingerprint[:12]}... is not a positive integer")
    if not isinstance(code, str) or severity is None:
        raise _bad(path, f"the entry {fingerprint[:12]}... has an unknown code or severity")
    text = {k: raw.get(k) for k in ("database", "client_id", "field", "uri")}
    if any(v is not None and not isinstance(v, str) for v in text.values()):
        raise _bad(path, f"the entry {fingerprint[:12]}... has a non-string field")
    return BaselineEntry(
        fingerprint,
        count,
        text["database"] or "",
        text["client_id"] or "",
        code,
        severity,
        text["field"],
        text["uri"],
    )


def load_baseline(path: str) -> Baseline:
    """Read a baseline file; any problem is a one-line :class:`UsageError` (exit 2)."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise _bad(path, "no such file") from None
    except IsADirectoryError:
        raise _bad(path, "is a directory") from None
    except OSError as exc:
        raise _bad(path, f"cannot be read ({exc.strerror or exc})") from None
    except UnicodeDecodeError:
        raise _bad(path, "is not UTF-8 text") from None
    except ValueError as exc:
        raise _bad(path, f"is not JSON ({exc})") from None
    if not isinstance(data, dict) or data.get("tool") != "oauthmig":
        raise _bad(path, "is not an oauthmig audit baseline")
    if data.get("version") != BASELINE_VERSION:
        raise _bad(
            path, f"has version {data.get('version')!r}; this oauthmig reads {BASELINE_VERSION}"
        )
    findings = data.get("findings")
    if not isinstance(findings, list):
        raise _bad(path, "has no findings list")
    entries: dict[str, BaselineEntry] = {}
    for raw in findings:
        entry = _entry(path, raw)
        if entry.fingerprint in entries:
            raise _bad(path, f"the fingerprint {entry.fingerprint[:12]}... appears twice")
        entries[entry.fingerprint] = entry
    return Baseline(path, entries)


class BaselineRecorder:
    """Collects the findings of an audit for ``--write-baseline`` (one entry per fingerprint)."""

    def __init__(self) -> None:
        self._entries: dict[str, BaselineEntry] = {}

    def add(self, finding: AuditFinding) -> None:
        fingerprint = baseline_fingerprint(finding)
        entry = self._entries.get(fingerprint)
        if entry is not None:
            self._entries[fingerprint] = BaselineEntry(
                fingerprint,
                entry.count + 1,
                entry.database,
                entry.client_id,
                entry.code,
                entry.severity,
                entry.field,
                entry.uri,
            )
            return
        self._entries[fingerprint] = BaselineEntry(
            fingerprint,
            1,
            finding.database,
            finding.client_id,
            finding.code,
            finding.severity,
            finding.field,
            _fingerprint_uri(finding) or None,
        )

    @property
    def findings(self) -> int:
        return sum(e.count for e in self._entries.values())

    def document(self) -> dict[str, Any]:
        """The baseline as JSON (see ``docs/schemas/audit-baseline.schema.json``)."""
        return {
            "tool": "oauthmig",
            "version": BASELINE_VERSION,
            "fingerprint": "sha256(database, client_id, code, field, masked normalized URI)",
            "findings": [_entry_to_dict(e) for _, e in sorted(self._entries.items())],
        }

    def write(self, path: str | os.PathLike[str]) -> None:
        """Write the baseline file (replaced atomically, as ``--output`` files are)."""
        with output_file(path, "--write-baseline") as out:
            json.dump(self.document(), out, indent=2, ensure_ascii=False)
            out.write("\n")
