"""Run locks: one oauthmig run per purpose (``upgrade``, ``backfill JOB``, ``prune-grants``)
and database, and the check that a run still holds its lock.

PostgreSQL: a session advisory lock (``pg_try_advisory_lock``) on a connection that keeps its
session: ``direct_url`` when the database has one, never a connection through a transaction
pooler (a lock taken there stays with a pooled server session after oauthmig exits). It is
released at unlock or when its connection closes, so a killed run never leaves it behind. Whoever
holds it is visible to every session of the server in ``pg_locks``: :meth:`RunLock.holder`,
:meth:`RunLock.alive` and :meth:`RunLock.verify` work on any connection, pooled ones included.

SQLite: ``flock`` on a sidecar file ``<database file>.<purpose>.lock``, released by the OS when
the process dies.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import zlib
from collections.abc import Iterator
from dataclasses import dataclass

from sqlalchemy import text
from sqlalchemy.engine import Connection
from sqlalchemy.exc import DBAPIError

from oauthmig.config import DatabaseConfig
from oauthmig.db import check_sqlite_writable
from oauthmig.errors import LockBusyError

# An advisory lock on a bigint key is stored with classid = its high 32 bits (0 here),
# objid = its low 32 bits and objsubid = 1.
_HELD_BY = (
    "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND granted "
    "AND database = (SELECT oid FROM pg_database WHERE datname = current_database()) "
    "AND classid = 0 AND objid = :k AND objsubid = 1"
)


def lock_key(purpose: str) -> int:
    """A stable 63-bit advisory-lock key for ``purpose`` (e.g. ``upgrade``)."""
    return zlib.crc32(f"oauthmig:{purpose}".encode()) & 0x7FFFFFFF


def transaction_lock(conn: Connection, purpose: str) -> None:
    """PostgreSQL: wait for the transaction-scoped advisory lock of ``purpose`` (released at
    commit or rollback, so it is safe through a pooler): serializes short critical sections
    such as creating the backfill tables. No-op on SQLite (writers are serialized)."""
    if conn.dialect.name == "postgresql":
        conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": lock_key(purpose)})


@dataclass(frozen=True, slots=True)
class Held:
    """Another runner holds a database's run lock: this run skips that database (not an
    error: overlapping runners share a fleet, each database is done by whoever holds it)."""

    database: str
    purpose: str  # upgrade, backfill JOB
    pid: int | None  # the holder: PostgreSQL backend pid, or the SQLite runner's process id

    def describe(self) -> str:
        """``skipped: held by another runner (pid N)``."""
        who = f" (pid {self.pid})" if self.pid is not None else ""
        return f"skipped: held by another runner{who}"


class RunLock:
    """The run lock of ``purpose`` on database ``database`` (its name, for messages)."""

    def __init__(self, purpose: str, database: str) -> None:
        self.purpose = purpose
        self.database = database
        self.key = lock_key(purpose)
        self.holder_pid: int | None = None  # PostgreSQL: the backend of the holding session
        self._conn: Connection | None = None
        self._fd: int | None = None

    # ---------------------------------------------------------------- taking and leaving

    def try_acquire(self, conn: Connection) -> bool:
        """Take the lock on ``conn`` if it is free (committing ``conn``'s open transaction);
        False if another run holds it."""
        if conn.dialect.name == "postgresql":
            got, pid = conn.execute(
                text("SELECT pg_try_advisory_lock(:k), pg_backend_pid()"), {"k": self.key}
            ).one()
            conn.commit()
            if got:
                self.holder_pid, self._conn = int(pid), conn
            return bool(got)
        path = self._sidecar(conn)
        if path is None:
            return True
        # Before the sidecar exists: a read-only database must not leave a lock file behind.
        check_sqlite_writable(self.database, str(conn.engine.url.database), conn.engine.url.query)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self._fd = fd
        return True

    def acquire(self, conn: Connection) -> None:
        """:meth:`try_acquire`, or :class:`LockBusyError` saying who to wait for."""
        if not self.try_acquire(conn):
            raise LockBusyError(self.busy_message(conn))

    def release(self) -> None:
        """Give the lock back (best effort: a lost connection has released it already)."""
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(DBAPIError):
                conn.rollback()
                conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": self.key})
                conn.commit()
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)

    @contextlib.contextmanager
    def hold(self, conn: Connection) -> Iterator[RunLock]:
        """Hold the lock on ``conn`` for the block, or raise :class:`LockBusyError`."""
        self.acquire(conn)
        try:
            yield self
        finally:
            self.release()

    def busy_message(self, conn: Connection) -> str:
        """``another oauthmig <purpose> run holds the lock; wait for it to finish``."""
        if conn.dialect.name == "postgresql":
            return (
                f"database {self.database!r}: another oauthmig {self.purpose} run holds the lock; "
                "wait for it to finish (see pg_stat_activity, application_name = 'oauthmig')"
            )
        return (
            f"database {self.database!r}: another oauthmig {self.purpose} run holds the lock "
            f"({self._sidecar(conn)}); wait for it to finish"
        )

    # ---------------------------------------------------------------- who holds it

    def holder(self, conn: Connection) -> int | None:
        """PostgreSQL: the backend pid holding the lock on this database, if any (ends the
        implicit transaction the read began)."""
        value = conn.execute(text(f"{_HELD_BY} LIMIT 1"), {"k": self.key}).scalar()
        if conn.in_transaction():
            conn.rollback()
        return None if value is None else int(value)

    def alive(self, conn: Connection) -> bool:
        """Whether some run holds the lock right now (read on any connection)."""
        if conn.dialect.name == "postgresql":
            return self.holder(conn) is not None
        path = self._sidecar(conn)
        if path is None or not os.path.exists(path):
            return False
        fd = os.open(path, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        finally:
            os.close(fd)  # also drops the shared lock, if we got it
        return False

    def held_elsewhere(self, conn: Connection) -> Held | None:
        """Whether another run holds the lock right now, and who (read on any connection)."""
        if conn.dialect.name == "postgresql":
            pid = self.holder(conn)
            return None if pid is None else Held(self.database, self.purpose, pid)
        if not self.alive(conn):
            return None
        path = self._sidecar(conn)
        try:
            with open(str(path), encoding="ascii") as sidecar:
                return Held(self.database, self.purpose, int(sidecar.read().strip()))
        except (OSError, ValueError):
            return Held(self.database, self.purpose, None)

    def verify(self, conn: Connection) -> bool:
        """Inside the caller's transaction on ``conn`` (any connection of the database, pooled
        or not): whether this run still holds the lock. On the holding session itself this
        takes the transaction-scoped lock too (it succeeds only for the holder); elsewhere it
        reads ``pg_locks`` for the holding backend. SQLite: the flock is this process's."""
        if conn.dialect.name != "postgresql":
            return True
        if self.holder_pid is None:
            return False
        held = conn.execute(
            text(
                "SELECT CASE WHEN pg_backend_pid() = :p THEN pg_try_advisory_xact_lock(:k) "
                f"ELSE EXISTS ({_HELD_BY} AND pid = :p) END"
            ),
            {"k": self.key, "p": self.holder_pid},
        ).scalar()
        return bool(held)

    def _sidecar(self, conn: Connection) -> str | None:
        path = conn.engine.url.database
        if not path or path == ":memory:":
            return None
        return f"{path}.{self.purpose}.lock"


@contextlib.contextmanager
def exclusive_run(conn: Connection, db: DatabaseConfig, purpose: str) -> Iterator[RunLock]:
    """Hold the run lock of ``purpose`` on ``conn`` for the block (:meth:`RunLock.hold`)."""
    with RunLock(purpose, db.name).hold(conn) as lock:
        yield lock
