"""Benchmark (issue 26): the rollout over a fleet of 64 PostgreSQL databases.

64 scratch databases on the local server: the first 4 host the three Sentry-shaped legacy tables,
the other 60 only the token table (two table sets, as real cells), each with ``--tokens``
legacy tokens (and as many applications where hosted). Measured:

* the whole rollout (``upgrade``, ``backfill``, ``upgrade``, each one CLI process) with
  ``--jobs 1`` and then, on fresh tables, ``--jobs 8``: wall time of each step;
* the resident memory of the ``--jobs 1`` runner, sampled from ``/proc/PID/status`` every
  50 ms: it must stay flat while it walks the 64 databases. The first half of a run includes
  warming up (imports, the revision scripts, SQLAlchemy's statement caches); flat means the
  second half adds at most ``RSS_FLAT`` to the RSS at mid-run (memory kept per database would
  keep growing to the end);
* ``status --summary`` over the 64 databases: median of five in-process runs of the real CLI
  entry point, and one run as a process (interpreter start-up included).

Target: ``status --summary`` under 2 s; the runner's RSS flat.
"""

from __future__ import annotations

import contextlib
import io
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from sqlalchemy import insert, text

from oauthmig.cli import run
from oauthmig.config import Settings, settings_from_mapping
from oauthmig.db import make_engine
from oauthmig.legacy import USERS_TABLE, legacy_metadata, user_rows
from tests.bench.bench_common import load, machine, pass_fail, scratch_databases
from tests.helpers import write_config

DATABASES = 64
CONTROLS = 4
SUMMARY_TARGET = 2.0
RSS_FLAT = 0.05  # peak RSS at most 5 % above the RSS at mid-run
RUNS = 5


def _config(urls: list[str]) -> dict[str, object]:
    names = [f"cell{i:02d}" for i in range(len(urls))]
    return {
        "databases": {n: {"url": u} for n, u in zip(names, urls, strict=True)},
        "routing": {
            "application": names[:CONTROLS],
            "grant": names[:CONTROLS],
            "token": names,
        },
        "waves": {"canary": names[:1], "ring1": names[1:16]},
    }


def _fill(settings: Settings, tokens: int) -> None:
    """Fresh legacy tables with ``tokens`` tokens (and applications where hosted) everywhere."""
    import datetime as dt

    now = dt.datetime(2025, 1, 1, tzinfo=dt.UTC)
    for name in settings.database_names():
        routed = settings.tables_on(name)
        engine = make_engine(settings.databases[name], settings)
        try:
            with engine.begin() as conn:
                conn.execute(text("DROP SCHEMA public CASCADE"))
                conn.execute(text("CREATE SCHEMA public"))
            md = legacy_metadata(settings.tables, routed)
            md.create_all(engine)
            with engine.begin() as conn:
                conn.execute(insert(md.tables[USERS_TABLE]), user_rows(100))
                if "application" in routed:
                    conn.execute(
                        insert(md.tables[settings.tables.application]),
                        [
                            {
                                "id": i,
                                "client_id": f"{name}-c{i}",
                                "client_secret": None if i % 3 == 0 else f"s{i}",
                                "name": f"app {i}",
                                "redirect_uris": f"https://a{i}.example.com/cb",
                                "scopes": ["org:read"],
                                "date_added": now,
                                "owner_id": 1 + i % 100,
                            }
                            for i in range(1, tokens + 1)
                        ],
                    )
                conn.execute(
                    insert(md.tables[settings.tables.token]),
                    [
                        {
                            "id": i,
                            "user_id": 1 + i % 100,
                            "application_id": None,
                            "token": f"{name}-t{i}",
                            "hashed_token": f"{name}-h{i}",
                            "refresh_token": None if i % 4 == 0 else f"{name}-r{i}",
                            "scope_list": ["project:read"],
                            "date_added": now,
                            "scopes": 0,
                        }
                        for i in range(1, tokens + 1)
                    ],
                )
        finally:
            engine.dispose()


def _rss_kib(pid: int) -> int | None:
    with contextlib.suppress(OSError, ValueError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return None


def _cli(cfg: str, *args: str, sample: bool = False) -> tuple[float, list[int]]:
    """Run ``oauthmig --config cfg ARGS`` as a process; its wall time and RSS samples (KiB)."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    started = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-m", "oauthmig", "--config", cfg, "-q", *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    samples: list[int] = []
    while proc.poll() is None:
        if sample:
            rss = _rss_kib(proc.pid)
            if rss is not None:
                samples.append(rss)
        time.sleep(0.05)
    seconds = time.perf_counter() - started
    err = proc.stderr.read() if proc.stderr else ""
    if proc.returncode != 0:
        raise RuntimeError(f"oauthmig {' '.join(args)} exited {proc.returncode}: {err[-500:]}")
    return seconds, samples


def _rollout(cfg: str, jobs: int, sample: bool) -> tuple[list[float], list[list[int]]]:
    steps = (("upgrade",), ("backfill",), ("upgrade",))
    times: list[float] = []
    rss: list[list[int]] = []
    for step in steps:
        seconds, samples = _cli(cfg, *step, "--jobs", str(jobs), sample=sample)
        times.append(seconds)
        rss.append(samples)
    return times, rss


def _flat(samples: list[int]) -> tuple[list[int], int, bool]:
    """(RSS at 25, 50 and 75 % of the run, peak RSS, flat?) in KiB."""
    if len(samples) < 8:
        return [], max(samples, default=0), True
    quarters = [samples[len(samples) * q // 4] for q in (1, 2, 3)]
    peak = max(samples)
    return quarters, peak, peak <= quarters[1] * (1 + RSS_FLAT)


def main(tokens: int = 200) -> bool:
    """Run the benchmark and print the results; True when the targets are met."""
    print(f"== fleet: {DATABASES} PostgreSQL databases, {tokens} tokens each")
    print(f"machine: {machine()}")
    ok = True
    with scratch_databases("fleet") as scratch, tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        urls = [scratch.create(f"{i:02d}") for i in range(DATABASES)]
        data = _config(urls)
        settings = settings_from_mapping(data, {}, "bench fleet")
        cfg = write_config(Path(tmp) / "oauthmig.toml", data)
        _fill(settings, tokens)
        print(f"setup: {time.perf_counter() - t0:.1f}s (create, fill)")
        for jobs in (1, 8):
            if jobs != 1:
                _fill(settings, tokens)
            before = load()
            times, rss = _rollout(cfg, jobs, sample=jobs == 1)
            print(
                f"rollout --jobs {jobs}: upgrade {times[0]:.1f}s, backfill {times[1]:.1f}s, "
                f"upgrade {times[2]:.1f}s, total {sum(times):.1f}s (load before: {before})"
            )
            if jobs == 1:
                for step, samples in zip(("upgrade", "backfill", "finalize"), rss, strict=True):
                    quarters, peak, flat = _flat(samples)
                    ok &= flat
                    at = " / ".join(f"{q / 1024:.0f}" for q in quarters)
                    print(
                        f"  RSS {step} --jobs 1: {at} MiB at 25/50/75 % of the run, peak "
                        f"{peak / 1024:.0f} MiB ({len(samples)} samples): {pass_fail(flat)}"
                    )
        timings: list[float] = []
        before = load()
        for _ in range(RUNS):
            started = time.perf_counter()
            with contextlib.redirect_stdout(io.StringIO()):
                code = run(["--config", cfg, "status", "--summary"])
            timings.append(time.perf_counter() - started)
            if code != 0:
                raise RuntimeError(f"status --summary exited {code}")
        proc_seconds, _ = _cli(cfg, "status", "--summary")
        median = statistics.median(timings)
        good = median < SUMMARY_TARGET
        ok &= good
        print(
            f"status --summary over {DATABASES}: median {median:.2f}s of {RUNS} in-process runs "
            f"({', '.join(f'{t:.2f}' for t in timings)}), as a process {proc_seconds:.2f}s; "
            f"target < {SUMMARY_TARGET:.0f}s: {pass_fail(good)} (load before: {before})"
        )
    return ok
