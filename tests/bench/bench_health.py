"""Benchmark: the ``token-families`` backfill held and resumed by health checks.

A private primary and a streaming hot standby of it (``tests/pgcluster.py``: ``initdb``,
``pg_basebackup -R``, two postmasters on free ports; the shared server is not replicated). One
database with ``--tokens`` legacy tokens (default 100k), expanded; the job runs three times with
the default pacing (``max_duty`` 0.5), the family column reset to NULL and VACUUM ANALYZEd
before each run:

1. **no checks**: ``[backfill.health]`` empty;
2. **healthy checks**: ``max_replica_lag = "1s"`` on the replica, ``health_interval = "0.5s"``,
   the replica keeping up (the cost of probing);
3. **held and resumed**: the same while a thread pauses WAL replay on the replica
   (``pg_wal_replay_pause()``) for ``--hold-seconds`` every ``--period`` seconds, then resumes it.

Reported per run: wall time, rows/s, time held, number of holds; for run 3 also rows/s while not
held, how long after replay stopped the run held (expected: about ``max_replica_lag`` plus one
interval) and how long after replay resumed it went on (expected: at most one interval plus a
probe). Targets: run 2 at >= 90 % of run 1's rows/s; in run 3 every replay pause held the run,
and it went on within ``health_interval`` + 1 s of each resume.
"""

from __future__ import annotations

import statistics
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import create_engine, text
from sqlalchemy.engine import Engine
from sqlalchemy.pool import NullPool

from oauthmig.config import Settings, settings_from_mapping
from oauthmig.demo.data import setup_legacy
from oauthmig.rollout.backfill import BackfillOptions, JobSample, backfill
from oauthmig.rollout.job_state import JOB_TABLE
from oauthmig.rollout.runner import upgrade
from tests.bench.bench_common import load, machine, pass_fail
from tests.pgcluster import private_cluster, streaming_replica

JOB = "token-families"
LAG_LIMIT = "1s"
INTERVAL_S = 0.5
OVERHEAD_TARGET = 0.90  # healthy-check rows/s over no-check rows/s
RESUME_SLACK_S = 1.0


def _engine(url: str) -> Engine:
    return create_engine(url, poolclass=NullPool, isolation_level="AUTOCOMMIT")


def _exec(url: str, *statements: str) -> None:
    engine = _engine(url)
    try:
        with engine.connect() as conn:
            for sql in statements:
                conn.execute(text(sql))
    finally:
        engine.dispose()


@dataclass
class Timeline:
    """What the observer saw: (monotonic time, state) of every sample, thread-safe."""

    events: list[tuple[float, str]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def observe(self, sample: JobSample) -> None:
        with self.lock:
            self.events.append((time.monotonic(), sample.state))

    def holds(self) -> list[tuple[float, float]]:
        """(start, end) of every hold; a hold still open at the end ends at the last event."""
        out: list[tuple[float, float]] = []
        start: float | None = None
        for at, state in self.events:
            if state == "held" and start is None:
                start = at
            elif state != "held" and start is not None:
                out.append((start, at))
                start = None
        if start is not None:
            out.append((start, self.events[-1][0]))
        return out


@dataclass(frozen=True)
class Run:
    """One timed backfill run."""

    name: str
    rows: int
    seconds: float
    held_seconds: float
    holds: int
    pauses: list[tuple[float, float]]  # (replay paused at, resumed at), run 3 only
    timeline: Timeline

    @property
    def rate(self) -> float:
        return self.rows / self.seconds if self.seconds else 0.0

    @property
    def rate_unheld(self) -> float:
        active = self.seconds - self.held_seconds
        return self.rows / active if active > 0 else 0.0


class Pauser:
    """Pauses WAL replay on the replica for ``hold`` seconds every ``period`` seconds."""

    def __init__(self, replica_url: str, period: float, hold: float) -> None:
        self.url = replica_url
        self.period = period
        self.hold = hold
        self.stop = threading.Event()
        self.pauses: list[tuple[float, float]] = []
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        engine = _engine(self.url)
        try:
            with engine.connect() as conn:
                while not self.stop.wait(self.period):
                    conn.execute(text("SELECT pg_wal_replay_pause()"))
                    paused = time.monotonic()
                    self.stop.wait(self.hold)
                    conn.execute(text("SELECT pg_wal_replay_resume()"))
                    self.pauses.append((paused, time.monotonic()))
        finally:
            engine.dispose()

    def __enter__(self) -> Pauser:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join()
        _exec(self.url, "SELECT pg_wal_replay_resume()")


def _reset(settings: Settings, url: str) -> None:
    token = settings.tables.token
    _exec(
        url,
        f"UPDATE {token} SET token_family_id = NULL WHERE token_family_id IS NOT NULL",
        f"DROP TABLE IF EXISTS {JOB_TABLE}",
        "VACUUM ANALYZE",
        "CHECKPOINT",
    )


def _settings(url: str, health: dict[str, Any]) -> Settings:
    data: dict[str, Any] = {"databases": {"main": {"url": url}}, "backfill": {"health": health}}
    return settings_from_mapping(data, {}, "bench (health)")


def _run(name: str, settings: Settings, url: str, pauser: Pauser | None) -> Run:
    _reset(settings, url)
    timeline = Timeline()
    t0 = time.monotonic()
    if pauser is not None:
        with pauser:
            result = backfill(settings, [JOB], BackfillOptions(), observe=timeline.observe)
    else:
        result = backfill(settings, [JOB], BackfillOptions(), observe=timeline.observe)
    seconds = time.monotonic() - t0
    if result.failed or len(result.runs) != 1 or result.runs[0].status != "finished":
        raise RuntimeError(f"backfill did not finish: {result.runs}")
    run = result.runs[0]
    pauses = pauser.pauses if pauser is not None else []
    return Run(
        name, run.rows_changed, seconds, run.held_seconds, len(timeline.holds()), pauses, timeline
    )


def _reaction(run: Run) -> tuple[list[float], list[float], int]:
    """Per replay pause that ended before the run did: seconds until the run held, seconds
    from the resume until it went on; and how many such pauses never held it."""
    holds = run.timeline.holds()
    end = run.timeline.events[-1][0]
    to_hold: list[float] = []
    to_resume: list[float] = []
    missed = 0
    for paused, resumed in run.pauses:
        if resumed >= end:
            continue
        hold = next(((s, e) for s, e in holds if s >= paused and s <= resumed + INTERVAL_S), None)
        if hold is None:
            missed += 1
            continue
        to_hold.append(hold[0] - paused)
        to_resume.append(max(0.0, hold[1] - resumed))
    return to_hold, to_resume, missed


def main(*, tokens: int, seed: int, period: float, hold: float) -> bool:
    """Run the three backfills and print the figures; True if the targets are met."""
    print(f"== health: {JOB}, {tokens:,} legacy tokens, private primary + streaming replica")
    print(f"   {machine()}")
    opts = "-c wal_level=replica -c max_wal_senders=4"
    with (
        private_cluster(opts) as primary,
        streaming_replica(primary, "-c wal_receiver_status_interval=1s") as replica,
    ):
        url = primary.create_database("bench_health")
        plain = _settings(url, {})
        setup_legacy(plain, apps=1000, tokens=tokens, seed=seed)
        result = upgrade(plain)
        if result.failed:
            raise RuntimeError(f"upgrade failed: {result.failed}")
        checks = {
            "max_replica_lag": LAG_LIMIT,
            "replica_urls": [replica.url()],
            "health_interval": f"{int(INTERVAL_S * 1000)}ms",
        }
        checked = _settings(url, checks)
        runs = [
            _run("1 no checks", plain, url, None),
            _run("2 healthy checks", checked, url, None),
            _run("3 held and resumed", checked, url, Pauser(replica.url(), period, hold)),
        ]
    print(f"   load average after: {load()}")
    print(f"   {'run':<20} {'rows':>9} {'wall s':>8} {'rows/s':>8} {'held s':>7} {'holds':>5}")
    for r in runs:
        print(
            f"   {r.name:<20} {r.rows:>9,} {r.seconds:>8.1f} {r.rate:>8,.0f} "
            f"{r.held_seconds:>7.1f} {r.holds:>5}"
        )
    base, healthy, held = runs
    overhead = healthy.rate / base.rate if base.rate else 0.0
    to_hold, to_resume, missed = _reaction(held)
    print(
        f"   healthy checks: {100 * overhead:.1f} % of the no-check rate "
        f"(target >= {100 * OVERHEAD_TARGET:.0f} %)"
    )
    print(
        f"   held run: {held.rate_unheld:,.0f} rows/s while not held; "
        f"{len(held.pauses)} replay pauses of {hold:g}s every {period:g}s, {missed} not held"
    )
    if to_hold:
        print(
            f"   held {statistics.median(to_hold):.2f}s (median) / {max(to_hold):.2f}s (max) "
            f"after replay stopped (limit {LAG_LIMIT} + interval {INTERVAL_S}s); went on "
            f"{statistics.median(to_resume):.2f}s / {max(to_resume):.2f}s after it resumed "
            f"(target <= {INTERVAL_S + RESUME_SLACK_S:.1f}s)"
        )
    ok = (
        overhead >= OVERHEAD_TARGET
        and missed == 0
        and bool(to_resume)
        and max(to_resume) <= INTERVAL_S + RESUME_SLACK_S
        and base.rows == healthy.rows == held.rows
    )
    print(f"   result: {pass_fail(ok)}")
    return ok
