"""Verify before finalize, and the contract step that ends the compatibility phase.

**Verify** (``oauthmig verify``; also run by ``upgrade`` and ``stamp`` before a revision that
needs the backfills, i.e. finalize): on each database, no refreshable token without a family,
every ``parent_token_id`` pointing at a token of the same family, no application without its
metadata. It walks each table by primary key in chunks of ``[backfill] batch_size`` rows, one
short transaction per chunk under the migration's ``lock_timeout`` and ``statement_timeout``,
and records its cursor in ``oauthmig_verify`` (one row per table) after every chunk: an
interrupted pass resumes where it stopped. Rows written after the pass began are read too (the
last chunk goes to the table's current end). A failure records and names the first offending
ids; the next pass starts over.

**Contract** (``oauthmig contract --since TIME``): the operator says the provider now writes
the new columns itself. Refused, in one line naming the table, the number of rows and the
newest id, while the compatibility layer filled any row since TIME (the old code still
writes); otherwise the layer's triggers, function and record tables are dropped
(:mod:`oauthmig.rollout.compat`).

The phase of a database (:func:`phase`): ``expand`` (before the new columns), ``compat`` (the
compatibility layer is active, finalize not applied), ``finalized`` (finalize applied, the
layer still active), ``contracted`` (finalize applied, the layer removed).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import (
    BigInteger,
    Column,
    DateTime,
    MetaData,
    String,
    Table,
    Text,
    delete,
    insert,
    inspect,
    select,
    text,
)
from sqlalchemy.engine import Connection

from oauthmig.config import Settings
from oauthmig.db import for_writing, map_db_errors, open_database, set_timeouts
from oauthmig.errors import OauthmigError, SchemaStateError
from oauthmig.privileges import Command, check_privileges
from oauthmig.rollout import compat
from oauthmig.rollout.compat import CompatTarget

VERIFY_TABLE = "oauthmig_verify"
#: How many offending ids a failed verify names.
SHOWN_IDS = 5

_md = MetaData()
verify_table = Table(
    VERIFY_TABLE,
    _md,
    Column("table_name", String(32), primary_key=True),  # logical table
    Column("status", String(16), nullable=False),  # VerifyStatus
    Column("cursor", BigInteger, nullable=False),
    Column("rows_checked", BigInteger, nullable=False),
    Column("problem", Text, nullable=True),
    Column("started_at", DateTime(timezone=True), nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False),
    Column("finished_at", DateTime(timezone=True), nullable=True),
)


class VerifyStatus(StrEnum):
    """The state of one table's verify pass."""

    RUNNING = "running"
    PASSED = "passed"
    FAILED = "failed"


class Phase(StrEnum):
    """Where a database stands between old and new application code."""

    EXPAND = "expand"
    COMPAT = "compat"
    FINALIZED = "finalized"
    CONTRACTED = "contracted"


_CHECKED: dict[str, tuple[str, ...]] = {
    "token": ("token_family_id", "parent_token_id", "refresh_token"),
    "application": compat.APP_COLUMNS,
}


@dataclass(frozen=True, slots=True)
class TableVerify:
    """The verify result of one table on one database."""

    table: str
    status: VerifyStatus
    rows_checked: int
    problem: str | None = None


@dataclass(frozen=True, slots=True)
class DatabaseVerify:
    """The verify results on one database (``error``: it could not be verified)."""

    database: str
    tables: tuple[TableVerify, ...] = ()
    error: str | None = None

    @property
    def passed(self) -> bool:
        """Every table passed."""
        return self.error is None and all(t.status is VerifyStatus.PASSED for t in self.tables)

    def problem(self) -> str | None:
        """The first failure, in one line."""
        if self.error:
            return self.error
        for t in self.tables:
            if t.status is not VerifyStatus.PASSED:
                return f"database {self.database!r}: {t.problem or t.table + ' not verified'}"
        return None


def _has(conn: Connection, physical: str, names: Sequence[str]) -> bool:
    insp = inspect(conn)
    if not insp.has_table(physical):
        return False
    have = {c["name"] for c in insp.get_columns(physical)}
    return all(n in have for n in names)


def _offending(
    conn: Connection, logical: str, physical: str, lo: int, hi: int
) -> tuple[str, list[int]] | None:
    """The first problem in ids (lo, hi] and the first offending ids, or ``None``."""
    rng = "id > :lo AND id <= :hi"
    params = {"lo": lo, "hi": hi, "n": SHOWN_IDS}
    if logical == "token":
        checks = [
            (
                "refreshable tokens without a family (token_family_id)",
                f"SELECT id FROM {physical} WHERE {rng} AND token_family_id IS NULL "
                "AND refresh_token IS NOT NULL ORDER BY id LIMIT :n",
            ),
            (
                "tokens whose parent_token_id points outside their family",
                f"SELECT c.id FROM {physical} c JOIN {physical} p ON p.id = c.parent_token_id "
                f"WHERE c.id > :lo AND c.id <= :hi AND (c.token_family_id IS NULL OR "
                "p.token_family_id IS NULL OR c.token_family_id <> p.token_family_id) "
                "ORDER BY c.id LIMIT :n",
            ),
        ]
    else:
        unset = " OR ".join(f"{c} IS NULL" for c in compat.APP_COLUMNS)
        checks = [
            (
                "applications without client metadata",
                f"SELECT id FROM {physical} WHERE {rng} AND ({unset}) ORDER BY id LIMIT :n",
            )
        ]
    for what, sql in checks:
        ids = [int(r[0]) for r in conn.execute(text(sql), params)]
        if ids:
            return what, ids
    return None


def _save(conn: Connection, row: dict[str, Any]) -> None:
    conn.execute(delete(verify_table).where(verify_table.c.table_name == row["table_name"]))
    conn.execute(insert(verify_table).values(row))


def _verify_table(conn: Connection, settings: Settings, database: str, logical: str) -> TableVerify:
    physical = settings.tables.physical(logical)
    m = settings.migrate
    batch = settings.backfill.batch_size
    now = datetime.now(UTC)
    with conn.begin():
        saved = (
            conn.execute(select(verify_table).where(verify_table.c.table_name == logical))
            .mappings()
            .first()
        )
    if saved is not None and saved["status"] == VerifyStatus.RUNNING:
        row = dict(saved)  # resume where an interrupted pass stopped
    else:
        row = {
            "table_name": logical,
            "status": VerifyStatus.RUNNING.value,
            "cursor": 0,
            "rows_checked": 0,
            "problem": None,
            "started_at": now,
            "updated_at": now,
            "finished_at": None,
        }
    while True:
        with conn.begin():
            set_timeouts(conn, m.lock_timeout_ms, m.statement_timeout_ms, local=True)
            lo = int(row["cursor"])
            chunk = conn.execute(
                text(
                    f"SELECT max(id), count(*) FROM (SELECT id FROM {physical} WHERE id > :lo "
                    "ORDER BY id LIMIT :n) chunk"
                ),
                {"lo": lo, "n": batch},
            ).one()
            hi, count = chunk[0], int(chunk[1])
            found = None if hi is None else _offending(conn, logical, physical, lo, int(hi))
            row["updated_at"] = datetime.now(UTC)
            if found is not None:
                what, ids = found
                shown = ", ".join(str(i) for i in ids)
                row.update(
                    status=VerifyStatus.FAILED.value,
                    problem=f"{physical} has {what}: first ids {shown}",
                    finished_at=row["updated_at"],
                )
            elif hi is None:
                row.update(status=VerifyStatus.PASSED.value, finished_at=row["updated_at"])
            else:
                row.update(cursor=int(hi), rows_checked=int(row["rows_checked"]) + count)
            _save(conn, row)
        if row["status"] != VerifyStatus.RUNNING:
            return TableVerify(
                logical, VerifyStatus(row["status"]), int(row["rows_checked"]), row["problem"]
            )


def verify_connection(conn: Connection, settings: Settings, database: str) -> DatabaseVerify:
    """Run (or resume) the verify pass on one open database; see the module docstring."""
    if conn.in_transaction():
        conn.commit()
    for_writing(conn)  # it records its progress: SQLite transactions begin IMMEDIATE
    with conn.begin():
        _md.create_all(conn, checkfirst=True)
    out: list[TableVerify] = []
    for logical in ("token", "application"):
        if logical not in settings.tables_on(database):
            continue
        physical = settings.tables.physical(logical)
        with conn.begin():
            present = _has(conn, physical, _CHECKED[logical])
        if not present:
            out.append(
                TableVerify(
                    logical,
                    VerifyStatus.FAILED,
                    0,
                    f"{physical} lacks the new columns (run `oauthmig upgrade` first)",
                )
            )
            continue
        out.append(_verify_table(conn, settings, database, logical))
    return DatabaseVerify(database, tuple(out))


def verify(settings: Settings) -> tuple[DatabaseVerify, ...]:
    """Verify every selected database hosting the token or application table."""
    results: list[DatabaseVerify] = []
    for name in settings.database_names():
        if not {"token", "application"} & set(settings.tables_on(name)):
            continue
        db = settings.databases[name]
        try:
            with map_db_errors(db, "verify failed"), open_database(settings, db) as conn:
                check_privileges(conn, settings, db, Command.VERIFY)
                results.append(verify_connection(conn, settings, name))
        except OauthmigError as exc:
            message = exc.message
            if not message.startswith("database "):
                message = f"database {name!r}: {message}"
            results.append(DatabaseVerify(name, (), message))
    return tuple(results)


def read_verify(conn: Connection) -> dict[str, dict[str, Any]]:
    """The recorded verify state per logical table (empty: never run). Reads only."""
    if not inspect(conn).has_table(VERIFY_TABLE):
        return {}
    rows = conn.execute(select(verify_table)).mappings().all()
    return {str(r["table_name"]): dict(r) for r in rows}


# --------------------------------------------------------------------------- phases, contract


def compat_active(conn: Connection, target: CompatTarget) -> list[str]:
    """The logical tables on which the compatibility triggers are installed."""
    active: list[str] = []
    for logical in compat.COMPAT_TABLES:
        physical = target.physical.get(logical)
        if physical is None:
            continue
        names = compat.trigger_names(physical, target.dialect)
        if target.dialect == "postgresql":
            sql = "SELECT count(*) FROM pg_trigger WHERE tgrelid = to_regclass(:t) AND tgname = :n"
            params: dict[str, Any] = {"t": physical, "n": names[0]}
        else:
            sql = "SELECT count(*) FROM sqlite_master WHERE type = 'trigger' AND name = :n"
            params = {"n": names[0]}
        if conn.execute(text(sql), params).scalar():
            active.append(logical)
    return active


def phase(finalized: bool, has_columns: bool, compat_tables: Sequence[str]) -> Phase:
    """The phase of a database from what it holds."""
    if compat_tables:
        return Phase.FINALIZED if finalized else Phase.COMPAT
    if finalized:
        return Phase.CONTRACTED
    return Phase.COMPAT if has_columns else Phase.EXPAND


@dataclass(frozen=True, slots=True)
class DatabaseContract:
    """What ``contract`` did on one database: the tables it removed the layer from."""

    database: str
    removed: tuple[str, ...]


def _filled_since(
    conn: Connection, dialect: str, logical: str, since: datetime
) -> tuple[int, int | None]:
    side = compat.side_table(logical)
    if not inspect(conn).has_table(side):
        return 0, None
    if dialect == "postgresql":
        value: Any = since
    else:
        value = since.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]
    row = conn.execute(
        text(f"SELECT count(*), max(row_id) FROM {side} WHERE filled_at >= :since"),
        {"since": value},
    ).one()
    return int(row[0]), None if row[1] is None else int(row[1])


def contract(settings: Settings, since: datetime) -> tuple[DatabaseContract, ...]:
    """Remove the compatibility layer from every selected database, after checking on all of
    them first that it filled no row since ``since`` (else :class:`SchemaStateError`, one line:
    table, rows, newest id). Nothing is removed anywhere unless every database agrees."""
    targets: list[tuple[str, CompatTarget, list[str]]] = []
    for name in settings.database_names():
        db = settings.databases[name]
        with map_db_errors(db, "contract failed"), open_database(settings, db) as conn:
            check_privileges(conn, settings, db, Command.CONTRACT)
            target = CompatTarget(
                conn.dialect.name,
                name,
                {lg: settings.tables.physical(lg) for lg in settings.tables_on(name)},
                settings.backfill.client_metadata,
            )
            active = compat_active(conn, target)
            for logical in compat.COMPAT_TABLES:
                if logical not in target.physical:
                    continue
                rows, newest = _filled_since(conn, target.dialect, logical, since)
                if rows:
                    raise SchemaStateError(
                        f"database {name!r}: {target.physical[logical]} has {rows} row"
                        f"{'s' if rows != 1 else ''} written since {since.isoformat()} without "
                        f"the new columns (filled by the compatibility layer; newest id "
                        f"{newest}): the old code still writes; deploy the code that writes "
                        "them, then run contract again; nothing was removed"
                    )
            if conn.in_transaction():
                conn.rollback()
            targets.append((name, target, active))
    done: list[DatabaseContract] = []
    for name, target, active in targets:
        db = settings.databases[name]
        # DDL: on direct_url when one is configured (each statement is one transaction with
        # SET LOCAL limits, so it is also correct through a transaction pooler).
        with (
            map_db_errors(db, "contract failed"),
            open_database(settings, db, direct=True) as conn,
        ):
            m = settings.migrate
            for_writing(conn)
            # One short transaction per table: never two tables' locks held at once.
            for logical in compat.COMPAT_TABLES:
                if logical not in target.physical:
                    continue
                with conn.begin():
                    set_timeouts(conn, m.lock_timeout_ms, m.statement_timeout_ms, local=True)
                    for stmt in compat.remove_sql(target, logical):
                        conn.execute(text(stmt))
        done.append(DatabaseContract(name, tuple(active)))
    return tuple(done)
