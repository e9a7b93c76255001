"""Backfill under real faults: lost locks, downgrades, server restarts, locked rows, frozen
backends, SIGTERM, shard-unique family ids. Real processes, real PostgreSQL (a private cluster
where the server itself is restarted, stopped or frozen), real SQLite.

Every test holds the backfill at a known point with a lock it owns (a row lock, the run's
advisory lock) instead of racing on speed.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.engine.interfaces import ReflectedColumn

from oauthmig.config import Settings, settings_from_mapping
from oauthmig.db import connect, make_engine
from oauthmig.demo.data import setup_legacy
from oauthmig.rollout.backfill import BackfillOptions, backfill
from oauthmig.rollout.job_state import JOB_TABLE, ShownStatus
from oauthmig.rollout.jobs import family_id
from oauthmig.runlock import exclusive_run, lock_key
from tests.forkserver import ForkedProcess, ForkServer
from tests.helpers import invoke, schema_dump, write_config
from tests.helpers.databases import DatabaseFactory
from tests.pgcluster import Cluster, pg_cluster_fixture  # noqa: F401  (fixture)
from tests.test_backfill import (
    PG,
    _as_uuid,
    _assert_tokens_backfilled,
    _job,
    _make,
    _rows,
    _spawn,
    _wait_for,
)

KEY = lock_key("backfill token-families")


def _lock_pid(settings: Settings, db: str) -> int | None:
    rows = _rows(
        settings,
        db,
        "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND granted AND objid = :k "
        "AND database = (SELECT oid FROM pg_database WHERE datname = current_database())",
        k=KEY,
    )
    return int(rows[0][0]) if rows else None


def _filled_ids(settings: Settings, db: str) -> set[int]:
    t = settings.tables.token
    return {
        int(r[0])
        for r in _rows(settings, db, f"SELECT id FROM {t} WHERE token_family_id IS NOT NULL")
    }


def _assert_cursor_invariant(settings: Settings, db: str) -> dict[str, Any]:
    """Exactly the refreshable rows at or below the saved cursor carry a family id."""
    state = _job(settings, db)
    t = settings.tables.token
    for row_id, fam, refresh in _rows(
        settings, db, f"SELECT id, token_family_id, refresh_token FROM {t}"
    ):
        assert (fam is not None) == (refresh is not None and row_id <= state["cursor"]), (
            row_id,
            state,
        )
    return state


def _wait_lock_wait(settings: Settings, db: str) -> None:
    _wait_for(
        lambda: (
            _rows(
                settings,
                db,
                "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'oauthmig' "
                "AND wait_event_type = 'Lock' AND datname = current_database()",
            )[0][0]
            > 0
        )
    )


def _assert_lost_its_lock(proc: ForkedProcess) -> None:
    """The run stopped in one line because another run took its lock."""
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 2, err
    assert "lost its run lock" in err and "another oauthmig backfill run" in err
    assert "Traceback" not in err


def _release(proc: ForkedProcess, row_lock: Connection, holder: Connection, engine: Engine) -> None:
    """End what a lost-lock test held: the run, the row lock, the taken advisory lock."""
    if proc.poll() is None:
        proc.kill()
    row_lock.rollback()
    row_lock.close()
    holder.execute(text("SELECT pg_advisory_unlock_all()"))
    holder.close()
    engine.dispose()


def _rerun_finishes(capsys: pytest.CaptureFixture[str], cfg: str, settings: Settings) -> None:
    """A rerun on the shard finishes the job the stopped run left."""
    done = invoke(capsys, "--config", cfg, "-d", "shard", "backfill", "token-families")
    assert done.code == 0, done.err
    _assert_tokens_backfilled(settings, "shard")


def _expanded(
    make_database: DatabaseFactory,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    **extra: Any,
) -> tuple[Settings, str]:
    settings, cfg = _make(make_database, tmp_path, tokens=3000, **extra)
    result = invoke(capsys, "--config", cfg, "upgrade")
    assert result.code == 0, result.err
    return settings, cfg


# ------------------------------------------------------------------ 2: the run lock


@PG
def test_lock_lost_to_terminate_backend_stops_the_run_at_once(
    make_database: DatabaseFactory,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    forkserver: ForkServer,
) -> None:
    settings, cfg = _expanded(
        make_database,
        tmp_path,
        capsys,
        migrate={"lock_timeout": "60s", "lock_retries": 2, "statement_timeout": "120s"},
    )
    token = settings.tables.token
    engine = make_engine(settings.databases["shard"], settings)
    blocked_id = _rows(
        settings,
        "shard",
        f"SELECT min(id) FROM {token} WHERE refresh_token IS NOT NULL AND id > 400",
    )[0][0]
    holder = engine.connect()  # plays the second run: waits for the lock, gets it on the kill
    row_lock = engine.connect()
    row_lock.execute(text(f"SELECT id FROM {token} WHERE id = :i FOR UPDATE"), {"i": blocked_id})
    proc = _spawn(forkserver, cfg, "-d", "shard", "backfill", "token-families", "--batch", "100")
    got_lock = threading.Event()
    try:
        _wait_lock_wait(settings, "shard")  # the run waits inside a batch on our row lock
        first_pid = _lock_pid(settings, "shard")
        assert first_pid is not None

        def take() -> None:
            holder.execute(text("SELECT pg_advisory_lock(:k)"), {"k": KEY})
            got_lock.set()

        holder_pid = holder.execute(text("SELECT pg_backend_pid()")).scalar_one()
        holder.commit()
        taker = threading.Thread(target=take)
        taker.start()
        _wait_for(
            lambda: (
                _rows(
                    settings,
                    "shard",
                    "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted "
                    "AND pid = :p",
                    p=holder_pid,
                )[0][0]
                > 0
            )
        )
        killed = _rows(settings, "shard", "SELECT pg_terminate_backend(:p)", p=first_pid)
        assert killed == [(True,)]
        taker.join(timeout=60)
        assert got_lock.is_set()
        _assert_lost_its_lock(proc)
        state = _assert_cursor_invariant(settings, "shard")  # the killed batch left nothing
        assert state["status"] == "running" and state["cursor"] < blocked_id
    finally:
        _release(proc, row_lock, holder, engine)
    _rerun_finishes(capsys, cfg, settings)


@pytest.mark.slow
@PG
def test_lock_lost_to_idle_session_timeout(
    make_database: DatabaseFactory,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    forkserver: ForkServer,
) -> None:
    settings, cfg = _expanded(make_database, tmp_path, capsys)
    db = settings.databases["shard"]
    dbname = str(db.url).rsplit("/", 1)[-1]
    engine = make_engine(db, settings)
    holder = engine.connect()  # opened before the timeout is set: never idle-killed
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as c:
        c.execute(text(f'ALTER DATABASE "{dbname}" SET idle_session_timeout = 300'))
    try:
        # 1) Nobody else takes the lock: the run notices each lost session before its next
        # batch, takes the lock again (its owner token unchanged) and finishes.
        alone = _spawn(
            forkserver,
            cfg,
            "-d",
            "shard",
            "-q",
            "backfill",
            "token-families",
            "--batch",
            "400",
            "--sleep",
            "0.6",
        )
        _, err = alone.communicate(timeout=300)
        assert alone.returncode == 0, err
        assert _job(settings, "shard")["attempts"] >= 1
        _assert_tokens_backfilled(settings, "shard")

        # 2) Another run takes the lock while the session is gone: the first one stops.
        proc = _spawn(
            forkserver,
            cfg,
            "-d",
            "shard",
            "backfill",
            "token-families",
            "--restart",
            "--batch",
            "50",
            "--sleep",
            "2",
        )
        _wait_for(lambda: _lock_pid(settings, "shard") is not None)
        # Blocks until the idle session of the sleeping run is ended by the server.
        holder.execute(text("SELECT pg_advisory_lock(:k)"), {"k": KEY})
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 2, err
        assert "lost its run lock" in err and "Traceback" not in err
    finally:
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as c:
            c.execute(text(f'ALTER DATABASE "{dbname}" RESET idle_session_timeout'))
        holder.execute(text("SELECT pg_advisory_unlock_all()"))
        holder.close()
        engine.dispose()


@PG
def test_job_row_taken_over_stops_the_run(
    make_database: DatabaseFactory,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    forkserver: ForkServer,
) -> None:
    settings, cfg = _expanded(
        make_database,
        tmp_path,
        capsys,
        migrate={"lock_timeout": "60s", "lock_retries": 2, "statement_timeout": "120s"},
    )
    token = settings.tables.token
    engine = make_engine(settings.databases["shard"], settings)
    blocked_id = _rows(
        settings,
        "shard",
        f"SELECT min(id) FROM {token} WHERE refresh_token IS NOT NULL AND id > 400",
    )[0][0]
    row_lock = engine.connect()
    row_lock.execute(text(f"SELECT id FROM {token} WHERE id = :i FOR UPDATE"), {"i": blocked_id})
    proc = _spawn(forkserver, cfg, "-d", "shard", "backfill", "token-families", "--batch", "100")
    try:
        _wait_lock_wait(settings, "shard")
        # Another run claimed the job row (e.g. it ran while this one's session was gone).
        with engine.begin() as c:
            c.execute(text(f"UPDATE {JOB_TABLE} SET owner = 'someone-else'"))
    finally:
        row_lock.rollback()
        row_lock.close()
    _, err = proc.communicate(timeout=120)
    engine.dispose()
    assert proc.returncode == 2, err
    assert "taken over by another oauthmig backfill run" in err
    _assert_cursor_invariant(settings, "shard")  # the batch in flight was rolled back


# ------------------------------------------------------------------ 3: column generations


def _one_batch_then_pause(settings: Settings) -> None:
    stop = threading.Event()
    result = backfill(
        settings,
        ["token-families"],
        BackfillOptions(batch_size=50),
        progress=lambda *_: stop.set(),
        stop=stop,
    )
    assert {r.status for r in result.runs} == {"paused"}


def test_downgrade_and_upgrade_restart_a_paused_job(
    make_database: DatabaseFactory, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    settings, cfg = _expanded(make_database, tmp_path, capsys)
    _one_batch_then_pause(settings)
    paused = _job(settings, "control")
    assert paused["status"] == "paused" and paused["cursor"] > 0
    assert invoke(capsys, "--config", cfg, "downgrade", "--to", "0001").code == 0
    assert invoke(capsys, "--config", cfg, "upgrade").code == 0
    result = invoke(capsys, "--config", cfg, "backfill", "token-families", "--format", "json")
    assert result.code == 0, result.err
    runs = json.loads(result.out)["jobs"]
    assert {j["status"] for j in runs} == {"finished"}
    assert all("restarted from the beginning" in (j["message"] or "") for j in runs)
    for db in ("control", "shard"):
        assert _assert_tokens_backfilled(settings, db) > 0  # no NULL left below the old cursor
    status = json.loads(invoke(capsys, "--config", cfg, "status", "--format", "json").out)
    states = {(d["database"], j["job"]): j for d in status["databases"] for j in d["backfills"]}
    assert states[("shard", "token-families")]["remaining"] == 0


def test_downgrade_refused_while_a_backfill_runs_on_its_columns(
    make_database: DatabaseFactory, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    settings, cfg = _expanded(make_database, tmp_path, capsys)
    db = settings.databases["shard"]
    engine = make_engine(db, settings)
    with connect(engine, db) as conn, exclusive_run(conn, db, "backfill token-families"):
        refused = invoke(capsys, "--config", cfg, "-d", "shard", "downgrade", "--to", "0001")
        assert refused.code == 2
        assert "cannot downgrade revision 0002 while backfill token-families is running" in (
            refused.err
        )
        # A revision whose columns no running job fills is not affected.
        other = invoke(capsys, "--config", cfg, "-d", "control", "downgrade", "--to", "0002")
        assert other.code == 0, other.err
    engine.dispose()
    assert invoke(capsys, "--config", cfg, "-d", "shard", "downgrade", "--to", "0001").code == 0


# ------------------------------------------------------------------ 4: outages, SIGTERM, status


def _cluster_install(
    cluster: Cluster, tmp_path: Path, capsys: pytest.CaptureFixture[str], window: str
) -> tuple[Settings, str]:
    url = cluster.create_database(f"outage_{uuid.uuid4().hex[:8]}")
    data: dict[str, Any] = {
        "databases": {"main": {"url": url}},
        "migrate": {"lock_timeout": "2s", "lock_retries": 2, "statement_timeout": "2s"},
        "backfill": {"outage_window": window},
    }
    settings = settings_from_mapping(data, {}, "test")
    setup_legacy(settings, apps=20, tokens=3000, seed=5)
    cfg = write_config(tmp_path / f"cluster-{window}.toml", data)
    assert invoke(capsys, "--config", cfg, "upgrade").code == 0
    return settings, cfg


def _job_batches(settings: Settings) -> int:
    if JOB_TABLE not in schema_dump(settings)["main"]:
        return 0
    rows = _rows(settings, "main", f"SELECT batches FROM {JOB_TABLE}")
    return int(rows[0][0]) if rows else 0


@pytest.mark.slow
def test_server_restart_within_the_outage_window_completes(
    pg_cluster: Cluster, tmp_path: Path, capsys: pytest.CaptureFixture[str], forkserver: ForkServer
) -> None:
    settings, cfg = _cluster_install(pg_cluster, tmp_path, capsys, "60s")
    # Half-second pauses: seconds of work are left when the server goes after two batches,
    # and a run that finished first fails the test (no reconnect attempt) rather than passing.
    proc = _spawn(
        forkserver, cfg, "-q", "backfill", "token-families", "--batch", "20", "--sleep", "0.5"
    )
    _wait_for(lambda: _job_batches(settings) >= 2)
    pg_cluster.restart("fast")
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    state = _job(settings, "main")
    assert state["status"] == "finished" and state["attempts"] >= 1, state
    _assert_tokens_backfilled(settings, "main")


@pytest.mark.slow
def test_outage_past_the_window_fails_and_status_shows_interrupted(
    pg_cluster: Cluster, tmp_path: Path, capsys: pytest.CaptureFixture[str], forkserver: ForkServer
) -> None:
    settings, cfg = _cluster_install(pg_cluster, tmp_path, capsys, "2s")
    # Half-second pauses: seconds of work are left when the server goes after two batches
    # (a run that finished first would exit 0 and fail the test).
    proc = _spawn(
        forkserver, cfg, "-q", "backfill", "token-families", "--batch", "20", "--sleep", "0.5"
    )
    _wait_for(lambda: _job_batches(settings) >= 2)
    pg_cluster.stop("fast")
    began = time.monotonic()
    try:
        _, err = proc.communicate(timeout=120)
    finally:
        pg_cluster.start()
    assert proc.returncode == 2, err
    assert time.monotonic() - began < 60
    assert "could not resume within outage_window 2s" in err and "Traceback" not in err
    # The server was down: the job row could not be updated; status tells it is not alive.
    state = _assert_cursor_invariant(settings, "main")
    assert state["status"] == "running"
    status = json.loads(invoke(capsys, "--config", cfg, "status", "--format", "json").out)
    assert status["databases"][0]["backfills"][0]["state"] == ShownStatus.INTERRUPTED
    text_status = invoke(capsys, "--config", cfg, "status")
    assert "no live process: interrupted" in text_status.out
    assert invoke(capsys, "--config", cfg, "backfill").code == 0
    _assert_tokens_backfilled(settings, "main")


@pytest.mark.slow
def test_frozen_backend_is_detected_by_the_client_deadline(
    pg_cluster: Cluster, tmp_path: Path, capsys: pytest.CaptureFixture[str], forkserver: ForkServer
) -> None:
    settings, cfg = _cluster_install(pg_cluster, tmp_path, capsys, "3s")
    proc = _spawn(
        forkserver, cfg, "-q", "backfill", "token-families", "--batch", "20", "--sleep", "0.5"
    )
    _wait_for(lambda: _job_batches(settings) >= 1)
    pid = _lock_pid(settings, "main")
    assert pid is not None
    os.kill(pid, signal.SIGSTOP)
    began = time.monotonic()
    try:
        was = _rows(settings, "main", "SELECT state FROM pg_stat_activity WHERE pid = :p", p=pid)
        _, err = proc.communicate(timeout=120)
        took = time.monotonic() - began
    finally:
        os.kill(pid, signal.SIGCONT)
    assert proc.returncode == 2, err
    # statement_timeout 2s + 5s grace, then the 3s outage window, plus process overhead.
    assert took < 40, took
    assert "no answer within the client deadline" in err
    assert f"pid {pid}" in err and "still holds the run lock" in err
    if was == [("idle",)]:
        # Frozen between batches: it held no row lock, so the failure is recorded.
        state = _job(settings, "main")
        assert state["status"] == "failed" and "client deadline" in state["last_error"]
    _wait_for(lambda: _lock_pid(settings, "main") is None)  # it ends once it runs again
    assert invoke(capsys, "--config", cfg, "backfill").code == 0
    _assert_tokens_backfilled(settings, "main")


@pytest.mark.slow
def test_sigterm_pauses_like_ctrl_c_and_status_tells_dead_from_live(
    make_database: DatabaseFactory,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    forkserver: ForkServer,
) -> None:
    settings, cfg = _expanded(make_database, tmp_path, capsys)
    # Each run commits a batch, then pauses an hour: it is held mid-job until signalled.
    args = ("-d", "shard", "backfill", "token-families", "--batch", "20", "--sleep", "3600")

    def shard_state() -> str:
        doc = json.loads(
            invoke(capsys, "--config", cfg, "-d", "shard", "status", "--format", "json").out
        )
        return str(doc["databases"][0]["backfills"][0]["state"])

    proc = _spawn(forkserver, cfg, *args)
    _wait_for(lambda: int(_job(settings, "shard").get("rows_done") or 0) > 0)
    assert shard_state() == "running"  # alive: it holds the run lock
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    assert "terminated (SIGTERM); state is saved" in err and "Traceback" not in err
    paused = _assert_cursor_invariant(settings, "shard")
    assert paused["status"] == "paused" and paused["rows_done"] > 0
    assert shard_state() == "paused"

    killed = _spawn(forkserver, cfg, *args)
    _wait_for(lambda: _job(settings, "shard").get("status") == "running")
    _wait_for(lambda: int(_job(settings, "shard").get("rows_done") or 0) > paused["rows_done"])
    killed.send_signal(signal.SIGKILL)
    killed.wait(timeout=60)
    assert shard_state() == ShownStatus.INTERRUPTED
    assert invoke(capsys, "--config", cfg, "-d", "shard", "backfill").code == 0
    _assert_tokens_backfilled(settings, "shard")


# ------------------------------------------------------------------ 5: a locked row


@pytest.mark.slow
@PG
def test_locked_row_narrows_the_batch_and_names_the_blocker(
    make_database: DatabaseFactory, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    settings, cfg = _expanded(
        make_database,
        tmp_path,
        capsys,
        migrate={"lock_timeout": "200ms", "lock_retries": 2, "statement_timeout": "30s"},
        # A batch's duration never shrinks the next one (600 s is never reached): the batch
        # sizes, and so the count of attempts, depend on the data only, not on machine load.
        backfill={"target_batch_seconds": 600},
    )
    token = settings.tables.token
    engine = make_engine(settings.databases["shard"], settings)
    ids = [
        int(r[0])
        for r in _rows(
            settings, "shard", f"SELECT id FROM {token} WHERE refresh_token IS NOT NULL ORDER BY id"
        )
    ]
    locked = ids[len(ids) // 2]
    blocker = engine.connect()
    blocker_pid = blocker.execute(text("SELECT pg_backend_pid()")).scalar_one()
    blocker.execute(text(f"SELECT id FROM {token} WHERE id = :i FOR UPDATE"), {"i": locked})
    try:
        failed = invoke(
            capsys, "--config", cfg, "-d", "shard", "backfill", "token-families", "--batch", "500"
        )
    finally:
        blocker.rollback()
        blocker.close()
    assert failed.code == 2
    assert f"{token} id {locked} stays locked" in failed.err
    assert f"locked by pid {blocker_pid} (idle in transaction, transaction open" in failed.err
    assert "select" not in failed.err.lower()  # never the blocker's query text
    state = _assert_cursor_invariant(settings, "shard")
    assert state["status"] == "failed" and f"pid {blocker_pid}" in state["last_error"]
    # Narrowed down to the locked row: everything before it is done.
    assert state["cursor"] == max(i for i in _all_ids(settings) if i < locked)
    assert state["attempts"] <= 15, state
    resumed = invoke(capsys, "--config", cfg, "-d", "shard", "backfill", "token-families")
    assert resumed.code == 0, resumed.err
    _assert_tokens_backfilled(settings, "shard")
    engine.dispose()


def _all_ids(settings: Settings) -> list[int]:
    return [int(r[0]) for r in _rows(settings, "shard", f"SELECT id FROM {settings.tables.token}")]


# ------------------------------------------------------------------ 9: family ids per database


def test_family_ids_are_unique_across_databases_and_v1_jobs_keep_theirs(
    make_database: DatabaseFactory, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    settings, cfg = _expanded(make_database, tmp_path, capsys)
    t = settings.tables.token
    # control: a job started by an older oauthmig (job version 1, no version column yet)
    # that filled its first batch with the old formula.
    stop = threading.Event()
    backfill(
        settings,
        ["token-families"],
        BackfillOptions(batch_size=50),
        progress=lambda *_: stop.set(),
        stop=stop,
    )
    engine = make_engine(settings.databases["control"], settings)
    with engine.begin() as c:
        filled = [
            int(r[0])
            for r in c.execute(text(f"SELECT id FROM {t} WHERE token_family_id IS NOT NULL"))
        ]
        assert filled
        for row_id in filled:
            value: Any = family_id(t, row_id)
            if c.dialect.name == "sqlite":
                value = value.hex
            c.execute(
                text(f"UPDATE {t} SET token_family_id = :v WHERE id = :i"),
                {"v": value, "i": row_id},
            )
        for col in ("owner", "generation", "version"):
            c.execute(text(f"ALTER TABLE {JOB_TABLE} DROP COLUMN {col}"))
    engine.dispose()
    result = invoke(capsys, "--config", cfg, "backfill", "token-families")
    assert result.code == 0, result.err
    control = {
        r[0]: _as_uuid(r[1])
        for r in _rows(
            settings,
            "control",
            f"SELECT id, token_family_id FROM {t} WHERE refresh_token IS NOT NULL",
        )
    }
    shard = {
        r[0]: _as_uuid(r[1])
        for r in _rows(
            settings,
            "shard",
            f"SELECT id, token_family_id FROM {t} WHERE refresh_token IS NOT NULL",
        )
    }
    assert all(fam == family_id(t, i) for i, fam in control.items())  # v1 kept, whole job
    assert all(fam == family_id(t, i, "shard") for i, fam in shard.items())  # v3 default
    assert set(control) & set(shard), "the two shards share token ids"
    assert not set(control.values()) & set(shard.values())
    versions = {
        db: _rows(settings, db, f"SELECT version FROM {JOB_TABLE} WHERE job = 'token-families'")[0][
            0
        ]
        for db in ("control", "shard")
    }
    assert versions == {"control": 1, "shard": 3}
    assert family_id(t, 7, "a") != family_id(t, 7, "b") != family_id(t, 7)


# ------------------------------------------------------------------ config of the new keys


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("max_duty", 0, "backfill.max_duty: must be between 0.01 and 1.0"),
        ("max_duty", 1.5, "backfill.max_duty: must be between 0.01 and 1.0"),
        ("max_duty", "half", "backfill.max_duty: expected a number"),
        ("outage_window", "soon", "backfill.outage_window: expected a duration"),
        ("outage_window", -1, "backfill.outage_window: must not be negative"),
    ],
)
def test_backfill_pacing_and_outage_keys_are_strict(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], key: str, value: Any, message: str
) -> None:
    db = tmp_path / "x.sqlite"
    db.touch()
    cfg = write_config(
        tmp_path / "bad.toml",
        {"databases": {"main": {"url": f"sqlite:///{db}"}}, "backfill": {key: value}},
    )
    result = invoke(capsys, "--config", cfg, "backfill", "--dry-run")
    assert result.code == 2
    assert message in result.err and len(result.err.strip().splitlines()) == 1


def test_backfill_pacing_defaults_and_values() -> None:
    s = settings_from_mapping(
        {
            "databases": {"main": {"url": "sqlite:///x.sqlite"}},
            "backfill": {"max_duty": 1.0, "outage_window": "90s"},
        },
        {},
        "test",
    )
    assert s.backfill.max_duty == 1.0 and s.backfill.outage_window_ms == 90_000
    d = settings_from_mapping({"databases": {"main": {"url": "sqlite:///x.sqlite"}}}, {}, "t")
    # Unset: 0.5 when latency pacing is off (SQLite, max_latency_ratio 0), its ceiling 1.0 on.
    assert d.backfill.max_duty is None and d.backfill.outage_window_ms == 60_000
    assert d.backfill.duty(paced=False) == 0.5 and d.backfill.duty(paced=True) == 1.0
    assert s.backfill.duty(paced=False) == s.backfill.duty(paced=True) == 1.0
    assert d.backfill.batch_size == 1000


# ------------------------------------------------------------------ 8: duty cycle


def test_default_duty_cycle_sleeps_at_least_as_long_as_each_batch(
    make_database: DatabaseFactory, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # The fixed duty cycle: latency pacing off (the default on SQLite, where it is a no-op).
    settings, _ = _expanded(make_database, tmp_path, capsys, backfill={"max_latency_ratio": 0})
    assert settings.backfill.duty(paced=False) == 0.5
    result = backfill(settings, ["token-families"], BackfillOptions(batch_size=100))
    runs = [r for r in result.runs if r.batches > 1]
    assert runs and all(r.status == "finished" for r in result.runs)
    for run in runs:
        # Each batch is followed by a pause of at least its own duration (the last one too).
        assert run.seconds >= 2 * sum(run.batch_seconds), run


@PG
def test_downgrade_refused_while_a_backfill_process_runs(
    make_database: DatabaseFactory,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    forkserver: ForkServer,
) -> None:
    settings, cfg = _expanded(
        make_database,
        tmp_path,
        capsys,
        migrate={"lock_timeout": "60s", "lock_retries": 2, "statement_timeout": "120s"},
    )
    token = settings.tables.token
    engine = make_engine(settings.databases["shard"], settings)
    row_lock = engine.connect()
    first = _rows(settings, "shard", f"SELECT min(id) FROM {token} WHERE refresh_token IS NOT NULL")
    row_lock.execute(text(f"SELECT id FROM {token} WHERE id = :i FOR UPDATE"), {"i": first[0][0]})
    proc = _spawn(forkserver, cfg, "-d", "shard", "backfill", "token-families")
    try:
        _wait_lock_wait(settings, "shard")  # the backfill is live, held inside its first batch
        refused = invoke(capsys, "--config", cfg, "-d", "shard", "downgrade", "--to", "0001")
        assert refused.code == 2
        assert "while backfill token-families is running on its columns" in refused.err
        assert "token_family_id" in {c["name"] for c in _token_columns(settings)}
    finally:
        row_lock.rollback()
        row_lock.close()
        engine.dispose()
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert invoke(capsys, "--config", cfg, "-d", "shard", "downgrade", "--to", "0001").code == 0


def _token_columns(settings: Settings) -> list[ReflectedColumn]:
    from sqlalchemy import inspect

    engine = make_engine(settings.databases["shard"], settings)
    try:
        with engine.connect() as conn:
            return list(inspect(conn).get_columns(settings.tables.token))
    finally:
        engine.dispose()


@pytest.mark.slow
@PG
def test_lock_on_direct_url_lost_stops_the_batches_on_url(
    make_database: DatabaseFactory,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    forkserver: ForkServer,
) -> None:
    """With a ``direct_url``, the run lock lives on a session of its own and the batches run on
    ``url``: when that session is terminated and another run takes the lock, the batch in
    flight (its owner token still valid) may commit, and the run stops before the next one."""
    settings, _ = _expanded(
        make_database,
        tmp_path,
        capsys,
        migrate={"lock_timeout": "60s", "lock_retries": 2, "statement_timeout": "120s"},
    )
    data = {
        "databases": {
            name: {"url": db.url, "direct_url": db.url} for name, db in settings.databases.items()
        },
        "routing": {
            "application": ["control"],
            "grant": ["control"],
            "token": ["control", "shard"],
        },
        "migrate": {"lock_timeout": "60s", "lock_retries": 2, "statement_timeout": "120s"},
    }
    cfg = write_config(tmp_path / "direct.toml", data)
    token = settings.tables.token
    engine = make_engine(settings.databases["shard"], settings)
    blocked_id = _rows(
        settings,
        "shard",
        f"SELECT min(id) FROM {token} WHERE refresh_token IS NOT NULL AND id > 400",
    )[0][0]
    holder = engine.connect()  # plays the second run: takes the lock once it is free
    row_lock = engine.connect()
    row_lock.execute(text(f"SELECT id FROM {token} WHERE id = :i FOR UPDATE"), {"i": blocked_id})
    proc = _spawn(forkserver, cfg, "-d", "shard", "backfill", "token-families", "--batch", "100")
    try:
        _wait_lock_wait(settings, "shard")  # a batch waits on our row lock
        lock_pid = _lock_pid(settings, "shard")
        assert lock_pid is not None
        waiting = _rows(
            settings,
            "shard",
            "SELECT pid FROM pg_stat_activity WHERE application_name = 'oauthmig' "
            "AND wait_event_type = 'Lock' AND datname = current_database()",
        )
        assert [r[0] for r in waiting] != [lock_pid]  # the lock is not on the batch's session
        killed = _rows(settings, "shard", "SELECT pg_terminate_backend(:p)", p=lock_pid)
        assert killed == [(True,)]
        _wait_for(lambda: _lock_pid(settings, "shard") is None)
        assert holder.execute(text("SELECT pg_try_advisory_lock(:k)"), {"k": KEY}).scalar()
        holder.commit()
        row_lock.rollback()  # the batch in flight goes on
        _assert_lost_its_lock(proc)
        state = _assert_cursor_invariant(settings, "shard")
        assert state["status"] == "running"
    finally:
        _release(proc, row_lock, holder, engine)
    _rerun_finishes(capsys, cfg, settings)


@pytest.mark.slow
@PG
def test_lock_session_on_direct_url_ended_is_taken_again(
    make_database: DatabaseFactory,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    forkserver: ForkServer,
) -> None:
    """The run lock's own session on ``direct_url`` ends (terminated here; an idle-session
    timeout alike) while no other run takes the lock: the run takes it again and finishes."""
    settings, _ = _expanded(make_database, tmp_path, capsys)
    data = {
        "databases": {
            name: {"url": db.url, "direct_url": db.url} for name, db in settings.databases.items()
        },
        "routing": {
            "application": ["control"],
            "grant": ["control"],
            "token": ["control", "shard"],
        },
    }
    cfg = write_config(tmp_path / "direct.toml", data)
    token = settings.tables.token
    engine = make_engine(settings.databases["shard"], settings)
    blocked_id = _rows(
        settings,
        "shard",
        f"SELECT min(id) FROM {token} WHERE refresh_token IS NOT NULL AND id > 400",
    )[0][0]
    row_lock = engine.connect()
    row_lock.execute(text(f"SELECT id FROM {token} WHERE id = :i FOR UPDATE"), {"i": blocked_id})
    proc = _spawn(forkserver, cfg, "-d", "shard", "backfill", "token-families", "--batch", "100")
    try:
        _wait_lock_wait(settings, "shard")
        lock_pid = _lock_pid(settings, "shard")
        assert lock_pid is not None
        assert _rows(settings, "shard", "SELECT pg_terminate_backend(:p)", p=lock_pid) == [(True,)]
        _wait_for(lambda: _lock_pid(settings, "shard") != lock_pid)
        row_lock.rollback()
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
    finally:
        if proc.poll() is None:
            proc.kill()
        row_lock.rollback()
        row_lock.close()
        engine.dispose()
    assert _lock_pid(settings, "shard") is None
    _assert_tokens_backfilled(settings, "shard")
