"""``python -m tests.bench [backfill|rules|audit|traffic|health|status|compat|fleet|startup ...]
[options]``:
benchmarks.

Prints the results.

With no benchmark named, all of them run. Exit status 1 when a target is missed (the figures are
still printed), 2 on a usage error.
"""

from __future__ import annotations

import argparse
import signal
import sys
from collections.abc import Sequence

BENCHMARKS = (
    "backfill",
    "rules",
    "audit",
    "traffic",
    "health",
    "status",
    "compat",
    "fleet",
    "startup",
)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m tests.bench",
        description="oauthmig benchmarks (see docs/benchmarks.md)",
    )
    p.add_argument(
        "benchmarks",
        nargs="*",
        metavar="BENCHMARK",
        help="backfill, rules, audit, traffic, health, status, compat, fleet and/or startup "
        "(default: all)",
    )
    p.add_argument("--seed", type=int, default=42, help="demo data seed (default 42)")
    g = p.add_argument_group("backfill")
    g.add_argument("--tokens", type=int, default=1_000_000, help="legacy tokens (default 1M)")
    g.add_argument(
        "--bf-apps", type=int, default=1000, help="applications beside the tokens (default 1000)"
    )
    g.add_argument(
        "--rounds",
        type=int,
        default=2,
        help="A/B rounds, alternating which copy is timed first (default 2)",
    )
    g.add_argument(
        "--wait-quiet",
        type=float,
        default=600.0,
        metavar="SECONDS",
        help="before each timed run, wait up to this long for 20 s without other users' "
        "statements on the PostgreSQL server (0: do not wait; default 600)",
    )
    g.add_argument(
        "--max-wal-size",
        metavar="SIZE",
        help="the server's max_wal_size during the runs (ALTER SYSTEM, reset afterwards), "
        "e.g. 8GB (default: leave it)",
    )
    g.add_argument(
        "--profile",
        action="store_true",
        help="time each kind of statement and commit inside the backfill run",
    )
    g = p.add_argument_group("traffic")
    g.add_argument(
        "--traffic-tokens", type=int, default=1_200_000, help="legacy tokens (default 1.2M)"
    )
    g.add_argument(
        "--phase-seconds", type=int, default=20, help="pgbench seconds per phase (default 20)"
    )
    g.add_argument(
        "--max-latency-ratio",
        type=float,
        default=None,
        help="[backfill] max_latency_ratio of the 'default' backfill (default: the config's)",
    )
    g = p.add_argument_group("health")
    g.add_argument(
        "--health-tokens", type=int, default=100_000, help="legacy tokens (default 100k)"
    )
    g.add_argument(
        "--period",
        type=float,
        default=8.0,
        help="seconds between replay pauses on the replica (default 8)",
    )
    g.add_argument(
        "--hold-seconds",
        type=float,
        default=4.0,
        help="how long each replay pause lasts (default 4; more than max_replica_lag 1s)",
    )
    g = p.add_argument_group("compat")
    g.add_argument(
        "--compat-seconds", type=int, default=15, help="pgbench seconds per phase (default 15)"
    )
    g = p.add_argument_group("fleet")
    g.add_argument(
        "--fleet-tokens",
        type=int,
        default=200,
        help="legacy tokens in each of the 64 databases (default 200)",
    )
    g = p.add_argument_group("status")
    g.add_argument(
        "--status-tokens",
        type=int,
        nargs="+",
        default=[1_000_000, 5_000_000],
        help="token-table sizes to time status on (default: 1000000 5000000)",
    )
    g = p.add_argument_group("startup")
    g.add_argument("--startup-runs", type=int, default=15, help="runs of each command (default 15)")
    g = p.add_argument_group("rules")
    g.add_argument("--uris", type=int, default=1_000_000, help="generated URIs (default 1M)")
    g = p.add_argument_group("audit")
    g.add_argument(
        "--apps",
        type=int,
        nargs="+",
        default=[10_000, 100_000],
        help="application counts to audit (default: 10000 100000)",
    )
    g.add_argument(
        "--backends",
        nargs="+",
        choices=["sqlite", "postgresql"],
        default=["sqlite", "postgresql"],
        help="databases to audit on (default: both)",
    )
    return p


def _terminate(signum: int, _frame: object) -> None:
    # Turn SIGTERM into SystemExit so that every `finally` runs and drops the scratch databases.
    raise SystemExit(128 + signum)


def main(argv: Sequence[str] | None = None) -> int:
    signal.signal(signal.SIGTERM, _terminate)
    parser = _parser()
    args = parser.parse_args(argv)
    for name in args.benchmarks:
        if name not in BENCHMARKS:
            parser.error(f"unknown benchmark {name!r} (choose from {', '.join(BENCHMARKS)})")
    chosen: list[str] = list(dict.fromkeys(args.benchmarks)) or list(BENCHMARKS)
    ok = True
    for name in chosen:
        if name == "backfill":
            from tests.bench import bench_backfill

            ok &= bench_backfill.main(
                tokens=args.tokens,
                apps=args.bf_apps,
                rounds=args.rounds,
                seed=args.seed,
                profile=args.profile,
                wait_quiet=args.wait_quiet,
                max_wal_size=args.max_wal_size,
            )
        elif name == "traffic":
            from tests.bench import bench_traffic

            ok &= bench_traffic.main(
                tokens=args.traffic_tokens,
                seconds=args.phase_seconds,
                seed=args.seed,
                rounds=args.rounds,
                ratio=args.max_latency_ratio,
            )
        elif name == "health":
            from tests.bench import bench_health

            ok &= bench_health.main(
                tokens=args.health_tokens,
                seed=args.seed,
                period=args.period,
                hold=args.hold_seconds,
            )
        elif name == "compat":
            from tests.bench import bench_compat

            ok &= bench_compat.main(seconds=args.compat_seconds)
        elif name == "fleet":
            from tests.bench import bench_fleet

            ok &= bench_fleet.main(tokens=args.fleet_tokens)
        elif name == "status":
            from tests.bench import bench_status

            ok &= bench_status.main(sizes=args.status_tokens)
        elif name == "startup":
            from tests.bench import bench_startup

            ok &= bench_startup.main(runs=args.startup_runs)
        elif name == "rules":
            from tests.bench import bench_rules

            ok &= bench_rules.main(uris=args.uris, seed=args.seed)
        else:
            from tests.bench import bench_audit

            ok &= bench_audit.main(apps=args.apps, backends=args.backends, seed=args.seed)
        print(flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
