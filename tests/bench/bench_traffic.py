"""Live traffic during the backfill (issue 12): pgbench tps and p99 without and with it.

One install (``setup_legacy(apps=200, tokens=N)`` then ``upgrade``, ``VACUUM ANALYZE``). A
pgbench workload of 4 clients plays the provider: look a token up by its hash, then extend its
expiry, one transaction each::

    SELECT ... FROM sentry_apitoken WHERE hashed_token = <hash of a random token>;
    UPDATE sentry_apitoken SET expires_at = now() + interval '1 hour' WHERE id = <that id>;

Phases of ``--phase-seconds`` each: (1) no backfill; (2) the token-families backfill with the
**default** config running the whole phase; (3) the same job with the pre-issue-12 throughput
settings (``batch_size`` 5000, ``target_batch_seconds`` 0.5, ``max_duty`` 1.0), for the
trade-off; (4) no backfill again. Ratios are against the mean of phases 1 and 4. The backfill
is stopped (paused, resumable) when its phase ends; a phase in which it finished early says
so. tps comes from pgbench, p99 from its per-transaction log.

Targets (default backfill vs no backfill): tps >= 0.8x, p99 <= 1.5x.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import text
from sqlalchemy.engine import make_url

from oauthmig.config import Settings
from oauthmig.demo.data import setup_legacy
from oauthmig.rollout.backfill import BackfillOptions, backfill
from oauthmig.rollout.runner import upgrade
from tests.bench.bench_common import (
    autocommit,
    load,
    machine,
    pass_fail,
    percentile,
    scratch_databases,
    single_db_settings,
)

PGBENCH = Path("/usr/lib/postgresql/15/bin/pgbench")
JOB = "token-families"
FAST = {"batch_size": 5000, "target_batch_seconds": 0.5, "max_duty": 1.0}


@dataclass(frozen=True, slots=True)
class TrafficPhase:
    """pgbench figures of one phase, and how much of it the backfill covered."""

    name: str
    tps: float
    p50_ms: float
    p99_ms: float
    max_ms: float
    transactions: int
    backfill_rows: int
    backfill_covered: float  # share of the phase during which the backfill was running
    load_before: str


def _script(token: str, max_id: int) -> str:
    return (
        f"\\set id random(1, {max_id})\n"
        "BEGIN;\n"
        f"SELECT id, user_id, scope_list, expires_at FROM {token} WHERE hashed_token = "
        f"(SELECT hashed_token FROM {token} WHERE id = :id);\n"
        f"UPDATE {token} SET expires_at = now() + interval '1 hour' WHERE id = :id;\n"
        "END;\n"
    )


def _pgbench(url: str, script: Path, seconds: int, workdir: Path) -> tuple[float, list[float]]:
    u = make_url(url)
    for old in workdir.glob("pgbench_log.*"):
        old.unlink()
    cmd = [
        str(PGBENCH),
        "-n",
        "-c",
        "4",
        "-j",
        "2",
        "-T",
        str(seconds),
        "-f",
        str(script),
        "-l",
        "-h",
        u.host or "127.0.0.1",
        "-p",
        str(u.port or 5432),
        "-U",
        u.username or "postgres",
        u.database or "postgres",
    ]
    out = subprocess.run(cmd, cwd=workdir, capture_output=True, text=True, check=True).stdout
    m = re.search(r"tps = ([\d.]+) \(without initial connection time\)", out)
    if not m:
        raise RuntimeError(f"unexpected pgbench output: {out}")
    latencies: list[float] = []
    for log in workdir.glob("pgbench_log.*"):
        for line in log.read_text().splitlines():
            parts = line.split()
            if len(parts) >= 3:
                latencies.append(int(parts[2]) / 1000.0)  # microseconds -> ms
    return float(m.group(1)), latencies


def _phase(
    name: str,
    url: str,
    script: Path,
    seconds: int,
    workdir: Path,
    settings: Settings | None,
) -> TrafficPhase:
    before = load()
    stop = threading.Event()
    rows = [0]
    ended = [0.0]
    thread: threading.Thread | None = None
    started = time.monotonic()
    if settings is not None:

        def work() -> None:
            result = backfill(settings, [JOB], BackfillOptions(), stop=stop)
            rows[0] = sum(r.rows_changed for r in result.runs)
            ended[0] = time.monotonic()

        thread = threading.Thread(target=work)
        thread.start()
        time.sleep(1.0)  # let the job start its batches before traffic is measured
        started = time.monotonic()
    tps, lat = _pgbench(url, script, seconds, workdir)
    finished = time.monotonic()
    covered = 0.0
    if thread is not None:
        stop.set()
        thread.join()
        end = ended[0] if ended[0] < finished else finished
        covered = max(0.0, min(1.0, (end - started) / (finished - started)))
    return TrafficPhase(
        name,
        tps,
        percentile(lat, 50),
        percentile(lat, 99),
        max(lat) if lat else 0.0,
        len(lat),
        rows[0],
        covered,
        before,
    )


def main(tokens: int, seconds: int, seed: int) -> bool:
    """Run the three phases, print the figures, return whether the targets are met."""
    print(f"== live traffic during the backfill: {tokens:,} tokens, {seconds} s per phase")
    print(machine())
    if not PGBENCH.is_file():
        raise RuntimeError(f"{PGBENCH} not found")
    workdir = Path(tempfile.mkdtemp(prefix="oauthmig-traffic-"))
    try:
        with scratch_databases("traffic") as dbs:
            url = dbs.create("main")
            default = single_db_settings(url)
            fast = single_db_settings(url, backfill=dict(FAST))
            t0 = time.perf_counter()
            setup_legacy(default, apps=200, tokens=tokens, seed=seed)
            result = upgrade(default)
            if result.failed:
                raise RuntimeError(f"upgrade failed: {result.failed}")
            token = default.tables.token
            engine = autocommit(url)
            with engine.connect() as conn:
                conn.execute(text("VACUUM ANALYZE"))
                max_id = int(conn.execute(text(f"SELECT max(id) FROM {token}")).scalar_one())
            engine.dispose()
            print(f"setup: {time.perf_counter() - t0:.1f} s")
            script = workdir / "lookup_extend.sql"
            script.write_text(_script(token, max_id))
            phases = [
                _phase("no backfill", url, script, seconds, workdir, None),
                _phase("default backfill", url, script, seconds, workdir, default),
                _phase("throughput settings", url, script, seconds, workdir, fast),
                _phase("no backfill, again", url, script, seconds, workdir, None),
            ]
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    # Reference: the mean of the two no-backfill phases (before and after), against drift in
    # the load other users put on the machine.
    first, last = phases[0], phases[-1]
    base = TrafficPhase(
        "baseline (mean)",
        (first.tps + last.tps) / 2,
        (first.p50_ms + last.p50_ms) / 2,
        (first.p99_ms + last.p99_ms) / 2,
        max(first.max_ms, last.max_ms),
        first.transactions + last.transactions,
        0,
        0.0,
        first.load_before,
    )
    print(
        "| phase | tps | tps ratio | p50 / p99 / max ms | p99 ratio | backfill rows | "
        "backfill ran | load before |"
    )
    print("| --- | ---: | ---: | --- | ---: | ---: | ---: | --- |")
    for p in phases:
        print(
            f"| {p.name} | {p.tps:,.0f} | {p.tps / base.tps:.2f} | {p.p50_ms:.1f} / "
            f"{p.p99_ms:.1f} / {p.max_ms:.0f} | {p.p99_ms / base.p99_ms:.2f} | "
            f"{p.backfill_rows:,} | {p.backfill_covered:.0%} | {p.load_before} |"
        )
    d = phases[1]
    tps_ok = d.tps >= 0.8 * base.tps
    p99_ok = d.p99_ms <= 1.5 * base.p99_ms
    covered_ok = d.backfill_covered >= 0.95
    print(f"default backfill tps >= 0.8x baseline: {pass_fail(tps_ok)}")
    print(f"default backfill p99 <= 1.5x baseline: {pass_fail(p99_ok)}")
    print(f"backfill ran through the whole phase: {pass_fail(covered_ok)}")
    print(f"load after: {load()}")
    return tps_ok and p99_ok and covered_ok
