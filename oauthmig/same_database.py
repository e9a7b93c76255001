"""Which physical database a configured name points at, so that one database is never used
under two names (they would share one version table, one revision log and one lock namespace).

PostgreSQL: the cluster's ``system_identifier`` (``pg_control_system()``) plus the database
OID; if the role may not call ``pg_control_system()``, the server address and port stand in
for the cluster. SQLite: the file's device and inode (so a symlink or another spelling of the
path is the same file), or its resolved path while it does not exist yet.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence

from sqlalchemy import text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import SQLAlchemyError

from oauthmig.config import DatabaseConfig, Settings
from oauthmig.db import map_db_errors, open_database
from oauthmig.errors import ConfigError, DatabaseError, OauthmigError


def database_identity(settings: Settings, db: DatabaseConfig) -> str | None:
    """A string equal for two names exactly when they reach the same database (None: unknown)."""
    if db.url is None:
        raise ConfigError(db.url_error or f"databases.{db.name}: no URL")
    url = make_url(db.url)
    if url.get_backend_name() == "sqlite":
        if not url.database or url.database == ":memory:":
            return None  # every connection to :memory: is a database of its own
        path = os.path.realpath(url.database)
        with contextlib.suppress(OSError):
            st = os.stat(path)
            return f"sqlite:{st.st_dev}:{st.st_ino}"
        return f"sqlite:{path}"
    with map_db_errors(db), open_database(settings, db) as conn:
        oid = conn.execute(
            text("SELECT oid FROM pg_database WHERE datname = current_database()")
        ).scalar_one()
        try:
            with conn.begin_nested():
                cluster = str(
                    conn.execute(
                        text("SELECT system_identifier FROM pg_control_system()")
                    ).scalar_one()
                )
        except SQLAlchemyError:
            row = conn.execute(text("SELECT inet_server_addr(), inet_server_port()")).one()
            cluster = f"{row[0]}:{row[1]}"
        conn.rollback()
        return f"postgresql:{cluster}:{oid}"


def check_distinct(settings: Settings, names: Sequence[str] | None = None) -> None:
    """Raise :class:`DatabaseError` if two configured names reach the same database.

    Databases that cannot be reached are skipped here (the command reports them itself).
    """
    chosen = list(settings.database_names() if names is None else names)
    if len(chosen) < 2:
        return
    seen: dict[str, str] = {}
    for name in chosen:
        try:
            identity = database_identity(settings, settings.databases[name])
        except OauthmigError:
            # Unreachable or misconfigured: the command itself reports it, in its own words.
            continue
        if identity is None:
            continue
        if identity in seen:
            raise DatabaseError(
                f"databases {seen[identity]!r} and {name!r} are the same database; they would "
                "share one version table and one lock, so give each configured name its own "
                "database (or remove one from the config)"
            )
        seen[identity] = name
