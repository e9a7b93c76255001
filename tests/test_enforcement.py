"""The enforcement policy in the models library, on real SQLite and PostgreSQL: client
authentication, registered grant and response types, PKCE required, refresh reuse; observe mode
answers exactly as off does and records each would-be rejection in one bounded, aggregated row
per application, check and day; the policy from ``[enforcement]``; the RFC 8414 document."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from functools import partial
from typing import Any

import pytest
from sqlalchemy import create_engine, func, select
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from oauthmig.config import ClientMetadataDefaults, settings_from_mapping
from oauthmig.errors import (
    ConfigError,
    InvalidClient,
    InvalidRequest,
    OAuthError,
    UnauthorizedClient,
    UnsupportedResponseType,
)
from oauthmig.models import (
    DEFAULT_MODELS,
    DEFAULT_POLICY,
    ApplicationModel,
    Check,
    EnforcementPolicy,
    Mode,
    authenticate_client,
    authorization_server_metadata,
    exchange_code,
    hash_client_secret,
    new_grant,
    parse_basic_credentials,
    rotate_refresh_token,
)
from oauthmig.observation_table import loaded_time, observation_table, stored_time
from oauthmig.provider.observations import observation_upsert, record_observation
from oauthmig.provider.pkce import s256_challenge
from tests.helpers import create_migrated_sentry_shape
from tests.helpers.databases import DatabaseFactory

M = DEFAULT_MODELS
REDIRECT = "https://app.example.com/cb"
VERIFIER = "dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk"
GRANT_EXTRA = {"scopes": 0}
SECRET = "s3cr3t-value"
T0 = datetime(2030, 1, 1, 12, 0, tzinfo=UTC)


@pytest.fixture
def engine(make_database: DatabaseFactory) -> Iterator[Engine]:
    eng = create_engine(make_database("enforce"))
    create_migrated_sentry_shape(eng, M)
    observation_table.create(eng)  # as revision 0007 creates it
    yield eng
    eng.dispose()


def _app(session: Session, client_id: str, **columns: Any) -> ApplicationModel:
    values: dict[str, Any] = {
        "client_secret": SECRET,
        "token_endpoint_auth_method": "client_secret_basic",
        "grant_types": ["authorization_code", "refresh_token"],
        "response_types": ["code"],
    }
    values.update(columns)
    app = M.Application(
        client_id=client_id,
        name=client_id,
        redirect_uris=REDIRECT,
        scopes=[],
        date_added=T0,
        **values,
    )
    session.add(app)
    session.commit()
    return app


def _observations(engine: Engine) -> list[tuple[int, str, int]]:
    t = observation_table
    with engine.connect() as conn:
        rows = conn.execute(
            select(t.c.application_id, t.c.check_name, t.c.count).order_by(
                t.c.application_id, t.c.check_name, t.c.day
            )
        ).all()
    return [(int(a), str(c), int(n)) for a, c, n in rows]


def _grant(
    session: Session, app: ApplicationModel, policy: EnforcementPolicy = DEFAULT_POLICY
) -> Any:
    return new_grant(
        session,
        application=app,
        user_id=1,
        redirect_uri=REDIRECT,
        scopes=[],
        code_challenge=s256_challenge(VERIFIER),
        code_challenge_method="S256",
        extra=GRANT_EXTRA,
        policy=policy,
    )


def _tokens(session: Session, app: ApplicationModel, policy: EnforcementPolicy) -> Any:
    grant = _grant(session, app, policy)
    return exchange_code(
        session,
        application=app,
        code=grant.code,
        redirect_uri=REDIRECT,
        code_verifier=VERIFIER,
        policy=policy,
    )


def _outcome(call: Callable[[], Any]) -> tuple[str, str]:
    """What the caller would answer: success (the response's keys) or the error."""
    try:
        result = call()
    except OAuthError as exc:
        return exc.error, exc.description
    if hasattr(result, "response"):
        return "ok", ",".join(sorted(result.response()))
    return "ok", type(result).__name__


# Each scenario: the columns of the client, then what it does (given session, app, policy).
def _wrong_method(s: Session, app: ApplicationModel, p: EnforcementPolicy) -> Any:
    return authenticate_client(
        s, client_id=app.client_id, client_secret=SECRET, method="client_secret_post", policy=p
    )


def _unregistered_refresh(s: Session, app: ApplicationModel, p: EnforcementPolicy) -> Any:
    issued = _tokens(s, app, p)
    return rotate_refresh_token(s, issued.refresh_token, application=app, policy=p)


def _unregistered_response_type(s: Session, app: ApplicationModel, p: EnforcementPolicy) -> Any:
    return new_grant(
        s,
        application=app,
        user_id=1,
        redirect_uri=REDIRECT,
        scopes=[],
        response_type="token",
        code_challenge=s256_challenge(VERIFIER),
        code_challenge_method="S256",
        extra=GRANT_EXTRA,
        policy=p,
    )


def _no_pkce(s: Session, app: ApplicationModel, p: EnforcementPolicy) -> Any:
    return new_grant(
        s, application=app, user_id=1, redirect_uri=REDIRECT, scopes=[], extra=GRANT_EXTRA, policy=p
    )


#: Whether the family survived the last reuse scenario (its successor token unrevoked).
FAMILY_ALIVE: dict[str, bool] = {}


def _reuse(s: Session, app: ApplicationModel, p: EnforcementPolicy) -> Any:
    issued = _tokens(s, app, p)
    successor = rotate_refresh_token(s, issued.refresh_token, application=app, policy=p)
    try:
        return rotate_refresh_token(s, issued.refresh_token, application=app, policy=p)
    finally:
        s.refresh(successor.token)
        FAMILY_ALIVE[app.client_id] = successor.token.revoked_at is None


SCENARIOS: dict[Check, tuple[dict[str, Any], Callable[..., Any], str]] = {
    Check.AUTH_METHOD: ({}, _wrong_method, "invalid_client"),
    Check.GRANT_TYPES: (
        {"grant_types": ["authorization_code"]},
        _unregistered_refresh,
        "unauthorized_client",
    ),
    Check.PKCE_REQUIRED: ({}, _no_pkce, "invalid_request"),
    Check.REFRESH_REUSE: ({}, _reuse, "invalid_grant"),
}


@pytest.mark.parametrize("check", list(SCENARIOS), ids=str)
def test_observe_answers_as_off_records_what_enforce_rejects(engine: Engine, check: Check) -> None:
    columns, scenario, enforced_error = SCENARIOS[check]
    outcomes: dict[Mode, tuple[str, str]] = {}
    alive: dict[Mode, bool] = {}
    with Session(engine) as session:
        for mode in Mode:
            app = _app(session, f"{check}-{mode}", **columns)
            policy = EnforcementPolicy({check: mode})
            outcomes[mode] = _outcome(partial(scenario, session, app, policy))
            session.commit()
            alive[mode] = FAMILY_ALIVE.get(app.client_id, True)
            recorded = [(c, n) for a, c, n in _observations(engine) if a == app.id]
            assert recorded == ([(str(check), 1)] if mode is Mode.OBSERVE else []), mode
    assert outcomes[Mode.OBSERVE] == outcomes[Mode.OFF]
    assert outcomes[Mode.ENFORCE][0] == enforced_error
    assert outcomes[Mode.ENFORCE] != outcomes[Mode.OFF]
    if check is Check.REFRESH_REUSE:
        assert outcomes[Mode.OFF][0] == "invalid_grant"  # the stale token is refused anyway
        assert alive == {Mode.OFF: True, Mode.OBSERVE: True, Mode.ENFORCE: False}


def test_response_type_not_registered(engine: Engine) -> None:
    with Session(engine) as session:
        app = _app(session, "code-client")
        enforce = EnforcementPolicy({Check.GRANT_TYPES: Mode.ENFORCE})
        with pytest.raises(UnsupportedResponseType) as caught:
            _unregistered_response_type(session, app, enforce)
        assert caught.value.error == "unsupported_response_type"
        observe = EnforcementPolicy({}, {"code-client": {Check.GRANT_TYPES: Mode.OBSERVE}})
        assert _unregistered_response_type(session, app, observe).code
        # Not backfilled (NULL): not enforced.
        legacy = _app(session, "legacy", response_types=None, grant_types=None)
        assert _unregistered_response_type(session, legacy, enforce).code
        issued = _tokens(session, legacy, enforce)
        assert rotate_refresh_token(session, issued.refresh_token, application=legacy).access_token
    assert [(c, n) for _, c, n in _observations(engine)] == [("grant_types", 1)]


def test_unregistered_authorization_code_grant_keeps_the_code(engine: Engine) -> None:
    with Session(engine) as session:
        app = _app(session, "refresh-only", grant_types=["refresh_token"])
        grant = _grant(session, app)
        with pytest.raises(UnauthorizedClient):
            exchange_code(
                session,
                application=app,
                code=grant.code,
                redirect_uri=REDIRECT,
                code_verifier=VERIFIER,
            )
        observe = EnforcementPolicy({Check.GRANT_TYPES: Mode.OBSERVE})
        issued = exchange_code(
            session,
            application=app,
            code=grant.code,
            redirect_uri=REDIRECT,
            code_verifier=VERIFIER,
            policy=observe,
        )
        assert issued.access_token


def test_authenticate_client(engine: Engine) -> None:
    with Session(engine) as session:
        _app(session, "basic")
        _app(session, "post", token_endpoint_auth_method="client_secret_post")
        _app(session, "public", client_secret=None, token_endpoint_auth_method="none")
        _app(session, "hashed", client_secret=hash_client_secret("pw", iterations=1000))
        _app(session, "inactive", status=1)
        _app(session, "legacy-public", client_secret=None, token_endpoint_auth_method=None)
        _app(session, "legacy-confidential", token_endpoint_auth_method=None)
        _app(session, "no-secret", client_secret=None)  # registered basic, no secret stored

        def auth(client_id: str, secret: str | None, method: str) -> str:
            return authenticate_client(
                session, client_id=client_id, client_secret=secret, method=method
            ).client_id

        assert auth("basic", SECRET, "client_secret_basic") == "basic"
        assert auth("post", SECRET, "client_secret_post") == "post"
        assert auth("public", None, "none") == "public"
        assert auth("hashed", "pw", "client_secret_basic") == "hashed"
        assert auth("legacy-public", None, "none") == "legacy-public"
        assert auth("legacy-confidential", SECRET, "client_secret_basic") == "legacy-confidential"
        refused = [
            ("basic", "wrong", "client_secret_basic"),
            ("basic", None, "client_secret_basic"),
            ("basic", None, "none"),
            ("basic", SECRET, "client_secret_post"),
            ("post", SECRET, "client_secret_basic"),
            ("public", "made-up", "client_secret_basic"),
            ("hashed", "wrong", "client_secret_basic"),
            ("hashed", hash_client_secret("pw", iterations=1000), "client_secret_basic"),
            ("inactive", SECRET, "client_secret_basic"),
            ("nobody", SECRET, "client_secret_basic"),
            ("legacy-confidential", None, "none"),
            ("no-secret", "anything", "client_secret_basic"),
        ]
        for client_id, secret, method in refused:
            with pytest.raises(InvalidClient) as caught:
                auth(client_id, secret, method)
            assert caught.value.error == "invalid_client" and caught.value.status == 401
            assert SECRET not in str(caught.value)
        # A wrong secret is refused in every mode; only the method mismatch is relaxed.
        off = EnforcementPolicy({Check.AUTH_METHOD: Mode.OFF})
        with pytest.raises(InvalidClient):
            authenticate_client(
                session, client_id="basic", client_secret="wrong", method="client_secret_post",
                policy=off,
            )  # fmt: skip
        with pytest.raises(InvalidRequest):
            auth("public", "x", "none")
        with pytest.raises(InvalidRequest):
            auth("basic", "secret", "private_key_jwt")


def test_basic_credentials_are_parsed_as_authlib_sends_them() -> None:
    import base64

    def header(raw: str) -> str:
        return "Basic " + base64.b64encode(raw.encode()).decode()

    assert parse_basic_credentials(header("cid:se+cr%3At:x")) == ("cid", "se+cr:t:x")
    assert parse_basic_credentials("Bearer abc") is None
    assert parse_basic_credentials(None) is None
    for bad in ("Basic !!!", header("no-colon")):
        with pytest.raises(InvalidClient):
            parse_basic_credentials(bad)


def test_observe_records_stay_bounded_under_10000_requests(engine: Engine) -> None:
    """10,000 observed requests of one client over two days: one row per check and day,
    counting them all. 100 go through authenticate_client and 100 through the recorder it
    calls; to keep the test cheap the other 9,800 run the recorder's one statement as an
    executemany (every row still its own UPSERT)."""
    policy = EnforcementPolicy({Check.AUTH_METHOD: Mode.OBSERVE})
    with Session(engine) as session:
        app = _app(session, "chatty")
        app_id = app.id
        for i in range(200):
            at = T0 + timedelta(seconds=i)
            if i < 100:
                authenticate_client(
                    session,
                    client_id="chatty",
                    client_secret=SECRET,
                    method="client_secret_post",
                    policy=policy,
                    now=at,
                )
            else:
                record_observation(
                    session,
                    application_id=app_id,
                    check=Check.AUTH_METHOD,
                    now=at,
                    bind_mapper=M.Application,
                )
        session.commit()
        conn = session.connection()
        dialect = conn.dialect.name
        rows = []
        for i in range(200, 10_000):
            at = T0 + timedelta(days=i // 5_000, seconds=i)
            rows.append(
                {
                    "application_id": app_id,
                    "check_name": "auth_method",
                    "day": at.date(),
                    "seen": stored_time(at, dialect),
                }
            )
        conn.execute(observation_upsert(dialect), rows)
        session.commit()
    assert _observations(engine) == [(app_id, "auth_method", 5_000), (app_id, "auth_method", 5_000)]
    t = observation_table
    with engine.connect() as conn:
        first, last = conn.execute(select(func.min(t.c.first_seen), func.max(t.c.last_seen))).one()
    assert loaded_time(first) == T0 and loaded_time(last) == T0 + timedelta(days=1, seconds=9_999)


def test_policy_from_configuration() -> None:
    base: dict[str, Any] = {
        "databases": {"control": {"url": "sqlite:///c.sqlite3"}},
        "routing": {"application": ["control"], "grant": ["control"], "token": ["control"]},
    }
    settings = settings_from_mapping(
        {
            **base,
            "enforcement": {
                "pkce_required": "observe",
                "clients": {"cli": {"refresh_reuse": "observe", "pkce_required": "enforce"}},
            },
        },
        {},
        "test",
    )
    policy = EnforcementPolicy.from_settings(settings.enforcement)
    assert policy.mode(Check.PKCE_REQUIRED) is Mode.OBSERVE
    assert policy.mode(Check.PKCE_REQUIRED, "cli") is Mode.ENFORCE
    assert policy.mode(Check.REFRESH_REUSE, "cli") is Mode.OBSERVE
    assert policy.mode(Check.REFRESH_REUSE, "web") is Mode.ENFORCE
    assert policy.mode(Check.GRANT_TYPES) is Mode.ENFORCE
    assert EnforcementPolicy.from_settings(settings_from_mapping(base, {}, "t").enforcement) == (
        EnforcementPolicy()
    )
    bad = [
        ({"pkce_required": "strict"}, "enforcement.pkce_required: expected one of off, observe"),
        ({"pkce": "off"}, "enforcement.pkce: unknown key"),
        ({"clients": {"cli": {"reuse": "off"}}}, "enforcement.clients.cli.reuse: unknown key"),
        ({"clients": {"cli": "off"}}, "enforcement.clients.cli: expected a table"),
    ]
    for section, message in bad:
        with pytest.raises(ConfigError) as caught:
            settings_from_mapping({**base, "enforcement": section}, {}, "test")
        assert str(caught.value).startswith(message), caught.value


def test_authorization_server_metadata() -> None:
    doc = authorization_server_metadata(
        "https://auth.example.com",
        authorization_endpoint="https://auth.example.com/authorize",
        token_endpoint="https://auth.example.com/token",
        client_metadata=ClientMetadataDefaults(
            "client_secret_post", ("authorization_code", "refresh_token", "implicit"), ("code",)
        ),
        allow_plain=True,
        extra={"revocation_endpoint": "https://auth.example.com/revoke"},
    )
    assert doc["issuer"] == "https://auth.example.com"
    assert doc["grant_types_supported"] == ["authorization_code", "refresh_token"]
    assert doc["response_types_supported"] == ["code"]
    assert doc["token_endpoint_auth_methods_supported"] == ["client_secret_post", "none"]
    assert doc["code_challenge_methods_supported"] == ["S256", "plain"]
    assert doc["revocation_endpoint"] == "https://auth.example.com/revoke"
    observing = authorization_server_metadata(
        "https://a",
        authorization_endpoint="https://a/authorize",
        token_endpoint="https://a/token",
        policy=EnforcementPolicy({}, {"cli": {Check.AUTH_METHOD: Mode.OBSERVE}}),
    )
    assert observing["token_endpoint_auth_methods_supported"] == [
        "client_secret_basic",
        "client_secret_post",
        "none",
    ]
    assert observing["code_challenge_methods_supported"] == ["S256"]
