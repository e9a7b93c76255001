"""The legacy (pre-PKCE) Sentry schema of the three tables, as the demo and tests create it.

This mirrors what a real Sentry install has before oauthmig runs, columns oauthmig does not
manage included: ``scopes bigint NOT NULL`` without a default on grant and token (a legacy
bit field), ``scoping_organization_id`` and ``name`` on token, ``requires_org_level_access``
and ``version`` (with defaults) and ``scopes text[]`` on application, a grant ``code`` that is
indexed but not unique, and ``DEFERRABLE INITIALLY DEFERRED`` foreign keys to a users table
(:data:`USERS_TABLE`) and to the application table. A foreign key is created only where the
table it references is on the same database: every database hosting one of the three tables
gets its own users table, and a shard hosting only ``token`` has no FK to the application.
PostgreSQL also gets Django's ``varchar_pattern_ops`` ``_like`` indexes.

Two flavors (:class:`LegacyFlavor`): ``fresh`` (identity ids, ``<table>_<column>_idx`` index
names) and ``old`` (``bigserial`` ids and Django's hashed index names), since index names and
id types differ between installs.
"""

from __future__ import annotations

import hashlib
from enum import StrEnum

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    DateTime,
    ForeignKey,
    Identity,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
    false,
    true,
)

from oauthmig.config import TableNames
from oauthmig.types import StringList

# INTEGER PRIMARY KEY is SQLite's rowid alias (auto-assigned); BIGINT would not be.
BigId = BigInteger().with_variant(Integer(), "sqlite")
#: The users table the legacy tables reference (Sentry's, from Django's auth app).
USERS_TABLE = "auth_user"


class LegacyFlavor(StrEnum):
    """How an install's ids and index names look."""

    FRESH = "fresh"  # identity ids, <table>_<column>_idx
    OLD = "old"  # bigserial ids, Django-style hashed names


def _digest(*parts: str) -> str:
    return hashlib.md5(":".join(parts).encode()).hexdigest()[:8]


def _names(flavor: LegacyFlavor, table: str, column: str, kind: str) -> str:
    if flavor is LegacyFlavor.OLD:
        suffix = {"key": "_uniq", "idx": "", "like": "_like"}[kind]
        return f"{table}_{column}_{_digest(table, column)}{suffix}"[:63]
    return f"{table}_{column}_{kind}"[:63]


def _id(flavor: LegacyFlavor) -> Column[int]:
    if flavor is LegacyFlavor.OLD:
        # No Identity(): PostgreSQL makes BIGSERIAL (a sequence default), as old Django did.
        return Column("id", BigId, primary_key=True, autoincrement=True)
    return Column("id", BigId, Identity(), primary_key=True)


def _fk(
    flavor: LegacyFlavor, table: str, column: str, target: str, present: bool
) -> list[ForeignKey]:
    """A deferrable FK to ``target.id`` when that table is on the same database."""
    if not present:
        return []
    if flavor is LegacyFlavor.OLD:
        name = f"{table}_{column}_{_digest(table, column, target)}_fk_{target}_id"
    else:
        name = f"{table}_{column}_fkey"
    return [ForeignKey(f"{target}.id", name=name[:63], deferrable=True, initially="DEFERRED")]


def _like(flavor: LegacyFlavor, table: str, column: str) -> Index:
    """Django's extra index for LIKE lookups on varchar columns (PostgreSQL only)."""
    return Index(
        _names(flavor, table, column, "like"),
        column,
        postgresql_ops={column: "varchar_pattern_ops"},
    ).ddl_if(dialect="postgresql")


def legacy_metadata(
    tables: TableNames, logical: tuple[str, ...], flavor: LegacyFlavor = LegacyFlavor.FRESH
) -> MetaData:
    """A MetaData holding the legacy shape of the given logical tables (and the users table)."""
    md = MetaData()
    app, grant, token = tables.application, tables.grant, tables.token
    n = _names
    has_app = "application" in logical
    if logical:
        Table(
            USERS_TABLE,
            md,
            _id(flavor),
            Column("username", String(128), nullable=False),
            Column("is_active", Boolean, nullable=False, server_default=true()),
        )
    if has_app:
        Table(
            app,
            md,
            _id(flavor),
            Column("client_id", String(64), nullable=False),
            Column("client_secret", Text, nullable=True),
            Column("owner_id", BigInteger, *_fk(flavor, app, "owner_id", USERS_TABLE, True)),
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
            Column("requires_org_level_access", Boolean, nullable=False, server_default=false()),
            UniqueConstraint("client_id", name=n(flavor, app, "client_id", "key")),
            _like(flavor, app, "client_id"),
            Index(n(flavor, app, "owner_id", "idx"), "owner_id"),
        )
    if "grant" in logical:
        Table(
            grant,
            md,
            _id(flavor),
            Column(
                "user_id",
                BigInteger,
                *_fk(flavor, grant, "user_id", USERS_TABLE, True),
                nullable=False,
            ),
            Column(
                "application_id",
                BigInteger,
                *_fk(flavor, grant, "application_id", app, has_app),
                nullable=False,
            ),
            Column("code", String(64), nullable=False),
            Column("expires_at", DateTime(timezone=True), nullable=False),
            Column("redirect_uri", String(255), nullable=False),
            Column("scope_list", StringList(), nullable=False),
            Column("organization_id", BigInteger, nullable=True),
            Column("scopes", BigInteger, nullable=False),  # legacy bit field, no default
            # Indexed, not unique (Sentry's).
            Index(n(flavor, grant, "code", "idx"), "code"),
            _like(flavor, grant, "code"),
            Index(n(flavor, grant, "application_id", "idx"), "application_id"),
            Index(n(flavor, grant, "expires_at", "idx"), "expires_at"),
            Index(n(flavor, grant, "user_id", "idx"), "user_id"),
        )
    if "token" in logical:
        Table(
            token,
            md,
            _id(flavor),
            Column(
                "user_id",
                BigInteger,
                *_fk(flavor, token, "user_id", USERS_TABLE, True),
                nullable=False,
            ),
            Column(
                "application_id",
                BigInteger,
                *_fk(flavor, token, "application_id", app, has_app),
                nullable=True,
            ),
            Column("token", String(71), nullable=False),
            Column("hashed_token", String(128), nullable=True),
            Column("token_last_characters", String(4), nullable=True),
            Column("refresh_token", String(71), nullable=True),
            Column("hashed_refresh_token", String(128), nullable=True),
            Column("token_type", String(7), nullable=True),
            Column("scope_list", StringList(), nullable=False),
            Column("expires_at", DateTime(timezone=True), nullable=True),
            Column("date_added", DateTime(timezone=True), nullable=False),
            Column("scopes", BigInteger, nullable=False),  # legacy bit field, no default
            Column("scoping_organization_id", BigInteger, nullable=True),
            Column("name", String(255), nullable=True),
            UniqueConstraint("token", name=n(flavor, token, "token", "key")),
            UniqueConstraint("hashed_token", name=n(flavor, token, "hashed_token", "key")),
            UniqueConstraint("refresh_token", name=n(flavor, token, "refresh_token", "key")),
            UniqueConstraint(
                "hashed_refresh_token", name=n(flavor, token, "hashed_refresh_token", "key")
            ),
            _like(flavor, token, "token"),
            _like(flavor, token, "hashed_token"),
            _like(flavor, token, "refresh_token"),
            _like(flavor, token, "hashed_refresh_token"),
            Index(n(flavor, token, "application_id", "idx"), "application_id"),
            Index(n(flavor, token, "user_id", "idx"), "user_id"),
        )
    return md


def user_rows(count: int) -> list[dict[str, object]]:
    """Rows for the users table: ids 1..count (what tests and the demo reference)."""
    return [{"id": i, "username": f"user{i}"} for i in range(1, count + 1)]
