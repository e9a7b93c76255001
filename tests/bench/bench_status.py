"""Benchmark (issue 14): ``oauthmig status`` wall time on 1M and 5M-row token tables.

For each size, one PostgreSQL database hosting the three Sentry-shaped legacy tables (the
token table with its 11 indexes). The tokens come from one ``INSERT ... SELECT
generate_series`` (64-character random-looking tokens and hashes, every fourth without a
refresh token); the token table's secondary indexes and unique constraints are dropped for the
load and rebuilt after it, then ``VACUUM ANALYZE``, then ``upgrade`` (expand). ``status`` is
timed in two states: the backfill not started (no job row), and paused after its first batch.
Each figure is the median of five in-process runs of the real CLI entry point
(``oauthmig.cli.run(["status"])``: config, connection, every query, rendering); one
``status`` run as a subprocess adds the interpreter's start-up, which CI pays too (measured
alone as ``oauthmig --version``). For
contrast: ``status --exact`` (a full count) once per state, and the estimate's error against
it.

Target: ``status`` under 1 s, independent of the number of rows (the 5M figure within 0.2 s of
the 1M one).
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import text

from oauthmig.cli import run
from oauthmig.config import Settings
from oauthmig.db import make_engine
from oauthmig.legacy import USERS_TABLE, legacy_metadata, user_rows
from oauthmig.rollout.backfill import BackfillOptions, backfill
from oauthmig.rollout.jobs import JOBS
from oauthmig.rollout.remaining import remaining
from oauthmig.rollout.runner import upgrade
from tests.bench.bench_common import (
    autocommit,
    load,
    machine,
    pass_fail,
    scratch_databases,
    single_db_settings,
)
from tests.helpers import write_config

TARGET_SECONDS = 1.0
FLAT_SECONDS = 0.2  # "independent of the row count": the largest size within this of the smallest
RUNS = 5
JOB = "token-families"


@dataclass(frozen=True, slots=True)
class StateTiming:
    """``status`` in one state of the job on one table size."""

    state: str
    median: float
    runs: tuple[float, ...]
    subprocess_seconds: float
    exact_seconds: float
    estimated: int
    exact: int
    load_before: str


def _load_tokens(settings: Settings, url: str, tokens: int) -> float:
    """Create the legacy tables and fill the token table with one INSERT ... SELECT; seconds."""
    t0 = time.perf_counter()
    md = legacy_metadata(settings.tables, ("application", "grant", "token"))
    engine = make_engine(settings.databases["main"], settings)
    token = settings.tables.token
    try:
        md.create_all(engine)
        with engine.begin() as conn:
            conn.execute(md.tables[USERS_TABLE].insert(), user_rows(1000))
            rebuild = [
                str(r[0])
                for r in conn.execute(
                    text(
                        "SELECT 'ALTER TABLE ' || conrelid::regclass || ' ADD CONSTRAINT ' || "
                        "conname || ' ' || pg_get_constraintdef(oid) FROM pg_constraint "
                        "WHERE conrelid = to_regclass(:t) AND contype = 'u'"
                    ),
                    {"t": token},
                )
            ]
            rebuild += [
                str(r[0])
                for r in conn.execute(
                    text(
                        "SELECT pg_get_indexdef(i.indexrelid) FROM pg_index i WHERE "
                        "i.indrelid = to_regclass(:t) AND NOT i.indisprimary AND NOT "
                        "i.indisunique"
                    ),
                    {"t": token},
                )
            ]
            for (name,) in conn.execute(
                text(
                    "SELECT conname FROM pg_constraint WHERE conrelid = to_regclass(:t) "
                    "AND contype = 'u'"
                ),
                {"t": token},
            ).all():
                conn.execute(text(f"ALTER TABLE {token} DROP CONSTRAINT {name}"))
            for (name,) in conn.execute(
                text(
                    "SELECT c.relname FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid "
                    "WHERE i.indrelid = to_regclass(:t) AND NOT i.indisprimary"
                ),
                {"t": token},
            ).all():
                conn.execute(text(f"DROP INDEX {name}"))
            conn.execute(
                text(
                    f"INSERT INTO {token} (id, user_id, token, hashed_token, "
                    "token_last_characters, refresh_token, hashed_refresh_token, token_type, "
                    "scope_list, expires_at, date_added, scopes) "
                    "SELECT g, 1 + g % 1000, md5('t' || g) || md5('u' || g), "
                    "md5('h' || g) || md5('i' || g), right(md5('t' || g), 4), "
                    "CASE WHEN g % 4 = 0 THEN NULL ELSE md5('r' || g) || md5('s' || g) END, "
                    "CASE WHEN g % 4 = 0 THEN NULL ELSE md5('q' || g) || md5('p' || g) END, "
                    "'bearer', '{project:read}', now() + interval '30 days', now(), 0 "
                    "FROM generate_series(1, CAST(:n AS bigint)) AS g"
                ),
                {"n": tokens},
            )
        with engine.begin() as conn:  # a new transaction: the deferred FK checks ran at COMMIT
            for ddl in rebuild:
                conn.execute(text(ddl))
    finally:
        engine.dispose()
    engine = autocommit(url)
    try:
        with engine.connect() as conn:
            conn.execute(text("VACUUM ANALYZE"))
    finally:
        engine.dispose()
    result = upgrade(settings)
    if result.failed:
        raise RuntimeError(f"upgrade failed: {result.failed}")
    return time.perf_counter() - t0


def _in_process(cfg: str, *args: str) -> float:
    devnull = open(os.devnull, "w")  # noqa: SIM115 - restored below
    saved = sys.stdout
    sys.stdout = devnull
    try:
        t0 = time.perf_counter()
        code = run(["--config", cfg, "status", *args])
        seconds = time.perf_counter() - t0
    finally:
        sys.stdout = saved
        devnull.close()
    if code not in (0, 1):
        raise RuntimeError(f"status exited {code}")
    return seconds


def _subprocess(*args: str) -> float:
    oauthmig = Path(sys.executable).with_name("oauthmig")
    t0 = time.perf_counter()
    done = subprocess.run([str(oauthmig), *args], capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - t0
    if done.returncode not in (0, 1):
        raise RuntimeError(f"status exited {done.returncode}: {done.stderr[-300:]}")
    return seconds


def _remaining(settings: Settings, exact: bool) -> int:
    engine = make_engine(settings.databases["main"], settings)
    try:
        with engine.connect() as conn:
            left = remaining(conn, settings, "main", JOBS[JOB], exact=exact)
        return int(left.rows or 0)
    finally:
        engine.dispose()


def _time_state(settings: Settings, cfg: str, state: str) -> StateTiming:
    before = load()
    _in_process(cfg)  # warm: the first run also reads the catalog into the cache
    runs = tuple(_in_process(cfg) for _ in range(RUNS))
    sub = _subprocess("--config", cfg, "status")
    exact = _in_process(cfg, "--exact")
    return StateTiming(
        state,
        statistics.median(runs),
        runs,
        sub,
        exact,
        _remaining(settings, exact=False),
        _remaining(settings, exact=True),
        before,
    )


def _pause_after_first_batch(settings: Settings) -> int:
    stop = threading.Event()
    result = backfill(
        settings, [JOB], BackfillOptions(batch_size=5000), lambda *_: stop.set(), stop
    )
    (job,) = result.runs
    if job.status != "paused":
        raise RuntimeError(f"expected a paused job, got {job}")
    return job.rows_changed


def main(*, sizes: list[int]) -> bool:
    """Time ``status`` on each token-table size; True if every target is met."""
    print(f"== status: wall time on {', '.join(f'{n:,}' for n in sizes)}-row token tables")
    print(f"   {machine()}")
    medians: dict[int, list[float]] = {}
    ok = True
    startup = statistics.median(_subprocess("--version") for _ in range(3))
    print(f"   interpreter start-up and imports (`oauthmig --version`): {startup:.2f} s")
    with scratch_databases("st") as dbs, tempfile.TemporaryDirectory() as tmp:
        for n in sizes:
            url = dbs.create(f"{n}")
            settings = single_db_settings(url)
            cfg = write_config(Path(tmp) / f"{n}.toml", {"databases": {"main": {"url": url}}})
            loaded = _load_tokens(settings, url, n)
            print(f"-- {n:,} tokens (loaded, indexed, analyzed, expanded in {loaded:.0f} s)")
            timings = [_time_state(settings, cfg, "not started")]
            done = _pause_after_first_batch(settings)
            timings.append(_time_state(settings, cfg, f"paused after {done:,} rows"))
            for st in timings:
                err = (st.estimated - st.exact) / st.exact if st.exact else 0.0
                good = st.median < TARGET_SECONDS
                ok &= good
                print(
                    f"  {st.state:<28} status median {st.median:.3f} s "
                    f"(runs {', '.join(f'{r:.3f}' for r in st.runs)}); as a subprocess "
                    f"{st.subprocess_seconds:.2f} s; --exact {st.exact_seconds:.2f} s; "
                    f"estimate {st.estimated:,} vs exact {st.exact:,} ({100 * err:+.2f} %); "
                    f"load before {st.load_before}; {pass_fail(good)}"
                )
            medians[n] = [st.median for st in timings]
            dbs.drop_all()
    if len(sizes) > 1:
        small, large = medians[min(sizes)], medians[max(sizes)]
        spread = max(b - a for a, b in zip(small, large, strict=True))
        flat = spread <= FLAT_SECONDS
        ok &= flat
        print(
            f"summary: status grows by at most {spread:+.3f} s from {min(sizes):,} to "
            f"{max(sizes):,} rows (target <= {FLAT_SECONDS} s): {pass_fail(flat)}; "
            f"every median < {TARGET_SECONDS} s: {pass_fail(ok)}"
        )
    return ok
