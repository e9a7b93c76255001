"""Acceptance: the example WSGI provider (examples/provider.py) driven by authlib's OAuth 2.0
client (``OAuth2Session`` over requests) on SQLite and PostgreSQL, one server per backend on
127.0.0.1 (port 0). Every error is checked as the RFC 6749 §5.2 JSON the client parses into
its ``OAuthError``."""

from __future__ import annotations

import importlib.util
import secrets
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from types import ModuleType
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import pytest
import requests
from authlib.integrations.base_client import OAuthError as ClientOAuthError
from authlib.integrations.requests_client import OAuth2Session
from sqlalchemy import create_engine, func, select
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from oauthmig.models import (
    Check,
    EnforcementPolicy,
    Mode,
    OAuthModels,
    build_models,
    hash_client_secret,
)
from oauthmig.observation_table import observation_table
from tests.helpers import create_migrated_sentry_shape
from tests.helpers.databases import DatabaseFactory

ROOT = Path(__file__).resolve().parent.parent
REDIRECT = "https://client.example.com/callback"
BOTH = ["authorization_code", "refresh_token"]


def _example() -> ModuleType:
    spec = importlib.util.spec_from_file_location("example_provider", ROOT / "examples/provider.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class _Quiet(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


@contextmanager
def _serving(app: Any) -> Iterator[str]:
    server: WSGIServer = make_server("127.0.0.1", 0, app, handler_class=_Quiet)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def _register(session: Session, models: OAuthModels, client_id: str, **columns: Any) -> None:
    session.add(
        models.Application(
            client_id=client_id,
            name=client_id,
            redirect_uris=REDIRECT,
            scopes=["project:read"],
            date_added=datetime.now(UTC),
            **columns,
        )
    )


def _clients(engine: Engine, models: OAuthModels) -> dict[str, str]:
    """The registered clients; returns their plain secrets."""
    plain = {name: f"s3cret+/={secrets.token_hex(4)}" for name in ("basic", "post", "observer")}
    plain["hashed"] = "hashed-secret"
    plain["legacy"] = "legacy-secret"
    plain["code-only"] = "code-only-secret"
    with Session(engine) as session:
        for name in ("basic", "observer"):
            _register(
                session,
                models,
                name,
                client_secret=plain[name],
                token_endpoint_auth_method="client_secret_basic",
                grant_types=BOTH,
                response_types=["code"],
            )
        _register(
            session,
            models,
            "post",
            client_secret=plain["post"],
            token_endpoint_auth_method="client_secret_post",
            grant_types=BOTH,
            response_types=["code"],
        )
        _register(
            session,
            models,
            "hashed",
            client_secret=hash_client_secret("hashed-secret", iterations=1000),
            token_endpoint_auth_method="client_secret_basic",
            grant_types=BOTH,
            response_types=["code"],
        )
        _register(
            session,
            models,
            "public",
            client_secret=None,
            token_endpoint_auth_method="none",
            grant_types=BOTH,
            response_types=["code"],
        )
        _register(
            session,
            models,
            "code-only",
            client_secret=plain["code-only"],
            token_endpoint_auth_method="client_secret_basic",
            grant_types=["authorization_code"],
            response_types=["code"],
        )
        _register(
            session,
            models,
            "refresh-only",
            client_secret=None,
            token_endpoint_auth_method="none",
            grant_types=["refresh_token"],
            response_types=["code"],
        )
        # Not backfilled yet: NULL metadata, the RFC 7591 defaults apply, nothing enforced.
        _register(session, models, "legacy", client_secret=plain["legacy"])
        session.commit()
    return plain


def _client(
    base: str, client_id: str, secret: str | None = None, method: str | None = None
) -> OAuth2Session:
    return OAuth2Session(
        client_id,
        secret,
        token_endpoint_auth_method=method,
        redirect_uri=REDIRECT,
        scope="project:read",
        code_challenge_method="S256",
    )


def _authorize(base: str, client: OAuth2Session, verifier: str) -> str:
    """The redirect the authorization endpoint answers (the user consents at once)."""
    uri, _ = client.create_authorization_url(f"{base}/authorize", code_verifier=verifier)
    answer = requests.get(uri, allow_redirects=False, timeout=30)
    assert answer.status_code == 302, answer.text
    location: str = answer.headers["Location"]
    return location


def _login(base: str, client: OAuth2Session) -> tuple[dict[str, Any], str, str]:
    verifier = secrets.token_urlsafe(48)
    location = _authorize(base, client, verifier)
    token = client.fetch_token(
        f"{base}/token", authorization_response=location, code_verifier=verifier
    )
    return dict(token), location, verifier


def _refuses(error: str, call: Any, *args: Any, **kwargs: Any) -> ClientOAuthError:
    with pytest.raises(ClientOAuthError) as caught:
        call(*args, **kwargs)
    assert caught.value.error == error, (caught.value.error, caught.value.description)
    assert caught.value.description  # the error_description the server sent
    return caught.value


def _active(base: str, token: dict[str, Any]) -> bool:
    answer = requests.get(
        f"{base}/userinfo",
        headers={"Authorization": f"Bearer {token['access_token']}"},
        timeout=30,
    )
    assert answer.status_code in (200, 401)
    return answer.status_code == 200


def _observed(engine: Engine, client_id: str, check: str) -> int:
    with Session(engine) as session:
        app_id = session.scalar(
            select(MODELS_BY_ENGINE[engine].Application.id).where(
                MODELS_BY_ENGINE[engine].Application.client_id == client_id
            )
        )
        t = observation_table
        count = session.scalar(
            select(func.coalesce(func.sum(t.c.count), 0)).where(
                t.c.application_id == app_id, t.c.check_name == check
            )
        )
    return int(count or 0)


MODELS_BY_ENGINE: dict[Engine, OAuthModels] = {}


def test_example_provider_with_authlib_client(make_database: DatabaseFactory) -> None:
    engine = create_engine(make_database("provider"))
    models = build_models(defaults={"grant": {"scopes": 0}})
    create_migrated_sentry_shape(engine, models)
    observation_table.create(engine)  # revision 0007
    MODELS_BY_ENGINE[engine] = models
    plain = _clients(engine, models)
    policy = EnforcementPolicy(
        {Check.PKCE_REQUIRED: Mode.OBSERVE},
        {"observer": {Check.REFRESH_REUSE: Mode.OBSERVE, Check.AUTH_METHOD: Mode.OBSERVE}},
    )
    example = _example()
    app = example.ExampleProvider(lambda: Session(engine), models=models, policy=policy)
    try:
        with _serving(app) as base:
            _cases(base, engine, plain)
    finally:
        MODELS_BY_ENGINE.pop(engine, None)
        engine.dispose()


def _cases(base: str, engine: Engine, plain: dict[str, str]) -> None:
    # Discovery (RFC 8414).
    meta = requests.get(f"{base}/.well-known/oauth-authorization-server", timeout=30).json()
    assert meta["issuer"] == base and meta["token_endpoint"] == f"{base}/token"
    assert meta["code_challenge_methods_supported"] == ["S256"]
    assert meta["grant_types_supported"] == BOTH and meta["response_types_supported"] == ["code"]

    # Authorization code with PKCE S256, client_secret_basic; refresh with rotation.
    basic = _client(base, "basic", plain["basic"])
    first, location, verifier = _login(base, basic)
    assert first["token_type"] == "bearer" and _active(base, first)
    second = dict(basic.refresh_token(f"{base}/token", refresh_token=first["refresh_token"]))
    assert second["refresh_token"] != first["refresh_token"] and _active(base, second)
    assert not _active(base, first)  # rotation expired the old access token

    # A replayed code: invalid_grant, and the tokens it produced are revoked.
    _refuses(
        "invalid_grant",
        basic.fetch_token,
        f"{base}/token",
        authorization_response=location,
        code_verifier=verifier,
    )
    assert not _active(base, second)

    # A reused refresh token under enforce: invalid_grant and the whole family is revoked.
    basic = _client(base, "basic", plain["basic"])
    first, _, _ = _login(base, basic)
    second = dict(basic.refresh_token(f"{base}/token", refresh_token=first["refresh_token"]))
    _refuses(
        "invalid_grant", basic.refresh_token, f"{base}/token", refresh_token=first["refresh_token"]
    )
    assert not _active(base, second)

    # ... and under observe (per client): only the stale token is refused, and recorded.
    observer = _client(base, "observer", plain["observer"])
    first, _, _ = _login(base, observer)
    second = dict(observer.refresh_token(f"{base}/token", refresh_token=first["refresh_token"]))
    _refuses(
        "invalid_grant",
        observer.refresh_token,
        f"{base}/token",
        refresh_token=first["refresh_token"],
    )
    assert _active(base, second)
    third = dict(observer.refresh_token(f"{base}/token", refresh_token=second["refresh_token"]))
    assert _active(base, third)
    assert _observed(engine, "observer", "refresh_reuse") == 1

    # client_secret_post, a hashed stored secret, and a public client (none) with PKCE.
    post = _client(base, "post", plain["post"], "client_secret_post")
    assert _active(base, _login(base, post)[0])
    hashed = _client(base, "hashed", plain["hashed"])
    assert _active(base, _login(base, hashed)[0])
    public = _client(base, "public")
    token, _, _ = _login(base, public)
    assert _active(
        base, public.refresh_token(f"{base}/token", refresh_token=token["refresh_token"])
    )

    # Not the registered method: invalid_client under enforce, recorded under observe.
    wrong = _client(base, "basic", plain["basic"], "client_secret_post")
    verifier = secrets.token_urlsafe(48)
    location = _authorize(base, wrong, verifier)
    _refuses(
        "invalid_client",
        wrong.fetch_token,
        f"{base}/token",
        authorization_response=location,
        code_verifier=verifier,
    )
    tolerated = _client(base, "observer", plain["observer"], "client_secret_post")
    assert _active(base, _login(base, tolerated)[0])
    assert _observed(engine, "observer", "auth_method") == 1
    # A public client presenting a secret, a wrong secret, an unknown client.
    for client_id, secret in (("public", "made-up"), ("basic", "wrong"), ("nobody", "x")):
        _refuses(
            "invalid_client",
            _client(base, client_id, secret).refresh_token,
            f"{base}/token",
            refresh_token="unused",
        )
    # The raw 401: RFC 6749 §5.2 JSON, WWW-Authenticate for Basic, no-store.
    raw = requests.post(
        f"{base}/token",
        data={"grant_type": "refresh_token", "refresh_token": "x"},
        auth=("basic", "wrong"),
        timeout=30,
    )
    assert raw.status_code == 401 and raw.headers["WWW-Authenticate"].startswith("Basic")
    assert raw.headers["Content-Type"] == "application/json"
    assert raw.headers["Cache-Control"] == "no-store"
    assert set(raw.json()) == {"error", "error_description"}
    assert plain["basic"] not in raw.text

    # A grant type the client did not register: unauthorized_client.
    code_only = _client(base, "code-only", plain["code-only"])
    token, _, _ = _login(base, code_only)
    _refuses(
        "unauthorized_client",
        code_only.refresh_token,
        f"{base}/token",
        refresh_token=token["refresh_token"],
    )
    refresh_only = _client(base, "refresh-only")
    verifier = secrets.token_urlsafe(48)
    location = _authorize(base, refresh_only, verifier)
    _refuses(
        "unauthorized_client",
        refresh_only.fetch_token,
        f"{base}/token",
        authorization_response=location,
        code_verifier=verifier,
    )

    # Not backfilled: the RFC 7591 defaults (client_secret_basic), no grant type enforced.
    legacy = _client(base, "legacy", plain["legacy"])
    token, _, _ = _login(base, legacy)
    assert _active(
        base, legacy.refresh_token(f"{base}/token", refresh_token=token["refresh_token"])
    )

    # pkce_required in observe: a request without PKCE still gets its code, and is recorded.
    no_pkce = OAuth2Session("public", redirect_uri=REDIRECT, scope="project:read")
    uri, _ = no_pkce.create_authorization_url(f"{base}/authorize")
    answer = requests.get(uri, allow_redirects=False, timeout=30)
    assert answer.status_code == 302 and "code=" in answer.headers["Location"]
    assert _observed(engine, "public", "pkce_required") == 1
