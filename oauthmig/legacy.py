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

The columns, unique constraints and indexes are declared once, in :data:`SENTRY_COLUMNS`,
:data:`SENTRY_UNIQUE` and :data:`SENTRY_INDEXED`: :func:`legacy_metadata` builds the tables of
an install from them, and :func:`oauthmig.models.build_models` maps the columns marked
``mapped`` (the ones the models manage).

Two flavors (:class:`LegacyFlavor`): ``fresh`` (identity ids, ``<table>_<column>_idx`` index
names) and ``old`` (``bigserial`` ids and Django's hashed index names), since index names and
id types differ between installs.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Final

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
from sqlalchemy.sql.elements import ColumnElement
from sqlalchemy.types import TypeEngine

from oauthmig.columns import StringList
from oauthmig.config import TableNames
from oauthmig.uri import GRANT_REDIRECT_URI_LENGTH

# INTEGER PRIMARY KEY is SQLite's rowid alias (auto-assigned); BIGINT would not be.
BigId = BigInteger().with_variant(Integer(), "sqlite")
#: The users table the legacy tables reference (Sentry's, from Django's auth app).
USERS_TABLE = "auth_user"


@dataclass(frozen=True, slots=True)
class SentryColumn:
    """One column of a legacy Sentry table (the ``id`` primary key aside).

    ``default`` is the value Django's model gives (also the column's server default here);
    ``references`` is ``"users"`` or ``"application"`` for a foreign key to that table's id;
    ``mapped`` is False for the columns :mod:`oauthmig.models` leaves to the database's
    defaults or to ``extra=`` (Sentry's ``scopes`` bit field, ``scoping_organization_id``, ...).
    """

    name: str
    type_: TypeEngine[Any]
    nullable: bool = True
    default: int | bool | None = None
    references: str | None = None
    mapped: bool = True

    def column(
        self, *foreign_keys: ForeignKey, type_: TypeEngine[Any] | None = None
    ) -> Column[Any]:
        """A new ``Column`` for a table (``type_`` replaces the declared type, e.g. by one that
        converts values, as the models' timezone-aware datetimes do)."""
        server_default: str | ColumnElement[bool] | None
        if isinstance(self.default, bool):
            server_default = true() if self.default else false()
        else:
            server_default = None if self.default is None else str(self.default)
        return Column(
            self.name,
            self.type_ if type_ is None else type_,
            *foreign_keys,
            nullable=self.nullable,
            default=self.default,
            server_default=server_default,
        )


_Col = SentryColumn
_Stamp = DateTime(timezone=True)

#: The columns of each logical table on a legacy install, in table order.
SENTRY_COLUMNS: Final[Mapping[str, tuple[SentryColumn, ...]]] = {
    "application": (
        _Col("client_id", String(64), nullable=False),
        _Col("client_secret", Text()),
        _Col("owner_id", BigInteger(), references="users"),
        _Col("name", String(64), nullable=False),
        _Col("status", Integer(), nullable=False, default=0),
        _Col("allowed_origins", Text()),
        _Col("redirect_uris", Text(), nullable=False),
        _Col("homepage_url", String(200)),
        _Col("privacy_url", String(200)),
        _Col("terms_url", String(200)),
        _Col("scopes", StringList(), nullable=False),
        _Col("version", Integer(), nullable=False, default=0),
        _Col("date_added", _Stamp, nullable=False),
        _Col("requires_org_level_access", Boolean(), nullable=False, default=False, mapped=False),
    ),
    "grant": (
        _Col("user_id", BigInteger(), nullable=False, references="users"),
        _Col("application_id", BigInteger(), nullable=False, references="application"),
        _Col("code", String(64), nullable=False),
        _Col("expires_at", _Stamp, nullable=False),
        _Col("redirect_uri", String(GRANT_REDIRECT_URI_LENGTH), nullable=False),
        _Col("scope_list", StringList(), nullable=False),
        _Col("organization_id", BigInteger()),
        _Col("scopes", BigInteger(), nullable=False, mapped=False),  # bit field, no default
    ),
    "token": (
        _Col("user_id", BigInteger(), nullable=False, references="users"),
        _Col("application_id", BigInteger(), references="application"),
        _Col("token", String(71), nullable=False),
        _Col("hashed_token", String(128)),
        _Col("token_last_characters", String(4)),
        _Col("refresh_token", String(71)),
        _Col("hashed_refresh_token", String(128)),
        _Col("token_type", String(7)),  # Sentry's prefixes such as "sntrya_"
        _Col("scope_list", StringList(), nullable=False),
        _Col("expires_at", _Stamp),
        _Col("date_added", _Stamp, nullable=False),
        _Col("scopes", BigInteger(), nullable=False, mapped=False),  # bit field, no default
        _Col("scoping_organization_id", BigInteger(), mapped=False),
        _Col("name", String(255), mapped=False),
    ),
}
#: Columns with a unique constraint, per logical table.
SENTRY_UNIQUE: Final[Mapping[str, tuple[str, ...]]] = {
    "application": ("client_id",),
    "grant": (),
    "token": ("token", "hashed_token", "refresh_token", "hashed_refresh_token"),
}
#: Columns with a plain index, per logical table (Sentry indexes the grant code, not unique).
SENTRY_INDEXED: Final[Mapping[str, tuple[str, ...]]] = {
    "application": ("owner_id",),
    "grant": ("code", "application_id", "expires_at", "user_id"),
    "token": ("application_id", "user_id"),
}


def sentry_column(logical: str, name: str) -> SentryColumn:
    """The declaration of one legacy column (KeyError if the table has no such column)."""
    for col in SENTRY_COLUMNS[logical]:
        if col.name == name:
            return col
    raise KeyError(f"{logical}.{name}")


class LegacyFlavor(StrEnum):
    """How an install's ids and index names look."""

    FRESH = "fresh"  # identity ids, <table>_<column>_idx
    OLD = "old"  # bigserial ids, Django-style hashed names


def _digest(*parts: str) -> str:
    return hashlib.md5(":".join(parts).encode()).hexdigest()[:8]


def index_name(flavor: LegacyFlavor, table: str, column: str, kind: str) -> str:
    """The name of a unique constraint (``kind`` ``key``), index (``idx``) or LIKE index
    (``like``) on one column, as an install of ``flavor`` has it."""
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
        index_name(flavor, table, column, "like"),
        column,
        postgresql_ops={column: "varchar_pattern_ops"},
    ).ddl_if(dialect="postgresql")


def legacy_metadata(
    tables: TableNames, logical: tuple[str, ...], flavor: LegacyFlavor = LegacyFlavor.FRESH
) -> MetaData:
    """A MetaData holding the legacy shape of the given logical tables (and the users table)."""
    md = MetaData()
    if logical:
        Table(
            USERS_TABLE,
            md,
            _id(flavor),
            Column("username", String(128), nullable=False),
            Column("is_active", Boolean, nullable=False, server_default=true()),
        )
    targets = {
        "users": (USERS_TABLE, True),
        "application": (tables.application, "application" in logical),
    }
    for name in ("application", "grant", "token"):
        if name not in logical:
            continue
        physical = tables.physical(name)
        columns: list[Column[Any]] = []
        for col in SENTRY_COLUMNS[name]:
            fks: list[ForeignKey] = []
            if col.references is not None:
                target, present = targets[col.references]
                fks = _fk(flavor, physical, col.name, target, present)
            columns.append(col.column(*fks))
        varchar = {c.name for c in SENTRY_COLUMNS[name] if isinstance(c.type_, String)}
        keyed = (*SENTRY_UNIQUE[name], *SENTRY_INDEXED[name])
        Table(
            physical,
            md,
            _id(flavor),
            *columns,
            *(
                UniqueConstraint(c, name=index_name(flavor, physical, c, "key"))
                for c in SENTRY_UNIQUE[name]
            ),
            *(Index(index_name(flavor, physical, c, "idx"), c) for c in SENTRY_INDEXED[name]),
            # Django adds a varchar_pattern_ops index beside each indexed or unique varchar.
            *(_like(flavor, physical, c) for c in keyed if c in varchar),
        )
    return md


def user_rows(count: int) -> list[dict[str, object]]:
    """Rows for the users table: ids 1..count (what tests and the demo reference)."""
    return [{"id": i, "username": f"user{i}"} for i in range(1, count + 1)]
