"""The whole rollout through a real PgBouncer (transaction and session pooling) in front of the
test server: every command works, and after each one nothing oauthmig set or locked is left on
the pooler's server sessions (fresh pooled clients see the server's default timeouts, and no
prepared statement; ``pg_locks`` holds no advisory lock).

Transaction pooling: ``url`` goes through the pooler, ``direct_url`` reaches the server; without
``direct_url`` the commands that need a session refuse before writing anything, and the others
work through the pooler. Session pooling: ``url`` alone, through the pooler.
"""

from __future__ import annotations

import json
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.pool import NullPool

from oauthmig.config import Settings, settings_from_mapping
from oauthmig.demo.data import setup_legacy
from oauthmig.rollout.health import probe_engine
from oauthmig.rollout.job_state import JOB_TABLE
from oauthmig.rollout.pacing import PROBE_TIMEOUT_MS, LookupProbe
from tests.forkserver import ForkServer
from tests.helpers import invoke, schema_dump, write_config
from tests.helpers.databases import PG_ADMIN_URL, PgPool, routed_config
from tests.pgbouncer import POOL_SIZE, Bouncer, pgbouncer

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("pgbouncer")]  # one module fixture

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module", params=["transaction", "session"])
def bouncer(request: pytest.FixtureRequest) -> Iterator[Bouncer]:
    """PgBouncer in front of the test server, started once per pool mode (fails if it
    cannot start)."""
    try:
        running = pgbouncer(request.param, PG_ADMIN_URL)
        b = running.__enter__()
    except RuntimeError as exc:
        pytest.fail(f"PgBouncer is required and did not start: {exc}", pytrace=False)
    try:
        yield b
    finally:
        running.__exit__(None, None, None)


@pytest.fixture
def databases(pg_pool: PgPool) -> Iterator[dict[str, str]]:
    """Two empty test databases (``control``, ``shard``): their direct URLs."""
    names = {"control": pg_pool.acquire(), "shard": pg_pool.acquire()}
    try:
        yield {
            key: make_url(PG_ADMIN_URL).set(database=name).render_as_string(hide_password=False)
            for key, name in names.items()
        }
    finally:
        for name in names.values():
            pg_pool.release(name)


def _server_defaults() -> tuple[str, str]:
    with psycopg.connect(make_url(PG_ADMIN_URL).render_as_string().replace("+psycopg", "")) as c:
        row = c.execute(
            "SELECT current_setting('lock_timeout'), current_setting('statement_timeout')"
        )
        found = row.fetchone()
    assert found is not None
    return str(found[0]), str(found[1])


def _libpq(url: str) -> str:
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


def _wait_for(predicate: Callable[[], bool], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError("condition not reached")


def _advisory_locks(direct: dict[str, str]) -> list[tuple[Any, ...]]:
    names = [make_url(u).database for u in direct.values()]
    engine = create_engine(PG_ADMIN_URL, poolclass=NullPool)
    try:
        with engine.connect() as conn:
            return list(
                conn.execute(
                    text(
                        "SELECT d.datname, l.objid, l.pid FROM pg_locks l "
                        "JOIN pg_database d ON d.oid = l.database "
                        "WHERE l.locktype = 'advisory' AND d.datname = ANY(:n)"
                    ),
                    {"n": names},
                ).all()
            )
    finally:
        engine.dispose()


def assert_nothing_left(bouncer: Bouncer, direct: dict[str, str]) -> None:
    """Six fresh pooled clients per database see the server's default timeouts and no
    prepared statement, and no advisory lock is held on the test databases."""
    # A killed client's server session is reset by the pooler as it notices: wait for it.
    _wait_for(lambda: not _advisory_locks(direct))
    defaults = _server_defaults()
    for url in direct.values():
        pooled = _libpq(bouncer.url(url))
        # In pairs, each holding a transaction open while the other reads: with a pool of
        # POOL_SIZE server sessions, every pair covers every session of the pool.
        for _ in range(6 // POOL_SIZE):
            clients = [psycopg.connect(pooled, prepare_threshold=None) for _ in range(POOL_SIZE)]
            try:
                for client in clients:
                    row = client.execute(
                        "SELECT current_setting('lock_timeout'), "
                        "current_setting('statement_timeout'), "
                        "(SELECT count(*) FROM pg_prepared_statements)"
                    ).fetchone()
                    assert row is not None
                    assert (row[0], row[1]) == defaults, (bouncer.mode, row)
                    assert row[2] == 0, (bouncer.mode, row)
            finally:
                for client in clients:
                    client.close()
    assert not _advisory_locks(direct)


def _settings(
    bouncer: Bouncer, direct: dict[str, str], tmp_path: Path, *, with_direct: bool
) -> tuple[Settings, str]:
    """(settings on the direct URLs, to look with, and the path of the config oauthmig runs
    with: ``url`` through the pooler, ``direct_url`` when ``with_direct``)."""
    data = routed_config(bouncer.url(direct["control"]), bouncer.url(direct["shard"]))
    if with_direct:
        dbs: dict[str, dict[str, str]] = data["databases"]  # type: ignore[assignment]
        for name, url in direct.items():
            dbs[name]["direct_url"] = url
    cfg = write_config(tmp_path / "oauthmig.toml", data)
    settings_from_mapping(data, {}, "test")  # valid as written
    observed = routed_config(direct["control"], direct["shard"])
    return settings_from_mapping(observed, {}, "test"), cfg


def _rows_done(observe: Settings) -> int:
    if JOB_TABLE not in schema_dump(observe)["shard"]:
        return 0
    engine = create_engine(observe.databases["shard"].url or "", poolclass=NullPool)
    try:
        with engine.connect() as conn:
            value = conn.execute(
                text(f"SELECT rows_done FROM {JOB_TABLE} WHERE job = 'token-families'")
            ).scalar()
    finally:
        engine.dispose()
    return int(value or 0)


def _heads(capsys: pytest.CaptureFixture[str], cfg: str) -> dict[str, Any]:
    result = invoke(capsys, "--config", cfg, "status", "--format", "json")
    assert result.code in (0, 1), result.err
    doc = json.loads(result.out)
    return {d["database"]: d["current"] for d in doc["databases"]}


def test_whole_rollout_through_the_pooler(
    bouncer: Bouncer,
    databases: dict[str, str],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    forkserver: ForkServer,
) -> None:
    # Transaction pooling needs direct_url for session work; a session pooler is a session.
    observe, cfg = _settings(
        bouncer, databases, tmp_path, with_direct=bouncer.mode == "transaction"
    )
    setup_legacy(observe, apps=40, tokens=600, seed=3)
    assert_nothing_left(bouncer, databases)

    def ok(*args: str, codes: tuple[int, ...] = (0,)) -> str:
        result = invoke(capsys, "--config", cfg, *args)
        assert result.code in codes, (args, result.code, result.err)
        assert "Traceback" not in result.err
        assert_nothing_left(bouncer, databases)
        return result.out

    ok("upgrade")  # expand: stops before the finalize, which waits for the backfills

    # A backfill killed with -9 between two batches, then run again to the end.
    proc = forkserver.spawn(
        [
            "--config",
            cfg,
            "-d",
            "shard",
            "backfill",
            "token-families",
            "--batch",
            "20",
            "--sleep",
            "3600",
        ],
        cwd=ROOT,
    )
    try:
        _wait_for(lambda: _rows_done(observe) > 0, timeout=120)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    assert_nothing_left(bouncer, databases)
    ok("backfill")

    ok("upgrade")  # finalize (CREATE INDEX CONCURRENTLY, VALIDATE), then 0005 to 0007
    heads = _heads(capsys, cfg)
    assert set(heads.values()) == {"0007"}, heads
    assert_nothing_left(bouncer, databases)

    ok("downgrade", "--to", "0005")
    assert set(_heads(capsys, cfg).values()) == {"0005"}
    ok("stamp", "0005")
    ok("upgrade")
    ok("history")
    ok("prune-grants")
    ok("report", "--html", str(tmp_path / "report.html"))
    assert (tmp_path / "report.html").stat().st_size > 0
    ok("audit-redirects", codes=(0, 1))


def test_transaction_pooler_without_direct_url_refuses_session_work(
    bouncer: Bouncer,
    databases: dict[str, str],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    observe, cfg = _settings(bouncer, databases, tmp_path, with_direct=False)
    setup_legacy(observe, apps=20, tokens=100, seed=5)
    before = schema_dump(observe)

    def run(*args: str) -> tuple[int, str, str]:
        result = invoke(capsys, "--config", cfg, *args)
        assert "Traceback" not in result.err
        assert_nothing_left(bouncer, databases)
        return result.code, result.out, result.err

    if bouncer.mode == "session":
        # A session pooler keeps each client on one server session: session work is safe.
        assert run("upgrade")[0] == 0
        assert run("backfill")[0] == 0
        return
    for args in (("upgrade",), ("downgrade", "--to", "base"), ("stamp", "0001"), ("backfill",)):
        code, _out, err = run(*args)
        assert code == 2, (args, err)
        line = err.strip().splitlines()[-1]
        assert "goes through a transaction pooler" in line and "direct_url" in line, err
        assert "'control'" in line or "'shard'" in line, err
        assert schema_dump(observe) == before, args  # nothing written
    # Read-only commands and one-transaction-per-batch commands work through the pooler.
    assert run("status")[0] in (0, 1)
    assert run("history")[0] == 0
    assert run("prune-grants")[0] == 0
    assert run("report", "--html", str(tmp_path / "r.html"))[0] == 0
    assert run("audit-redirects")[0] in (0, 1)
    assert schema_dump(observe) == before

    # A direct_url that goes through the pooler too is refused, its password never shown.
    secret = "Pw-pooled-7731"
    data = routed_config(bouncer.url(databases["control"]), bouncer.url(databases["shard"]))
    dbs: dict[str, dict[str, str]] = data["databases"]  # type: ignore[assignment]
    for name, url in databases.items():
        dbs[name]["direct_url"] = (
            make_url(bouncer.url(url)).set(password=secret).render_as_string(hide_password=False)
        )
    cfg = write_config(tmp_path / "pooled-direct.toml", data)
    code, out, err = run("upgrade")
    assert code == 2
    assert "direct_url (postgresql+psycopg://postgres:***@127.0.0.1:" in err, err
    assert "goes through a transaction pooler" in err and secret not in out + err
    assert schema_dump(observe) == before


def test_latency_pacing_probe_through_the_pooler_leaves_nothing(
    bouncer: Bouncer, databases: dict[str, str]
) -> None:
    """The pacer's samples go through ``url`` (the pooler): each one's timeouts and read-only
    mode end with it, and it sees the application (another pooled client in a statement)."""
    direct = create_engine(databases["shard"], poolclass=NullPool)
    with direct.begin() as conn:
        conn.execute(text("CREATE TABLE probed (id bigserial PRIMARY KEY, v text)"))
        conn.execute(text("INSERT INTO probed (v) SELECT 'x' FROM generate_series(1, 100)"))
    direct.dispose()
    pooled = bouncer.url(databases["shard"])
    probe = LookupProbe(probe_engine(pooled, PROBE_TIMEOUT_MS), "probed")
    app = psycopg.connect(
        _libpq(pooled), prepare_threshold=None, autocommit=True, application_name="provider"
    )
    running = threading.Thread(target=lambda: app.execute("SELECT pg_sleep(2)"))
    try:
        samples = [probe.sample() for _ in range(20)]
        assert all(s.latency > 0 for s in samples)
        running.start()
        _wait_for(lambda: probe.sample().foreground is not None)  # its statement in flight
    finally:
        running.join()
        app.close()
        probe.close()
        probe.engine.dispose()
    assert_nothing_left(bouncer, databases)
