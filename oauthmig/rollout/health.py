"""Health probes the backfill runs between batches (``[backfill.health]``).

Each probe returns a :class:`HealthReading`: healthy, or unhealthy with a one-line reason such
as ``replica lag 14.2s > 10s on 127.0.0.1:5433``. A probe never raises: a server it cannot
reach, a query that fails or a view it may not read makes the reading unhealthy (the backfill
holds rather than guessing), and every reason is built from masked URLs and sanitized driver
errors (:mod:`oauthmig.redact`), so it never carries a password.

Probes use their own short connections (never the backfill's work connection): libpq
``connect_timeout`` and, inside a read-only transaction, ``statement_timeout`` and
``lock_timeout`` of ``probe_timeout``; a client-side deadline (:class:`oauthmig.db.ClientDeadline`)
also bounds a server that stops answering.

The probes:

* **replica lag, on a replica** (``replica_urls`` / ``replica_url_env``): 0 while the replica
  has replayed all the WAL it received (``pg_last_wal_replay_lsn() >=
  pg_last_wal_receive_lsn()``): an idle, caught-up replica reads 0, although the timestamp
  of the last transaction it replayed grows on an idle primary. While WAL is pending, the
  smaller of two upper bounds: the age of that last replayed transaction
  (``now() - pg_last_xact_replay_timestamp()``, too large right after an idle period), and
  the time since a probe last saw the replica having received only WAL it has replayed by now
  (the monitor remembers what each probe saw; a first probe looks twice, 0.2 s apart). WAL
  the replica has not received (a broken connection to the primary) is invisible here;
  ``lag_on_primary`` sees it;
* **replica lag, on the primary** (``lag_on_primary``, implied when no replica URL is given):
  the largest ``pg_stat_replication.replay_lag`` of the physical standbys of the server
  hosting the database (logical replication slots are left out). PostgreSQL reports a stuck
  standby's lag as growing (interpolated between WAL samples) and NULL once it has caught up;
  it refreshes on every standby reply (``wal_receiver_status_interval``, 10 s by default).
  Reading it takes ``pg_monitor`` (or ``pg_read_all_stats``); without it the probe says so;
* **autovacuum on the table** (``max_autovacuum_on_table``): an autovacuum worker
  (``pg_stat_progress_vacuum`` joined to ``pg_stat_activity``) working on the backfilled table
  or its TOAST table for longer than the limit (``"0s"``: whenever one runs);
* **custom** (``check_sql`` / ``check_max``): the first column of the first row the query
  returns, in the database being backfilled; above ``check_max``, NULL, or not a number is
  unhealthy.

SQLite has no replicas, autovacuum or server to protect: on SQLite databases health checks are
a no-op (:attr:`HealthMonitor.enabled` is false and nothing is queried, not even ``check_sql``).
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from decimal import Decimal
from enum import StrEnum
from typing import Any

from sqlalchemy import create_engine, text
from sqlalchemy.engine import Connection, Engine, make_url
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.pool import NullPool

from oauthmig.config import DatabaseConfig, HealthSettings, ReplicaConfig
from oauthmig.db import PG_CONNECT_ARGS, ClientDeadline
from oauthmig.errors import ConfigError
from oauthmig.failures import login_refused, sqlstate
from oauthmig.redact import describe_db_error, url_secrets


class Probe(StrEnum):
    """The health probes: what a hold names as its cause (the metrics' ``probe`` label)."""

    REPLICA_LAG = "replica-lag"
    AUTOVACUUM = "autovacuum"
    CHECK_SQL = "check-sql"


PROBE_REPLICA_LAG = Probe.REPLICA_LAG
PROBE_AUTOVACUUM = Probe.AUTOVACUUM
PROBE_CHECK_SQL = Probe.CHECK_SQL
APPLICATION_NAME = "oauthmig-health"
_DEADLINE_GRACE_SECONDS = 5.0


@dataclass(frozen=True, slots=True)
class HealthReading:
    """The outcome of one round of probes.

    ``probe`` names the first probe that failed (``replica-lag``, ``autovacuum`` or
    ``check-sql``) and ``reason`` says why, in one line without secrets; ``None`` and empty
    when healthy.
    """

    healthy: bool
    probe: Probe | None = None
    reason: str = ""


HEALTHY = HealthReading(True)


def _unhealthy(probe: Probe, reason: str) -> HealthReading:
    return HealthReading(False, probe, reason)


def show_limit(ms: int) -> str:
    """A limit as the config would write it: ``10s``, ``0.5s``, ``0s``."""
    return f"{ms // 1000}s" if ms % 1000 == 0 else f"{ms / 1000:g}s"


def _where(url: str) -> str:
    """``host:port`` of a URL, for short reasons (no userinfo, no query). A password holding
    an unencoded ``@`` puts its tail in what SQLAlchemy reads as the host: only the text after
    the host's last ``@`` is the host."""
    parsed = make_url(url)
    host = (parsed.host or "").rpartition("@")[2] or "localhost"
    return f"{host}:{parsed.port}" if parsed.port else host


def probe_engine(url: str, timeout_ms: int) -> Engine:
    """An engine for short probe connections: libpq ``connect_timeout`` from ``timeout_ms``
    (whole seconds, at least 2: libpq's minimum), keepalives, application_name
    ``oauthmig-health``; no pool."""
    args = dict(PG_CONNECT_ARGS)
    args["connect_timeout"] = max(2, math.ceil(timeout_ms / 1000))
    args["application_name"] = APPLICATION_NAME
    args["prepare_threshold"] = None  # the primary's url may be a transaction pooler
    return create_engine(make_url(url), poolclass=NullPool, connect_args=args)


@contextmanager
def _probe(engine: Engine, timeout_ms: int) -> Iterator[Connection]:
    """A connection in a read-only transaction with statement and lock timeouts; every
    statement run inside is also bounded client-side. Always rolled back and closed."""
    conn = engine.connect()
    try:
        with ClientDeadline(conn, timeout_ms / 1000 + _DEADLINE_GRACE_SECONDS):
            conn.execute(
                text(
                    "SELECT set_config('statement_timeout', :ms, true), "
                    "set_config('lock_timeout', :ms, true), "
                    "set_config('transaction_read_only', 'on', true)"
                ),
                {"ms": f"{int(timeout_ms)}ms"},
            )
            yield conn
    finally:
        with contextlib.suppress(SQLAlchemyError):
            conn.rollback()
        with contextlib.suppress(SQLAlchemyError):
            conn.close()


@dataclass
class ReplicaHistory:
    """What earlier probes saw on one replica: ``(received LSN, monotonic time)`` samples, in
    time order, so that lag can be bounded by when the replica was last seen up to date."""

    samples: list[tuple[int, float]] = field(default_factory=list)

    def covered_since(self, replayed: int) -> float | None:
        """Time of the latest sample whose received WAL is all replayed now, if any."""
        covered = [t for lsn, t in self.samples if lsn <= replayed]
        return covered[-1] if covered else None

    def add(self, received: int, at: float, replayed: int) -> None:
        latest = self.covered_since(replayed)
        # Older samples than the latest covered one can no longer give a tighter bound.
        self.samples = [(lsn, t) for lsn, t in self.samples if latest is None or t >= latest]
        self.samples.append((received, at))
        del self.samples[:-_HISTORY]


_HISTORY = 64
_REPLICA_SQL = text(
    "SELECT pg_is_in_recovery() AS standby, "
    "  pg_wal_lsn_diff(pg_last_wal_receive_lsn(), '0/0')::bigint AS received, "
    "  pg_wal_lsn_diff(pg_last_wal_replay_lsn(), '0/0')::bigint AS replayed, "
    "  EXTRACT(EPOCH FROM clock_timestamp() - pg_last_xact_replay_timestamp())::float8 "
    "    AS since_replay"
)


def replica_lag(
    engine: Engine,
    replica: ReplicaConfig,
    limit_ms: int,
    timeout_ms: int,
    history: ReplicaHistory | None = None,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> HealthReading:
    """Lag of one replica, measured on the replica.

    0 while it has replayed all the WAL it received. Otherwise two upper bounds, the smaller
    wins: the age of the last transaction it replayed (``pg_last_xact_replay_timestamp``),
    and the time since a probe last saw it having received only WAL that it has replayed by
    now (``history``; on a first probe without one, a second look 0.2 s later gives it).
    """
    where = _where(replica.url)
    history = ReplicaHistory() if history is None else history
    try:
        for attempt in (1, 2):
            with _probe(engine, timeout_ms) as conn:
                row = conn.execute(_REPLICA_SQL).one()
            now = clock()
            if not row.standby:
                return _unhealthy(
                    PROBE_REPLICA_LAG,
                    f"replica {where} is not a standby (pg_is_in_recovery() is false): "
                    "fix backfill.health.replica_urls",
                )
            replayed = row.replayed
            if row.received is not None and replayed is not None and replayed >= row.received:
                history.add(int(row.received), now, int(replayed))
                return HEALTHY
            bounds: list[float] = []
            if row.since_replay is not None:
                bounds.append(max(0.0, float(row.since_replay)))
            seen = None if replayed is None else history.covered_since(int(replayed))
            if seen is not None:
                bounds.append(max(0.0, now - seen))
            if row.received is not None and replayed is not None:
                history.add(int(row.received), now, int(replayed))
            if attempt == 1 and seen is None and not (bounds and bounds[0] * 1000 <= limit_ms):
                sleep(min(0.2, limit_ms / 2000))
                continue
            break
    except SQLAlchemyError as exc:
        reason = describe_db_error(exc, url_secrets(replica.url))
        return _unhealthy(PROBE_REPLICA_LAG, f"replica {replica.display_url} unreachable: {reason}")
    if not bounds:
        return _unhealthy(
            PROBE_REPLICA_LAG,
            f"replica lag unknown on {where}: WAL is pending and no transaction was "
            "replayed since the replica started",
        )
    lag = min(bounds)
    if lag * 1000 > limit_ms:
        return _unhealthy(
            PROBE_REPLICA_LAG, f"replica lag {lag:.1f}s > {show_limit(limit_ms)} on {where}"
        )
    return HEALTHY


def primary_lag(conn: Connection, database: str, limit_ms: int) -> HealthReading:
    """The largest replay lag of the physical standbys in ``pg_stat_replication``."""
    rows = conn.execute(
        text(
            "SELECT application_name, host(client_addr) AS addr, state, "
            "  EXTRACT(EPOCH FROM replay_lag)::float8 AS lag "
            "FROM pg_stat_replication WHERE pid NOT IN "
            "  (SELECT active_pid FROM pg_replication_slots "
            "   WHERE slot_type = 'logical' AND active_pid IS NOT NULL)"
        )
    ).all()
    if any(r.state is None for r in rows):
        return _unhealthy(
            PROBE_REPLICA_LAG,
            f"cannot read pg_stat_replication on {database!r}: the user needs pg_monitor "
            "(GRANT pg_monitor TO ...), or list the replicas in backfill.health.replica_urls",
        )
    worst = max(rows, key=lambda r: r.lag or 0.0, default=None)
    if worst is not None and worst.lag is not None and worst.lag * 1000 > limit_ms:
        who = f"{worst.application_name or 'standby'} ({worst.addr or 'local'})"
        return _unhealthy(
            PROBE_REPLICA_LAG,
            f"replica lag {worst.lag:.1f}s > {show_limit(limit_ms)} on standby {who} "
            f"of {database!r}",
        )
    return HEALTHY


def autovacuum_on_table(conn: Connection, physical: str, limit_ms: int) -> HealthReading:
    """An autovacuum worker on ``physical`` (or its TOAST table) for longer than the limit."""
    rows = conn.execute(
        text(
            "SELECT p.pid, p.relid IS NULL AS hidden, "
            "  EXTRACT(EPOCH FROM clock_timestamp() - a.xact_start)::float8 AS seconds "
            "FROM pg_stat_progress_vacuum p JOIN pg_stat_activity a ON a.pid = p.pid "
            "WHERE a.backend_type = 'autovacuum worker' "
            "AND p.datid = (SELECT oid FROM pg_database WHERE datname = current_database()) "
            "AND (p.relid IS NULL OR p.relid = to_regclass(:t) OR p.relid = "
            "  (SELECT reltoastrelid FROM pg_class WHERE oid = to_regclass(:t)))"
        ),
        {"t": physical},
    ).all()
    for r in rows:
        if r.hidden:
            return _unhealthy(
                PROBE_AUTOVACUUM,
                f"an autovacuum worker (pid {r.pid}) runs on a table this user may not see; "
                "grant pg_read_all_stats to tell whether it is on " + physical,
            )
        seconds = max(0.0, float(r.seconds or 0.0))
        if seconds * 1000 >= limit_ms:
            return _unhealthy(
                PROBE_AUTOVACUUM,
                f"autovacuum on {physical} running {seconds:.1f}s (pid {r.pid}) "
                f">= {show_limit(limit_ms)}",
            )
    return HEALTHY


def _number(value: Any) -> float | None:
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, int | float | Decimal):
        number = float(value)
        return None if math.isnan(number) else number
    return None


def custom_check(conn: Connection, sql: str, maximum: float) -> HealthReading:
    """``check_sql``'s first value against ``check_max``."""
    row = conn.execution_options(no_parameters=True).exec_driver_sql(sql).first()
    value = None if row is None or len(row) == 0 else row[0]
    if value is None:
        return _unhealthy(PROBE_CHECK_SQL, "check_sql returned no value (no row, or NULL)")
    number = _number(value)
    if number is None:
        return _unhealthy(
            PROBE_CHECK_SQL,
            f"check_sql returned a {type(value).__name__}, not a number; make it return one",
        )
    if number > maximum:
        return _unhealthy(PROBE_CHECK_SQL, f"check_sql returned {number:g} > {maximum:g}")
    return HEALTHY


class HealthMonitor:
    """The health probes of one backfill job on one database, at most every
    ``health_interval``.

    :meth:`due` tells whether a round is due, :meth:`check` runs every configured probe and
    returns the first unhealthy reading (the reasons of all failing probes, joined by ``; ``)
    or :data:`HEALTHY`, :meth:`hold` holds while they fail, :meth:`close` releases the engines.
    """

    def __init__(
        self,
        health: HealthSettings,
        db: DatabaseConfig,
        physical: str,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.health = health
        self.db = db
        self.physical = physical
        self.clock = clock
        self.enabled = health.enabled and db.dialect == "postgresql" and db.url is not None
        self.interval = health.health_interval_ms / 1000
        self.checks = 0
        self.held_seconds = 0.0
        self._last: float | None = None
        self._healthy = True  # the last round's outcome
        self._engines: dict[str, Engine] = {}
        self._histories: dict[str, ReplicaHistory] = {}

    def _engine(self, url: str) -> Engine:
        if url not in self._engines:
            self._engines[url] = probe_engine(url, self.health.probe_timeout_ms)
        return self._engines[url]

    def due(self) -> bool:
        """True when the probes should run again: before the first round, once
        ``health_interval`` has passed since the last one, and after a failed round (a run
        that left its hold without a passing round, e.g. to reconnect, checks again first)."""
        if not self.enabled:
            return False
        return self._last is None or not self._healthy or self.clock() - self._last >= self.interval

    def check(self) -> HealthReading:
        """Run every configured probe now; never raises."""
        if not self.enabled:
            return HEALTHY
        self.checks += 1
        try:
            readings = self._readings()
        except Exception as exc:  # a probe must never end the backfill: hold, with the reason
            secrets = url_secrets(self.db.url) + tuple(
                s for r in self.health.replicas for s in url_secrets(r.url)
            )
            reason = describe_db_error(exc, secrets)
            readings = [
                HealthReading(False, None, f"health probe error: {type(exc).__name__}: {reason}")
            ]
        finally:
            self._last = self.clock()
        bad = [r for r in readings if not r.healthy]
        self._healthy = not bad
        if not bad:
            return HEALTHY
        return HealthReading(False, bad[0].probe, "; ".join(r.reason for r in bad))

    def _readings(self) -> list[HealthReading]:
        h = self.health
        out: list[HealthReading] = []
        if h.max_replica_lag_ms is not None:
            for r in h.replicas:
                history = self._histories.setdefault(r.url, ReplicaHistory())
                out.append(
                    replica_lag(
                        self._engine(r.url),
                        r,
                        h.max_replica_lag_ms,
                        h.probe_timeout_ms,
                        history,
                        self.clock,
                    )
                )
        on_primary = h.max_replica_lag_ms is not None and h.lag_on_primary
        if not (on_primary or h.max_autovacuum_on_table_ms is not None or h.check_sql):
            return out
        assert self.db.url is not None
        stage: Probe | None = None  # the probe running when an error comes; None while connecting
        try:
            with _probe(self._engine(self.db.url), h.probe_timeout_ms) as conn:
                if on_primary and h.max_replica_lag_ms is not None:
                    stage = PROBE_REPLICA_LAG
                    out.append(primary_lag(conn, self.db.name, h.max_replica_lag_ms))
                if h.max_autovacuum_on_table_ms is not None:
                    stage = PROBE_AUTOVACUUM
                    out.append(
                        autovacuum_on_table(conn, self.physical, h.max_autovacuum_on_table_ms)
                    )
                if h.check_sql is not None and h.check_max is not None:
                    stage = PROBE_CHECK_SQL
                    out.append(custom_check(conn, h.check_sql, h.check_max))
        except SQLAlchemyError as exc:
            reason = describe_db_error(exc, url_secrets(self.db.url))
            if stage is None:
                first = (
                    PROBE_REPLICA_LAG
                    if on_primary
                    else (
                        PROBE_AUTOVACUUM
                        if h.max_autovacuum_on_table_ms is not None
                        else PROBE_CHECK_SQL
                    )
                )
                out.append(
                    _unhealthy(
                        first,
                        f"database {self.db.name!r} unreachable for health checks: {reason}",
                    )
                )
            else:
                what = "check_sql" if stage == PROBE_CHECK_SQL else f"the {stage} probe"
                out.append(_unhealthy(stage, f"{what} failed on {self.db.name!r}: {reason}"))
        return out

    def hold(
        self,
        record: Callable[[str | None], None],
        report: Callable[[HealthReading | None, float], None],
        wait: Callable[[float], bool],
    ) -> str | None:
        """Run the probes and, while they fail, hold: ``record(reason)`` and ``report(reading,
        seconds held so far)`` on every failing round, then ``wait(health_interval)`` (True:
        stop) and probe again. When they pass again: ``record(None)``, ``report(None, 0)``.

        Returns None when healthy (at once, or after a hold), or the last reason when
        ``wait`` asked to stop. Time spent holding adds up in :attr:`held_seconds`.
        """
        reading = self.check()
        if reading.healthy:
            return None
        began = self.clock()
        try:
            while not reading.healthy:
                record(reading.reason)
                report(reading, self.clock() - began)
                if wait(self.interval):
                    return reading.reason
                reading = self.check()
        finally:
            self.held_seconds += self.clock() - began
        record(None)
        report(None, 0.0)
        return None

    def close(self) -> None:
        """Dispose of the probe engines."""
        for engine in self._engines.values():
            engine.dispose()
        self._engines.clear()


#: SQLSTATEs saying that ``check_sql`` itself cannot run, whatever the database's health:
#: class 42 (syntax error or access rule violation: 42601 syntax, 42P01 undefined table,
#: 42703 undefined column, 42883 undefined function, 42501 insufficient privilege), 0A000
#: (feature not supported) and 25006 (it writes: probes run read-only).
_QUERY_DEFECTS = ("42", "0A000", "25006")


def validate(health: HealthSettings, db: DatabaseConfig) -> None:
    """Before the first batch: a probe that cannot work as configured is a configuration
    error (:class:`ConfigError`, exit 2), not a health signal that would hold the backfill
    until ``--max-runtime`` run after run. ``check_sql`` runs once: a query that cannot run
    (see :data:`_QUERY_DEFECTS`) or returns something that is not a number is refused; each
    replica in ``replica_urls`` that answers must be a standby, and one that refuses the login
    (authentication, unknown role or database: :func:`~oauthmig.failures.login_refused`) is
    refused too. A server that does not answer
    now, or a query that times out, is left to the run's probes (it may be the health they
    watch). A no-op where health checks are (SQLite, nothing configured)."""
    if not (health.enabled and db.dialect == "postgresql" and db.url is not None):
        return
    timeout = health.probe_timeout_ms
    if health.check_sql is not None and health.check_max is not None:
        engine = probe_engine(db.url, timeout)
        try:
            with _probe(engine, timeout) as conn:
                reading = custom_check(conn, health.check_sql, health.check_max)
        except SQLAlchemyError as exc:
            if (sqlstate(exc) or "").startswith(_QUERY_DEFECTS):
                reason = describe_db_error(exc, url_secrets(db.url))
                raise ConfigError(
                    f"backfill.health.check_sql cannot run on database {db.name!r}: {reason}; "
                    "fix the query, or grant what it reads to the role oauthmig uses"
                ) from None
            reading = HEALTHY
        finally:
            engine.dispose()
        if not reading.healthy and "not a number" in reading.reason:
            raise ConfigError(f"backfill.health.check_sql: {reading.reason}")
    if health.max_replica_lag_ms is None:
        return
    for replica in health.replicas:
        engine = probe_engine(replica.url, timeout)
        try:
            with _probe(engine, timeout) as conn:
                standby = conn.execute(text("SELECT pg_is_in_recovery()")).scalar()
        except SQLAlchemyError as exc:
            if not login_refused(exc):
                continue  # not answering now: the run's lag probe holds on it
            reason = describe_db_error(exc, url_secrets(replica.url))
            raise ConfigError(
                f"backfill.health.replica_urls: {replica.display_url} refuses the connection: "
                f"{reason}; fix the replica's user, password or database name in the URL"
            ) from None
        finally:
            engine.dispose()
        if not standby:
            raise ConfigError(
                f"backfill.health.replica_urls: {replica.display_url} is not a standby "
                "(pg_is_in_recovery() is false); list the replicas' URLs, or use "
                "lag_on_primary"
            )
