"""The run lock (:class:`oauthmig.runlock.RunLock`) and the failure classifier
(:func:`oauthmig.failures.classify`) on real databases and real driver errors."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator

import pytest
from sqlalchemy import text
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import DBAPIError, SQLAlchemyError

from oauthmig.config import Settings, settings_from_mapping
from oauthmig.db import for_writing, make_engine, set_timeouts
from oauthmig.errors import LockBusyError
from oauthmig.failures import FailureKind, classify
from oauthmig.runlock import RunLock
from tests.helpers.databases import DatabaseFactory

PG = pytest.mark.parametrize("backend", ["postgresql"], indirect=True)


@pytest.fixture
def engine(make_database: DatabaseFactory) -> Iterator[tuple[Settings, Engine]]:
    data = {
        "databases": {"main": {"url": make_database("main")}},
        "migrate": {"lock_timeout": "200ms", "statement_timeout": "30s"},
    }
    settings = settings_from_mapping(data, {}, "test")
    eng = make_engine(settings.databases["main"], settings, create=True)
    with eng.begin() as conn:
        conn.execute(text("CREATE TABLE t (id INTEGER PRIMARY KEY, v INTEGER)"))
        conn.execute(text("INSERT INTO t VALUES (1, 0), (2, 0)"))
    yield settings, eng
    eng.dispose()


def test_one_holder_per_purpose_seen_from_every_connection(
    engine: tuple[Settings, Engine],
) -> None:
    _, eng = engine
    with eng.connect() as first, eng.connect() as second:
        mine = RunLock("upgrade", "main")
        assert mine.try_acquire(first)
        other = RunLock("upgrade", "main")
        assert not other.try_acquire(second)
        with pytest.raises(LockBusyError, match="'main': another oauthmig upgrade run holds"):
            other.acquire(second)
        assert other.alive(second)
        assert RunLock("prune-grants", "main").try_acquire(second)  # another purpose
        if eng.dialect.name == "postgresql":
            assert mine.holder(second) == mine.holder_pid
            assert mine.verify(second)  # from another session: pg_locks names the holder
            second.rollback()
            assert mine.verify(first)  # on the holding session itself
            first.rollback()
            assert not other.verify(second)  # never took it
            second.rollback()
        mine.release()
        assert not other.alive(second)
        assert other.try_acquire(second)
        other.release()


@PG
def test_a_lock_is_gone_with_its_session(engine: tuple[Settings, Engine]) -> None:
    _, eng = engine
    with eng.connect() as holder, eng.connect() as watcher:
        lock = RunLock("backfill token-families", "main")
        assert lock.try_acquire(holder)
        assert lock.alive(watcher)
        watcher.execute(text("SELECT pg_terminate_backend(:p)"), {"p": lock.holder_pid})
        watcher.commit()
        deadline = time.monotonic() + 60
        while lock.alive(watcher) and time.monotonic() < deadline:
            time.sleep(0.05)  # the terminated backend is going away
        assert not lock.alive(watcher)
        assert not lock.verify(watcher)
        watcher.rollback()


def _failure(conn: Connection, statement: str) -> DBAPIError:
    try:
        conn.execute(text(statement))
    except DBAPIError as exc:
        return exc
    finally:
        with contextlib.suppress(SQLAlchemyError):
            conn.rollback()
    raise AssertionError(f"{statement} did not fail")


def test_lock_timeout_and_other(engine: tuple[Settings, Engine]) -> None:
    _, eng = engine
    with eng.connect() as holder, eng.connect() as waiter:
        if eng.dialect.name == "postgresql":
            holder.execute(text("LOCK TABLE t IN ACCESS EXCLUSIVE MODE"))
            set_timeouts(waiter, 100, 30000)
            exc = _failure(waiter, "SELECT * FROM t")
        else:
            for_writing(holder).execute(text("UPDATE t SET v = 1"))  # BEGIN IMMEDIATE
            exc = _failure(for_writing(waiter), "UPDATE t SET v = 2")
        assert classify(exc) is FailureKind.LOCK_TIMEOUT
        holder.rollback()
        assert classify(_failure(waiter, "SELEC 1")) is FailureKind.OTHER
        assert classify(_failure(waiter, "INSERT INTO t VALUES (1, 1)")) is FailureKind.OTHER
    assert classify(ValueError("database is locked")) is FailureKind.LOCK_TIMEOUT
    assert not FailureKind.OTHER.transient and FailureKind.DEADLOCK.transient


def _crossed(eng: Engine, first: Callable[[Connection], None]) -> list[BaseException]:
    """Two sessions that each hold a row the other then wants: one of them fails."""
    errors: list[BaseException] = []
    a, b = eng.connect(), eng.connect()
    try:
        first(a)
        b.execute(text("UPDATE t SET v = v + 1 WHERE id = 2"))
        a.execute(text("UPDATE t SET v = v + 1 WHERE id = 1"))
        done = threading.Event()

        def other() -> None:
            try:
                b.execute(text("UPDATE t SET v = v + 1 WHERE id = 1"))
            except DBAPIError as exc:
                errors.append(exc)
            done.set()

        thread = threading.Thread(target=other)
        thread.start()
        try:
            a.execute(text("UPDATE t SET v = v + 1 WHERE id = 2"))
        except DBAPIError as exc:
            errors.append(exc)
        a.rollback()
        thread.join(timeout=60)
        b.rollback()
    finally:
        a.close()
        b.close()
    return errors


@PG
def test_deadlock_serialization_statement_timeout_and_lost_connection(
    engine: tuple[Settings, Engine],
) -> None:
    _, eng = engine
    errors = _crossed(eng, lambda c: None)
    assert [classify(e) for e in errors] == [FailureKind.DEADLOCK]

    with eng.connect() as reader, eng.connect() as writer:
        reader.execute(text("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ"))
        reader.execute(text("SELECT v FROM t WHERE id = 1")).all()
        writer.execute(text("UPDATE t SET v = v + 1 WHERE id = 1"))
        writer.commit()
        assert classify(_failure(reader, "UPDATE t SET v = 0 WHERE id = 1")) is (
            FailureKind.SERIALIZATION
        )

        set_timeouts(reader, 1000, 50)
        assert classify(_failure(reader, "SELECT pg_sleep(5)")) is FailureKind.STATEMENT_TIMEOUT

        pid = reader.execute(text("SELECT pg_backend_pid()")).scalar_one()
        reader.commit()
        writer.execute(text("SELECT pg_terminate_backend(:p)"), {"p": pid})
        writer.commit()
        assert classify(_failure(reader, "SELECT 1")) is FailureKind.CONNECTION_LOST


@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
def test_writer_threads_of_one_run_take_turns_on_a_sqlite_file(
    engine: tuple[Settings, Engine],
) -> None:
    """``backfill --jobs``: threads writing to one SQLite file never starve each other past
    busy_timeout (200 ms here), although each holds the write lock for a while."""
    _, eng = engine
    errors: list[BaseException] = []

    def writer(row: int) -> None:
        try:
            for _ in range(15):
                with for_writing(eng.connect()) as conn, conn.begin():
                    conn.execute(text("UPDATE t SET v = v + 1 WHERE id = :id"), {"id": row})
                    time.sleep(0.03)  # the batch's work, inside the write lock
        except SQLAlchemyError as exc:
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(1 + i % 2,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert errors == []
    with eng.connect() as conn:
        assert conn.execute(text("SELECT sum(v) FROM t")).scalar_one() == 60
