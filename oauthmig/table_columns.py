"""The column names of a table as the database has them, reflected once per read-only view.

Readers of oauthmig's own tables (the revision log, job and batch tables) and the job tables
ask which columns exist, so that a table made by an older oauthmig, without the later columns,
still reads. Each ask is a reflection: catalog queries and a good deal of Python (SQLAlchemy
compiles the reflection queries again for every engine, and every database has its own).
Inside :func:`shared_reflection` a connection reflects the tables it is given in one query
and answers every later ask from that; outside it, every ask reflects afresh (DDL may have
run in between).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

from sqlalchemy import inspect
from sqlalchemy.engine import Connection
from sqlalchemy.engine.reflection import ObjectKind, ObjectScope

_KEY = "oauthmig.table_columns"


@contextmanager
def shared_reflection(conn: Connection, tables: Sequence[str]) -> Iterator[None]:
    """Reflect ``tables`` on ``conn`` now, in one query, and answer :func:`table_columns`
    from that inside the block (read-only callers only: DDL run inside it is not seen).

    The query asks what ``Inspector.get_columns`` asks of each table (any kind of table or
    view, any scope), so the answers are the same.
    """
    found = inspect(conn).get_multi_columns(
        filter_names=list(tables), kind=ObjectKind.ANY, scope=ObjectScope.ANY
    )
    if conn.in_transaction():
        conn.rollback()
    cache: dict[str, frozenset[str] | None] = dict.fromkeys(tables)
    for (schema, name), columns in found.items():
        if schema is None and name in cache:
            cache[name] = frozenset(c["name"] for c in columns)
    conn.info[_KEY] = cache
    try:
        yield
    finally:
        conn.info.pop(_KEY, None)


def table_columns(conn: Connection, table: str) -> frozenset[str] | None:
    """The names of ``table``'s columns (``None``: no such table)."""
    cache: dict[str, frozenset[str] | None] | None = conn.info.get(_KEY)
    if cache is not None and table in cache:
        return cache[table]
    insp = inspect(conn)
    found = frozenset(c["name"] for c in insp.get_columns(table)) if insp.has_table(table) else None
    if cache is not None:
        cache[table] = found
    return found


def has_table(conn: Connection, table: str) -> bool:
    """Whether ``table`` exists (answered from :func:`shared_reflection` when it reflected it)."""
    cache: dict[str, frozenset[str] | None] | None = conn.info.get(_KEY)
    if cache is not None and table in cache:
        return cache[table] is not None
    return bool(inspect(conn).has_table(table))
