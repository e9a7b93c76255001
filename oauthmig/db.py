"""Engines for routed databases: opening and closing them (``url``, or ``direct_url`` for work
that needs a session), driver errors as one-line messages, per-transaction timeouts, retry
backoff, transactional DDL on SQLite, who blocks a lock. Run locks: :mod:`oauthmig.runlock`;
what kind of failure a driver error is: :mod:`oauthmig.failures`."""

from __future__ import annotations

import contextlib
import os
import random
import socket
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine, event, text
from sqlalchemy.engine import URL, Connection, Engine, make_url
from sqlalchemy.exc import DBAPIError, OperationalError, SQLAlchemyError
from sqlalchemy.pool import NullPool

from oauthmig.config import DatabaseConfig, Settings
from oauthmig.errors import ConfigError, DatabaseError, UnreachableError
from oauthmig.redact import describe_db_error, scrub_text, url_secrets

SQLITE_IMMEDIATE = "oauthmig_sqlite_immediate"

# SQLite lets one writer in at a time and its busy handler polls (with growing sleeps), so
# threads of one run (``--jobs``) that write to one file can starve each other past
# busy_timeout. Their IMMEDIATE transactions take turns on this gate first (first come,
# first served); other processes still meet busy_timeout. The gate opens once the COMMIT or
# ROLLBACK is done (the dialect's own call, wrapped): SQLAlchemy's commit event fires before
# it, and a next writer let in then would meet the lock for as long as the COMMIT's fsync takes.
_SQLITE_GATES: dict[str, threading.RLock] = {}
_SQLITE_GATES_LOCK = threading.Lock()
_GATED: dict[int, threading.RLock] = {}  # id of the sqlite3 connection -> the gate it holds


def _sqlite_gate(path: str) -> threading.RLock:
    key = os.path.realpath(path)
    with _SQLITE_GATES_LOCK:
        return _SQLITE_GATES.setdefault(key, threading.RLock())


def _raw(connection: Any) -> Any:
    """The sqlite3 connection behind a SQLAlchemy or pool-proxied connection."""
    return getattr(connection, "driver_connection", connection)


def _open_gate(raw: Any) -> None:
    gate = _GATED.pop(id(raw), None)
    if gate is not None:
        gate.release()


def _after(end: Callable[[Any], None]) -> Callable[[Any], None]:
    """The dialect's ``do_commit``/``do_rollback``, then the gate this connection holds."""

    def ended(dbapi_connection: Any) -> None:
        try:
            end(dbapi_connection)
        finally:
            _open_gate(_raw(dbapi_connection))

    return ended


def for_writing(conn: Connection) -> Connection:
    """Mark a connection as a writer: on SQLite its transactions begin IMMEDIATE."""
    return conn.execution_options(**{SQLITE_IMMEDIATE: True})


#: Execution option: ``(lock_timeout_ms, statement_timeout_ms)`` applied with ``SET LOCAL``
#: at the start of every transaction of the connection (see :func:`set_timeouts`).
TIMEOUTS = "oauthmig_timeouts"

_LOCAL_TIMEOUTS = (
    "SELECT set_config('lock_timeout', %s, true), set_config('statement_timeout', %s, true)"
)


def _require_url(db: DatabaseConfig, direct: bool = False) -> str:
    if direct and db.has_direct:
        if db.direct_url is None:
            raise ConfigError(db.direct_url_error or f"databases.{db.name}: no direct_url")
        return db.direct_url
    if db.url is None:
        raise ConfigError(db.url_error or f"databases.{db.name}: no URL")
    return db.url


def check_sqlite_writable(name: str, path: str, query: Mapping[str, Any]) -> None:
    """Before a command writes a SQLite file (and creates its lock file beside it): refuse,
    naming the database, a file opened read-only (``?mode=ro``), a file nobody may write (no
    write bit: read-only by intent, even for root, who could), one this user cannot write, or
    a directory that takes no journal file."""
    mode = query.get("mode")
    if mode == "ro" or (isinstance(mode, tuple) and "ro" in mode):
        raise UnreachableError(
            f"database {name!r}: SQLite file {path} is opened read-only (mode=ro in its "
            "URL); this command writes to it: drop mode=ro"
        )
    target = Path(path)
    try:
        bits = target.stat().st_mode
    except OSError:
        return  # the open that follows reports it
    folder = target.resolve().parent
    if not bits & 0o222 or not os.access(target, os.W_OK):
        raise UnreachableError(
            f"database {name!r}: SQLite file {path} is read-only; this command writes to "
            f"it: make it writable (chmod u+w {path}), or leave {name!r} out with -d"
        )
    if not os.access(folder, os.W_OK | os.X_OK):
        raise UnreachableError(
            f"database {name!r}: cannot write in {folder}, where SQLite keeps the journal "
            f"of {path}; make the directory writable, or leave {name!r} out with -d"
        )


def make_engine(
    db: DatabaseConfig, settings: Settings, *, create: bool = False, direct: bool = False
) -> Engine:
    """An engine for one routed database, with timeouts applied on every new connection.

    ``direct``: on ``direct_url`` when one is configured (work that needs a session: DDL, run
    locks), else on ``url``. Connections on ``url`` never prepare statements (psycopg's
    ``prepare_threshold=None``): a transaction pooler hands each transaction another server
    session, where a prepared statement is missing or already exists. Nothing oauthmig sets
    outlives its transaction: timeouts are ``SET LOCAL`` at the start of each transaction
    (:func:`set_timeouts`).

    A SQLite file that does not exist is an error unless ``create`` (only the demo creates
    databases; every other command must not leave an empty file behind a typo).

    SQLite: pysqlite's legacy transaction handling does not wrap DDL in a transaction, so we
    take over BEGIN ourselves (SQLAlchemy's documented recipe) to make each revision atomic.
    """
    url = make_url(_require_url(db, direct))
    lock_ms = settings.migrate.lock_timeout_ms
    if url.get_backend_name() == "sqlite":
        if url.database and url.database != ":memory:":
            if create:
                Path(url.database).parent.mkdir(parents=True, exist_ok=True)
            elif Path(url.database).is_dir():
                raise UnreachableError(
                    f"database {db.name!r}: {url.database} is a directory, not a SQLite file; "
                    "fix the URL (it names the database file)"
                )
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

        gate = _sqlite_gate(url.database) if url.database and url.database != ":memory:" else None
        # A thread that keeps its write transaction open does not hang the others forever:
        # past this wait they go on to SQLite's own busy_timeout.
        wait = max(lock_ms / 1000, 1.0) * 30

        @event.listens_for(engine, "begin")
        def _sqlite_begin(conn: Connection) -> None:
            # Writers ask for IMMEDIATE so that busy_timeout applies when taking the write lock;
            # a deferred transaction that reads first fails at once with SQLITE_BUSY instead.
            immediate = conn.get_execution_options().get(SQLITE_IMMEDIATE, False)
            raw = _raw(conn.connection)
            if immediate and gate is not None and gate.acquire(timeout=wait):
                _GATED[id(raw)] = gate
            try:
                conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")
            except BaseException:
                _open_gate(raw)
                raise

        # This engine's own dialect instance: the wrappers reach no other engine.
        dialect: Any = engine.dialect
        dialect.do_commit = _after(dialect.do_commit)
        dialect.do_rollback = _after(dialect.do_rollback)

        return engine
    args = dict(PG_CONNECT_ARGS)
    if not (direct and db.has_direct):
        args["prepare_threshold"] = None
    engine = create_engine(url, poolclass=NullPool, connect_args=args)

    @event.listens_for(engine, "begin")
    def _pg_begin(conn: Connection) -> None:
        limits = conn.get_execution_options().get(TIMEOUTS)
        if limits is not None:
            conn.exec_driver_sql(_LOCAL_TIMEOUTS, (f"{limits[0]}ms", f"{limits[1]}ms"))

    return engine


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
    return describe_db_error(exc, url_secrets(db.url) + url_secrets(db.direct_url))


def scrub_stored(text: str | None, url: URL | str | None) -> str | None:
    """An error text read back from a table (possibly written by an older version), made safe
    with the rules of :func:`oauthmig.redact.scrub_text`; ``url`` is the database's URL."""
    return None if text is None else scrub_text(text, url_secrets(url), limit=2000)


def db_error_message(exc: BaseException, db: DatabaseConfig, doing: str | None = None) -> str:
    """``database 'NAME': [doing: ]<safe description of exc>``: how a driver error reads in
    every message, log line and stored error (see :func:`describe_error`)."""
    what = f"{doing}: " if doing else ""
    return f"database {db.name!r}: {what}{describe_error(exc, db)}"


@contextlib.contextmanager
def map_db_errors(
    db: DatabaseConfig,
    doing: str | None = None,
    *,
    also: tuple[type[BaseException], ...] = (),
) -> Iterator[None]:
    """Turn a driver error raised inside the block into :class:`DatabaseError` with the one-line
    :func:`db_error_message` (``doing`` says what failed, e.g. ``reading applications failed``).

    SQLAlchemy errors are mapped, plus the exception types in ``also`` (e.g. ``psycopg.Error``
    from code that talks to the driver directly); oauthmig's own errors pass through unchanged.
    """
    caught: tuple[type[BaseException], ...] = (SQLAlchemyError, *also)
    try:
        yield
    except caught as exc:
        raise DatabaseError(db_error_message(exc, db, doing)) from None


@contextlib.contextmanager
def connect(engine: Engine, db: DatabaseConfig) -> Iterator[Connection]:
    """Open a connection, turning connection failures into :class:`UnreachableError`."""
    try:
        conn = engine.connect()
    except (OperationalError, DBAPIError) as exc:
        shown = db.display_url
        if db.has_direct and engine.url.render_as_string(hide_password=False) == db.direct_url:
            shown = f"direct_url {db.direct_display_url}"
        raise UnreachableError(
            f"database {db.name!r} ({shown}) is unreachable: {describe_error(exc, db)}; "
            "check the URL and that the server is running"
        ) from None
    try:
        yield conn
    finally:
        conn.close()


@contextlib.contextmanager
def open_engine(
    settings: Settings, db: DatabaseConfig, *, create: bool = False, direct: bool = False
) -> Iterator[Engine]:
    """An engine of one routed database (:func:`make_engine`), disposed on exit; for code that
    opens connections itself (several, or again after losing one)."""
    engine = make_engine(db, settings, create=create, direct=direct)
    try:
        yield engine
    finally:
        engine.dispose()
        forget_dialect(engine)


def forget_dialect(engine: Engine) -> None:
    """Drop what SQLAlchemy's dialect classes cache per dialect object for a disposed engine.

    Every engine has a dialect object of its own, and the PostgreSQL dialect's reflection
    query builders are ``functools.lru_cache`` methods keyed by it (128 entries): a run over
    many databases would keep up to 128 dead dialects and their compiled statements alive
    (docs/benchmarks.md, "A fleet of 64 databases"). Clearing costs the next database a
    rebuild of a few statements."""
    for cls in type(engine.dialect).__mro__:
        for member in vars(cls).values():
            clear = getattr(member, "cache_clear", None)
            if callable(clear):
                clear()


@contextlib.contextmanager
def open_database(
    settings: Settings, db: DatabaseConfig, *, create: bool = False, direct: bool = False
) -> Iterator[Connection]:
    """One connection to one routed database, on an engine of its own that is disposed on exit.

    A database that cannot be reached raises :class:`UnreachableError` naming it; a SQLite file
    that does not exist is refused unless ``create`` (see :func:`make_engine`). Errors of the
    statements run inside are not translated here: wrap the block in :func:`map_db_errors`.
    """
    with (
        open_engine(settings, db, create=create, direct=direct) as engine,
        connect(engine, db) as conn,
    ):
        yield conn


def timeout_statements(
    lock_timeout_ms: float, statement_timeout_ms: float, *, local: bool = True
) -> tuple[str, str]:
    """The PostgreSQL ``SET LOCAL lock_timeout`` and ``statement_timeout`` statements (whole
    milliseconds), as written into an offline script; ``local=False``: session-level ``SET``,
    only for statements that cannot run in a transaction (``CREATE INDEX CONCURRENTLY``), on a
    connection that keeps its session (see :func:`reset_statements`)."""
    scope = "SET LOCAL" if local else "SET"
    return (
        f"{scope} lock_timeout = '{int(lock_timeout_ms)}ms'",
        f"{scope} statement_timeout = '{int(statement_timeout_ms)}ms'",
    )


def reset_statements() -> tuple[str, str]:
    """``RESET`` of what session-level :func:`timeout_statements` set."""
    return ("RESET lock_timeout", "RESET statement_timeout")


def set_timeouts(
    conn: Connection, lock_timeout_ms: float, statement_timeout_ms: float, *, local: bool = False
) -> None:
    """Bound every later transaction of a PostgreSQL connection (``local``: only the current
    one) with ``SET LOCAL lock_timeout`` and ``statement_timeout``, applied at the start of each
    transaction and in the open one, if any: nothing outlives its transaction, so a pooled
    server session goes back to the pool as it came. SQLite connections have their
    ``busy_timeout`` from :func:`make_engine` and are left alone."""
    if conn.dialect.name != "postgresql":
        return
    limits = (int(lock_timeout_ms), int(statement_timeout_ms))
    if not local:
        conn.execution_options(**{TIMEOUTS: limits})
        if not conn.in_transaction():
            return  # the next transaction sets them as it begins
    conn.exec_driver_sql(_LOCAL_TIMEOUTS, (f"{limits[0]}ms", f"{limits[1]}ms"))


def backoff_delay(attempt: int, *, base: float, cap: float) -> float:
    """Seconds to wait before retry ``attempt`` (0 first): ``base * 2**attempt``, at most
    ``cap``, times a random factor in [0.5, 1] so that concurrent retries spread out."""
    return min(cap, base * 2.0**attempt) * random.uniform(0.5, 1.0)


_AGE = "EXTRACT(EPOCH FROM now() - COALESCE(a.xact_start, a.query_start))::int AS age"


def lock_blockers(
    conn: Connection, physical_tables: Sequence[str], *, id_range: tuple[int, int] | None = None
) -> str:
    """Who holds locks on the tables (PostgreSQL): pid, state, lock mode, transaction age.

    With ``id_range`` ``(lo, hi)`` on one table, the sessions holding row locks on ``id > lo
    AND id <= hi`` come first: a row locked for update carries its locker's transaction id in
    ``xmax``; a shared row lock (a multixact) falls back to the table-level report. Never
    includes query text (it may hold secrets). Errors while looking are swallowed: this only
    adds detail to an error being reported.
    """
    if conn.dialect.name != "postgresql":
        return "another connection is writing to the SQLite database"
    parts: list[str] = []
    if id_range is not None:
        (physical,) = physical_tables
        with contextlib.suppress(SQLAlchemyError):
            rows = conn.execute(
                text(
                    f"SELECT a.pid, a.state, {_AGE} "
                    "FROM pg_stat_activity a WHERE a.pid <> pg_backend_pid() "
                    "AND a.backend_xid IS NOT NULL AND a.backend_xid::text IN "
                    f"(SELECT xmax::text FROM {physical} WHERE id > :lo AND id <= :hi)"
                ),
                {"lo": id_range[0], "hi": id_range[1]},
            ).all()
            conn.rollback()
            parts = [f"locked by pid {r.pid} ({r.state}, transaction open {r.age}s)" for r in rows]
    if not parts:
        with contextlib.suppress(SQLAlchemyError):
            rows = conn.execute(
                text(
                    f"SELECT c.relname, a.pid, a.state, l.mode, {_AGE} "
                    "FROM pg_locks l JOIN pg_class c ON c.oid = l.relation "
                    "JOIN pg_stat_activity a ON a.pid = l.pid "
                    "WHERE l.granted AND l.pid <> pg_backend_pid() AND c.relname = ANY(:names) "
                    "ORDER BY age DESC NULLS LAST LIMIT 5"
                ),
                {"names": list(physical_tables)},
            ).all()
            conn.rollback()
            parts = [
                f"{r.relname} locked by pid {r.pid} ({r.state}, {r.mode}, "
                f"transaction open {r.age}s)"
                for r in rows
            ]
    return "; ".join(parts) or "a conflicting lock was held and has since been released"
