"""Run-time guards for offline (``--sql``) scripts.

Offline, oauthmig cannot look at the database, so a script must check for itself, when it runs,
what the online runner checks before it writes. Every guard fails the statement (PostgreSQL:
``RAISE EXCEPTION`` in a ``DO`` block; SQLite: a row that violates a named CHECK constraint of
a temporary table), which aborts the revision's transaction so nothing of it is recorded:

* the script runs on the database it was generated for (``current_database()`` on PostgreSQL,
  the main file of ``pragma_database_list`` on SQLite);
* the version table holds the revision the step starts from, so after any failure every later
  step fails too (a client that goes on after an error records nothing more);
* a gated revision's backfills are finished: no pending rows remain and the job table, where a
  job has a row, says ``finished``;
* expand steps adopt an existing column on PostgreSQL (and record it in the revision log at run
  time); SQLite cannot branch, so there an existing column is an error;
* contract steps on PostgreSQL drop a column only when the revision log proves oauthmig added
  it (a row for the revision, outcome ``applied``, the column not listed as adopted);
* finalize steps, which run outside a transaction on PostgreSQL, are verified before the
  revision is recorded.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import make_url
from sqlalchemy.schema import CreateTable

from oauthmig.config import DatabaseConfig, Settings
from oauthmig.rollout.job_state import JOB_TABLE, job_table
from oauthmig.rollout.jobs import JOBS

ADOPTED_SETTING = "oauthmig.adopted"
PSQL_HEADER = "\\set ON_ERROR_STOP on\n"


def _lit(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def _pg_do(body: str, declare: str = "") -> str:
    decl = f"DECLARE {declare} " if declare else ""
    return f"DO $oauthmig$ {decl}BEGIN\n{body}\nEND $oauthmig$"


def _pg_raise(message: str, *args: str) -> str:
    """``RAISE EXCEPTION`` with each ``{}`` of ``message`` filled from an SQL expression.

    Built by concatenation, never with ``%`` placeholders: offline SQL for PostgreSQL drivers
    doubles every ``%`` of a statement.
    """
    pieces = ("oauthmig: " + message).split("{}")
    parts = [_lit(pieces[0])]
    for arg, piece in zip(args, pieces[1:], strict=True):
        parts.append(f"coalesce(({arg})::text, '?')")
        parts.append(_lit(piece))
    return f"RAISE EXCEPTION USING MESSAGE = {' || '.join(parts)};"


class SqliteGuards:
    """Numbered SQLite guards: a temporary table whose CHECK names the failure."""

    def __init__(self) -> None:
        self.count = 0

    def guard(self, condition: str, message: str) -> list[str]:
        """Statements that fail with ``CHECK constraint failed: <message>`` unless true."""
        self.count += 1
        name = f"temp.oauthmig_guard_{self.count}"
        constraint = ("oauthmig: " + message).replace('"', "'")
        return [
            f'CREATE TABLE {name} (ok INTEGER CONSTRAINT "{constraint}" CHECK (ok))',
            f"INSERT INTO {name} (ok) SELECT CASE WHEN ({condition}) THEN 1 ELSE 0 END",
            f"DROP TABLE {name}",
        ]


def expected_database(db: DatabaseConfig) -> str | None:
    """The database name (PostgreSQL) or absolute file path (SQLite) the URL points at."""
    if db.url is None:
        return None
    url = make_url(db.url)
    if url.get_backend_name() == "sqlite":
        if not url.database or url.database == ":memory:":
            return None
        return os.path.abspath(url.database)
    return url.database or url.username or None


def database_guard(db: DatabaseConfig, guards: SqliteGuards) -> list[str]:
    """Fail unless the script runs on the database it was generated for."""
    expected = expected_database(db)
    if expected is None:
        return []
    if db.dialect == "postgresql":
        return [
            _pg_do(
                f"IF current_database() <> {_lit(expected)} THEN "
                + _pg_raise(
                    f"this script is for database {db.name} ({expected}), not {{}}",
                    "current_database()",
                )
                + " END IF;"
            )
        ]
    return guards.guard(
        f"(SELECT file FROM pragma_database_list WHERE name = 'main') = {_lit(expected)}",
        f"this script is for database {db.name} ({expected}); apply it to that file only",
    )


def version_guard(
    db: DatabaseConfig, version_table: str, expected: str | None, guards: SqliteGuards
) -> list[str]:
    """Fail unless the version table holds ``expected`` (``None``: no version recorded).

    From base, an empty version table (left by a downgrade to base) is dropped after the check,
    so that Alembic's ``CREATE TABLE`` of it that follows succeeds.
    """
    want = expected or "base"
    hint = "an earlier step failed, or the database is not where this script starts"
    if expected is None:
        out = [f"CREATE TABLE IF NOT EXISTS {version_table} (version_num VARCHAR(32) NOT NULL)"]
        if db.dialect == "postgresql":
            out.append(
                _pg_do(
                    f"SELECT string_agg(version_num, ',') INTO v FROM {version_table};\n"
                    "IF v IS NOT NULL THEN "
                    + _pg_raise(
                        f"database {db.name} is at revision {{}}, this step starts from base "
                        f"({hint})",
                        "v",
                    )
                    + " END IF;",
                    declare="v text;",
                )
            )
        else:
            out += guards.guard(
                f"NOT EXISTS (SELECT 1 FROM {version_table})",
                f"database {db.name} is not at revision base ({hint})",
            )
        return [*out, f"DROP TABLE {version_table}"]
    if db.dialect == "postgresql":
        cond = f"v IS DISTINCT FROM {_lit(expected)}"
        return [
            _pg_do(
                f"IF to_regclass({_lit(version_table)}) IS NOT NULL THEN "
                f"SELECT string_agg(version_num, ',') INTO v FROM {version_table}; END IF;\n"
                f"IF {cond} THEN "
                + _pg_raise(
                    f"database {db.name} is at revision {{}}, this step starts from {want} "
                    f"({hint})",
                    "coalesce(v, 'base')",
                )
                + " END IF;",
                declare="v text;",
            )
        ]
    cond = f"(SELECT group_concat(version_num) FROM {version_table}) IS {_lit(expected)}"
    return guards.guard(cond, f"database {db.name} is not at revision {want} ({hint})")


def _compile(stmt: Any, dialect_name: str) -> str:
    module: Any = postgresql if dialect_name == "postgresql" else sqlite
    dialect = module.dialect()
    return str(stmt.compile(dialect=dialect, compile_kwargs={"literal_binds": True}))


def gate_guards(
    settings: Settings,
    db: DatabaseConfig,
    revision: str,
    jobs: Sequence[str],
    guards: SqliteGuards,
    starts_from: str | None = None,
) -> list[str]:
    """Fail unless every backfill ``revision`` requires is finished on this database.

    ``starts_from`` is the revision this step starts from: where the database stays when the
    gate stops the script. The message says what works then: the backfill, and a new script
    written with ``upgrade --sql --from`` that revision (the stopped script cannot be rerun: its
    first steps are applied, so its first version guard fails)."""
    out: list[str] = []
    routed = settings.tables_on(db.name)
    for name in jobs:
        job = JOBS[name]
        if job.logical_table not in routed:
            continue
        t = job.table(settings.tables.physical(job.logical_table))
        pending = _compile(select(func.count()).select_from(t).where(job.pending(t)), db.dialect)
        todo = (
            f"run `oauthmig backfill {name} -d {db.name}`, then write the rest with "
            f"`oauthmig upgrade --sql --from {starts_from or 'base'} -d {db.name}` and apply "
            "that script (this one cannot be rerun: its first steps are applied)"
        )
        unfinished = f"revision {revision} requires backfill {name} to finish on {db.name}"
        if db.dialect == "postgresql":
            out.append(
                _pg_do(
                    f"n := ({pending});\n"
                    "IF n > 0 THEN "
                    + _pg_raise(f"{unfinished} ({{}} rows left); {todo}", "n")
                    + " END IF;\n"
                    f"IF to_regclass({_lit(JOB_TABLE)}) IS NOT NULL THEN "
                    f"SELECT status INTO s FROM {JOB_TABLE} WHERE job = {_lit(name)}; "
                    "IF s IS NOT NULL AND s <> 'finished' THEN "
                    + _pg_raise(f"{unfinished} (its job is {{}}); {todo}", "s")
                    + " END IF; END IF;",
                    declare="n bigint; s text;",
                )
            )
            continue
        out.extend(guards.guard(f"({pending}) = 0", f"{unfinished} (rows left); {todo}"))
        # SQLite prepares a whole statement, so the job table must exist to be read: create it
        # as the backfill would (same definition), empty.
        out.append(_compile(CreateTable(job_table, if_not_exists=True), db.dialect))
        out.extend(
            guards.guard(
                f"NOT EXISTS (SELECT 1 FROM {JOB_TABLE} WHERE job = {_lit(name)} "
                "AND status <> 'finished')",
                f"{unfinished} (its job is not finished); {todo}",
            )
        )
    return out


def _pg_column_exists(physical: str, column: str) -> str:
    return (
        "EXISTS (SELECT 1 FROM information_schema.columns WHERE table_schema = current_schema() "
        f"AND table_name = {_lit(physical)} AND column_name = {_lit(column)})"
    )


def pg_add_or_adopt(physical: str, column: str, column_ddl: str, adopted_as: str) -> str:
    """Add the column, or adopt it if it exists (noted for the revision log of this step)."""
    return _pg_do(
        f"IF {_pg_column_exists(physical, column)} THEN\n"
        f"  PERFORM set_config({_lit(ADOPTED_SETTING)}, concat_ws(',', "
        f"nullif(current_setting({_lit(ADOPTED_SETTING)}, true), ''), {_lit(adopted_as)}), true);\n"
        f"  RAISE NOTICE {_lit(f'oauthmig: adopted existing column {physical}.{column}')};\n"
        f"ELSE\n  ALTER TABLE {physical} ADD COLUMN {column_ddl};\nEND IF;"
    )


def pg_adopted_expression() -> str:
    """The adopted columns noted by :func:`pg_add_or_adopt` in the current transaction."""
    return f"NULLIF(current_setting({_lit(ADOPTED_SETTING)}, true), '')"


def sqlite_column_absent(
    physical: str, column: str, database: str, guards: SqliteGuards
) -> list[str]:
    """Fail if the column exists: SQLite SQL cannot decide to adopt it at run time."""
    return guards.guard(
        f"NOT EXISTS (SELECT 1 FROM pragma_table_info({_lit(physical)}) "
        f"WHERE name = {_lit(column)})",
        f"column {physical}.{column} already exists on {database}; SQLite SQL cannot adopt it, "
        "run `oauthmig upgrade` online instead",
    )


def pg_drop_if_added(
    log_table: str, revision: str, physical: str, column: str, adopted_as: str
) -> str:
    """Drop the column only if the revision log proves oauthmig added it."""
    proof = (
        f"EXISTS (SELECT 1 FROM {log_table} WHERE revision = {_lit(revision)} "
        "AND outcome = 'applied' AND "
        f"position({_lit(',' + adopted_as + ',')} IN ',' || coalesce(adopted, '') || ',') = 0)"
    )
    return _pg_do(
        f"IF {proof} AND {_pg_column_exists(physical, column)} THEN\n"
        f"  ALTER TABLE {physical} DROP COLUMN {column};\n"
        f"ELSE\n  RAISE NOTICE {_lit(f'oauthmig: kept {physical}.{column} (not proven added)')};"
        "\nEND IF;"
    )


def pg_finalize_postcondition(conditions: Sequence[tuple[str, str]]) -> str:
    """Fail unless every ``(sql condition, description)`` holds (run before recording)."""
    body = "\n".join(
        f"IF NOT ({cond}) THEN "
        + _pg_raise(f"{what} is missing; nothing was recorded")
        + " END IF;"
        for cond, what in conditions
    )
    return _pg_do(body)


def pg_constraint_validated(name: str) -> str:
    """SQL: the named constraint exists and is validated."""
    return f"EXISTS (SELECT 1 FROM pg_constraint WHERE conname = {_lit(name)} AND convalidated)"


def pg_not_null(physical: str, column: str) -> str:
    """SQL: the column is NOT NULL."""
    return (
        "EXISTS (SELECT 1 FROM information_schema.columns WHERE table_schema = current_schema() "
        f"AND table_name = {_lit(physical)} AND column_name = {_lit(column)} "
        "AND is_nullable = 'NO')"
    )


def pg_index_valid(name: str) -> str:
    """SQL: the named index exists and is valid (a failed CONCURRENTLY build is INVALID)."""
    return (
        "EXISTS (SELECT 1 FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid "
        f"WHERE c.relname = {_lit(name)} AND i.indisvalid)"
    )
