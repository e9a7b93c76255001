"""The legacy demo data generator on real SQLite and PostgreSQL databases."""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from alembic.script import ScriptDirectory
from sqlalchemy import func, inspect, select, text

from oauthmig.config import Settings
from oauthmig.db import make_engine
from oauthmig.demo.data import MARKER_TABLE, PLANTED, DemoSetup, setup_legacy
from oauthmig.demo.progress import legacy_write_line
from oauthmig.demo.run import DemoHooks, DemoStep, run_demo
from oauthmig.errors import DatabaseError, UnreachableError
from oauthmig.legacy import USERS_TABLE, legacy_metadata
from oauthmig.redirects.metadata_rules import METADATA_URL_COLUMNS, check_metadata
from oauthmig.redirects.rules import check_application, infer_app_type, split_redirect_uris
from oauthmig.rollout.job_state import RunEnd
from oauthmig.rollout.jobs import family_id, infer_application_type

APPS = 60
TOKENS = 400
ALL_CODES = {f"RU{n:03d}" for n in range(1, 17)} | {f"RU{n}" for n in range(101, 109)}


def _rows(settings: Settings, database: str, logical: str) -> list[dict[str, Any]]:
    """Every row of one legacy table, ordered by id, with types processed (lists, datetimes)."""
    table = legacy_metadata(settings.tables, (logical,)).tables[settings.tables.physical(logical)]
    engine = make_engine(settings.databases[database], settings)
    try:
        with engine.connect() as conn:
            return [dict(r) for r in conn.execute(select(table).order_by(table.c.id)).mappings()]
    finally:
        engine.dispose()


def _on(settings: Settings, database: str, statement: str) -> Any:
    engine = make_engine(settings.databases[database], settings)
    try:
        with engine.connect() as conn:
            return conn.execute(text(statement)).scalar()
    finally:
        engine.dispose()


def _tables(settings: Settings, database: str) -> set[str]:
    try:
        engine = make_engine(settings.databases[database], settings)
    except UnreachableError:  # a SQLite file that was never created
        return set()
    try:
        with engine.connect() as conn:
            return set(inspect(conn).get_table_names())
    finally:
        engine.dispose()


def _aware(value: datetime) -> datetime:
    """SQLite hands back naive UTC datetimes; PostgreSQL aware ones."""
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


@pytest.fixture
def demo(routed_settings: Settings) -> DemoSetup:
    """The demo data on fresh ``control`` (all tables) and ``shard`` (token) databases."""
    return setup_legacy(routed_settings, apps=APPS, tokens=TOKENS, seed=7)


def test_counts_per_database_match_the_result(routed_settings: Settings, demo: DemoSetup) -> None:
    s = routed_settings
    assert demo.seed == 7
    assert [d.database for d in demo.databases] == ["control", "shard"]
    control, shard = demo.databases
    assert (control.applications, control.grants) == (APPS, round(APPS * 1.5))
    assert (shard.applications, shard.grants, shard.live_grants) == (0, 0, 0)
    assert control.tokens + shard.tokens == TOKENS
    assert control.tokens == shard.tokens == TOKENS // 2
    now = datetime.now(UTC)
    for counts in demo.databases:
        db = counts.database
        tokens = _rows(s, db, "token")
        assert len(tokens) == counts.tokens
        assert sum(t["refresh_token"] is not None for t in tokens) == counts.refreshable_tokens
        if db == "control":
            assert len(_rows(s, db, "application")) == counts.applications
            grants = _rows(s, db, "grant")
            assert len(grants) == counts.grants
            assert sum(_aware(g["expires_at"]) > now for g in grants) == counts.live_grants
    # Every database gets the users table its tokens' foreign keys reference.
    assert _tables(s, "shard") == {s.tables.token, MARKER_TABLE, USERS_TABLE}


def test_ids_are_sparse(routed_settings: Settings, demo: DemoSetup) -> None:
    s = routed_settings
    for name in s.database_names():
        for logical in s.tables_on(name):
            ids = [r["id"] for r in _rows(s, name, logical)]
            assert len(set(ids)) == len(ids)
            assert max(ids) > len(ids), (name, logical)


def test_tokens_have_the_legacy_shapes(routed_settings: Settings, demo: DemoSetup) -> None:
    s = routed_settings
    app_ids = {a["id"] for a in _rows(s, "control", "application")}
    for name in ("control", "shard"):
        tokens = _rows(s, name, "token")
        user = [t for t in tokens if t["application_id"] is None]
        with_refresh = [t for t in tokens if t["refresh_token"] is not None]
        app_only = [
            t for t in tokens if t["application_id"] is not None and t["refresh_token"] is None
        ]
        assert user and with_refresh and app_only, name
        assert 0.55 < len(with_refresh) / len(tokens) < 0.85
        for t in user:
            assert t["refresh_token"] is None and t["hashed_refresh_token"] is None
            assert t["expires_at"] is None
        for t in tokens:
            assert len(t["token"]) == 64
            assert t["hashed_token"] == hashlib.sha256(t["token"].encode()).hexdigest()
            assert t["token_last_characters"] == t["token"][-4:]
            if t["refresh_token"] is not None:
                assert (
                    t["hashed_refresh_token"]
                    == hashlib.sha256(t["refresh_token"].encode()).hexdigest()
                )
            if t["application_id"] is not None:
                assert t["application_id"] in app_ids
                assert t["expires_at"] is not None
            assert isinstance(t["scope_list"], list)


def test_applications_look_like_sentry(routed_settings: Settings, demo: DemoSetup) -> None:
    apps = _rows(routed_settings, "control", "application")
    assert all(len(a["client_id"]) == 64 for a in apps)
    assert len({a["client_id"] for a in apps}) == len(apps)
    secrets = [a["client_secret"] for a in apps]
    assert None in secrets
    assert any(s is not None and len(s) == 64 for s in secrets)
    assert all(isinstance(a["scopes"], list) for a in apps)
    years = {_aware(a["date_added"]).year for a in apps}
    assert len(years) >= 3


def test_planted_examples_are_stored(routed_settings: Settings, demo: DemoSetup) -> None:
    assert set(PLANTED) == ALL_CODES
    stored = [a["redirect_uris"] for a in _rows(routed_settings, "control", "application")]
    lines = [line for value in stored for line in split_redirect_uris(value)]
    assert any("#" in line for line in lines)
    assert any("*" in line for line in lines)
    assert "" in stored
    assert any("\r\n" in value for value in stored)
    assert any(len(line) > 255 for line in lines)
    assert "javascript:alert(1)" in lines
    assert "urn:ietf:wg:oauth:2.0:oob" in lines
    assert any(line.startswith("https://user:pass@") for line in lines)
    assert any(any(ord(c) > 127 for c in line) for line in lines)


def _findings(settings: Settings) -> tuple[set[str], set[str]]:
    """Codes the redirect and client metadata rules report on the stored data (app type
    inferred as the backfill does), and codes they report when every application is taken as
    native."""
    now = datetime.now(UTC)
    live: dict[int, list[str]] = {}
    for g in _rows(settings, "control", "grant"):
        if _aware(g["expires_at"]) > now:
            live.setdefault(g["application_id"], []).append(g["redirect_uri"])
    inferred: set[str] = set()
    as_native: set[str] = set()
    for a in _rows(settings, "control", "application"):
        uris = split_redirect_uris(a["redirect_uris"])
        secret = bool(a["client_secret"])
        for app_type, out in ((infer_app_type(uris), inferred), ("native", as_native)):
            report = check_application(
                a["redirect_uris"],
                app_type,
                has_secret=secret,
                live_grant_uris=live.get(a["id"], ()),
            )
            out.update(f.code for f in report.all_findings())
        urls = {name: a[column] for name, column in METADATA_URL_COLUMNS.items() if column in a}
        inferred.update(f.code for f in check_metadata(urls, auth_method=None, has_secret=secret))
    return inferred, as_native


def test_every_planted_rule_fires(routed_settings: Settings, demo: DemoSetup) -> None:
    inferred, as_native = _findings(routed_settings)
    assert set(PLANTED) <= inferred
    assert "RU011" in as_native


def test_some_grants_live_some_expired(routed_settings: Settings, demo: DemoSetup) -> None:
    now = datetime.now(UTC)
    grants = _rows(routed_settings, "control", "grant")
    apps = {a["id"]: a for a in _rows(routed_settings, "control", "application")}
    live = [g for g in grants if _aware(g["expires_at"]) > now]
    expired = [g for g in grants if _aware(g["expires_at"]) <= now]
    assert live and expired
    assert all(_aware(g["expires_at"]) <= now + timedelta(minutes=10) for g in live)
    assert all(g["application_id"] in apps and len(g["code"]) == 64 for g in grants)
    assert all(len(g["redirect_uri"]) <= 255 for g in grants)
    unregistered = [
        g
        for g in live
        if g["redirect_uri"] not in split_redirect_uris(apps[g["application_id"]]["redirect_uris"])
    ]
    assert len(unregistered) >= 3


def _fingerprint(settings: Settings) -> str:
    digest = hashlib.sha256()
    for a in _rows(settings, "control", "application"):
        digest.update(f"{a['id']}|{a['client_id']}|{a['redirect_uris']}\n".encode())
    for name in ("control", "shard"):
        for t in _rows(settings, name, "token"):
            digest.update(
                f"{t['id']}|{t['token']}|{t['refresh_token']}|{t['application_id']}\n".encode()
            )
    return digest.hexdigest()


def test_same_seed_same_data_other_seed_other_data(routed_settings: Settings) -> None:
    setup_legacy(routed_settings, apps=APPS, tokens=TOKENS, seed=1)
    first = _fingerprint(routed_settings)
    setup_legacy(routed_settings, apps=APPS, tokens=TOKENS, seed=1)
    assert _fingerprint(routed_settings) == first
    setup_legacy(routed_settings, apps=APPS, tokens=TOKENS, seed=2)
    assert _fingerprint(routed_settings) != first


def _count(settings: Settings, database: str, table: str) -> int:
    return int(_on(settings, database, f"SELECT count(*) FROM {table}"))


def test_refuses_tables_it_did_not_create(legacy_settings: Settings) -> None:
    s = legacy_settings
    engine = make_engine(s.databases["shard"], s)
    try:
        with engine.begin() as conn:
            conn.execute(
                text(
                    f"INSERT INTO {s.tables.token} (id, user_id, token, scope_list, date_added, "
                    "scopes) VALUES (1, 1, 'real-token', '{}', CURRENT_TIMESTAMP, 0)"
                )
            )
    finally:
        engine.dispose()
    before = {
        (name, logical): _count(s, name, s.tables.physical(logical))
        for name in s.database_names()
        for logical in s.tables_on(name)
    }

    with pytest.raises(DatabaseError) as info:
        setup_legacy(s, apps=APPS, tokens=TOKENS)

    message = str(info.value)
    assert "\n" not in message
    assert "already exists and was not created by `oauthmig demo`" in message
    assert s.tables.application in message or s.tables.token in message
    after = {
        (name, logical): _count(s, name, s.tables.physical(logical))
        for name in s.database_names()
        for logical in s.tables_on(name)
    }
    assert after == before
    assert before[("shard", "token")] == 1
    for name in s.database_names():
        assert MARKER_TABLE not in _tables(s, name)


def test_refuses_oauthmig_tables_without_marker(routed_settings: Settings) -> None:
    s = routed_settings
    engine = make_engine(s.databases["shard"], s, create=True)
    try:
        with engine.begin() as conn:
            conn.execute(text("CREATE TABLE oauthmig_version (version_num VARCHAR(32))"))
    finally:
        engine.dispose()
    with pytest.raises(DatabaseError, match="table oauthmig_version already exists"):
        setup_legacy(s, apps=APPS, tokens=TOKENS)
    assert _tables(s, "control") == set()
    assert _tables(s, "shard") == {"oauthmig_version"}


def test_rerun_replaces_an_earlier_demo(routed_settings: Settings, demo: DemoSetup) -> None:
    s = routed_settings
    engine = make_engine(s.databases["control"], s)
    try:
        with engine.begin() as conn:
            conn.execute(text("CREATE TABLE oauthmig_version (version_num VARCHAR(32))"))
            conn.execute(text("CREATE TABLE oauthmig_backfill_state (job VARCHAR(40))"))
            conn.execute(text(f"ALTER TABLE {s.tables.token} ADD COLUMN revoked_at TEXT"))
    finally:
        engine.dispose()

    again = setup_legacy(s, apps=APPS, tokens=TOKENS, seed=7)

    def shape(d: DemoSetup) -> list[tuple[str, int, int, int]]:
        return [(c.database, c.applications, c.grants, c.tokens) for c in d.databases]

    assert shape(again) == shape(demo)
    assert [c.refreshable_tokens for c in again.databases] == [
        c.refreshable_tokens for c in demo.databases
    ]
    assert _tables(s, "control") == {
        s.tables.application,
        s.tables.grant,
        s.tables.token,
        MARKER_TABLE,
        USERS_TABLE,
    }
    assert "revoked_at" not in {r for r in _rows(s, "control", "token")[0]}
    for name in s.database_names():
        assert _count(s, name, MARKER_TABLE) == 1
        assert _on(s, name, f"SELECT seed FROM {MARKER_TABLE}") == 7


def test_new_rows_get_ids_past_the_loaded_ones(routed_settings: Settings, demo: DemoSetup) -> None:
    s = routed_settings
    table = legacy_metadata(s.tables, ("token",)).tables[s.tables.token]
    engine = make_engine(s.databases["shard"], s)
    try:
        with engine.begin() as conn:
            top = conn.execute(select(func.max(table.c.id))).scalar_one()
            new_id = conn.execute(
                table.insert()
                .values(
                    user_id=1, token="x" * 64, scope_list=[], date_added=datetime.now(UTC), scopes=0
                )
                .returning(table.c.id)
            ).scalar_one()
    finally:
        engine.dispose()
    assert new_id > top


def test_progress_is_reported(routed_settings: Settings) -> None:
    calls: list[tuple[str, int, int]] = []
    setup_legacy(
        routed_settings,
        apps=APPS,
        tokens=TOKENS,
        progress=lambda label, done, total: calls.append((label, done, total)),
    )
    finals = {label: (done, total) for label, done, total in calls}
    assert finals == {
        "control: applications": (APPS, APPS),
        "control: grants": (90, 90),
        "control: tokens": (200, 200),
        "shard: tokens": (200, 200),
    }
    assert all(0 <= done <= total for _, done, total in calls)


def test_small_app_counts_still_plant_every_kind(routed_settings: Settings) -> None:
    setup_legacy(routed_settings, apps=50, tokens=0)
    inferred, _ = _findings(routed_settings)
    assert set(PLANTED) <= inferred


def test_the_demo_service_runs_every_step_and_reads_the_revisions_once_for_the_rollout(
    routed_settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    built: list[int] = []
    original = ScriptDirectory.__init__

    def counting_init(self: ScriptDirectory, *args: Any, **kwargs: Any) -> None:
        built.append(1)
        original(self, *args, **kwargs)

    monkeypatch.setattr(ScriptDirectory, "__init__", counting_init)
    events: list[tuple[str, DemoStep]] = []
    loads: list[tuple[str, int, int]] = []

    @contextlib.contextmanager
    def loading() -> Iterator[Callable[[str, int, int], None]]:
        events.append(("loading", DemoStep.SETUP))
        yield lambda label, done, total: loads.append((label, done, total))

    built_before: dict[DemoStep, int] = {}

    def starting(step: DemoStep) -> None:
        built_before[step] = len(built)
        events.append(("start", step))

    hooks = DemoHooks(
        loading=loading,
        starting=starting,
        finished=lambda step, _run: events.append(("done", step)),
    )
    run = run_demo(routed_settings, apps=APPS, tokens=TOKENS, seed=7, hooks=hooks)
    steps = list(DemoStep)
    assert events[:3] == [("start", steps[0]), ("loading", steps[0]), ("done", steps[0])]
    assert events[3:] == [(kind, step) for step in steps[1:] for kind in ("start", "done")]
    assert {label for label, _done, _total in loads} >= {"control: tokens", "shard: tokens"}
    # One catalogue for the whole rollout (the redirect audit checks the databases itself).
    assert built_before[DemoStep.AUDIT] == 1
    assert run.failed is None
    assert run.expand is not None and run.finalize is not None and run.backfill is not None
    assert {r.database: r.reached for r in run.expand.runs} == {"control": "0003", "shard": "0003"}
    # Finalize, then the expand revisions after it (0005 to 0007): the head.
    assert {r.database: r.reached for r in run.finalize.runs} == {
        "control": "0007",
        "shard": "0007",
    }
    assert {j.status for j in run.backfill.runs} == {RunEnd.FINISHED}
    assert run.status is not None and not run.status.outstanding
    # The demo's applications and the one the provider's unchanged code created after finalize.
    assert run.audit is not None and run.audit.applications_scanned == APPS + 1
    assert set(PLANTED) <= {code for code, n in run.audit.by_code.items() if n}


def test_the_demo_service_stops_after_setup_when_asked(routed_settings: Settings) -> None:
    run = run_demo(routed_settings, apps=APPS, tokens=TOKENS, setup_only=True)
    assert run.expand is None and run.status is None and run.audit is None
    assert "oauthmig_version" not in _tables(routed_settings, "control")


def test_the_demo_shows_the_provider_unchanged_code_writing_after_finalize(
    routed_settings: Settings,
) -> None:
    run = run_demo(routed_settings, apps=APPS, tokens=TOKENS, seed=7)
    assert run.failed is None and run.legacy_writes is not None and run.status is not None
    t = routed_settings.tables
    cm = routed_settings.backfill.client_metadata
    writes = {w.database: w for w in run.legacy_writes}
    assert set(writes) == {"control", "shard"}
    control, shard = writes["control"], writes["shard"]
    # What the client-metadata backfill infers for a confidential web application.
    assert control.application_id is not None
    apps = {r["id"]: r for r in _rows(routed_settings, "control", "application")}
    app = apps[control.application_id]
    assert app["client_secret"]
    assert control.token_endpoint_auth_method == cm.confidential_auth_method
    assert control.grant_types == tuple(cm.grant_types)
    assert control.response_types == tuple(cm.response_types)
    assert control.application_type == infer_application_type(app["redirect_uris"])
    assert shard.application_id is None
    for w in (control, shard):
        assert w.token_id is not None
        assert w.token_family_id == family_id(t.token, w.token_id, w.database)
        tokens = {r["id"]: r for r in _rows(routed_settings, w.database, "token")}
        assert tokens[w.token_id]["refresh_token"]
        line = legacy_write_line(w)
        assert f"token {w.token_id}" in line and str(w.token_family_id) in line
        assert tokens[w.token_id]["refresh_token"] not in line
        assert tokens[w.token_id]["token"] not in line
    assert app["client_secret"] not in legacy_write_line(control)
    assert f"application {control.application_id}" in legacy_write_line(control)
