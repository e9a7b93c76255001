"""Shared fixtures: real SQLite and PostgreSQL databases, created per test and dropped after.

PostgreSQL tests never skip: if the server cannot be reached they fail, so CI cannot go green
without them. Override the server with ``OAUTHMIG_TEST_PG`` (a SQLAlchemy URL to an admin DB).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import Engine, make_url

from oauthmig.config import Settings, settings_from_mapping
from oauthmig.legacy import LegacyFlavor
from tests.forkserver import ForkServer
from tests.helpers import seed_legacy, write_config
from tests.helpers.databases import (
    PG_ADMIN_URL,
    DatabaseFactory,
    PgPool,
    SeededInstall,
    create_legacy,
    routed_config,
)


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


@pytest.fixture
def routed_settings(make_database: DatabaseFactory) -> Settings:
    """Two empty databases: ``control`` hosts application, grant, token; ``shard`` hosts token."""
    data = routed_config(make_database("control"), make_database("shard"))
    return settings_from_mapping(data, {}, "test")


@pytest.fixture
def seeded_install(make_database: DatabaseFactory, tmp_path: Path) -> SeededInstall:
    """Make an install to run commands on: two routed databases (``control``, ``shard``) with
    seeded legacy tables, and the path of its config file. Call it as
    ``seeded_install(rows=30, migrate=None, name="oauthmig")``; ``migrate`` replaces the
    ``[migrate]`` table, ``name`` names the config file (a second install needs another)."""

    def make(
        rows: int = 30, migrate: dict[str, object] | None = None, name: str = "oauthmig"
    ) -> tuple[Settings, str]:
        extra = {"migrate": migrate} if migrate is not None else {}
        data = routed_config(make_database("control"), make_database("shard"), **extra)
        settings = settings_from_mapping(data, {}, "test")
        create_legacy(settings)
        seed_legacy(settings, rows=rows)
        return settings, write_config(tmp_path / f"{name}.toml", data)

    return make


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
