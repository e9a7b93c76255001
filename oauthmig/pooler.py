"""Whether a database URL goes through a transaction pooler (PgBouncer in ``transaction`` or
``statement`` mode), where each transaction may run on another server session.

Two looks, both read-only and leaving nothing behind:

1. Is anything between us and the server? The server's view of our client address and port
   (``pg_stat_activity``) is compared with our socket's own address: equal means a direct
   connection, and the answer is no at once.
2. Does the server session change between transactions? Client A reads its backend pid in a
   transaction and ends it; client B opens a transaction and reads its pid, keeping the
   transaction open; A reads its pid again. A session pooler (and a direct connection) pins
   each client to one server session, so B never sees A's pid and A's never changes; a
   transaction pooler hands A's released session to the next transaction (PgBouncer reuses
   the most recently released one first), so one of the two shows. Three rounds.

A proxy that passes whole sessions through (a session pooler, a port forward) is not a
transaction pooler: session work is safe there.
"""

from __future__ import annotations

import contextlib
import os
import socket

from sqlalchemy import text
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import SQLAlchemyError

from oauthmig.config import DatabaseConfig, Settings
from oauthmig.db import ClientDeadline, make_engine
from oauthmig.errors import PoolerError

_ROUNDS = 3
_WAIT_SECONDS = 30.0  # a busy pool makes A wait for a server session; past this, say pooled
_verdicts: dict[str, bool] = {}  # per URL, for this process: a pooler does not come and go


def _local_address(conn: Connection) -> tuple[str, int] | None:
    raw = conn.connection.driver_connection
    fileno = getattr(raw, "fileno", None)
    if fileno is None:
        return None
    sock = socket.socket(fileno=os.dup(int(fileno())))
    try:
        name = sock.getsockname()
    finally:
        sock.close()
    if not isinstance(name, tuple):
        return None  # a Unix-domain socket: no address to compare
    return str(name[0]), int(name[1])


def direct_peer(conn: Connection) -> bool:
    """Whether the server sees this connection's own socket as its client (nothing between)."""
    mine = _local_address(conn)
    row = conn.execute(
        text(
            "SELECT host(client_addr) AS addr, client_port AS port FROM pg_stat_activity "
            "WHERE pid = pg_backend_pid()"
        )
    ).one_or_none()
    conn.rollback()
    if mine is None or row is None or row.port is None or row.port < 0:
        return False
    addr = mine[0].removeprefix("::ffff:")
    return int(row.port) == mine[1] and str(row.addr).removeprefix("::ffff:") == addr


def _pid(conn: Connection) -> int:
    return int(conn.execute(text("SELECT pg_backend_pid()")).scalar_one())


def sessions_switch(engine: Engine) -> bool:
    """Whether two clients of ``engine`` see server sessions change between transactions."""
    with engine.connect() as a, engine.connect() as b:
        for _ in range(_ROUNDS):
            first = _pid(a)
            a.commit()
            other = _pid(b)  # B's transaction stays open: it pins its server session
            if other == first:
                b.commit()
                return True  # (also with a pool of one session, where A would now wait)
            with ClientDeadline(a, _WAIT_SECONDS):
                again = _pid(a)
            a.commit()
            b.commit()
            if again != first:
                return True
    return False


def transaction_pooled(engine: Engine) -> bool:
    """Whether ``engine``'s URL goes through a transaction pooler (see the module docstring).
    A pooler in ``statement`` mode, which refuses transactions of several statements, counts."""
    key = engine.url.render_as_string(hide_password=False)
    if key not in _verdicts:
        with engine.connect() as conn:
            direct = direct_peer(conn)
        verdict = False
        if not direct:
            try:
                verdict = sessions_switch(engine)
            except SQLAlchemyError:
                verdict = True
        _verdicts[key] = verdict
    return _verdicts[key]


def require_session(settings: Settings, db: DatabaseConfig, command: str) -> None:
    """Refuse (:class:`PoolerError`, nothing written) when ``command`` on PostgreSQL database
    ``db`` would run its session work through a transaction pooler: ``direct_url`` when set,
    else ``url``. Connection failures are left to the command's own connect."""
    if db.dialect != "postgresql":
        return
    with contextlib.suppress(SQLAlchemyError):
        engine = make_engine(db, settings, direct=True)
        try:
            pooled = transaction_pooled(engine)
        finally:
            engine.dispose()
        if not pooled:
            return
        if db.has_direct:
            raise PoolerError(
                f"database {db.name!r}: direct_url ({db.direct_display_url}) goes through a "
                f"transaction pooler, and {command} needs a session; point [databases.{db.name}] "
                "direct_url at the server itself (or a session-mode pooler); nothing was written"
            )
        raise PoolerError(
            f"database {db.name!r}: url ({db.display_url}) goes through a transaction pooler, "
            f"and {command} needs a session; set [databases.{db.name}] direct_url (or "
            "direct_url_env) to a connection that bypasses the pooler; nothing was written"
        )
