"""Finalize operations: indexes built CONCURRENTLY, CHECK constraints NOT VALID then VALIDATE,
NOT NULL through a validated CHECK (PostgreSQL); the same end state by table rebuild on SQLite.

Every PostgreSQL step runs in Alembic's ``autocommit_block`` (outside a transaction, as
``CREATE INDEX CONCURRENTLY`` requires) and is idempotent online, so a revision retried after a
lock timeout or a crash picks up where it stopped. Called from revision code only.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable
from dataclasses import dataclass

from sqlalchemy import Column, Table, inspect, text
from sqlalchemy.engine import Connection

from oauthmig.migrations import ColumnSpec, RevisionTarget, current_target


@dataclass(frozen=True, slots=True)
class Check:
    """A CHECK constraint on a logical table; ``sql`` uses plain column names."""

    table: str
    suffix: str
    sql: str


@dataclass(frozen=True, slots=True)
class IndexSpec:
    """A single-column index on a logical table."""

    table: str
    column: str


@dataclass(frozen=True, slots=True)
class NotNull:
    """A column made NOT NULL (PostgreSQL: via a validated CHECK, no full-lock scan)."""

    table: str
    column: str
    spec: ColumnSpec


def object_name(physical: str, suffix: str) -> str:
    """A constraint or index name within PostgreSQL's 63-byte limit, stable for the table."""
    name = f"{physical}_{suffix}"
    if len(name) <= 63:
        return name
    digest = f"{zlib.crc32(physical.encode()):08x}"
    return f"{physical[: 63 - len(suffix) - 10]}_{digest}_{suffix}"


def _pg_exec(sql: str) -> None:
    from alembic import op

    op.execute(text(sql))


def _bind() -> Connection | None:
    from alembic import op

    ctx = op.get_context()
    return None if ctx.as_sql else op.get_bind()


def _pg_constraint(conn: Connection, name: str) -> bool | None:
    """``None`` if absent, else whether it is validated."""
    row = conn.execute(
        text("SELECT convalidated FROM pg_constraint WHERE conname = :n"), {"n": name}
    ).first()
    return None if row is None else bool(row[0])


def _pg_index_valid(conn: Connection, name: str) -> bool | None:
    row = conn.execute(
        text(
            "SELECT i.indisvalid FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid "
            "WHERE c.relname = :n"
        ),
        {"n": name},
    ).first()
    return None if row is None else bool(row[0])


def _pg_not_null(conn: Connection, physical: str, column: str) -> bool:
    row = conn.execute(
        text(
            "SELECT is_nullable FROM information_schema.columns WHERE table_name = :t "
            "AND column_name = :c AND table_schema = current_schema()"
        ),
        {"t": physical, "c": column},
    ).first()
    return row is not None and row[0] == "NO"


def upgrade(checks: list[Check], not_nulls: list[NotNull], indexes: list[IndexSpec]) -> None:
    """Apply the finalize operations for the tables routed to this database."""
    _dispatch(checks, not_nulls, indexes, _pg_upgrade, _sqlite_upgrade)


def downgrade(checks: list[Check], not_nulls: list[NotNull], indexes: list[IndexSpec]) -> None:
    """Remove what :func:`upgrade` added (indexes, constraints, NOT NULL)."""
    _dispatch(checks, not_nulls, indexes, _pg_downgrade, _sqlite_downgrade)


_Step = Callable[[RevisionTarget, list[Check], list[NotNull], list[IndexSpec]], None]


def _dispatch(
    checks: list[Check],
    not_nulls: list[NotNull],
    indexes: list[IndexSpec],
    pg: _Step,
    sqlite: _Step,
) -> None:
    t = current_target()
    step = pg if t.dialect == "postgresql" else sqlite
    step(
        t,
        [c for c in checks if c.table in t.routed],
        [n for n in not_nulls if n.table in t.routed],
        [i for i in indexes if i.table in t.routed],
    )


def _pg_upgrade(
    t: RevisionTarget, checks: list[Check], not_nulls: list[NotNull], indexes: list[IndexSpec]
) -> None:
    from alembic import op

    if not (checks or not_nulls or indexes):
        return
    with op.get_context().autocommit_block():
        conn = _bind()
        # Validation and index builds scan the table without blocking writes; they may take
        # longer than statement_timeout on large tables, so lift it for these statements only.
        _pg_exec("SET statement_timeout = 0")
        all_checks = list(checks) + [
            Check(n.table, f"{n.column}_not_null", f"{n.column} IS NOT NULL") for n in not_nulls
        ]
        for c in all_checks:
            physical = t.tables.physical(c.table)
            name = object_name(physical, c.suffix)
            if (
                c.suffix.endswith("_not_null")
                and conn is not None
                and _pg_not_null(conn, physical, c.suffix[: -len("_not_null")])
            ):
                continue
            state = _pg_constraint(conn, name) if conn is not None else None
            if state is None:
                # NOT VALID: takes its lock only for a catalog change, no scan under it.
                _pg_exec(f"ALTER TABLE {physical} ADD CONSTRAINT {name} CHECK ({c.sql}) NOT VALID")
            if not state:
                # VALIDATE scans under SHARE UPDATE EXCLUSIVE: reads and writes go on.
                _pg_exec(f"ALTER TABLE {physical} VALIDATE CONSTRAINT {name}")
        for n in not_nulls:
            physical = t.tables.physical(n.table)
            name = object_name(physical, f"{n.column}_not_null")
            if conn is not None and _pg_not_null(conn, physical, n.column):
                continue
            # PostgreSQL 12+ skips the scan when a validated CHECK proves IS NOT NULL.
            _pg_exec(f"ALTER TABLE {physical} ALTER COLUMN {n.column} SET NOT NULL")
            _pg_exec(f"ALTER TABLE {physical} DROP CONSTRAINT IF EXISTS {name}")
        for i in indexes:
            physical = t.tables.physical(i.table)
            name = object_name(physical, f"{i.column}_idx")
            valid = _pg_index_valid(conn, name) if conn is not None else None
            if valid is False:
                # A failed CONCURRENTLY build leaves an INVALID index behind: drop, rebuild.
                _pg_exec(f"DROP INDEX CONCURRENTLY IF EXISTS {name}")
            if valid is not True:
                _pg_exec(
                    f"CREATE INDEX CONCURRENTLY IF NOT EXISTS {name} ON {physical} ({i.column})"
                )
        _pg_exec(f"SET statement_timeout = '{int(t.migrate.statement_timeout_ms)}ms'")
    if t.guarded:
        # Offline, the statements above ran outside a transaction and a client may have gone on
        # past a failure: verify the end state inside the transaction that records the revision.
        _pg_exec(_offline_postcondition(t, checks, not_nulls, indexes))


def _offline_postcondition(
    t: RevisionTarget, checks: list[Check], not_nulls: list[NotNull], indexes: list[IndexSpec]
) -> str:
    from oauthmig import offline

    conditions: list[tuple[str, str]] = []
    for c in checks:
        name = object_name(t.tables.physical(c.table), c.suffix)
        conditions.append((offline.pg_constraint_validated(name), f"validated constraint {name}"))
    for n in not_nulls:
        physical = t.tables.physical(n.table)
        conditions.append(
            (offline.pg_not_null(physical, n.column), f"{physical}.{n.column} NOT NULL")
        )
    for i in indexes:
        name = object_name(t.tables.physical(i.table), f"{i.column}_idx")
        conditions.append((offline.pg_index_valid(name), f"valid index {name}"))
    return offline.pg_finalize_postcondition(conditions)


def _pg_downgrade(
    t: RevisionTarget, checks: list[Check], not_nulls: list[NotNull], indexes: list[IndexSpec]
) -> None:
    from alembic import op

    if not (checks or not_nulls or indexes):
        return
    with op.get_context().autocommit_block():
        for i in indexes:
            physical = t.tables.physical(i.table)
            _pg_exec(
                f"DROP INDEX CONCURRENTLY IF EXISTS {object_name(physical, i.column + '_idx')}"
            )
        for n in not_nulls:
            physical = t.tables.physical(n.table)
            _pg_exec(f"ALTER TABLE {physical} ALTER COLUMN {n.column} DROP NOT NULL")
        for c in checks:
            physical = t.tables.physical(c.table)
            _pg_exec(
                f"ALTER TABLE {physical} DROP CONSTRAINT IF EXISTS "
                f"{object_name(physical, c.suffix)}"
            )


def _copy_from(t: RevisionTarget, logical: str) -> Table | None:
    """Offline (``--sql``) SQLite batch mode cannot reflect: describe the expanded table."""
    if _bind() is not None:
        return None
    from oauthmig.legacy import legacy_metadata
    from oauthmig.migrations import history

    md = legacy_metadata(t.tables, (logical,))
    legacy = md.tables[t.tables.physical(logical)]
    for rev in history():
        for spec in rev.columns:
            if spec.table == logical and spec.name not in legacy.c:
                legacy.append_column(Column(spec.name, spec.type_, nullable=True))
    return legacy


def _sqlite_upgrade(
    t: RevisionTarget, checks: list[Check], not_nulls: list[NotNull], indexes: list[IndexSpec]
) -> None:
    from alembic import op

    conn = _bind()
    for logical in ("application", "grant", "token"):
        mine = [c for c in checks if c.table == logical]
        nn = [n for n in not_nulls if n.table == logical]
        if not (mine or nn):
            continue
        physical = t.tables.physical(logical)
        if conn is not None:
            existing = {c["name"] for c in inspect(conn).get_check_constraints(physical)}
            mine = [c for c in mine if object_name(physical, c.suffix) not in existing]
        # SQLite cannot add a CHECK or NOT NULL in place: Alembic's batch mode rebuilds the
        # table inside the revision's transaction (fine for the embedded database's sizes).
        with op.batch_alter_table(
            physical, recreate="always", copy_from=_copy_from(t, logical)
        ) as batch:
            for c in mine:
                batch.create_check_constraint(object_name(physical, c.suffix), text(c.sql))
            for n in nn:
                batch.alter_column(n.column, existing_type=n.spec.type_, nullable=False)
    for i in indexes:
        physical = t.tables.physical(i.table)
        op.create_index(
            object_name(physical, f"{i.column}_idx"), physical, [i.column], if_not_exists=True
        )


def _sqlite_downgrade(
    t: RevisionTarget, checks: list[Check], not_nulls: list[NotNull], indexes: list[IndexSpec]
) -> None:
    from alembic import op

    for i in indexes:
        physical = t.tables.physical(i.table)
        op.drop_index(object_name(physical, f"{i.column}_idx"), table_name=physical, if_exists=True)
    for logical in ("application", "grant", "token"):
        mine = [c for c in checks if c.table == logical]
        nn = [n for n in not_nulls if n.table == logical]
        if not (mine or nn):
            continue
        physical = t.tables.physical(logical)
        with op.batch_alter_table(
            physical, recreate="always", copy_from=_copy_from(t, logical)
        ) as batch:
            for c in mine:
                batch.drop_constraint(object_name(physical, c.suffix), type_="check")
            for n in nn:
                batch.alter_column(n.column, existing_type=n.spec.type_, nullable=True)
