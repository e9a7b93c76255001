"""The legacy (pre-PKCE) Sentry schema of the three tables, as the demo and tests create it.

This mirrors what a provider has before oauthmig runs (DESIGN §1): ``bigint`` identity ids,
``text[]`` scopes and ``timestamptz`` on PostgreSQL; the closest SQLite equivalents otherwise.
"""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Column,
    DateTime,
    Identity,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
)

from oauthmig.config import TableNames
from oauthmig.types import StringList

# INTEGER PRIMARY KEY is SQLite's rowid alias (auto-assigned); BIGINT would not be.
BigId = BigInteger().with_variant(Integer(), "sqlite")


def legacy_metadata(tables: TableNames, logical: tuple[str, ...]) -> MetaData:
    """A MetaData holding the legacy shape of the given logical tables."""
    md = MetaData()
    app, grant, token = tables.application, tables.grant, tables.token
    if "application" in logical:
        Table(
            app,
            md,
            Column("id", BigId, Identity(), primary_key=True),
            Column("client_id", String(64), nullable=False),
            Column("client_secret", Text, nullable=True),
            Column("owner_id", BigInteger, nullable=True),
            Column("name", String(64), nullable=False),
            Column("status", Integer, nullable=False, server_default="0"),
            Column("allowed_origins", Text, nullable=True),
            Column("redirect_uris", Text, nullable=False),
            Column("homepage_url", String(200), nullable=True),
            Column("privacy_url", String(200), nullable=True),
            Column("terms_url", String(200), nullable=True),
            Column("scopes", StringList(), nullable=False),
            Column("version", Integer, nullable=False, server_default="0"),
            Column("date_added", DateTime(timezone=True), nullable=False),
            UniqueConstraint("client_id", name=f"{app}_client_id_key"),
            Index(f"{app}_owner_id_idx", "owner_id"),
        )
    if "grant" in logical:
        Table(
            grant,
            md,
            Column("id", BigId, Identity(), primary_key=True),
            Column("user_id", BigInteger, nullable=False),
            Column("application_id", BigInteger, nullable=False),
            Column("code", String(64), nullable=False),
            Column("expires_at", DateTime(timezone=True), nullable=False),
            Column("redirect_uri", String(255), nullable=False),
            Column("scope_list", StringList(), nullable=False),
            Column("organization_id", BigInteger, nullable=True),
            UniqueConstraint("code", name=f"{grant}_code_key"),
            Index(f"{grant}_application_id_idx", "application_id"),
            Index(f"{grant}_expires_at_idx", "expires_at"),
            Index(f"{grant}_user_id_idx", "user_id"),
        )
    if "token" in logical:
        Table(
            token,
            md,
            Column("id", BigId, Identity(), primary_key=True),
            Column("user_id", BigInteger, nullable=False),
            Column("application_id", BigInteger, nullable=True),
            Column("token", String(71), nullable=False),
            Column("hashed_token", String(128), nullable=True),
            Column("token_last_characters", String(4), nullable=True),
            Column("refresh_token", String(71), nullable=True),
            Column("hashed_refresh_token", String(128), nullable=True),
            Column("token_type", String(7), nullable=True),
            Column("scope_list", StringList(), nullable=False),
            Column("expires_at", DateTime(timezone=True), nullable=True),
            Column("date_added", DateTime(timezone=True), nullable=False),
            UniqueConstraint("token", name=f"{token}_token_key"),
            UniqueConstraint("hashed_token", name=f"{token}_hashed_token_key"),
            UniqueConstraint("refresh_token", name=f"{token}_refresh_token_key"),
            UniqueConstraint("hashed_refresh_token", name=f"{token}_hashed_refresh_token_key"),
            Index(f"{token}_application_id_idx", "application_id"),
            Index(f"{token}_user_id_idx", "user_id"),
        )
    return md
