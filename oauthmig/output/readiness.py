"""Enforcement readiness as text lines and as its JSON shape (``status``); the HTML section
is in :mod:`oauthmig.output.html`."""

from __future__ import annotations

from typing import Any

from oauthmig.config import ENFORCEMENT_CHECKS
from oauthmig.rollout.readiness import EnforcementReadiness, WouldReject

#: The revision that brings observe mode's record (see revisions/versions/0007_*).
RECORD_REVISION = "0007"


def _when(value: Any) -> str:
    return str(value.strftime("%Y-%m-%d %H:%M UTC"))


def _who(w: WouldReject) -> str:
    name = w.client_id if w.client_id is not None else "(deleted application)"
    return f"{name} (id {w.application_id})"


def _empty(r: EnforcementReadiness, check: str) -> str:
    if check in r.observed:
        return "ready (observe mode saw no application it would reject)"
    return "not observed (set it to observe to see who it would reject)"


def readiness_lines(r: EnforcementReadiness) -> list[str]:
    """One line per check, and one per application it would reject (for ``status``)."""
    head = f"{r.database} enforcement readiness"
    if not r.recording:
        return [
            f"{head}: nothing recorded (revision {RECORD_REVISION} not applied: observe mode "
            "has no table to record in; run `oauthmig upgrade`)"
        ]
    lines = [f"{head} (observe mode's record since {r.since.date().isoformat()}):"]
    for check in ENFORCEMENT_CHECKS:
        found = r.applications.get(check, ())
        name = f"{check} ({r.modes.get(check, '?')})"
        if not found:
            lines.append(f"  {name}: {_empty(r, check)}")
            continue
        more = " (more not listed)" if check in r.truncated else ""
        lines.append(f"  {name}: {len(found)} applications would be rejected{more}")
        for w in found:
            lines.append(f"    {_who(w)}: {w.count:,} requests, last seen {_when(w.last_seen)}")
    return lines


def readiness_to_dict(r: EnforcementReadiness | None) -> dict[str, Any] | None:
    """The ``enforcement`` member of a database in ``status --format json``."""
    if r is None:
        return None
    return {
        "recording": r.recording,
        "since": r.since.isoformat(),
        "checks": {
            check: {
                "mode": r.modes.get(check),
                "observed": check in r.observed,
                "ready": check in r.observed and not r.applications.get(check),
                "truncated": check in r.truncated,
                "applications": [
                    {
                        "application_id": w.application_id,
                        "client_id": w.client_id,
                        "count": w.count,
                        "first_seen": w.first_seen.isoformat(),
                        "last_seen": w.last_seen.isoformat(),
                    }
                    for w in r.applications.get(check, ())
                ],
            }
            for check in ENFORCEMENT_CHECKS
        },
    }
