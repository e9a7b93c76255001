"""Benchmark (issue 20): what the compatibility triggers cost the provider's legacy writes.

One PostgreSQL database with Sentry's legacy tables (all 11 token indexes), upgraded to 0003
(the expand revisions install the compatibility triggers), ``seed`` tokens whose families the
token-families backfill filled. pgbench (4 clients) plays the legacy code in two workloads:

* ``insert``: an INSERT of a token with a refresh token naming only the legacy columns (the
  trigger computes the family and records the row in ``oauthmig_compat_token``);
* ``update``: Sentry's in-place refresh, new ``token`` and ``refresh_token`` on an existing row
  (the trigger's WHEN clause runs; the row has its family, so the function does not).

Each workload runs in phases alternating without the layer (triggers dropped) and with it
(reinstalled), ``rounds`` times, the order flipped each round, so drift (the shared machine,
the table's growing bloat) hits both sides. The figure is
tps with / tps without, per workload (median over rounds). Not a pass/fail target: the cost is
reported (docs/benchmarks.md).
"""

from __future__ import annotations

import re
import statistics
import subprocess
import tempfile
from pathlib import Path

from sqlalchemy import text
from sqlalchemy.engine import make_url

from oauthmig.db import make_engine
from oauthmig.legacy import USERS_TABLE, legacy_metadata, user_rows
from oauthmig.rollout import compat
from oauthmig.rollout.backfill import BackfillOptions, backfill
from oauthmig.rollout.runner import upgrade
from tests.bench.bench_common import load, machine, scratch_databases, single_db_settings

PGBENCH = Path("/usr/lib/postgresql/15/bin/pgbench")

_SECRET = "md5(random()::text) || md5(random()::text)"
INSERT_SQL = (
    "\\set u random(1, 100)\n"
    "INSERT INTO sentry_apitoken (user_id, token, token_last_characters, refresh_token, "
    "scope_list, expires_at, date_added, scopes) VALUES "
    f"(:u, {_SECRET}, 'abcd', {_SECRET}, '{{project:read}}', now() + interval '8 hours', "
    "now(), 0);\n"
)
UPDATE_SQL = (
    "\\set id random(1, {seed})\n"
    f"UPDATE sentry_apitoken SET token = {_SECRET}, refresh_token = {_SECRET}, "
    "expires_at = now() + interval '8 hours' WHERE id = :id;\n"
)


def _pgbench(url: str, script: Path, seconds: int) -> float:
    u = make_url(url)
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
        "-h",
        u.host or "127.0.0.1",
        "-p",
        str(u.port or 5432),
        "-U",
        u.username or "postgres",
        u.database or "postgres",
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    m = re.search(r"tps = ([\d.]+) \(without initial connection time\)", out)
    if not m:
        raise RuntimeError(f"unexpected pgbench output: {out}")
    return float(m.group(1))


def main(*, seed: int = 100_000, seconds: int = 15, rounds: int = 2) -> bool:
    """Run the benchmark and print the figures; always True (a measurement, no target)."""
    print(f"compat: {machine()}, load {load()}; {seed:,} seeded tokens, {seconds}s phases")
    with scratch_databases("compat") as dbs, tempfile.TemporaryDirectory() as tmp:
        url = dbs.create("main")
        settings = single_db_settings(url)
        engine = make_engine(settings.databases["main"], settings)
        md = legacy_metadata(settings.tables, ("application", "grant", "token"))
        md.create_all(engine)
        with engine.begin() as conn:
            conn.execute(md.tables[USERS_TABLE].insert(), user_rows(100))
            conn.execute(
                text(
                    "INSERT INTO sentry_apitoken (user_id, token, refresh_token, scope_list, "
                    "date_added, scopes) SELECT 1 + g % 100, md5(g::text) || 'a', "
                    "md5(g::text) || 'r', '{project:read}', now(), 0 "
                    "FROM generate_series(1, :n) g"
                ),
                {"n": seed},
            )
        upgrade(settings)  # 0001-0003: the compatibility triggers are installed
        backfill(settings, ["token-families"], BackfillOptions())
        target = compat.CompatTarget(
            "postgresql", "main", {"token": "sentry_apitoken"}, settings.backfill.client_metadata
        )
        scripts = {"insert": Path(tmp, "insert.sql"), "update": Path(tmp, "update.sql")}
        scripts["insert"].write_text(INSERT_SQL)
        scripts["update"].write_text(UPDATE_SQL.format(seed=seed))
        results: dict[str, dict[bool, list[float]]] = {w: {True: [], False: []} for w in scripts}
        for r in range(rounds):
            # ABBA: the order flips each round, so the table's growing bloat (every in-place
            # refresh leaves a dead row in 11 indexes) does not always fall on one side.
            for with_layer in (False, True) if r % 2 == 0 else (True, False):
                sql = compat.install_sql if with_layer else compat.remove_sql
                with engine.begin() as conn:
                    for stmt in sql(target, "token"):
                        conn.execute(text(stmt))
                for workload, script in scripts.items():
                    tps = _pgbench(url, script, seconds)
                    results[workload][with_layer].append(tps)
                    label = "with" if with_layer else "without"
                    print(f"  {workload:6} {label:7} layer: {tps:9.1f} tps")
        engine.dispose()
    for workload, by in results.items():
        off, on = statistics.median(by[False]), statistics.median(by[True])
        print(
            f"compat {workload}: {off:.1f} tps without, {on:.1f} tps with the layer: "
            f"ratio {on / off:.3f} ({(1 - on / off) * 100:+.1f} % cost)"
        )
    return True
