"""``status`` and ``upgrade`` stay cheap on a big token table, and stay right on small ones.

On PostgreSQL, every statement the two commands send is captured (SQLAlchemy's
``before_cursor_execute``) and EXPLAINed, and the token table's ``pg_stat_user_tables``
counters are compared before and after: no statement may scan the table. The counters are
exact because every connection of the test database publishes its statistics when it goes
back to its pool (``pg_stat_force_next_flush()`` then a round trip), before it closes.
``status --exact`` scans on purpose, which shows that the check can fail.

On both backends: what ``status`` shows equals what ``status --exact`` counts on tables the
probe covers, in every state of a job (not started, paused, finished, stale, columns
re-created), and the gate of ``upgrade`` follows it.
"""

from __future__ import annotations

import contextlib
import json
import re
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, event, text
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.pool import Pool

from oauthmig.config import Settings, settings_from_mapping
from oauthmig.db import make_engine
from oauthmig.rollout.backfill import BackfillOptions, backfill
from oauthmig.rollout.remaining import PROBE_ROWS
from tests.helpers import invoke, seed_legacy, write_config
from tests.helpers.databases import DatabaseFactory, create_legacy, routed_config

pg_only = pytest.mark.parametrize("backend", ["postgresql"], indirect=True)

TOKENS = 200_000  # ids 1..TOKENS; every fourth has no refresh token
WITH_REFRESH = TOKENS - TOKENS // 4
JOB = "token-families"


# --------------------------------------------------------------------------- observation


def _publish_stats(dbapi_connection: Any, _record: Any) -> None:
    """Pool check-in of a PostgreSQL connection: make its backend publish its statistics.

    The flush happens when the backend goes idle after the call; the second statement
    returns only after that.
    """
    if dbapi_connection is None or getattr(dbapi_connection, "closed", True):
        return
    if not hasattr(getattr(dbapi_connection, "info", None), "dbname"):
        return  # not psycopg (SQLite)
    with dbapi_connection.cursor() as cur:
        cur.execute("SELECT pg_stat_force_next_flush()")
    dbapi_connection.rollback()
    with dbapi_connection.cursor() as cur:
        cur.execute("SELECT 1")
    dbapi_connection.rollback()


@contextlib.contextmanager
def _stats_published() -> Iterator[None]:
    event.listen(Pool, "checkin", _publish_stats)
    try:
        yield
    finally:
        event.remove(Pool, "checkin", _publish_stats)


Captured = list[tuple[int, str, Any]]  # (connection, statement or END, parameters)
END = "-- end of transaction"


@contextlib.contextmanager
def _captured(database: str) -> Iterator[Captured]:
    """Every statement sent to ``database`` through SQLAlchemy meanwhile, with the ends of
    transactions (so that ``SET LOCAL`` can be replayed where it applied)."""
    seen: Captured = []
    lock = threading.Lock()

    def mine(conn: Any) -> bool:
        return bool(conn.engine.url.database == database)

    def before(
        conn: Any, _cursor: Any, statement: str, parameters: Any, _ctx: Any, many: bool
    ) -> None:
        if mine(conn) and not many:
            with lock:
                seen.append((id(conn.connection), statement, parameters))

    def end(conn: Any, *_args: Any) -> None:
        if mine(conn):
            with lock:
                seen.append((id(conn.connection), END, None))

    listeners = [("before_cursor_execute", before), ("commit", end), ("rollback", end)]
    for name, fn in listeners:
        event.listen(Engine, name, fn)
    try:
        yield seen
    finally:
        for name, fn in listeners:
            event.remove(Engine, name, fn)


def _counters(url: str, physical: str) -> dict[str, int]:
    engine = create_engine(url, isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as conn:
            conn.execute(text("SELECT pg_stat_clear_snapshot()"))
            row = conn.execute(
                text(
                    "SELECT seq_scan, seq_tup_read, coalesce(idx_scan, 0) AS idx_scan, "
                    "coalesce(idx_tup_fetch, 0) AS idx_tup_fetch "
                    "FROM pg_stat_user_tables WHERE relname = :t"
                ),
                {"t": physical},
            ).one()
            return dict(row._mapping)
    finally:
        engine.dispose()


def _plan_nodes(plan: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield plan
    for child in plan.get("Plans", ()):
        yield from _plan_nodes(child)


def _scans(url: str, statements: Captured, physical: str) -> list[str]:
    """Node types that read ``physical`` in the plans of the captured statements naming it.

    Each connection's statements are replayed in order on one connection, transaction by
    transaction: its ``SET`` statements are run, its reads of the table EXPLAINed. Raises if
    a statement naming the table is not a read: status and upgrade's gate never write it.
    """
    found: list[str] = []
    pattern = re.compile(rf"\b{re.escape(physical)}\b", re.I)
    engine = create_engine(url)
    try:
        for conn_id in dict.fromkeys(c for c, _, _ in statements):
            with engine.connect() as conn:
                raw: Any = conn.connection.dbapi_connection  # psycopg's, with cursor contexts
                assert raw is not None
                for c, statement, params in statements:
                    if c != conn_id:
                        continue
                    if statement == END:
                        raw.rollback()
                        continue
                    with raw.cursor() as cur:
                        if statement.lstrip().upper().startswith("SET "):
                            cur.execute(statement, params or None)
                            continue
                        if not pattern.search(statement):
                            continue
                        assert statement.lstrip().upper().startswith("SELECT"), statement
                        cur.execute("EXPLAIN (FORMAT JSON) " + statement, params or None)
                        (doc,) = cur.fetchone()
                    for node in _plan_nodes(doc[0]["Plan"]):
                        if node.get("Relation Name") == physical:
                            found.append(str(node["Node Type"]))
                raw.rollback()
    finally:
        engine.dispose()
    return found


def _observe(
    capsys: pytest.CaptureFixture[str], url: str, physical: str, *args: str
) -> tuple[Any, dict[str, int], list[str]]:
    """Run the CLI; its result, the token table's counter deltas and the plan nodes reading it."""
    database = make_url(url).database or ""
    before = _counters(url, physical)
    with _captured(database) as statements:
        result = invoke(capsys, *args)
    after = _counters(url, physical)
    delta = {k: after[k] - before[k] for k in before}
    return result, delta, _scans(url, statements, physical)


def _assert_cheap(delta: dict[str, int], nodes: list[str], runs_of_probe: int) -> None:
    assert delta["seq_scan"] == 0 and delta["seq_tup_read"] == 0, delta
    assert nodes and "Seq Scan" not in nodes, nodes
    # The probes are the only reads of the table: at most PROBE_ROWS + 1 rows each, and the
    # lowest and highest id beside.
    assert delta["idx_tup_fetch"] <= runs_of_probe * (PROBE_ROWS + 3), delta


# --------------------------------------------------------------------------- big table


def _fill_tokens(
    settings: Settings, database: str, first: int, last: int, *, uncovered: bool = False
) -> None:
    """Legacy tokens ``first..last`` (every fourth without a refresh token), one statement;
    ``uncovered``: rows the compatibility triggers did not fill (their family cleared, as
    rows written before the triggers existed)."""
    t = settings.tables.token
    engine = make_engine(settings.databases[database], settings)
    try:
        with engine.begin() as conn:
            conn.execute(
                text(
                    f"INSERT INTO {t} (id, user_id, token, hashed_token, refresh_token, "
                    "scope_list, date_added, scopes) "
                    "SELECT g, 1 + g % 1000, 'tok-' || g, 'htok-' || g, "
                    "CASE WHEN g % 4 = 0 THEN NULL ELSE 'ref-' || g END, '{}', now(), 0 "
                    "FROM generate_series(CAST(:a AS bigint), CAST(:b AS bigint)) AS g"
                ),
                {"a": first, "b": last},
            )
            if uncovered:
                conn.execute(
                    text(f"UPDATE {t} SET token_family_id = NULL WHERE id BETWEEN :a AND :b"),
                    {"a": first, "b": last},
                )
    finally:
        engine.dispose()


def _analyze(url: str, physical: str) -> None:
    engine = create_engine(url, isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as conn:
            conn.execute(text(f"ANALYZE {physical}"))
            pages = conn.execute(
                text("SELECT relpages FROM pg_class WHERE oid = to_regclass(:t)"), {"t": physical}
            ).scalar_one()
            assert pages > 0
    finally:
        engine.dispose()


def _pause_after_first_batch(settings: Settings) -> int:
    """Run the job until its first batch has committed, then stop it (state: paused)."""
    stop = threading.Event()

    def progress(_label: str, _done: int, _total: int, _note: str | None, /) -> None:
        stop.set()

    result = backfill(settings, [JOB], BackfillOptions(batch_size=5000), progress, stop)
    (run,) = result.runs
    assert run.status == "paused", run
    return run.rows_changed


def _job(doc: dict[str, Any], name: str = JOB) -> dict[str, Any]:
    (database,) = doc["databases"]
    jobs: dict[str, dict[str, Any]] = {j["job"]: j for j in database["backfills"]}
    return jobs[name]


@pg_only
def test_status_and_upgrade_never_scan_the_token_table(
    make_database: DatabaseFactory, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url = make_database("main")
    data: dict[str, Any] = {
        "databases": {"main": {"url": url}},
        "backfill": {"max_duty": 1.0, "batch_size": 20000, "target_batch_seconds": 2.0},
    }
    settings = settings_from_mapping(data, {}, "test")
    cfg = write_config(tmp_path / "oauthmig.toml", data)
    t = settings.tables.token
    with _stats_published():
        create_legacy(settings)
        _fill_tokens(settings, "main", 1, TOKENS)
        assert invoke(capsys, "--config", cfg, "-q", "upgrade").code == 0

        # Not started: the gate finds pending rows at once, status estimates the rest.
        result, delta, nodes = _observe(capsys, url, t, "--config", cfg, "upgrade")
        assert result.code == 0, result.err
        assert re.search(
            r"waiting before 0004: backfill token-families has ~[\d,]+ rows", result.out
        )
        _assert_cheap(delta, nodes, 3)
        result, delta, nodes = _observe(
            capsys, url, t, "--config", cfg, "status", "--format", "json"
        )
        job = _job(json.loads(result.out))
        assert job["state"] == "not started" and job["estimate"] is True
        assert abs(job["remaining"] - WITH_REFRESH) <= WITH_REFRESH * 0.05, job
        _assert_cheap(delta, nodes, 2)

        # Paused after one batch: only the rows above the cursor are read. Analyzed now, so
        # the estimate scales pg_class.reltuples (before, it had only the id span).
        done = _pause_after_first_batch(settings)
        _analyze(url, t)
        result, delta, nodes = _observe(capsys, url, t, "--config", cfg, "status")
        assert result.code == 0, result.err
        assert re.search(
            r"backfill token-families: paused, [\d,]+/[\d,]+ rows, ~[\d,]+ remaining \(estimated",
            result.out,
        ), result.out
        _assert_cheap(delta, nodes, 2)
        result, delta, nodes = _observe(
            capsys, url, t, "--config", cfg, "status", "--format", "json"
        )
        job = _job(json.loads(result.out))
        assert abs(job["remaining"] - (WITH_REFRESH - done)) <= WITH_REFRESH * 0.05, job
        result, delta, nodes = _observe(capsys, url, t, "--config", cfg, "status", "--check")
        assert result.code == 1 and result.err.strip().startswith("outstanding work")
        _assert_cheap(delta, nodes, 2)

        # Finished, then legacy code inserts tokens again: the probe above the cursor sees them.
        assert invoke(capsys, "--config", cfg, "-q", "backfill").code == 0
        _fill_tokens(settings, "main", TOKENS + 1, TOKENS + 40, uncovered=True)
        result, delta, nodes = _observe(
            capsys, url, t, "--config", cfg, "status", "--format", "json"
        )
        job = _job(json.loads(result.out))
        assert (job["state"], job["remaining"], job["estimate"]) == ("stale", 30, False), job
        _assert_cheap(delta, nodes, 2)
        result, delta, nodes = _observe(capsys, url, t, "--config", cfg, "upgrade", "--dry-run")
        assert result.code == 0 and "backfill token-families has 30 rows left" in result.out
        _assert_cheap(delta, nodes, 1)

        # Finished again: the gate's EXISTS over the ids above the cursor settles it.
        assert invoke(capsys, "--config", cfg, "-q", "backfill").code == 0
        result, delta, nodes = _observe(capsys, url, t, "--config", cfg, "upgrade", "--dry-run")
        assert result.code == 0 and "0004" in result.out and "waiting" not in result.out
        _assert_cheap(delta, nodes, 1)
        result, delta, nodes = _observe(capsys, url, t, "--config", cfg, "status", "--check")
        assert result.code == 1 and "finished" in result.out  # 0004 is pending, not waiting
        _assert_cheap(delta, nodes, 2)

        # The check can fail: --exact counts, which scans.
        result, delta, nodes = _observe(capsys, url, t, "--config", cfg, "status", "--exact")
        assert result.code == 0, result.err
        assert delta["seq_scan"] > 0 and "Seq Scan" in nodes, (delta, nodes)


# --------------------------------------------------------------------------- correctness


def _status(capsys: pytest.CaptureFixture[str], cfg: str, *extra: str) -> dict[str, Any]:
    result = invoke(capsys, "--config", cfg, "status", "--format", "json", *extra)
    assert result.code == 0, result.err
    doc: dict[str, Any] = json.loads(result.out)
    return doc


def _jobs(doc: dict[str, Any]) -> dict[tuple[str, str], tuple[str, int | None, bool]]:
    return {
        (d["database"], j["job"]): (j["state"], j["remaining"], j["estimate"])
        for d in doc["databases"]
        for j in d["backfills"]
    }


def _same_as_exact(capsys: pytest.CaptureFixture[str], cfg: str) -> dict[tuple[str, str], Any]:
    cheap, exact = _jobs(_status(capsys, cfg)), _jobs(_status(capsys, cfg, "--exact"))
    assert cheap == exact
    assert not any(estimate for _, _, estimate in cheap.values())
    return {key: (state, rows) for key, (state, rows, _) in cheap.items()}


def test_status_counts_match_exact_counts_in_every_job_state(
    make_database: DatabaseFactory, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = routed_config(make_database("control"), make_database("shard"))
    settings = settings_from_mapping(data, {}, "test")
    cfg = write_config(tmp_path / "oauthmig.toml", data)
    create_legacy(settings)
    seed_legacy(settings, rows=40)  # 30 tokens with a refresh token per database, 40 apps
    assert invoke(capsys, "--config", cfg, "-q", "upgrade").code == 0
    assert _same_as_exact(capsys, cfg) == {
        ("control", "token-families"): ("not started", 30),
        ("control", "client-metadata"): ("not started", 40),
        ("shard", "token-families"): ("not started", 30),
    }

    stop = threading.Event()
    paused = backfill(
        settings.restrict(("shard",)),
        [JOB],
        BackfillOptions(batch_size=10),
        lambda *_: stop.set(),
        stop,
    )
    assert [r.status for r in paused.runs] == ["paused"]
    states = _same_as_exact(capsys, cfg)
    assert states[("shard", JOB)] == ("paused", 30 - paused.runs[0].rows_changed)
    gated = invoke(capsys, "--config", cfg, "upgrade")
    assert gated.code == 0 and "shard: waiting before 0004: backfill token-families" in gated.out

    assert invoke(capsys, "--config", cfg, "-q", "backfill").code == 0
    assert set(_same_as_exact(capsys, cfg).values()) == {("finished", 0)}

    # Legacy code keeps inserting tokens without a family: the job is stale again.
    engine = make_engine(settings.databases["shard"], settings)
    try:
        with engine.begin() as conn:
            conn.execute(
                text(
                    f"INSERT INTO {settings.tables.token} (id, user_id, token, refresh_token, "
                    "scope_list, date_added, scopes) VALUES (9001, 1, 'new-tok', 'new-ref', "
                    "'[]', CURRENT_TIMESTAMP, 0)"
                    if conn.dialect.name == "sqlite"
                    else f"INSERT INTO {settings.tables.token} (id, user_id, token, "
                    "refresh_token, scope_list, date_added, scopes) VALUES (9001, 1, "
                    "'new-tok', 'new-ref', '{}', now(), 0)"
                )
            )
            # Not covered by the compatibility triggers (as if written before they existed).
            conn.execute(
                text(f"UPDATE {settings.tables.token} SET token_family_id = NULL WHERE id = 9001")
            )
    finally:
        engine.dispose()
    assert _same_as_exact(capsys, cfg)[("shard", JOB)] == ("stale", 1)
    gated = invoke(capsys, "--config", cfg, "upgrade")
    assert "shard: waiting before 0004: backfill token-families has 1 row left" in gated.out

    # A downgrade and upgrade re-create the token columns: the finished job row no longer
    # speaks for them, every token with a refresh token is pending again.
    assert (
        invoke(capsys, "--config", cfg, "-q", "-d", "shard", "downgrade", "--to", "0001").code == 0
    )
    assert invoke(capsys, "--config", cfg, "-q", "upgrade").code == 0
    assert _same_as_exact(capsys, cfg)[("shard", JOB)] == ("stale", 31)


@pg_only
def test_status_does_not_wait_behind_a_migration_lock(
    make_database: DatabaseFactory, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A migration's ACCESS EXCLUSIVE lock on the token table: ``status`` gives up after
    ``lock_timeout`` with one line naming the database, instead of hanging a CI job."""
    data = routed_config(make_database("control"), make_database("shard"))
    data["migrate"] = {"lock_timeout": "300ms"}
    settings = settings_from_mapping(data, {}, "test")
    cfg = write_config(tmp_path / "oauthmig.toml", data)
    create_legacy(settings)
    seed_legacy(settings, rows=10)
    assert invoke(capsys, "--config", cfg, "-q", "upgrade").code == 0
    url = settings.databases["shard"].url
    assert url is not None
    holder = create_engine(make_url(url))
    try:
        with holder.connect() as conn:
            conn.execute(text(f"LOCK TABLE {settings.tables.token} IN ACCESS EXCLUSIVE MODE"))
            shown = invoke(capsys, "--config", cfg, "status")
            conn.rollback()
    finally:
        holder.dispose()
    assert shown.code == 2, shown.out + shown.err
    assert "Traceback" not in shown.err
    assert "database 'shard'" in shown.err and "lock" in shown.err.lower(), shown.err
    assert invoke(capsys, "--config", cfg, "status").code in (0, 1)  # and it reads again after
