"""oauthmig's own tables on every database: Alembic's version table (``oauthmig_version``),
which oauthmig only reads here, and the revision log (``oauthmig_revision_log``), read with
plain SQL so that code which must not load Alembic reads the same state as ``upgrade``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import (
    Column,
    DateTime,
    MetaData,
    String,
    Table,
    Text,
    select,
)
from sqlalchemy.engine import Connection

from oauthmig.errors import SchemaStateError
from oauthmig.revision_types import RevisionInfo
from oauthmig.table_columns import has_table, table_columns

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


def _version_heads(conn: Connection) -> tuple[str, ...]:
    heads: tuple[str, ...] = ()
    if has_table(conn, VERSION_TABLE):
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
    have = table_columns(conn, LOG_TABLE)
    if have is None:
        return {}
    cols = [c for c in revision_log.c if c.name in have]
    rows = conn.execute(select(*cols)).mappings().all()
    if conn.in_transaction():
        conn.rollback()
    return {r["revision"]: {**dict.fromkeys(LATER_LOG_COLUMNS), **dict(r)} for r in rows}
