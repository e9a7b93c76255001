"""application: RFC 7591 client metadata columns

Revision ID: 0003
Revises: 0002
"""

from typing import Any

from sqlalchemy import ARRAY, JSON, String, Text
from sqlalchemy.types import TypeEngine

from oauthmig.columns import StringList
from oauthmig.rollout.revisions import ColumnSpec, contract, expand, text_like

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def _string_list(found: TypeEngine[Any], dialect: str) -> bool:
    if dialect == "postgresql":
        return isinstance(found, ARRAY) and isinstance(found.item_type, String)
    return isinstance(found, JSON | Text) or text_like(1)(found, dialect)


tables: tuple[str, ...] = ("application",)
requires_backfills: tuple[str, ...] = ()
columns: tuple[ColumnSpec, ...] = (
    # Longest RFC 7591 / OIDC value is "self_signed_tls_client_auth" (27).
    ColumnSpec(
        "application",
        "token_endpoint_auth_method",
        String(40),
        "varchar(40) (or longer)",
        text_like(27),
    ),
    ColumnSpec(
        "application", "grant_types", StringList(), "text[] (JSON text on SQLite)", _string_list
    ),
    ColumnSpec(
        "application", "response_types", StringList(), "text[] (JSON text on SQLite)", _string_list
    ),
    # OpenID Connect Registration §2: "web" or "native".
    ColumnSpec(
        "application", "application_type", String(8), "varchar(8) (or longer)", text_like(6)
    ),
)


def upgrade() -> None:
    expand(revision, columns)


def downgrade() -> None:
    contract(revision, columns)
