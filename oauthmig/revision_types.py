"""What a revision is, without Alembic: :class:`RevisionInfo` (the logical tables it touches,
the :class:`ColumnSpec` it adds, the backfills it waits for) and the column checks they share.

The catalogue of revisions is read from the revision files by
:func:`oauthmig.rollout.revisions.history`, which needs Alembic; everything that only needs to
know what a revision is imports this module instead.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import String
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection
from sqlalchemy.types import TypeEngine

from oauthmig.errors import IncompatibleColumnError, SchemaStateError


@dataclass(frozen=True, slots=True)
class ColumnSpec:
    """A nullable column an expand revision adds, and which existing types it adopts."""

    table: str
    name: str
    type_: TypeEngine[Any]
    expected: str
    compatible: Callable[[TypeEngine[Any], str], bool]


def text_like(min_length: int) -> Callable[[TypeEngine[Any], str], bool]:
    """Adopt TEXT, or VARCHAR/CHAR of at least ``min_length``."""

    def check(found: TypeEngine[Any], _dialect: str) -> bool:
        if not isinstance(found, String):
            return False
        return found.length is None or found.length >= min_length

    return check


def type_name(found: TypeEngine[Any], dialect_name: str) -> str:
    """How a reflected type reads in messages (``varchar(64)``, ``integer``)."""
    module: Any = postgresql if dialect_name == "postgresql" else sqlite
    try:
        return found.compile(dialect=module.dialect()).lower()
    except Exception:
        return str(found).lower()


@dataclass(frozen=True, slots=True)
class RevisionInfo:
    """One revision of the linear history."""

    revision: str
    down_revision: str | None
    message: str
    tables: tuple[str, ...]
    columns: tuple[ColumnSpec, ...]
    requires_backfills: tuple[str, ...]
    checksum: str | None = None  # of the revision file (None: no source file to read)
    # Revisions whose end state is not just their columns (finalize) can say whether a database
    # already has it: (connection, target) -> problems, empty when it does (``oauthmig stamp``).
    # The target is a :class:`oauthmig.rollout.revisions.RevisionTarget`; typed ``Any`` so that
    # describing a revision does not depend on the code that runs one.
    verify_applied: Callable[[Connection, Any], list[str]] | None = None

    def applies_to(self, routed: Sequence[str]) -> bool:
        """The routing rule: a revision runs on a database where one of its tables is routed
        (or everywhere, when it names no table); elsewhere it is recorded as skipped."""
        return not self.tables or any(t in routed for t in self.tables)

    def tables_on(self, routed: Sequence[str]) -> tuple[str, ...]:
        """The revision's tables among ``routed``, in the revision's order."""
        return tuple(t for t in self.tables if t in routed)


def revision_position(rev: str | None, revisions: Sequence[RevisionInfo]) -> int:
    """Position after ``rev`` in the history (0 for base)."""
    if rev is None:
        return 0
    for i, r in enumerate(revisions):
        if r.revision == rev:
            return i + 1
    raise SchemaStateError(f"unknown revision {rev!r}")


def incompatible_column(
    database: str, physical: str, spec: ColumnSpec, found: TypeEngine[Any], dialect: str
) -> IncompatibleColumnError:
    """The refusal for an existing column whose type ``spec`` cannot adopt."""
    return IncompatibleColumnError(
        f"database {database!r}: column {physical}.{spec.name} exists as "
        f"{type_name(found, dialect)}, expected {spec.expected}; alter or rename it, then rerun"
    )
