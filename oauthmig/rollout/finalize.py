"""Finalize operations: indexes built CONCURRENTLY, CHECK constraints NOT VALID then VALIDATE,
NOT NULL through a validated CHECK (PostgreSQL); the same end state by table rebuild on SQLite.

Every PostgreSQL step runs in Alembic's ``autocommit_block`` (outside a transaction, as
``CREATE INDEX CONCURRENTLY`` requires), so an attempt killed or timed out after any statement
leaves that statement's effect behind. Each step therefore reads the catalog first (constraints by
table and expression, indexes by column and validity, nullability from ``pg_attribute``) and does
only what is missing: a rerun converges on the same end state from any intermediate one, and the
downgrade removes whatever any attempt may have created (helper CHECKs of any name, INVALID
index builds). Offline SQL guards each step with a ``DO`` block to the same effect.

Catalog-only statements (ADD CONSTRAINT NOT VALID, SET/DROP NOT NULL, DROP CONSTRAINT) take
ACCESS EXCLUSIVE for an instant and run under the short ``lock_timeout``; index builds, index
drops and VALIDATE take SHARE UPDATE EXCLUSIVE (reads and writes go on) and wait for older
snapshots, so they run under ``index_timeout`` instead, and report the transactions they waited
for. On SQLite the same end state comes from a table rebuild inside the revision's transaction,
so an interrupted attempt leaves nothing behind. Called from revision code only.
"""

from __future__ import annotations

import contextlib
import time
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Any

from sqlalchemy import Column, Table, inspect, text
from sqlalchemy.engine import Connection
from sqlalchemy.exc import DBAPIError, SQLAlchemyError
from sqlalchemy.types import TypeEngine

from oauthmig.db import reset_statements, timeout_statements
from oauthmig.errors import IndexTimeoutError, RevisionFailedError
from oauthmig.failures import FailureKind, classify
from oauthmig.legacy import legacy_metadata
from oauthmig.rollout import compat, offline
from oauthmig.rollout.revisions import RevisionTarget, current_target


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
    """A column made NOT NULL (PostgreSQL: via a validated CHECK, no full-lock scan);
    ``type_`` is its type (SQLite's table rebuild restates it)."""

    table: str
    column: str
    type_: TypeEngine[Any]


@dataclass(frozen=True, slots=True)
class AddedColumn:
    """A column an earlier revision added to a table that finalize rebuilds on SQLite.

    Offline (``--sql``) the rebuild cannot reflect the table, so it is described as the legacy
    table plus these columns: the table as it is when the finalize revision runs.
    """

    table: str
    column: str
    type_: TypeEngine[Any]


@dataclass(frozen=True, slots=True)
class Finalize:
    """Everything a finalize revision does, spelled out in its revision file so that it never
    changes meaning when the code or the history around it evolves."""

    revision: str
    down_revision: str | None
    checks: tuple[Check, ...]
    not_nulls: tuple[NotNull, ...]
    indexes: tuple[IndexSpec, ...]
    added: tuple[AddedColumn, ...]

    def restricted_to(self, routed: Sequence[str]) -> Finalize:
        """Only what concerns the tables in ``routed``."""
        return replace(
            self,
            checks=tuple(c for c in self.checks if c.table in routed),
            not_nulls=tuple(n for n in self.not_nulls if n.table in routed),
            indexes=tuple(i for i in self.indexes if i.table in routed),
            added=tuple(a for a in self.added if a.table in routed),
        )


def object_name(physical: str, suffix: str) -> str:
    """A constraint or index name within PostgreSQL's 63-byte limit, stable for the table."""
    name = f"{physical}_{suffix}"
    if len(name) <= 63:
        return name
    digest = f"{zlib.crc32(physical.encode()):08x}"
    return f"{physical[: 63 - len(suffix) - 10]}_{digest}_{suffix}"


def _bind() -> Connection | None:
    from alembic import op

    ctx = op.get_context()
    return None if ctx.as_sql else op.get_bind()


def _adopted_columns(t: RevisionTarget) -> set[str]:
    """``table.column`` names adopted from the provider's schema by any applied revision."""
    return {name for names in t.previously_adopted.values() for name in names}


def _human_ms(ms: int) -> str:
    for unit, size in (("h", 3_600_000), ("min", 60_000), ("s", 1000)):
        if ms >= size and ms % size == 0:
            return f"{ms // size}{unit}"
    return f"{ms}ms"


@dataclass(frozen=True, slots=True)
class _Index:
    name: str
    valid: bool
    on_column: bool  # a plain btree index on exactly that one column
    definition: str


def _normalized_check(definition: str) -> str:
    body = definition.strip()
    body = body.removeprefix("CHECK").removesuffix("NOT VALID")
    return " ".join(body.replace("(", " ").replace(")", " ").replace('"', " ").split())


class _PgFinalize:
    """Finalize on one PostgreSQL database. Online every step first reads the catalog (by table,
    column and expression, not only by name), so it converges from whatever an interrupted
    attempt left; offline (``conn`` is ``None``) each step is emitted as guarded SQL.
    """

    def __init__(self, t: RevisionTarget, run: _Run, conn: Connection | None) -> None:
        self.t = t
        self.revision = run.revision
        self.rerun = run.rerun
        self.conn = conn

    # ---------------------------------------------------------------- statements

    def exec(self, sql: str) -> None:
        from alembic import op

        op.execute(text(sql))

    def _timeouts(self, lock_ms: int, statement_ms: int) -> None:
        # Session-level: these statements run outside a transaction (autocommit), so this
        # needs a connection that keeps its session (direct_url); :meth:`limits` resets them.
        for statement in timeout_statements(lock_ms, statement_ms, local=False):
            self.exec(statement)

    @contextlib.contextmanager
    def limits(self) -> Iterator[None]:
        """The DDL limits for the statements of the block (run outside a transaction), reset
        at its end: the session goes back as it came."""
        m = self.t.migrate
        self._timeouts(m.lock_timeout_ms, m.statement_timeout_ms)
        try:
            yield
        finally:
            with contextlib.suppress(SQLAlchemyError):
                for statement in reset_statements():
                    self.exec(statement)

    def exec_long(self, sql: str, what: str, physical: str) -> None:
        """Run an index build/drop or VALIDATE under ``index_timeout`` instead of the DDL limits.

        They take SHARE UPDATE EXCLUSIVE (reads and writes go on) and wait for every older
        snapshot, so a short lock_timeout would fail them on any long unrelated transaction.
        """
        m = self.t.migrate
        self._timeouts(m.index_timeout_ms, m.index_timeout_ms)
        if self.conn is None:
            self.exec(sql)
            self._timeouts(m.lock_timeout_ms, m.statement_timeout_ms)
            return
        started = time.monotonic()
        try:
            self.exec(sql)
        except DBAPIError as exc:
            waited = time.monotonic() - started
            # A lock wait (also the wait for older snapshots) hit lock_timeout, or the statement
            # statement_timeout: both are index_timeout here; a user's cancel ends sooner.
            if (
                classify(exc) in (FailureKind.LOCK_TIMEOUT, FailureKind.STATEMENT_TIMEOUT)
                and waited >= m.index_timeout_ms / 1000 * 0.9
            ):
                raise IndexTimeoutError(self._timeout_message(what, physical, waited)) from None
            raise
        finally:
            with contextlib.suppress(SQLAlchemyError):
                self._timeouts(m.lock_timeout_ms, m.statement_timeout_ms)

    def _timeout_message(self, what: str, physical: str, waited: float) -> str:
        waiting = self.waited_for(physical, waited)
        return (
            f"database {self.t.database!r}: revision {self.revision}: {what} did not finish "
            f"within index_timeout {_human_ms(self.t.migrate.index_timeout_ms)}; it waits for "
            f"{waiting}. End or wait for that transaction (pg_terminate_backend(pid) if it is "
            f"stuck), or raise [migrate] index_timeout, then rerun `{self.rerun}`; what finalize "
            "already built is kept"
        )

    def waited_for(self, physical: str, waited: float) -> str:
        """Transactions older than the statement that hold a snapshot, an xid or a lock on the
        table: what an index build or VALIDATE waits for. Never their query text."""
        assert self.conn is not None
        rows: list[Any] = []
        with contextlib.suppress(SQLAlchemyError):
            rows = list(
                self.conn.execute(
                    text(
                        "SELECT a.pid, a.state, a.application_name, "
                        "  EXTRACT(EPOCH FROM now() - a.xact_start)::int AS age "
                        "FROM pg_stat_activity a "
                        "WHERE a.datname = current_database() AND a.pid <> pg_backend_pid() "
                        "  AND a.backend_type = 'client backend' AND a.xact_start IS NOT NULL "
                        "  AND a.xact_start < now() - make_interval(secs => :w) "
                        "  AND (a.backend_xmin IS NOT NULL OR a.backend_xid IS NOT NULL "
                        "       OR a.pid IN (SELECT l.pid FROM pg_locks l "
                        "                    WHERE l.relation = to_regclass(:t) AND l.granted)) "
                        "ORDER BY a.xact_start LIMIT 3"
                    ),
                    {"w": max(0.0, waited - 0.5), "t": physical},
                ).all()
            )
        if not rows:
            return "older transactions (they have ended since)"
        return "; ".join(
            f"transaction of pid {r.pid} ({r.state}, application_name "
            f"{(r.application_name or '')!r}, open {r.age}s)"
            for r in rows
        )

    # ---------------------------------------------------------------- catalog (online)

    def _scalar(self, sql: str, **params: object) -> Any:
        assert self.conn is not None
        return self.conn.execute(text(sql), params).scalar()

    def constraint(self, physical: str, name: str) -> bool | None:
        """``None`` if ``physical`` has no constraint ``name``, else whether it is validated."""
        value = self._scalar(
            "SELECT convalidated FROM pg_constraint WHERE conrelid = to_regclass(:t) "
            "AND conname = :n",
            t=physical,
            n=name,
        )
        return None if value is None else bool(value)

    def not_null(self, physical: str, column: str) -> bool:
        """Whether ``physical.column`` is NOT NULL."""
        return bool(
            self._scalar(
                "SELECT attnotnull FROM pg_attribute WHERE attrelid = to_regclass(:t) "
                "AND attname = :c AND NOT attisdropped",
                t=physical,
                c=column,
            )
        )

    def not_null_checks(self, physical: str, column: str) -> list[tuple[str, bool]]:
        """(name, validated) of every CHECK on the table that says exactly ``column IS NOT NULL``,
        whatever its name: a helper of any attempt."""
        assert self.conn is not None
        rows = self.conn.execute(
            text(
                "SELECT conname, convalidated, pg_get_constraintdef(oid) AS definition "
                "FROM pg_constraint WHERE conrelid = to_regclass(:t) AND contype = 'c' "
                "ORDER BY conname"
            ),
            {"t": physical},
        ).all()
        want = f"{column} IS NOT NULL"
        return [
            (r.conname, bool(r.convalidated))
            for r in rows
            if _normalized_check(r.definition) == want
        ]

    def indexes(self, physical: str, column: str) -> list[_Index]:
        """Every index on the table, marked when it is a plain btree on exactly ``column``."""
        assert self.conn is not None
        rows = self.conn.execute(
            text(
                "SELECT ic.relname AS name, i.indisvalid AS valid, pg_get_indexdef(i.indexrelid) "
                "  AS definition, (am.amname = 'btree' AND i.indnatts = 1 AND i.indexprs IS NULL "
                "  AND i.indpred IS NULL AND i.indkey[0] = (SELECT attnum FROM pg_attribute "
                "  WHERE attrelid = i.indrelid AND attname = :c AND NOT attisdropped)) AS on_col "
                "FROM pg_index i JOIN pg_class ic ON ic.oid = i.indexrelid "
                "JOIN pg_am am ON am.oid = ic.relam WHERE i.indrelid = to_regclass(:t) "
                "ORDER BY ic.relname"
            ),
            {"t": physical, "c": column},
        ).all()
        return [_Index(r.name, bool(r.valid), bool(r.on_col), r.definition) for r in rows]

    # ---------------------------------------------------------------- steps

    def ensure_check(self, physical: str, name: str, sql: str) -> None:
        """A validated CHECK ``name``: added NOT VALID (catalog change only), then validated."""
        add = f"ALTER TABLE {physical} ADD CONSTRAINT {name} CHECK ({sql}) NOT VALID"
        validate = f"ALTER TABLE {physical} VALIDATE CONSTRAINT {name}"
        if self.conn is None:
            self.exec(
                "DO $$ BEGIN IF NOT EXISTS (SELECT 1 FROM pg_constraint WHERE conrelid = "
                f"to_regclass('{physical}') AND conname = '{name}') THEN {add}; END IF; END $$"
            )
            self.exec_long(validate, f"VALIDATE CONSTRAINT {name}", physical)
            return
        state = self.constraint(physical, name)
        if state is None:
            self.exec(add)
        if not state:
            self.exec_long(validate, f"VALIDATE CONSTRAINT {name}", physical)

    def ensure_not_null(self, physical: str, column: str, helper: str, own: bool) -> None:
        """``column`` NOT NULL, proven first by a validated CHECK so that SET NOT NULL does not
        scan under its ACCESS EXCLUSIVE lock (PostgreSQL 12+); the helper CHECK is dropped even
        when an earlier attempt already set NOT NULL. Helpers of other names count as ours
        unless the column was adopted from the provider."""
        add = (
            f"ALTER TABLE {physical} ADD CONSTRAINT {helper} CHECK ({column} IS NOT NULL) NOT VALID"
        )
        set_nn = f"ALTER TABLE {physical} ALTER COLUMN {column} SET NOT NULL"
        drop = f"ALTER TABLE {physical} DROP CONSTRAINT IF EXISTS {helper}"
        if self.conn is None:
            nullable = (
                "EXISTS (SELECT 1 FROM pg_attribute WHERE attrelid = "
                f"to_regclass('{physical}') AND attname = '{column}' AND NOT attnotnull)"
            )
            mine = (
                f"SELECT 1 FROM pg_constraint WHERE conrelid = to_regclass('{physical}') "
                f"AND conname = '{helper}'"
            )
            self.exec(
                f"DO $$ BEGIN IF {nullable} AND NOT EXISTS ({mine}) THEN {add}; END IF; END $$"
            )
            self.exec_long(
                f"DO $$ BEGIN IF {nullable} AND EXISTS ({mine} AND NOT convalidated) THEN "
                f"ALTER TABLE {physical} VALIDATE CONSTRAINT {helper}; END IF; END $$",
                f"VALIDATE CONSTRAINT {helper}",
                physical,
            )
            self.exec(set_nn)
            self.exec(drop)
            return
        if not self.not_null(physical, column):
            helpers = self.not_null_checks(physical, column)
            if not any(valid for _, valid in helpers):
                if helper not in {name for name, _ in helpers}:
                    self.exec(add)
                self.exec_long(
                    f"ALTER TABLE {physical} VALIDATE CONSTRAINT {helper}",
                    f"VALIDATE CONSTRAINT {helper}",
                    physical,
                )
            self.exec(set_nn)
        self.drop_not_null_checks(physical, column, helper, own)

    def drop_not_null_checks(self, physical: str, column: str, helper: str, own: bool) -> None:
        """Drop the helper CHECK(s) of ``column`` that any attempt may have left."""
        if self.conn is None:
            self.exec(f"ALTER TABLE {physical} DROP CONSTRAINT IF EXISTS {helper}")
            return
        for name, _ in self.not_null_checks(physical, column):
            if own or name == helper:
                self.exec(f"ALTER TABLE {physical} DROP CONSTRAINT IF EXISTS {name}")

    def ensure_index(self, physical: str, column: str, name: str) -> None:
        """A valid index on ``column``, built CONCURRENTLY. An INVALID leftover (a failed or
        interrupted build, online or from offline SQL) is dropped and rebuilt; a valid one of any
        name is kept, so a retry never throws away a finished build."""
        create = f"CREATE INDEX CONCURRENTLY IF NOT EXISTS {name} ON {physical} ({column})"
        what = f"CREATE INDEX CONCURRENTLY {name}"
        if self.conn is None:
            invalid = (
                "SELECT 1 FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid WHERE "
                f"i.indrelid = to_regclass('{physical}') AND c.relname = '{name}'"
            )
            self.exec(
                f"DO $$ BEGIN IF EXISTS ({invalid} AND NOT i.indisvalid) THEN "
                f"DROP INDEX {name}; END IF; END $$"
            )
            self.exec_long(create, what, physical)
            self.exec(
                f"DO $$ BEGIN IF NOT EXISTS ({invalid} AND i.indisvalid) THEN RAISE EXCEPTION "
                f"'index {name} is missing or INVALID (its build failed); run oauthmig upgrade, "
                f"which rebuilds it'; END IF; END $$"
            )
            return
        found = self.indexes(physical, column)
        mine = next((i for i in found if i.name == name), None)
        if any(i.valid and i.on_column for i in found):
            if mine is not None and not mine.valid:
                self.exec_long(f"DROP INDEX CONCURRENTLY IF EXISTS {name}", what, physical)
            return
        if mine is not None:
            if mine.valid:
                raise RevisionFailedError(
                    f"database {self.t.database!r}: revision {self.revision}: index {name} "
                    f"already exists as {mine.definition}, not on ({column}); drop or rename it, "
                    f"then rerun `{self.rerun}`"
                )
            self.exec_long(
                f"DROP INDEX CONCURRENTLY IF EXISTS {name}", f"DROP INDEX {name}", physical
            )
        self.exec_long(create, what, physical)

    def drop_index(self, physical: str, column: str, name: str) -> None:
        """Drop our index and any INVALID index on ``column`` (debris of failed builds)."""
        if self.conn is None:
            self.exec_long(
                f"DROP INDEX CONCURRENTLY IF EXISTS {name}", f"DROP INDEX {name}", physical
            )
            return
        for i in self.indexes(physical, column):
            if i.name == name or (i.on_column and not i.valid):
                self.exec_long(
                    f"DROP INDEX CONCURRENTLY IF EXISTS {i.name}", f"DROP INDEX {i.name}", physical
                )


def upgrade(spec: Finalize) -> None:
    """Apply the finalize operations for the tables routed to this database."""
    _dispatch(spec, "upgrade", _pg_upgrade, _sqlite_upgrade)


def downgrade(spec: Finalize) -> None:
    """Remove everything :func:`upgrade` (any attempt of it) added."""
    _dispatch(spec, "downgrade", _pg_downgrade, _sqlite_downgrade)


@dataclass(frozen=True, slots=True)
class _Run:
    """The revision being run and the command that resumes it."""

    revision: str
    rerun: str


_Step = Callable[[RevisionTarget, _Run, Finalize], None]


def verify(conn: Connection, t: RevisionTarget, spec: Finalize) -> list[str]:
    """What finalize would still have to do on the tables routed to ``t``'s database, read
    from the catalog: one line per missing constraint, NOT NULL or index (empty: done).

    ``oauthmig stamp`` records a finalize revision only when this is empty. An index of any
    name counts when it is a valid plain index on exactly that column, as :func:`upgrade`
    keeps one.
    """
    problems: list[str] = []
    routed = set(t.routed)
    pg = (
        _PgFinalize(t, _Run(spec.revision, f"oauthmig upgrade -d {t.database}"), conn)
        if conn.dialect.name == "postgresql"
        else None
    )
    insp = inspect(conn)
    for c in spec.checks:
        if c.table not in routed:
            continue
        physical = t.tables.physical(c.table)
        name = object_name(physical, c.suffix)
        if pg is not None:
            state = pg.constraint(physical, name)
        else:
            names = {x["name"] for x in insp.get_check_constraints(physical)}
            state = True if name in names else None
        if state is None:
            problems.append(f"CHECK constraint {name} on {physical} is missing")
        elif not state:
            problems.append(f"CHECK constraint {name} on {physical} is NOT VALID (not validated)")
    for n in spec.not_nulls:
        if n.table not in routed:
            continue
        physical = t.tables.physical(n.table)
        if pg is not None:
            done = pg.not_null(physical, n.column)
        else:
            done = any(
                x["name"] == n.column and not x["nullable"] for x in insp.get_columns(physical)
            )
        if not done:
            problems.append(f"{physical}.{n.column} is not NOT NULL")
    for i in spec.indexes:
        if i.table not in routed:
            continue
        physical = t.tables.physical(i.table)
        if pg is not None:
            found = any(x.valid and x.on_column for x in pg.indexes(physical, i.column))
        else:
            found = any(x["column_names"] == [i.column] for x in insp.get_indexes(physical))
        if not found:
            name = object_name(physical, f"{i.column}_idx")
            problems.append(f"index {name} on {physical} ({i.column}) is missing or INVALID")
    if conn.in_transaction():
        conn.rollback()
    return problems


def _run_for(t: RevisionTarget, spec: Finalize, direction: str) -> _Run:
    if direction == "upgrade":
        return _Run(spec.revision, f"oauthmig upgrade -d {t.database}")
    down = spec.down_revision or "base"
    return _Run(spec.revision, f"oauthmig downgrade --to {down} -d {t.database}")


def _dispatch(spec: Finalize, direction: str, pg: _Step, sqlite: _Step) -> None:
    t = current_target()
    step = pg if t.dialect == "postgresql" else sqlite
    step(t, _run_for(t, spec, direction), spec.restricted_to(t.routed))


def _pg_upgrade(t: RevisionTarget, run: _Run, spec: Finalize) -> None:
    from alembic import op

    checks, not_nulls, indexes = spec.checks, spec.not_nulls, spec.indexes
    if not (checks or not_nulls or indexes):
        return
    adopted = _adopted_columns(t)
    with op.get_context().autocommit_block():
        pg = _PgFinalize(t, run, _bind())
        with pg.limits():
            for c in checks:
                physical = t.tables.physical(c.table)
                pg.ensure_check(physical, object_name(physical, c.suffix), c.sql)
            for n in not_nulls:
                physical = t.tables.physical(n.table)
                pg.ensure_not_null(
                    physical,
                    n.column,
                    object_name(physical, f"{n.column}_not_null"),
                    own=f"{n.table}.{n.column}" not in adopted,
                )
            for i in indexes:
                physical = t.tables.physical(i.table)
                pg.ensure_index(physical, i.column, object_name(physical, f"{i.column}_idx"))
    if t.guarded:
        # Offline, the statements above ran outside a transaction and a client may have gone on
        # past a failure: verify the end state inside the transaction that records the revision.
        pg.exec(_offline_postcondition(t, checks, not_nulls, indexes))


def _offline_postcondition(
    t: RevisionTarget,
    checks: Sequence[Check],
    not_nulls: Sequence[NotNull],
    indexes: Sequence[IndexSpec],
) -> str:
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


def _pg_downgrade(t: RevisionTarget, run: _Run, spec: Finalize) -> None:
    from alembic import op

    checks, not_nulls, indexes = spec.checks, spec.not_nulls, spec.indexes
    if not (checks or not_nulls or indexes):
        return
    adopted = _adopted_columns(t)
    with op.get_context().autocommit_block():
        pg = _PgFinalize(t, run, _bind())
        with pg.limits():
            for i in indexes:
                physical = t.tables.physical(i.table)
                pg.drop_index(physical, i.column, object_name(physical, f"{i.column}_idx"))
            for n in not_nulls:
                physical = t.tables.physical(n.table)
                pg.drop_not_null_checks(
                    physical,
                    n.column,
                    object_name(physical, f"{n.column}_not_null"),
                    own=f"{n.table}.{n.column}" not in adopted,
                )
                if pg.conn is None or pg.not_null(physical, n.column):
                    pg.exec(f"ALTER TABLE {physical} ALTER COLUMN {n.column} DROP NOT NULL")
            for c in checks:
                physical = t.tables.physical(c.table)
                name = object_name(physical, c.suffix)
                if pg.conn is None or pg.constraint(physical, name) is not None:
                    pg.exec(f"ALTER TABLE {physical} DROP CONSTRAINT IF EXISTS {name}")


def _copy_from(t: RevisionTarget, spec: Finalize, logical: str) -> Table | None:
    """Offline (``--sql``) SQLite batch mode cannot reflect: describe the expanded table (the
    legacy one plus what earlier revisions added, as the finalize revision spells it out)."""
    if _bind() is not None:
        return None
    md = legacy_metadata(t.tables, (logical,))
    legacy = md.tables[t.tables.physical(logical)]
    for added in spec.added:
        if added.table == logical and added.column not in legacy.c:
            legacy.append_column(Column(added.column, added.type_, nullable=True))
    return legacy


def _sqlite_upgrade(t: RevisionTarget, run: _Run, spec: Finalize) -> None:
    from alembic import op

    checks, not_nulls, indexes = spec.checks, spec.not_nulls, spec.indexes
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
        layer = _sqlite_compat_active(conn, t, logical)
        # The provider's old code never names the metadata columns: on SQLite (no BEFORE
        # trigger can set them) the NOT NULL ones get defaults, which the compatibility trigger
        # then corrects (see oauthmig.rollout.compat).
        defaults = compat.sqlite_defaults(t.client_metadata)
        # SQLite cannot add a CHECK or NOT NULL in place: Alembic's batch mode rebuilds the
        # table inside the revision's transaction (fine for the embedded database's sizes).
        with op.batch_alter_table(
            physical, recreate="always", copy_from=_copy_from(t, spec, logical)
        ) as batch:
            for c in mine:
                batch.create_check_constraint(object_name(physical, c.suffix), text(c.sql))
            for n in nn:
                batch.alter_column(
                    n.column,
                    existing_type=n.type_,
                    nullable=False,
                    server_default=text(defaults[n.column]) if n.column in defaults else None,
                )
        _sqlite_compat_restore(t, logical, layer)
    for i in indexes:
        physical = t.tables.physical(i.table)
        if conn is not None and any(
            x["column_names"] == [i.column] for x in inspect(conn).get_indexes(physical)
        ):
            continue  # an index on that column exists already (any name): keep it
        op.create_index(
            object_name(physical, f"{i.column}_idx"), physical, [i.column], if_not_exists=True
        )


def _sqlite_downgrade(t: RevisionTarget, run: _Run, spec: Finalize) -> None:
    from alembic import op

    checks, not_nulls, indexes = spec.checks, spec.not_nulls, spec.indexes
    conn = _bind()

    for i in indexes:
        physical = t.tables.physical(i.table)
        op.drop_index(object_name(physical, f"{i.column}_idx"), table_name=physical, if_exists=True)
    for logical in ("application", "grant", "token"):
        mine = [c for c in checks if c.table == logical]
        nn = [n for n in not_nulls if n.table == logical]
        if not (mine or nn):
            continue
        physical = t.tables.physical(logical)
        if conn is not None:
            existing = {c["name"] for c in inspect(conn).get_check_constraints(physical)}
            mine = [c for c in mine if object_name(physical, c.suffix) in existing]
        layer = _sqlite_compat_active(conn, t, logical)
        described = _copy_from(t, spec, logical)
        if described is not None:
            # Offline (--dry-run, --sql) the table is rebuilt from a description that has none
            # of this revision's CHECKs: the rebuild drops them; there is nothing to name.
            mine = []
        with op.batch_alter_table(physical, recreate="always", copy_from=described) as batch:
            for c in mine:
                batch.drop_constraint(object_name(physical, c.suffix), type_="check")
            for n in nn:
                batch.alter_column(
                    n.column, existing_type=n.type_, nullable=True, server_default=None
                )
        _sqlite_compat_restore(t, logical, layer)


def _sqlite_compat_active(conn: Connection | None, t: RevisionTarget, logical: str) -> bool:
    """Whether the compatibility triggers are on ``logical`` (offline: assumed when the table
    is one the layer covers, since the script cannot look)."""
    if logical not in compat.COMPAT_TABLES:
        return False
    if conn is None:
        return True
    names = compat.trigger_names(t.tables.physical(logical), "sqlite")
    found = conn.execute(
        text("SELECT count(*) FROM sqlite_master WHERE type = 'trigger' AND name IN (:a, :b)"),
        {"a": names[0], "b": names[-1]},
    ).scalar()
    return bool(found)


def _sqlite_compat_restore(t: RevisionTarget, logical: str, active: bool) -> None:
    """A SQLite table rebuild drops the table's triggers: put the compatibility layer back."""
    from alembic import op

    if active:
        for stmt in compat.install_sql(t.compat_target(), logical):
            op.execute(text(stmt))
