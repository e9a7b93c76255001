"""``oauthmig.models.client_metadata`` (RFC 7591 §3.2.1) on real SQLite and PostgreSQL, with
revision 0006's columns and without them."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime

import pytest
from sqlalchemy import create_engine, select, text
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from oauthmig.errors import ModelsSchemaError
from oauthmig.provider.models import (
    DEFAULT_MODELS,
    ApplicationModel,
    build_models,
    check_models,
    client_metadata,
)
from tests.helpers import create_migrated_sentry_shape
from tests.helpers.databases import DatabaseFactory

M = DEFAULT_MODELS
T0 = datetime(2030, 1, 1, 12, 0, tzinfo=UTC)
SECRET = "CANARY-client-secret-0f1e"


@pytest.fixture
def engine(make_database: DatabaseFactory) -> Iterator[Engine]:
    eng = create_engine(make_database("metadata"))
    create_migrated_sentry_shape(eng, M)
    yield eng
    eng.dispose()


def _app(session: Session, **values: object) -> ApplicationModel:
    fields: dict[str, object] = {
        "client_id": "client-1",
        "client_secret": None,
        "name": "Acme Deploy",
        "redirect_uris": "https://app.example.com/cb",
        "scopes": [],
        "date_added": T0,
    }
    fields.update(values)
    app = M.Application(**fields)
    session.add(app)
    session.commit()
    return app


def test_client_information_response(engine: Engine) -> None:
    with Session(engine) as s:
        app = _app(
            s,
            client_secret=SECRET,
            redirect_uris="HTTPS://App.Example.com:443/a/../cb\nhttps://app.example.com/cb\n"
            "\n  https://app.example.com/other \n",
            homepage_url="https://app.example.com/",
            privacy_url="https://app.example.com/privacy",
            terms_url=None,
            jwks_uri="https://app.example.com/jwks.json",
            logo_uri="https://cdn.example.com/logo.png",
            scopes=["org:read", "project:read"],
            token_endpoint_auth_method="private_key_jwt",
            grant_types=["authorization_code", "refresh_token"],
            response_types=["code"],
            application_type="web",
        )
        s.expire_all()  # a freshly loaded row: the 0006 columns are deferred
        loaded = s.get(M.Application, app.id)
        assert loaded is not None
        body = client_metadata(loaded)
    assert body == {
        "client_id": "client-1",
        "client_id_issued_at": int(T0.timestamp()),
        "client_name": "Acme Deploy",
        "application_type": "web",
        "token_endpoint_auth_method": "private_key_jwt",
        "grant_types": ["authorization_code", "refresh_token"],
        "response_types": ["code"],
        # Normalized as registration stores them; the duplicate spelling is dropped.
        "redirect_uris": ["https://app.example.com/cb", "https://app.example.com/other"],
        "scope": "org:read project:read",
        "client_uri": "https://app.example.com/",
        "policy_uri": "https://app.example.com/privacy",
        "jwks_uri": "https://app.example.com/jwks.json",
        "logo_uri": "https://cdn.example.com/logo.png",
    }
    assert SECRET not in repr(body)


def test_the_secret_only_when_asked_and_never_for_a_public_client(engine: Engine) -> None:
    with Session(engine) as s:
        confidential = _app(
            s, client_secret=SECRET, token_endpoint_auth_method="client_secret_basic"
        )
        public = _app(s, client_id="client-2", client_secret="")
        with_secret = client_metadata(confidential, include_secret=True)
        assert with_secret["client_secret"] == SECRET
        assert with_secret["client_secret_expires_at"] == 0
        assert "client_secret" not in client_metadata(confidential)
        assert "client_secret" not in client_metadata(public, include_secret=True)


def test_metadata_before_the_backfill_reports_the_rfc_defaults(engine: Engine) -> None:
    with Session(engine) as s:
        public = _app(s, redirect_uris="com.example.app:/cb\nhttp://127.0.0.1:8080/cb")
        confidential = _app(s, client_id="client-2", client_secret=SECRET)
        pub, conf = client_metadata(public), client_metadata(confidential)
    assert pub["token_endpoint_auth_method"] == "none"
    assert pub["application_type"] == "native"  # inferred from the URIs, as the backfill does
    assert conf["token_endpoint_auth_method"] == "client_secret_basic"
    assert conf["application_type"] == "web"
    for body in (pub, conf):
        assert body["grant_types"] == ["authorization_code"]
        assert body["response_types"] == ["code"]
        for absent in ("client_uri", "policy_uri", "tos_uri", "jwks_uri", "logo_uri", "scope"):
            assert absent not in body


def test_a_transient_application_needs_no_database() -> None:
    app = M.Application(
        client_id="new",
        client_secret=None,
        name="",
        redirect_uris="https://a.example/cb",
        scopes=[],
        date_added=T0,
        terms_url="https://a.example/terms",
    )
    body = client_metadata(app)
    assert body["tos_uri"] == "https://a.example/terms" and "client_name" not in body
    assert "jwks_uri" not in body


def test_without_revision_0006_the_models_load_and_leave_the_urls_out(
    make_database: DatabaseFactory,
) -> None:
    eng = create_engine(make_database("pre0006"))
    try:
        create_migrated_sentry_shape(eng, M)
        physical = M.tables.application
        with eng.begin() as conn:
            for column in ("jwks_uri", "logo_uri"):
                conn.execute(text(f"ALTER TABLE {physical} DROP COLUMN {column}"))
        models = build_models(defaults={"grant": {"scopes": 0}})
        check_models(eng, models)
        with pytest.raises(ModelsSchemaError, match=r"jwks_uri, logo_uri \(revision 0006"):
            check_models(eng, models, require=("0006",))
        with Session(eng) as s:
            # The ORM inserts and loads applications: the missing columns are never named.
            app = models.Application(
                client_id="c",
                client_secret=None,
                name="n",
                redirect_uris="https://a.example/cb",
                scopes=[],
                date_added=T0,
                homepage_url="https://a.example/",
            )
            s.add(app)
            s.commit()
            s.expire_all()
            (loaded,) = s.scalars(select(models.Application))
            body = client_metadata(loaded)
        assert body["client_uri"] == "https://a.example/"
        assert "jwks_uri" not in body and "logo_uri" not in body
    finally:
        eng.dispose()


def test_require_names_known_revisions_only(engine: Engine) -> None:
    with pytest.raises(ValueError, match="0004"):
        check_models(engine, build_models(defaults={"grant": {"scopes": 0}}), require=("0004",))
    check_models(engine, build_models(defaults={"grant": {"scopes": 0}}), require=("0005", "0006"))
