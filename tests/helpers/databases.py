"""The test databases: the PostgreSQL pool behind ``make_database``, the routed config the
tests share, and the legacy tables in real-install shape. The fixtures that use them are in
``tests/conftest.py``.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from sqlalchemy import create_engine, insert, text
from sqlalchemy.engine import Engine, make_url

from oauthmig.config import Settings
from oauthmig.db import make_engine
from oauthmig.legacy import USERS_TABLE, LegacyFlavor, legacy_metadata, user_rows

PG_ADMIN_URL = os.environ.get(
    "OAUTHMIG_TEST_PG", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
)
# Unique per test process: each pytest-xdist worker (gw0, gw1, ...) has its own databases.
RUN_ID = uuid.uuid4().hex[:8] + os.environ.get("PYTEST_XDIST_WORKER", "")


def _drop_pg(admin: Engine, name: str) -> None:
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


class PgPool:
    """Uniquely named test databases, reused between tests and dropped when the session ends.

    ``DROP DATABASE`` costs a checkpoint (about 2 s here) and ``CREATE DATABASE`` copies a
    template; a test gets a database that a previous test has given back and that was reset to
    the state of a new one: its sessions ended, its per-database settings reset, every schema
    but the system ones dropped and ``public`` recreated. A database that cannot be reset is
    dropped instead.
    """

    def __init__(self, admin: Engine) -> None:
        self.admin = admin
        self.free: list[str] = []
        self.created: list[str] = []

    def acquire(self) -> str:
        if self.free:
            return self.free.pop()
        name = f"oauthmig_t_{RUN_ID}_{len(self.created):03d}"
        with self.admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
        self.created.append(name)
        return name

    def release(self, name: str) -> None:
        try:
            self._reset(name)
        except Exception:
            _drop_pg(self.admin, name)
            self.created.remove(name)
            return
        self.free.append(name)

    def _reset(self, name: str) -> None:
        with self.admin.connect() as conn:
            conn.execute(
                text(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                    "WHERE datname = :n AND pid <> pg_backend_pid()"
                ),
                {"n": name},
            )
            conn.execute(text(f'ALTER DATABASE "{name}" RESET ALL'))
        engine = create_engine(
            make_url(PG_ADMIN_URL).set(database=name), isolation_level="AUTOCOMMIT"
        )
        try:
            with engine.connect() as conn:
                conn.execute(text("SET lock_timeout = '10s'"))
                for (trigger,) in conn.execute(text("SELECT evtname FROM pg_event_trigger")):
                    conn.execute(text(f'DROP EVENT TRIGGER "{trigger}"'))
                schemas = conn.execute(
                    text(
                        "SELECT nspname FROM pg_namespace WHERE nspname NOT LIKE 'pg\\_%' "
                        "AND nspname <> 'information_schema'"
                    )
                ).scalars()
                for schema in list(schemas):
                    conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
                conn.execute(text("CREATE SCHEMA public AUTHORIZATION pg_database_owner"))
                conn.execute(text("GRANT USAGE ON SCHEMA public TO PUBLIC"))
        finally:
            engine.dispose()

    def close(self) -> None:
        # Each DROP DATABASE waits for a checkpoint; dropped together, they share one.
        with ThreadPoolExecutor(max_workers=8) as drops:
            list(drops.map(lambda name: _drop_pg(self.admin, name), self.created))


DatabaseFactory = Callable[[str], str]
#: The ``seeded_install`` fixture: ``(rows, migrate, name) -> (settings, config path)``.
SeededInstall = Callable[..., tuple[Settings, str]]


def routed_config(control_url: str, shard_url: str, **extra: object) -> dict[str, object]:
    """Config mapping for two routed databases with different table sets."""
    data: dict[str, object] = {
        "databases": {"control": {"url": control_url}, "shard": {"url": shard_url}},
        "routing": {
            "application": ["control"],
            "grant": ["control"],
            "token": ["control", "shard"],
        },
        "migrate": {"lock_timeout": "500ms", "lock_retries": 2, "statement_timeout": "30s"},
    }
    data.update(extra)
    # Latency pacing (on by default on PostgreSQL) makes a backfill's speed follow the load on
    # the machine, which the suite does not control: tests get the fixed duty cycle unless they
    # ask for pacing (tests/test_pacing.py does).
    given = data.get("backfill")
    backfill: dict[str, object] = dict(given) if isinstance(given, dict) else {}
    backfill.setdefault("max_latency_ratio", 0)
    data["backfill"] = backfill
    return data


#: Users 1..TEST_USERS exist on every database with legacy tables (their FKs reference them).
TEST_USERS = 1000


def create_legacy(settings: Settings, flavor: LegacyFlavor = LegacyFlavor.FRESH) -> None:
    """Create the Sentry-shaped legacy tables on every database, as routed, with the users
    table (users 1..TEST_USERS) that their foreign keys reference."""
    for name in settings.database_names():
        engine = make_engine(settings.databases[name], settings, create=True)
        try:
            md = legacy_metadata(settings.tables, settings.tables_on(name), flavor)
            md.create_all(engine)
            if USERS_TABLE in md.tables:
                with engine.begin() as conn:
                    conn.execute(insert(md.tables[USERS_TABLE]), user_rows(TEST_USERS))
                    if conn.dialect.name == "postgresql":
                        conn.execute(
                            text(
                                f"SELECT setval(pg_get_serial_sequence('{USERS_TABLE}', 'id'), :n)"
                            ),
                            {"n": TEST_USERS},
                        )
        finally:
            engine.dispose()
