"""Observe mode's record: would-be rejections, aggregated per application, check and day.

:func:`record_observation` adds one to the day's row with a single UPSERT (PostgreSQL and
SQLite ``INSERT ... ON CONFLICT DO UPDATE``) in the caller's transaction; it never inserts a
row per request and never commits. The table comes with revision 0007
(:mod:`oauthmig.observation_table`); on a database without it nothing is recorded.
"""

from __future__ import annotations

import weakref
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import bindparam, inspect
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from oauthmig.observation_table import OBSERVATION_TABLE, observation_table, stored_time
from oauthmig.provider.policy import Check

__all__ = ["forget_table_presence", "observation_upsert", "record_observation"]

# Engine -> whether the table exists there (looked up once per engine).
_PRESENT: weakref.WeakKeyDictionary[Engine, bool] = weakref.WeakKeyDictionary()


def record_observation(
    session: Session,
    *,
    application_id: int,
    check: Check | str,
    now: datetime | None = None,
    bind_mapper: type | None = None,
) -> bool:
    """Count one would-be rejection of ``check`` for ``application_id`` today (UTC).

    Runs on the database of ``bind_mapper`` (the models' ``Application`` class: the table is
    routed with the application table), in the session's transaction, uncommitted. Returns
    False, recording nothing, where revision 0007 has not created the table yet.
    """
    at = (now or datetime.now(UTC)).astimezone(UTC)
    args = {"mapper": bind_mapper} if bind_mapper is not None else None
    conn = session.connection(bind_arguments=args)
    engine = conn.engine
    present = _PRESENT.get(engine)
    if present is None:
        present = inspect(conn).has_table(OBSERVATION_TABLE)
        _PRESENT[engine] = present
    if not present:
        return False
    dialect = conn.dialect.name
    stamp = stored_time(at, dialect)
    conn.execute(
        observation_upsert(dialect),
        {
            "application_id": application_id,
            "check_name": str(Check(check)),
            "day": at.date(),
            "seen": stamp,
        },
    )
    return True


_UPSERTS: dict[str, Any] = {}


def observation_upsert(dialect: str) -> Any:
    """The one statement of an observation (``postgresql`` or ``sqlite``), built once per
    dialect: parameters ``application_id``, ``check_name``, ``day`` (UTC date) and ``seen``
    (the time, as :func:`oauthmig.observation_table.stored_time` gives it)."""
    found = _UPSERTS.get(dialect)
    if found is None:
        insert = pg_insert if dialect == "postgresql" else sqlite_insert
        t = observation_table
        stmt = insert(t).values(
            application_id=bindparam("application_id"),
            check_name=bindparam("check_name"),
            day=bindparam("day"),
            count=1,
            first_seen=bindparam("seen"),
            last_seen=bindparam("seen"),
        )
        found = stmt.on_conflict_do_update(
            index_elements=[t.c.application_id, t.c.check_name, t.c.day],
            set_={"count": t.c.count + 1, "last_seen": stmt.excluded.last_seen},
        )
        _UPSERTS[dialect] = found
    return found


def forget_table_presence(engine: Engine) -> None:
    """Look the table up again on ``engine`` next time (after an upgrade or downgrade)."""
    _PRESENT.pop(engine, None)
