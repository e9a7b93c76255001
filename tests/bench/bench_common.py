"""Shared helpers: scratch PostgreSQL databases, settings, machine facts, statistics."""

from __future__ import annotations

import contextlib
import datetime
import math
import os
import platform
import threading
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

from sqlalchemy import create_engine, text
from sqlalchemy.engine import Connection, Engine, make_url

from oauthmig.config import Settings, settings_from_mapping

PG_ADMIN_URL = os.environ.get(
    "OAUTHMIG_BENCH_PG",
    os.environ.get("OAUTHMIG_TEST_PG", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"),
)
RUN_ID = uuid.uuid4().hex[:8]


def load() -> str:
    """The 1/5/15-minute load averages, as ``uptime`` prints them."""
    one, five, fifteen = os.getloadavg()
    return f"{one:.2f}, {five:.2f}, {fifteen:.2f}"


def machine() -> str:
    """A one-line description of the machine and the time."""
    now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    return (
        f"{now}; {os.cpu_count()} cores; Python {platform.python_version()}; load average {load()}"
    )


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q`` percentile (0-100) of ``values``, nearest-rank method."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


def single_db_settings(
    url: str, name: str = "main", backfill: Mapping[str, object] | None = None
) -> Settings:
    """Settings with one database hosting all three logical tables (``backfill``: that table)."""
    data: dict[str, object] = {"databases": {name: {"url": url}}}
    if backfill:
        data["backfill"] = backfill
    return settings_from_mapping(data, {}, f"bench ({name})")


def admin_engine() -> Engine:
    """An autocommit engine on the PostgreSQL server's admin database."""
    return create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")


@dataclass
class ScratchDatabases:
    """Uniquely named PostgreSQL databases, all dropped by :meth:`drop_all`."""

    admin: Engine
    tag: str
    created: list[str]

    def create(self, suffix: str) -> str:
        """Create a new empty database and return its URL."""
        name = f"oauthmig_bench_{RUN_ID}_{self.tag}_{suffix}"[:63]
        with self.admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
        self.created.append(name)
        return make_url(PG_ADMIN_URL).set(database=name).render_as_string(hide_password=False)

    def drop_all(self) -> None:
        """Drop every database created here (connections are terminated)."""
        while self.created:
            name = self.created.pop()
            with self.admin.connect() as conn:
                conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@contextlib.contextmanager
def scratch_databases(tag: str) -> Iterator[ScratchDatabases]:
    """Scratch PostgreSQL databases for one benchmark, dropped at the end even on failure."""
    admin = admin_engine()
    dbs = ScratchDatabases(admin, tag, [])
    try:
        yield dbs
    finally:
        try:
            dbs.drop_all()
        finally:
            admin.dispose()


def autocommit(url: str) -> Engine:
    """An autocommit engine on ``url`` (for VACUUM, CHECKPOINT)."""
    return create_engine(url, isolation_level="AUTOCOMMIT")


def pass_fail(ok: bool) -> str:
    """``PASS`` or ``FAIL``."""
    return "PASS" if ok else "FAIL"


_OTHERS_ACTIVE = text(
    "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend' "
    "AND state = 'active' AND pid <> pg_backend_pid() "
    "AND coalesce(datname, '') NOT LIKE :mine"
)


def _others_active(conn: Connection) -> int:
    """Sessions of other users (not this benchmark run) running a statement right now."""
    return int(conn.execute(_OTHERS_ACTIVE, {"mine": f"oauthmig_bench_{RUN_ID}_%"}).scalar_one())


class Interference:
    """Samples, in a background thread, whether other sessions are busy on the server.

    The benchmark shares one PostgreSQL server (and two cores) with other people's test
    suites; their statements, and above all the immediate checkpoint every ``DROP DATABASE``
    forces, slow down whichever timed run they overlap. ``busy_share`` is the fraction of
    samples in which at least one other session was running a statement.
    """

    def __init__(self, interval: float = 0.5) -> None:
        self._interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.samples = 0
        self.busy = 0

    def _run(self) -> None:
        engine = admin_engine()
        try:
            with engine.connect() as conn:
                while not self._stop.is_set():
                    self.samples += 1
                    if _others_active(conn) > 0:
                        self.busy += 1
                    self._stop.wait(self._interval)
        finally:
            engine.dispose()

    def __enter__(self) -> Interference:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def busy_share(self) -> float:
        return self.busy / self.samples if self.samples else 0.0


def wait_until_quiet(quiet_seconds: float, timeout: float) -> tuple[bool, float]:
    """Wait until no other session has run a statement for ``quiet_seconds`` (polling every
    0.5 s), at most ``timeout`` seconds. Returns (quiet reached, seconds waited)."""
    t0 = time.monotonic()
    quiet_since = t0
    engine = admin_engine()
    try:
        with engine.connect() as conn:
            while True:
                now = time.monotonic()
                if _others_active(conn) > 0:
                    quiet_since = now
                elif now - quiet_since >= quiet_seconds:
                    return True, now - t0
                if now - t0 >= timeout:
                    return False, now - t0
                time.sleep(0.5)
    finally:
        engine.dispose()
