"""Health-aware throttling (``[backfill.health]``) and ``backfill --metrics-file``, for real.

Replication tests start a private primary (``tests/pgcluster.py``) and a streaming replica of it
(``pg_basebackup -R`` into a temporary directory, a second postmaster on a free port); they fail,
never skip, when either cannot start. Holds are observed, not assumed: the tests poll the job
table, the metrics file or the probes themselves for the state they wait for, with generous
timeouts, and never sleep hoping something happened.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import signal
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console
from sqlalchemy import create_engine, text
from sqlalchemy.engine import Engine
from sqlalchemy.pool import NullPool

from oauthmig.config import HealthSettings, Settings, settings_from_mapping
from oauthmig.db import make_engine
from oauthmig.demo.data import setup_legacy
from oauthmig.errors import ConfigError, UsageError
from oauthmig.output.metrics import FAMILIES, PREFIX, MetricsFile, render
from oauthmig.output.text import progress_bar
from oauthmig.rollout.backfill import BackfillOptions, JobSample, backfill
from oauthmig.rollout.health import (
    HEALTHY,
    PROBE_AUTOVACUUM,
    PROBE_CHECK_SQL,
    PROBE_REPLICA_LAG,
    HealthMonitor,
    HealthReading,
)
from oauthmig.rollout.job_state import JOB_TABLE
from tests.forkserver import ForkServer
from tests.helpers import invoke, write_config
from tests.helpers.databases import DatabaseFactory, routed_config
from tests.pgcluster import Cluster, free_port, private_cluster, streaming_replica
from tests.test_backfill import PG, _assert_tokens_backfilled, _spawn

TIMEOUT = 180.0  # generous: the suite must pass beside CPU hogs
JOB = "token-families"


# ------------------------------------------------------------------ helpers


def _wait_for(what: str, predicate: Callable[[], bool], timeout: float = TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout:g}s waiting for: {what}")


def _engine(url: str) -> Engine:
    return create_engine(url, poolclass=NullPool, isolation_level="AUTOCOMMIT")


def _sql(url: str, sql: str, **params: Any) -> list[Any]:
    engine = _engine(url)
    try:
        with engine.connect() as conn:
            result = conn.execute(text(sql), params)
            return list(result.all()) if result.returns_rows else []
    finally:
        engine.dispose()


def _job_row(settings: Settings, db: str = "main") -> dict[str, Any]:
    engine = make_engine(settings.databases[db], settings)
    try:
        with engine.connect() as conn:
            row = (
                conn.execute(
                    text(
                        f"SELECT status, cursor, rows_done, batches, held_reason FROM {JOB_TABLE} "
                        "WHERE job = :j"
                    ),
                    {"j": JOB},
                )
                .mappings()
                .first()
            )
    except Exception:
        return {}  # no job table yet
    finally:
        engine.dispose()
    return dict(row) if row else {}


def _config(url: str, health: dict[str, Any] | None = None) -> dict[str, Any]:
    data: dict[str, Any] = {
        "databases": {"main": {"url": url}},
        "migrate": {"lock_timeout": "2s", "lock_retries": 2, "statement_timeout": "30s"},
    }
    if health is not None:
        data["backfill"] = {"health": health}
    return data


def _install(
    data: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str], tokens: int = 300
) -> tuple[Settings, str]:
    """Legacy tables with demo data on the one database of ``data``, upgraded (expand)."""
    settings = settings_from_mapping(data, {}, "test")
    setup_legacy(settings, apps=20, tokens=tokens, seed=5)
    cfg = write_config(tmp_path / f"health-{uuid.uuid4().hex[:6]}.toml", data)
    result = invoke(capsys, "--config", cfg, "upgrade")
    assert result.code == 0, result.err
    return settings, cfg


_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)\{(.*)\} (\S+)$")
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"(,|$)')

Series = list[tuple[dict[str, str], float]]


def _unescape(value: str) -> str:
    return re.sub(r"\\(.)", lambda m: "\n" if m.group(1) == "n" else m.group(1), value)


def parse_metrics(body: str) -> dict[str, Series]:
    """Parse OpenMetrics text strictly: HELP and TYPE before each family's samples, gauges
    only, every sample of the announced family, label values unescaped, ``# EOF`` last."""
    lines = body.split("\n")
    assert lines[-1] == "" and lines[-2] == "# EOF", "the file must end with '# EOF\\n'"
    families: dict[str, Series] = {}
    helped: set[str] = set()
    current: str | None = None
    for line in lines[:-2]:
        if line.startswith("# HELP "):
            name = line.split(" ", 3)[2]
            assert name not in families and len(line.split(" ", 3)) == 4, line
            helped.add(name)
            current = None
        elif line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ")
            assert name in helped and kind == "gauge", line
            families[name] = []
            current = name
        else:
            m = _SAMPLE.match(line)
            assert m is not None, f"not a sample line: {line!r}"
            assert current is not None and m.group(1) == current, f"sample outside: {line!r}"
            labels: dict[str, str] = {}
            rest = m.group(2)
            while rest:
                lm = _LABEL.match(rest)
                assert lm is not None, f"bad labels in {line!r}"
                labels[lm.group(1)] = _unescape(lm.group(2))
                rest = rest[lm.end() :]
            families[current].append((labels, float(m.group(3))))
    return families


def _value(families: dict[str, Series], name: str, **labels: str) -> float | None:
    found = [
        v
        for have, v in families[PREFIX + name]
        if all(have.get(k) == want for k, want in labels.items())
    ]
    assert len(found) <= 1, (name, labels, found)
    return found[0] if found else None


def _wait_unhealthy(what: str, monitor: HealthMonitor) -> HealthReading:
    """Check until a round of probes fails, and return that reading."""
    seen: list[HealthReading] = []

    def failing() -> bool:
        reading = monitor.check()
        seen.append(reading)
        return not reading.healthy

    _wait_for(what, failing)
    return seen[-1]


def _read_metrics(path: Path) -> dict[str, Series] | None:
    try:
        return parse_metrics(path.read_text())
    except FileNotFoundError:
        return None


def _held_in_metrics(path: Path, at_least: float = 0.0) -> bool:
    families = _read_metrics(path)
    if families is None:
        return False
    paused = _value(families, "held", job=JOB, database="main")
    held = _value(families, "held_seconds", job=JOB, database="main")
    return paused == 1 and held is not None and held >= at_least


# ------------------------------------------------------------------ configuration


def _health(raw: object, env: dict[str, str] | None = None) -> HealthSettings:
    data = {"databases": {"main": {"url": "sqlite:///main.sqlite3"}}, "backfill": {"health": raw}}
    return settings_from_mapping(data, env or {}, "test").backfill.health


def test_health_config_defaults_and_masked_replicas() -> None:
    assert _health({}) == HealthSettings() and not HealthSettings().enabled
    h = _health(
        {
            "max_replica_lag": "10s",
            "replica_urls": ["postgresql://oauth:hunter2@replica-1:5432/sentry?sslpassword=k3y"],
            "replica_url_env": ["REPLICA_2"],
            "max_autovacuum_on_table": "0s",
            "check_sql": " SELECT 1 ",
            "check_max": 3,
            "health_interval": "2s",
            "probe_timeout": "3s",
        },
        {"REPLICA_2": "postgresql://oauth:s3cret@replica-2/sentry"},
    )
    assert h.enabled and h.max_replica_lag_ms == 10_000 and h.health_interval_ms == 2000
    assert h.max_autovacuum_on_table_ms == 0 and h.check_sql == "SELECT 1" and h.check_max == 3
    assert h.probe_timeout_ms == 3000 and not h.lag_on_primary and h.replica_error is None
    assert [r.display_url for r in h.replicas] == [
        "postgresql+psycopg://oauth:***@replica-1:5432/sentry?sslpassword=***",
        "postgresql+psycopg://oauth:***@replica-2/sentry",
    ]
    assert "hunter2" not in repr(h) and "s3cret" not in repr(h)
    # Without replica URLs the lag is read on the primary.
    assert _health({"max_replica_lag": "10s"}).lag_on_primary
    both = _health({"max_replica_lag": "1s", "replica_url_env": "R", "lag_on_primary": True})
    assert both.lag_on_primary and both.replica_error == (
        "backfill.health.replica_url_env: environment variable R is not set"
    )


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ("on", "backfill.health: expected a table"),
        (
            {"max_replica_lag": "fast"},
            'backfill.health.max_replica_lag: expected a duration like "2s"',
        ),
        ({"max_replica_lag": float("nan")}, "backfill.health.max_replica_lag: expected a duration"),
        ({"max_replica_lag": "0s"}, "backfill.health.max_replica_lag: must be greater than zero"),
        ({"max_replica_lag": 1e300}, "backfill.health.max_replica_lag: must be between"),
        (
            {"replica_urls": ["postgresql://u:hunter2@h/db"]},
            "replica_urls, replica_url_env and lag_on_primary need max_replica_lag",
        ),
        (
            {"max_replica_lag": "1s", "replica_urls": "postgresql://h/db"},
            "backfill.health.replica_urls: expected a list of PostgreSQL URLs",
        ),
        (
            {"max_replica_lag": "1s", "replica_urls": ["sqlite:///replica.db"]},
            "backfill.health.replica_urls[0]: replicas are PostgreSQL servers",
        ),
        (
            {"max_replica_lag": "1s", "replica_urls": ["mysql://u:hunter2@h/db"]},
            "backfill.health.replica_urls[0]: unsupported database 'mysql'",
        ),
        (
            {"max_replica_lag": "1s", "replica_url_env": "1BAD"},
            "backfill.health.replica_url_env: expected an environment variable name",
        ),
        ({"lag_on_primary": "yes"}, "backfill.health.lag_on_primary: expected true or false"),
        ({"max_autovacuum_on_table": -1}, "backfill.health.max_autovacuum_on_table: must not"),
        ({"check_sql": "SELECT 1"}, "backfill.health: check_sql and check_max go together"),
        ({"check_max": 3}, "backfill.health: check_sql and check_max go together"),
        ({"check_sql": " ", "check_max": 1}, "backfill.health.check_sql: expected a SELECT"),
        (
            {"check_sql": "SELECT 1", "check_max": "many"},
            "backfill.health.check_max: expected a number",
        ),
        (
            {"check_sql": "SELECT 1", "check_max": float("inf")},
            "backfill.health.check_max: must be between",
        ),
        ({"health_interval": "10ms"}, "backfill.health.health_interval: must be between 100ms"),
        ({"probe_timeout": "10min"}, "backfill.health.probe_timeout: must be between 1000ms"),
        ({"max_replica_lag": "1s", "replicas": []}, "backfill.health.replicas: unknown key"),
    ],
)
def test_bad_health_config_is_one_line_naming_the_key(raw: object, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        _health(raw)
    assert message in caught.value.message
    assert "\n" not in caught.value.message and "hunter2" not in caught.value.message


def test_bad_health_config_from_the_cli_exits_2_and_writes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    db = tmp_path / "main.sqlite3"
    cfg = write_config(
        tmp_path / "bad.toml",
        _config(f"sqlite:///{db}", {"max_replica_lag": "soon", "replica_urls": ["x"]}),
    )
    result = invoke(capsys, "--config", cfg, "backfill", "--metrics-file", str(tmp_path / "m"))
    assert result.code == 2 and "Traceback" not in result.err
    assert result.err.strip().count("\n") == 0 and "backfill.health.max_replica_lag" in result.err
    assert not db.exists() and not (tmp_path / "m").exists()


def test_unset_replica_url_env_refuses_the_backfill_before_it_writes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = _config(f"sqlite:///{tmp_path / 'main.sqlite3'}")
    settings, _ = _install(data, tmp_path, capsys)
    data["backfill"] = {"health": {"max_replica_lag": "5s", "replica_url_env": "NO_SUCH_VAR_H14"}}
    cfg = write_config(tmp_path / "env.toml", data)
    result = invoke(capsys, "--config", cfg, "backfill")
    assert result.code == 2
    assert "environment variable NO_SUCH_VAR_H14 is not set" in result.err
    assert _job_row(settings) == {}  # not even the job table was written
    # status and dry runs do not need the replicas.
    assert invoke(capsys, "--config", cfg, "backfill", "--dry-run").code == 0


# ------------------------------------------------------------------ the metrics file


def test_metrics_render_parses_back_with_escaped_labels() -> None:
    reason = "replica lag 3.0s > 1s on r1"
    odd = 'control "eu"\\1\nsecond line'  # a label value that needs every escape
    held = JobSample(JOB, odd, "held", 40, 60, 2, 0.25, PROBE_REPLICA_LAG, reason, 1.5)
    done = JobSample("client-metadata", "shard_eu", "finished", 10, 0, 1, None)
    body = render([(held, 1_700_000_000.5), (done, 1_700_000_001.0)])
    families = parse_metrics(body)
    assert sorted(families) == sorted(PREFIX + name for name, _ in FAMILIES)
    assert all(line.startswith(("# ", PREFIX)) for line in body.splitlines())
    held_series = families[PREFIX + "held"]
    assert ({"job": JOB, "database": odd, "probe": PROBE_REPLICA_LAG}, 1.0) in held_series
    assert ({"job": "client-metadata", "database": "shard_eu", "probe": ""}, 0.0) in held_series
    # The reason changes with every check: as a label it would make a new series each time.
    assert "replica lag" not in body and "reason" not in body
    assert _value(families, "rows_left", job=JOB) == 60
    assert _value(families, "held_seconds", job=JOB) == 1.5
    assert _value(families, "running", job=JOB) == 1
    assert _value(families, "finished", job="client-metadata") == 1
    assert _value(families, "rows_left", job="client-metadata") == 0
    # No batch ran yet: no made-up duration.
    assert _value(families, "batch_seconds", job="client-metadata") is None
    assert _value(families, "updated_timestamp_seconds", job=JOB) == 1_700_000_000.5
    assert render([]).endswith("# EOF\n") and parse_metrics(render([]))[PREFIX + "held"] == []


def test_metrics_file_refuses_paths_it_cannot_replace_and_survives_write_errors(
    tmp_path: Path,
) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    for path, message in [
        ("", "--metrics-file: the file name is empty"),
        (str(tmp_path), "is a directory"),
        (str(tmp_path / "missing" / "m.prom"), "does not exist"),
        (str(fifo), "not a regular file"),
    ]:
        with pytest.raises(UsageError) as caught:
            MetricsFile(path)
        assert message in caught.value.message
    folder = tmp_path / "textfile"
    folder.mkdir()
    metrics = MetricsFile(str(folder / "backfill.prom"))
    sample = JobSample(JOB, "main", "running", 1, 2, 1, 0.1)
    metrics.update(sample)
    assert [p.name for p in folder.iterdir()] == ["backfill.prom"]  # no temporary file left
    assert _value(parse_metrics((folder / "backfill.prom").read_text()), "rows_done") == 1
    shutil.rmtree(folder)
    metrics.update(sample)  # the backfill goes on; the error is kept for the report
    assert metrics.error is not None and "--metrics-file" in metrics.error


def test_metrics_file_after_a_backfill_matches_the_run(
    make_database: DatabaseFactory, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    settings, cfg = _install(_config(make_database("main")), tmp_path, capsys)
    prom = tmp_path / "backfill.prom"
    before = time.time()
    result = invoke(
        capsys, "--config", cfg, "backfill", "--batch", "50", "--format", "json",
        "--metrics-file", str(prom),
    )  # fmt: skip
    assert result.code == 0, result.err
    families = parse_metrics(prom.read_text())
    runs = json.loads(result.out)["jobs"]
    assert {r["job"] for r in runs} == {JOB, "client-metadata"}
    for run in runs:
        labels = {"job": run["job"], "database": "main"}
        assert _value(families, "rows_done", **labels) == run["rows_changed"] > 0
        assert _value(families, "batches", **labels) == run["batches"]
        assert _value(families, "rows_left", **labels) == 0
        assert _value(families, "finished", **labels) == 1
        assert _value(families, "running", **labels) == 0
        assert _value(families, "held", **labels) == 0
        assert (_value(families, "batch_seconds", **labels) or 0) > 0
        assert (
            before <= (_value(families, "updated_timestamp_seconds", **labels) or 0) <= time.time()
        )
    # Every batch is reported to the observer, in order (a fresh pass over NULL rows again).
    samples: list[JobSample] = []
    _reset_families(settings)
    result2 = backfill(settings, [JOB], BackfillOptions(batch_size=40), observe=samples.append)
    run = result2.runs[0]
    batches = [s for s in samples if s.batch_seconds is not None and s.state == "running"]
    assert len({s.batches for s in batches}) == run.batches
    assert [s.rows_done for s in batches] == sorted(s.rows_done for s in batches)
    assert samples[0].state == "running" and samples[0].batches == 0
    assert samples[-1].state == "finished" and samples[-1].rows_left == 0


def _reset_families(settings: Settings) -> None:
    engine = make_engine(settings.databases["main"], settings)
    try:
        with engine.begin() as conn:
            conn.execute(text(f"UPDATE {settings.tables.token} SET token_family_id = NULL"))
    finally:
        engine.dispose()


def test_progress_line_shows_the_hold_on_terminals_and_in_logs() -> None:
    stream = io.StringIO()
    terminal = Console(file=stream, force_terminal=True, width=200)
    with progress_bar(terminal, enabled=True) as update:
        update("control token-families", 10, 100)
        update("control token-families", 10, 100, "held: replica lag 14.2s > 10s")
    assert "held: replica lag 14.2s > 10s" in stream.getvalue()
    log = io.StringIO()
    with progress_bar(Console(file=log, width=200), enabled=True) as update:
        update("control token-families", 10, 100)
        update("control token-families", 10, 100, "held: replica lag 14.2s > 10s")
        update("control token-families", 10, 100, "held: replica lag 15.0s > 10s")
        update("control token-families", 20, 100)
    lines = log.getvalue().splitlines()
    assert lines[0] == "control token-families: held: replica lag 14.2s > 10s (at 10/100 rows)"
    assert lines[1].startswith("control token-families: resumed after ") and len(lines) == 2


# ------------------------------------------------------------------ probes on real servers


def _monitor(
    url: str, health: dict[str, Any], clock: Callable[[], float] = time.monotonic
) -> HealthMonitor:
    settings = settings_from_mapping(_config(url, health), {}, "test")
    db = settings.databases["main"]
    return HealthMonitor(settings.backfill.health, db, settings.tables.token, clock)


def test_check_sql_probe_on_both_backends(backend: str, make_database: DatabaseFactory) -> None:
    url = make_database("main")
    engine = create_engine(url, poolclass=NullPool)
    with engine.begin() as conn:
        conn.execute(text("CREATE TABLE hold_flag (n INTEGER)"))
        conn.execute(text("INSERT INTO hold_flag VALUES (1)"))
    engine.dispose()
    now = [0.0]

    def check(sql: str, maximum: float, timeout: str = "5s") -> HealthReading:
        health = {"check_sql": sql, "check_max": maximum, "probe_timeout": timeout}
        monitor = _monitor(url, health, clock=lambda: now[0])
        try:
            if backend == "sqlite":
                # Documented no-op: nothing is queried (this SQL would fail if it ran).
                assert not monitor.enabled and not monitor.due()
                assert monitor.check() == HEALTHY and monitor.checks == 0
                return HEALTHY
            assert monitor.due()
            reading = monitor.check()
            # At most every health_interval (5s by default) while healthy; a failed round is
            # checked again before anything goes on.
            assert monitor.due() == (not reading.healthy)
            now[0] += 5.0
            assert monitor.due()
            return reading
        finally:
            monitor.close()

    if backend == "sqlite":
        check("SELECT no_such_column FROM nowhere", 0)
        return
    assert check("SELECT count(*) FROM hold_flag", 1) == HEALTHY
    assert check("SELECT count(*) FROM hold_flag", 0) == HealthReading(
        False, PROBE_CHECK_SQL, "check_sql returned 1 > 0"
    )
    assert check("SELECT NULL::int", 0).reason == "check_sql returned no value (no row, or NULL)"
    assert "returned a str, not a number" in check("SELECT 'x'", 0).reason
    # Run as written: no parameter or % processing.
    sql = "SELECT count(*) FROM pg_class WHERE relname LIKE 'pg\\_%' AND ':x' = ':x'"
    assert check(sql, 1e9) == HEALTHY
    bad = check("SELEC 1", 0)
    assert bad.probe == PROBE_CHECK_SQL and "check_sql failed on 'main'" in bad.reason
    assert "SQLSTATE 42601" in bad.reason
    # Read-only: a check cannot write.
    write = check("INSERT INTO hold_flag VALUES (2) RETURNING n", 100)
    assert "read-only transaction" in write.reason
    assert _sql(url, "SELECT count(*) FROM hold_flag") == [(1,)]
    # statement_timeout = probe_timeout.
    slow = check("SELECT pg_sleep(60)", 0, timeout="1s")
    assert "canceling statement due to statement timeout" in slow.reason


@PG
def test_a_primary_given_as_replica_is_not_a_standby(make_database: DatabaseFactory) -> None:
    url = make_database("main")  # the shared server is no standby
    monitor = _monitor(url, {"max_replica_lag": "5s", "replica_urls": [url]})
    try:
        reading = monitor.check()
    finally:
        monitor.close()
    assert reading.probe == PROBE_REPLICA_LAG and "is not a standby" in reading.reason


def test_unreachable_target_for_probes_is_unhealthy_with_a_masked_reason() -> None:
    secret = f"pw-{uuid.uuid4().hex[:8]}"
    url = f"postgresql+psycopg://oauth:{secret}@127.0.0.1:{free_port()}/nowhere"
    monitor = _monitor(url, {"check_sql": "SELECT 0", "check_max": 0})
    try:
        reading = monitor.check()
    finally:
        monitor.close()
    assert not reading.healthy and "database 'main' unreachable for health checks" in reading.reason
    assert secret not in reading.reason


def test_autovacuum_on_the_table_is_seen_and_other_tables_are_not() -> None:
    with private_cluster("-c autovacuum_naptime=1 -c autovacuum_max_workers=1") as cluster:
        url = cluster.create_database("autovac")
        table = "sentry_apitoken"
        _sql(
            url,
            f"CREATE TABLE {table} (id bigint PRIMARY KEY, pad text) WITH ("
            "autovacuum_vacuum_threshold = 0, autovacuum_vacuum_scale_factor = 0, "
            "autovacuum_vacuum_cost_delay = 100, autovacuum_vacuum_cost_limit = 1, "
            "autovacuum_analyze_threshold = 2000000000)",
        )
        _sql(url, "CREATE TABLE other (id int) WITH (autovacuum_enabled = false)")
        _sql(
            url, f"INSERT INTO {table} SELECT g, repeat('x', 200) FROM generate_series(1, 50000) g"
        )
        _sql(url, f"DELETE FROM {table} WHERE id % 2 = 0")  # dead rows: autovacuum comes
        on_table = _monitor(url, {"max_autovacuum_on_table": "0s"})
        long_only = _monitor(url, {"max_autovacuum_on_table": "1h"})
        settings = settings_from_mapping(
            _config(url, {"max_autovacuum_on_table": "0s"}), {}, "test"
        )
        elsewhere = HealthMonitor(
            settings.backfill.health, settings.databases["main"], "other", time.monotonic
        )
        try:
            reading = _wait_unhealthy("an autovacuum worker on the table", on_table)
            # The worker crawls (cost limit 1, 100 ms delay): it is still there now.
            assert _sql(
                url,
                "SELECT count(*) FROM pg_stat_progress_vacuum WHERE relid = CAST(:t AS regclass)",
                t=table,
            ) == [(1,)]
            assert long_only.check() == HEALTHY  # running, but not for an hour
            assert elsewhere.check() == HEALTHY  # another table is not held up by it
        finally:
            for m in (on_table, long_only, elsewhere):
                m.close()
        assert reading.probe == PROBE_AUTOVACUUM
        assert re.fullmatch(
            rf"autovacuum on {table} running \d+\.\ds \(pid \d+\) >= 0s", reading.reason
        ), reading.reason


# ------------------------------------------------------------------ holds in real runs


@pytest.mark.parametrize(
    "shape",
    [
        pytest.param("hunter2-{m}", id="plain"),
        # Unencoded '@' (SQLAlchemy then reads '{m}@127.0.0.1' as the host), ':', '%', '#', '/'.
        pytest.param("hunter2@{m}", id="at"),
        pytest.param("a:b%c#d/{m}@x", id="delimiters"),
    ],
)
def test_unreachable_replica_holds_with_a_masked_reason_until_max_runtime(
    backend: str,
    make_database: DatabaseFactory,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    shape: str,
) -> None:
    marker = f"hunter2{uuid.uuid4().hex[:8]}"
    secret = marker
    password = shape.format(m=marker)
    replica = f"postgresql://oauth:{password}@127.0.0.1:{free_port()}/postgres?sslpassword={secret}"
    health = {"max_replica_lag": "1s", "replica_urls": [replica], "health_interval": "100ms"}
    settings, cfg = _install(_config(make_database("main"), health), tmp_path, capsys)
    prom = tmp_path / "backfill.prom"
    result = invoke(
        capsys, "--config", cfg, "backfill", JOB, "--max-runtime", "2", "--format", "json",
        "--metrics-file", str(prom),
    )  # fmt: skip
    # Held until --max-runtime with every row left: exit 3 (0 on SQLite: no probe, finished).
    assert result.code == (0 if backend == "sqlite" else 3), result.err
    run = json.loads(result.out)["jobs"][0]
    status = json.loads(invoke(capsys, "--config", cfg, "status", "--format", "json").out)
    job = next(j for j in status["databases"][0]["backfills"] if j["job"] == JOB)
    everything = result.out + result.err + prom.read_text() + json.dumps(status)
    assert secret not in everything
    if backend == "sqlite":
        # Documented no-op on SQLite: no probe runs, the job simply finishes.
        assert run["status"] == "finished" and run["held_seconds"] == 0 and run["rows_changed"]
        assert "held:" not in result.err and job["held"] is None
        return
    masked = "postgresql+psycopg://oauth:***@127.0.0.1"
    assert run["status"] == "paused" and run["rows_changed"] == 0 and run["held_seconds"] > 0
    assert "stopped while held by health checks: replica " + masked in run["message"]
    assert "unreachable" in run["message"] and "sslpassword=***" in run["message"]
    # The progress line (a log line off a terminal) said why it waited.
    assert f"main {JOB}: held: replica {masked}" in result.err
    row = _job_row(settings)
    assert row["status"] == "paused" and row["cursor"] == 0 and row["batches"] == 0
    assert masked in row["held_reason"] and secret not in row["held_reason"]
    assert job["state"] == "paused" and masked in job["held"]
    text_status = invoke(capsys, "--config", cfg, "status").out
    assert f"main backfill {JOB}: paused (stopped while held: replica {masked}" in text_status
    families = parse_metrics(prom.read_text())
    assert _value(families, "running", job=JOB) == 0 and (_value(families, "rows_left") or 0) > 0


def test_parallel_jobs_hold_on_every_database_and_stop_together(
    backend: str, make_database: DatabaseFactory, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = routed_config(make_database("control"), make_database("shard"))
    data["backfill"] = {"health": {"check_sql": "SELECT 1", "check_max": 0}}
    settings = settings_from_mapping(data, {}, "test")
    setup_legacy(settings, apps=20, tokens=300, seed=5)
    cfg = write_config(tmp_path / "parallel.toml", data)
    assert invoke(capsys, "--config", cfg, "upgrade").code == 0
    # --max-runtime counts from the start: on a loaded machine three jobs' setup alone has
    # taken over 2 s, and a job stopped before its first check was never held.
    result = invoke(
        capsys, "--config", cfg, "backfill", "--jobs", "3", "--max-runtime", "8",
        "--format", "json",
    )  # fmt: skip
    assert result.code == (0 if backend == "sqlite" else 3), result.err
    runs = {(r["job"], r["database"]): r for r in json.loads(result.out)["jobs"]}
    assert set(runs) == {(JOB, "control"), (JOB, "shard"), ("client-metadata", "control")}
    if backend == "sqlite":
        assert {r["status"] for r in runs.values()} == {"finished"}  # no-op on SQLite
        return
    for run in runs.values():
        assert run["status"] == "paused" and run["rows_changed"] == 0, run
        assert run["message"].startswith(
            "stopped while held by health checks: check_sql returned 1 > 0; stopped by "
            "--max-runtime with about "
        )
    for label in ("control token-families", "shard token-families", "control client-metadata"):
        assert f"{label}: held: check_sql returned 1 > 0" in result.err


@PG
@pytest.mark.parametrize(("signum", "code"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_signal_ends_a_held_run_cleanly_and_a_rerun_finishes(
    forkserver: ForkServer,
    signum: int,
    code: int,
    make_database: DatabaseFactory,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    url = make_database("main")
    health = {
        "check_sql": "SELECT count(*) FROM hold_flag",
        "check_max": 0,
        "health_interval": "100ms",
    }
    settings, cfg = _install(_config(url, health), tmp_path, capsys)
    _sql(url, "CREATE TABLE hold_flag (n int)")
    _sql(url, "INSERT INTO hold_flag VALUES (1)")
    prom = tmp_path / "held.prom"
    proc = _spawn(forkserver, cfg, "backfill", JOB, "--metrics-file", str(prom))
    try:
        _wait_for("the run to hold (metrics file)", lambda: _held_in_metrics(prom))
        row = _job_row(settings)
        assert row["status"] == "running" and row["held_reason"] == "check_sql returned 1 > 0"
        assert row["batches"] == 0
        shown = invoke(capsys, "--config", cfg, "status")
        assert f"main backfill {JOB}: running (held: check_sql returned 1 > 0)" in shown.out
        families = _read_metrics(prom)
        assert families is not None
        paused = [v for labels, v in families[PREFIX + "held"] if labels["job"] == JOB]
        assert paused == [1.0]
        labels = next(lb for lb, _ in families[PREFIX + "held"] if lb["job"] == JOB)
        assert labels["probe"] == PROBE_CHECK_SQL and "reason" not in labels
        proc.send_signal(signum)
        _, err = proc.communicate(timeout=TIMEOUT)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == code, err
    assert "Traceback" not in err
    row = _job_row(settings)
    assert row["status"] == "paused" and row["cursor"] == 0
    _sql(url, "DELETE FROM hold_flag")
    rerun = invoke(capsys, "--config", cfg, "backfill", JOB, "--metrics-file", str(prom))
    assert rerun.code == 0, rerun.err
    row = _job_row(settings)
    assert row["status"] == "finished" and row["held_reason"] is None
    _assert_tokens_backfilled(settings, "main")
    families = parse_metrics(prom.read_text())
    assert _value(families, "finished", job=JOB) == 1 and _value(families, "held", job=JOB) == 0


@pytest.fixture
def primary_and_replica() -> Iterator[tuple[Cluster, Cluster]]:
    """A private primary (wal_level=replica) and a streaming hot standby of it, reporting to
    the primary every second."""
    with (
        private_cluster("-c wal_level=replica -c max_wal_senders=4") as primary,
        streaming_replica(primary, "-c wal_receiver_status_interval=1s") as replica,
    ):
        assert _sql(primary.url(), "SELECT pg_is_in_recovery()") == [(False,)]
        assert _sql(replica.url(), "SELECT pg_is_in_recovery()") == [(True,)]
        yield primary, replica


def test_replica_lag_holds_the_backfill_and_it_resumes_after_replay_resumes(
    forkserver: ForkServer,
    primary_and_replica: tuple[Cluster, Cluster],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    primary, replica = primary_and_replica
    url = primary.create_database(f"health_{uuid.uuid4().hex[:8]}")
    health = {"max_replica_lag": "1s", "replica_urls": [replica.url()], "health_interval": "200ms"}
    settings, cfg = _install(_config(url, health), tmp_path, capsys, tokens=1500)
    plain = settings_from_mapping(_config(url), {}, "test")

    # Some progress first, without health checks: one batch, then a clean stop.
    stop = threading.Event()
    first = backfill(
        plain, [JOB], BackfillOptions(batch_size=50), progress=lambda *_: stop.set(), stop=stop
    )
    assert first.runs[0].status == "paused"
    done = _job_row(settings)
    assert done["cursor"] > 0 and done["batches"] == 1

    # Caught up: both probes say healthy.
    replica_probe = _monitor(url, health)
    primary_probe = _monitor(url, {"max_replica_lag": "1s"})  # pg_stat_replication
    try:
        _wait_for("the replica to catch up", lambda: replica_probe.check() == HEALTHY)
        _wait_for("the primary to see it caught up", lambda: primary_probe.check() == HEALTHY)

        # Pause replay, then write: the replica receives WAL it does not replay.
        _sql(replica.url(), "SELECT pg_wal_replay_pause()")
        _wait_for(
            "replay to pause",
            lambda: _sql(replica.url(), "SELECT pg_get_wal_replay_pause_state()") == [("paused",)],
        )
        _sql(url, "CREATE TABLE lag_marker AS SELECT 1 AS n")
        lagging = _wait_unhealthy("the replica probe to see lag > 1s", replica_probe)
        assert re.fullmatch(
            rf"replica lag \d+\.\ds > 1s on 127\.0\.0\.1:{replica.port}", lagging.reason
        ), lagging.reason
        on_primary = _wait_unhealthy("pg_stat_replication to show the lag", primary_probe)
        assert re.fullmatch(
            r"replica lag \d+\.\ds > 1s on standby \S+ \(127\.0\.0\.1\) of 'main'",
            on_primary.reason,
        ), on_primary.reason

        # The backfill resumes the job and holds before its next batch.
        prom = tmp_path / "lag.prom"
        proc = _spawn(
            forkserver, cfg, "backfill", JOB, "--batch", "50", "--metrics-file", str(prom)
        )
        try:
            _wait_for("the run to hold on replica lag", lambda: _held_in_metrics(prom))
            held = _job_row(settings)
            assert held["status"] == "running" and "replica lag" in held["held_reason"]
            status = json.loads(invoke(capsys, "--config", cfg, "status", "--format", "json").out)
            job = next(j for j in status["databases"][0]["backfills"] if j["job"] == JOB)
            assert job["state"] == "running" and job["held"].startswith("replica lag ")
            # Held for a while (many more checks, each still failing): still no progress.
            _wait_for("two seconds of holding", lambda: _held_in_metrics(prom, at_least=2.0))
            still = _job_row(settings)
            assert (still["cursor"], still["batches"]) == (done["cursor"], done["batches"])
            assert (held["cursor"], held["batches"]) == (done["cursor"], done["batches"])
            assert still["held_reason"] is not None and still["status"] == "running"

            _sql(replica.url(), "SELECT pg_wal_replay_resume()")
            _, err = proc.communicate(timeout=TIMEOUT)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        assert proc.returncode == 0, err
        assert f"main {JOB}: held: replica lag " in err and f"main {JOB}: resumed after " in err
        _wait_for(
            "the primary to see the replica caught up", lambda: primary_probe.check() == HEALTHY
        )
    finally:
        replica_probe.close()
        primary_probe.close()
    final = _job_row(settings)
    assert final["status"] == "finished" and final["held_reason"] is None
    assert final["batches"] > done["batches"]
    _assert_tokens_backfilled(settings, "main")
    families = parse_metrics(prom.read_text())
    assert _value(families, "finished", job=JOB) == 1 and _value(families, "held", job=JOB) == 0
