"""The enforcement observation table (revision 0007), shared by the provider, which writes it,
and the rollout services, which read it for "Enforcement readiness".

One row per application, check and UTC day: how many requests that check would have rejected
under ``enforce`` while it ran in ``observe``, and when the first and last of them came. Rows
are never inserted per request: each observation is one UPSERT that adds 1 to ``count``, so the
table holds at most (applications x checks x days) rows. It lives on every database that hosts
the application table, beside it; ``application_id`` is that table's id (no foreign key: the
provider's deletes of applications must not be blocked by it).
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Final

from sqlalchemy import BigInteger, Column, Date, DateTime, MetaData, String, Table

#: The physical name (oauthmig's own table, like its job and revision tables).
OBSERVATION_TABLE: Final = "oauthmig_enforcement_observation"
#: The revision that creates it.
OBSERVATION_REVISION: Final = "0007"

_md = MetaData()

observation_table: Final = Table(
    OBSERVATION_TABLE,
    _md,
    Column("application_id", BigInteger, primary_key=True, autoincrement=False),
    Column("check_name", String(32), primary_key=True),  # oauthmig.provider.policy.Check
    Column("day", Date, primary_key=True),  # UTC
    Column("count", BigInteger, nullable=False),
    Column("first_seen", DateTime(timezone=True), nullable=False),
    Column("last_seen", DateTime(timezone=True), nullable=False),
)


def stored_time(value: datetime, dialect: str) -> datetime:
    """A timestamp as the table stores it: aware UTC on PostgreSQL, naive UTC on SQLite."""
    value = value.astimezone(UTC)
    return value.replace(tzinfo=None) if dialect == "sqlite" else value


def loaded_time(value: datetime) -> datetime:
    """A stored timestamp as aware UTC."""
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
