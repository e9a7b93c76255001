"""Live traffic during the backfill (issues 12 and 24): pgbench tps and p99 without and with it.

One install (``setup_legacy(apps=200, tokens=N)`` then ``upgrade``, ``VACUUM ANALYZE``). A
pgbench workload of 4 clients plays the provider, a weighted mix of three transactions
(``-f script@weight``):

* 80 %: look a token up by its hash (``WHERE hashed_token = (SELECT hashed_token ... WHERE id =
  <random id>)``: the subselect stands for the hash the provider computes);
* 15 %: refresh in place, as Sentry's legacy code does: new token and refresh token strings and
  their sha256 hashes, expiry extended, on a random token with a refresh token;
* 5 %: a new token, inserted naming only the legacy columns (``token_family_id`` NULL: the
  backfill's catch-up pass has it to fill).

Rounds (``--rounds``, default 2), back to back, each of two ``--phase-seconds`` phases: (1) no
backfill (the round's baseline); (2) the token-families backfill with the **default** config
(latency pacing on, ``max_latency_ratio`` 1.5) running through the whole phase. Ratios are
against the same round's baseline. The backfill is stopped (paused, resumable) when its phase
ends and resumed by the next round. tps comes from pgbench, p99 from its per-transaction log.
The load average is printed before every phase.

Then, with no traffic, the backfill's own throughput for ``--phase-seconds`` each: default
config, pacing off (``max_latency_ratio = 0``, ``max_duty = 1.0``), default again.

Targets: during the default backfill tps >= 0.8x and p99 <= 1.5x the baseline, the backfill
progressing; with no traffic, the default's rows/s >= 0.8x of pacing off.
"""

from __future__ import annotations

import shutil
import statistics
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
from oauthmig.rollout.backfill import BackfillOptions, JobSample, backfill
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
PACING_OFF = {"max_latency_ratio": 0, "max_duty": 1.0}


@dataclass(frozen=True, slots=True)
class TrafficPhase:
    """pgbench figures of one phase, and what the backfill did meanwhile."""

    name: str
    tps: float
    p50_ms: float
    p99_ms: float
    max_ms: float
    transactions: int
    backfill_rows: int
    backfill_covered: float  # share of the phase during which the backfill was running
    load_before: str
    pace: str = ""  # latency pacing's pace over the phase: min / median / last


def _scripts(token: str, max_id: int, workdir: Path) -> list[str]:
    """The three pgbench scripts of the provider-shaped mix, as ``-f path@weight`` values."""
    pick = f"\\set id random(1, {max_id})\n"
    new = (
        "(SELECT md5(random()::text) || md5(random()::text) AS t, "
        "md5(random()::text) || md5(random()::text) AS r) AS n"
    )

    def sha(col: str) -> str:
        return f"encode(sha256(convert_to({col}, 'UTF8')), 'hex')"

    scripts = {
        "lookup": pick
        + f"SELECT id, user_id, scope_list, expires_at FROM {token} WHERE hashed_token = "
        f"(SELECT hashed_token FROM {token} WHERE id = :id);\n",
        "refresh": pick
        + f"UPDATE {token} SET token = n.t, hashed_token = {sha('n.t')}, refresh_token = n.r, "
        f"hashed_refresh_token = {sha('n.r')}, expires_at = now() + interval '1 hour' "
        f"FROM {new} WHERE {token}.id = :id AND {token}.refresh_token IS NOT NULL;\n",
        "insert": pick
        + f"INSERT INTO {token} (user_id, application_id, token, hashed_token, refresh_token, "
        "hashed_refresh_token, token_type, scope_list, expires_at, date_added, scopes) "
        f"SELECT o.user_id, o.application_id, n.t, {sha('n.t')}, n.r, {sha('n.r')}, "
        "o.token_type, o.scope_list, now() + interval '1 hour', now(), o.scopes "
        f"FROM {token} AS o, {new} WHERE o.id = :id;\n",
    }
    weights = {"lookup": 80, "refresh": 15, "insert": 5}
    out = []
    for name, sql in scripts.items():
        path = workdir / f"{name}.sql"
        path.write_text(sql)
        out.append(f"{path}@{weights[name]}")
    return out


LEAD = 2.0  # seconds of traffic before the measured window (the backfill joins after 1 s)


def _pgbench(url: str, scripts: list[str], seconds: int, workdir: Path) -> subprocess.Popen[str]:
    """Start the mix for ``LEAD + seconds`` seconds, logging every transaction (``-l``)."""
    u = make_url(url)
    for old in workdir.glob("pgbench_log.*"):
        old.unlink()
    cmd = [str(PGBENCH), "-n", "-c", "4", "-j", "2", "-T", str(int(LEAD) + seconds)]
    for script in scripts:
        cmd += ["-f", script]
    cmd += [
        "-l",
        "-h",
        u.host or "127.0.0.1",
        "-p",
        str(u.port or 5432),
        "-U",
        u.username or "postgres",
        u.database or "postgres",
    ]
    return subprocess.Popen(
        cmd, cwd=workdir, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def _measured(
    proc: subprocess.Popen[str], workdir: Path, window_start: float
) -> tuple[float, list[float]]:
    """tps and latencies (ms) of the transactions that ended after ``window_start`` (epoch)."""
    _, err = proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"pgbench failed: {err.strip()[-2000:]}")
    latencies: list[float] = []
    last = window_start
    for log in workdir.glob("pgbench_log.*"):
        for line in log.read_text().splitlines():
            # client, transaction, latency us, script, epoch s, epoch us
            parts = line.split()
            if len(parts) < 6:
                continue
            ended = int(parts[4]) + int(parts[5]) / 1e6
            if ended >= window_start:
                latencies.append(int(parts[2]) / 1000.0)
                last = max(last, ended)
    span = last - window_start
    return (len(latencies) / span if span > 0 else 0.0), latencies


def _pace_summary(samples: list[JobSample]) -> str:
    paces = [s.pace for s in samples if s.state == "running" and s.pace is not None]
    if not paces:
        return "off"
    return f"{min(paces):.2f} / {statistics.median(paces):.2f} / {paces[-1]:.2f}"


def _phase(
    name: str,
    url: str,
    scripts: list[str],
    seconds: int,
    workdir: Path,
    settings: Settings | None,
) -> TrafficPhase:
    before = load()
    stop = threading.Event()
    rows = [0]
    ended = [0.0]
    samples: list[JobSample] = []
    thread: threading.Thread | None = None
    # The traffic runs first: the backfill measures its baseline under the live traffic, as it
    # would in production, and the measured window starts once it has started.
    window_start = time.time() + LEAD
    proc = _pgbench(url, scripts, seconds, workdir)
    if settings is not None:

        def work() -> None:
            result = backfill(settings, [JOB], BackfillOptions(), stop=stop, observe=samples.append)
            rows[0] = sum(r.rows_changed for r in result.runs)
            ended[0] = time.time()

        time.sleep(LEAD / 2)
        thread = threading.Thread(target=work)
        thread.start()
    tps, lat = _measured(proc, workdir, window_start)
    finished = time.time()
    covered = 0.0
    if thread is not None:
        stop.set()
        thread.join()
        end = ended[0] if 0 < ended[0] < finished else finished
        covered = max(0.0, min(1.0, (end - window_start) / (finished - window_start)))
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
        _pace_summary(samples) if settings is not None else "",
    )


def _idle(name: str, settings: Settings, seconds: int) -> tuple[str, float, str, str, bool]:
    """The backfill alone for ``seconds``: ``(name, rows/s, pace summary, load before, whether
    it ran the whole window)``: a job that ran out of rows measured less than a phase."""
    before = load()
    stop = threading.Event()
    samples: list[JobSample] = []
    timer = threading.Timer(seconds, stop.set)
    timer.start()
    t0 = time.monotonic()
    result = backfill(settings, [JOB], BackfillOptions(), stop=stop, observe=samples.append)
    spent = time.monotonic() - t0
    timer.cancel()
    rows = sum(r.rows_changed for r in result.runs)
    return name, rows / spent, _pace_summary(samples), before, spent >= 0.95 * seconds


def main(tokens: int, seconds: int, seed: int, rounds: int = 2, ratio: float | None = None) -> bool:
    """Run the rounds and the idle comparison, print the figures, return whether the targets
    are met."""
    print(
        f"== live traffic during the backfill: {tokens:,} tokens, {seconds} s per phase, "
        f"max_latency_ratio {'default' if ratio is None else ratio}"
    )
    print(machine())
    if not PGBENCH.is_file():
        raise RuntimeError(f"{PGBENCH} not found")
    workdir = Path(tempfile.mkdtemp(prefix="oauthmig-traffic-"))
    try:
        with scratch_databases("traffic") as dbs:
            url = dbs.create("main")
            default = single_db_settings(
                url, backfill=None if ratio is None else {"max_latency_ratio": ratio}
            )
            off = single_db_settings(url, backfill=dict(PACING_OFF))
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
            scripts = _scripts(token, max_id, workdir)
            pairs: list[tuple[TrafficPhase, TrafficPhase]] = []
            for r in range(1, rounds + 1):
                base = _phase(f"r{r} no backfill", url, scripts, seconds, workdir, None)
                during = _phase(f"r{r} default backfill", url, scripts, seconds, workdir, default)
                pairs.append((base, during))
            idle = [
                _idle("default", default, seconds),
                _idle("pacing off", off, seconds),
                _idle("default, again", default, seconds),
            ]
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    print(
        "| phase | tps | tps ratio | p50 / p99 / max ms | p99 ratio | backfill rows | "
        "backfill ran | pace min / median / last | load before |"
    )
    print("| --- | ---: | ---: | --- | ---: | ---: | ---: | --- | --- |")
    ok = True
    for base, during in pairs:
        for p in (base, during):
            ran = f"{p.backfill_covered:.0%}" if p is during else "–"
            print(
                f"| {p.name} | {p.tps:,.0f} | {p.tps / base.tps:.2f} | {p.p50_ms:.1f} / "
                f"{p.p99_ms:.1f} / {p.max_ms:.0f} | {p.p99_ms / base.p99_ms:.2f} | "
                f"{p.backfill_rows:,} | {ran} | {p.pace or '–'} | {p.load_before} |"
            )
        ok &= during.tps >= 0.8 * base.tps and during.p99_ms <= 1.5 * base.p99_ms
        ok &= during.backfill_rows > 0 and during.backfill_covered >= 0.95
    print()
    print("| no traffic | rows/s | pace min / median / last | load before |")
    print("| --- | ---: | --- | --- |")
    for name, rate, pace, before, whole in idle:
        ran_out = "" if whole else " (ran out of rows: raise --traffic-tokens)"
        print(f"| {name}{ran_out} | {rate:,.0f} | {pace} | {before} |")
    default_rate = (idle[0][1] + idle[2][1]) / 2
    idle_ok = default_rate >= 0.8 * idle[1][1] and all(whole for *_, whole in idle)
    print(
        "default backfill tps >= 0.8x and p99 <= 1.5x baseline, progressing, every round: "
        f"{pass_fail(ok)}"
    )
    print(
        f"no traffic: default {default_rate:,.0f} rows/s >= 0.8x pacing off "
        f"{idle[1][1]:,.0f}: {pass_fail(idle_ok)}"
    )
    print(f"load after: {load()}")
    return ok and idle_ok
