"""Latency pacing (``[backfill] max_latency_ratio``, :mod:`oauthmig.rollout.pacing`), for real.

The probe's latency is made to rise on purpose with a ``pg_sleep`` that the probe wrapper runs
on a PostgreSQL connection of its own and counts into every sample; the application's
statements are made to slow with a second process's session (``application_name`` provider)
whose statements sleep longer. The controller is fed those real samples one window at a time
(its background thread is parked), so each decision is on known data. No timing bound is
asserted: only which way the pace moves.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, inspect, text
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.pool import NullPool

from oauthmig.config import BackfillSettings, DatabaseConfig, Settings, settings_from_mapping
from oauthmig.demo.data import setup_legacy
from oauthmig.rollout.backfill import BackfillOptions, JobSample, backfill
from oauthmig.rollout.batches import BATCH_TABLE, ensure_batch_table
from oauthmig.rollout.job_state import JOB_TABLE
from oauthmig.rollout.pacing import (
    DECREASE,
    MIN_WINDOW,
    PACED_PREFIX,
    SAMPLE_INTERVAL,
    SMALLEST_BATCH,
    START_RATE,
    LatencyProbe,
    LookupProbe,
    Pacer,
    Sample,
)
from tests.helpers import invoke, write_config
from tests.helpers.databases import DatabaseFactory, routed_config

JOB = "token-families"


def _settings(make_database: DatabaseFactory, tmp_path: Path) -> Settings:
    # The suite's configs turn pacing off (tests/conftest.py): here it is on, as by default.
    data = routed_config(
        make_database("control"), make_database("shard"), backfill={"max_latency_ratio": 1.5}
    )
    settings = settings_from_mapping(data, {}, "test")
    setup_legacy(settings, apps=20, tokens=400, seed=3)
    write_config(tmp_path / "oauthmig.toml", data)
    return settings


@dataclass
class SlowedProbe:
    """The real lookup probe, plus ``delay`` seconds of ``pg_sleep`` on the server in every
    sample (a slow foreground, as the application would feel it)."""

    inner: LookupProbe
    engine: Engine
    delay: float = 0.0
    conn: Connection | None = field(default=None)
    #: Latency added in this process, on no connection: what the probe feels of the backfill's
    #: own work on a small server, with no application there.
    local_delay: float = 0.0

    def sample(self) -> Sample:
        sample = self.inner.sample()
        seconds = sample.latency + self.local_delay
        if self.delay:
            if self.conn is None:
                self.conn = self.engine.connect()
            started = time.perf_counter()
            self.conn.execute(text("SELECT pg_sleep(:d)"), {"d": self.delay})
            self.conn.rollback()
            seconds += time.perf_counter() - started
        return replace(sample, latency=seconds)

    def close(self) -> None:
        self.inner.close()
        if self.conn is not None:
            self.conn.close()
        self.engine.dispose()


def _window(pacer: Pacer, probe: LatencyProbe, spacing: float = 0.0) -> float:
    for _ in range(MIN_WINDOW):
        pacer.add(probe.sample())
        time.sleep(spacing)
    return pacer.next().rate


def test_pacer_slows_down_when_the_probe_slows_and_recovers_when_it_does_not(
    make_database: DatabaseFactory, tmp_path: Path, backend: str
) -> None:
    settings = _settings(make_database, tmp_path)
    bf = settings.backfill
    db = settings.databases["shard"]
    physical = settings.tables.token
    if backend == "sqlite":
        # No server to share: a documented no-op, the fixed duty cycle stays.
        pacer = Pacer.for_database(bf, db, physical)
        assert not pacer.active
        pacer.start()
        pace = pacer.next()
        assert (pace.rate, pace.target_seconds, pace.duty) == (1.0, 0.1, 0.5)
        assert pacer.reason == "" and pacer.baseline is None
        pacer.close()
        return
    assert db.url is not None
    probe = SlowedProbe(
        LookupProbe.for_database(db, physical), create_engine(db.url, poolclass=NullPool)
    )
    # The background sampler is parked (one sample an hour): the test feeds each window.
    pacer = Pacer(bf, probe, interval=3600)
    try:
        pacer.start()
        assert pacer.baseline is not None and pacer.baseline > 0
        assert pacer.rate == START_RATE

        probe.delay = max(0.05, 10 * pacer.baseline)  # far above max_latency_ratio 1.5
        rate = _window(pacer, probe)
        assert rate == START_RATE  # one slow window holds the pace
        for _ in range(3):
            new = _window(pacer, probe)
            assert new == pytest.approx(rate * DECREASE)  # multiplicative decrease
            rate = new
        pace = pacer.next()  # no new samples: no decision, the pace holds
        assert pace.rate == rate
        # Batches shrink down to SMALLEST_BATCH of the target; below it only the pauses grow.
        assert rate < SMALLEST_BATCH
        assert pace.target_seconds == pytest.approx(bf.target_batch_seconds * SMALLEST_BATCH)
        assert pace.duty == pytest.approx(rate)  # ceiling 1.0 under pacing
        assert pacer.reason.startswith(f"{PACED_PREFIX}6%: probe ")
        assert " > bound " in pacer.reason and "x 1.5)" in pacer.reason

        probe.delay = 0.0
        # Additive increase back to full speed; a stray slow window on a loaded machine halves
        # it again (seen at load 5), so the bound is generous: what counts is that it gets there.
        for _ in range(200):
            if pacer.rate == 1.0:
                break
            _window(pacer, probe)
        assert pacer.rate == 1.0 and pacer.reason == ""
        assert pacer.next().duty == 1.0
        # The probe's timeouts and read-only mode ended with each sample's transaction: its
        # connection (a pooled one behind a transaction pooler) keeps none of them.
        assert probe.inner.conn is not None
        raw = probe.inner.conn.connection.dbapi_connection
        assert raw is not None
        settings_sql = (
            "SELECT current_setting('statement_timeout'), current_setting('lock_timeout'), "
            "current_setting('transaction_read_only')"
        )
        cursor = raw.cursor()
        cursor.execute(settings_sql)
        kept = cursor.fetchall()
        cursor.close()
        with probe.engine.connect() as fresh:  # what a new session of the server has
            defaults = [tuple(fresh.execute(text(settings_sql)).one())]
        assert kept == defaults and defaults[0][2] == "off", (kept, defaults)
    finally:
        pacer.close()


def _postgres_pacing(
    make_database: DatabaseFactory, tmp_path: Path, backend: str
) -> tuple[BackfillSettings, DatabaseConfig, str] | None:
    """The backfill settings, the shard database and its token table on PostgreSQL; on SQLite,
    once pacing is checked to be a no-op there (no server to look at), None."""
    settings = _settings(make_database, tmp_path)
    bf, db, physical = settings.backfill, settings.databases["shard"], settings.tables.token
    if backend == "sqlite":
        assert not Pacer.for_database(bf, db, physical).active
        return None
    return bf, db, physical


def test_the_pacer_protects_the_foreground_it_sees_and_runs_flat_out_without_one(
    make_database: DatabaseFactory, tmp_path: Path, backend: str
) -> None:
    on_postgres = _postgres_pacing(make_database, tmp_path, backend)
    if on_postgres is None:
        return
    bf, db, physical = on_postgres
    assert db.url is not None
    probe = SlowedProbe(
        LookupProbe.for_database(db, physical), create_engine(db.url, poolclass=NullPool)
    )
    # Sessions of the database that are not the application: oauthmig's own (its batches, its
    # run lock), here one in an open transaction.
    own = create_engine(
        db.url, poolclass=NullPool, connect_args={"application_name": "oauthmig"}
    ).connect()
    provider = create_engine(
        db.url, poolclass=NullPool, connect_args={"application_name": "provider"}
    )
    pacer = Pacer(bf, probe, interval=3600)
    try:
        own.begin()
        own.execute(text("SELECT 1"))
        pacer.start()
        assert pacer.baseline is not None
        # The fixtures' own sessions end or go idle: wait until nobody else is at work.
        deadline = time.monotonic() + 60
        while probe.sample().busy:
            assert time.monotonic() < deadline, "the database never went quiet"
            time.sleep(0.05)

        # Slow, but nobody there: the probe only feels the backfill; the pace grows.
        probe.local_delay = max(0.05, 10 * pacer.baseline)
        rates = [_window(pacer, probe) for _ in range(3)]
        assert rates == sorted(rates) and rates[-1] > START_RATE, rates
        assert pacer.quiet and "no other session at work" in pacer.reason

        # The application arrives (a session in a transaction): the same latency now slows it.
        with provider.connect() as app:
            app.begin()
            app.execute(text("SELECT 1"))
            assert probe.sample().busy
            before = pacer.rate
            _window(pacer, probe)
            slowed = _window(pacer, probe)
            assert slowed == pytest.approx(before * DECREASE), (before, slowed)
            assert not pacer.quiet and " > bound " in pacer.reason
            app.rollback()
    finally:
        pacer.close()
        own.close()
        provider.dispose()


class _Application(threading.Thread):
    """The provider's request loop on a session of its own: one statement of ``seconds`` after
    another."""

    def __init__(self, url: str) -> None:
        super().__init__(daemon=True)
        self.engine = create_engine(
            url, poolclass=NullPool, connect_args={"application_name": "provider"}
        )
        self.seconds = 0.002
        self.statements = 0
        self.stop = threading.Event()

    def run(self) -> None:
        with self.engine.connect() as conn:
            while not self.stop.is_set():
                conn.execute(text("SELECT pg_sleep(:s)"), {"s": self.seconds})
                conn.commit()
                self.statements += 1

    def close(self) -> None:
        self.stop.set()
        self.join()
        self.engine.dispose()


def _wait_for(app: _Application, statements: int) -> None:
    """Until ``app`` has run ``statements`` more statements."""
    target, deadline = app.statements + statements, time.monotonic() + 60
    while app.statements < target:
        assert time.monotonic() < deadline, "the application stopped"
        time.sleep(0.005)


def test_the_pacer_slows_when_the_applications_statements_do_though_its_probe_does_not(
    make_database: DatabaseFactory, tmp_path: Path, backend: str
) -> None:
    on_postgres = _postgres_pacing(make_database, tmp_path, backend)
    if on_postgres is None:
        return
    bf, db, physical = on_postgres
    assert db.url is not None
    probe = LookupProbe.for_database(db, physical)  # the real probe: nothing slows it here
    app = _Application(db.url)
    app.start()
    pacer = Pacer(bf, probe, interval=3600)
    try:
        _wait_for(app, 5)
        pacer.start()
        assert pacer.foreground_baseline is not None  # its 2 ms statements were seen in flight
        rate = _window(pacer, probe, SAMPLE_INTERVAL)

        # The application's requests slow (as on a server whose CPU or WAL the job takes):
        # its statements in flight are older when looked at. The server timed them: one slow
        # window halves the pace (the probe, timed by this client, needs two).
        app.seconds = max(0.05, 20 * pacer.foreground_baseline)
        _wait_for(app, 2)  # one slow statement done, the next in flight
        slowed = _window(pacer, probe, SAMPLE_INTERVAL)
        assert slowed == pytest.approx(rate * DECREASE), (rate, slowed)
        assert _window(pacer, probe, SAMPLE_INTERVAL) == pytest.approx(slowed * DECREASE)
        slowed = pacer.rate
        assert pacer.reason.startswith(f"{PACED_PREFIX}{slowed:.0%}: the application's ")
        assert " > bound " in pacer.reason and "x 1.5)" in pacer.reason

        # They are fast again (faster than at the baseline, whatever the noise): it grows back.
        app.seconds = 0.0005
        _wait_for(app, 2)
        for _ in range(50):
            if _window(pacer, probe, SAMPLE_INTERVAL) > slowed:
                break
        assert pacer.rate > slowed and not pacer.quiet
    finally:
        pacer.close()
        app.close()


def test_backfill_records_its_pace(
    make_database: DatabaseFactory,
    tmp_path: Path,
    backend: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    settings = _settings(make_database, tmp_path)
    cfg = str(tmp_path / "oauthmig.toml")
    assert invoke(capsys, "--config", cfg, "upgrade").code == 0
    samples: list[JobSample] = []
    result = backfill(settings, [JOB], BackfillOptions(batch_size=50), observe=samples.append)
    assert {r.status for r in result.runs} == {"finished"}
    paces = {s.pace for s in samples if s.state == "running"}
    engine = create_engine(settings.databases["shard"].url or "", poolclass=NullPool)
    with engine.connect() as conn:
        rows = conn.execute(
            text(f"SELECT pace FROM {BATCH_TABLE} WHERE outcome = 'committed' ORDER BY id")
        ).all()
        held = conn.execute(text(f"SELECT held_reason FROM {JOB_TABLE}")).scalar()
    engine.dispose()
    assert len(rows) > 2
    assert held is None  # a finished run keeps no pacing reason
    if backend == "sqlite":
        assert paces == {None} and {r.pace for r in rows} == {None}
    else:
        assert paces and all(p is not None and 0 < p <= 1 for p in paces)
        assert all(r.pace is not None and 0 < r.pace <= 1 for r in rows)
        assert rows[0].pace == START_RATE
    report = invoke(capsys, "--config", cfg, "backfill", "--report", JOB, "--format", "json")
    assert report.code == 0, report.err
    shard = next(j for j in json.loads(report.out)["jobs"] if j["database"] == "shard")
    recent = [r["pace"] for r in reversed(shard["recent"])]  # oldest first, as rows
    assert recent and recent == [r.pace for r in rows][-len(recent) :]


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (1.0, "backfill.max_latency_ratio: must be between 1.05 and 100.0"),
        (-1, "backfill.max_latency_ratio: must be between 1.05 and 100.0"),
        ("fast", "backfill.max_latency_ratio: expected a number"),
    ],
)
def test_max_latency_ratio_is_strict(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], value: Any, message: str
) -> None:
    db = tmp_path / "x.sqlite"
    db.touch()
    cfg = write_config(
        tmp_path / "bad.toml",
        {
            "databases": {"main": {"url": f"sqlite:///{db}"}},
            "backfill": {"max_latency_ratio": value},
        },
    )
    result = invoke(capsys, "--config", cfg, "backfill", "--dry-run")
    assert result.code == 2 and result.out == ""
    assert message in result.err and "0 turns latency pacing off" in result.err
    assert len(result.err.strip().splitlines()) == 1


def test_max_latency_ratio_zero_turns_pacing_off() -> None:
    s = settings_from_mapping(
        {
            "databases": {"main": {"url": "postgresql+psycopg://u@127.0.0.1/x"}},
            "backfill": {"max_latency_ratio": 0},
        },
        {},
        "test",
    )
    assert s.backfill.max_latency_ratio == 0
    pacer = Pacer.for_database(s.backfill, s.databases["main"], "sentry_apitoken")
    assert not pacer.active and pacer.next().duty == 0.5
    on = settings_from_mapping({"databases": {"main": {"url": "sqlite:///x"}}}, {}, "t")
    assert on.backfill.max_latency_ratio == 1.5


def test_an_older_batch_table_gains_the_pace_column(
    make_database: DatabaseFactory, backend: str
) -> None:
    url = make_database("control")
    engine = create_engine(url, poolclass=NullPool)
    try:
        with engine.connect() as conn:
            ensure_batch_table(conn)
            with conn.begin():
                conn.execute(text(f"ALTER TABLE {BATCH_TABLE} DROP COLUMN pace"))
            assert "pace" not in {c["name"] for c in inspect(conn).get_columns(BATCH_TABLE)}
            conn.rollback()
            ensure_batch_table(conn)
            assert "pace" in {c["name"] for c in inspect(conn).get_columns(BATCH_TABLE)}
            conn.rollback()
            ensure_batch_table(conn)  # once there, left alone
    finally:
        engine.dispose()


def test_a_stop_during_the_baseline_is_obeyed_and_the_next_start_measures_again(
    make_database: DatabaseFactory, tmp_path: Path, backend: str
) -> None:
    on_postgres = _postgres_pacing(make_database, tmp_path, backend)
    if on_postgres is None:
        return
    bf, db, physical = on_postgres
    pacer = Pacer(bf, LookupProbe.for_database(db, physical), interval=3600)
    asked: list[int] = []

    def stop_on_the_third_look() -> bool:  # a Ctrl-C or --max-runtime during the baseline
        asked.append(1)
        return len(asked) >= 3

    try:
        assert pacer.start(stop_on_the_third_look) is False
        assert len(asked) == 3 and pacer.baseline is None and pacer.pending() == 0
        assert pacer.start() is True and pacer.baseline is not None  # measured in full
        assert pacer.start(stop_on_the_third_look) is True  # once started, nothing to wait for
    finally:
        pacer.close()
