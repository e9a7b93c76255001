"""The preflight every command runs on a database before it reads or writes, without Alembic.

The checks take the catalogue of revisions (:mod:`oauthmig.revision_types`) as an argument and
read the version table and the revision log (:mod:`oauthmig.version_tables`) with plain SQL, so
that code which must not load Alembic (the redirect audit) runs the same preflight as
``upgrade``: every routed table exists, the version table holds one known revision, and the
columns of applied revisions are present. Every service (rollout, the audit, prune) imports it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import inspect
from sqlalchemy.engine import Connection
from sqlalchemy.types import TypeEngine

from oauthmig.config import DatabaseConfig, Settings
from oauthmig.errors import MissingTableError, SchemaStateError
from oauthmig.privileges import Command, check_privileges
from oauthmig.revision_types import RevisionInfo, incompatible_column, revision_position
from oauthmig.version_tables import LOG_TABLE, read_current, read_log


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
    first (:func:`~oauthmig.privileges.check_privileges`, PostgreSQL).
    """
    if command is not None:
        check_privileges(conn, settings, db, command)
    check_routed_tables(conn, settings, db.name)
    current = read_current(conn, db.name, revisions)
    preflight(conn, settings, db, revisions, current, [])
    return current
