"""enforcement: observe-mode record table beside the application table

Revision ID: 0007
Revises: 0006

``oauthmig_enforcement_observation``: one row per application, check and UTC day, counting the
requests a check running in ``observe`` would have rejected under ``enforce`` (first and last
seen), for ``oauthmig status`` / ``report`` "Enforcement readiness". The provider adds to a
row with one UPSERT per observation, in its own transaction. Created on every database hosting
the application table (its ``application_id`` is that table's id; no foreign key, so the
provider's deletes of applications never wait on it). Expand only: a new table, nothing else
touched; the downgrade drops it (it is oauthmig's own table).
"""

from sqlalchemy import BigInteger, Column, Date, DateTime, String, inspect
from sqlalchemy.engine import Connection

from oauthmig.rollout.revisions import ColumnSpec, RevisionTarget, current_target

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None

tables: tuple[str, ...] = ("application",)
requires_backfills: tuple[str, ...] = ()
columns: tuple[ColumnSpec, ...] = ()

# Spelled out here rather than imported from oauthmig.observation_table: a revision must not
# change meaning when the code around it evolves.
TABLE = "oauthmig_enforcement_observation"


def _columns() -> list[Column[object]]:
    return [
        Column("application_id", BigInteger, primary_key=True, autoincrement=False),
        Column("check_name", String(32), primary_key=True),
        Column("day", Date, primary_key=True),
        Column("count", BigInteger, nullable=False),
        Column("first_seen", DateTime(timezone=True), nullable=False),
        Column("last_seen", DateTime(timezone=True), nullable=False),
    ]


def verify_applied(conn: Connection, target: RevisionTarget) -> list[str]:
    """What is missing for this revision's end state on ``target``'s database (for stamp)."""
    if "application" not in target.routed or inspect(conn).has_table(TABLE):
        return []
    return [f"table {TABLE} is missing"]


def upgrade() -> None:
    from alembic import op

    if "application" not in current_target().routed:
        return
    # IF NOT EXISTS: a --sql script may meet a table an earlier attempt created.
    op.create_table(TABLE, *_columns(), if_not_exists=True)


def downgrade() -> None:
    from alembic import op

    if "application" not in current_target().routed:
        return
    op.drop_table(TABLE, if_exists=True)
