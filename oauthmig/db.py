"""Engines for routed databases: timeouts, transactional DDL on SQLite, password hiding, locks."""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
import threading
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine, event, text
from sqlalchemy.engine import URL, Connection, Engine, make_url
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.pool import NullPool

from oauthmig.config import DatabaseConfig, Settings
from oauthmig.errors import ConfigError, LockBusyError, UnreachableError
from oauthmig.redact import describe_db_error, scrub_text, url_secrets

SQLITE_IMMEDIATE = "oauthmig_sqlite_immediate"


def for_writing(conn: Connection) -> Connection:
    """Mark a connection as a writer: on SQLite its transactions begin IMMEDIATE."""
    return conn.execution_options(**{SQLITE_IMMEDIATE: True})


def _require_url(db: DatabaseConfig) -> str:
    if db.url is None:
        raise ConfigError(db.url_error or f"databases.{db.name}: no URL")
    return db.url


def make_engine(db: DatabaseConfig, settings: Settings, *, create: bool = False) -> Engine:
    """An engine for one routed database, with timeouts applied on every new connection.

    A SQLite file that does not exist is an error unless ``create`` (only the demo creates
    databases; every other command must not leave an empty file behind a typo).

    SQLite: pysqlite's legacy transaction handling does not wrap DDL in a transaction, so we
    take over BEGIN ourselves (SQLAlchemy's documented recipe) to make each revision atomic.
    """
    url = make_url(_require_url(db))
    lock_ms = settings.migrate.lock_timeout_ms
    if url.get_backend_name() == "sqlite":
        if url.database and url.database != ":memory:":
            if create:
                Path(url.database).parent.mkdir(parents=True, exist_ok=True)
            elif not Path(url.database).is_file():
                raise UnreachableError(
                    f"database {db.name!r}: SQLite file {url.database} does not exist; fix the "
                    "URL, or run `oauthmig demo` to create the embedded demo databases"
                )
        engine = create_engine(url, poolclass=NullPool, connect_args={"timeout": lock_ms / 1000})

        @event.listens_for(engine, "connect")
        def _sqlite_connect(dbapi_conn: Any, _record: Any) -> None:
            dbapi_conn.isolation_level = None
            cur = dbapi_conn.cursor()
            cur.execute(f"PRAGMA busy_timeout = {int(lock_ms)}")
            cur.close()

        @event.listens_for(engine, "begin")
        def _sqlite_begin(conn: Connection) -> None:
            # Writers ask for IMMEDIATE so that busy_timeout applies when taking the write lock;
            # a deferred transaction that reads first fails at once with SQLITE_BUSY instead.
            immediate = conn.get_execution_options().get(SQLITE_IMMEDIATE, False)
            conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")

        return engine
    return create_engine(url, poolclass=NullPool, connect_args=dict(PG_CONNECT_ARGS))


# libpq connection options for every PostgreSQL connection. TCP keepalives (probe after 10 s
# idle, every 5 s, give up after 3 lost probes) and tcp_user_timeout (unacknowledged data for
# 30 s) detect a dead peer or a broken network path on an otherwise idle socket. A server
# process that is alive for the kernel but does not answer (stopped, hung) is only caught by a
# client-side deadline: see :class:`ClientDeadline`.
PG_CONNECT_ARGS: dict[str, Any] = {
    "connect_timeout": 5,
    "application_name": "oauthmig",
    "keepalives": 1,
    "keepalives_idle": 10,
    "keepalives_interval": 5,
    "keepalives_count": 3,
    "tcp_user_timeout": 30000,
}


class ClientDeadline:
    """Abandon a connection whose statements have not returned within ``seconds``.

    A watchdog thread shuts the connection's socket down when the deadline passes, so that a
    statement blocked on a server that does not answer (its process stopped or hung: keepalives
    are answered by the kernel, and the server's own ``statement_timeout`` cannot fire) fails
    at once with a lost-connection error; :attr:`fired` then tells the caller why. Use as a
    context manager around the statements to bound; SQLite connections are left alone.
    """

    def __init__(self, conn: Connection, seconds: float) -> None:
        self.seconds = seconds
        self.fired = False
        self._fd: int | None = None
        self._lock = threading.Lock()
        self._timer: threading.Timer | None = None
        if conn.dialect.name == "postgresql":
            raw = conn.connection.driver_connection
            fileno = getattr(raw, "fileno", None)
            if fileno is not None:
                self._fd = int(fileno())

    def __enter__(self) -> ClientDeadline:
        if self._fd is not None:
            self._timer = threading.Timer(self.seconds, self._fire)
            self._timer.daemon = True
            self._timer.start()
        return self

    def __exit__(self, *exc: object) -> None:
        with self._lock:
            if self._timer is not None:
                self._timer.cancel()
            self._fd = None  # the socket may be closed and its number reused after this

    def _fire(self) -> None:
        with self._lock:
            if self._fd is None:
                return
            self.fired = True
            with contextlib.suppress(OSError):
                sock = socket.socket(fileno=os.dup(self._fd))
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                finally:
                    sock.close()


def describe_error(exc: BaseException, db: DatabaseConfig) -> str:
    """A safe one-line description of a driver error (see :mod:`oauthmig.redact`): no row data,
    parameters, query text, or any secret of the database's URL."""
    return describe_db_error(exc, url_secrets(db.url))


def scrub_stored(text: str | None, url: URL | str | None) -> str | None:
    """An error text read back from a table (possibly written by an older version), made safe
    with the rules of :func:`oauthmig.redact.scrub_text`; ``url`` is the database's URL."""
    return None if text is None else scrub_text(text, url_secrets(url), limit=2000)


@contextlib.contextmanager
def connect(engine: Engine, db: DatabaseConfig) -> Iterator[Connection]:
    """Open a connection, turning connection failures into :class:`UnreachableError`."""
    try:
        conn = engine.connect()
    except (OperationalError, DBAPIError) as exc:
        raise UnreachableError(
            f"database {db.name!r} ({db.display_url}) is unreachable: {describe_error(exc, db)}; "
            "check the URL and that the server is running"
        ) from None
    try:
        yield conn
    finally:
        conn.close()


def lock_key(purpose: str) -> int:
    """A stable 63-bit advisory-lock key for ``purpose`` (e.g. ``upgrade``)."""
    return zlib.crc32(f"oauthmig:{purpose}".encode()) & 0x7FFFFFFF


@contextlib.contextmanager
def exclusive_run(conn: Connection, db: DatabaseConfig, purpose: str) -> Iterator[None]:
    """Hold a session-level lock for ``purpose`` on this database, or raise LockBusyError.

    PostgreSQL: ``pg_try_advisory_lock`` on the connection (released at unlock or disconnect,
    so a crashed run never leaves it behind). SQLite: ``flock`` on a sidecar file next to the
    database file, released by the OS when the process dies.
    """
    if conn.dialect.name == "postgresql":
        key = lock_key(purpose)
        got = conn.execute(text("SELECT pg_try_advisory_lock(:k)"), {"k": key}).scalar()
        conn.commit()
        if not got:
            raise LockBusyError(
                f"database {db.name!r}: another oauthmig {purpose} run holds the lock; "
                "wait for it to finish (see pg_stat_activity, application_name = 'oauthmig')"
            )
        try:
            yield
        finally:
            with contextlib.suppress(DBAPIError):
                conn.rollback()
                conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": key})
                conn.commit()
        return
    path = conn.engine.url.database
    if not path or path == ":memory:":
        yield
        return
    lock_path = f"{path}.{purpose}.lock"
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise LockBusyError(
                f"database {db.name!r}: another oauthmig {purpose} run holds the lock "
                f"({lock_path}); wait for it to finish"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        yield
    finally:
        os.close(fd)
