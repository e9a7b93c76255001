"""docs/rules.md has exactly one section per registered rule, matching the registry."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from oauthmig.redirects.rules import RULES

RULES_MD = Path(__file__).resolve().parent.parent / "docs" / "rules.md"
_HEADING = re.compile(r"^## (.*)$", re.M)
_LABELS = ("**Severity:**", "**Summary:**", "**RFC:**", "**Why.**", "**Anti-pattern", "**Fix:**")


def _sections() -> dict[str, str]:
    """Heading text -> section body, for every level-2 heading."""
    text = RULES_MD.read_text(encoding="utf-8")
    matches = list(_HEADING.finditer(text))
    sections: dict[str, str] = {}
    for match, following in zip(matches, [*matches[1:], None], strict=True):
        end = following.start() if following is not None else len(text)
        heading = match.group(1).strip()
        assert heading not in sections, f"duplicate section {heading!r}"
        sections[heading] = text[match.end() : end]
    return sections


def test_sections_are_exactly_the_registry_in_code_order() -> None:
    expected = [f"{rule.code} {rule.name}" for rule in RULES.values()]
    assert list(_sections()) == expected


@pytest.mark.parametrize("code", list(RULES))
def test_section_matches_rule(code: str) -> None:
    rule = RULES[code]
    body = _sections()[f"{rule.code} {rule.name}"]
    severity = re.search(r"^- \*\*Severity:\*\* (\w+)$", body, re.M)
    assert severity is not None
    assert severity.group(1) == rule.severity.value
    for label in _LABELS:
        assert label in body, label
    assert f"- **RFC:** {rule.rfc}" in body
    assert rule.summary in body.replace("\n", " ")
