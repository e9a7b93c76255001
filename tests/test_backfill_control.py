"""Pause, resume and cancel from another process, and the batch history table, on real SQLite
and PostgreSQL with real separate processes.

Runs are held at known points instead of raced: parked in a one-hour pause between batches
(after their first batch committed), or inside a batch on a row lock the test holds.
"""

from __future__ import annotations

import json
import re
import signal
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text
from sqlalchemy.exc import SQLAlchemyError

from oauthmig.config import Settings, settings_from_mapping
from oauthmig.db import make_engine
from oauthmig.rollout.batches import (
    BATCH_TABLE,
    PRUNE_EVERY,
    PRUNE_STEP,
    BatchLog,
    ensure_batch_table,
)
from oauthmig.rollout.control import requester
from oauthmig.rollout.job_state import JOB_TABLE
from tests.forkserver import ForkServer
from tests.helpers import invoke, run_lock_held
from tests.helpers.databases import DatabaseFactory
from tests.test_backfill import PG, _assert_tokens_backfilled, _rows, _spawn, _wait_for
from tests.test_backfill_faults import (
    _assert_cursor_invariant,
    _expanded,
    _filled_ids,
    _wait_lock_wait,
)

JOB = "token-families"
PARK = ("--batch", "20", "--sleep", "3600")  # one batch, then an hour's pause between batches
LOCK_WAITS = {"lock_timeout": "60s", "lock_retries": 2, "statement_timeout": "120s"}


def _job_row(settings: Settings, db: str) -> dict[str, Any]:
    rows = _rows(
        settings,
        db,
        f"SELECT status, cursor, rows_done, batches, requested_action, requested_by "
        f"FROM {JOB_TABLE} WHERE job = :j",
        j=JOB,
    )
    keys = ("status", "cursor", "rows_done", "batches", "requested_action", "requested_by")
    return dict(zip(keys, rows[0], strict=True)) if rows else {}


def _committed_batches(settings: Settings, db: str) -> int:
    """Batches the job row counts (0 before the job table exists)."""
    try:
        return int(_job_row(settings, db).get("batches") or 0)
    except SQLAlchemyError:  # the job table is created by the run itself
        return 0


def _history(settings: Settings, db: str) -> list[dict[str, Any]]:
    keys = ("outcome", "lo", "hi", "batches", "rows_changed", "attempts", "error_class")
    rows = _rows(
        settings,
        db,
        f"SELECT {', '.join(keys)} FROM {BATCH_TABLE} WHERE job = :j ORDER BY id",
        j=JOB,
    )
    return [dict(zip(keys, r, strict=True)) for r in rows]


def _assert_history_matches_job(settings: Settings, db: str) -> list[dict[str, Any]]:
    """The batch table holds exactly the committed batches the job row counts: batches, rows
    and the cursor add up (summary rows included), whatever stopped the run."""
    job = _job_row(settings, db)
    history = _history(settings, db)
    counted = [h for h in history if h["outcome"] in ("committed", "summary")]
    assert sum(h["batches"] for h in counted) == job["batches"], (job, history)
    assert sum(h["rows_changed"] for h in counted) == job["rows_done"], (job, history)
    assert max((h["hi"] for h in counted), default=0) == job["cursor"], (job, history)
    return history


def _status_job(cfg: str, capsys: pytest.CaptureFixture[str], db: str) -> dict[str, Any]:
    doc = json.loads(invoke(capsys, "--config", cfg, "-d", db, "status", "--format", "json").out)
    jobs = {j["job"]: j for j in doc["databases"][0]["backfills"]}
    job: dict[str, Any] = jobs[JOB]
    return job


def _one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    return lines[0]


# ------------------------------------------------------------------ pause


def test_pause_from_another_process_stops_the_run_and_holds_the_job(
    forkserver: ForkServer,
    make_database: DatabaseFactory,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    settings, cfg = _expanded(make_database, tmp_path, capsys)
    run = _spawn(forkserver, cfg, "-d", "shard", "backfill", JOB, *PARK)
    try:
        _wait_for(lambda: _committed_batches(settings, "shard") >= 1)  # parked after a batch
        asker = _spawn(
            forkserver, cfg, "-d", "shard", "backfill", "pause", JOB, "--wait", "--timeout", "120"
        )
        _, asked_err = asker.communicate(timeout=180)
        assert asker.returncode == 0, asked_err
        # --wait returned: the run has seen the request and let go of the job.
        assert not run_lock_held(settings, "shard", f"backfill {JOB}")
        out, err = run.communicate(timeout=120)
    finally:
        if run.poll() is None:
            run.kill()
    who = requester()
    assert run.returncode == 0, err
    assert f"paused by request ({who} at " in out and "Traceback" not in err
    state = _assert_cursor_invariant(settings, "shard")  # rows filled exactly up to the cursor
    assert state["status"] == "paused" and state["cursor"] > 0
    assert _filled_ids(settings, "shard") and max(_filled_ids(settings, "shard")) <= state["cursor"]
    _assert_history_matches_job(settings, "shard")

    job = _status_job(cfg, capsys, "shard")
    assert job["state"] == "paused" and job["requested_action"] == "pause"
    assert job["requested_by"] == who
    asked_at = datetime.fromisoformat(job["requested_at"])
    assert abs((datetime.now(UTC) - asked_at).total_seconds()) < 600
    shown = invoke(capsys, "--config", cfg, "-d", "shard", "status").out
    assert f"pause requested by {who} at " in shown

    # The pause holds: a plain run (and a --restart) stops before its first batch, exit 0.
    for extra in ((), ("--restart",)):
        held = invoke(capsys, "--config", cfg, "-d", "shard", "backfill", JOB, *extra)
        assert held.code == 0, held.err
        assert "paused by request" in held.out
    assert _job_row(settings, "shard")["rows_done"] == 0  # the --restart reset, nothing done
    assert _filled_ids(settings, "shard")  # ... and wrote nothing (the guard keeps old rows)

    resumed = invoke(capsys, "--config", cfg, "-d", "shard", "backfill", "resume", JOB)
    assert resumed.code == 0, resumed.err
    done = invoke(capsys, "--config", cfg, "-d", "shard", "backfill", JOB, "--format", "json")
    assert done.code == 0, done.err
    assert json.loads(done.out)["jobs"][0]["status"] == "finished"
    _assert_tokens_backfilled(settings, "shard")
    _assert_history_matches_job(settings, "shard")
    assert _status_job(cfg, capsys, "shard")["requested_action"] == "resume"


@PG
def test_pause_during_a_batch_lets_that_batch_commit_then_stops(
    forkserver: ForkServer,
    make_database: DatabaseFactory,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    settings, cfg = _expanded(make_database, tmp_path, capsys, migrate=LOCK_WAITS)
    token = settings.tables.token
    blocked = _rows(
        settings,
        "shard",
        f"SELECT min(id) FROM {token} WHERE refresh_token IS NOT NULL AND id > 400",
    )[0][0]
    engine = make_engine(settings.databases["shard"], settings)
    row_lock = engine.connect()
    row_lock.execute(text(f"SELECT id FROM {token} WHERE id = :i FOR UPDATE"), {"i": blocked})
    run = _spawn(forkserver, cfg, "-d", "shard", "backfill", JOB, "--batch", "100")
    try:
        _wait_lock_wait(settings, "shard")  # the run is inside a batch, its UPDATE waits on us
        asker = _spawn(forkserver, cfg, "-d", "shard", "backfill", "pause", JOB)
        _, asked_err = asker.communicate(timeout=120)
        assert asker.returncode == 0, asked_err
        assert _job_row(settings, "shard")["requested_action"] == "pause"
    finally:
        row_lock.rollback()
        row_lock.close()
        engine.dispose()
    out, err = run.communicate(timeout=120)
    assert run.returncode == 0, err
    assert "paused by request" in out
    state = _assert_cursor_invariant(settings, "shard")
    assert state["status"] == "paused"
    assert state["cursor"] >= blocked  # the batch in flight committed whole, then it stopped
    history = _assert_history_matches_job(settings, "shard")
    last = [h for h in history if h["outcome"] == "committed"][-1]
    assert last["lo"] < blocked <= last["hi"]


def test_pause_of_a_job_that_never_ran_holds_its_first_run(
    make_database: DatabaseFactory, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    settings, cfg = _expanded(make_database, tmp_path, capsys)
    asked = invoke(capsys, "--config", cfg, "backfill", "pause", JOB, "--format", "json")
    assert asked.code == 0, asked.err
    doc = json.loads(asked.out)
    assert doc["action"] == "pause"
    assert {(r["database"], r["state"], r["recorded"]) for r in doc["requests"]} == {
        ("control", "not started", True),
        ("shard", "not started", True),
    }
    assert all(r["request"]["by"] == requester() for r in doc["requests"])
    again = json.loads(
        invoke(capsys, "--config", cfg, "backfill", "pause", JOB, "--format", "json").out
    )
    assert {r["recorded"] for r in again["requests"]} == {False}  # the first request stands

    held = invoke(capsys, "--config", cfg, "backfill", JOB, "--format", "json")
    assert held.code == 0, held.err
    runs = json.loads(held.out)["jobs"]
    assert {r["status"] for r in runs} == {"paused"}
    assert all("paused by request" in r["message"] for r in runs)
    assert all("restarted" not in r["message"] for r in runs)  # a held row has no progress
    for db in ("control", "shard"):
        assert not _filled_ids(settings, db)
    assert _status_job(cfg, capsys, "control")["state"] == "paused"

    assert invoke(capsys, "--config", cfg, "backfill", "resume").code == 0
    done = invoke(capsys, "--config", cfg, "backfill", JOB)
    assert done.code == 0, done.err
    for db in ("control", "shard"):
        _assert_tokens_backfilled(settings, db)
        _assert_history_matches_job(settings, db)
    nothing = json.loads(
        invoke(capsys, "--config", cfg, "backfill", "resume", "--format", "json").out
    )
    assert {r["recorded"] for r in nothing["requests"]} == {False}


# ------------------------------------------------------------------ cancel


def test_cancel_from_another_process_then_only_restart_runs_the_job(
    forkserver: ForkServer,
    make_database: DatabaseFactory,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    settings, cfg = _expanded(make_database, tmp_path, capsys)
    run = _spawn(forkserver, cfg, "-d", "shard", "backfill", JOB, *PARK)
    try:
        _wait_for(lambda: _committed_batches(settings, "shard") >= 1)
        asker = _spawn(forkserver, cfg, "-d", "shard", "backfill", "cancel", JOB)
        _, asked_err = asker.communicate(timeout=120)
        assert asker.returncode == 0, asked_err
        _, err = run.communicate(timeout=120)
    finally:
        if run.poll() is None:
            run.kill()
    assert run.returncode == 2, err
    line = _one_error_line(err)
    assert f"cancelled by request ({requester()} at " in line and "--restart" in line
    state = _assert_cursor_invariant(settings, "shard")
    assert state["status"] == "cancelled" and state["cursor"] > 0
    _assert_history_matches_job(settings, "shard")
    assert _status_job(cfg, capsys, "shard")["state"] == "cancelled"

    plain = invoke(capsys, "--config", cfg, "-d", "shard", "backfill", JOB)
    assert plain.code == 2
    assert "was cancelled" in _one_error_line(plain.err) and "--restart" in plain.err
    assert _job_row(settings, "shard")["cursor"] == state["cursor"]  # it did nothing

    refused = invoke(capsys, "--config", cfg, "-d", "shard", "backfill", "resume", JOB)
    assert refused.code == 2
    assert "cannot undo a cancel" in _one_error_line(refused.err)
    assert _job_row(settings, "shard")["requested_action"] == "cancel"  # nothing recorded

    restarted = invoke(capsys, "--config", cfg, "-d", "shard", "backfill", JOB, "--restart")
    assert restarted.code == 0, restarted.err
    assert _job_row(settings, "shard")["status"] == "finished"
    assert _job_row(settings, "shard")["requested_action"] is None
    _assert_tokens_backfilled(settings, "shard")
    _assert_history_matches_job(settings, "shard")


def test_cancel_of_a_job_that_is_not_running_marks_it_at_once(
    make_database: DatabaseFactory, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    settings, cfg = _expanded(make_database, tmp_path, capsys)
    asked = invoke(
        capsys, "--config", cfg, "-d", "control", "backfill", "cancel", "--format", "json"
    )
    assert asked.code == 0, asked.err
    effects = {r["job"]: r for r in json.loads(asked.out)["requests"]}
    assert set(effects) == {"token-families", "client-metadata"}
    assert all(r["recorded"] and "cancelled" in r["effect"] for r in effects.values())
    assert _status_job(cfg, capsys, "control")["state"] == "cancelled"
    plain = invoke(capsys, "--config", cfg, "-d", "control", "backfill")
    assert plain.code == 2
    assert plain.err.count("was cancelled") == 2  # one line per job, then a summary line
    assert not _filled_ids(settings, "control")
    assert invoke(capsys, "--config", cfg, "-d", "control", "backfill", "--restart").code == 0
    _assert_tokens_backfilled(settings, "control")


# ------------------------------------------------------------------ the batch table


def test_batch_history_is_bounded_and_adds_up_to_the_job(
    make_database: DatabaseFactory, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    keep = 3
    settings, cfg = _expanded(make_database, tmp_path, capsys, backfill={"keep_batches": keep})
    done = invoke(capsys, "--config", cfg, "-d", "shard", "backfill", JOB, "--batch", "10")
    assert done.code == 0, done.err
    job = _job_row(settings, "shard")
    assert job["batches"] > 3 * keep
    history = _assert_history_matches_job(settings, "shard")
    assert len(history) <= keep + min(PRUNE_EVERY, keep) + 1
    assert [h["outcome"] for h in history].count("summary") == 1
    assert min(h["lo"] for h in history) == 0

    report = invoke(
        capsys, "--config", cfg, "-d", "shard", "backfill", "--report", "--format", "json"
    )
    assert report.code == 0, report.err
    entry = json.loads(report.out)["jobs"][0]
    assert entry["summary"]["batches"] + len(entry["recent"]) == job["batches"]
    stats = entry["state"]["history"]
    assert stats["batches"] == job["batches"] and stats["rows_changed"] == job["rows_done"]
    assert stats["eta_seconds"] == 0.0 and stats["p50_seconds"] <= stats["p99_seconds"]
    shown = invoke(capsys, "--config", cfg, "-d", "shard", "backfill", "--report", "--last", "2")
    assert shown.code == 0, shown.err
    assert "last 2 batches" in shown.out and "older batches:" in shown.out
    assert "rows/s" in invoke(capsys, "--config", cfg, "-d", "shard", "status").out


def _engine_settings(make_database: DatabaseFactory) -> Settings:
    return settings_from_mapping(
        {"databases": {"main": {"url": make_database("history")}}}, {}, "test"
    )


def test_pruning_folds_old_batches_into_the_summary_in_small_steps(
    make_database: DatabaseFactory,
) -> None:
    settings = _engine_settings(make_database)
    db = settings.databases["main"]
    engine = make_engine(db, settings, create=True)

    def commit_batches(log: BatchLog, first: int, count: int) -> None:
        with engine.connect() as conn:
            for i in range(first, first + count):
                with conn.begin():
                    log.committed(conn, i * 10, i * 10 + 10, 7, 0.01, datetime.now(UTC))

    def rows() -> list[tuple[Any, ...]]:
        with engine.connect() as conn:
            return [
                tuple(r)
                for r in conn.execute(
                    text(
                        f"SELECT outcome, batches, rows_changed, lo, hi FROM {BATCH_TABLE} "
                        "ORDER BY id"
                    )
                )
            ]

    try:
        with engine.connect() as conn:
            ensure_batch_table(conn)
        commit_batches(BatchLog(JOB, "run-a", keep=1000), 0, 500)
        assert len(rows()) == 500  # within keep: nothing folded
        # keep lowered to 10: each prune folds at most PRUNE_STEP rows, then the next ones.
        smaller = BatchLog(JOB, "run-b", keep=10)
        commit_batches(smaller, 500, 10)
        assert len(rows()) == 510 - PRUNE_STEP + 1
        commit_batches(smaller, 510, 100)
        final = rows()
        assert len(final) <= 10 + 10 + 1
        summary = [r for r in final if r[0] == "summary"]
        assert len(summary) == 1
        assert sum(r[1] for r in final) == 610 and sum(r[2] for r in final) == 610 * 7
        assert summary[0][3] == 0 and max(r[4] for r in final) == 6100
    finally:
        engine.dispose()


def test_batch_history_is_consistent_after_kill_9(
    forkserver: ForkServer,
    make_database: DatabaseFactory,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    backend: str,
) -> None:
    settings, cfg = _expanded(make_database, tmp_path, capsys, migrate=LOCK_WAITS)
    token = settings.tables.token
    engine = make_engine(settings.databases["shard"], settings)
    row_lock = engine.connect()
    blocked: int | None = None
    if backend == "postgresql":
        # Killed inside a batch: its UPDATE waits on a row lock the test holds.
        blocked = _rows(
            settings,
            "shard",
            f"SELECT min(id) FROM {token} WHERE refresh_token IS NOT NULL AND id > 400",
        )[0][0]
        row_lock.execute(text(f"SELECT id FROM {token} WHERE id = :i FOR UPDATE"), {"i": blocked})
        run = _spawn(forkserver, cfg, "-d", "shard", "-q", "backfill", JOB, "--batch", "100")
        _wait_lock_wait(settings, "shard")
    else:
        # SQLite has no row locks: killed while parked between batches.
        run = _spawn(forkserver, cfg, "-d", "shard", "-q", "backfill", JOB, *PARK)
        _wait_for(lambda: _committed_batches(settings, "shard") >= 1)
    run.send_signal(signal.SIGKILL)
    run.wait(timeout=60)
    row_lock.rollback()
    row_lock.close()
    _wait_for(lambda: not run_lock_held(settings, "shard", f"backfill {JOB}"))
    engine.dispose()
    state = _assert_cursor_invariant(settings, "shard")
    assert state["status"] == "running" and state["cursor"] > 0  # as the kill left it
    history = _assert_history_matches_job(settings, "shard")
    if blocked is not None:
        assert all(h["hi"] < blocked for h in history)  # the killed batch left no row
    done = invoke(capsys, "--config", cfg, "-d", "shard", "backfill", JOB)
    assert done.code == 0, done.err
    _assert_tokens_backfilled(settings, "shard")
    _assert_history_matches_job(settings, "shard")


def test_failed_attempts_keep_the_error_class_and_never_row_data(
    make_database: DatabaseFactory,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    backend: str,
) -> None:
    settings, cfg = _expanded(make_database, tmp_path, capsys)
    token = settings.tables.token
    secret = "rt-s3cr3t-9f2c"
    engine = make_engine(settings.databases["shard"], settings)
    with engine.begin() as conn:
        first = conn.execute(
            text(f"SELECT min(id) FROM {token} WHERE refresh_token IS NOT NULL")
        ).scalar_one()
        conn.execute(
            text(f"UPDATE {token} SET refresh_token = :s WHERE id = :i"), {"s": secret, "i": first}
        )
        if backend == "postgresql":
            conn.execute(
                text(
                    "CREATE FUNCTION leak() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
                    "RAISE EXCEPTION 'refresh token % is %', NEW.id, NEW.refresh_token; END $$"
                )
            )
            conn.execute(
                text(
                    f"CREATE TRIGGER leak BEFORE UPDATE ON {token} FOR EACH ROW "
                    "WHEN (NEW.token_family_id IS NOT NULL) EXECUTE FUNCTION leak()"
                )
            )
        else:
            conn.execute(
                text(
                    f"CREATE TRIGGER leak BEFORE UPDATE OF token_family_id ON {token} "
                    f"WHEN NEW.token_family_id IS NOT NULL BEGIN "
                    f"SELECT RAISE(ABORT, 'refresh token is {secret}'); END"
                )
            )
    engine.dispose()
    failed = invoke(capsys, "--config", cfg, "-d", "shard", "backfill", JOB)
    assert failed.code == 2
    assert secret not in failed.out + failed.err
    history = _history(settings, "shard")
    assert history and {h["outcome"] for h in history} == {"failed"}
    assert all(h["lo"] == 0 and h["rows_changed"] == 0 for h in history)
    classes = {h["error_class"] for h in history}
    expected = r"P0001 RaiseException" if backend == "postgresql" else r"SQLITE_\w+ IntegrityError"
    assert all(re.fullmatch(expected, c) for c in classes), classes
    dump = repr(_rows(settings, "shard", f"SELECT * FROM {BATCH_TABLE}"))
    assert secret not in dump and "refresh token" not in dump
    report = invoke(capsys, "--config", cfg, "-d", "shard", "backfill", "--report")
    assert report.code == 0, report.err
    assert secret not in report.out and "failed attempts by error class" in report.out
