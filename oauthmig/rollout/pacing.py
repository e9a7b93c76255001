"""Pacing a backfill by the latency live traffic feels (``[backfill] max_latency_ratio``).

A fixed duty cycle cannot know what a database has to spare. The :class:`Pacer` measures it:

* **the probe** (:class:`LookupProbe`): a primary-key lookup of a random row of the table being
  backfilled (the hot path of the provider's lookups: an index descent and a heap fetch), on a
  connection of its own (``url``, like the application; one short read-only transaction per
  sample with ``SET LOCAL`` timeouts, so a transaction pooler is fine), timed around the lookup
  alone;
* **the baseline**: before the first batch, the :func:`trimmed_mean` of
  :data:`BASELINE_SAMPLES` probes (a mean, not the median: what slows the application first
  shows in the tail; trimmed of the slowest eighth: a stray sample is not congestion);
* **the foreground** (:meth:`LookupProbe.busy`): every :data:`FOREGROUND_EVERY`-th sample also
  asks ``pg_stat_activity`` whether any other client session of the database (not oauthmig's
  own, whose ``application_name`` starts with ``oauthmig``) is in a statement or a
  transaction, or ended one within the last second. A session whose state this role may not
  see (another role's, without ``pg_read_all_stats``) counts as busy: in doubt, someone is
  there;
* **while the job runs**, a thread probes every :data:`SAMPLE_INTERVAL` seconds, during the
  batches and the pauses alike. After each batch, once :data:`MIN_WINDOW` samples have come in
  since the last decision, their trimmed mean is compared with ``max_latency_ratio`` × the
  baseline (never less than the baseline + :data:`MIN_SLACK`, 0.5 ms). Above it twice in a
  row, the pace is halved (multiplicative decrease, down to :data:`MIN_RATE`); above it once,
  it holds; at or below it, it grows by :data:`STEP` (additive increase, up to 1). A window
  in which no foreground was seen counts as at or below the bound: the probe then only feels
  the backfill itself (on a small server its own batches slow a lookup too), and there is no
  one to protect, so an idle database gets the whole pace. With fewer samples (a short batch)
  the pace stays;
* **the pace** ``rate`` scales both knobs of the runner: the batch duration it aims for
  (``target_batch_seconds`` × rate: smaller batches hold row locks for less time) and its duty
  cycle (duty ceiling × rate: longer pauses). The ceiling is ``max_duty``, 1.0 by default under
  pacing: on an idle server the job runs flat out. A run starts at :data:`START_RATE`.

While the pace is below 1 the runner shows :attr:`Pacer.reason` (``paced to 25%: probe
3.10 ms > bound 1.95 ms (baseline 1.30 ms x 1.5)``) where a health hold shows its reason: the
progress line and the job row's ``held_reason`` (``status``); ``--metrics-file`` has the pace
(``oauthmig_backfill_pace``), and each batch row records the pace it ran at (``pace``).

The baseline is taken once per run: if the traffic itself grows during a long run, the pacer
reads it as the backfill's doing and stays slow (it still progresses, at :data:`MIN_RATE`);
pause and resume the job to measure again. SQLite has no server to share: there pacing is a
no-op (:attr:`Pacer.active` is false, nothing is probed), and the duty cycle stays the fixed
``max_duty`` (0.5 by default).
"""

from __future__ import annotations

import contextlib
import random
import statistics
import threading
import time
from dataclasses import dataclass, field
from typing import Protocol

from sqlalchemy import text
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import SQLAlchemyError

from oauthmig.config import BackfillSettings, DatabaseConfig
from oauthmig.rollout.health import probe_engine

BASELINE_SAMPLES = 41
FOREGROUND_EVERY = 4  # one foreground check per this many latency samples
SAMPLE_INTERVAL = 0.02  # seconds between two probes while the job runs
MIN_WINDOW = 8  # samples a decision needs
#: The bound is never tighter than the baseline plus this (seconds): a sub-millisecond lookup
#: varies by that much with scheduling alone, which no application feels.
MIN_SLACK = 0.0005
START_RATE = 0.5
MIN_RATE = 1 / 32
STEP = 0.1  # additive increase per healthy or quiet decision
DECREASE = 0.5  # multiplicative decrease per slow one
PROBE_TIMEOUT_MS = 5000
PACED_PREFIX = "paced to "


def trimmed_mean(samples: list[float]) -> float:
    """The mean without the slowest eighth (at least one sample left out once there are 8):
    tail-sensitive, but one stray sample on a busy machine is not congestion."""
    kept = sorted(samples)[: max(1, len(samples) - len(samples) // 8)]
    return statistics.fmean(kept)


class LatencyProbe(Protocol):
    """One timed sample of what the application feels, in seconds (never raises: a failed
    sample returns the time until it failed)."""

    def sample(self) -> float: ...

    def busy(self) -> bool:
        """Whether the application is there: another client session of the database is in a
        statement or a transaction, or ended one within the last second (never raises: in
        doubt, busy)."""
        ...

    def close(self) -> None: ...


@dataclass
class LookupProbe:
    """A primary-key lookup of a random id up to ``max(id)`` of ``physical`` (a row or a gap:
    an index descent either way) on its own connection."""

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
            self.conn = self.engine.connect()
            top = self.conn.execute(text(f"SELECT max(id) FROM {self.physical}")).scalar()
            self.conn.rollback()
            self.top = max(1, int(top or 1))
        return self.conn

    def sample(self) -> float:
        started = time.perf_counter()
        try:
            conn = self._connection()
            with conn.begin():
                conn.execute(
                    text(
                        "SELECT set_config('statement_timeout', :ms, true), "
                        "set_config('lock_timeout', :ms, true), "
                        "set_config('transaction_read_only', 'on', true)"
                    ),
                    {"ms": f"{PROBE_TIMEOUT_MS}ms"},
                )
                started = time.perf_counter()
                conn.execute(
                    text(f"SELECT * FROM {self.physical} WHERE id = :id"),
                    {"id": random.randint(1, self.top)},
                ).all()
                return time.perf_counter() - started
        except SQLAlchemyError:
            self.close()  # reconnect on the next sample
            return time.perf_counter() - started

    def busy(self) -> bool:
        try:
            conn = self._connection()
            with conn.begin():
                conn.execute(
                    text("SELECT set_config('statement_timeout', :ms, true)"),
                    {"ms": f"{PROBE_TIMEOUT_MS}ms"},
                )
                others = conn.execute(text(_FOREGROUND_SQL)).scalar()
            return bool(others)
        except SQLAlchemyError:
            self.close()
            return True

    def close(self) -> None:
        conn, self.conn = self.conn, None
        if conn is not None:
            with contextlib.suppress(SQLAlchemyError):
                conn.close()


# Other client sessions of this database that are working or just were; state is NULL for a
# session this role may not inspect, which counts (in doubt, the application is there).
_FOREGROUND_SQL = """
SELECT count(*) FROM pg_stat_activity
 WHERE datname = current_database() AND backend_type = 'client backend'
   AND pid <> pg_backend_pid()
   AND coalesce(application_name, '') NOT LIKE 'oauthmig%'
   AND (state IS NULL OR state <> 'idle'
        OR state_change > clock_timestamp() - interval '1 second')
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
    baseline: float | None = None  # seconds
    latency: float | None = None  # mean of the last decision's window, seconds
    reason: str = ""
    over: bool = False  # the last decision's window was over the bound
    quiet: bool = False  # the last decision's window saw no foreground
    _samples: list[float] = field(default_factory=list)
    _checks: int = 0  # foreground checks since the last decision
    _busy: int = 0  # of which saw the application
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

    def start(self) -> None:
        """Measure the baseline (before the first batch), then sample in the background."""
        if self.probe is None or self._thread is not None:
            return
        self.baseline = trimmed_mean([self.probe.sample() for _ in range(BASELINE_SAMPLES)])
        self._stop.clear()
        self._thread = threading.Thread(
            target=self._sample_loop, name="oauthmig-pacing", daemon=True
        )
        self._thread.start()

    def _sample_loop(self) -> None:
        assert self.probe is not None
        try:
            n = 0
            while not self._stop.wait(self.interval):
                self.add(self.probe.sample())
                n += 1
                if n % FOREGROUND_EVERY == 0:
                    self.add_foreground(self.probe.busy())
        finally:
            self.probe.close()  # its connection belongs to this thread

    def add(self, seconds: float) -> None:
        """One latency sample (from the background thread, or a caller that probes itself)."""
        with self._lock:
            self._samples.append(seconds)

    def add_foreground(self, busy: bool) -> None:
        """One foreground check (:meth:`LatencyProbe.busy`)."""
        with self._lock:
            self._checks += 1
            self._busy += busy

    def next(self) -> Pace:
        """After a batch: decide the pace from the samples since the last decision."""
        bf = self.settings
        if self.probe is None:
            return Pace(1.0, bf.target_batch_seconds, bf.duty(paced=False))
        with self._lock:
            window, ready = self._samples, len(self._samples) >= MIN_WINDOW
            quiet = self._checks > 0 and self._busy == 0
            if ready:
                self._samples, self._checks, self._busy = [], 0, 0
        if ready and self.baseline is not None:
            self.latency = trimmed_mean(window)
            self.quiet = quiet
            over = self.latency > self.bound() and not self.quiet
            if over and self.over:
                self.rate = max(MIN_RATE, self.rate * DECREASE)
            elif not over:
                self.rate = min(1.0, self.rate + STEP)
            self.over = over
            self.reason = self._reason() if self.rate < 1.0 else ""
        return Pace(self.rate, bf.target_batch_seconds * self.rate, bf.duty(paced=True) * self.rate)

    def bound(self) -> float:
        """The latency the probe may reach before the pace drops (seconds)."""
        assert self.baseline is not None
        return max(self.settings.max_latency_ratio * self.baseline, self.baseline + MIN_SLACK)

    def _reason(self) -> str:
        assert self.baseline is not None and self.latency is not None
        if self.quiet:
            return f"{PACED_PREFIX}{self.rate:.0%}: no other session at work, speeding up"
        verdict = ">" if self.latency > self.bound() else "<="
        return (
            f"{PACED_PREFIX}{self.rate:.0%}: probe {self.latency * 1000:.2f} ms {verdict} "
            f"bound {self.bound() * 1000:.2f} ms (baseline {self.baseline * 1000:.2f} ms "
            f"x {self.settings.max_latency_ratio:g})"
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
