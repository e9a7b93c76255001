"""Pacing a backfill by the latency live traffic feels (``[backfill] max_latency_ratio``).

A fixed duty cycle cannot know what a database has to spare. The :class:`Pacer` measures it.
Every :data:`SAMPLE_INTERVAL` seconds, on a connection of its own (``url``, like the
application), one round trip (:class:`LookupProbe`; read-only, with transaction-local timeouts
set in the same simple-protocol message, so a transaction pooler is fine and nothing stays on
the connection) takes a :class:`Sample` of two signals:

* **the probe**: a primary-key lookup of a random row of the table being backfilled (the hot
  path of the provider's lookups: an index descent and a heap fetch), timed around the round
  trip;
* **the application's own statements** (``pg_stat_activity``, the server's view): whether any
  other client session of the database (not oauthmig's own, whose ``application_name`` starts
  with ``oauthmig``) is in a statement or a transaction or ended one within the last second
  (*busy*; a session whose state this role may not see counts: in doubt, someone is there),
  and the mean age of its statements in flight shorter than :data:`SHORT_STATEMENT_SECONDS`.
  As the application's requests slow, the statements the server runs for it have been running
  longer when looked at. This is the signal that sees what the application feels when the
  server's CPU or WAL is saturated: the probe, a client that sleeps between samples, is woken
  ahead of the busy sessions by the kernel's scheduler and hardly slows (docs/benchmarks.md §7
  measured the probe at 1.2x while the application's statements took 2.5x and its throughput
  fell to 0.6x).

**The baseline**: before the first batch (after its health checks; a stop during it is obeyed),
:data:`BASELINE_SAMPLES` samples, spaced as the
running job spaces them (a sample right after another finds the server's process awake and
reads several times faster), in :data:`BASELINE_PARTS` consecutive parts; of each signal, the
calmest part's :func:`trimmed_mean` (for the application's statements, of the parts in which
at least a quarter of the samples saw one; none such: no baseline, the probe alone paces). A
mean, not the median: what slows the application first shows in the tail; trimmed of the
slowest eighth: a stray sample is not congestion; the calmest part: a checkpoint during the
baseline does not loosen the bound for the whole run.

**The decisions**: after each batch, once :data:`MIN_WINDOW` samples have come in since the
last decision, each signal's trimmed mean is compared with ``max_latency_ratio`` × its
baseline (never less than the baseline + :data:`MIN_SLACK` for the probe, +
:data:`MIN_FOREGROUND_SLACK` for the application's statements, which need half the window's
samples to have seen one). The application's statements above their bound in one window, or
the probe above its bound in two in a row (one slow window of a client-timed probe can be
scheduling), halve the pace (multiplicative decrease, down to :data:`MIN_RATE`); the probe
above it once holds it; both within the
lowest :data:`HEALTHY_SHARE` of their band (baseline to bound, never below baseline + slack),
it grows by :data:`STEP` (additive increase, up to 1); in between, it holds: a dead band, as
in TCP Vegas. The signals are noisy and a small pace hurts a saturated server a little: with
growth allowed up to the bound, the pace climbed until its harm was plain in the noise
(docs/benchmarks.md §7: a median pace of 0.3-0.6, the traffic's p99 at 1.6-1.9x); with the
dead band it settles lower (0.13-0.16, p99 1.34-1.36x). A window in which no sample saw the
application busy counts as healthy: the probe then only feels the backfill itself
(on a small server its own batches slow a lookup too), and there is no one to protect, so an
idle database gets the whole pace. With fewer samples (a short batch) the pace stays.

**The pace** ``rate`` scales both knobs of the runner: the batch duration it aims for
(``target_batch_seconds`` × rate, down to :data:`SMALLEST_BATCH` of it: smaller batches hold row
locks for less time, but each batch has a fixed cost) and its duty cycle (duty ceiling × rate:
longer pauses). The ceiling is ``max_duty``, 1.0 by default under pacing: on an idle server the
job runs flat out. A run starts at :data:`START_RATE`.

While the pace is below 1 the runner shows :attr:`Pacer.reason` (``paced to 25%: probe
3.10 ms > bound 1.95 ms (baseline 1.30 ms x 1.5)``) where a health hold shows its reason: the
progress line and the job row's ``held_reason`` (``status``); ``--metrics-file`` has the pace
(``oauthmig_backfill_pace``), and each batch row records the pace it ran at (``pace``).

The baseline is taken once per run: if the traffic itself grows during a long run, the pacer
reads it as the backfill's doing and stays slow (it still progresses, at :data:`MIN_RATE`);
if the application was not there when the run began, only the probe paces it. Pause and resume
the job to measure again. SQLite has no server to share: there pacing is a
no-op (:attr:`Pacer.active` is false, nothing is probed), and the duty cycle stays the fixed
``max_duty`` (0.5 by default).
"""

from __future__ import annotations

import contextlib
import random
import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import psycopg
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import SQLAlchemyError

from oauthmig.config import BackfillSettings, DatabaseConfig
from oauthmig.rollout.health import probe_engine

BASELINE_SAMPLES = 81
BASELINE_PARTS = 3  # the baseline is the calmest third
SAMPLE_INTERVAL = 0.02  # seconds between two samples while the job runs
MIN_WINDOW = 8  # samples a decision needs
#: The probe's bound is never tighter than its baseline plus this (seconds): a sub-millisecond
#: lookup varies by that much with scheduling alone, which no application feels.
MIN_SLACK = 0.0005
#: The same floor for the application's statements in flight, timed by the server itself
#: (no client scheduling in it).
MIN_FOREGROUND_SLACK = 0.0001
#: Statements in flight longer than this are not the request path pacing protects (a report,
#: a migration, a session stuck on its own lock): they are left out of the foreground's age.
SHORT_STATEMENT_SECONDS = 5
START_RATE = 0.5
MIN_RATE = 1 / 32
#: Below this pace the batches stop shrinking (only the pauses grow): a batch's fixed cost (its
#: transaction, the job row, the batch history) would otherwise be most of what it does.
SMALLEST_BATCH = 0.25
#: The pace grows only while the signals are within this share of their band (baseline to
#: bound); above it and up to the bound it holds.
HEALTHY_SHARE = 0.25
STEP = 0.1  # additive increase per healthy or quiet decision
DECREASE = 0.5  # multiplicative decrease per slow one
PROBE_TIMEOUT_MS = 5000
PACED_PREFIX = "paced to "


def trimmed_mean(samples: list[float]) -> float:
    """The mean without the slowest eighth (at least one sample left out once there are 8):
    tail-sensitive, but one stray sample on a busy machine is not congestion."""
    kept = sorted(samples)[: max(1, len(samples) - len(samples) // 8)]
    return statistics.fmean(kept)


def _parts(samples: list[Sample]) -> list[list[Sample]]:
    """The baseline's samples in BASELINE_PARTS consecutive parts."""
    size = -(-len(samples) // BASELINE_PARTS)
    return [samples[i : i + size] for i in range(0, len(samples), size)]


def _calm(parts: list[list[float]]) -> float:
    """The calmest part's trimmed mean: a checkpoint or a burst of traffic during one part
    does not loosen the bound for the whole run (in doubt, the bound is the tighter one)."""
    return min(trimmed_mean(part) for part in parts)


@dataclass(frozen=True, slots=True)
class Sample:
    """One look at what the application feels."""

    latency: float  # the probe's round trip, seconds
    #: Another client session of the database is in a statement or a transaction, or ended
    #: one within the last second (in doubt, true).
    busy: bool
    #: The mean age of the application's short statements in flight, seconds (None: none was).
    foreground: float | None = None


class LatencyProbe(Protocol):
    """Samples of what the application feels (never raises: a failed sample is busy and
    returns the time until it failed)."""

    def sample(self) -> Sample: ...

    def close(self) -> None: ...


@dataclass
class LookupProbe:
    """A primary-key lookup of a random id up to ``max(id)`` of ``physical`` (a row or a gap:
    an index descent either way) and a look at ``pg_stat_activity``, on its own connection."""

    engine: Engine
    physical: str
    conn: Connection | None = None
    top: int = 1

    @classmethod
    def for_database(cls, db: DatabaseConfig, physical: str) -> LookupProbe:
        """The probe of ``physical`` on ``db`` (PostgreSQL), through ``url``."""
        assert db.url is not None
        return cls(probe_engine(db.url, PROBE_TIMEOUT_MS), physical)

    def _connection(self) -> Connection:
        if self.conn is None:
            self.conn = self.engine.connect().execution_options(isolation_level="AUTOCOMMIT")
            (top,) = self._read(f"SELECT max(id) FROM {self.physical}")
            self.top = max(1, int(top[0][0] or 1))
        return self.conn

    def _read(self, *queries: str) -> list[list[tuple[Any, ...]]]:
        """The rows of each of ``queries`` (no parameters), bounded by the probe's timeouts,
        read-only, in one round trip: without parameters psycopg sends the string in a simple
        Query message, whose statements run as one implicit transaction, so ``set_config(...,
        true)`` bounds them and ends with them (nothing stays on a pooled connection)."""
        conn = self.conn if self.conn is not None else self._connection()
        cursor = conn.connection.dbapi_connection.cursor()  # type: ignore[union-attr]
        try:
            cursor.execute(_LIMITS + "; ".join(queries))
            results = []
            for _ in queries:
                cursor.nextset()  # the first time, past set_config's row
                results.append(list(cursor.fetchall()))
            return results
        finally:
            cursor.close()

    def sample(self) -> Sample:
        started = time.perf_counter()
        try:
            self._connection()  # a reconnect is not the lookup's latency
            started = time.perf_counter()
            activity, _ = self._read(
                _FOREGROUND_SQL,
                f"SELECT * FROM {self.physical} WHERE id = {random.randint(1, self.top)}",
            )
            latency = time.perf_counter() - started
        except (SQLAlchemyError, psycopg.Error):
            self.close()  # reconnect on the next sample
            return Sample(time.perf_counter() - started, busy=True)
        busy, active, age = activity[0]
        return Sample(latency, bool(busy), float(age) if active else None)

    def close(self) -> None:
        conn, self.conn = self.conn, None
        if conn is not None:
            with contextlib.suppress(SQLAlchemyError):
                conn.close()


_LIMITS = (
    f"SELECT set_config('statement_timeout', '{PROBE_TIMEOUT_MS}ms', true), "
    f"set_config('lock_timeout', '{PROBE_TIMEOUT_MS}ms', true), "
    "set_config('transaction_read_only', 'on', true); "
)

# The application: other client sessions of this database than oauthmig's own. Busy: working or
# just were; state is NULL for a session this role may not inspect, which counts (in doubt,
# the application is there). Its statements in flight, and their mean age so far: as the
# application's requests slow, the statements the server is running have been running longer.
_FOREGROUND_SQL = f"""
SELECT count(*) FILTER (WHERE state IS NULL OR state <> 'idle'
                          OR state_change > clock_timestamp() - interval '1 second'),
       count(*) FILTER (WHERE state = 'active' AND query_start > clock_timestamp() - s.short),
       coalesce(avg(extract(epoch FROM clock_timestamp() - query_start))
                  FILTER (WHERE state = 'active' AND query_start > clock_timestamp() - s.short),
                0)
  FROM pg_stat_activity,
       (SELECT interval '{SHORT_STATEMENT_SECONDS} seconds' AS short) AS s
 WHERE datname = current_database() AND backend_type = 'client backend'
   AND pid <> pg_backend_pid()
   AND coalesce(application_name, '') NOT LIKE 'oauthmig%'
"""


@dataclass(frozen=True, slots=True)
class Pace:
    """What the runner does next: aim batches at ``target_seconds`` and spend at most ``duty``
    of the wall time in batches."""

    rate: float
    target_seconds: float
    duty: float


@dataclass
class Pacer:
    """The AIMD controller of one run on one database (see the module docstring).

    Inactive (no probe, SQLite or ``max_latency_ratio = 0``): :meth:`next` always returns the
    configured target and duty cycle, and :attr:`reason` stays empty.
    """

    settings: BackfillSettings
    probe: LatencyProbe | None
    interval: float = SAMPLE_INTERVAL
    rate: float = START_RATE
    baseline: float | None = None  # the probe's, seconds
    #: The application's statements in flight at the baseline, seconds (None: too few seen).
    foreground_baseline: float | None = None
    latency: float | None = None  # the probe, over the last decision's window, seconds
    foreground: float | None = None  # the application's statements, same window, seconds
    reason: str = ""
    over: bool = False  # the last decision's window was over the bound
    quiet: bool = False  # the last decision's window saw no foreground
    _samples: list[Sample] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    @classmethod
    def for_database(cls, settings: BackfillSettings, db: DatabaseConfig, physical: str) -> Pacer:
        """The pacer of a job on ``db``: active on PostgreSQL when ``max_latency_ratio`` > 0."""
        if db.dialect != "postgresql" or settings.max_latency_ratio <= 0 or db.url is None:
            return cls(settings, None)
        return cls(settings, LookupProbe.for_database(db, physical))

    @property
    def active(self) -> bool:
        """Whether latency pacing runs (PostgreSQL, ``max_latency_ratio`` > 0)."""
        return self.probe is not None

    def start(self, should_stop: Callable[[], bool] = lambda: False) -> bool:
        """Measure the baseline (before the first batch, sampled as the running job samples),
        then sample in the background. Once started (or inactive), returns at once. False:
        ``should_stop`` said so during the baseline, which the next call takes again."""
        if self.probe is None or self._thread is not None:
            return True
        samples = []
        for i in range(BASELINE_SAMPLES):
            if should_stop():
                return False
            if i:  # spaced as while the job runs: right after another, a sample reads faster
                time.sleep(SAMPLE_INTERVAL)
            samples.append(self.probe.sample())
        parts = _parts(samples)
        self.baseline = _calm([[s.latency for s in part] for part in parts])
        seen = [[s.foreground for s in part if s.foreground is not None] for part in parts]
        # A part counts for the application when a quarter of its samples saw its statements.
        enough = [ages for ages in seen if len(ages) >= len(parts[0]) // 4]
        if enough:
            self.foreground_baseline = _calm(enough)
        self._stop.clear()
        self._thread = threading.Thread(
            target=self._sample_loop, name="oauthmig-pacing", daemon=True
        )
        self._thread.start()
        return True

    def _sample_loop(self) -> None:
        assert self.probe is not None
        try:
            while not self._stop.wait(self.interval):
                self.add(self.probe.sample())
        finally:
            self.probe.close()  # its connection belongs to this thread

    def add(self, sample: Sample) -> None:
        """One sample (from the background thread, or a caller that probes itself)."""
        with self._lock:
            self._samples.append(sample)

    def next(self) -> Pace:
        """After a batch: decide the pace from the samples since the last decision."""
        bf = self.settings
        if self.probe is None:
            return Pace(1.0, bf.target_batch_seconds, bf.duty(paced=False))
        with self._lock:
            window, ready = self._samples, len(self._samples) >= MIN_WINDOW
            if ready:
                self._samples = []
        if ready and self.baseline is not None:
            self.latency = trimmed_mean([s.latency for s in window])
            seen = [s.foreground for s in window if s.foreground is not None]
            self.foreground = (
                trimmed_mean(seen)
                if self.foreground_baseline is not None and len(seen) >= MIN_WINDOW // 2
                else None
            )
            self.quiet = not any(s.busy for s in window)
            over = (self._probe_over() or self._foreground_over()) and not self.quiet
            # The probe, timed by this client, must be slow twice in a row (one slow window
            # can be this machine's scheduling); the server's timing of the application once.
            if over and (self.over or self._foreground_over()):
                self.rate = max(MIN_RATE, self.rate * DECREASE)
            elif self.quiet or self._healthy():
                self.rate = min(1.0, self.rate + STEP)
            self.over = over
            self.reason = self._reason() if self.rate < 1.0 else ""
        target = bf.target_batch_seconds * max(self.rate, SMALLEST_BATCH)
        return Pace(self.rate, target, bf.duty(paced=True) * self.rate)

    def bound(self) -> float:
        """The latency the probe may reach before the pace drops (seconds)."""
        assert self.baseline is not None
        return max(self.settings.max_latency_ratio * self.baseline, self.baseline + MIN_SLACK)

    def foreground_bound(self) -> float:
        """The age the application's statements in flight may reach (seconds)."""
        assert self.foreground_baseline is not None
        base = self.foreground_baseline
        return max(self.settings.max_latency_ratio * base, base + MIN_FOREGROUND_SLACK)

    def _healthy(self) -> bool:
        """Both signals within HEALTHY_SHARE of their band, from baseline to bound (never
        below baseline + slack): between that and the bound the pace holds."""
        assert self.baseline is not None and self.latency is not None
        base = self.baseline
        probe_ok = self.latency <= max(
            base + HEALTHY_SHARE * (self.bound() - base), base + MIN_SLACK
        )
        if self.foreground is None or self.foreground_baseline is None:
            return probe_ok
        base = self.foreground_baseline
        return probe_ok and self.foreground <= max(
            base + HEALTHY_SHARE * (self.foreground_bound() - base), base + MIN_FOREGROUND_SLACK
        )

    def _probe_over(self) -> bool:
        return self.latency is not None and self.latency > self.bound()

    def _foreground_over(self) -> bool:
        return self.foreground is not None and self.foreground > self.foreground_bound()

    def _reason(self) -> str:
        assert self.baseline is not None and self.latency is not None
        ratio = f"x {self.settings.max_latency_ratio:g}"
        if self.quiet:
            return f"{PACED_PREFIX}{self.rate:.0%}: no other session at work, speeding up"
        if self.foreground is not None and (self._foreground_over() or not self._probe_over()):
            assert self.foreground_baseline is not None
            verdict = ">" if self._foreground_over() else "<="
            return (
                f"{PACED_PREFIX}{self.rate:.0%}: the application's statements "
                f"{self.foreground * 1000:.2f} ms {verdict} bound "
                f"{self.foreground_bound() * 1000:.2f} ms (baseline "
                f"{self.foreground_baseline * 1000:.2f} ms {ratio})"
            )
        verdict = ">" if self._probe_over() else "<="
        return (
            f"{PACED_PREFIX}{self.rate:.0%}: probe {self.latency * 1000:.2f} ms {verdict} "
            f"bound {self.bound() * 1000:.2f} ms (baseline {self.baseline * 1000:.2f} ms "
            f"{ratio})"
        )

    def pending(self) -> int:
        """Samples taken since the last decision."""
        with self._lock:
            return len(self._samples)

    def close(self) -> None:
        """Stop sampling and close the probe's connection. Never waits long: a sample stuck on
        a server that stopped answering (where its own ``statement_timeout`` cannot fire) is
        left to its daemon thread, which closes the connection when the sample returns."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=1.0)
            self._thread = None
        elif self.probe is not None:
            self.probe.close()
