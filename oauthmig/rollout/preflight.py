"""Revision descriptions and the preflight every command runs on a database, without Alembic.

A revision is described by :class:`RevisionInfo` (the logical tables it touches, the
:class:`ColumnSpec` it adds, the backfills it waits for); the catalogue of them is read from
the revision files by :func:`oauthmig.rollout.revisions.history`, which needs Alembic. The
checks here take that catalogue as an argument and read the version table
(``oauthmig_version``) and the revision log (``oauthmig_revision_log``) with plain SQL, so
that code which must not load Alembic (the redirect audit) runs the same preflight as
``upgrade``: every routed table exists, the version table holds one known revision, and the
columns of applied revisions are present.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sqlalchemy import (
    Column,
    DateTime,
    MetaData,
    String,
    Table,
    Text,
    inspect,
    select,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection
from sqlalchemy.types import TypeEngine

from oauthmig.config import DatabaseConfig, Settings
from oauthmig.errors import IncompatibleColumnError, MissingTableError, SchemaStateError
from oauthmig.rollout.privileges import Command, check_privileges

if TYPE_CHECKING:
    from oauthmig.rollout.revisions import RevisionTarget

VERSION_TABLE = "oauthmig_version"
LOG_TABLE = "oauthmig_revision_log"

log_metadata = MetaData()
revision_log = Table(
    LOG_TABLE,
    log_metadata,
    Column("revision", String(32), primary_key=True),
    Column("outcome", String(16), nullable=False),
    Column("tables", String(100), nullable=False),
    Column("adopted", Text, nullable=True),
    Column("detail", Text, nullable=True),
    Column("updated_at", DateTime(timezone=True), nullable=False),
    # Added later (older log tables get it on first use): sha256 of the revision file recorded.
    Column("checksum", String(64), nullable=True),
)
#: Columns of the revision log that older versions of oauthmig did not create.
LATER_LOG_COLUMNS = ("checksum",)
#: ``detail`` of a log row written by ``oauthmig stamp`` (the revision's SQL ran elsewhere).
STAMPED = "stamped: recorded by oauthmig stamp, its SQL was applied by hand"
# Alembic's version table, as Alembic creates it; only read here.
_version_table = Table(
    VERSION_TABLE, MetaData(), Column("version_num", String(32), primary_key=True)
)


# --------------------------------------------------------------------------- descriptions


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
    verify_applied: Callable[[Connection, RevisionTarget], list[str]] | None = None

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


# --------------------------------------------------------------------------- state reading


def _version_heads(conn: Connection) -> tuple[str, ...]:
    heads: tuple[str, ...] = ()
    if inspect(conn).has_table(VERSION_TABLE):
        heads = tuple(str(v) for v in conn.execute(select(_version_table.c.version_num)).scalars())
    if conn.in_transaction():
        conn.rollback()
    return heads


def read_current(conn: Connection, db: str, revisions: Sequence[RevisionInfo]) -> str | None:
    """The revision recorded on this database (``None`` = base); unknown ones are an error."""
    heads = _version_heads(conn)
    if not heads:
        return None
    if len(heads) > 1:
        raise SchemaStateError(f"database {db!r}: version table {VERSION_TABLE} has several rows")
    known = {r.revision for r in revisions}
    if heads[0] not in known:
        raise SchemaStateError(
            f"database {db!r}: version table records revision {heads[0]!r}, which this oauthmig "
            "does not know; upgrade oauthmig, or use the version that applied it"
        )
    return heads[0]


def read_log(conn: Connection) -> dict[str, dict[str, Any]]:
    """Rows of the revision log keyed by revision (empty if the table does not exist).

    A log table written by an older oauthmig lacks the later columns: they read as ``None``.
    """
    insp = inspect(conn)
    if not insp.has_table(LOG_TABLE):
        return {}
    have = {c["name"] for c in insp.get_columns(LOG_TABLE)}
    cols = [c for c in revision_log.c if c.name in have]
    rows = conn.execute(select(*cols)).mappings().all()
    if conn.in_transaction():
        conn.rollback()
    return {r["revision"]: {**dict.fromkeys(LATER_LOG_COLUMNS), **dict(r)} for r in rows}


# --------------------------------------------------------------------------- checks


def check_routed_tables(conn: Connection, settings: Settings, database: str) -> None:
    """Raise :class:`MissingTableError` naming the first routed table absent from ``database``."""
    existing = set(inspect(conn).get_table_names())
    if conn.in_transaction():
        conn.rollback()
    for logical in settings.tables_on(database):
        physical = settings.tables.physical(logical)
        if physical not in existing:
            raise MissingTableError(
                f"database {database!r}: routed table {logical!r} ({physical}) does not exist; "
                f"create it, or remove {database!r} from [routing] {logical}"
            )


def preflight(
    conn: Connection,
    settings: Settings,
    db: DatabaseConfig,
    revisions: Sequence[RevisionInfo],
    current: str | None,
    pending: Sequence[RevisionInfo],
    reverting: Sequence[RevisionInfo] = (),
) -> None:
    """Refuse, before writing anything, what would fail midway.

    Checks that every routed table exists, that applied revisions' columns are present (else the
    database is half-migrated), and that pending columns that already exist can be adopted.
    Revisions being reverted may miss columns (that is how a half-migrated database is
    repaired), but their revision log row must prove which columns oauthmig added.
    """
    insp = inspect(conn)
    routed = settings.tables_on(db.name)
    check_routed_tables(conn, settings, db.name)
    columns: dict[str, dict[str, TypeEngine[Any]]] = {}
    for logical in routed:
        physical = settings.tables.physical(logical)
        columns[logical] = {c["name"]: c["type"] for c in insp.get_columns(physical)}
    reverted = {r.revision for r in reverting}
    log = read_log(conn) if reverting else {}
    for rev in reverting:
        row = log.get(rev.revision)
        if any(c.table in routed for c in rev.columns) and (
            row is None or row.get("outcome") != "applied"
        ):
            raise SchemaStateError(
                f"database {db.name!r}: revision {rev.revision} has no 'applied' row in "
                f"{LOG_TABLE}, so nothing proves which of its columns oauthmig added (and which "
                "existed before); restore the row, or drop the columns by hand"
            )
    for rev in revisions[: revision_position(current, revisions)]:
        if rev.revision in reverted:
            continue
        for spec in rev.columns:
            if spec.table in routed and spec.name not in columns[spec.table]:
                raise SchemaStateError(
                    f"database {db.name!r}: revision {rev.revision} is recorded as applied but "
                    f"{settings.tables.physical(spec.table)}.{spec.name} is missing "
                    f"(half-migrated); restore the column, or `oauthmig downgrade --to "
                    f"{rev.down_revision or 'base'} -d {db.name}` then upgrade again"
                )
            found = columns[spec.table].get(spec.name) if spec.table in routed else None
            if found is not None and not spec.compatible(found, conn.dialect.name):
                # Only an adoption by an offline script, which cannot compare types, gets here.
                raise incompatible_column(
                    db.name, settings.tables.physical(spec.table), spec, found, conn.dialect.name
                )
    for rev in pending:
        for spec in rev.columns:
            if spec.table not in routed:
                continue
            found = columns[spec.table].get(spec.name)
            if found is not None and not spec.compatible(found, conn.dialect.name):
                raise incompatible_column(
                    db.name, settings.tables.physical(spec.table), spec, found, conn.dialect.name
                )
    if conn.in_transaction():
        conn.rollback()


def check_state(
    conn: Connection,
    settings: Settings,
    db: DatabaseConfig,
    revisions: Sequence[RevisionInfo],
    command: Command | None = None,
) -> str | None:
    """The preflight every command that reads or writes a database runs; the current revision.

    ``revisions`` is the catalogue (:func:`oauthmig.rollout.revisions.history`). Raises
    (:class:`SchemaStateError`, :class:`MissingTableError`) when a routed table is missing, the
    version table names an unknown revision or holds several rows, or a column of an applied
    revision is missing (half-migrated). With ``command``, the role's privileges are checked
    first (:func:`~oauthmig.rollout.privileges.check_privileges`, PostgreSQL).
    """
    if command is not None:
        check_privileges(conn, settings, db, command)
    check_routed_tables(conn, settings, db.name)
    current = read_current(conn, db.name, revisions)
    preflight(conn, settings, db, revisions, current, [])
    return current
