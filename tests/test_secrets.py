"""Secrets never leave: planted passwords, client secrets and tokens, every command, every failure.

Credentials in URIs too (issue 22): stored redirect URIs with userinfo, secret query and fragment
parameters and a percent-encoded nested URI, a live grant's URI with a ``code``, a metadata URL
with userinfo and an ``api_key``; a database password with unencoded ``@ : % # /`` (unreachable
configuration) and a replica URL with such a password, whose hold reason is stored in the job
row and exported in the metrics file.

A PostgreSQL URL carries a password in its userinfo and in its query string (``password``,
``sslpassword``, ``passfile``); the data carries a client secret, access, hashed and refresh
tokens and a grant code. Every command runs as a real process with ``-v`` (a child of
:mod:`tests.forkserver`: its own file descriptors, environment and exit), in success and in
each failure we can provoke (constraint violation, trigger raising the row, lost connection,
lock timeout, unreachable database, failing revision). Every byte of stdout, stderr, the report
files and the oauthmig tables is searched for the planted values and for every 8-character
slice of them.
"""

from __future__ import annotations

import os
import random
import sqlite3
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, inspect, text
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.exc import DBAPIError

from oauthmig.config import Settings, settings_from_mapping
from tests.forkserver import ForkServer
from tests.helpers import CliResult, seed_legacy, write_config
from tests.helpers.databases import DatabaseFactory, create_legacy, routed_config
from tests.pgcluster import free_port

# Consonants that are not hex digits: no 8-character slice of a planted value can occur by
# chance in a hash, a UUID or an English word of the output.
_ALPHABET = "ghjkmnpqrstvwxz"
SLICE = 8


def _planted(prefix: str) -> str:
    rng = random.Random()
    return prefix + "".join(rng.choice(_ALPHABET) for _ in range(24))


def _raw_password(prefix: str, separators: str = ":%#/@") -> str:
    """A password with unencoded '@', ':', '%', '#' and '/' between planted pieces, each long
    enough to be searched for on its own."""
    pieces = [_planted(prefix)[:12] for _ in range(len(separators) + 1)]
    return "".join(p + sep for p, sep in zip(pieces, [*separators, ""], strict=True))


@dataclass
class Planted:
    """The secrets of one test and everything the tool produced while they were in play."""

    values: dict[str, str]
    transcript: list[tuple[str, str]] = field(default_factory=list)

    def needles(self) -> dict[str, str]:
        out: dict[str, str] = {}
        for label, value in self.values.items():
            out[value] = label
            for i in range(len(value) - SLICE + 1):
                out.setdefault(value[i : i + SLICE], f"{label}[{i}:{i + SLICE}]")
        return out

    def record(self, where: str, content: str) -> None:
        self.transcript.append((where, content))

    def leaks(self) -> list[str]:
        needles = self.needles()
        hits = []
        for where, content in self.transcript:
            for needle, label in needles.items():
                if needle in content:
                    hits.append(f"{label} in {where}: ...{_around(content, needle)}...")
                    break
        return hits


def _around(content: str, needle: str) -> str:
    i = content.index(needle)
    return content[max(0, i - 80) : i + len(needle) + 40].replace("\n", "\\n")


@dataclass
class World:
    """Two routed databases with planted secrets, a config file, and the CLI runner."""

    backend: str
    settings: Settings
    cfg: str
    tmp: Path
    planted: Planted
    admin_urls: dict[str, str]
    server: ForkServer

    def cli(self, *args: str, cfg: str | None = None) -> CliResult:
        code, out, err = self.server.run(
            ["--config", cfg or self.cfg, "-v", *args],
            cwd=self.tmp,
            env={**os.environ, "COLUMNS": "200"},
        )
        label = " ".join(args)
        self.planted.record(f"stdout of `{label}`", out)
        self.planted.record(f"stderr of `{label}`", err)
        return CliResult(code, out, err)

    def engine(self, db: str = "control") -> Engine:
        return create_engine(self.admin_urls[db])

    def sql(self, db: str, *statements: str, **params: Any) -> None:
        engine = self.engine(db)
        try:
            with engine.begin() as conn:
                for s in statements:
                    conn.execute(text(s), params)
        finally:
            engine.dispose()

    def record_tables(self) -> None:
        """Every row of every oauthmig table (job table, revision log, version table)."""
        for db in self.settings.database_names():
            engine = self.engine(db)
            try:
                with engine.connect() as conn:
                    for t in inspect(conn).get_table_names():
                        if t.startswith("oauthmig"):
                            rows = conn.execute(text(f"SELECT * FROM {t}")).all()
                            self.planted.record(f"table {db}.{t}", repr(rows))
            finally:
                engine.dispose()

    def record_file(self, path: Path) -> None:
        self.planted.record(f"file {path.name}", path.read_text(encoding="utf-8"))

    def assert_no_leak(self) -> None:
        self.record_tables()
        assert len(self.planted.transcript) > 20
        leaks = self.planted.leaks()
        assert not leaks, "\n".join(leaks)


def _secret_url(url: str, planted: dict[str, str]) -> str:
    """The test database's URL with passwords planted in the userinfo and the query string
    (the server trusts local connections, so libpq sends none of them)."""
    return (
        make_url(url)
        .set(
            password=planted["userinfo password"],
            query={
                "password": planted["query password"],
                "sslpassword": planted["sslpassword"],
                "passfile": f"/nonexistent/{planted['passfile']}",
                "application_name": "oauthmig",
            },
        )
        .render_as_string(hide_password=False)
    )


@pytest.fixture
def world(
    backend: str, make_database: DatabaseFactory, tmp_path: Path, forkserver: ForkServer
) -> Iterator[World]:
    values = {
        "userinfo password": _planted("Pu"),
        "query password": _planted("Pq"),
        "sslpassword": _planted("Ps"),
        "passfile": _planted("Pf"),
        "client secret": _planted("Cs"),
        "access token": _planted("At"),
        "hashed token": _planted("Ht"),
        "refresh token": _planted("Rt"),
        "shard access token": _planted("Sa"),
        "shard refresh token": _planted("Sr"),
        "grant code": _planted("Gc"),
        "redirect userinfo password": _planted("Ru"),
        "redirect query secret": _planted("Rq"),
        "redirect fragment token": _planted("Rf"),
        "redirect nested password": _planted("Rn"),
        "grant uri code": _planted("Gu"),
        "metadata userinfo": _planted("Mu"),
        "metadata api key": _planted("Mk"),
        "raw database password": _raw_password("Db"),
        # SQLAlchemy refuses this one (it reads ':...' after the first '@' as the port).
        "unparseable database password": _raw_password("Du", "@:%#/"),
        "raw replica password": _raw_password("Rp"),
    }
    plain = {"control": make_database("control"), "shard": make_database("shard")}
    urls = dict(plain)
    if backend == "postgresql":
        urls = {name: _secret_url(u, values) for name, u in plain.items()}
    data = routed_config(
        urls["control"],
        urls["shard"],
        migrate={
            "lock_timeout": "300ms",
            "lock_retries": 1,
            "statement_timeout": "30s",
            "index_timeout": "1s",
        },
    )
    settings = settings_from_mapping(data, {}, "test")
    create_legacy(settings)
    seed_legacy(settings, rows=12)
    cfg = write_config(tmp_path / "oauthmig.toml", data)
    w = World(backend, settings, cfg, tmp_path, Planted(values), plain, forkserver)
    w.sql(
        "control",
        "UPDATE sentry_apiapplication SET client_secret = :cs WHERE id = 7",
        "UPDATE sentry_apitoken SET token = :at, hashed_token = :ht, refresh_token = :rt "
        "WHERE id = 3",
        "UPDATE sentry_apigrant SET code = :gc WHERE id = 5",
        cs=values["client secret"],
        at=values["access token"],
        ht=values["hashed token"],
        rt=values["refresh token"],
        gc=values["grant code"],
    )
    # Credentials in stored URIs: the audit, the HTML report and every format show them masked.
    redirect_uris = "\n".join(
        [
            f"https://deploy:{values['redirect userinfo password']}@app.example.com/cb",
            f"https://app.example.com/cb?client_secret={values['redirect query secret']}&x=1",
            f"https://app.example.com/cb#access_token={values['redirect fragment token']}",
            "https://app.example.com/cb?next=https%3A%2F%2Fu%3A"
            f"{values['redirect nested password']}%40evil.example%2F",
        ]
    )
    w.sql(
        "control",
        "UPDATE sentry_apiapplication SET redirect_uris = :ru, homepage_url = :hu WHERE id = 7",
        "UPDATE sentry_apigrant SET redirect_uri = :gu WHERE id = 5",
        ru=redirect_uris,
        hu=f"https://u:{values['metadata userinfo']}@home.example.com/"
        f"?api_key={values['metadata api key']}",
        gu=f"https://app.example.com/old?code={values['grant uri code']}",
    )
    w.sql(
        "shard",
        "UPDATE sentry_apitoken SET token = :at, refresh_token = :rt WHERE id = 3",
        at=values["shard access token"],
        rt=values["shard refresh token"],
    )
    yield w


def _unreachable_config(w: World) -> str:
    """The same config with the control database unreachable (secrets still in its URL)."""
    if w.backend == "postgresql":
        url = make_url(w.settings.databases["control"].url or "").set(port=1)
        control = url.render_as_string(hide_password=False)
    else:
        control = f"sqlite:///{w.tmp / 'missing' / 'control.sqlite3'}"
    data = routed_config(control, w.settings.databases["shard"].url or "")
    return write_config(w.tmp / "unreachable.toml", data)


def _raw_password_config(w: World, which: str = "raw database password") -> str:
    """The control database behind a URL whose password holds unencoded '@ : % # /' (SQLAlchemy
    reads part of it as the host name, so the database is unreachable)."""
    raw = w.planted.values[which]
    control = f"postgresql+psycopg://postgres:{raw}@127.0.0.1:{free_port()}/postgres"
    data = routed_config(control, w.settings.databases["shard"].url or "")
    return write_config(w.tmp / f"{which.replace(' ', '-')}.toml", data)


def _replica_config(w: World) -> str:
    """The world's config with a replica to check whose URL holds a raw password."""
    raw = w.planted.values["raw replica password"]
    replica = f"postgresql://oauth:{raw}@127.0.0.1:{free_port()}/postgres"
    data = routed_config(
        w.settings.databases["control"].url or "", w.settings.databases["shard"].url or ""
    )
    data["backfill"] = {
        "health": {"max_replica_lag": "1s", "replica_urls": [replica], "health_interval": "100ms"}
    }
    return write_config(w.tmp / "replica.toml", data)


def _run_reads(w: World, tag: str) -> None:
    """The read-only commands, whose output repeats stored state."""
    w.cli("status")
    w.cli("status", "--format", "json")
    w.cli("status", "--check")
    w.cli("history")
    w.cli("history", "--format", "json")
    w.cli("upgrade", "--dry-run")
    w.cli("upgrade", "--dry-run", "--format", "json")
    w.cli("upgrade", "--sql")
    w.cli("backfill", "--dry-run")
    w.cli("check-redirect", "https://a1.example.com/cb", "http://localhost:8080/cb")
    w.cli("check-redirect", "--format", "json", "https://a1.example.com/cb")
    planted_uris = [u for u in _stored_redirect_uris(w) if u]
    w.cli("check-redirect", *planted_uris)
    w.cli("check-redirect", "--format", "json", *planted_uris)
    for fmt in ("text", "json", "csv", "sarif"):
        report = w.tmp / f"report-{tag}.{fmt}"
        result = w.cli(
            "audit-redirects", "--format", fmt, "--output", str(report), "--fail-on", "never"
        )
        assert result.code == 0, result.err
        w.record_file(report)
        w.cli("audit-redirects", "--format", fmt, "--fail-on", "never")
    html = w.tmp / f"report-{tag}.html"
    assert w.cli("report", "--html", str(html)).code == 0
    w.record_file(html)


def _stored_redirect_uris(w: World) -> list[str]:
    engine = w.engine("control")
    try:
        with engine.connect() as conn:
            stored = conn.execute(
                text("SELECT redirect_uris FROM sentry_apiapplication WHERE id = 7")
            ).scalar_one()
    finally:
        engine.dispose()
    return str(stored).split("\n")


def _run_state_reads(w: World) -> None:
    """The commands that repeat stored errors and state."""
    w.cli("status")
    w.cli("status", "--format", "json")
    w.cli("upgrade", "--dry-run", "--format", "json")
    w.cli("backfill", "--dry-run", "--format", "json")
    html = w.tmp / f"report-state-{len(w.planted.transcript)}.html"
    w.cli("report", "--html", str(html))
    if html.exists():
        w.record_file(html)


def _assert_failed(result: CliResult, *expected: str) -> None:
    assert result.code == 2, result.out + result.err
    both = result.out + result.err
    for e in expected:
        assert e in both, both


def _hold_lock(
    w: World, physical: str, secret_query: str, mode: str = "ACCESS EXCLUSIVE"
) -> tuple[threading.Event, threading.Thread]:
    """Hold a write lock on a table from another connection whose last query text holds a
    secret (PostgreSQL shows it in pg_stat_activity); release it when the event is set."""
    release = threading.Event()
    ready = threading.Event()
    if w.backend == "postgresql":
        engine = w.engine("control")

        def hold() -> None:
            with engine.connect() as conn:
                conn.execute(text(f"LOCK TABLE {physical} IN {mode} MODE"))
                conn.execute(text(f"SELECT '{secret_query}'"))
                ready.set()
                release.wait(60)
                conn.rollback()
            engine.dispose()
    else:
        path = make_url(w.admin_urls["control"]).database or ""

        def hold() -> None:
            conn = sqlite3.connect(path, isolation_level=None)
            conn.execute("BEGIN IMMEDIATE")
            conn.execute(
                f"UPDATE {physical} SET id = id WHERE id = -1 AND 'x' <> ?", (secret_query,)
            )
            ready.set()
            release.wait(60)
            conn.execute("ROLLBACK")
            conn.close()

    thread = threading.Thread(target=hold, daemon=True)
    thread.start()
    assert ready.wait(30)
    return release, thread


@pytest.mark.slow
def test_no_secret_in_any_output_or_table(world: World) -> None:
    w = world
    v = w.planted.values
    pg = w.backend == "postgresql"

    # --- before anything is applied; then expand
    _run_reads(w, "fresh")
    result = w.cli("upgrade")
    assert result.code == 0, result.err
    w.cli("upgrade", "--format", "json")

    # --- the audit says what is wrong with the planted URIs, without their secrets
    audit = w.cli("audit-redirects", "--format", "json", "--fail-on", "never")
    for code in ("RU003", "RU005", "RU019", "RU103", "RU107"):
        assert f'"{code}"' in audit.out, code
    assert "https://***@app.example.com/cb" in audit.out

    # --- a replica whose URL holds a raw password: the backfill holds on it until
    # --max-runtime; the reason goes to the output and the job row
    if pg:
        prom = w.tmp / "backfill.prom"
        held = w.cli(
            "-d", "control", "backfill", "token-families", "--max-runtime", "2",
            "--metrics-file", str(prom), cfg=_replica_config(w),
        )  # fmt: skip
        assert "postgresql+psycopg://oauth:***@127.0.0.1" in held.err, held.err
        w.record_file(prom)
        assert "reason=" not in prom.read_text()  # the reason is no label (one series per check)
        w.record_tables()
        w.cli("status", cfg=_replica_config(w))
        w.cli("status", "--format", "json", cfg=_replica_config(w))

    # --- constraint violation during the backfill (the row image would carry the tokens)
    if pg:
        w.sql(
            "control",
            "ALTER TABLE sentry_apitoken ADD CONSTRAINT no_family "
            "CHECK (token_family_id IS NULL) NOT VALID",
            "ALTER TABLE sentry_apiapplication ADD CONSTRAINT no_meta "
            "CHECK (token_endpoint_auth_method IS NULL) NOT VALID",
        )
        # the trap is real: the driver's own text carries the token row
        with pytest.raises(DBAPIError) as raw:
            w.sql(
                "control",
                "UPDATE sentry_apitoken SET token_family_id = gen_random_uuid() WHERE id = 3",
            )
        assert v["access token"] in str(raw.value)
        _assert_failed(w.cli("-d", "control", "backfill"), "no_family", "23514")
        _assert_failed(w.cli("-d", "control", "backfill", "--format", "json"), "no_meta")
        status = w.cli("status")
        assert "no_family" in status.out  # the stored error is still useful
        _run_state_reads(w)
        w.sql(
            "control",
            "ALTER TABLE sentry_apitoken DROP CONSTRAINT no_family",
            "ALTER TABLE sentry_apiapplication DROP CONSTRAINT no_meta",
        )

    # --- a trigger raising with the row (PostgreSQL: RAISE interpolating NEW; SQLite: RAISE)
    if pg:
        w.sql(
            "control",
            "CREATE FUNCTION leak_row() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
            "RAISE EXCEPTION 'refusing row % with token %', NEW, NEW.token "
            "USING DETAIL = NEW.refresh_token, HINT = NEW.hashed_token; END $$",
            "CREATE FUNCTION leak_secret() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
            "RAISE EXCEPTION USING ERRCODE = '23514', MESSAGE = 'violates check constraint \"' "
            "|| NEW.client_secret || '\"', DETAIL = NEW.client_secret; END $$",
            "CREATE TRIGGER leak_row BEFORE UPDATE ON sentry_apitoken FOR EACH ROW "
            "EXECUTE FUNCTION leak_row()",
            "CREATE TRIGGER leak_secret BEFORE UPDATE ON sentry_apiapplication FOR EACH ROW "
            "EXECUTE FUNCTION leak_secret()",
        )
        with pytest.raises(DBAPIError) as raw:
            w.sql("control", "UPDATE sentry_apiapplication SET name = name WHERE id = 7")
        assert v["client secret"] in str(raw.value)
        _assert_failed(w.cli("-d", "control", "backfill"), "leak_row", "leak_secret")
        w.cli("-d", "control", "backfill", "--format", "json")
        _run_state_reads(w)
        w.sql(
            "control",
            "DROP TRIGGER leak_row ON sentry_apitoken",
            "DROP TRIGGER leak_secret ON sentry_apiapplication",
        )
    else:
        w.sql(
            "control",
            "CREATE TRIGGER leak_row BEFORE UPDATE ON sentry_apitoken "
            "BEGIN SELECT RAISE(ABORT, 'refusing this row'); END",
        )
        _assert_failed(w.cli("-d", "control", "backfill"), "SQLITE_CONSTRAINT_TRIGGER")
        w.cli("-d", "control", "backfill", "--format", "json")
        _run_state_reads(w)
        w.sql("control", "DROP TRIGGER leak_row")

    # --- lost connection mid-backfill (PostgreSQL): the work connection is killed once
    if pg:
        # Kill the work connection (not the one holding the run's advisory lock) once.
        proc = w.server.spawn(
            [
                *("--config", w.cfg, "-v", "-d", "shard", "backfill", "token-families"),
                *("--batch", "2", "--sleep", "0.3"),
            ],
            cwd=w.tmp,
        )
        dbname = make_url(w.admin_urls["shard"]).database
        killed: Sequence[object] = []
        engine = w.engine("shard")
        try:
            for _ in range(400):
                with engine.connect() as conn:
                    done = (
                        inspect(conn).has_table("oauthmig_backfill_job")
                        and conn.execute(
                            text(
                                "SELECT rows_done FROM oauthmig_backfill_job "
                                "WHERE job = 'token-families' AND status = 'running'"
                            )
                        ).scalar()
                    )
                if not done:
                    threading.Event().wait(0.05)
                    continue
                with engine.connect() as conn:
                    killed = conn.execute(
                        text(
                            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE "
                            "datname = :d AND application_name = 'oauthmig' AND pid IN "
                            "(SELECT pid FROM pg_locks WHERE locktype = 'advisory') "
                            "AND pid <> pg_backend_pid()"
                        ),
                        {"d": dbname},
                    ).all()
                if killed:
                    break
                threading.Event().wait(0.05)
        finally:
            engine.dispose()
        out, err = proc.communicate(timeout=300)
        w.planted.record("stdout of lost-connection backfill", out)
        w.planted.record("stderr of lost-connection backfill", err)
        assert killed, f"the backfill's work connection was never seen (exit {proc.returncode})"
        assert proc.returncode == 0, err

    # --- stored errors written by an older version (raw driver text) are scrubbed on read
    legacy = (
        'new row for relation "sentry_apitoken" violates check constraint "no_family" '
        f"DETAIL: Failing row contains (3, 1, 1, {v['access token']}, {v['hashed token']}, "
        f"null, {v['refresh token']}, null). [parameters: ('{v['client secret']}',)]"
    )
    w.sql(
        "control",
        "UPDATE oauthmig_backfill_job SET status = 'failed', last_error = :e",
        e=legacy,
    )
    shown = w.cli("status")
    assert 'violates check constraint "no_family"' in shown.out, shown.out
    w.cli("status", "--format", "json")
    w.cli("backfill", "--dry-run", "--format", "json")

    # --- lock timeout: backfill and upgrade wait behind a transaction whose query has a secret
    # (EXCLUSIVE: the backfill's writes wait, status's reads run while the lock is held)
    release, thread = _hold_lock(w, "sentry_apitoken", v["access token"], "EXCLUSIVE")
    try:
        bf = w.cli("-d", "control", "backfill", "token-families")
        assert bf.code == 2, bf.out + bf.err
        w.cli("-d", "control", "status")
    finally:
        release.set()
        thread.join(30)

    # --- success: backfill (resuming the failed jobs rewrites their stored error), finalize
    result = w.cli("backfill")
    assert result.code == 0, result.err
    w.cli("backfill", "--format", "json")

    # --- a failing revision: a grant row violates finalize's CHECK (the error must not carry
    # the row, which holds the planted grant code)
    w.sql("control", "UPDATE sentry_apigrant SET code_challenge_method = 'bogus' WHERE id = 5")
    _assert_failed(w.cli("upgrade"), "code_challenge_method")
    _run_state_reads(w)
    w.sql("control", "UPDATE sentry_apigrant SET code_challenge_method = NULL WHERE id = 5")

    # --- the finalize's index build outlasts index_timeout behind an older writing transaction
    # (ROW EXCLUSIVE: CREATE INDEX CONCURRENTLY waits for it; the message names the blocker)
    release, thread = _hold_lock(w, "sentry_apitoken", v["access token"], "ROW EXCLUSIVE")
    try:
        up = w.cli("-d", "control", "upgrade")
        _assert_failed(up, "index_timeout" if pg else "lock")
        w.cli("-d", "control", "status")
    finally:
        release.set()
        thread.join(30)

    result = w.cli("upgrade")
    assert result.code == 0, result.err
    _run_reads(w, "finalized")
    assert w.cli("downgrade", "--to", "0003").code == 0
    assert w.cli("downgrade", "--to", "base", "--format", "json").code == 0
    w.cli("downgrade", "--to", "base", "--sql", "--from", "head")
    assert w.cli("upgrade", "--format", "json").code == 0
    # --- the grant purge reads and deletes rows holding the planted codes
    assert w.cli("prune-grants", "--dry-run").code == 0
    assert w.cli("prune-grants", "--format", "json", "--batch", "2").code == 0

    # --- unreachable database, secrets still in its URL
    bad = _unreachable_config(w)
    for args in (
        ("status",),
        ("status", "--format", "json"),
        ("status", "--check"),
        ("upgrade",),
        ("upgrade", "--dry-run"),
        ("upgrade", "--sql"),
        ("backfill",),
        ("backfill", "--format", "json"),
        ("downgrade", "--to", "base"),
        ("audit-redirects", "--format", "json"),
        ("prune-grants",),
        ("prune-grants", "--format", "json"),
    ):
        result = w.cli(*args, cfg=bad)
        if args != ("upgrade", "--sql"):
            assert result.code == 2, (args, result.out, result.err)

    # the unreachable error names the database and the masked URL, without a secret
    status = w.cli("status", "--format", "json", cfg=bad)
    assert "unreachable" in status.out or "does not exist" in status.out + status.err

    # --- a database password with unencoded '@ : % # /': masked whole, in text and JSON
    raw_cfg = _raw_password_config(w)
    for raw_args in (
        ("status",),
        ("status", "--format", "json"),
        ("upgrade", "--dry-run"),
        ("upgrade", "--dry-run", "--format", "json"),
        ("backfill", "--format", "json"),
        ("audit-redirects", "--format", "json"),
        ("report", "--html", str(w.tmp / "raw.html")),
    ):
        result = w.cli(*raw_args, cfg=raw_cfg)
        assert result.code == 2, (raw_args, result.out, result.err)
    shown = w.cli("status", cfg=raw_cfg)
    assert "postgresql+psycopg://postgres:***@127.0.0.1" in shown.out + shown.err
    refused = w.cli("status", cfg=_raw_password_config(w, "unparseable database password"))
    _assert_failed(refused, "databases.control.url: not a valid database URL")

    w.assert_no_leak()
