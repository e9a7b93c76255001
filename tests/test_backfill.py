"""Backfill engine and finalize gate on real SQLite and PostgreSQL databases."""

from __future__ import annotations

import json
import signal
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import event, inspect, text
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.engine.interfaces import DBAPICursor, ReflectedColumn

from oauthmig.config import LOGICAL_TABLES, Settings, settings_from_mapping
from oauthmig.db import connect, make_engine
from oauthmig.demo.data import setup_legacy
from oauthmig.rollout import revisions
from oauthmig.rollout.backfill import MAX_BATCH, MIN_BATCH, adapt_batch_size
from oauthmig.rollout.job_state import JOB_TABLE
from oauthmig.rollout.jobs import JOBS, family_id, infer_application_type
from oauthmig.runlock import exclusive_run
from tests.forkserver import ForkedProcess, ForkServer
from tests.helpers import data_checksum, invoke, run_lock_held, schema_dump, write_config
from tests.helpers.databases import DatabaseFactory, routed_config

ROOT = Path(__file__).resolve().parent.parent


def _make(
    make_database: DatabaseFactory,
    tmp_path: Path,
    *,
    apps: int = 60,
    tokens: int = 600,
    seed: int = 7,
    **extra: Any,
) -> tuple[Settings, str]:
    data = routed_config(make_database("control"), make_database("shard"), **extra)
    settings = settings_from_mapping(data, {}, "test")
    setup_legacy(settings, apps=apps, tokens=tokens, seed=seed)
    return settings, write_config(tmp_path / "oauthmig.toml", data)


@pytest.fixture
def expanded(
    make_database: DatabaseFactory, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> tuple[Settings, str]:
    settings, cfg = _make(make_database, tmp_path)
    result = invoke(capsys, "--config", cfg, "upgrade")
    assert result.code == 0, result.err
    return settings, cfg


def _rows(settings: Settings, db: str, sql: str, **params: Any) -> list[Any]:
    engine = make_engine(settings.databases[db], settings)
    try:
        with engine.connect() as conn:
            return list(conn.execute(text(sql), params).all())
    finally:
        engine.dispose()


def _as_uuid(value: Any) -> uuid.UUID | None:
    if value is None:
        return None
    return value if isinstance(value, uuid.UUID) else uuid.UUID(str(value))


def _assert_tokens_backfilled(settings: Settings, db: str) -> int:
    t = settings.tables.token
    rows = _rows(settings, db, f"SELECT id, refresh_token, token_family_id FROM {t}")
    assert rows
    refreshable = 0
    for row_id, refresh, fam in rows:
        if refresh is None:
            assert fam is None
        else:
            refreshable += 1
            assert _as_uuid(fam) == family_id(t, row_id, db)
    return refreshable


def test_family_id_is_documented_uuid3() -> None:
    value = family_id("sentry_apitoken", 42)
    assert value.version == 3
    assert value == uuid.uuid3(
        uuid.UUID("6f1c1d1e-8a34-4c55-9b6e-0a7e5d1f2c3b"), "sentry_apitoken:42"
    )
    assert family_id("sentry_apitoken", 42) != family_id("sentry_apitoken", 43)


@pytest.mark.parametrize(
    ("size", "seconds", "expected"),
    [
        (1000, 0.5, 1000),
        (1000, 0.1, 1250),
        (1000, 1.0, 500),
        (1000, 50.0, 100),
        (MAX_BATCH, 0.001, MAX_BATCH),
        (MIN_BATCH, 100.0, MIN_BATCH),
    ],
    ids=[
        "on-target",
        "fast-grows-25pct",
        "slow-halves",
        "very-slow-clamped-to-10pct",
        "max-bound",
        "min-bound",
    ],
)
def test_adapt_batch_size(size: int, seconds: float, expected: int) -> None:
    assert adapt_batch_size(size, seconds, 0.5) == expected


def test_backfill_fills_everything_and_rerun_changes_nothing(
    expanded: tuple[Settings, str], capsys: pytest.CaptureFixture[str]
) -> None:
    settings, cfg = expanded
    result = invoke(capsys, "--config", cfg, "backfill", "--batch", "37", "--format", "json")
    assert result.code == 0, result.err
    doc = json.loads(result.out)
    runs = {(j["job"], j["database"]): j for j in doc["jobs"]}
    assert set(runs) == {
        ("token-families", "control"),
        ("token-families", "shard"),
        ("client-metadata", "control"),
    }
    assert all(j["status"] == "finished" for j in runs.values())
    assert runs[("token-families", "control")]["batches"] > 1
    for db in ("control", "shard"):
        assert runs[("token-families", db)]["rows_changed"] == _assert_tokens_backfilled(
            settings, db
        )

    a = settings.tables.application
    cm = settings.backfill.client_metadata
    apps = _rows(
        settings,
        "control",
        f"SELECT client_secret, redirect_uris, "
        f"token_endpoint_auth_method, grant_types, response_types, application_type "
        f"FROM {a}",
    )
    assert runs[("client-metadata", "control")]["rows_changed"] == len(apps)
    for secret, uris, method, grants, responses, app_type in apps:
        assert method == ("none" if not secret else cm.confidential_auth_method)
        grants = grants if isinstance(grants, list) else json.loads(grants)
        responses = responses if isinstance(responses, list) else json.loads(responses)
        assert grants == list(cm.grant_types) and responses == list(cm.response_types)
        assert app_type == infer_application_type(uris)
    assert {row[5] for row in apps} == {"web", "native"}

    again = invoke(capsys, "--config", cfg, "backfill", "--format", "json")
    assert again.code == 0, again.err
    assert all(j["rows_changed"] == 0 for j in json.loads(again.out)["jobs"])
    restarted = invoke(capsys, "--config", cfg, "backfill", "--restart", "--format", "json")
    assert all(j["rows_changed"] == 0 for j in json.loads(restarted.out)["jobs"])

    status = json.loads(invoke(capsys, "--config", cfg, "status", "--format", "json").out)
    jobs = {(d["database"], j["job"]): j for d in status["databases"] for j in d["backfills"]}
    assert jobs[("shard", "token-families")]["state"] == "finished"
    assert jobs[("shard", "token-families")]["remaining"] == 0


def test_dry_run_writes_nothing(
    expanded: tuple[Settings, str], capsys: pytest.CaptureFixture[str]
) -> None:
    settings, cfg = expanded
    schema, data = schema_dump(settings), data_checksum(settings)
    result = invoke(capsys, "--config", cfg, "backfill", "--dry-run", "--format", "json")
    assert result.code == 0, result.err
    doc = json.loads(result.out)
    assert doc["dry_run"] is True
    by = {(j["job"], j["database"]): j for j in doc["jobs"]}
    refreshable = _rows(
        settings,
        "shard",
        f"SELECT count(*) FROM {settings.tables.token} WHERE refresh_token IS NOT NULL",
    )[0][0]
    assert by[("token-families", "shard")]["rows_changed"] == refreshable
    assert by[("token-families", "shard")]["estimated_seconds"] is not None
    text_out = invoke(capsys, "--config", cfg, "backfill", "--dry-run")
    assert "dry run: nothing written" in text_out.out
    assert schema_dump(settings) == schema
    assert data_checksum(settings) == data
    assert JOB_TABLE not in schema_dump(settings)["control"]


def test_backfill_before_upgrade_is_a_clear_error(
    make_database: DatabaseFactory, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _, cfg = _make(make_database, tmp_path)
    result = invoke(capsys, "--config", cfg, "backfill", "token-families")
    assert result.code == 2
    assert "lacks the columns of job 'token-families'; run `oauthmig upgrade` first" in result.err
    assert "Traceback" not in result.err
    unknown = invoke(capsys, "--config", cfg, "backfill", "nope")
    assert unknown.code == 2 and "unknown backfill job 'nope'" in unknown.err


def test_concurrent_backfill_skips_the_held_job(
    expanded: tuple[Settings, str], capsys: pytest.CaptureFixture[str]
) -> None:
    settings, cfg = expanded
    db = settings.databases["shard"]
    engine = make_engine(db, settings)
    with connect(engine, db) as conn, exclusive_run(conn, db, "backfill token-families"):
        result = invoke(capsys, "--config", cfg, "-d", "shard", "backfill", "token-families")
        assert result.code == 0, result.err
        assert "shard token-families: skipped: held by another runner (pid " in result.out
    engine.dispose()
    assert invoke(capsys, "--config", cfg, "-d", "shard", "backfill").code == 0


@pytest.mark.slow
def test_max_runtime_pauses_and_resumes(
    expanded: tuple[Settings, str], capsys: pytest.CaptureFixture[str]
) -> None:
    settings, cfg = expanded
    # The first batch starts well within the runtime however slow the machine; the pause after
    # it would last an hour, so the run can only stop at the deadline, which also ends the pause.
    began = time.monotonic()
    first = invoke(
        capsys,
        "--config",
        cfg,
        "-d",
        "control",
        "backfill",
        "token-families",
        "--batch",
        "10",
        "--sleep",
        "3600",
        "--max-runtime",
        "6",
        "--format",
        "json",
    )
    # Stopped by --max-runtime with rows left: exit 3, one line saying to run it again.
    assert first.code == 3, first.err
    assert (
        first.err.strip()
        .splitlines()[-1]
        .startswith("unfinished: --max-runtime stopped token-families on control with rows left")
    )
    assert time.monotonic() - began < 120
    job = json.loads(first.out)["jobs"][0]
    assert job["status"] == "paused" and 0 < job["rows_changed"] < job["rows_total"]
    assert "stopped by --max-runtime with about" in job["message"]
    state = _rows(settings, "control", f"SELECT status, rows_done FROM {JOB_TABLE}")[0]
    assert state[0] == "paused" and state[1] == job["rows_changed"]
    rest = invoke(
        capsys, "--config", cfg, "-d", "control", "backfill", "token-families", "--format", "json"
    )
    assert rest.code == 0, rest.err
    second = json.loads(rest.out)["jobs"][0]
    assert second["status"] == "finished"
    assert job["rows_changed"] + second["rows_changed"] == _assert_tokens_backfilled(
        settings, "control"
    )


def test_finalize_is_gated_then_applies(
    expanded: tuple[Settings, str], capsys: pytest.CaptureFixture[str]
) -> None:
    settings, cfg = expanded
    gated = invoke(capsys, "--config", cfg, "upgrade", "--to", "0004")
    assert gated.code == 2
    assert "revision 0004 requires backfill 'token-families' to finish" in gated.err
    assert "rows left" in gated.err and "database 'control'" in gated.err
    plain = invoke(capsys, "--config", cfg, "upgrade")
    assert plain.code == 0 and "waiting before 0004" in plain.out

    statements: list[str] = []

    def record(conn: Connection, cursor: DBAPICursor, statement: str, *args: object) -> None:
        statements.append(statement)

    assert invoke(capsys, "--config", cfg, "backfill").code == 0
    event.listen(Engine, "before_cursor_execute", record)
    try:
        done = invoke(capsys, "--config", cfg, "upgrade")
    finally:
        event.remove(Engine, "before_cursor_execute", record)
    assert done.code == 0, done.err
    check = invoke(capsys, "--config", cfg, "status", "--check")
    assert check.code == 0, check.out + check.err
    t = settings.tables
    for db in ("control", "shard"):
        engine = make_engine(settings.databases[db], settings)
        with engine.connect() as conn:
            names = {i["name"] for i in inspect(conn).get_indexes(t.token)}
            assert {f"{t.token}_token_family_id_idx", f"{t.token}_parent_token_id_idx"} <= names
            if conn.dialect.name == "postgresql":
                invalid = conn.execute(
                    text(
                        "SELECT count(*) FROM pg_index i JOIN pg_class c ON c.oid = i.indrelid "
                        "WHERE c.relname = :t AND NOT i.indisvalid"
                    ),
                    {"t": t.token},
                ).scalar_one()
                assert invalid == 0
        engine.dispose()
    if settings.databases["control"].dialect == "postgresql":
        assert any(s.startswith("CREATE INDEX CONCURRENTLY") for s in statements)
        validated = _rows(
            settings,
            "control",
            "SELECT conname, convalidated FROM pg_constraint "
            "WHERE conname LIKE 'sentry_api%_check'",
        )
        assert len(validated) == 4 and all(v for _, v in validated)
    nullable = {c["name"]: c["nullable"] for c in _columns(settings, "control", t.application)}
    assert not any(
        nullable[c]
        for c in ("token_endpoint_auth_method", "grant_types", "response_types", "application_type")
    )
    engine = make_engine(settings.databases["control"], settings)
    with pytest.raises(Exception, match=r"(?i)check"), engine.begin() as conn:
        conn.execute(
            text(
                f"UPDATE {t.grant} SET code_challenge = 'x', "
                "code_challenge_method = 'S512' WHERE id = (SELECT min(id) FROM "
                f"{t.grant})"
            )
        )
    engine.dispose()


def _columns(settings: Settings, db: str, physical: str) -> list[ReflectedColumn]:
    engine = make_engine(settings.databases[db], settings)
    try:
        with engine.connect() as conn:
            return list(inspect(conn).get_columns(physical))
    finally:
        engine.dispose()


def test_full_round_trip_through_finalize(
    expanded: tuple[Settings, str], capsys: pytest.CaptureFixture[str], forkserver: ForkServer
) -> None:
    settings, cfg = expanded
    assert invoke(capsys, "--config", cfg, "backfill").code == 0
    assert invoke(capsys, "--config", cfg, "upgrade").code == 0
    down = invoke(capsys, "--config", cfg, "downgrade", "--to", "0003")
    assert down.code == 0, down.err
    assert all(
        c["nullable"]
        for c in _columns(settings, "control", settings.tables.application)
        if c["name"] == "application_type"
    )
    assert invoke(capsys, "--config", cfg, "downgrade", "--to", "base").code == 0
    assert JOB_TABLE in schema_dump(settings)["shard"]  # progress records are kept
    assert invoke(capsys, "--config", cfg, "upgrade").code == 0
    assert invoke(capsys, "--config", cfg, "backfill").code == 0
    assert invoke(capsys, "--config", cfg, "upgrade").code == 0
    assert invoke(capsys, "--config", cfg, "status", "--check").code == 0


# ------------------------------------------------------------------ PostgreSQL fault tests

PG = pytest.mark.parametrize("backend", ["postgresql"], indirect=True)


def _job(settings: Settings, db: str = "control") -> dict[str, Any]:
    if JOB_TABLE not in schema_dump(settings)[db]:
        return {}
    rows = _rows(
        settings,
        db,
        f"SELECT status, cursor, rows_done, phase, upper_bound, attempts, "
        f"last_error FROM {JOB_TABLE} WHERE job = 'token-families'",
    )
    if not rows:
        return {}
    keys = ("status", "cursor", "rows_done", "phase", "upper_bound", "attempts", "last_error")
    return dict(zip(keys, rows[0], strict=True))


def _spawn(server: ForkServer, cfg: str, *args: str) -> ForkedProcess:
    """``oauthmig --config CFG ARGS`` as a real process (SIGINT -> KeyboardInterrupt)."""
    return server.spawn(["--config", cfg, *args], cwd=ROOT)


def _pid(conn: Connection) -> int:
    return int(conn.execute(text("SELECT pg_backend_pid()")).scalar_one())


def _blocked_by(settings: Settings, db: str, blocker: int) -> list[int]:
    """PostgreSQL backends waiting for a lock that session ``blocker`` holds."""
    return [
        int(pid)
        for (pid,) in _rows(
            settings,
            db,
            "SELECT pid FROM pg_stat_activity WHERE :b = ANY(pg_blocking_pids(pid))",
            b=blocker,
        )
    ]


def _wait_blocked_by(settings: Settings, db: str, blocker: int) -> int:
    """Wait until exactly one session waits on ``blocker``'s lock; return its pid."""
    found: list[int] = []

    def blocked() -> bool:
        found[:] = _blocked_by(settings, db, blocker)
        return bool(found)

    _wait_for(blocked)
    assert len(found) == 1, found
    return found[0]


def _wait_backend_gone(settings: Settings, db: str, pid: int) -> None:
    """A killed client's server session ends (and drops its advisory locks) once it notices."""
    _wait_for(
        lambda: not _rows(settings, db, "SELECT 1 FROM pg_stat_activity WHERE pid = :p", p=pid)
    )


def _wait_for(predicate: Callable[..., object], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.02)
    raise AssertionError("condition not reached")


def _family_snapshot(settings: Settings, db: str = "control") -> list[tuple[Any, ...]]:
    return [
        tuple(r)
        for r in _rows(
            settings,
            db,
            f"SELECT id, token_family_id, refresh_token FROM {settings.tables.token} ORDER BY id",
        )
    ]


@pytest.fixture
def pg_pair(
    make_database: DatabaseFactory, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> Iterator[tuple[Settings, str, Settings, str]]:
    """Two identical PostgreSQL installs (same seed), both expanded."""
    out = []
    for name in ("a", "b"):
        folder = tmp_path / name
        folder.mkdir()
        settings, cfg = _make(
            make_database,
            folder,
            apps=50,
            tokens=20000,
            seed=11,
            migrate={"lock_timeout": "30s", "lock_retries": 2},
        )
        assert invoke(capsys, "--config", cfg, "upgrade").code == 0
        out.append((settings, cfg))
    yield out[0][0], out[0][1], out[1][0], out[1][1]


@pytest.mark.slow
@PG
def test_sigkill_at_five_points_resumes_to_identical_state(
    pg_pair: tuple[Settings, str, Settings, str],
    capsys: pytest.CaptureFixture[str],
    forkserver: ForkServer,
) -> None:
    settings, cfg, ref_settings, ref_cfg = pg_pair
    assert (
        invoke(capsys, "--config", ref_cfg, "-d", "control", "backfill", "token-families").code == 0
    )
    args = (
        "-d",
        "control",
        "-q",
        "backfill",
        "token-families",
        "--batch",
        "100",
        "--sleep",
        "0.05",
    )
    token = settings.tables.token
    pending = [
        int(i)
        for (i,) in _rows(
            settings,
            "control",
            f"SELECT id FROM {token} WHERE refresh_token IS NOT NULL ORDER BY id",
        )
    ]
    engine = make_engine(settings.databases["control"], settings)
    # Each run is held at a known row: the test locks that row before the run starts, so the
    # run cannot get past it however fast it is. Kill points: before the first batch commits,
    # mid-batch (its UPDATE waits on the row lock, the transaction is open when the process
    # dies), and between batches after 5%, 40% and 70% of the rows (the batch holding the
    # locked row commits, then the run waits for the table before its next batch).
    for point in ("start", "early", "mid-batch", "middle", "late"):
        cursor = int(_job(settings).get("cursor") or 0)
        if point == "mid-batch":
            target = next(i for i in pending if i > cursor + 300)
        else:
            share = {"start": 0.0, "early": 0.05, "middle": 0.4, "late": 0.7}[point]
            target = pending[int(len(pending) * share)]
        assert target > cursor, (point, target, cursor)
        locker = engine.connect()
        locker.execute(text(f"SELECT id FROM {token} WHERE id = :i FOR UPDATE"), {"i": target})
        proc = _spawn(forkserver, cfg, *args)
        run_pid = _wait_blocked_by(settings, "control", _pid(locker))
        gate: Connection | None = None
        if point in ("early", "middle", "late"):
            gate = engine.connect()
            gate_pid = _pid(gate)
            # Queue an exclusive table lock behind the run's open batch, then let that batch
            # finish: the run commits it and waits for the table before reading its next one.
            taken = threading.Thread(
                target=gate.execute, args=(text(f"LOCK TABLE {token} IN ACCESS EXCLUSIVE MODE"),)
            )
            taken.start()
            _wait_for(lambda g=gate_pid, r=run_pid: _blocked_by(settings, "control", r) == [g])
            locker.rollback()
            taken.join(timeout=60)
            assert not taken.is_alive()
            _wait_for(lambda g=gate_pid, r=run_pid: _blocked_by(settings, "control", g) == [r])
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        for conn in (locker, gate):
            if conn is not None:
                conn.rollback()
                conn.close()
        _wait_backend_gone(settings, "control", run_pid)
        state = _job(settings)
        assert state["status"] == "running"  # as the killed process left it
        if gate is None:
            assert state["cursor"] < target, (point, state)  # the blocked batch did not commit
        else:
            assert state["cursor"] >= target, (point, state)  # it did, and nothing after it
        # Invariant: exactly the refreshable rows at or below the cursor carry a family.
        for row_id, fam, refresh in _family_snapshot(settings):
            expected = refresh is not None and row_id <= state["cursor"]
            assert (fam is not None) == expected, (point, row_id, state)
    final = invoke(
        capsys, "--config", cfg, "-d", "control", "backfill", "token-families", "--format", "json"
    )
    assert final.code == 0, final.err
    assert json.loads(final.out)["jobs"][0]["status"] == "finished"
    assert _family_snapshot(settings) == _family_snapshot(ref_settings)
    engine.dispose()


@PG
def test_concurrent_writer_no_row_missed_or_clobbered(
    make_database: DatabaseFactory, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    settings, cfg = _make(make_database, tmp_path, apps=50, tokens=6000, seed=3)
    assert invoke(capsys, "--config", cfg, "upgrade").code == 0
    token = settings.tables.token
    engine = make_engine(settings.databases["control"], settings)
    stop = threading.Event()
    updated: dict[int, str] = {}
    inserted: list[int] = []

    def writer() -> None:
        n = 0
        with engine.connect() as conn:
            while not stop.is_set():
                n += 1
                new_id = conn.execute(
                    text(
                        f"INSERT INTO {token} (user_id, application_id, token, refresh_token, "
                        "scope_list, date_added, scopes) SELECT 1, min(id), :t, :r, '{}', now(), 0 "
                        f"FROM {settings.tables.application} RETURNING id"
                    ),
                    {"t": f"w-tok-{n}", "r": f"w-ref-{n}"},
                ).scalar_one()
                inserted.append(int(new_id))
                # A legacy refresh rewrites an existing row in place.
                row = conn.execute(
                    text(
                        f"SELECT id FROM {token} WHERE refresh_token IS NOT NULL AND id < 5000 "
                        "ORDER BY random() LIMIT 1"
                    )
                ).scalar_one()
                conn.execute(
                    text(f"UPDATE {token} SET refresh_token = :r, token = :t WHERE id = :i"),
                    {"r": f"w-upd-{n}", "t": f"w-updt-{n}", "i": row},
                )
                conn.commit()
                updated[int(row)] = f"w-upd-{n}"
                time.sleep(0.005)

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        result = invoke(
            capsys,
            "--config",
            cfg,
            "-d",
            "control",
            "backfill",
            "token-families",
            "--batch",
            "200",
            "--sleep",
            "0.01",
            "--format",
            "json",
        )
    finally:
        stop.set()
        thread.join()
    assert result.code == 0, result.err
    assert json.loads(result.out)["jobs"][0]["status"] == "finished"
    state = _job(settings)
    assert inserted and max(inserted) > 0
    rows = {r[0]: r for r in _family_snapshot(settings)}
    for row_id, (_, fam, refresh) in rows.items():
        if refresh is not None and row_id <= state["upper_bound"]:
            assert _as_uuid(fam) == family_id(token, row_id, "control")
    for row_id, value in updated.items():
        assert rows[row_id][2] == value  # the writer's update survived the backfill
    covered = [i for i in inserted if i <= state["upper_bound"]]
    assert covered, "the catch-up pass covered rows inserted during the main pass"
    rerun = invoke(
        capsys, "--config", cfg, "-d", "control", "backfill", "token-families", "--format", "json"
    )
    assert rerun.code == 0
    assert (
        _rows(
            settings,
            "control",
            f"SELECT count(*) FROM {token} WHERE refresh_token IS NOT "
            "NULL AND token_family_id IS NULL",
        )[0][0]
        == 0
    )
    engine.dispose()


@PG
def test_transient_lock_timeout_is_retried(
    expanded: tuple[Settings, str], capsys: pytest.CaptureFixture[str]
) -> None:
    settings, cfg = expanded
    token = settings.tables.token
    engine = make_engine(settings.databases["shard"], settings)
    locker = engine.connect()
    first_id = _rows(
        settings, "shard", f"SELECT min(id) FROM {token} WHERE refresh_token IS NOT NULL"
    )[0][0]
    locker.execute(text(f"SELECT id FROM {token} WHERE id = :i FOR UPDATE"), {"i": first_id})

    def failed_attempts() -> int:
        found = _rows(
            settings,
            "shard",
            "SELECT count(*) FROM pg_tables WHERE tablename = 'oauthmig_backfill_batch'",
        )[0][0]
        if not found:
            return 0
        return int(
            _rows(
                settings,
                "shard",
                "SELECT count(*) FROM oauthmig_backfill_batch WHERE outcome = 'failed'",
            )[0][0]
        )

    def release() -> None:
        # Once a batch has hit lock_timeout (its failed attempt is recorded): no race on time.
        try:
            _wait_for(lambda: failed_attempts() >= 1, timeout=120)
        finally:
            locker.rollback()
            locker.close()

    releaser = threading.Thread(target=release)
    releaser.start()
    result = invoke(
        capsys, "--config", cfg, "-d", "shard", "backfill", "token-families", "--format", "json"
    )
    releaser.join()
    assert result.code == 0, result.err
    assert _job(settings, "shard")["attempts"] >= 1  # lock_timeout 500ms hit, then retried
    _assert_tokens_backfilled(settings, "shard")
    engine.dispose()


@PG
def test_persistent_failure_is_recorded_and_resumable(
    expanded: tuple[Settings, str], capsys: pytest.CaptureFixture[str]
) -> None:
    settings, cfg = expanded
    token = settings.tables.token
    engine = make_engine(settings.databases["shard"], settings)
    with engine.begin() as conn:
        conn.execute(
            text(
                "CREATE FUNCTION boom() RETURNS trigger AS $$ BEGIN "
                "IF NEW.id > 300 THEN RAISE EXCEPTION 'boom at %', NEW.id; END IF; "
                "RETURN NEW; END $$ LANGUAGE plpgsql"
            )
        )
        conn.execute(
            text(
                f"CREATE TRIGGER boom BEFORE UPDATE ON {token} FOR EACH ROW EXECUTE FUNCTION boom()"
            )
        )
    failed = invoke(
        capsys, "--config", cfg, "-d", "shard", "backfill", "token-families", "--batch", "50"
    )
    assert failed.code == 2
    # A RAISE message can interpolate the row: only the function and SQLSTATE are shown.
    assert "backfill token-families failed" in failed.err and "function boom" in failed.err
    assert "SQLSTATE P0001" in failed.err and "boom at" not in failed.err
    assert "Traceback" not in failed.err
    state = _job(settings, "shard")
    assert state["status"] == "failed" and "function boom" in state["last_error"]
    assert 0 < state["cursor"] <= 300
    status = invoke(capsys, "--config", cfg, "-d", "shard", "status")
    assert "failed" in status.out and "function boom" in status.out
    with engine.begin() as conn:
        conn.execute(text(f"DROP TRIGGER boom ON {token}"))
    resumed = invoke(capsys, "--config", cfg, "-d", "shard", "backfill", "token-families")
    assert resumed.code == 0, resumed.err
    _assert_tokens_backfilled(settings, "shard")
    engine.dispose()


@PG
def test_finalize_rebuilds_invalid_leftover_index(
    expanded: tuple[Settings, str], capsys: pytest.CaptureFixture[str]
) -> None:
    settings, cfg = expanded
    token = settings.tables.token
    assert invoke(capsys, "--config", cfg, "backfill").code == 0
    engine = make_engine(settings.databases["shard"], settings)
    name = f"{token}_token_family_id_idx"
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        # A unique build over duplicate values fails and leaves an INVALID index behind.
        with pytest.raises(Exception, match="could not create unique index"):
            conn.execute(text(f"CREATE UNIQUE INDEX CONCURRENTLY {name} ON {token} (user_id)"))
        assert (
            conn.execute(
                text(
                    "SELECT indisvalid FROM pg_index i JOIN pg_class c ON "
                    "c.oid = i.indexrelid WHERE c.relname = :n"
                ),
                {"n": name},
            ).scalar_one()
            is False
        )
    result = invoke(capsys, "--config", cfg, "-d", "shard", "upgrade")
    assert result.code == 0, result.err
    row = _rows(
        settings,
        "shard",
        "SELECT i.indisvalid, i.indisunique, pg_get_indexdef(i.indexrelid) "
        "FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid WHERE c.relname = :n",
        n=name,
    )[0]
    assert row[0] is True and row[1] is False and "(token_family_id)" in row[2]
    engine.dispose()


def test_jobs_registry_is_documented() -> None:
    assert set(JOBS) == {"token-families", "client-metadata"}
    gated = [r for r in revisions.history() if r.requires_backfills]
    assert [r.revision for r in gated] == ["0004"]
    assert set(gated[0].requires_backfills) == set(JOBS)
    readme = (ROOT / "README.md").read_text()
    for name, job in JOBS.items():
        assert f"`{name}`" in readme
        assert job.logical_table in LOGICAL_TABLES


def test_parallel_jobs_across_databases(
    expanded: tuple[Settings, str], capsys: pytest.CaptureFixture[str]
) -> None:
    settings, cfg = expanded
    result = invoke(capsys, "--config", cfg, "backfill", "--jobs", "3", "--format", "json")
    assert result.code == 0, result.err
    assert {j["status"] for j in json.loads(result.out)["jobs"]} == {"finished"}
    for db in ("control", "shard"):
        _assert_tokens_backfilled(settings, db)


def test_two_backfill_processes_the_second_skips_the_held_job(
    make_database: DatabaseFactory,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    forkserver: ForkServer,
) -> None:
    settings, cfg = _make(make_database, tmp_path, tokens=4000)
    assert invoke(capsys, "--config", cfg, "upgrade").code == 0
    # The first run commits its first batch, then sleeps an hour before the next: it is held
    # mid-job, holding its run lock, for as long as the test needs; Ctrl-C then ends it.
    args = ("-d", "shard", "backfill", "token-families", "--batch", "100", "--sleep", "3600")
    first = _spawn(forkserver, cfg, *args)
    _wait_for(lambda: int(_job(settings, "shard").get("rows_done") or 0) > 0)
    assert _job(settings, "shard")["status"] == "running"
    assert run_lock_held(settings, "shard", "backfill token-families")
    second = _spawn(forkserver, cfg, *args)
    second_out, err = second.communicate(timeout=120)
    assert first.poll() is None, "the first run should still be working"
    first.send_signal(signal.SIGINT)
    _, err_first = first.communicate(timeout=120)
    assert second.returncode == 0, err  # skipped: the first run holds the job
    assert "shard token-families: skipped: held by another runner (pid " in second_out
    assert first.returncode == 130, err_first
    assert "state is saved" in err_first and "Traceback" not in err_first
    paused = _job(settings, "shard")
    assert paused["status"] == "paused" and paused["rows_done"] > 0
    resumed = invoke(capsys, "--config", cfg, "-d", "shard", "backfill", "--format", "json")
    assert resumed.code == 0, resumed.err
    assert json.loads(resumed.out)["jobs"][0]["rows_changed"] == (
        _assert_tokens_backfilled(settings, "shard") - paused["rows_done"]
    )
    _assert_tokens_backfilled(settings, "shard")


@PG
def test_lost_connection_is_retried(
    make_database: DatabaseFactory,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    forkserver: ForkServer,
) -> None:
    settings, cfg = _make(
        make_database, tmp_path, tokens=4000, migrate={"lock_timeout": "60s", "lock_retries": 2}
    )
    assert invoke(capsys, "--config", cfg, "upgrade").code == 0
    token = settings.tables.token
    engine = make_engine(settings.databases["shard"], settings)
    # The run is held mid-job (inside a batch, on a row the test locks) when its session dies.
    locker = engine.connect()
    held = _rows(
        settings,
        "shard",
        f"SELECT min(id) FROM {token} WHERE refresh_token IS NOT NULL AND id > 400",
    )[0][0]
    locker.execute(text(f"SELECT id FROM {token} WHERE id = :i FOR UPDATE"), {"i": held})
    proc = _spawn(
        forkserver,
        cfg,
        "-d",
        "shard",
        "backfill",
        "token-families",
        "--batch",
        "20",
        "--sleep",
        "0.05",
    )
    _wait_blocked_by(settings, "shard", _pid(locker))
    assert int(_job(settings, "shard")["rows_done"]) > 0
    url = settings.databases["shard"].url
    assert url is not None
    dbname = url.rsplit("/", 1)[-1]
    # Kill the work connection (it also holds the run's advisory lock: the run takes it again).
    killed = _rows(
        settings,
        "shard",
        "SELECT pg_terminate_backend(a.pid) FROM pg_stat_activity a WHERE "
        "a.datname = :d AND a.application_name = 'oauthmig' AND a.pid IN "
        "(SELECT pid FROM pg_locks WHERE locktype = 'advisory') AND a.pid <> pg_backend_pid()",
        d=dbname,
    )
    assert killed and all(ok for (ok,) in killed)
    locker.rollback()
    locker.close()
    engine.dispose()
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    assert _job(settings, "shard")["attempts"] >= 1
    _assert_tokens_backfilled(settings, "shard")
