"""application: RFC 7591 metadata URLs jwks_uri and logo_uri

Revision ID: 0006
Revises: 0005

RFC 7591 §2 client metadata URLs. Sentry already stores three of them under other names, which
are mapped rather than duplicated: ``homepage_url`` is ``client_uri``, ``privacy_url`` is
``policy_uri`` and ``terms_url`` is ``tos_uri`` (see ``oauthmig.models.client_metadata``).
This revision adds the two that are missing: ``jwks_uri`` (where ``private_key_jwt`` clients
publish their keys) and ``logo_uri``. Expand only: nullable, no default; an existing text or
varchar(200+) column is adopted.
"""

from sqlalchemy import Text

from oauthmig.rollout.revisions import ColumnSpec, contract, expand, text_like

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

tables: tuple[str, ...] = ("application",)
requires_backfills: tuple[str, ...] = ()
columns: tuple[ColumnSpec, ...] = (
    # Sentry's own URL columns are varchar(200) (Django's URLField): adopt that size or more.
    ColumnSpec("application", "jwks_uri", Text(), "text (or varchar >= 200)", text_like(200)),
    ColumnSpec("application", "logo_uri", Text(), "text (or varchar >= 200)", text_like(200)),
)


def upgrade() -> None:
    expand(revision, columns)


def downgrade() -> None:
    contract(revision, columns)
