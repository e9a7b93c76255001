"""grant: consumed_at and token_family_id (authorization code replay detection)

Revision ID: 0005
Revises: 0004

An exchanged authorization code is no longer deleted: the models mark it consumed
(``consumed_at``) and record the ``token_family_id`` of the tokens it produced, so that a
second exchange of the same code is recognized and revokes that family (RFC 6749 §4.1.2,
``revoked_reason = 'code_replay'``). ``oauthmig prune-grants`` deletes grants once they have
expired, in short batches. Expand only: two nullable columns without default.
"""

from typing import Any

from sqlalchemy import DateTime, String, Uuid
from sqlalchemy.types import TypeEngine

from oauthmig.rollout.revisions import ColumnSpec, contract, expand

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


# Spelled out here rather than shared with 0002: a revision must not change meaning when the
# code around it evolves.
def _uuid(found: TypeEngine[Any], dialect: str) -> bool:
    if dialect == "postgresql":
        return isinstance(found, Uuid)
    if isinstance(found, Uuid):
        return True
    return isinstance(found, String) and (found.length is None or found.length >= 32)


def _timestamptz(found: TypeEngine[Any], dialect: str) -> bool:
    if dialect == "postgresql":
        return isinstance(found, DateTime) and bool(found.timezone)
    return isinstance(found, DateTime)


tables: tuple[str, ...] = ("grant",)
requires_backfills: tuple[str, ...] = ()
columns: tuple[ColumnSpec, ...] = (
    ColumnSpec("grant", "consumed_at", DateTime(timezone=True), "timestamptz", _timestamptz),
    ColumnSpec("grant", "token_family_id", Uuid(), "uuid", _uuid),
)


def upgrade() -> None:
    expand(revision, columns)


def downgrade() -> None:
    contract(revision, columns)
