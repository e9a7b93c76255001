"""The demo's compatibility step: the provider's unchanged code writes after finalize.

Finalize made the metadata columns NOT NULL, which is where a provider whose code never
learned them used to break. :func:`legacy_writes` inserts, on each database hosting the
tables, one application and one refreshable token naming only the legacy columns (what
Sentry's code inserts), then reads back what the compatibility layer filled.
"""

from __future__ import annotations

import secrets
import uuid
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import Connection, column, insert, select, table

from oauthmig.columns import StringList
from oauthmig.config import Settings
from oauthmig.db import map_db_errors, open_database
from oauthmig.legacy import legacy_metadata

__all__ = ["LegacyWrite", "legacy_writes"]

_REDIRECT = "https://legacy.example.com/oauth/callback"


@dataclass(frozen=True, slots=True)
class LegacyWrite:
    """The rows the unchanged code created on one database and what the layer filled in them
    (``None``: the table is not on this database). No secret is kept."""

    database: str
    application_id: int | None
    token_id: int | None
    token_endpoint_auth_method: str | None = None
    grant_types: tuple[str, ...] | None = None
    response_types: tuple[str, ...] | None = None
    application_type: str | None = None
    token_family_id: uuid.UUID | None = None


def _insert(conn: Connection, target: Any, values: dict[str, Any]) -> int:
    key: Any = conn.execute(insert(target).values(values)).inserted_primary_key
    return int(key[0])


def _write(conn: Connection, settings: Settings, database: str) -> LegacyWrite:
    t = settings.tables
    routed = settings.tables_on(database)
    md = legacy_metadata(t, routed)
    now = datetime.now(UTC)
    app_id = token_id = None
    with conn.begin():
        if "application" in routed:
            app_id = _insert(
                conn,
                md.tables[t.application],
                {
                    "client_id": secrets.token_hex(16),
                    "client_secret": secrets.token_hex(32),  # confidential
                    "owner_id": 1,
                    "name": "created by the provider's unchanged code",
                    "status": 0,
                    "redirect_uris": _REDIRECT,
                    "scopes": ["project:read"],
                    "version": 0,
                    "date_added": now,
                    "requires_org_level_access": False,
                },
            )
        if "token" in routed:
            access = secrets.token_hex(32)
            token_id = _insert(
                conn,
                md.tables[t.token],
                {
                    "user_id": 1,
                    "application_id": app_id,
                    "token": access,
                    "token_last_characters": access[-4:],
                    "refresh_token": secrets.token_hex(32),
                    "scope_list": ["project:read"],
                    "expires_at": now + timedelta(hours=8),
                    "date_added": now,
                    "scopes": 0,
                },
            )
    # Read after the commit: SQLite's layer is an AFTER trigger that updates the row.
    write = LegacyWrite(database, app_id, token_id)
    with conn.begin():
        if app_id is not None:
            a = table(
                t.application,
                column("id"),
                column("token_endpoint_auth_method"),
                column("grant_types", StringList()),
                column("response_types", StringList()),
                column("application_type"),
            )
            row = conn.execute(select(a).where(a.c.id == app_id)).one()
            write = replace(
                write,
                token_endpoint_auth_method=row.token_endpoint_auth_method,
                grant_types=None if row.grant_types is None else tuple(row.grant_types),
                response_types=None if row.response_types is None else tuple(row.response_types),
                application_type=row.application_type,
            )
        if token_id is not None:
            k = table(t.token, column("id"), column("token_family_id"))
            family = conn.execute(select(k.c.token_family_id).where(k.c.id == token_id)).scalar()
            if family is not None:
                write = replace(write, token_family_id=uuid.UUID(str(family)))
    return write


def legacy_writes(settings: Settings) -> tuple[LegacyWrite, ...]:
    """On each database hosting the application or token table: one legacy application and one
    legacy refreshable token, as the provider's unchanged code writes them, and what the
    compatibility layer filled. A failed write raises :class:`~oauthmig.errors.DatabaseError`
    naming the database (the outage the layer exists to prevent)."""
    out: list[LegacyWrite] = []
    for name in settings.database_names():
        if not {"application", "token"} & set(settings.tables_on(name)):
            continue
        db = settings.databases[name]
        with (
            map_db_errors(db, "the provider's unchanged code could not write"),
            open_database(settings, db) as conn,
        ):
            out.append(_write(conn, settings, name))
    return tuple(out)
