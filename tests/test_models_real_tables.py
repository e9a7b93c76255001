"""The models library on the provider's real tables: columns it does not manage, some NOT NULL
without a database default, Sentry's non-unique grant code, old installs (bigserial ids and
other index names), custom table names with a tenant column; and the README's adoption flow
after upgrade -> backfill -> upgrade."""

from __future__ import annotations

import base64
import itertools
import re
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from sqlalchemy import BigInteger, Column, MetaData, String, Table, create_engine, select, text
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from oauthmig.config import Settings, TableNames, settings_from_mapping
from oauthmig.db import make_engine
from oauthmig.errors import ConfigError, InvalidGrant, ModelsSchemaError
from oauthmig.legacy import LegacyFlavor
from oauthmig.provider.models import (
    DEFAULT_MODELS,
    ApplicationModel,
    OAuthModels,
    build_models,
    check_models,
    exchange_code,
    find_active_token,
    hash_token,
    new_grant,
    rotate_refresh_token,
)
from oauthmig.provider.pkce import s256_challenge
from tests.helpers import create_migrated_sentry_shape, invoke, seed_legacy, write_config
from tests.helpers.databases import DatabaseFactory, create_legacy, routed_config

REDIRECT = "https://app.example.com/oauth/callback"
VERIFIER = "dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk"
T0 = datetime(2030, 1, 1, 12, 0, tzinfo=UTC)
ROOT = Path(__file__).resolve().parent.parent
SENTRY = build_models(defaults={"grant": {"scopes": 0}})


@pytest.fixture(params=list(LegacyFlavor), ids=lambda f: f.value)
def flavor(request: pytest.FixtureRequest) -> LegacyFlavor:
    value: LegacyFlavor = request.param
    return value


@pytest.fixture
def sentry_engine(make_database: DatabaseFactory, flavor: LegacyFlavor) -> Iterator[Engine]:
    """Sentry's tables after the expand revisions (fresh or old install)."""
    eng = create_engine(make_database("sentry"))
    create_migrated_sentry_shape(eng, DEFAULT_MODELS, flavor)
    yield eng
    eng.dispose()


def _app(session: Session, models: OAuthModels = DEFAULT_MODELS) -> ApplicationModel:
    app = models.Application(
        client_id=f"client-{uuid.uuid4().hex[:8]}",
        client_secret=None,
        name="App",
        redirect_uris=REDIRECT,
        scopes=["project:read"],
        date_added=T0,
    )
    session.add(app)
    session.commit()
    return app


def _row(engine: Engine, table: str, row_id: int) -> dict[str, Any]:
    with engine.connect() as conn:
        row = conn.execute(text(f"SELECT * FROM {table} WHERE id = :i"), {"i": row_id}).one()
    return dict(row._mapping)


def test_full_flow_on_sentry_tables(sentry_engine: Engine) -> None:
    """Grant, PKCE exchange, a rotation chain, reuse detection and family revocation."""
    with Session(sentry_engine) as s:
        app = _app(s, SENTRY)
        check_models(sentry_engine, SENTRY)
        grant = new_grant(
            s,
            application=app,
            user_id=7,
            redirect_uri=REDIRECT,
            scopes=["project:read"],
            code_challenge=s256_challenge(VERIFIER),
            code_challenge_method="S256",
            organization_id=31,
            extra={"scopes": 9},
            models=SENTRY,
        )
        issued = exchange_code(
            s,
            application=app,
            code=grant.code,
            redirect_uri=REDIRECT,
            code_verifier=VERIFIER,
            models=SENTRY,
        )
        first = _row(sentry_engine, "sentry_apitoken", issued.token_id)
        # What the grant holds that the token table also has.
        assert first["scopes"] == 9 and first["scoping_organization_id"] == 31
        assert first["name"] is None
        chain = [issued]
        for _ in range(3):
            chain.append(rotate_refresh_token(s, chain[-1].refresh_token or "", models=SENTRY))
        for parent, child in itertools.pairwise(chain):
            assert child.parent_token_id == parent.token_id
            assert child.token_family_id == issued.token_family_id
            row = _row(sentry_engine, "sentry_apitoken", child.token_id)
            assert (row["scopes"], row["scoping_organization_id"]) == (9, 31)
        with pytest.raises(InvalidGrant, match="already used"):
            rotate_refresh_token(s, chain[1].refresh_token or "", models=SENTRY)
        with sentry_engine.connect() as conn:
            reasons = conn.execute(
                text("SELECT revoked_reason FROM sentry_apitoken ORDER BY id")
            ).scalars()
            assert list(reasons) == ["reuse_detected"] * 4
        assert find_active_token(s, chain[-1].access_token, models=SENTRY) is None


def test_rotating_a_legacy_token_copies_its_unmanaged_columns(sentry_engine: Engine) -> None:
    with Session(sentry_engine) as s:
        app = _app(s)
        with sentry_engine.begin() as conn:
            conn.execute(
                text(
                    "INSERT INTO sentry_apitoken (user_id, application_id, token, hashed_token, "
                    "refresh_token, hashed_refresh_token, scope_list, date_added, scopes, "
                    "scoping_organization_id, name, token_type) VALUES (8, :app, 'a', :ha, 'r', "
                    ":hr, :scopes, :now, 1025, 77, 'deploy bot', 'sntrya_')"
                ),
                {
                    "app": app.id,
                    "ha": hash_token("a"),
                    "hr": hash_token("r"),
                    "scopes": "{org:read}" if sentry_engine.dialect.name == "postgresql" else "[]",
                    "now": T0 if sentry_engine.dialect.name == "postgresql" else "2030-01-01",
                },
            )
        successor = rotate_refresh_token(s, "r", application=app, now=T0)
        row = _row(sentry_engine, "sentry_apitoken", successor.token_id)
        assert (row["scopes"], row["scoping_organization_id"], row["name"]) == (
            1025,
            77,
            "deploy bot",
        )
        assert row["user_id"] == 8 and row["token_type"] == "sntrya_"
        # Secrets, ids, lineage and timestamps are the successor's own.
        assert row["token"] != "a" and row["refresh_token"] != "r"
        assert row["parent_token_id"] is not None and row["refresh_token_rotated_at"] is None
        # extra= overrides the copy.
        third = rotate_refresh_token(
            s, successor.refresh_token or "", extra={"name": "renamed"}, now=T0
        )
        assert _row(sentry_engine, "sentry_apitoken", third.token_id)["name"] == "renamed"


def test_sentry_tables_without_a_grant_scopes_value_are_refused_at_boot(
    sentry_engine: Engine,
) -> None:
    with pytest.raises(ModelsSchemaError) as info:
        check_models(sentry_engine)
    message = str(info.value)
    assert "sentry_apigrant.scopes is NOT NULL without a default" in message
    assert "[models.defaults.grant] scopes" in message
    # The token's scopes comes from the grant (exchange) or the parent (rotation).
    assert "sentry_apitoken" not in message
    assert "\n" not in message
    with pytest.raises(ModelsSchemaError, match=r"sentry_apigrant\.scopes"):
        build_models(engine=sentry_engine)
    build_models(defaults={"grant": {"scopes": 0}}, engine=sentry_engine)
    build_models(supplied_by_caller={"grant": ["scopes"]}, engine=sentry_engine)


def test_a_required_value_missing_at_call_time_writes_nothing(sentry_engine: Engine) -> None:
    with Session(sentry_engine) as s:
        app = _app(s)
        with pytest.raises(ModelsSchemaError, match=r"sentry_apigrant: no value for scopes"):
            new_grant(s, application=app, user_id=7, redirect_uri=REDIRECT, scopes=[])
        with pytest.raises(ValueError, match="not a column"):
            new_grant(
                s,
                application=app,
                user_id=7,
                redirect_uri=REDIRECT,
                scopes=[],
                extra={"scopes": 0, "tenant": 1},
            )
        with pytest.raises(ValueError, match="set by oauthmig"):
            new_grant(
                s, application=app, user_id=7, redirect_uri=REDIRECT, scopes=[], extra={"code": "x"}
            )
    with sentry_engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM sentry_apigrant")).scalar_one() == 0


def test_an_unmanaged_token_column_nothing_fills_is_refused(
    make_database: DatabaseFactory,
) -> None:
    eng = create_engine(make_database("extra"))
    try:
        create_migrated_sentry_shape(eng, DEFAULT_MODELS)
        with eng.begin() as conn:
            conn.execute(
                text("ALTER TABLE sentry_apitoken ADD COLUMN region_code INTEGER NOT NULL")
            )
        with pytest.raises(ModelsSchemaError) as info:
            check_models(eng, SENTRY)
        assert "sentry_apitoken.region_code is NOT NULL" in str(info.value)
        fixed = build_models(defaults={"grant": {"scopes": 0}, "token": {"region_code": 3}})
        check_models(eng, fixed)
        with Session(eng) as s:
            app = _app(s, fixed)
            grant = new_grant(
                s, application=app, user_id=7, redirect_uri=REDIRECT, scopes=[], models=fixed
            )
            issued = exchange_code(
                s, application=app, code=grant.code, redirect_uri=REDIRECT, models=fixed
            )
            assert _row(eng, "sentry_apitoken", issued.token_id)["region_code"] == 3
    finally:
        eng.dispose()


def _tenant_schema(eng: Engine, names: TableNames) -> OAuthModels:
    """Custom names, created by the models, plus a NOT NULL tenant_id on grant and token."""
    models = build_models(names)
    models.metadata.create_all(eng)
    with eng.begin() as conn:
        for table in (names.grant, names.token):
            conn.execute(text(f"ALTER TABLE {table} ADD COLUMN tenant_id BIGINT NOT NULL"))
    return models


def test_custom_names_with_a_tenant_column(make_database: DatabaseFactory) -> None:
    names = TableNames(application="oauth_clients", grant="oauth_codes", token="oauth_tokens")
    eng = create_engine(make_database("tenants"))
    try:
        bare = _tenant_schema(eng, names)
        with pytest.raises(ModelsSchemaError) as info:
            check_models(eng, bare)
        assert "oauth_codes.tenant_id is NOT NULL" in str(info.value)

        # The caller passes it: the token gets the grant's tenant at exchange, then the parent's.
        by_caller = build_models(names, supplied_by_caller={"grant": ["tenant_id"]}, engine=eng)
        with Session(eng) as s:
            app = _app(s, by_caller)
            grant = new_grant(
                s,
                application=app,
                user_id=7,
                redirect_uri=REDIRECT,
                scopes=[],
                extra={"tenant_id": 12},
                models=by_caller,
            )
            issued = exchange_code(
                s, application=app, code=grant.code, redirect_uri=REDIRECT, models=by_caller
            )
            rotated = rotate_refresh_token(s, issued.refresh_token or "", models=by_caller)
            for token_id in (issued.token_id, rotated.token_id):
                assert _row(eng, "oauth_tokens", token_id)["tenant_id"] == 12

        # Or the configuration gives a default.
        settings = settings_from_mapping(
            {
                "databases": {"main": {"url": "sqlite://"}},
                "tables": {
                    "application": "oauth_clients",
                    "grant": "oauth_codes",
                    "token": "oauth_tokens",
                },
                "models": {"defaults": {"grant": {"tenant_id": 5}}},
            },
            {},
            "test",
        )
        configured = build_models(settings.tables, defaults=settings.models.defaults, engine=eng)
        with Session(eng) as s:
            app = _app(s, configured)
            grant = new_grant(
                s, application=app, user_id=7, redirect_uri=REDIRECT, scopes=[], models=configured
            )
            issued = exchange_code(
                s, application=app, code=grant.code, redirect_uri=REDIRECT, models=configured
            )
            assert _row(eng, "oauth_tokens", issued.token_id)["tenant_id"] == 5
    finally:
        eng.dispose()


def test_a_code_matching_two_grants_is_rejected_and_consumed(sentry_engine: Engine) -> None:
    """Sentry's grant code is indexed, not unique."""
    with Session(sentry_engine) as s:
        app = _app(s, SENTRY)
        one = new_grant(
            s, application=app, user_id=7, redirect_uri=REDIRECT, scopes=[], models=SENTRY
        )
        code = one.code
        with sentry_engine.begin() as conn:
            conn.execute(
                text(
                    "INSERT INTO sentry_apigrant (user_id, application_id, code, expires_at, "
                    "redirect_uri, scope_list, scopes) SELECT user_id, application_id, code, "
                    "expires_at, redirect_uri, scope_list, scopes FROM sentry_apigrant"
                )
            )
        with pytest.raises(InvalidGrant):
            exchange_code(s, application=app, code=code, redirect_uri=REDIRECT, models=SENTRY)
    with sentry_engine.connect() as conn:
        # Both rows are kept (revision 0005) and marked consumed; no token was issued.
        rows = conn.execute(text("SELECT consumed_at, token_family_id FROM sentry_apigrant")).all()
        assert len(rows) == 2
        assert all(consumed is not None and family is None for consumed, family in rows)
        assert conn.execute(text("SELECT count(*) FROM sentry_apitoken")).scalar_one() == 0


def test_the_sentry_shape_is_real(sentry_engine: Engine, flavor: LegacyFlavor) -> None:
    """What the fixtures create: FKs deferrable, _like indexes and identity/bigserial on
    PostgreSQL, a non-unique grant code everywhere."""
    from sqlalchemy import inspect

    insp = inspect(sentry_engine)
    grant_indexes = [
        i for i in insp.get_indexes("sentry_apigrant") if i["column_names"] == ["code"]
    ]
    assert grant_indexes and not any(i["unique"] for i in grant_indexes)
    assert not [
        u for u in insp.get_unique_constraints("sentry_apigrant") if u["column_names"] == ["code"]
    ]
    fks = {fk["referred_table"] for fk in insp.get_foreign_keys("sentry_apitoken")}
    assert fks == {"auth_user", "sentry_apiapplication"}
    if sentry_engine.dialect.name == "postgresql":
        with sentry_engine.connect() as conn:
            deferrable = conn.execute(
                text(
                    "SELECT bool_and(condeferrable AND condeferred) FROM pg_constraint "
                    "WHERE contype = 'f' AND conrelid = 'sentry_apitoken'::regclass"
                )
            ).scalar_one()
            assert deferrable is True
            like = conn.execute(
                text(
                    "SELECT count(*) FROM pg_indexes WHERE tablename = 'sentry_apitoken' "
                    "AND indexdef LIKE '%varchar_pattern_ops%'"
                )
            ).scalar_one()
            assert like == 4
            identity = conn.execute(
                text(
                    "SELECT is_identity FROM information_schema.columns "
                    "WHERE table_name = 'sentry_apitoken' AND column_name = 'id'"
                )
            ).scalar_one()
            assert identity == ("YES" if flavor is LegacyFlavor.FRESH else "NO")


# --------------------------------------------------------------------------- config


def _settings(models: object) -> Settings:
    return settings_from_mapping(
        {"databases": {"main": {"url": "sqlite://"}}, "models": models}, {}, "test"
    )


def test_models_defaults_config() -> None:
    settings = _settings(
        {"defaults": {"grant": {"scopes": 0}, "token": {"tags": ["a"], "x": True}}}
    )
    assert settings.models.defaults == {
        "grant": {"scopes": 0},
        "token": {"tags": ("a",), "x": True},
    }
    assert _settings({}).models.defaults == {}


@pytest.mark.parametrize(
    ("models", "message"),
    [
        ({"default": {}}, r"^models\.default: unknown key"),
        ({"defaults": {"users": {"a": 1}}}, r"^models\.defaults\.users: unknown key"),
        ({"defaults": {"grant": 1}}, r"^models\.defaults\.grant: expected a table"),
        ({"defaults": {"grant": {"bad name": 1}}}, r"^models\.defaults\.grant\.bad name: "),
        ({"defaults": {"grant": {"scopes": {"a": 1}}}}, r"^models\.defaults\.grant\.scopes: "),
        ({"defaults": {"grant": {"scopes": [1]}}}, r"^models\.defaults\.grant\.scopes: "),
    ],
    ids=["unknown-key", "unknown-table", "not-a-table", "bad-column", "nested", "int-list"],
)
def test_models_config_errors(models: object, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        _settings(models)


def test_a_default_for_a_managed_column_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"^models\.defaults\.grant\.code: oauthmig sets"):
        build_models(defaults={"grant": {"code": "x"}})


# --------------------------------------------------------------------------- README flow


def _readme_block() -> str:
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Adopting the models") :]
    match = re.search(r"```python\n(.*?)```", section, re.S)
    assert match is not None
    return match.group(1)


def test_readme_adoption_flow_runs_unchanged_after_the_rollout(
    make_database: DatabaseFactory,
    flavor: LegacyFlavor,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    data = routed_config(
        make_database("control"),
        make_database("shard"),
        models={"defaults": {"grant": {"scopes": 0}}},
    )
    settings = settings_from_mapping(data, {}, "test")
    create_legacy(settings, flavor)
    seed_legacy(settings)
    cfg = write_config(tmp_path / "oauthmig.toml", data)
    for step in (["upgrade"], ["backfill"], ["upgrade"], ["status", "--check"]):
        result = invoke(capsys, "--config", cfg, *step)
        assert result.code == 0, (step, result.err)
    monkeypatch.setenv("OAUTHMIG_CONFIG", cfg)

    engine = make_engine(settings.databases["control"], settings)
    try:
        with Session(engine) as session:
            client = session.scalars(
                select(DEFAULT_MODELS.Application).order_by(DEFAULT_MODELS.Application.id)
            ).first()
            assert client is not None
            redirect_uri = client.redirect_uri_list[0]
            namespace: dict[str, Any] = {
                "engine": engine,
                "session": session,
                "client": client,
                "user": SimpleNamespace(id=3),
                "redirect_uri": redirect_uri,
                "scopes": ["project:read"],
                "params": {
                    "response_type": "code",
                    "code_challenge": s256_challenge(VERIFIER),
                    "code_challenge_method": "S256",
                },
                "bearer": "not-a-token",
            }
            exec(compile(_readme_block(), "README.md", "exec"), namespace)
            assert namespace["token"] is None
            assert namespace["metadata"]["code_challenge_methods_supported"] == ["S256"]
            secret = client.client_secret
            basic = base64.b64encode(f"{client.client_id}:{secret}".encode()).decode()
            headers: dict[str, str] = {"Authorization": f"Basic {basic}"} if secret else {}
            form = {} if secret else {"client_id": client.client_id}
            assert namespace["authenticate"](session, headers, form).id == client.id
            models = namespace["models"]
            code = namespace["grant"].code
            endpoint = namespace["token_endpoint"]
            status, body = endpoint(
                session,
                client,
                {
                    "grant_type": "authorization_code",
                    "code": code,
                    "redirect_uri": redirect_uri,
                    "code_verifier": VERIFIER,
                },
            )
            assert status == 200, body
            status, rotated = endpoint(
                session,
                client,
                {"grant_type": "refresh_token", "refresh_token": body["refresh_token"]},
            )
            assert status == 200, rotated
            assert find_active_token(session, str(rotated["access_token"]), models=models)
            status, reused = endpoint(
                session,
                client,
                {"grant_type": "refresh_token", "refresh_token": body["refresh_token"]},
            )
            assert (status, reused["error"]) == (400, "invalid_grant")
            assert find_active_token(session, str(rotated["access_token"]), models=models) is None
            token_table = Table(
                "sentry_apitoken",
                MetaData(),
                Column("id", BigInteger),
                Column("scopes", BigInteger),
                Column("revoked_reason", String),
                Column("refresh_token", String),
            )
            rows = session.execute(
                select(token_table.c.scopes, token_table.c.revoked_reason).where(
                    token_table.c.refresh_token.in_(
                        [body["refresh_token"], rotated["refresh_token"]]
                    )
                )
            ).all()
            assert sorted(rows) == [(0, "reuse_detected"), (0, "reuse_detected")]
    finally:
        engine.dispose()


def test_rollout_round_trip_on_an_old_install(
    old_install_settings: Settings, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """bigserial ids and Django's hashed index names: upgrade -> backfill -> upgrade, then
    downgrade to base and upgrade again, with Sentry's own columns and indexes untouched."""
    from sqlalchemy import inspect

    settings = old_install_settings
    seed_legacy(settings)
    data = routed_config(
        settings.databases["control"].url or "", settings.databases["shard"].url or ""
    )
    cfg = write_config(tmp_path / "oauthmig.toml", data)

    def indexes() -> dict[str, set[tuple[str, tuple[str | None, ...]]]]:
        engine = make_engine(settings.databases["control"], settings)
        try:
            insp = inspect(engine)
            return {
                t: {(i["name"] or "", tuple(i["column_names"])) for i in insp.get_indexes(t)}
                for t in ("sentry_apigrant", "sentry_apitoken", "sentry_apiapplication")
            }
        finally:
            engine.dispose()

    before = indexes()
    for step in (
        ["upgrade"],
        ["backfill"],
        ["upgrade"],
        ["downgrade", "--to", "base"],
        ["upgrade"],
    ):
        result = invoke(capsys, "--config", cfg, *step)
        assert result.code == 0, (step, result.err)
    after = indexes()
    for table, found in before.items():
        assert found <= after[table], table  # the install's own indexes survive
    engine = make_engine(settings.databases["control"], settings)
    try:
        check_models(engine, SENTRY)
        with Session(engine) as s:
            app = s.scalars(select(SENTRY.Application).order_by(SENTRY.Application.id)).first()
            assert app is not None
            uri = app.redirect_uri_list[0]
            grant = new_grant(
                s, application=app, user_id=2, redirect_uri=uri, scopes=[], models=SENTRY
            )
            issued = exchange_code(
                s, application=app, code=grant.code, redirect_uri=uri, models=SENTRY
            )
            assert issued.token_id  # the id came from the bigserial sequence (no identity)
            legacy = (
                s.execute(
                    text(
                        "SELECT refresh_token FROM sentry_apitoken "
                        "WHERE refresh_token IS NOT NULL ORDER BY id"
                    )
                )
                .scalars()
                .first()
            )
            rotated = rotate_refresh_token(s, legacy or "", models=SENTRY)
            assert rotated.parent_token_id is not None
    finally:
        engine.dispose()
