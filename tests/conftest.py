"""Shared fixtures: real SQLite and PostgreSQL databases, created per test and dropped after.

PostgreSQL tests never skip: if the server cannot be reached they fail, so CI cannot go green
without them. Override the server with ``OAUTHMIG_TEST_PG`` (a SQLAlchemy URL to an admin DB).
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from sqlalchemy import create_engine, insert, text
from sqlalchemy.engine import Engine, make_url

from oauthmig.config import Settings, settings_from_mapping
from oauthmig.db import make_engine
from oauthmig.legacy import USERS_TABLE, LegacyFlavor, legacy_metadata, user_rows
from tests.forkserver import ForkServer

PG_ADMIN_URL = os.environ.get(
    "OAUTHMIG_TEST_PG", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
)
# Unique per test process: each pytest-xdist worker (gw0, gw1, ...) has its own databases.
RUN_ID = uuid.uuid4().hex[:8] + os.environ.get("PYTEST_XDIST_WORKER", "")


@pytest.fixture(scope="session")
def pg_admin() -> Iterator[Engine]:
    """An autocommit engine on the PostgreSQL server's admin database (fails if unreachable)."""
    engine = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
    except Exception as exc:
        pytest.fail(
            f"PostgreSQL at {make_url(PG_ADMIN_URL).render_as_string()} is required and "
            f"unreachable ({exc.__class__.__name__}); start it with "
            "`pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start`",
            pytrace=False,
        )
    yield engine
    engine.dispose()


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


@pytest.fixture(scope="session")
def pg_pool(pg_admin: Engine) -> Iterator[PgPool]:
    """The session's pool of PostgreSQL test databases (all dropped at the end)."""
    pool = PgPool(pg_admin)
    yield pool
    pool.close()


@pytest.fixture(params=["sqlite", "postgresql"])
def backend(request: pytest.FixtureRequest) -> str:
    """The database backend under test; every database test runs on both."""
    value: str = request.param
    return value


DatabaseFactory = Callable[[str], str]


@pytest.fixture
def make_database(
    backend: str, tmp_path: Path, request: pytest.FixtureRequest
) -> Iterator[DatabaseFactory]:
    """Factory: ``make_database("control")`` -> URL of an empty, uniquely named database
    (a new one, or one a previous test gave back and :class:`PgPool` reset)."""
    taken: list[str] = []
    pool: PgPool | None = request.getfixturevalue("pg_pool") if backend == "postgresql" else None

    def factory(name: str) -> str:
        if backend == "sqlite":
            return f"sqlite:///{tmp_path / f'{name}.sqlite3'}"
        assert pool is not None
        dbname = pool.acquire()
        taken.append(dbname)
        return make_url(PG_ADMIN_URL).set(database=dbname).render_as_string(hide_password=False)

    yield factory
    if pool is not None:
        for dbname in taken:
            pool.release(dbname)


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


@pytest.fixture
def routed_settings(make_database: DatabaseFactory) -> Settings:
    """Two empty databases: ``control`` hosts application, grant, token; ``shard`` hosts token."""
    data = routed_config(make_database("control"), make_database("shard"))
    return settings_from_mapping(data, {}, "test")


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


@pytest.fixture
def legacy_settings(routed_settings: Settings) -> Settings:
    """``routed_settings`` with the legacy tables created (empty)."""
    create_legacy(routed_settings)
    return routed_settings


@pytest.fixture
def old_install_settings(routed_settings: Settings) -> Settings:
    """``routed_settings`` with the legacy tables of a long-lived install: ``bigserial`` ids
    and Django's hashed index names."""
    create_legacy(routed_settings, LegacyFlavor.OLD)
    return routed_settings


@pytest.fixture(scope="session")
def forkserver(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ForkServer]:
    """Real CLI processes forked from one pre-imported server (:mod:`tests.forkserver`)."""
    server = ForkServer(tmp_path_factory.mktemp("forkserver"))
    yield server
    server.close()


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Tests marked ``slow`` run first (in their order), so that under pytest-xdist no worker
    starts a long test when the others are about to finish. Mark every test of a module with a
    module-scoped fixture alike, or that fixture is built twice."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)
