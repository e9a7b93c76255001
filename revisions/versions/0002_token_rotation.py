"""token: family, parent, rotation and revocation columns

Revision ID: 0002
Revises: 0001
"""

from typing import Any

from sqlalchemy import BigInteger, DateTime, Integer, String, Uuid
from sqlalchemy.types import TypeEngine

from oauthmig.rollout.revisions import ColumnSpec, contract, expand, text_like

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def _uuid(found: TypeEngine[Any], dialect: str) -> bool:
    if dialect == "postgresql":
        return isinstance(found, Uuid)
    return isinstance(found, Uuid) or text_like(32)(found, dialect)


def _bigint(found: TypeEngine[Any], dialect: str) -> bool:
    if dialect == "postgresql":
        return isinstance(found, BigInteger)
    return isinstance(found, Integer)


def _timestamptz(found: TypeEngine[Any], dialect: str) -> bool:
    if dialect == "postgresql":
        return isinstance(found, DateTime) and bool(found.timezone)
    return isinstance(found, DateTime)


tables: tuple[str, ...] = ("token",)
requires_backfills: tuple[str, ...] = ()
columns: tuple[ColumnSpec, ...] = (
    ColumnSpec("token", "token_family_id", Uuid(), "uuid", _uuid),
    ColumnSpec("token", "parent_token_id", BigInteger(), "bigint", _bigint),
    ColumnSpec(
        "token", "refresh_token_rotated_at", DateTime(timezone=True), "timestamptz", _timestamptz
    ),
    ColumnSpec("token", "revoked_at", DateTime(timezone=True), "timestamptz", _timestamptz),
    # Longest reason is "reuse_detected" (14).
    ColumnSpec("token", "revoked_reason", String(32), "varchar(32) (or longer)", text_like(14)),
)


def upgrade() -> None:
    expand(revision, columns)


def downgrade() -> None:
    contract(revision, columns)
