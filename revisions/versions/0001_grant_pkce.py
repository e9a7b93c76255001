"""grant: PKCE challenge columns, redirect_uri if missing

Revision ID: 0001
Revises:
"""

from sqlalchemy import String, Text

from oauthmig.rollout.revisions import ColumnSpec, contract, expand, text_like

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

tables: tuple[str, ...] = ("grant",)
requires_backfills: tuple[str, ...] = ()
columns: tuple[ColumnSpec, ...] = (
    # RFC 7636 §4.2: a challenge is 43-128 characters; an existing varchar(128) is adopted.
    ColumnSpec("grant", "code_challenge", Text(), "text (or varchar >= 128)", text_like(128)),
    ColumnSpec(
        "grant", "code_challenge_method", String(10), "varchar(10) (or longer)", text_like(5)
    ),
    # Sentry has it (varchar(255) NOT NULL); installs that lack it get a nullable text column.
    ColumnSpec("grant", "redirect_uri", Text(), "text or varchar", text_like(1)),
)


def upgrade() -> None:
    expand(revision, columns)


def downgrade() -> None:
    contract(revision, columns)
