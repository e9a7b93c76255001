"""${message}

Revision ID: ${up_revision}
Revises: ${down_revision | comma,n}
Created: ${create_date}
"""

from oauthmig.rollout.revisions import ColumnSpec, contract, expand

revision = ${repr(up_revision)}
down_revision = ${repr(down_revision)}
branch_labels = None
depends_on = None

# Logical tables this revision touches; on a database hosting none of them it is recorded as
# skipped (not routed).
tables: tuple[str, ...] = ()
# Backfill jobs that must be finished on a database before this revision may run there.
requires_backfills: tuple[str, ...] = ()
columns: tuple[ColumnSpec, ...] = ()


def upgrade() -> None:
    expand(revision, columns)


def downgrade() -> None:
    contract(revision, columns)
