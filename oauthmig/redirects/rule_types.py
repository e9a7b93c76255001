"""What every redirect and metadata rule is: a stable code, a name, a severity and its docs.

Shared by :mod:`oauthmig.redirects.rules` (the redirect URI rules, and :data:`RULES`, the one
registry of every rule) and :mod:`oauthmig.redirects.metadata_rules` (RU105-RU110), which
therefore need not import each other.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum

from oauthmig.config import DEFAULT_DOCS_URL


class Severity(StrEnum):
    """How bad a finding is: errors fail a URI, warnings warn, info never affects the verdict."""

    ERROR = "error"
    WARNING = "warning"
    INFO = "info"


@dataclass(frozen=True, slots=True)
class Rule:
    """One rule of the registry: stable code, name, severity, one-line summary, the RFC
    section it enforces and its documentation (anti-pattern and fix)."""

    code: str
    name: str
    severity: Severity
    summary: str
    rfc: str
    doc: str


def make_rule(
    registry: dict[str, Rule],
    code: str,
    name: str,
    severity: Severity,
    summary: str,
    rfc: str,
    func: Callable[..., object],
) -> Rule:
    """A rule documented by ``func``'s docstring, added to ``registry`` (codes are unique)."""
    if code in registry:  # pragma: no cover - guards the registry while editing
        raise RuntimeError(f"duplicate rule code {code}")
    rule = Rule(code, name, severity, summary, rfc, inspect.cleandoc(func.__doc__ or ""))
    registry[code] = rule
    return rule


def rule_anchor(rule: Rule) -> str:
    """The GitHub-style anchor of the rule's section in ``docs/rules.md``."""
    heading = f"{rule.code} {rule.name}".lower()
    return re.sub(r"[^a-z0-9 _-]", "", heading).replace(" ", "-")


def rule_help_uri(rule: Rule, docs_url: str = DEFAULT_DOCS_URL) -> str:
    """Where the rule is documented: ``docs_url#<anchor>`` (``docs_url`` being the absolute URL
    of ``docs/rules.md``, ``[audit] docs_url``). SARIF ``helpUri`` and the HTML report link here."""
    return f"{docs_url}#{rule_anchor(rule)}"
