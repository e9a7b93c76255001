"""The backfill jobs: what each one fills, and what remains to do (their state, the job table,
is :mod:`oauthmig.rollout.job_state`).

Imported directly by the backfill runner, by ``status`` and by the revision gate, so nothing
registers itself at import time. :func:`remaining_rows` is a full count (the backfill's own
start, ``status --exact``); ``status`` and the gate read what is left without a scan
(:mod:`oauthmig.rollout.remaining`).

The token family id of a legacy token is :func:`family_id` ``(table, id, database)``: since
job version 3 (the default) the UUIDv8 of :mod:`oauthmig.family`, a constant of (table,
database) in the high bits and the row id in the low bits, which both backends compute in plain
SQL (the compatibility triggers of :mod:`oauthmig.rollout.compat` use the same SQL), where
``<database>`` is the database's name in the config, so two shards never share a family id.
Jobs started under an older version (recorded in the job row) keep their formula so that ids
already written stay consistent: version 2 is UUIDv3 (RFC 4122 §4.3, MD5) in
:data:`FAMILY_NAMESPACE` of ``"<database>:<table>:<id>"``, version 1 of ``"<table>:<id>"``
(PostgreSQL computes them with ``md5()``; SQLite calls a Python function).
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import (
    and_,
    bindparam,
    column,
    func,
    or_,
    select,
    table,
    text,
    update,
)
from sqlalchemy.engine import Connection
from sqlalchemy.sql.elements import ColumnElement

from oauthmig import family
from oauthmig.columns import StringList
from oauthmig.config import Settings
from oauthmig.redirects.rules import infer_app_type, split_redirect_uris
from oauthmig.rollout.batches import batch_stats
from oauthmig.rollout.job_state import (
    EstimateBasis,
    JobState,
    ShownStatus,
    read_job,
    run_alive,
)
from oauthmig.table_columns import table_columns


@dataclass(frozen=True, slots=True)
class Remaining:
    """What one job has left on one database, as cheaply as it could be known.

    ``rows`` is ``None`` while the table lacks the job's columns (its expand revision has not
    run); ``estimate`` says ``rows`` was estimated rather than counted; ``pending`` is what a
    gated revision waits on: rows are left, or could not be ruled out without a scan.
    """

    rows: int | None
    estimate: bool = False
    pending: bool = False
    basis: EstimateBasis | None = None  # what an estimate came from (None: counted)


FAMILY_NAMESPACE = uuid.UUID("6f1c1d1e-8a34-4c55-9b6e-0a7e5d1f2c3b")


FAMILY_VERSION = 3  # job version of new token-families jobs (see family_id)


_SQLITE_FAMILY_FN = "oauthmig_family_id"


def family_prefix(table_name: str, database: str | None) -> str:
    """The part of a family id's UUIDv3 name before the row id (``None``: job version 1)."""
    return f"{table_name}:" if database is None else f"{database}:{table_name}:"


def family_id(
    table_name: str, row_id: int, database: str | None = None, version: int = FAMILY_VERSION
) -> uuid.UUID:
    """The deterministic family id of legacy token ``row_id`` in ``table_name``.

    One family per legacy token, because legacy refreshes rewrote rows in place and kept no
    lineage. Job version 3 (the default; ``database`` is the database's name in the config)
    is :func:`oauthmig.family.family_id`, the formula the compatibility triggers compute;
    version 2 is UUIDv3 of ``"<database>:<table>:<id>"`` in :data:`FAMILY_NAMESPACE`; version 1
    (``database`` omitted, jobs started before version 2) is ``"<table>:<id>"``.
    """
    if database is not None and version >= 3:
        return family.family_id(table_name, row_id, database)
    return uuid.uuid3(FAMILY_NAMESPACE, f"{family_prefix(table_name, database)}{row_id}")


def _pg_family_sql(table_name: str, database: str | None = None) -> Any:
    # UUIDv3 in SQL: md5(namespace bytes || name), then version nibble 3 (hex digit 13) and
    # variant 10xx (hex digit 17: d -> (d & 3) | 8, done by translate). md5 is written twice.
    ns = FAMILY_NAMESPACE.hex
    h = f"md5(decode('{ns}', 'hex') || convert_to(:fam_prefix || id::text, 'UTF8'))"
    return text(
        f"overlay(overlay({h} placing '3' from 13 for 1) placing "
        f"translate(substr({h}, 17, 1), '0123456789abcdef', '89ab89ab89ab89ab') "
        "from 17 for 1)::uuid"
    ).bindparams(fam_prefix=family_prefix(table_name, database))


@dataclass(frozen=True, slots=True)
class BatchContext:
    """What a job's batch function needs."""

    conn: Connection
    physical: str
    settings: Settings
    database: str = ""
    version: int = FAMILY_VERSION


@dataclass(frozen=True, slots=True)
class Job:
    """A backfill job over one logical table."""

    name: str
    logical_table: str
    description: str
    columns: tuple[str, ...]
    table: Callable[[str], Any]  # physical name -> lightweight table with the job's columns
    pending: Callable[[Any], ColumnElement[bool]]
    run_batch: Callable[[BatchContext, int, int], int]


def _token_table(physical: str) -> Any:
    return table(physical, column("id"), column("refresh_token"), column("token_family_id"))


def _token_pending(t: Any) -> ColumnElement[bool]:
    return and_(t.c.refresh_token.is_not(None), t.c.token_family_id.is_(None))


def _token_batch(ctx: BatchContext, lo: int, hi: int) -> int:
    t = _token_table(ctx.physical)
    where = and_(t.c.id > lo, t.c.id <= hi, _token_pending(t))
    database = ctx.database if ctx.version >= 2 else None
    if ctx.version >= 3:
        high = family.family_high(ctx.physical, ctx.database)
        value: Any = text(family.family_sql(ctx.conn.dialect.name, high, "id"))
    elif ctx.conn.dialect.name == "postgresql":
        value = _pg_family_sql(ctx.physical, database)
    else:
        prefix = family_prefix(ctx.physical, database)
        value = getattr(func, _SQLITE_FAMILY_FN)(prefix, t.c.id)
    result = ctx.conn.execute(update(t).where(where).values(token_family_id=value))
    return int(result.rowcount)


def _app_table(physical: str) -> Any:
    return table(
        physical,
        column("id"),
        column("client_secret"),
        column("redirect_uris"),
        column("token_endpoint_auth_method"),
        column("grant_types", StringList()),
        column("response_types", StringList()),
        column("application_type"),
    )


def _app_pending(t: Any) -> ColumnElement[bool]:
    return or_(
        t.c.token_endpoint_auth_method.is_(None),
        t.c.grant_types.is_(None),
        t.c.response_types.is_(None),
        t.c.application_type.is_(None),
    )


def infer_application_type(redirect_uris: str | None) -> str:
    """``native`` when the stored redirect URIs are native-style, else ``web``.

    The same inference ``audit-redirects`` uses (:func:`oauthmig.redirects.rules.infer_app_type`).
    """
    return str(infer_app_type(split_redirect_uris(redirect_uris)))


def _app_batch(ctx: BatchContext, lo: int, hi: int) -> int:
    t = _app_table(ctx.physical)
    cm = ctx.settings.backfill.client_metadata
    where = and_(t.c.id > lo, t.c.id <= hi, _app_pending(t))
    # The app type needs the redirect rules (Python); the ids and URIs of one batch are read,
    # classified, and written back in one statement per type: no per-row round trips.
    rows = ctx.conn.execute(
        select(t.c.id, t.c.redirect_uris, t.c.application_type).where(where)
    ).all()
    by_type: dict[str, list[int]] = {"web": [], "native": []}
    for row in rows:
        by_type[infer_application_type(row.redirect_uris)].append(int(row.id))
    changed = 0
    for app_type, ids in by_type.items():
        if not ids:
            continue
        stmt = (
            update(t)
            .where(and_(where, t.c.id.in_(bindparam("ids", expanding=True))))
            .values(
                token_endpoint_auth_method=func.coalesce(
                    t.c.token_endpoint_auth_method,
                    text(
                        f"CASE WHEN client_secret IS NULL OR client_secret = '' THEN 'none' "
                        f"ELSE '{cm.confidential_auth_method}' END"
                    ),
                ),
                grant_types=func.coalesce(
                    t.c.grant_types, bindparam("gt", list(cm.grant_types), StringList())
                ),
                response_types=func.coalesce(
                    t.c.response_types, bindparam("rt", list(cm.response_types), StringList())
                ),
                application_type=func.coalesce(t.c.application_type, app_type),
            )
        )
        changed += int(ctx.conn.execute(stmt, {"ids": ids}).rowcount)
    return changed


JOBS: dict[str, Job] = {
    "token-families": Job(
        "token-families",
        "token",
        "token_family_id for every legacy token with a refresh token (one family per token)",
        ("token_family_id", "refresh_token"),
        _token_table,
        _token_pending,
        _token_batch,
    ),
    "client-metadata": Job(
        "client-metadata",
        "application",
        "token_endpoint_auth_method, grant_types, response_types, application_type",
        ("token_endpoint_auth_method", "grant_types", "response_types", "application_type"),
        _app_table,
        _app_pending,
        _app_batch,
    ),
}


def register_sqlite_functions(conn: Connection) -> None:
    if conn.dialect.name != "sqlite":
        return
    raw = conn.connection.driver_connection
    assert raw is not None

    def fam(prefix: str, row_id: int) -> str:
        return uuid.uuid3(FAMILY_NAMESPACE, f"{prefix}{int(row_id)}").hex

    raw.create_function(_SQLITE_FAMILY_FN, 2, fam, deterministic=True)


def has_columns(conn: Connection, physical: str, names: Sequence[str]) -> bool:
    have = table_columns(conn, physical) or frozenset()
    if conn.in_transaction():
        conn.rollback()
    return all(n in have for n in names)


def remaining_rows(conn: Connection, settings: Settings, database: str, job: Job) -> int:
    """Rows of ``job`` still to backfill on ``database``: a full count of its table.

    0 where its table is not routed there; -1 while the table lacks the job's columns (the
    expand revision has not run, so neither can the backfill).
    """
    if job.logical_table not in settings.tables_on(database):
        return 0
    physical = settings.tables.physical(job.logical_table)
    if not has_columns(conn, physical, job.columns):
        return -1
    t = job.table(physical)
    n = conn.execute(select(func.count()).select_from(t).where(job.pending(t))).scalar_one()
    if conn.in_transaction():
        conn.rollback()
    return int(n)


def exact_remaining(conn: Connection, settings: Settings, database: str, job: Job) -> Remaining:
    """:func:`remaining_rows` as a :class:`Remaining` (a full count)."""
    n = remaining_rows(conn, settings, database, job)
    return Remaining(None, pending=True) if n < 0 else Remaining(n, pending=n > 0)


def job_states(
    conn: Connection,
    settings: Settings,
    database: str,
    left: Mapping[str, Remaining] | None = None,
) -> list[JobState]:
    """Per-job state on one database, for ``status``.

    ``left`` gives what each job has left (see :mod:`oauthmig.rollout.remaining`); a job it
    does not name is counted in full.
    """
    out: list[JobState] = []
    for job in JOBS.values():
        if job.logical_table not in settings.tables_on(database):
            continue
        known = (left or {}).get(job.name) or exact_remaining(conn, settings, database, job)
        remaining = known.rows
        if remaining is None:
            out.append(JobState(job.name, ShownStatus.WAITING_FOR_UPGRADE, 0, None, None))
            continue
        progress = read_job(conn, job.name)
        if progress is None:
            state = ShownStatus.NOT_STARTED if known.pending else ShownStatus.FINISHED
            out.append(
                JobState(
                    job.name,
                    state,
                    0,
                    remaining,
                    remaining,
                    estimate=known.estimate,
                    estimate_basis=known.basis,
                )
            )
            continue
        state = ShownStatus(progress.status)
        held = None
        if state is ShownStatus.FINISHED and known.pending:
            state = ShownStatus.STALE  # rows needing the backfill appeared after it finished
        elif state is ShownStatus.RUNNING and not run_alive(conn, job.name):
            # Killed, crashed or lost its server: nothing holds the lock.
            state = ShownStatus.INTERRUPTED
        elif state in (ShownStatus.RUNNING, ShownStatus.PAUSED):
            held = progress.held_reason  # running: holds now; paused: stopped while held
        out.append(
            JobState(
                job.name,
                state,
                progress.rows_done,
                # Rows inserted since the run started (or an estimate above the cursor) may
                # exceed what the run counted then: the total is never less than done + left.
                max(progress.rows_total, progress.rows_done + remaining),
                remaining,
                progress.last_error,
                held,
                progress.requested_action,
                progress.requested_by,
                progress.requested_at,
                batch_stats(conn, job.name, remaining),
                estimate=known.estimate,
                estimate_basis=known.basis,
            )
        )
    return out
