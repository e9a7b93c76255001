"""The revision catalogue and the API revision files use.

Each revision module in ``revisions/versions`` declares ``tables`` (the logical tables it
touches), ``columns`` (the :class:`ColumnSpec` it adds, if any) and ``requires_backfills``.
On each database the revision runs only the operations for tables routed there and records its
outcome (``applied`` or ``skipped``: not routed) in that database's own
``oauthmig_revision_log``; Alembic's own version table (``oauthmig_version``) tracks the head.
This module reads the catalogue (:class:`Catalogue`), gives revision files :func:`expand` and
:func:`contract` and is the Alembic environment (:func:`run_environment`). The revision
descriptions, the version table and revision log readers and the preflight are in
:mod:`oauthmig.preflight` (no Alembic there) and re-exported here for revision files;
:mod:`oauthmig.rollout.runner` plans and runs revisions.

Every log row also holds the :func:`checksum` of the revision file that was recorded (sha256 of
its source, line endings normalized), so that :func:`drift` can tell when a file changed after
it was applied somewhere. Log tables written before checksums existed get the column on first
use (:func:`ensure_log_table`); their old rows have none and are never reported as changed.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import ModuleType
from typing import Any, cast

from alembic.config import Config
from alembic.runtime.environment import EnvironmentContext
from alembic.runtime.migration import MigrationContext, MigrationInfo
from alembic.script import Script, ScriptDirectory
from alembic.util import CommandError
from sqlalchemy import Column, delete, func, insert, inspect, literal_column, text
from sqlalchemy.engine import Connection
from sqlalchemy.schema import CreateTable
from sqlalchemy.types import TypeEngine

from oauthmig.config import LOGICAL_TABLES, ClientMetadataDefaults, MigrateSettings, TableNames
from oauthmig.db import timeout_statements
from oauthmig.errors import RevisionFailedError, UsageError
from oauthmig.resources import packaged_path, revisions_dir
from oauthmig.revision_types import ColumnSpec as ColumnSpec
from oauthmig.revision_types import RevisionInfo as RevisionInfo
from oauthmig.revision_types import incompatible_column as incompatible_column
from oauthmig.revision_types import revision_position as revision_position
from oauthmig.revision_types import text_like as text_like
from oauthmig.revision_types import type_name as type_name
from oauthmig.rollout import compat
from oauthmig.rollout.offline import (
    SqliteGuards,
    pg_add_or_adopt,
    pg_adopted_expression,
    pg_drop_if_added,
    sqlite_column_absent,
)
from oauthmig.version_tables import LATER_LOG_COLUMNS as LATER_LOG_COLUMNS
from oauthmig.version_tables import LOG_TABLE as LOG_TABLE
from oauthmig.version_tables import STAMPED as STAMPED
from oauthmig.version_tables import VERSION_TABLE as VERSION_TABLE
from oauthmig.version_tables import log_metadata as log_metadata
from oauthmig.version_tables import read_current as read_current
from oauthmig.version_tables import read_log as read_log
from oauthmig.version_tables import revision_log as revision_log

#: Where the revisions are (packaged copy when installed); see :mod:`oauthmig.resources`.
REVISIONS_DIR = packaged_path("revisions", "revisions")
TARGET_KEY = "oauthmig_target"
#: What the stock ``alembic`` command prints (``FAILED: ...``) when it runs these scripts.
STOCK_ALEMBIC_REFUSAL = (
    "oauthmig's revisions run only through oauthmig, which routes each table to its databases: "
    "use `oauthmig status` instead of `alembic current` or `alembic check`, `oauthmig stamp REV` "
    "instead of `alembic stamp`, `oauthmig upgrade|downgrade` (with --sql for SQL scripts, "
    "--dry-run for a plan) instead of `alembic upgrade|downgrade`"
)
CONNECTION_KEY = "connection"


# --------------------------------------------------------------------------- revisions


def checksum(path: str | Path) -> str:
    """sha256 of a revision file's source bytes, CRLF and CR line endings read as LF.

    The same file checked out on Windows or Linux, or shipped in a wheel, has one checksum.
    """
    data = Path(path).read_bytes().replace(b"\r\n", b"\n").replace(b"\r", b"\n")
    return hashlib.sha256(data).hexdigest()


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


@dataclass(frozen=True, slots=True)
class Catalogue:
    """The revision history of one invocation: Alembic's script directory over ``revisions/``
    (which loads every revision module once) and the revisions it holds, oldest first.

    Building it reads and imports the revision files, so a command builds one
    (:meth:`load`) and passes it down to everything that plans or runs revisions.
    """

    script: ScriptDirectory
    revisions: tuple[RevisionInfo, ...]

    @classmethod
    def load(cls) -> Catalogue:
        """Read ``revisions/`` (the packaged copy when installed); the history must be linear."""
        cfg = Config()
        cfg.set_main_option("script_location", str(revisions_dir()))
        script = ScriptDirectory.from_config(cfg)
        heads = script.get_heads()
        if len(heads) > 1:
            raise RevisionFailedError(
                f"revisions/ has several heads {heads}; the history must be linear"
            )
        scripts = list(script.walk_revisions("base", "heads"))
        return cls(script, tuple(_info(s) for s in reversed(scripts)))

    def resolve(self, rev: str, option: str = "--to") -> str | None:
        """``head``/``base``/a revision id or unique prefix -> revision id (``None``: base)."""
        return resolve_revision(rev, self.revisions, option)

    def get(self, revision: str) -> RevisionInfo:
        """The revision with id ``revision`` (which must be in the history)."""
        return next(r for r in self.revisions if r.revision == revision)


def history() -> list[RevisionInfo]:
    """All revisions, oldest first (a new :class:`Catalogue`: build one per command)."""
    return list(Catalogue.load().revisions)


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
    # What the compatibility triggers write for an application (baked in when created).
    client_metadata: ClientMetadataDefaults = field(default_factory=ClientMetadataDefaults)

    def compat_target(self) -> compat.CompatTarget:
        """This database as the compatibility layer sees it (:mod:`oauthmig.rollout.compat`)."""
        return compat.CompatTarget(
            self.dialect,
            self.database,
            {logical: self.tables.physical(logical) for logical in self.routed},
            self.client_metadata,
        )

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
    # The old code keeps writing: from now on the triggers fill what it leaves out.
    for logical in _compat_tables(t, columns):
        for stmt in compat.install_sql(t.compat_target(), logical):
            op.execute(text(stmt))


def _compat_tables(t: RevisionTarget, columns: Sequence[ColumnSpec]) -> list[str]:
    """The compatibility-layer tables whose columns ``columns`` bring, routed to ``t``."""
    return [
        logical
        for logical in compat.COMPAT_TABLES
        if logical in t.routed
        and any(s.table == logical and s.name == compat.KEY_COLUMNS[logical] for s in columns)
    ]


def contract(revision: str, columns: Sequence[ColumnSpec]) -> None:
    """Drop what :func:`expand` added; columns adopted from the provider's schema are kept."""
    from alembic import op

    t = current_target()
    # The triggers reference the columns: they go first (as does their record of filled rows).
    for logical in _compat_tables(t, columns):
        for stmt in compat.remove_sql(t.compat_target(), logical):
            op.execute(text(stmt))
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


# --------------------------------------------------------------------------- environment


def run_environment(context: EnvironmentContext) -> None:
    """Body of ``revisions/env.py``: configure Alembic for one routed database and run."""
    if TARGET_KEY not in context.config.attributes:
        # Stock `alembic current|check|stamp|upgrade ...` over these scripts: they need the
        # routing (which tables live on which database) that only oauthmig supplies.
        raise CommandError(STOCK_ALEMBIC_REFUSAL)
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
            context.execute(CreateTable(revision_log, if_not_exists=True))
            for stmt in _offline_log_columns(t):
                context.execute(text(stmt))
        with context.begin_transaction():
            for stmt in t.step_guards:
                context.execute(text(stmt))
            if t.guarded and t.dialect == "postgresql":
                # SET LOCAL: a transaction pooler may run each transaction on another session,
                # and nothing may outlive the script's transactions there.
                m = t.migrate
                for statement in timeout_statements(m.lock_timeout_ms, m.statement_timeout_ms):
                    context.execute(statement)
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
        here = info.tables_on(t.routed)
        outcome = "applied" if info.applies_to(t.routed) else "skipped"
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


# --------------------------------------------------------------------------- revision log


def ensure_log_table(conn: Connection) -> None:
    """Create the revision log, or add the columns newer versions write to an older one.

    Runs inside the caller's transaction.
    """
    log_metadata.create_all(conn, checkfirst=True)
    have = {c["name"] for c in inspect(conn).get_columns(LOG_TABLE)}
    for name in LATER_LOG_COLUMNS:
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
            for name in LATER_LOG_COLUMNS
        ]
    if not t.guarded:
        return []  # --dry-run of an online upgrade, which adds them (ensure_log_table)
    out: list[str] = []
    for name in LATER_LOG_COLUMNS:
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
