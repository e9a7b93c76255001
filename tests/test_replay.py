"""Authorization code replay (RFC 6749 §4.1.2) and the grant purge, on real SQLite and
PostgreSQL: a replayed code revokes every generation of the family it produced, in one
statement; two concurrent exchanges of one code on two PostgreSQL connections (exactly one
wins, the loser revokes what it issued); ``prune_grants`` / ``oauthmig prune-grants`` in
bounded batches; revision 0005 up, down and offline; and no code in any error text."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import (
    BigInteger,
    Column,
    MetaData,
    Table,
    create_engine,
    event,
    insert,
    select,
    text,
    update,
)
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from oauthmig.config import Settings, settings_from_mapping
from oauthmig.db import make_engine
from oauthmig.errors import InvalidGrant, LockTimeoutError, OAuthError
from oauthmig.legacy import legacy_metadata
from oauthmig.provider.models import (
    DEFAULT_MODELS,
    ApplicationModel,
    IssuedToken,
    build_models,
    check_models,
    exchange_code,
    find_active_token,
    new_grant,
    revoke_family,
    rotate_refresh_token,
)
from oauthmig.provider.pkce import s256_challenge
from oauthmig.prune import prune_grants
from oauthmig.rollout import runner
from oauthmig.rollout.backfill import backfill
from oauthmig.runlock import exclusive_run
from tests.helpers import (
    columns_of,
    create_migrated_sentry_shape,
    invoke,
    wait_for_lock_wait,
    write_config,
)
from tests.helpers.databases import DatabaseFactory, create_legacy, routed_config
from tests.test_models import (
    GRANT_EXTRA,
    REDIRECT,
    VERIFIER,
    add_application,
    issue,
    recording,
    tokens,
)
from tests.test_offline_sql import _apply, _log, _version

M = DEFAULT_MODELS
Grant, Token = M.Grant, M.Token
GRANTS, TOKENS = M.tables.grant, M.tables.token
pg_only = pytest.mark.parametrize("backend", ["postgresql"], indirect=True)
sqlite_only = pytest.mark.parametrize("backend", ["sqlite"], indirect=True)


@pytest.fixture
def engine(make_database: DatabaseFactory) -> Iterator[Engine]:
    """Sentry's tables with every column the models map (0005 included), users and FKs."""
    eng = create_engine(make_database("replay"))
    create_migrated_sentry_shape(eng, M)
    yield eng
    eng.dispose()


@pytest.fixture
def session(engine: Engine) -> Iterator[Session]:
    with Session(engine) as s:
        yield s


@pytest.fixture
def app(session: Session) -> ApplicationModel:
    return add_application(session)


def code_for(session: Session, app: ApplicationModel, **kw: Any) -> str:
    """A fresh S256 code for ``app``."""
    grant = new_grant(
        session,
        extra=GRANT_EXTRA,
        application=app,
        user_id=7,
        redirect_uri=REDIRECT,
        scopes=["project:read"],
        code_challenge=s256_challenge(VERIFIER),
        code_challenge_method="S256",
        **kw,
    )
    return grant.code


def exchange(session: Session, app: ApplicationModel, code: str, **kw: Any) -> IssuedToken:
    kw.setdefault("redirect_uri", REDIRECT)
    kw.setdefault("code_verifier", VERIFIER)
    return exchange_code(session, application=app, code=code, **kw)


def refused(session: Session, app: ApplicationModel, code: str, **kw: Any) -> InvalidGrant:
    """Exchange ``code`` expecting invalid_grant; the code never appears in the error."""
    with pytest.raises(InvalidGrant) as info:
        exchange(session, app, code, **kw)
    assert_no_code(info.value, code)
    return info.value


def assert_no_code(exc: OAuthError, code: str) -> None:
    assert exc.error == "invalid_grant"
    for text_ in (str(exc), exc.description, exc.message, repr(exc)):
        assert code not in text_ and code[:16] not in text_


def grant_row(session: Session, code: str) -> dict[str, Any]:
    session.expire_all()
    row = session.execute(
        select(Grant.id, Grant.consumed_at, Grant.token_family_id).where(Grant.code == code)
    ).one()
    session.rollback()
    return dict(row._mapping)


# --------------------------------------------------------------------------- replay


def test_an_exchange_marks_the_code_and_remembers_its_family(
    session: Session, app: ApplicationModel
) -> None:
    code = code_for(session, app)
    issued = exchange(session, app, code)
    row = grant_row(session, code)
    assert row["consumed_at"] is not None and row["consumed_at"].tzinfo is UTC
    assert row["token_family_id"] == issued.token_family_id is not None


def test_replay_revokes_the_family_and_fails(session: Session, app: ApplicationModel) -> None:
    code = code_for(session, app)
    issued = exchange(session, app, code)
    other = issue(session, app)  # another code, another family: untouched
    error = refused(session, app, code)
    assert "already used" in error.description and "revoked" in error.description
    rows = {r.id: r for r in tokens(session)}
    assert rows[issued.token_id].revoked_reason == "code_replay"
    assert rows[issued.token_id].revoked_at is not None
    assert rows[other.token_id].revoked_at is None
    assert find_active_token(session, issued.access_token) is None
    assert find_active_token(session, other.access_token) is not None
    with pytest.raises(InvalidGrant):  # the refresh token is dead too
        rotate_refresh_token(session, issued.refresh_token or "")
    # Presented a third time: still refused, nothing more to revoke, nothing issued.
    refused(session, app, code)
    assert len(tokens(session)) == 2


def test_replay_after_several_rotations_revokes_every_generation_in_one_statement(
    engine: Engine, session: Session, app: ApplicationModel
) -> None:
    code = code_for(session, app)
    current = exchange(session, app, code)
    generations = [current]
    for _ in range(4):
        current = rotate_refresh_token(session, current.refresh_token or "", application=app)
        generations.append(current)
    # One generation was already revoked by an admin: it keeps its time and reason.
    revoked_at = datetime(2030, 1, 1, tzinfo=UTC)
    session.execute(
        update(Token)
        .where(Token.id == generations[1].token_id)
        .values(revoked_at=revoked_at, revoked_reason="admin")
    )
    session.commit()
    with recording(engine) as stmts:
        refused(session, app, code)
    token_updates = [(s, n) for s, n in stmts.of_kind("UPDATE") if TOKENS in s.split("SET")[0]]
    assert len(token_updates) == 1, token_updates
    assert token_updates[0][1] == 4  # every generation not already revoked
    rows = tokens(session)
    assert len(rows) == 5 and {r.token_family_id for r in rows} == {generations[0].token_family_id}
    assert [r.revoked_reason for r in rows] == [
        "code_replay",
        "admin",
        "code_replay",
        "code_replay",
        "code_replay",
    ]
    assert rows[1].revoked_at == revoked_at
    assert all(find_active_token(session, g.access_token) is None for g in generations)


def test_a_replay_revokes_whoever_presents_it(session: Session, app: ApplicationModel) -> None:
    """Another client, a wrong redirect_uri or no verifier: the code leaked, so it revokes."""
    other = add_application(session, client_id="client-2")
    for variant in ({"application": other}, {"redirect_uri": REDIRECT + "/"}, {}):
        code = code_for(session, app)
        issued = exchange(session, app, code)
        if "application" in variant:
            with pytest.raises(InvalidGrant) as info:
                exchange_code(
                    session,
                    application=other,
                    code=code,
                    redirect_uri=REDIRECT,
                    code_verifier=VERIFIER,
                )
            assert_no_code(info.value, code)
        else:
            refused(session, app, code, code_verifier=None, **variant)
        assert find_active_token(session, issued.access_token) is None


def test_a_failed_first_exchange_consumes_the_code_and_issues_nothing(
    session: Session, app: ApplicationModel
) -> None:
    code = code_for(session, app)
    wrong = refused(session, app, code, code_verifier="x" * 43)
    assert "already used" not in wrong.description
    row = grant_row(session, code)
    assert row["consumed_at"] is not None and row["token_family_id"] is None
    # The legitimate client comes second: refused, and there is nothing to revoke.
    second = refused(session, app, code)
    assert "revoked" not in second.description
    assert tokens(session) == []


def test_an_expired_code_is_consumed_and_unusable(session: Session, app: ApplicationModel) -> None:
    t0 = datetime(2030, 1, 1, 12, 0, tzinfo=UTC)
    code = code_for(session, app, now=t0 - timedelta(minutes=11))
    error = refused(session, app, code, now=t0)
    assert "expired" in error.description
    assert grant_row(session, code)["consumed_at"] == t0
    refused(session, app, code, now=t0)
    assert tokens(session) == []


def test_code_replay_is_an_allowed_revocation_reason(
    session: Session, app: ApplicationModel
) -> None:
    issued = issue(session, app)
    assert issued.token_family_id is not None
    assert revoke_family(session, issued.token_family_id, reason="code_replay") == 1
    with pytest.raises(ValueError, match="code_replay"):
        revoke_family(session, issued.token_family_id, reason="bogus")


def test_without_revision_0005_exchange_deletes_the_code(make_database: DatabaseFactory) -> None:
    """Models deployed before 0005 (it runs after the gated finalize): the old behaviour."""
    eng = create_engine(make_database("pre0005"))
    try:
        create_migrated_sentry_shape(eng, M)
        with eng.begin() as conn:
            for column in ("consumed_at", "token_family_id"):
                conn.execute(text(f"ALTER TABLE {GRANTS} DROP COLUMN {column}"))
        sentry = build_models(defaults={"grant": {"scopes": 0}})
        check_models(eng, sentry)  # absent 0005 columns are no error...
        with Session(eng) as s:
            app = add_application(s, sentry)
            grant = new_grant(
                s, application=app, user_id=7, redirect_uri=REDIRECT, scopes=[], models=sentry
            )
            issued = exchange_code(
                s, application=app, code=grant.code, redirect_uri=REDIRECT, models=sentry
            )
            remaining = s.execute(text(f"SELECT count(*) FROM {GRANTS}")).scalar()
            assert remaining == 0
            with pytest.raises(InvalidGrant) as info:
                exchange_code(
                    s, application=app, code=grant.code, redirect_uri=REDIRECT, models=sentry
                )
            assert_no_code(info.value, grant.code)
            # ...and a replay is an unknown code: nothing is revoked.
            assert find_active_token(s, issued.access_token, models=sentry) is not None
    finally:
        eng.dispose()


# --------------------------------------------------------------------------- concurrency


@dataclass
class Race:
    """Both exchanges read the grant before either claims it (a barrier on a real engine
    event), then race their conditional UPDATEs."""

    barrier: threading.Barrier
    code: str
    lost: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)


def _race_listener(race: Race) -> Any:
    def after(_conn: Any, cursor: Any, statement: str, params: Any, *_: Any) -> None:
        if statement.startswith("SELECT") and GRANTS in statement:
            values = params.values() if isinstance(params, dict) else params
            if race.code in values:
                race.barrier.wait()
        elif (
            statement.startswith("UPDATE")
            and "consumed_at IS NULL" in statement
            and cursor.rowcount == 0
        ):
            with race.lock:
                race.lost += 1

    return after


@pg_only
def test_two_concurrent_exchanges_of_one_code_one_wins_the_loser_revokes(
    engine: Engine, session: Session, app: ApplicationModel
) -> None:
    runs = 10
    for i in range(runs):
        code = code_for(session, app)
        race = Race(threading.Barrier(2, timeout=20), code)
        listener = _race_listener(race)
        outcomes: list[IssuedToken | InvalidGrant] = []

        def present(
            code: str = code, outcomes: list[IssuedToken | InvalidGrant] = outcomes
        ) -> None:
            with Session(engine) as s:
                try:
                    outcomes.append(exchange(s, app, code))
                except InvalidGrant as exc:
                    outcomes.append(exc)

        event.listen(engine, "after_cursor_execute", listener)
        try:
            threads = [threading.Thread(target=present) for _ in range(2)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(30)
        finally:
            event.remove(engine, "after_cursor_execute", listener)
        assert len(outcomes) == 2, f"run {i}: a thread failed unexpectedly"
        won = [o for o in outcomes if isinstance(o, IssuedToken)]
        lost = [o for o in outcomes if isinstance(o, InvalidGrant)]
        assert len(won) == 1 and len(lost) == 1, f"run {i}: {outcomes}"
        assert race.lost == 1, f"run {i}: both read the grant, exactly one claim must lose"
        assert "revoked" in lost[0].description
        assert_no_code(lost[0], code)
        family = [r for r in tokens(session) if r.token_family_id == won[0].token_family_id]
        assert [r.revoked_reason for r in family] == ["code_replay"]
        assert grant_row(session, code)["token_family_id"] == won[0].token_family_id


def _wait_for_lock_wait(engine: Engine) -> None:
    wait_for_lock_wait(engine, "the second exchange never waited for the first")


@pg_only
def test_the_loser_waits_for_the_winner_and_revokes_what_it_committed(
    engine: Engine, session: Session, app: ApplicationModel
) -> None:
    """The first exchange is held after claiming the grant (before issuing and committing);
    the second blocks on the row lock, then sees the winner's family and revokes it."""
    code = code_for(session, app)
    claimed, resume = threading.Event(), threading.Event()

    def after(_conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        if (
            threading.current_thread().name == "first"
            and statement.startswith("UPDATE")
            and "consumed_at IS NULL" in statement
        ):
            claimed.set()
            resume.wait(20)

    outcomes: dict[str, IssuedToken | InvalidGrant] = {}

    def present(name: str) -> None:
        with Session(engine) as s:
            try:
                outcomes[name] = exchange(s, app, code)
            except InvalidGrant as exc:
                outcomes[name] = exc

    event.listen(engine, "after_cursor_execute", after)
    try:
        first = threading.Thread(target=present, name="first", args=("first",))
        second = threading.Thread(target=present, name="second", args=("second",))
        first.start()
        assert claimed.wait(20)
        second.start()
        _wait_for_lock_wait(engine)
        resume.set()
        first.join(30)
        second.join(30)
    finally:
        resume.set()
        event.remove(engine, "after_cursor_execute", after)
    won, lost = outcomes["first"], outcomes["second"]
    assert isinstance(won, IssuedToken) and isinstance(lost, InvalidGrant)
    (row,) = tokens(session)
    assert row.id == won.token_id and row.revoked_reason == "code_replay"


# --------------------------------------------------------------------------- purge


def _grants(engine: Engine, rows: list[tuple[int, timedelta, bool]], now: datetime) -> None:
    """Insert (id, expires_at - now, consumed) grants, with Sentry's ``scopes`` column."""
    mapped = M.mapped_table("grant")
    sentry_grant = Table(
        mapped.name,
        MetaData(),
        *[Column(c.name, c.type, primary_key=c.primary_key) for c in mapped.columns],
        Column("scopes", BigInteger),
    )
    with engine.begin() as conn:
        conn.execute(
            insert(sentry_grant),
            [
                {
                    "id": grant_id,
                    "user_id": 1,
                    "application_id": 1,
                    "code": f"prune-code-{grant_id}",
                    "expires_at": now + offset,
                    "redirect_uri": REDIRECT,
                    "scope_list": [],
                    "scopes": 0,
                    "consumed_at": now + offset - timedelta(minutes=5) if consumed else None,
                }
                for grant_id, offset, consumed in rows
            ],
        )


def _ids(engine: Engine) -> set[int]:
    with engine.connect() as conn:
        return set(conn.execute(select(Grant.id)).scalars())


@pytest.fixture
def prunable(engine: Engine, app: ApplicationModel) -> tuple[datetime, set[int]]:
    """25 expired grants (every third consumed) with sparse ids, 5 live ones and 3 consumed
    ones still in their replay window; returns (now, the ids that must survive)."""
    now = datetime(2030, 6, 1, 12, 0, tzinfo=UTC)
    expired = [(3 * i + 1, -timedelta(minutes=i + 1), i % 3 == 0) for i in range(25)]
    live = [(1000 + i, timedelta(minutes=5), False) for i in range(5)]
    window = [(2000 + i, timedelta(minutes=3), True) for i in range(3)]
    _grants(engine, expired[:10] + live + expired[10:] + window, now)
    return now, {g for g, _, _ in live + window}


def test_prune_deletes_expired_grants_in_bounded_batches(
    engine: Engine, prunable: tuple[datetime, set[int]]
) -> None:
    now, survivors = prunable
    calls: list[tuple[int, int]] = []
    with recording(engine) as stmts:
        stats = prune_grants(engine, batch=10, now=now, on_batch=lambda b, d: calls.append((b, d)))
    assert (stats.deleted, stats.batches, stats.consumed) == (25, 3, 9)
    assert (stats.kept, stats.kept_consumed) == (8, 3)
    assert calls == [(1, 10), (2, 20), (3, 25)]
    assert _ids(engine) == survivors
    deletes = stmts.of_kind("DELETE")
    assert len(deletes) == 3  # one bounded statement per batch
    assert all("LIMIT" in s.upper() and "ORDER BY" in s.upper() for s, _ in deletes)
    if engine.dialect.name == "postgresql":
        assert all("SKIP LOCKED" in s for s, _ in deletes)
        assert len([s for s, _ in stmts.seen if s.startswith("SET LOCAL lock_timeout")]) >= 3
    again = prune_grants(engine, batch=10, now=now)
    assert (again.deleted, again.batches) == (0, 0)


def test_prune_dry_run_counts_and_deletes_nothing(
    engine: Engine, prunable: tuple[datetime, set[int]]
) -> None:
    now, _ = prunable
    before = _ids(engine)
    with recording(engine) as stmts:
        stats = prune_grants(engine, batch=10, now=now, dry_run=True)
    assert (stats.deleted, stats.batches, stats.consumed, stats.dry_run) == (25, 3, 9, True)
    assert stmts.of_kind("DELETE") == [] and _ids(engine) == before


def test_prune_older_than_keeps_recently_expired_grants(
    engine: Engine, session: Session, prunable: tuple[datetime, set[int]]
) -> None:
    now, survivors = prunable
    stats = prune_grants(session, older_than=timedelta(minutes=10), now=now, batch=4)
    assert stats.deleted == 15  # expired 11..25 minutes ago
    assert len(_ids(engine)) == 8 + 10
    assert survivors <= _ids(engine)


def test_prune_arguments_are_checked(engine: Engine) -> None:
    for kwargs in ({"batch": 0}, {"older_than": timedelta(seconds=-1)}, {"sleep": float("nan")}):
        with pytest.raises(ValueError):
            prune_grants(engine, **kwargs)
    with pytest.raises(ValueError, match="timezone-aware"):
        prune_grants(engine, now=datetime(2030, 1, 1))


@pg_only
def test_prune_skips_a_row_an_exchange_holds(
    engine: Engine, prunable: tuple[datetime, set[int]]
) -> None:
    """A grant locked by a transaction in flight is left for the next run, not waited for."""
    now, survivors = prunable
    with engine.connect() as holder:
        holder.execute(text(f"SELECT id FROM {GRANTS} WHERE id = 4 FOR UPDATE"))
        stats = prune_grants(engine, batch=10, now=now, lock_timeout_ms=200, max_retries=0)
        assert stats.deleted == 24 and _ids(engine) == survivors | {4}
        holder.rollback()
    assert prune_grants(engine, now=now).deleted == 1


@pg_only
def test_prune_gives_up_on_a_locked_table_without_a_long_wait(
    engine: Engine, prunable: tuple[datetime, set[int]]
) -> None:
    now, _ = prunable
    before = _ids(engine)
    with engine.connect() as holder:
        holder.execute(text(f"LOCK TABLE {GRANTS} IN ACCESS EXCLUSIVE MODE"))
        with pytest.raises(LockTimeoutError) as info:
            prune_grants(engine, batch=10, now=now, lock_timeout_ms=100, max_retries=2)
        holder.rollback()
    message = str(info.value)
    assert "lock_timeout 100ms after 3 attempts" in message and "rerun" in message
    assert _ids(engine) == before


@sqlite_only
def test_prune_waits_for_a_sqlite_reader_at_most_its_busy_timeout(
    make_database: DatabaseFactory, prunable: tuple[datetime, set[int]]
) -> None:
    """A read transaction holds SQLite's shared lock, so a batch cannot commit: it is rolled
    back (also on the driver, which SQLite leaves in the transaction) and retried, then the
    run gives up. Once the reader is gone, the next run deletes everything."""
    now, survivors = prunable
    url = make_database("replay")  # the same file the engine fixture uses
    quick = create_engine(url, connect_args={"timeout": 0.1})
    try:
        with quick.connect() as reader:
            raw = reader.connection.driver_connection
            assert raw is not None
            raw.execute("BEGIN")  # a read transaction: SELECT takes the shared lock and keeps it
            assert raw.execute(f"SELECT count(*) FROM {GRANTS}").fetchone() == (33,)
            with pytest.raises(LockTimeoutError, match="after 2 attempts; 0 expired grants"):
                prune_grants(quick, batch=10, now=now, max_retries=1)
        assert prune_grants(quick, batch=10, now=now).deleted == 25
        assert _ids(quick) == survivors
    finally:
        quick.dispose()


# --------------------------------------------------------------------------- the CLI


@pytest.fixture
def rolled_out(make_database: DatabaseFactory, tmp_path: Path) -> tuple[Settings, str]:
    """Legacy tables on control and shard with one application (id 1), the whole rollout
    applied (head), and its config file."""
    data = routed_config(make_database("control"), make_database("shard"))
    settings = settings_from_mapping(data, {}, "test")
    create_legacy(settings)
    _app_row(settings)
    assert runner.upgrade(settings).failed == ()
    assert backfill(settings).failed == ()
    result = runner.upgrade(settings)
    assert result.failed == () and {r.reached for r in result.runs} == {"0007"}
    return settings, write_config(tmp_path / "oauthmig.toml", data)


def _legacy_grants(settings: Settings, rows: list[tuple[int, datetime, datetime | None]]) -> None:
    md = legacy_metadata(settings.tables, ("grant",))
    grant = md.tables[settings.tables.grant]
    engine = make_engine(settings.databases["control"], settings)
    try:
        with engine.begin() as conn:
            conn.execute(
                insert(grant),
                [
                    {
                        "id": i,
                        "user_id": 1,
                        "application_id": 1,
                        "code": f"cli-code-{i}",
                        "expires_at": expires,
                        "redirect_uri": REDIRECT,
                        "scope_list": [],
                        "scopes": 0,
                    }
                    for i, expires, _ in rows
                ],
            )
            for i, _, consumed in rows:
                if consumed is not None:
                    conn.execute(
                        text(f"UPDATE {settings.tables.grant} SET consumed_at = :c WHERE id = :i"),
                        {"c": consumed, "i": i},
                    )
    finally:
        engine.dispose()


def _app_row(settings: Settings) -> None:
    md = legacy_metadata(settings.tables, ("application",))
    engine = make_engine(settings.databases["control"], settings)
    try:
        with engine.begin() as conn:
            conn.execute(
                insert(md.tables[settings.tables.application]),
                {
                    "id": 1,
                    "client_id": "cli",
                    "name": "cli",
                    "redirect_uris": REDIRECT,
                    "scopes": [],
                    "date_added": datetime(2025, 1, 1, tzinfo=UTC),
                },
            )
    finally:
        engine.dispose()


def test_prune_grants_command(
    rolled_out: tuple[Settings, str], capsys: pytest.CaptureFixture[str]
) -> None:
    settings, cfg = rolled_out
    now = datetime.now(UTC)
    rows: list[tuple[int, datetime, datetime | None]] = [
        (i, now - timedelta(days=2, minutes=i), now - timedelta(days=2)) for i in (1, 2, 3)
    ]
    rows += [(i, now - timedelta(hours=1), None) for i in (4, 5)]
    rows += [(6, now + timedelta(minutes=5), now), (7, now + timedelta(minutes=9), None)]
    _legacy_grants(settings, rows)

    dry = invoke(capsys, "--config", cfg, "prune-grants", "--dry-run", "--format", "json")
    assert dry.code == 0, dry.err
    (doc,) = json.loads(dry.out)["databases"]  # only control hosts the grant table
    assert (doc["database"], doc["deleted"], doc["batches"], doc["kept"]) == ("control", 5, 1, 2)

    older = invoke(capsys, "--config", cfg, "prune-grants", "--older-than", "1d", "--batch", "2")
    assert older.code == 0, older.err
    assert "prune-grants" in older.out and "control" in older.out
    assert _grant_ids(settings) == {4, 5, 6, 7}

    done = invoke(capsys, "--config", cfg, "prune-grants", "--format", "json", "--batch", "1")
    assert done.code == 0, done.err
    (doc,) = json.loads(done.out)["databases"]
    assert (doc["deleted"], doc["consumed_deleted"], doc["batches"]) == (2, 0, 2)
    assert (doc["kept"], doc["kept_consumed"], doc["error"]) == (2, 1, None)
    assert _grant_ids(settings) == {6, 7}
    for output in (dry.out, dry.err, older.out, older.err, done.out, done.err):
        assert "cli-code-" not in output


def _grant_ids(settings: Settings) -> set[int]:
    engine = make_engine(settings.databases["control"], settings)
    try:
        with engine.connect() as conn:
            return set(conn.execute(text(f"SELECT id FROM {settings.tables.grant}")).scalars())
    finally:
        engine.dispose()


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (("--older-than", "1y"), "--older-than: expected a duration"),
        (("--older-than", "3651d"), "--older-than: must be between"),
        (("--batch", "0"), "--batch"),
        (("--sleep", "nan"), "--sleep"),
    ],
)
def test_prune_grants_bad_input_exits_2_and_writes_nothing(
    rolled_out: tuple[Settings, str],
    capsys: pytest.CaptureFixture[str],
    args: tuple[str, ...],
    says: str,
) -> None:
    settings, cfg = rolled_out
    _legacy_grants(settings, [(1, datetime(2020, 1, 1, tzinfo=UTC), None)])
    result = invoke(capsys, "--config", cfg, "prune-grants", *args)
    assert result.code == 2 and result.out == ""
    lines = result.err.strip().splitlines()
    assert len(lines) == 1 and says in lines[0] and "oauthmig prune-grants --help" in lines[0]
    assert _grant_ids(settings) == {1}


# --------------------------------------------------------------------------- revision 0005


def test_0005_downgrade_and_upgrade_again(
    rolled_out: tuple[Settings, str], capsys: pytest.CaptureFixture[str]
) -> None:
    settings, cfg = rolled_out
    g = settings.tables.grant
    assert {"consumed_at", "token_family_id"} <= columns_of(settings, "control", g)
    down = invoke(capsys, "--config", cfg, "downgrade", "--to", "0004")
    assert down.code == 0, down.err
    assert not {"consumed_at", "token_family_id"} & columns_of(settings, "control", g)
    assert not {"jwks_uri", "logo_uri"} & columns_of(
        settings, "control", settings.tables.application
    )
    assert _version(settings, "control") == _version(settings, "shard") == ["0004"]
    assert "0005" not in _log(settings, "control")
    up = invoke(capsys, "--config", cfg, "upgrade")
    assert up.code == 0, up.err
    assert {"consumed_at", "token_family_id"} <= columns_of(settings, "control", g)
    assert _log(settings, "control")["0005"] == ("applied", "grant", None)
    assert _log(settings, "shard")["0005"] == ("skipped", "", None)


def test_0005_adopts_an_existing_column_and_keeps_it_on_downgrade(
    make_database: DatabaseFactory, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = routed_config(make_database("control"), make_database("shard"))
    settings = settings_from_mapping(data, {}, "test")
    create_legacy(settings)
    cfg = write_config(tmp_path / "oauthmig.toml", data)
    g = settings.tables.grant
    postgres = settings.databases["control"].dialect == "postgresql"
    kind = "TIMESTAMP WITH TIME ZONE" if postgres else "DATETIME"
    engine = make_engine(settings.databases["control"], settings)
    try:
        with engine.begin() as conn:
            conn.execute(text(f"ALTER TABLE {g} ADD COLUMN consumed_at {kind}"))
    finally:
        engine.dispose()
    assert invoke(capsys, "--config", cfg, "upgrade").code == 0
    assert invoke(capsys, "--config", cfg, "backfill").code == 0
    assert invoke(capsys, "--config", cfg, "upgrade").code == 0
    assert _log(settings, "control")["0005"] == ("applied", "grant", "grant.consumed_at")
    assert invoke(capsys, "--config", cfg, "downgrade", "--to", "0004").code == 0
    cols = columns_of(settings, "control", g)
    assert "consumed_at" in cols and "token_family_id" not in cols


def test_0005_refuses_an_incompatible_column(
    make_database: DatabaseFactory, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = routed_config(make_database("control"), make_database("shard"))
    settings = settings_from_mapping(data, {}, "test")
    create_legacy(settings)
    cfg = write_config(tmp_path / "oauthmig.toml", data)
    engine = make_engine(settings.databases["control"], settings)
    try:
        with engine.begin() as conn:
            conn.execute(
                text(f"ALTER TABLE {settings.tables.grant} ADD COLUMN token_family_id INTEGER")
            )
    finally:
        engine.dispose()
    assert invoke(capsys, "--config", cfg, "upgrade").code == 0
    assert invoke(capsys, "--config", cfg, "backfill").code == 0
    result = invoke(capsys, "--config", cfg, "upgrade")
    assert result.code == 2
    assert "column sentry_apigrant.token_family_id exists as integer, expected uuid" in result.err
    assert "Traceback" not in result.err


def test_offline_sql_of_0005_and_0006_applies(
    rolled_out: tuple[Settings, str], capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """``upgrade --sql --from 0004`` on databases at 0004: psql / sqlite3 -bail apply it, and
    the tables and revision log are what the online upgrade made."""
    settings, cfg = rolled_out
    tables = (("control", "grant"), ("control", "application"), ("shard", "token"))
    online_columns = {
        (db, t): columns_of(settings, db, settings.tables.physical(t)) for db, t in tables
    }
    online_log = {db: _log(settings, db) for db in ("control", "shard")}
    assert invoke(capsys, "--config", cfg, "downgrade", "--to", "0004").code == 0
    out = tmp_path / "sql"
    result = invoke(
        capsys, "--config", cfg, "upgrade", "--sql", "--from", "0004", "--output-dir", str(out)
    )
    assert result.code == 0, result.err
    for db in ("control", "shard"):
        applied = _apply(settings, db, out / f"{db}.sql")
        assert applied.returncode == 0, applied.stderr
        assert _version(settings, db) == ["0007"]
        outcomes = {r: v[:2] for r, v in _log(settings, db).items()}
        assert outcomes == {r: v[:2] for r, v in online_log[db].items()}
    for db, t in tables:
        assert columns_of(settings, db, settings.tables.physical(t)) == online_columns[(db, t)]


def test_one_prune_run_per_database(
    rolled_out: tuple[Settings, str], capsys: pytest.CaptureFixture[str]
) -> None:
    settings, cfg = rolled_out
    _legacy_grants(settings, [(1, datetime(2020, 1, 1, tzinfo=UTC), None)])
    db = settings.databases["control"]
    engine = make_engine(db, settings)
    try:
        with engine.connect() as conn, exclusive_run(conn, db, "prune-grants"):
            busy = invoke(capsys, "--config", cfg, "prune-grants")
            dry = invoke(capsys, "--config", cfg, "prune-grants", "--dry-run")
    finally:
        engine.dispose()
    assert busy.code == 2 and "another oauthmig prune-grants run holds the lock" in busy.err
    assert len(busy.err.strip().splitlines()) == 1 and "Traceback" not in busy.err
    assert dry.code == 0, dry.err  # a dry run writes nothing and takes no lock
    assert _grant_ids(settings) == {1}
    assert invoke(capsys, "--config", cfg, "prune-grants").code == 0
    assert _grant_ids(settings) == set()


def test_exchanged_codes_are_not_live_grants(
    rolled_out: tuple[Settings, str], capsys: pytest.CaptureFixture[str]
) -> None:
    """status counts, and RU103 checks, only grants that can still be exchanged: a consumed
    code kept for replay detection is neither."""
    settings, cfg = rolled_out
    now = datetime.now(UTC)
    later = now + timedelta(minutes=9)
    _legacy_grants(settings, [(1, later, None), (2, later, now), (3, later, now)])
    engine = make_engine(settings.databases["control"], settings)
    try:
        with engine.begin() as conn:  # bound to URIs app 1 does not register (RU103)
            conn.execute(
                text(f"UPDATE {settings.tables.grant} SET redirect_uri = :u WHERE id > 1"),
                {"u": "https://gone.example/cb"},
            )
    finally:
        engine.dispose()
    status = invoke(capsys, "--config", cfg, "status", "--format", "json")
    assert status.code == 0, status.err
    control = next(d for d in json.loads(status.out)["databases"] if d["database"] == "control")
    assert (control["live_grants"], control["live_grants_without_pkce"]) == (1, 1)
    audit = invoke(capsys, "--config", cfg, "audit-redirects", "--format", "json")
    document = json.loads(audit.out)
    assert not [f for f in document["findings"] if f["code"] == "RU103"]
    assert document["summary"]["live_grants_checked"] == 1
