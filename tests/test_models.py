"""The models library on real SQLite and PostgreSQL: PKCE, redirect binding, rotation, reuse
detection, registration, and (PostgreSQL) concurrent rotation with two real connections."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import (
    BigInteger,
    Column,
    MetaData,
    String,
    Table,
    create_engine,
    event,
    func,
    insert,
    inspect,
    select,
    text,
)
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.engine.interfaces import DBAPICursor
from sqlalchemy.orm import Session

from oauthmig.config import Settings, TableNames
from oauthmig.db import make_engine
from oauthmig.errors import InvalidGrant, InvalidRequest, ModelsSchemaError
from oauthmig.legacy import SENTRY_COLUMNS
from oauthmig.provider.models import (
    DEFAULT_MODELS,
    EXPANDED_COLUMNS,
    GRANT_REDIRECT_URI_LENGTH,
    LATER_COLUMNS,
    MAX_GRACE_SECONDS,
    OPTIONAL_COLUMNS,
    ApplicationModel,
    GrantModel,
    IssuedToken,
    OAuthModels,
    TokenModel,
    build_models,
    check_models,
    client_metadata,
    exchange_code,
    find_active_token,
    hash_token,
    new_grant,
    revoke_family,
    rotate_refresh_token,
    set_redirect_uris,
    validate_redirect_uris,
)
from oauthmig.provider.pkce import s256_challenge
from oauthmig.rollout import runner
from tests.helpers import create_migrated_sentry_shape, wait_for_lock_wait
from tests.helpers.databases import DatabaseFactory, create_legacy

# RFC 7636 Appendix B.
VERIFIER = "dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk"
CHALLENGE = "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM"
REDIRECT = "https://app.example.com/oauth/callback"
T0 = datetime(2030, 1, 1, 12, 0, tzinfo=UTC)

M = DEFAULT_MODELS
Application, Grant, Token = M.Application, M.Grant, M.Token
#: Columns of Sentry's tables that the models do not map.
SENTRY_UNMANAGED = {
    "sentry_apiapplication": {"requires_org_level_access"},
    "sentry_apigrant": {"scopes"},
    "sentry_apitoken": {"scopes", "scoping_organization_id", "name"},
}
#: What a Sentry caller passes for the grant's ``scopes bigint NOT NULL`` (legacy bit field).
GRANT_EXTRA: Mapping[str, Any] = {"scopes": 0}


# --------------------------------------------------------------------------- fixtures / helpers


@pytest.fixture
def engine(make_database: DatabaseFactory) -> Iterator[Engine]:
    """A fresh database with the tables of a Sentry install after the expand revisions: the
    columns the models map plus Sentry's own (``scopes bigint NOT NULL`` without default on
    grant and token, ...), users, deferrable FKs."""
    eng = create_engine(make_database("models"))
    create_migrated_sentry_shape(eng, M)
    yield eng
    eng.dispose()


@pytest.fixture
def session(engine: Engine) -> Iterator[Session]:
    with Session(engine) as s:
        yield s


def add_application(
    session: Session, models: OAuthModels = M, *, client_id: str = "client-1"
) -> ApplicationModel:
    app = models.Application(
        client_id=client_id,
        client_secret=None,
        name="App",
        redirect_uris=REDIRECT,
        scopes=["project:read"],
        date_added=T0,
    )
    session.add(app)
    session.commit()
    return app


@pytest.fixture
def app(session: Session) -> ApplicationModel:
    return add_application(session)


def grant_count(session: Session, models: OAuthModels = M) -> int:
    """Grants whose code can still be exchanged: rows not yet consumed (revision 0005 keeps a
    consumed grant, marked; without 0005 the row is deleted)."""
    G = models.Grant
    query = select(func.count()).select_from(G)
    if "consumed_at" in {
        c["name"] for c in inspect(session.connection()).get_columns(models.tables.grant)
    }:
        query = query.where(G.consumed_at.is_(None))
    return session.scalar(query) or 0


def tokens(session: Session, models: OAuthModels = M) -> list[TokenModel]:
    session.expire_all()
    return list(session.scalars(select(models.Token).order_by(models.Token.id)))


def issue(
    session: Session,
    app: ApplicationModel,
    models: OAuthModels = M,
    extra: Mapping[str, Any] | None = None,
) -> IssuedToken:
    """A token issued through the full authorization-code flow with S256 (``extra``: the
    grant's unmanaged columns; Sentry's ``scopes`` by default)."""
    extra = GRANT_EXTRA if extra is None and models is M else extra
    grant = new_grant(
        session,
        extra=extra,
        application=app,
        user_id=7,
        redirect_uri=REDIRECT,
        scopes=["project:read"],
        code_challenge=CHALLENGE,
        code_challenge_method="S256",
        models=models,
    )
    return exchange_code(
        session,
        application=app,
        code=grant.code,
        redirect_uri=REDIRECT,
        code_verifier=VERIFIER,
        models=models,
    )


def sentry_token_table(models: OAuthModels = M) -> Table:
    """The token table with the models' columns and Sentry's unmanaged ones, for inserting
    rows the way the provider itself writes them."""
    mapped = models.mapped_table("token")
    return Table(
        mapped.name,
        MetaData(),
        *[Column(c.name, c.type, primary_key=c.primary_key) for c in mapped.columns],
        Column("scopes", BigInteger),
        Column("scoping_organization_id", BigInteger),
        Column("name", String(255)),
    )


def legacy_token(
    session: Session,
    app: ApplicationModel,
    *,
    refresh: str = "legacy-refresh",
    family: uuid.UUID | None = None,
    **extra: Any,
) -> TokenModel:
    """A token row as a legacy Sentry install holds it: raw + hashed values, no family, and
    Sentry's own columns (``scopes`` bit field, scoping organization, name)."""
    values: dict[str, Any] = {
        "user_id": 7,
        "application_id": app.id,
        "token": f"access-{refresh}",
        "hashed_token": hash_token(f"access-{refresh}"),
        "refresh_token": refresh,
        "hashed_refresh_token": hash_token(refresh),
        "scope_list": ["project:read"],
        "expires_at": T0 + timedelta(days=30),
        "date_added": T0,
        "token_family_id": family,
        "scopes": 5,
        "scoping_organization_id": 42,
        "name": "legacy",
    }
    table = sentry_token_table()
    row_id = session.execute(
        insert(table).values(values | extra).returning(table.c.id)
    ).scalar_one()
    session.commit()
    row = session.get(Token, row_id)
    assert row is not None
    return row


@dataclass
class Statements:
    """SQL statements (and their row counts) that a real engine executed."""

    seen: list[tuple[str, int]] = field(default_factory=list)

    def of_kind(self, verb: str) -> list[tuple[str, int]]:
        return [(s, n) for s, n in self.seen if s.lstrip().upper().startswith(verb)]


@contextmanager
def recording(engine: Engine) -> Iterator[Statements]:
    stmts = Statements()

    def after(_conn: Connection, cursor: DBAPICursor, statement: str, *_: object) -> None:
        stmts.seen.append((statement, cursor.rowcount))

    event.listen(engine, "after_cursor_execute", after)
    try:
        yield stmts
    finally:
        event.remove(engine, "after_cursor_execute", after)


# --------------------------------------------------------------------------- schema


def test_models_work_on_a_database_migrated_by_upgrade(routed_settings: Settings) -> None:
    """A plain upgrade stops before the gated finalize: the expand revisions 0001-0003 are in,
    0005 and 0006 (after 0004) are not, and the models work without them."""
    create_legacy(routed_settings)
    result = runner.upgrade(routed_settings)
    assert result.failed == ()
    assert {run.reached for run in result.runs} == {"0003"}
    eng = make_engine(routed_settings.databases["control"], routed_settings)
    try:
        insp = inspect(eng)
        for logical in ("application", "grant", "token"):
            table = M.mapped_table(logical)
            reflected = {c["name"] for c in insp.get_columns(table.name)}
            later = set(OPTIONAL_COLUMNS.get(logical, {}))
            # The live tables are Sentry's: every mapped column but those of 0005/0006, plus
            # Sentry's own.
            assert reflected >= set(table.columns.keys()) - later, table.name
            assert not reflected & later
            assert reflected - set(table.columns.keys()) == SENTRY_UNMANAGED[table.name]
        # Sentry's grant.scopes is NOT NULL without default: the calls below pass it in extra.
        sentry = build_models(supplied_by_caller={"grant": ["scopes"]})
        check_models(eng, sentry)
        with pytest.raises(
            ModelsSchemaError, match=r"consumed_at, token_family_id \(revision 0005"
        ):
            check_models(eng, sentry, require=("0005",))
        with Session(eng) as s:
            app = add_application(s)
            first = issue(s, app)
            # Without 0005 an exchanged code is deleted, as before replay detection existed.
            assert grant_count(s) == 0
            assert client_metadata(app).get("jwks_uri") is None
            second = rotate_refresh_token(s, first.refresh_token or "")
            assert find_active_token(s, second.access_token) is not None
            with pytest.raises(InvalidGrant):
                rotate_refresh_token(s, first.refresh_token or "")
            rows = tokens(s)
            assert [r.revoked_reason for r in rows] == ["reuse_detected"] * 2
            assert rows[1].parent_token_id == rows[0].id
            assert rows[0].token_family_id == rows[1].token_family_id is not None
            assert rows[0].refresh_token_rotated_at is not None
            assert rows[0].refresh_token_rotated_at.tzinfo is UTC
    finally:
        eng.dispose()


def test_build_models_uses_configured_table_names(make_database: DatabaseFactory) -> None:
    names = TableNames(application="oauth_clients", grant="oauth_codes", token="oauth_tokens")
    models = build_models(names)
    assert models.metadata is not M.metadata
    assert {t.name for t in models.metadata.sorted_tables} == {
        "oauth_clients",
        "oauth_codes",
        "oauth_tokens",
    }
    eng = create_engine(make_database("custom"))
    try:
        models.metadata.create_all(eng)
        assert set(inspect(eng).get_table_names()) == {
            "oauth_clients",
            "oauth_codes",
            "oauth_tokens",
        }
        with Session(eng) as s:
            app = add_application(s, models)
            first = issue(s, app, models)
            second = rotate_refresh_token(s, first.refresh_token or "", models=models)
            rows = tokens(s, models)
            assert [r.id for r in rows] == [first.token_id, second.token_id]
            assert rows[1].parent_token_id == rows[0].id
    finally:
        eng.dispose()


def test_models_map_the_legacy_declaration_and_annotate_every_column() -> None:
    """One declaration: the mapped columns are the legacy ones marked ``mapped`` plus the
    expanded ones, typed like the legacy schema, and each base class annotates exactly those."""
    for logical, base in (
        ("application", ApplicationModel),
        ("grant", GrantModel),
        ("token", TokenModel),
    ):
        mapped = M.mapped_table(logical)
        legacy = [c for c in SENTRY_COLUMNS[logical] if c.mapped]
        expected = [
            "id",
            *(c.name for c in legacy),
            *(n for n, _ in EXPANDED_COLUMNS[logical]),
            *(n for n, _ in LATER_COLUMNS.get(logical, ())),
        ]
        assert [c.name for c in mapped.columns] == expected, logical
        assert list(base.__annotations__) == expected, logical
        for col in legacy:
            assert mapped.c[col.name].nullable == col.nullable, (logical, col.name)
            assert str(mapped.c[col.name].type) == str(col.type_), (logical, col.name)
        unmapped = {c.name for c in SENTRY_COLUMNS[logical] if not c.mapped}
        assert not unmapped & set(mapped.c.keys()), logical
    uri_type = M.mapped_table("grant").c.redirect_uri.type
    assert isinstance(uri_type, String) and uri_type.length == GRANT_REDIRECT_URI_LENGTH


# --------------------------------------------------------------------------- PKCE


def test_rfc7636_appendix_b_exchange(session: Session, app: ApplicationModel) -> None:
    issued = issue(session, app)
    assert grant_count(session) == 0  # consumed on success
    (row,) = tokens(session)
    assert row.hashed_token == hash_token(issued.access_token)
    assert row.hashed_refresh_token == hash_token(issued.refresh_token or "")
    assert row.token_family_id is not None and row.parent_token_id is None
    assert (issued.token_id, issued.token_family_id) == (row.id, row.token_family_id)
    assert row.application_id == app.id and row.user_id == 7
    body = issued.response(now=row.date_added)
    assert body["token_type"] == "bearer" and body["scope"] == "project:read"
    assert body["expires_in"] == 30 * 24 * 3600
    assert issued.access_token not in repr(issued)
    assert (issued.refresh_token or "") not in repr(issued)


def pkce_grant(
    session: Session,
    app: ApplicationModel,
    verifier: str = VERIFIER,
    *,
    method: str | None = "S256",
    allow_plain: bool = False,
) -> str:
    challenge = s256_challenge(verifier) if method == "S256" else verifier
    grant = new_grant(
        session,
        extra=GRANT_EXTRA,
        application=app,
        user_id=7,
        redirect_uri=REDIRECT,
        scopes=["project:read"],
        code_challenge=challenge,
        code_challenge_method=method,
        allow_plain=allow_plain,
    )
    return grant.code


@pytest.mark.parametrize(
    "length, ok",
    [(42, False), (43, True), (128, True), (129, False)],
    ids=["42-rejected", "43-accepted", "128-accepted", "129-rejected"],
)
def test_verifier_length_at_exchange(
    session: Session, app: ApplicationModel, length: int, ok: bool
) -> None:
    verifier = ("Az09-._~" * 20)[:length]
    code = pkce_grant(session, app, verifier)
    if ok:
        exchange_code(
            session, application=app, code=code, redirect_uri=REDIRECT, code_verifier=verifier
        )
        assert len(tokens(session)) == 1
    else:
        with pytest.raises(InvalidRequest):
            exchange_code(
                session, application=app, code=code, redirect_uri=REDIRECT, code_verifier=verifier
            )
        assert tokens(session) == []
    assert grant_count(session) == 0


@pytest.mark.parametrize(
    "verifier, error",
    [
        (VERIFIER[:-1] + "+", InvalidRequest),
        (VERIFIER[:-1] + "=", InvalidRequest),
        (VERIFIER[:-1] + "é", InvalidRequest),
        (VERIFIER[:-1] + "A", InvalidGrant),
    ],
    ids=["plus", "equals", "non-ascii", "wrong-verifier"],
)
def test_bad_verifier_rejected_and_code_consumed(
    session: Session, app: ApplicationModel, verifier: str, error: type[Exception]
) -> None:
    code = pkce_grant(session, app)
    with pytest.raises(error):
        exchange_code(
            session, application=app, code=code, redirect_uri=REDIRECT, code_verifier=verifier
        )
    assert grant_count(session) == 0
    with pytest.raises(InvalidGrant):  # the right verifier comes too late
        exchange_code(
            session, application=app, code=code, redirect_uri=REDIRECT, code_verifier=VERIFIER
        )
    assert tokens(session) == []


@pytest.mark.parametrize(
    "challenge, method, allow_plain, stored",
    [
        (CHALLENGE, "S256", False, (CHALLENGE, "S256")),
        (VERIFIER, "plain", True, (VERIFIER, "plain")),
        (VERIFIER, None, True, (VERIFIER, "plain")),
        (None, None, False, (None, None)),
        (CHALLENGE, None, False, None),
        (VERIFIER, "plain", False, None),
        (CHALLENGE, "sha256", False, None),
        (CHALLENGE, "S512", True, None),
    ],
    ids=[
        "s256",
        "plain-allowed",
        "no-method-stored-as-plain",
        "no-pkce",
        "no-method-s256-only",
        "plain-disallowed",
        "wrong-method",
        "unknown-method",
    ],
)
def test_challenge_at_authorization(
    session: Session,
    app: ApplicationModel,
    challenge: str | None,
    method: str | None,
    allow_plain: bool,
    stored: tuple[str | None, str | None] | None,
) -> None:
    def authorize() -> str:
        return new_grant(
            session,
            extra=GRANT_EXTRA,
            application=app,
            user_id=7,
            redirect_uri=REDIRECT,
            scopes=[],
            code_challenge=challenge,
            code_challenge_method=method,
            allow_plain=allow_plain,
        ).code

    if stored is None:
        with pytest.raises(InvalidRequest):
            authorize()
        assert grant_count(session) == 0
        return
    code = authorize()
    session.expire_all()
    grant = session.scalars(select(Grant).where(Grant.code == code)).one()
    assert (grant.code_challenge, grant.code_challenge_method) == stored


def test_plain_grant_exchange_needs_plain_allowed(session: Session, app: ApplicationModel) -> None:
    code = pkce_grant(session, app, method="plain", allow_plain=True)
    exchange_code(
        session,
        application=app,
        code=code,
        redirect_uri=REDIRECT,
        code_verifier=VERIFIER,
        allow_plain=True,
    )
    code = pkce_grant(session, app, method="plain", allow_plain=True)
    with pytest.raises(InvalidGrant):  # policy tightened between authorization and exchange
        exchange_code(
            session, application=app, code=code, redirect_uri=REDIRECT, code_verifier=VERIFIER
        )
    assert grant_count(session) == 0 and len(tokens(session)) == 1


def test_stored_challenge_with_null_method_is_plain(
    session: Session, app: ApplicationModel
) -> None:
    # A challenge column adopted from a provider's own migration may hold NULL methods; RFC
    # 7636 §4.3 says an absent method is "plain".
    codes = [pkce_grant(session, app, method="plain", allow_plain=True) for _ in range(2)]
    session.execute(text(f"UPDATE {M.tables.grant} SET code_challenge_method = NULL"))
    session.commit()
    exchange_code(
        session,
        application=app,
        code=codes[0],
        redirect_uri=REDIRECT,
        code_verifier=VERIFIER,
        allow_plain=True,
    )
    with pytest.raises(InvalidGrant, match=r"RFC 7636 §4\.3 defines as plain.*S256 only"):
        exchange_code(
            session, application=app, code=codes[1], redirect_uri=REDIRECT, code_verifier=VERIFIER
        )
    assert grant_count(session) == 0 and len(tokens(session)) == 1


def test_require_pkce_at_authorization(session: Session, app: ApplicationModel) -> None:
    with pytest.raises(InvalidRequest):
        new_grant(
            session,
            extra=GRANT_EXTRA,
            application=app,
            user_id=7,
            redirect_uri=REDIRECT,
            scopes=[],
            require_pkce=True,
        )
    assert grant_count(session) == 0


def test_downgrade_verifier_without_stored_challenge(
    session: Session, app: ApplicationModel
) -> None:
    code = new_grant(
        session, extra=GRANT_EXTRA, application=app, user_id=7, redirect_uri=REDIRECT, scopes=[]
    ).code
    with pytest.raises(InvalidGrant) as info:
        exchange_code(
            session, application=app, code=code, redirect_uri=REDIRECT, code_verifier=VERIFIER
        )
    assert info.value.error == "invalid_grant"
    assert grant_count(session) == 0 and tokens(session) == []


def test_challenge_without_verifier(session: Session, app: ApplicationModel) -> None:
    code = pkce_grant(session, app)
    with pytest.raises(InvalidRequest):
        exchange_code(
            session, application=app, code=code, redirect_uri=REDIRECT, code_verifier=None
        )
    assert grant_count(session) == 0 and tokens(session) == []


def test_grant_without_pkce_exchanges_without_verifier(
    session: Session, app: ApplicationModel
) -> None:
    code = new_grant(
        session, extra=GRANT_EXTRA, application=app, user_id=7, redirect_uri=REDIRECT, scopes=[]
    ).code
    issued = exchange_code(session, application=app, code=code, redirect_uri=REDIRECT)
    assert find_active_token(session, issued.access_token) is not None


# --------------------------------------------------------------------------- redirect binding


@pytest.mark.parametrize(
    "presented",
    [
        REDIRECT + "/",
        REDIRECT.replace("app.example.com", "App.example.com"),
        REDIRECT.replace("callback", "Callback"),
        "https://app.example.com:443/oauth/callback",
        REDIRECT + "?",
        None,
    ],
    ids=["trailing-slash", "host-case", "path-case", "default-port", "empty-query", "missing"],
)
def test_redirect_binding_mismatch_consumes_code(
    session: Session, app: ApplicationModel, presented: str | None
) -> None:
    code = pkce_grant(session, app)
    with pytest.raises(InvalidGrant):
        exchange_code(
            session, application=app, code=code, redirect_uri=presented, code_verifier=VERIFIER
        )
    assert grant_count(session) == 0
    with pytest.raises(InvalidGrant):
        exchange_code(
            session, application=app, code=code, redirect_uri=REDIRECT, code_verifier=VERIFIER
        )
    assert tokens(session) == []


def test_code_is_single_use_expiring_and_client_bound(
    session: Session, app: ApplicationModel
) -> None:
    other = add_application(session, client_id="client-2")
    code = pkce_grant(session, app)
    issued = exchange_code(
        session, application=app, code=code, redirect_uri=REDIRECT, code_verifier=VERIFIER
    )
    assert issued.token_id is not None
    with pytest.raises(InvalidGrant):
        exchange_code(
            session, application=app, code=code, redirect_uri=REDIRECT, code_verifier=VERIFIER
        )
    code = pkce_grant(session, app)
    with pytest.raises(InvalidGrant, match="another client"):
        exchange_code(
            session, application=other, code=code, redirect_uri=REDIRECT, code_verifier=VERIFIER
        )
    code = new_grant(
        session,
        extra=GRANT_EXTRA,
        application=app,
        user_id=7,
        redirect_uri=REDIRECT,
        scopes=[],
        now=T0 - timedelta(minutes=11),
    ).code
    with pytest.raises(InvalidGrant, match="expired"):
        exchange_code(session, application=app, code=code, redirect_uri=REDIRECT, now=T0)
    with pytest.raises(InvalidRequest):
        exchange_code(session, application=app, code="", redirect_uri=REDIRECT)
    assert grant_count(session) == 0 and len(tokens(session)) == 1


# --------------------------------------------------------------------------- rotation


def test_rotation_chain_of_five(session: Session, app: ApplicationModel) -> None:
    current = issue(session, app)
    presented = [current]
    for _ in range(5):
        current = rotate_refresh_token(session, current.refresh_token or "", application=app)
        presented.append(current)
    rows = tokens(session)
    assert len(rows) == 6
    assert [r.parent_token_id for r in rows] == [None] + [r.id for r in rows[:-1]]
    assert len({r.token_family_id for r in rows}) == 1 and rows[0].token_family_id is not None
    assert all(r.refresh_token_rotated_at is not None for r in rows[:-1])
    assert rows[-1].refresh_token_rotated_at is None
    assert [r.id for r in rows] == [p.token_id for p in presented]
    assert [p.parent_token_id for p in presented] == [r.parent_token_id for r in rows]
    assert {p.token_family_id for p in presented} == {rows[0].token_family_id}
    # Old access tokens stop working at rotation, as Sentry's in-place refresh did.
    assert [find_active_token(session, p.access_token) is not None for p in presented] == [
        False
    ] * 5 + [True]


def test_legacy_token_gets_a_family_at_first_rotation(
    session: Session, app: ApplicationModel
) -> None:
    legacy = legacy_token(session, app)
    first = rotate_refresh_token(session, "legacy-refresh")
    old, new = tokens(session)
    assert old.id == legacy.id
    assert old.token_family_id is not None
    assert new.token_family_id == old.token_family_id
    assert new.parent_token_id == old.id
    second = rotate_refresh_token(session, first.refresh_token or "")
    assert second.token_family_id == old.token_family_id


def test_existing_family_is_kept(session: Session, app: ApplicationModel) -> None:
    family = uuid.uuid4()
    legacy_token(session, app, family=family)  # e.g. written by the token-families backfill
    issued = rotate_refresh_token(session, "legacy-refresh")
    assert issued.token_family_id == family
    assert {r.token_family_id for r in tokens(session)} == {family}


def test_legacy_rows_without_hashes_are_found_by_raw_value(
    session: Session, app: ApplicationModel
) -> None:
    legacy_token(
        session, app, refresh="unhashed-refresh", hashed_refresh_token=None, hashed_token=None
    )
    assert find_active_token(session, "access-unhashed-refresh", now=T0) is not None
    issued = rotate_refresh_token(session, "unhashed-refresh", now=T0)
    old, new = tokens(session)
    assert new.parent_token_id == old.id and old.refresh_token_rotated_at == T0
    assert new.hashed_refresh_token == hash_token(issued.refresh_token or "")
    # A hashed row is never matched on its raw column alone.
    legacy_token(session, app, refresh="hashed-refresh", hashed_refresh_token=hash_token("x"))
    with pytest.raises(InvalidGrant):
        rotate_refresh_token(session, "hashed-refresh")


@pytest.mark.parametrize(
    "grace, later",
    [(0, 0), (0, 5), (30, 31), (MAX_GRACE_SECONDS, 121)],
    ids=["no-grace-immediate", "no-grace", "grace-30-after", "grace-max"],
)
def test_reuse_after_grace_revokes_family_in_one_update(
    engine: Engine, session: Session, app: ApplicationModel, grace: float, later: float
) -> None:
    first = issue(session, app)
    second = rotate_refresh_token(session, first.refresh_token or "", now=T0)
    third = rotate_refresh_token(session, second.refresh_token or "", now=T0)
    other = issue(session, app)  # another family: untouched
    with recording(engine) as stmts, pytest.raises(InvalidGrant) as info:
        rotate_refresh_token(
            session,
            first.refresh_token or "",
            grace_seconds=grace,
            now=T0 + timedelta(seconds=later),
        )
    assert info.value.error == "invalid_grant"
    updates = stmts.of_kind("UPDATE")
    assert len(updates) == 1 and updates[0][1] == 3
    assert "revoked_reason" in updates[0][0]
    rows = {r.id: r for r in tokens(session)}
    for issued in (first, second, third):
        assert rows[issued.token_id].revoked_reason == "reuse_detected"
        assert rows[issued.token_id].revoked_at == T0 + timedelta(seconds=later)
    assert rows[other.token_id].revoked_at is None
    assert find_active_token(session, third.access_token) is None
    with pytest.raises(InvalidGrant, match="revoked"):
        rotate_refresh_token(session, third.refresh_token or "")
    assert len(rows) == 4 and len(tokens(session)) == 4


def test_reuse_within_grace_returns_the_same_successor(
    session: Session, app: ApplicationModel
) -> None:
    first = issue(session, app)
    second = rotate_refresh_token(session, first.refresh_token or "", grace_seconds=30, now=T0)
    again = rotate_refresh_token(
        session, first.refresh_token or "", grace_seconds=30, now=T0 + timedelta(seconds=30)
    )
    assert again.reused and not second.reused
    assert again.token_id == second.token_id
    assert (again.access_token, again.refresh_token) == (second.access_token, second.refresh_token)
    rows = tokens(session)
    assert len(rows) == 2 and all(r.revoked_at is None for r in rows)
    # After the grace period the same presentation is reuse.
    with pytest.raises(InvalidGrant):
        rotate_refresh_token(
            session, first.refresh_token or "", grace_seconds=30, now=T0 + timedelta(seconds=31)
        )
    assert all(r.revoked_reason == "reuse_detected" for r in tokens(session))


def test_within_grace_but_successor_already_used_is_reuse(
    session: Session, app: ApplicationModel
) -> None:
    first = issue(session, app)
    second = rotate_refresh_token(session, first.refresh_token or "", now=T0)
    rotate_refresh_token(session, second.refresh_token or "", now=T0)
    with pytest.raises(InvalidGrant):
        rotate_refresh_token(
            session, first.refresh_token or "", grace_seconds=60, now=T0 + timedelta(seconds=1)
        )
    assert [r.revoked_reason for r in tokens(session)] == ["reuse_detected"] * 3


@pytest.mark.parametrize("grace", [-1, MAX_GRACE_SECONDS + 0.001, 600])
def test_grace_is_capped(session: Session, app: ApplicationModel, grace: float) -> None:
    first = issue(session, app)
    with pytest.raises(ValueError, match="grace_seconds"):
        rotate_refresh_token(session, first.refresh_token or "", grace_seconds=grace)
    assert len(tokens(session)) == 1


def test_family_of_1000_revoked_in_one_statement(
    engine: Engine, session: Session, app: ApplicationModel
) -> None:
    family, stranger = uuid.uuid4(), uuid.uuid4()
    rows = [
        {
            "user_id": 7,
            "application_id": app.id,
            "token": f"a{i}",
            "hashed_token": hash_token(f"a{i}"),
            "refresh_token": f"r{i}",
            "hashed_refresh_token": hash_token(f"r{i}"),
            "scope_list": ["project:read"],
            "date_added": T0,
            "token_family_id": stranger if i == 1000 else family,
            "refresh_token_rotated_at": T0 if i < 999 else None,
            "scopes": 0,
        }
        for i in range(1001)
    ]
    session.execute(insert(sentry_token_table()), rows)
    session.commit()
    with recording(engine) as stmts, pytest.raises(InvalidGrant):
        rotate_refresh_token(session, "r0", now=T0 + timedelta(seconds=1))
    updates = stmts.of_kind("UPDATE")
    assert len(updates) == 1 and updates[0][1] == 1000
    revoked = session.scalars(
        select(func.count()).select_from(Token).where(Token.revoked_reason == "reuse_detected")
    ).one()
    assert revoked == 1000
    assert session.scalars(select(Token.revoked_at).where(Token.token == "a1000")).one() is None


def test_revoked_token_cannot_rotate(session: Session, app: ApplicationModel) -> None:
    first = issue(session, app)
    family = first.token_family_id
    assert family is not None
    assert revoke_family(session, family, reason="logout") == 1
    with pytest.raises(InvalidGrant, match="revoked"):
        rotate_refresh_token(session, first.refresh_token or "")
    (row,) = tokens(session)
    assert row.revoked_reason == "logout" and row.refresh_token_rotated_at is None
    with pytest.raises(ValueError):
        revoke_family(session, family, reason="bored")


def test_unknown_empty_or_foreign_refresh_token(session: Session, app: ApplicationModel) -> None:
    other = add_application(session, client_id="client-2")
    first = issue(session, app)
    with pytest.raises(InvalidGrant):
        rotate_refresh_token(session, "no-such-token")
    with pytest.raises(InvalidRequest):
        rotate_refresh_token(session, "")
    with pytest.raises(InvalidGrant, match="another client"):
        rotate_refresh_token(session, first.refresh_token or "", application=other)
    (row,) = tokens(session)
    assert row.refresh_token_rotated_at is None and row.revoked_at is None


def test_timestamps_round_trip_as_utc(session: Session, app: ApplicationModel) -> None:
    legacy_token(session, app)
    rotate_refresh_token(
        session, "legacy-refresh", now=datetime(2030, 1, 1, 13, 0, tzinfo=UTC).astimezone()
    )
    old, new = tokens(session)
    assert old.refresh_token_rotated_at == datetime(2030, 1, 1, 13, 0, tzinfo=UTC)
    assert old.refresh_token_rotated_at is not None
    assert old.refresh_token_rotated_at.tzinfo is UTC and new.date_added.tzinfo is UTC
    with pytest.raises(ValueError, match="aware"):
        rotate_refresh_token(session, "x", now=datetime(2030, 1, 1))


# --------------------------------------------------------------------------- registration


def test_registration_stores_normalized_uris(session: Session, app: ApplicationModel) -> None:
    reports = set_redirect_uris(
        app,
        [
            "HTTPS://App.Example.com:443/cb",
            "https://app.example.com/cb",
            "https://app.example.com/other",
        ],
        "web",
    )
    assert [r.verdict for r in reports] == ["pass"] * 3
    session.commit()
    session.expire_all()
    stored = session.get(Application, app.id)
    assert stored is not None
    assert stored.redirect_uri_list == [
        "https://app.example.com/cb",
        "https://app.example.com/other",
    ]
    assert stored.application_type == "web"


@pytest.mark.parametrize(
    "uris, app_type, codes",
    [
        (["http://app.example.com/cb"], "web", ["RU008"]),
        (["https://app.example.com/cb", "https://*.example.com/cb"], "web", ["RU004"]),
        (["https://app.example.com/cb#frag"], "web", ["RU003"]),
        (["myapp:/cb"], "native", ["RU012"]),
        ([], "web", []),
        (["https://app.example.com/cb"], "spa", []),
    ],
    ids=["web-http", "wildcard", "fragment", "native-no-dot", "empty", "bad-app-type"],
)
def test_registration_rejects(
    session: Session, app: ApplicationModel, uris: list[str], app_type: str, codes: list[str]
) -> None:
    before = app.redirect_uris
    with pytest.raises(InvalidRequest) as info:
        set_redirect_uris(app, uris, app_type)
    for code in codes:
        assert code in info.value.description
    assert app.redirect_uris == before


def test_registration_warnings(session: Session, app: ApplicationModel) -> None:
    reports = validate_redirect_uris(["http://localhost:8080/cb"], "native")
    assert [r.verdict for r in reports] == ["warn"]
    with pytest.raises(InvalidRequest, match="RU010"):
        validate_redirect_uris(["http://localhost:8080/cb"], "native", reject_warnings=True)
    set_redirect_uris(app, ["com.example.app:/cb", "http://127.0.0.1:8080/cb"], "native")
    session.commit()
    session.expire_all()
    assert app.application_type == "native"
    assert app.redirect_uri_list == ["com.example.app:/cb", "http://127.0.0.1:8080/cb"]


# --------------------------------------------------------------------------- concurrency


@dataclass
class Interleave:
    """Makes both threads read the token before either claims it (via a real engine event)."""

    barrier: threading.Barrier | None = None
    lost_claims: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)


def _watch(engine: Engine, state: Interleave) -> Callable[..., None]:
    def after(_conn: Connection, cursor: DBAPICursor, statement: str, *_: object) -> None:
        if statement.startswith("SELECT") and "hashed_refresh_token =" in statement:
            if state.barrier is not None:
                state.barrier.wait()
        elif (
            statement.startswith("UPDATE")
            and "refresh_token_rotated_at IS NULL" in statement
            and cursor.rowcount == 0
        ):
            with state.lock:
                state.lost_claims += 1

    event.listen(engine, "after_cursor_execute", after)
    return after


@pytest.mark.parametrize("backend", ["postgresql"])
def test_concurrent_rotation_yields_one_successor(
    engine: Engine, session: Session, app: ApplicationModel
) -> None:
    state = Interleave()
    listener = _watch(engine, state)
    runs = 50
    try:
        for i in range(runs):
            forced = i % 2 == 0  # odd runs race freely
            grace = 60.0 if i % 4 in (2, 3) else 0.0
            raw = f"concurrent-{i}"
            old = legacy_token(session, app, refresh=raw, family=uuid.uuid4())
            state.barrier = threading.Barrier(2, timeout=20) if forced else None
            start = threading.Barrier(2, timeout=20)
            outcomes: list[IssuedToken | InvalidGrant] = []

            def rotate(
                raw: str = raw,
                grace: float = grace,
                start: threading.Barrier = start,
                outcomes: list[IssuedToken | InvalidGrant] = outcomes,
            ) -> None:
                with Session(engine) as s:
                    start.wait()
                    try:
                        outcomes.append(rotate_refresh_token(s, raw, grace_seconds=grace))
                    except InvalidGrant as exc:
                        outcomes.append(exc)

            threads = [threading.Thread(target=rotate) for _ in range(2)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(30)
            assert len(outcomes) == 2, f"run {i}: a thread failed unexpectedly"
            children = session.scalars(
                select(func.count()).select_from(Token).where(Token.parent_token_id == old.id)
            ).one()
            assert children == 1, f"run {i}: {children} successors"
            issued = [o for o in outcomes if isinstance(o, IssuedToken)]
            if grace:
                assert len(issued) == 2 and issued[0].token_id == issued[1].token_id
                assert issued[0].access_token == issued[1].access_token
            else:  # the second presentation is reuse: the family (both rows) is revoked
                assert len(issued) == 1
                assert (
                    session.scalars(
                        select(func.count())
                        .select_from(Token)
                        .where(
                            Token.token_family_id == old.token_family_id,
                            Token.revoked_reason == "reuse_detected",
                        )
                    ).one()
                    == 2
                )
    finally:
        event.remove(engine, "after_cursor_execute", listener)
    # Every forced run made both transactions attempt the claim; exactly one lost each time.
    assert state.lost_claims >= runs // 2


def _wait_for_lock_wait(engine: Engine) -> None:
    wait_for_lock_wait(engine, "the reuse transaction never waited for the rotation")


@pytest.mark.parametrize("backend", ["postgresql"])
def test_reuse_revocation_covers_a_rotation_in_flight(
    engine: Engine, session: Session, app: ApplicationModel
) -> None:
    """A legitimate rotation of the family's newest token is paused after claiming its row;
    meanwhile the older, already rotated token is presented again. The revocation must also
    reach the successor the paused rotation then inserts."""
    first = issue(session, app)
    second = rotate_refresh_token(session, first.refresh_token or "")
    paused, resume = threading.Event(), threading.Event()

    def after(_conn: Connection, _cursor: DBAPICursor, statement: str, *_: object) -> None:
        if (
            threading.current_thread().name == "rotation"
            and statement.startswith("UPDATE")
            and "refresh_token_rotated_at IS NULL" in statement
        ):
            paused.set()
            resume.wait(20)

    outcomes: dict[str, IssuedToken | InvalidGrant] = {}

    def present(name: str, raw: str) -> None:
        with Session(engine) as s:
            try:
                outcomes[name] = rotate_refresh_token(s, raw)
            except InvalidGrant as exc:
                outcomes[name] = exc

    event.listen(engine, "after_cursor_execute", after)
    try:
        rotation = threading.Thread(
            target=present, name="rotation", args=("rotation", second.refresh_token or "")
        )
        reuse = threading.Thread(
            target=present, name="reuse", args=("reuse", first.refresh_token or "")
        )
        rotation.start()
        assert paused.wait(20)
        reuse.start()
        _wait_for_lock_wait(engine)
        resume.set()
        rotation.join(30)
        reuse.join(30)
    finally:
        resume.set()
        event.remove(engine, "after_cursor_execute", after)
    rotated, reused = outcomes["rotation"], outcomes["reuse"]
    assert isinstance(rotated, IssuedToken)
    assert isinstance(reused, InvalidGrant)
    rows = tokens(session)
    assert len(rows) == 3
    assert [r.revoked_reason for r in rows] == ["reuse_detected"] * 3
    assert find_active_token(session, rotated.access_token) is None
