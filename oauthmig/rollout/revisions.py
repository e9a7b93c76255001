"""The revision catalogue and the API revision files use.

Each revision module in ``revisions/versions`` declares ``tables`` (the logical tables it
touches), ``columns`` (the :class:`ColumnSpec` it adds, if any) and ``requires_backfills``.
On each database the revision runs only the operations for tables routed there and records its
outcome (``applied`` or ``skipped``: not routed) in that database's own
``oauthmig_revision_log``; Alembic's own version table (``oauthmig_version``) tracks the head.
This module reads the catalogue (:func:`history`), gives revision files :func:`expand` and
:func:`contract`, is the Alembic environment (:func:`run_environment`) and reads the version
table and revision log. :mod:`oauthmig.rollout.runner` plans and runs revisions.

Every log row also holds the :func:`checksum` of the revision file that was recorded (sha256 of
its source, line endings normalized), so that :func:`drift` can tell when a file changed after
it was applied somewhere. Log tables written before checksums existed get the column on first
use (:func:`ensure_log_table`); their old rows have none and are never reported as changed.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import ModuleType
from typing import Any, cast

from alembic.config import Config
from alembic.runtime.environment import EnvironmentContext
from alembic.runtime.migration import MigrationContext, MigrationInfo
from alembic.script import Script, ScriptDirectory
from sqlalchemy import (
    Column,
    DateTime,
    MetaData,
    String,
    Table,
    Text,
    delete,
    func,
    insert,
    inspect,
    literal_column,
    select,
    text,
)
from sqlalchemy.engine import Connection
from sqlalchemy.types import TypeEngine

from oauthmig.config import LOGICAL_TABLES, MigrateSettings, TableNames
from oauthmig.errors import (
    IncompatibleColumnError,
    RevisionFailedError,
    SchemaStateError,
    UsageError,
)
from oauthmig.resources import packaged_path, revisions_dir
from oauthmig.rollout.offline import (
    SqliteGuards,
    pg_add_or_adopt,
    pg_adopted_expression,
    pg_drop_if_added,
    sqlite_column_absent,
)

#: Where the revisions are (packaged copy when installed); see :mod:`oauthmig.resources`.
REVISIONS_DIR = packaged_path("revisions", "revisions")
VERSION_TABLE = "oauthmig_version"
LOG_TABLE = "oauthmig_revision_log"
TARGET_KEY = "oauthmig_target"
CONNECTION_KEY = "connection"

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
_LATER_LOG_COLUMNS = ("checksum",)
#: ``detail`` of a log row written by ``oauthmig stamp`` (the revision's SQL ran elsewhere).
STAMPED = "stamped: recorded by oauthmig stamp, its SQL was applied by hand"


# --------------------------------------------------------------------------- column specs


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
    from sqlalchemy.dialects import postgresql, sqlite

    module = postgresql if dialect_name == "postgresql" else sqlite
    dialect = module.dialect()
    try:
        return found.compile(dialect=dialect).lower()
    except Exception:
        return str(found).lower()


# --------------------------------------------------------------------------- revisions


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


def checksum(path: str | Path) -> str:
    """sha256 of a revision file's source bytes, CRLF and CR line endings read as LF.

    The same file checked out on Windows or Linux, or shipped in a wheel, has one checksum.
    """
    data = Path(path).read_bytes().replace(b"\r\n", b"\n").replace(b"\r", b"\n")
    return hashlib.sha256(data).hexdigest()


def script_directory() -> ScriptDirectory:
    """Alembic's view of ``revisions/``."""
    cfg = Config()
    cfg.set_main_option("script_location", str(revisions_dir()))
    return ScriptDirectory.from_config(cfg)


def _info(script: Script) -> RevisionInfo:
    module: ModuleType = script.module
    down = script.down_revision
    if isinstance(down, tuple | list):
        raise RevisionFailedError(f"revision {script.revision}: branches are not supported")
    tables = tuple(getattr(module, "tables", ()))
    for t in tables:
        if t not in LOGICAL_TABLES:
            raise RevisionFailedError(f"revision {script.revision}: unknown logical table {t!r}")
    return RevisionInfo(
        revision=script.revision,
        down_revision=down,
        message=(script.doc or "").strip().splitlines()[0] if script.doc else "",
        tables=tables,
        columns=tuple(getattr(module, "columns", ())),
        requires_backfills=tuple(getattr(module, "requires_backfills", ())),
        checksum=checksum(script.path) if script.path and Path(script.path).is_file() else None,
        verify_applied=getattr(module, "verify_applied", None),
    )


def history() -> list[RevisionInfo]:
    """All revisions, oldest first."""
    scripts = list(script_directory().walk_revisions("base", "heads"))
    heads = script_directory().get_heads()
    if len(heads) > 1:
        raise RevisionFailedError(
            f"revisions/ has several heads {heads}; the history must be linear"
        )
    return [_info(s) for s in reversed(scripts)]


def resolve_revision(
    rev: str, revisions: Sequence[RevisionInfo], option: str = "--to"
) -> str | None:
    """``head``/``base``/a revision id or unique prefix -> revision id (``None`` for base)."""
    if rev == "base":
        return None
    if rev == "head" or rev == "heads":
        return revisions[-1].revision if revisions else None
    matches = [r.revision for r in revisions if r.revision == rev]
    if not matches:
        matches = [r.revision for r in revisions if r.revision.startswith(rev)]
    if len(matches) != 1:
        known = ", ".join(r.revision for r in revisions)
        raise UsageError(
            f"{option} {rev}: unknown revision (known: base, head, {known}); "
            "no database was touched"
        )
    return matches[0]


def revision_position(rev: str | None, revisions: Sequence[RevisionInfo]) -> int:
    """Position after ``rev`` in the history (0 for base)."""
    if rev is None:
        return 0
    for i, r in enumerate(revisions):
        if r.revision == rev:
            return i + 1
    raise SchemaStateError(f"unknown revision {rev!r}")


# --------------------------------------------------------------------------- run context


@dataclass(slots=True)
class RevisionTarget:
    """What a revision needs to know about the database it runs on (via Alembic's config)."""

    database: str
    dialect: str
    routed: tuple[str, ...]
    tables: TableNames
    migrate: MigrateSettings
    inspect_conn: Connection | None
    previously_adopted: dict[str, tuple[str, ...]] = field(default_factory=dict)
    adopted: dict[str, list[str]] = field(default_factory=dict)
    # --sql only: guard the script at run time (see oauthmig.rollout.offline).
    guarded: bool = False
    header: bool = True
    header_guards: list[str] = field(default_factory=list)
    step_guards: list[str] = field(default_factory=list)
    sqlite_guards: SqliteGuards = field(default_factory=SqliteGuards)

    def existing_column(self, physical: str, column: str) -> TypeEngine[Any] | bool | None:
        """The reflected type of ``physical.column``; ``None`` if absent; ``False`` if unknown."""
        if self.inspect_conn is None:
            return False
        for col in inspect(self.inspect_conn).get_columns(physical):
            if col["name"] == column:
                found: TypeEngine[Any] = col["type"]
                return found
        return None


def current_target() -> RevisionTarget:
    """The :class:`RevisionTarget` of the revision being run (call from revision code)."""
    from alembic import op

    target: RevisionTarget = op.get_context().config.attributes[TARGET_KEY]  # type: ignore[union-attr]
    return target


def expand(revision: str, columns: Sequence[ColumnSpec]) -> None:
    """Add ``columns`` on the tables routed to this database, adopting compatible ones."""
    from alembic import op

    t = current_target()
    for spec in columns:
        if spec.table not in t.routed:
            continue
        physical = t.tables.physical(spec.table)
        found = t.existing_column(physical, spec.name)
        if found is not None and found is not False:
            assert not isinstance(found, bool)
            if not spec.compatible(found, t.dialect):
                raise incompatible_column(t.database, physical, spec, found, t.dialect)
            t.adopted.setdefault(revision, []).append(f"{spec.table}.{spec.name}")
            continue
        if found is False and t.guarded:
            # Offline (--sql) cannot look: the script decides when it runs.
            key = f"{spec.table}.{spec.name}"
            if t.dialect == "postgresql":
                ddl = f"{spec.name} {spec.type_.compile(dialect=_dialect(t.dialect))}"
                op.execute(text(pg_add_or_adopt(physical, spec.name, ddl, key)))
                continue
            for stmt in sqlite_column_absent(physical, spec.name, t.database, t.sqlite_guards):
                op.execute(text(stmt))
        op.add_column(physical, Column(spec.name, spec.type_, nullable=True))


def contract(revision: str, columns: Sequence[ColumnSpec]) -> None:
    """Drop what :func:`expand` added; columns adopted from the provider's schema are kept."""
    from alembic import op

    t = current_target()
    kept = set(t.previously_adopted.get(revision, ()))
    for spec in reversed(columns):
        key = f"{spec.table}.{spec.name}"
        if spec.table not in t.routed or key in kept:
            continue
        physical = t.tables.physical(spec.table)
        if t.guarded:
            # Offline (--sql): only the revision log, read when the script runs, can prove that
            # oauthmig added the column. SQLite offline downgrades are refused before this.
            op.execute(text(pg_drop_if_added(LOG_TABLE, revision, physical, spec.name, key)))
            continue
        if t.existing_column(physical, spec.name) is None:
            continue  # already gone (a half-migrated database being repaired)
        op.drop_column(physical, spec.name)


def _dialect(name: str) -> Any:
    from sqlalchemy.dialects import postgresql, sqlite

    module: Any = postgresql if name == "postgresql" else sqlite
    return module.dialect()


def incompatible_column(
    database: str, physical: str, spec: ColumnSpec, found: TypeEngine[Any], dialect: str
) -> IncompatibleColumnError:
    return IncompatibleColumnError(
        f"database {database!r}: column {physical}.{spec.name} exists as "
        f"{type_name(found, dialect)}, expected {spec.expected}; alter or rename it, then rerun"
    )


# --------------------------------------------------------------------------- environment


def run_environment(context: EnvironmentContext) -> None:
    """Body of ``revisions/env.py``: configure Alembic for one routed database and run."""
    t: RevisionTarget = context.config.attributes[TARGET_KEY]
    opts: dict[str, Any] = {
        "version_table": VERSION_TABLE,
        "transaction_per_migration": True,
        "on_version_apply": _record_step,
    }
    if context.is_offline_mode():
        if t.guarded:
            # One step per call (see _offline_sql): BEGIN; guards; revision; record; COMMIT.
            opts["transaction_per_migration"] = False
            opts["transactional_ddl"] = True
        context.configure(dialect_name=t.dialect, literal_binds=True, **opts)
        if t.header:
            for stmt in t.header_guards:  # before anything, even CREATE TABLE IF NOT EXISTS
                context.execute(text(stmt))
            if t.dialect == "postgresql":
                context.execute(f"SET lock_timeout = '{t.migrate.lock_timeout_ms}ms'")
                context.execute(f"SET statement_timeout = '{t.migrate.statement_timeout_ms}ms'")
            from sqlalchemy.schema import CreateTable

            context.execute(CreateTable(revision_log, if_not_exists=True))
            for stmt in _offline_log_columns(t):
                context.execute(text(stmt))
        with context.begin_transaction():
            for stmt in t.step_guards:
                context.execute(text(stmt))
            context.run_migrations()
        return
    conn: Connection = context.config.attributes[CONNECTION_KEY]
    context.configure(connection=conn, **opts)
    with context.begin_transaction():
        context.run_migrations()


def _record_step(*, ctx: MigrationContext, step: MigrationInfo, heads: Any, run_args: Any) -> None:
    t: RevisionTarget = ctx.config.attributes[TARGET_KEY]  # type: ignore[union-attr]
    if step.is_upgrade:
        rev = step.up_revision_id
        assert rev is not None
        info = _info(cast(Script, step.up_revision))
        here = tuple(x for x in info.tables if x in t.routed)
        outcome = "applied" if here or not info.tables else "skipped"
        adopted: Any = ",".join(t.adopted.get(rev, [])) or None
        when: Any = datetime.now(UTC)
        if ctx.as_sql:
            # Offline: the database's clock when the script runs, not the generation time.
            when = func.now() if t.dialect == "postgresql" else func.current_timestamp()
            if t.guarded and t.dialect == "postgresql":
                adopted = literal_column(pg_adopted_expression())
        ctx.execute(delete(revision_log).where(revision_log.c.revision == rev))
        ctx.execute(
            insert(revision_log).values(
                revision=rev,
                outcome=outcome,
                tables=",".join(here),
                adopted=adopted,
                detail=None,
                updated_at=when,
                checksum=info.checksum,
            )
        )
    else:
        for rev in step.source_revision_ids:
            ctx.execute(delete(revision_log).where(revision_log.c.revision == rev))


# --------------------------------------------------------------------------- state reading


def _version_heads(conn: Connection) -> tuple[str, ...]:
    mc = MigrationContext.configure(conn, opts={"version_table": VERSION_TABLE})
    heads = tuple(mc.get_current_heads())
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
    return {r["revision"]: {**dict.fromkeys(_LATER_LOG_COLUMNS), **dict(r)} for r in rows}


def ensure_log_table(conn: Connection) -> None:
    """Create the revision log, or add the columns newer versions write to an older one.

    Runs inside the caller's transaction.
    """
    log_metadata.create_all(conn, checkfirst=True)
    have = {c["name"] for c in inspect(conn).get_columns(LOG_TABLE)}
    for name in _LATER_LOG_COLUMNS:
        if name not in have:
            ddl = revision_log.c[name].type.compile(dialect=conn.dialect)
            conn.execute(text(f"ALTER TABLE {LOG_TABLE} ADD COLUMN {name} {ddl}"))


def _offline_log_columns(t: RevisionTarget) -> list[str]:
    """Offline: give a revision log an older oauthmig created the later columns.

    PostgreSQL adds them if missing; SQLite SQL cannot branch, so there the script stops at
    once (before any change) with the statement that adds them.
    """
    if t.dialect == "postgresql":
        return [
            f"ALTER TABLE {LOG_TABLE} ADD COLUMN IF NOT EXISTS {name} "
            f"{revision_log.c[name].type.compile(dialect=_dialect(t.dialect))}"
            for name in _LATER_LOG_COLUMNS
        ]
    if not t.guarded:
        return []  # --dry-run of an online upgrade, which adds them (ensure_log_table)
    out: list[str] = []
    for name in _LATER_LOG_COLUMNS:
        ddl = revision_log.c[name].type.compile(dialect=_dialect(t.dialect))
        out += t.sqlite_guards.guard(
            f"EXISTS (SELECT 1 FROM pragma_table_info('{LOG_TABLE}') WHERE name = '{name}')",
            f"the revision log of {t.database} was written by an older oauthmig and lacks "
            f"column {name}; add it with `ALTER TABLE {LOG_TABLE} ADD COLUMN {name} {ddl};` "
            "(or run any oauthmig upgrade online), then apply this script",
        )
    return out


@dataclass(frozen=True, slots=True)
class Drift:
    """A revision whose file changed after it was recorded on some databases."""

    revision: str
    file_checksum: str
    recorded: dict[str, str]  # database -> checksum recorded there

    def describe(self) -> str:
        """One line: which revision, where, and what to do."""
        where = ", ".join(sorted(self.recorded))
        was = ", ".join(sorted({c[:12] for c in self.recorded.values()}))
        return (
            f"revision {self.revision} changed since it was applied on {where} (checksum "
            f"recorded {was}, file now {self.file_checksum[:12]}); restore the file as it was "
            "applied: an applied revision must not change, put new changes in a new revision"
        )


def drift(
    revisions: Sequence[RevisionInfo], logs: dict[str, dict[str, dict[str, Any]]]
) -> list[Drift]:
    """Revisions whose recorded checksum (per database: ``logs[database]`` is
    :func:`read_log`'s answer there) differs from their file's, oldest first.

    Rows without a checksum (written before checksums existed, or a failed attempt) are not
    compared.
    """
    out: list[Drift] = []
    for rev in revisions:
        if rev.checksum is None:
            continue
        recorded = {
            database: str(row["checksum"])
            for database, log in logs.items()
            if (row := log.get(rev.revision)) is not None
            and row.get("outcome") in ("applied", "skipped")
            and row.get("checksum")
            and row["checksum"] != rev.checksum
        }
        if recorded:
            out.append(Drift(rev.revision, rev.checksum, recorded))
    return out
