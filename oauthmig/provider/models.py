"""SQLAlchemy 2 models of the three OAuth tables after the expand revisions, and the token-endpoint
behaviours their new columns exist for (see the README, "Adopting the models").

Models
    :func:`build_models` maps the tables under the configured physical names
    (:class:`~oauthmig.config.TableNames`) on their own registry and returns an
    :class:`OAuthModels` with the classes ``Application``, ``Grant`` and ``Token``.
    :data:`DEFAULT_MODELS` (and the module-level ``Application``, ``Grant``, ``Token``) use
    Sentry's default names. The mapped columns, their types, unique constraints and indexes are
    those the legacy schema declares (:data:`oauthmig.legacy.SENTRY_COLUMNS`, the columns marked
    ``mapped``) plus what the expand revisions add, so the classes work on a database migrated
    by ``oauthmig upgrade`` as well as on one made with ``metadata.create_all``. Annotate with
    :class:`ApplicationModel`, :class:`GrantModel` and :class:`TokenModel`, which every built
    class derives from. Datetimes are timezone-aware UTC on both PostgreSQL and SQLite.
    The columns of revisions 0005 and 0006 (:data:`OPTIONAL_COLUMNS`), which run after the
    gated finalize, are deferred: the classes load and insert rows on databases without them,
    and the services fall back (see :func:`check_models`).

Services (raising :class:`~oauthmig.errors.InvalidRequest`,
:class:`~oauthmig.errors.InvalidGrant`, :class:`~oauthmig.errors.UnauthorizedClient` and
:class:`~oauthmig.errors.UnsupportedResponseType`, whose ``.error`` is the OAuth wire code;
their checks follow an :class:`~oauthmig.provider.policy.EnforcementPolicy`)
    :func:`new_grant` / :func:`store_challenge` (authorization), :func:`exchange_code` (code ->
    tokens with redirect binding and PKCE, :func:`verify_pkce`; a replayed code revokes the
    family it produced), :func:`rotate_refresh_token` (rotation with reuse detection),
    :func:`revoke_family`, :func:`find_active_token`, :func:`validate_redirect_uris` /
    :func:`set_redirect_uris` (registration), :func:`client_metadata` (the RFC 7591 client
    information response). Expired grants are purged by :func:`oauthmig.prune.prune_grants`.

Columns the models do not manage
    Live tables carry more columns than the models map (Sentry's ``scopes bigint NOT NULL``
    without default on grant and token, ``scoping_organization_id``, ``name``, ...). Rows are
    inserted with one INSERT naming every column that gets a value: rotation copies each such
    column of the parent token, code exchange copies the grant's same-named columns (and
    :data:`EXCHANGE_RENAMES`), ``extra={...}`` sets them per call, ``OAuthModels.defaults``
    (``[models.defaults.<table>]``) fills the rest; the database's defaults apply otherwise.
    :func:`check_models` (or ``build_models(..., engine=...)``) reflects each database once and
    refuses at boot what no rule covers. Indexes are never looked up by name.

Transactions
    Functions that take a ``Session`` and write **commit** it, on failure as on success: a
    consumed authorization code and a family revoked for reuse must stay so even though the
    request fails. Pass a session with no unrelated pending work and not inside
    ``session.begin()``. PostgreSQL's default READ COMMITTED isolation is assumed.

Token storage
    Like Sentry, a token row keeps the raw ``token`` / ``refresh_token`` (the legacy columns are
    ``NOT NULL`` / unique and Sentry still reads them) and their SHA-256 hex digests in
    ``hashed_token`` / ``hashed_refresh_token``; lookups go through the digests (legacy rows
    whose digest is NULL, written before Sentry added it, are matched on the raw column only).
    Because the raw values are stored, the within-grace retry of a rotated refresh token can
    hand back the
    successor's tokens: that is what makes a grace period useful to a client whose response was
    lost. Raw values are never part of a ``repr``.
"""

from __future__ import annotations

import hashlib
import secrets
import uuid
import weakref
import zlib
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, Final, NoReturn, cast

from sqlalchemy import (
    BigInteger,
    Column,
    DateTime,
    FetchedValue,
    Identity,
    Index,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
    Uuid,
    and_,
    delete,
    func,
    insert,
    inspect,
    literal,
    or_,
    select,
    text,
    update,
)
from sqlalchemy.engine import Connection, CursorResult, Dialect, Engine
from sqlalchemy.orm import (
    DeclarativeBase,
    InstrumentedAttribute,
    Mapped,
    Session,
    deferred,
    undefer,
)
from sqlalchemy.sql.elements import ColumnElement
from sqlalchemy.types import TypeDecorator, TypeEngine

from oauthmig.columns import StringList
from oauthmig.config import ColumnDefault, TableNames
from oauthmig.errors import (
    ConfigError,
    InvalidGrant,
    InvalidRequest,
    ModelsSchemaError,
    OAuthError,
    UnauthorizedClient,
    UnsupportedResponseType,
)
from oauthmig.legacy import (
    SENTRY_COLUMNS,
    SENTRY_INDEXED,
    SENTRY_UNIQUE,
    BigId,
    LegacyFlavor,
    index_name,
    sentry_column,
)
from oauthmig.provider.observations import record_observation
from oauthmig.provider.pkce import parse_code_challenge, verify_code_verifier
from oauthmig.provider.policy import DEFAULT_POLICY, Check, EnforcementPolicy, Mode
from oauthmig.redirects.metadata_rules import METADATA_URL_COLUMNS
from oauthmig.redirects.rules import (
    GRANT_REDIRECT_URI_LENGTH,
    AppType,
    UriReport,
    check_uri,
    infer_app_type,
    split_redirect_uris,
)

__all__ = [
    "ACCESS_TOKEN_TTL",
    "DEFAULT_MODELS",
    "EXPANDED_COLUMNS",
    "GRANT_REDIRECT_URI_LENGTH",
    "GRANT_TTL",
    "LATER_COLUMNS",
    "MAX_GRACE_SECONDS",
    "METADATA_URL_COLUMNS",
    "OPTIONAL_COLUMNS",
    "REVOKE_REASONS",
    "Application",
    "ApplicationModel",
    "Grant",
    "GrantModel",
    "IssuedToken",
    "OAuthModels",
    "Token",
    "TokenModel",
    "UtcDateTime",
    "build_models",
    "check_models",
    "check_redirect_binding",
    "client_metadata",
    "exchange_code",
    "find_active_token",
    "hash_token",
    "new_grant",
    "revoke_family",
    "rotate_refresh_token",
    "set_redirect_uris",
    "store_challenge",
    "validate_redirect_uris",
    "verify_pkce",
]

#: Authorization codes live 10 minutes (RFC 6749 §4.1.2 recommends at most 10).
GRANT_TTL: Final = timedelta(minutes=10)
#: Sentry's default access-token lifetime.
ACCESS_TOKEN_TTL: Final = timedelta(days=30)
#: Upper bound of the reuse grace period; larger values raise ValueError.
MAX_GRACE_SECONDS: Final = 120.0
#: Values of ``token.revoked_reason``; ``code_replay``: the authorization code that started the
#: family was presented again (RFC 6749 §4.1.2). No CHECK constrains the column (finalize 0004
#: adds none for it); at most 32 characters (``varchar(32)``, revision 0002).
REVOKE_REASONS: Final = ("reuse_detected", "code_replay", "logout", "admin")
#: Columns of later expand revisions that the models use when present and do without otherwise
#: (logical table -> column -> revision): see :func:`check_models`.
OPTIONAL_COLUMNS: Final[Mapping[str, Mapping[str, str]]] = {
    "grant": {"consumed_at": "0005", "token_family_id": "0005"},
    "application": {"jwks_uri": "0006", "logo_uri": "0006"},
}
# token.token_type's varchar length (Sentry's prefixes such as "sntrya_").
_TOKEN_TYPE_LENGTH: Final = cast(
    int, cast(String, sentry_column("token", "token_type").type_).length
)


class UtcDateTime(TypeDecorator[datetime]):
    """``timestamptz``; always timezone-aware UTC in Python, on SQLite too (stored as naive UTC).

    Naive datetimes are refused rather than guessed at.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given; use a timezone-aware one (e.g. UTC)")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)


# --------------------------------------------------------------------------- models


class _Columns:
    """Typing helper: the declarative constructor that every built class has."""

    if TYPE_CHECKING:

        def __init__(self, **kw: Any) -> None: ...


class ApplicationModel(_Columns):
    """Columns of the ``application`` table (OAuth clients); base of every built ``Application``.

    The annotations give the attributes their Python types; the columns themselves are built
    from the legacy declaration and :data:`EXPANDED_COLUMNS` by :func:`build_models`.
    """

    id: Mapped[int]
    client_id: Mapped[str]
    client_secret: Mapped[str | None]
    owner_id: Mapped[int | None]
    name: Mapped[str]
    status: Mapped[int]
    allowed_origins: Mapped[str | None]
    redirect_uris: Mapped[str]
    homepage_url: Mapped[str | None]
    privacy_url: Mapped[str | None]
    terms_url: Mapped[str | None]
    scopes: Mapped[list[str]]
    version: Mapped[int]
    date_added: Mapped[datetime]
    # Expand revision 0003 (RFC 7591 / OpenID Connect Registration metadata).
    token_endpoint_auth_method: Mapped[str | None]
    grant_types: Mapped[list[str] | None]
    response_types: Mapped[list[str] | None]
    application_type: Mapped[str | None]
    # Expand revision 0006 (RFC 7591 §2 metadata URLs), which may not have run yet
    # (OPTIONAL_COLUMNS: deferred, see _mapped_table).
    jwks_uri: Mapped[str | None]
    logo_uri: Mapped[str | None]

    @property
    def redirect_uri_list(self) -> list[str]:
        """The registered redirect URIs, one per stored line, blank lines dropped."""
        return split_redirect_uris(self.redirect_uris)

    @property
    def is_public(self) -> bool:
        """True when the client has no secret (RFC 6749 §2.1 public client)."""
        return not self.client_secret


class GrantModel(_Columns):
    """Columns of the ``grant`` table (authorization codes); base of every built ``Grant``."""

    id: Mapped[int]
    user_id: Mapped[int]
    application_id: Mapped[int]
    code: Mapped[str]
    expires_at: Mapped[datetime]
    redirect_uri: Mapped[str]
    scope_list: Mapped[list[str]]
    organization_id: Mapped[int | None]
    # Expand revision 0001 (RFC 7636).
    code_challenge: Mapped[str | None]
    code_challenge_method: Mapped[str | None]
    # Expand revision 0005 (replay detection), which may not have run yet (OPTIONAL_COLUMNS):
    # when the code was exchanged, and the family of the tokens that exchange issued.
    consumed_at: Mapped[datetime | None]
    token_family_id: Mapped[uuid.UUID | None]


class TokenModel(_Columns):
    """Columns of the ``token`` table (access + refresh tokens); base of every built ``Token``."""

    id: Mapped[int]
    user_id: Mapped[int]
    application_id: Mapped[int | None]
    token: Mapped[str]
    hashed_token: Mapped[str | None]
    token_last_characters: Mapped[str | None]
    refresh_token: Mapped[str | None]
    hashed_refresh_token: Mapped[str | None]
    token_type: Mapped[str | None]
    scope_list: Mapped[list[str]]
    expires_at: Mapped[datetime | None]
    date_added: Mapped[datetime]
    # Expand revision 0002 (rotation lineage and revocation).
    token_family_id: Mapped[uuid.UUID | None]
    parent_token_id: Mapped[int | None]
    refresh_token_rotated_at: Mapped[datetime | None]
    revoked_at: Mapped[datetime | None]
    revoked_reason: Mapped[str | None]


#: The nullable columns the expand revisions add, as the models map them, per logical table.
EXPANDED_COLUMNS: Final[Mapping[str, tuple[tuple[str, TypeEngine[Any]], ...]]] = {
    "application": (
        ("token_endpoint_auth_method", String(40)),
        ("grant_types", StringList()),
        ("response_types", StringList()),
        ("application_type", String(8)),
    ),
    "grant": (("code_challenge", Text()), ("code_challenge_method", String(10))),
    "token": (
        ("token_family_id", Uuid()),
        ("parent_token_id", BigInteger()),
        ("refresh_token_rotated_at", UtcDateTime()),
        ("revoked_at", UtcDateTime()),
        ("revoked_reason", String(32)),
    ),
}
#: The columns of the expand revisions after the gated finalize (:data:`OPTIONAL_COLUMNS`).
LATER_COLUMNS: Final[Mapping[str, tuple[tuple[str, TypeEngine[Any]], ...]]] = {
    "application": (("jwks_uri", Text()), ("logo_uri", Text())),
    "grant": (("consumed_at", UtcDateTime()), ("token_family_id", Uuid())),
}
# What reuse revocation and the within-grace lookup filter on.
_EXPANDED_INDEXED: Final[Mapping[str, tuple[str, ...]]] = {
    "token": ("token_family_id", "parent_token_id")
}


def _mapped_table(metadata: MetaData, logical: str, physical: str) -> Table:
    """The table a built class maps: ``id``, the legacy columns the models manage (timestamps
    as :class:`UtcDateTime`), the expanded columns, and the legacy unique constraints and
    indexes under ``<table>_<column>_key`` / ``_idx`` names."""
    legacy = [
        c.column(type_=UtcDateTime() if isinstance(c.type_, DateTime) else None)
        for c in SENTRY_COLUMNS[logical]
        if c.mapped
    ]
    expanded = [Column(name, type_, nullable=True) for name, type_ in EXPANDED_COLUMNS[logical]]
    later = [
        Column(name, type_, nullable=True, server_default=FetchedValue())
        for name, type_ in LATER_COLUMNS.get(logical, ())
    ]
    indexed = (*SENTRY_INDEXED[logical], *_EXPANDED_INDEXED.get(logical, ()))
    return Table(
        physical,
        metadata,
        Column("id", BigId, Identity(), primary_key=True),
        *legacy,
        *expanded,
        *later,
        *(
            UniqueConstraint(c, name=index_name(LegacyFlavor.FRESH, physical, c, "key"))
            for c in SENTRY_UNIQUE[logical]
        ),
        *(Index(index_name(LegacyFlavor.FRESH, physical, c, "idx"), c) for c in indexed),
    )


def _mapper_args(table: Table, logical: str) -> dict[str, Any]:
    """Mapper options of a built class: the :data:`LATER_COLUMNS` deferred (left out of the
    default SELECT) and, having a ``FetchedValue`` server default that emits no DDL, left out
    of an INSERT that sets no value, so the class works on a database without them; and no
    eager defaults, so nothing fetches them back."""
    later = {name: deferred(table.c[name]) for name, _ in LATER_COLUMNS.get(logical, ())}
    return {"eager_defaults": False, "properties": later}


#: Token column <- grant column copied at code exchange when both exist and the token column
#: is not managed here (besides same-named columns). Sentry calls the grant's organization
#: ``organization_id`` and the token's ``scoping_organization_id``.
EXCHANGE_RENAMES: Final[Mapping[str, str]] = {"scoping_organization_id": "organization_id"}


@dataclass(frozen=True, slots=True)
class LiveTable:
    """One physical table as a database holds it, seen from the models.

    ``table`` has the mapped columns (with the models' types) plus every unmanaged column
    (reflected types); ``unmanaged`` are the unmanaged columns a row can be given a value for
    (identity, serial and generated columns excluded); ``required`` those of them that are
    ``NOT NULL`` without a database default. ``missing`` are mapped columns the table lacks
    (an expand revision has not run), :data:`OPTIONAL_COLUMNS` excepted: those are
    ``optional_missing``.
    """

    logical: str
    table: Table
    columns: frozenset[str]
    unmanaged: tuple[str, ...]
    required: frozenset[str]
    missing: tuple[str, ...]
    optional_missing: tuple[str, ...] = ()

    def has(self, *names: str) -> bool:
        """Whether the live table has every one of ``names``."""
        return all(name in self.columns for name in names)


@dataclass(frozen=True, slots=True, weakref_slot=True)
class OAuthModels:
    """The mapped classes for one set of physical table names, on their own registry.

    ``defaults`` (logical table -> column -> value) and ``supplied_by_caller`` (logical table ->
    columns every call passes in ``extra=``) cover columns of the live tables that the models
    do not manage; see :func:`check_models`.
    """

    tables: TableNames
    base: type[DeclarativeBase]
    metadata: MetaData
    Application: type[ApplicationModel]
    Grant: type[GrantModel]
    Token: type[TokenModel]
    defaults: Mapping[str, Mapping[str, ColumnDefault]] = field(default_factory=dict)
    supplied_by_caller: Mapping[str, frozenset[str]] = field(default_factory=dict)
    _live: weakref.WeakKeyDictionary[Engine, dict[str, LiveTable]] = field(
        default_factory=weakref.WeakKeyDictionary, repr=False, compare=False
    )

    def mapped_table(self, logical: str) -> Table:
        """The mapped ``Table`` of a logical table (``application``, ``grant``, ``token``)."""
        cls = {"application": self.Application, "grant": self.Grant, "token": self.Token}[logical]
        table: Table = cls.__table__  # type: ignore[attr-defined]
        return table


# Built class -> the OAuthModels it belongs to (weak both ways), for functions given an instance.
_MODELS_OF: weakref.WeakKeyDictionary[type, weakref.ref[OAuthModels]] = weakref.WeakKeyDictionary()


def _remember_models(models: OAuthModels) -> OAuthModels:
    for cls in (models.Application, models.Grant, models.Token):
        _MODELS_OF[cls] = weakref.ref(models)
    return models


def build_models(
    tables: TableNames | None = None,
    *,
    defaults: Mapping[str, Mapping[str, ColumnDefault]] | None = None,
    supplied_by_caller: Mapping[str, Collection[str]] | None = None,
    engine: Engine | Sequence[Engine] | None = None,
    require: Collection[str] = (),
) -> OAuthModels:
    """Map the three tables under ``tables`` (default: Sentry's names) on a fresh registry.

    Each call returns new classes and a new ``MetaData``, so models for several naming schemes
    can coexist in one process. Unique constraints and indexes carry the legacy names
    (``<table>_<column>_key`` / ``_idx``); lookups on a live database never rely on them.

    ``defaults`` gives values for columns the models do not manage, per logical table (the
    ``[models.defaults.<table>]`` section, ``Settings.models.defaults``); ``supplied_by_caller``
    names the unmanaged columns your code passes in ``extra=`` on every call instead. With
    ``engine`` (one or several, e.g. every database hosting the tables), :func:`check_models`
    runs on each before the models are returned (with ``require``, see there). Raises
    ConfigError for a default naming a column the models manage, ModelsSchemaError from the
    check.
    """
    names = tables if tables is not None else TableNames()
    app, grant, token = names.application, names.grant, names.token

    class Base(DeclarativeBase):
        pass

    class Application(ApplicationModel, Base):
        __table__ = _mapped_table(Base.metadata, "application", app)
        __mapper_args__ = _mapper_args(__table__, "application")

    class Grant(GrantModel, Base):
        __table__ = _mapped_table(Base.metadata, "grant", grant)
        __mapper_args__ = _mapper_args(__table__, "grant")

    class Token(TokenModel, Base):
        __table__ = _mapped_table(Base.metadata, "token", token)

    chosen: dict[str, dict[str, ColumnDefault]] = {}
    for logical, columns in (defaults or {}).items():
        if logical not in ("application", "grant", "token"):
            raise ConfigError(f"models.defaults.{logical}: not a logical table")
        managed = {c.name for c in Base.metadata.tables[names.physical(logical)].columns}
        for column in columns:
            if column in managed:
                raise ConfigError(
                    f"models.defaults.{logical}.{column}: oauthmig sets this column itself; "
                    "remove the default"
                )
        chosen[logical] = dict(columns)
    supplied = {k: frozenset(v) for k, v in (supplied_by_caller or {}).items()}
    models = _remember_models(
        OAuthModels(names, Base, Base.metadata, Application, Grant, Token, chosen, supplied)
    )
    engines = [] if engine is None else [engine] if isinstance(engine, Engine) else list(engine)
    for each in engines:
        check_models(each, models, require=require)
    return models


# --------------------------------------------------------------------------- live tables


def _reflect(conn: Connection, models: OAuthModels, logical: str) -> LiveTable | None:
    """The live shape of one logical table on ``conn``'s database, or None if absent."""
    physical = models.tables.physical(logical)
    insp = inspect(conn)
    if not insp.has_table(physical):
        return None
    mapped = models.mapped_table(logical)
    managed = {c.name for c in mapped.columns}
    reflected = insp.get_columns(physical)
    live = Table(physical, MetaData())
    for column in mapped.columns:
        live.append_column(Column(column.name, column.type, primary_key=column.primary_key))
    unmanaged: list[str] = []
    required: set[str] = set()
    for info in reflected:
        name = info["name"]
        if name in managed:
            continue
        if info.get("identity") or info.get("computed") or info.get("autoincrement") is True:
            continue  # the database fills these
        live.append_column(Column(name, info["type"]))
        unmanaged.append(name)
        if not info["nullable"] and info.get("default") is None:
            required.add(name)
    present = frozenset(info["name"] for info in reflected)
    optional = OPTIONAL_COLUMNS.get(logical, {})
    absent = [c.name for c in mapped.columns if c.name not in present]
    missing = tuple(c for c in absent if c not in optional)
    later = tuple(c for c in absent if c in optional)
    return LiveTable(logical, live, present, tuple(unmanaged), frozenset(required), missing, later)


def _live_tables(
    conn: Connection, models: OAuthModels, *, refresh: bool = False
) -> dict[str, LiveTable]:
    engine = conn.engine
    cached = None if refresh else models._live.get(engine)
    if cached is None:
        cached = {}
        for logical in ("application", "grant", "token"):
            found = _reflect(conn, models, logical)
            if found is not None:
                cached[logical] = found
        models._live[engine] = cached
    return cached


def _live(session: Session, models: OAuthModels, logical: str) -> LiveTable:
    found = _live_tables(session.connection(), models).get(logical)
    if found is None:
        raise ModelsSchemaError(
            f"table {models.tables.physical(logical)} does not exist on this database"
        )
    return found


def _covered_by_copy(tables: Mapping[str, LiveTable], logical: str, column: str) -> bool:
    """Whether every insert into ``logical`` has a row to copy ``column`` from."""
    if logical != "token":
        return False  # grants are made from nothing
    grant = tables.get("grant")
    if grant is None:
        # Without a grant table here, tokens on this database are only made by rotation,
        # which copies the parent row.
        return True
    source = EXCHANGE_RENAMES.get(column, column)
    return column in grant.columns or source in grant.columns


def check_models(
    engine: Engine | Connection,
    models: OAuthModels | None = None,
    *,
    require: Collection[str] = (),
) -> None:
    """Check, at boot, that the models can write to the tables on this database.

    Reflects the grant, token and application tables present on the database (routed
    databases may host only some; at least one must be there) and raises ModelsSchemaError,
    in one message naming each table and column, when a column the models map is missing (run
    ``oauthmig upgrade``) or a grant/token column the models do not manage is ``NOT NULL``
    without a database default and has neither a configured default, nor a declaration in
    ``supplied_by_caller``, nor a copy rule (rotation copies the parent row; code exchange
    copies same-named grant columns and :data:`EXCHANGE_RENAMES`). The reflected shape is
    kept for later calls on this engine. Application rows are never inserted by the library.

    The columns of revisions 0005 and 0006 (:data:`OPTIONAL_COLUMNS`) come after the gated
    finalize, so they may be missing while the models are already in use: without 0005,
    :func:`exchange_code` deletes a code when it is exchanged (a replay is then an unknown code
    and revokes nothing); without 0006, :func:`client_metadata` leaves ``jwks_uri`` and
    ``logo_uri`` out. ``require=("0005",)`` (or ``"0006"``) makes their absence an error too.
    """
    optional_revisions = {rev for cols in OPTIONAL_COLUMNS.values() for rev in cols.values()}
    unknown = sorted(set(require) - optional_revisions)
    if unknown:
        raise ValueError(
            f"require: {', '.join(unknown)} is not one of {', '.join(sorted(optional_revisions))}"
        )
    chosen = models if models is not None else DEFAULT_MODELS
    if isinstance(engine, Connection):
        tables = _live_tables(engine, chosen, refresh=True)
    else:
        with engine.connect() as conn:
            tables = _live_tables(conn, chosen, refresh=True)
    if not tables:
        names = chosen.tables
        raise ModelsSchemaError(
            f"none of {names.application}, {names.grant}, {names.token} exists on this database"
        )
    problems: list[str] = []
    for logical, live in tables.items():
        physical = live.table.name
        if live.missing:
            problems.append(
                f"{physical} lacks {', '.join(live.missing)} (run `oauthmig upgrade` first)"
            )
        later = OPTIONAL_COLUMNS.get(logical, {})
        needed = [c for c in live.optional_missing if later[c] in require]
        if needed:
            revisions = ", ".join(sorted({later[c] for c in needed}))
            problems.append(
                f"{physical} lacks {', '.join(needed)} (revision {revisions}, required here; "
                "run `oauthmig upgrade` once the backfills it waits for are finished)"
            )
        if logical == "application":
            continue
        defaults = chosen.defaults.get(logical, {})
        supplied = chosen.supplied_by_caller.get(logical, frozenset())
        for column in sorted(live.required):
            if column in defaults or column in supplied:
                continue
            if _covered_by_copy(tables, logical, column):
                continue
            problems.append(
                f"{physical}.{column} is NOT NULL without a default and oauthmig does not manage "
                f"it: set [models.defaults.{logical}] {column} = ..., or pass "
                f"extra={{{column!r}: ...}} on every call and declare it in supplied_by_caller"
            )
    if problems:
        raise ModelsSchemaError(
            "oauthmig.provider.models cannot write here: " + "; ".join(problems)
        )


def _unmanaged_values(
    models: OAuthModels,
    live: LiveTable,
    *,
    extra: Mapping[str, Any] | None,
    copied: Mapping[str, Any],
) -> dict[str, Any]:
    """Values for the unmanaged columns of a new row: ``extra`` > ``copied`` > defaults.

    Raises ValueError for an ``extra`` key that is no unmanaged column here and
    ModelsSchemaError (before any INSERT) when a required column would get no value.
    """
    values: dict[str, Any] = {}
    for key, value in (extra or {}).items():
        if key not in live.unmanaged:
            managed = key in live.columns
            raise ValueError(
                f"extra: {live.table.name}.{key} "
                + ("is set by oauthmig itself" if managed else "is not a column of this table")
            )
        values[key] = value
    defaults = models.defaults.get(live.logical, {})
    for column in live.unmanaged:
        if column in values:
            continue
        source = copied.get(column)
        if source is not None or (column in copied and column not in live.required):
            values[column] = source
        elif column in defaults:
            value = defaults[column]
            values[column] = list(value) if isinstance(value, tuple) else value
    absent = sorted(c for c in live.required if values.get(c) is None)
    if absent:
        raise ModelsSchemaError(
            f"{live.table.name}: no value for "
            + ", ".join(absent)
            + f" (NOT NULL, no default); pass extra={{...}} or set [models.defaults.{live.logical}]"
        )
    return values


def _insert(
    session: Session, live: LiveTable, managed: Mapping[str, Any], unmanaged: Mapping[str, Any]
) -> int:
    """INSERT one row with every column value in one statement; returns its id."""
    table = live.table
    row_id = session.execute(
        insert(table).values({**managed, **unmanaged}).returning(table.c.id)
    ).scalar_one()
    return int(row_id)


def _row_values(
    session: Session, live: LiveTable, row_id: int, columns: Iterable[str]
) -> dict[str, Any]:
    """The given columns of one row, read through the live table."""
    wanted = [c for c in columns if c in live.table.c]
    if not wanted:
        return {}
    row = session.execute(
        select(*[live.table.c[c] for c in wanted]).where(live.table.c.id == row_id)
    ).one()
    return dict(row._mapping)


#: Models under Sentry's default table names.
DEFAULT_MODELS: Final = build_models()
Application: Final = DEFAULT_MODELS.Application
Grant: Final = DEFAULT_MODELS.Grant
Token: Final = DEFAULT_MODELS.Token


# --------------------------------------------------------------------------- results


@dataclass(frozen=True, slots=True)
class IssuedToken:
    """Tokens handed to the client. ``reused`` is True when a within-grace retry got back the
    successor that an earlier rotation of the same refresh token had already issued.

    The values are captured before the commit; ``token`` is the row itself, which the commit
    expired (reading it reloads through its session, so only while that session is open).
    """

    access_token: str = field(repr=False)
    refresh_token: str | None = field(repr=False)
    expires_at: datetime | None
    scopes: tuple[str, ...]
    token_id: int
    token_family_id: uuid.UUID | None
    parent_token_id: int | None
    token: TokenModel = field(repr=False, compare=False)
    reused: bool = False

    def response(self, now: datetime | None = None) -> dict[str, str | int]:
        """The RFC 6749 §5.1 JSON body (``token_type`` is ``bearer``)."""
        body: dict[str, str | int] = {"access_token": self.access_token, "token_type": "bearer"}
        if self.expires_at is not None:
            left = self.expires_at - _now(now)
            body["expires_in"] = max(0, int(left.total_seconds()))
        if self.refresh_token is not None:
            body["refresh_token"] = self.refresh_token
        body["scope"] = " ".join(self.scopes)
        return body


# --------------------------------------------------------------------------- helpers


def hash_token(raw: str) -> str:
    """SHA-256 hex digest of a raw token (``hashed_token`` / ``hashed_refresh_token``)."""
    return hashlib.sha256(raw.encode("utf-8")).hexdigest()


def _now(now: datetime | None) -> datetime:
    if now is None:
        return datetime.now(UTC)
    if now.tzinfo is None:
        raise ValueError("now must be timezone-aware")
    return now


def _check_grace(grace_seconds: float) -> timedelta:
    if not 0 <= grace_seconds <= MAX_GRACE_SECONDS:
        raise ValueError(
            f"grace_seconds must be between 0 and {MAX_GRACE_SECONDS:g}, got {grace_seconds!r}"
        )
    return timedelta(seconds=grace_seconds)


def _secret(token_type: str | None) -> str:
    # Sentry's format: an optional type prefix (<= 7 chars) + 64 hex = at most 71 characters.
    return f"{token_type or ''}{secrets.token_hex(32)}"


def _rowcount(result: object) -> int:
    return cast(CursorResult[Any], result).rowcount


def _matches_secret(
    hashed: InstrumentedAttribute[str | None],
    raw_column: InstrumentedAttribute[str | None],
    raw: str,
) -> ColumnElement[bool]:
    # Lookups go through the SHA-256 digest. Legacy rows written before Sentry added the
    # hashed columns have NULL there; only those are matched on the raw (unique) column.
    return or_(hashed == hash_token(raw), and_(hashed.is_(None), raw_column == raw))


_FAMILY_LOCK_CLASS = zlib.crc32(b"oauthmig:token-family") - 2**31  # signed int4 namespace


def _lock_family(session: Session, family: uuid.UUID) -> None:
    """PostgreSQL: serialize rotation and revocation within one family until commit.

    Under READ COMMITTED a revoking UPDATE that waits for a row being rotated sees that row
    afterwards but not the successor the rotating transaction inserted, which would survive.
    With this lock the revoke starts only after in-flight rotations have committed, and later
    rotations claim a row that is already revoked. The two-int4 form keeps these keys apart
    from the single-bigint advisory locks of ``oauthmig upgrade``. SQLite has one writer at a
    time, so it needs nothing.
    """
    if session.connection().dialect.name != "postgresql":
        return
    key = int.from_bytes(family.bytes[:4], "big", signed=True)
    session.execute(
        text("SELECT pg_advisory_xact_lock(:cls, :key)"), {"cls": _FAMILY_LOCK_CLASS, "key": key}
    )


def _new_token(
    session: Session,
    models: OAuthModels,
    *,
    user_id: int,
    application_id: int | None,
    scopes: Sequence[str],
    token_type: str | None,
    family: uuid.UUID,
    parent_id: int | None,
    now: datetime,
    ttl: timedelta | None,
    extra: Mapping[str, Any] | None,
    copied: Mapping[str, Any],
) -> tuple[TokenModel, str, str]:
    """INSERT a token row (unmanaged columns from ``extra`` > ``copied`` > defaults)."""
    live = _live(session, models, "token")
    unmanaged = _unmanaged_values(models, live, extra=extra, copied=copied)
    access, refresh = _secret(token_type), _secret(token_type)
    managed: dict[str, Any] = {
        "user_id": user_id,
        "application_id": application_id,
        "token": access,
        "hashed_token": hash_token(access),
        "token_last_characters": access[-4:],
        "refresh_token": refresh,
        "hashed_refresh_token": hash_token(refresh),
        "token_type": token_type,
        "scope_list": list(scopes),
        "expires_at": None if ttl is None else now + ttl,
        "date_added": now,
        "token_family_id": family,
        "parent_token_id": parent_id,
    }
    row_id = _insert(session, live, managed, unmanaged)
    row = session.get(models.Token, row_id)
    assert row is not None  # inserted just now in this transaction
    return row, access, refresh


def _issued(row: TokenModel, access: str, refresh: str | None, *, reused: bool) -> IssuedToken:
    return IssuedToken(
        access,
        refresh,
        row.expires_at,
        tuple(row.scope_list),
        row.id,
        row.token_family_id,
        row.parent_token_id,
        row,
        reused,
    )


# --------------------------------------------------------------------------- authorization


def store_challenge(
    grant: GrantModel,
    code_challenge: str | None,
    code_challenge_method: str | None,
    *,
    allow_plain: bool = False,
    require_pkce: bool = False,
) -> None:
    """Validate an authorization request's PKCE parameters and set them on ``grant``.

    S256 only unless ``allow_plain``; a challenge without a method is rejected under S256-only
    and stored as ``plain`` when plain is allowed (RFC 7636 §4.3). Raises InvalidRequest.
    """
    parsed = parse_code_challenge(
        code_challenge, code_challenge_method, allow_plain=allow_plain, require=require_pkce
    )
    grant.code_challenge = None if parsed is None else parsed.challenge
    grant.code_challenge_method = None if parsed is None else parsed.method


def new_grant(
    session: Session,
    *,
    application: ApplicationModel,
    user_id: int,
    redirect_uri: str,
    scopes: Sequence[str],
    code_challenge: str | None = None,
    code_challenge_method: str | None = None,
    allow_plain: bool = False,
    require_pkce: bool = False,
    organization_id: int | None = None,
    ttl: timedelta = GRANT_TTL,
    now: datetime | None = None,
    extra: Mapping[str, Any] | None = None,
    models: OAuthModels = DEFAULT_MODELS,
    response_type: str = "code",
    policy: EnforcementPolicy = DEFAULT_POLICY,
) -> GrantModel:
    """Create and commit an authorization code bound to ``redirect_uri`` and the PKCE challenge.

    The caller has already authenticated the user, checked ``redirect_uri`` against the
    application's registered URIs and obtained consent. ``redirect_uri`` is stored verbatim:
    the token request must repeat it byte for byte. ``extra`` sets columns of the live grant
    table that the models do not manage (e.g. Sentry's ``scopes`` bit field); configured
    defaults fill the rest. Returns the grant (``grant.code`` is the code to send). Raises
    InvalidRequest, or ModelsSchemaError (nothing written) when a ``NOT NULL`` column gets no
    value.

    Under ``policy`` (:mod:`oauthmig.provider.policy`): a ``response_type`` the application
    did not register in ``response_types`` (NULL, not yet backfilled: not checked) raises
    UnsupportedResponseType when the ``grant_types`` check is ``enforce``; a request without
    ``code_challenge`` raises InvalidRequest when ``pkce_required`` is ``enforce`` (as
    ``require_pkce=True`` does). Under ``observe`` both are recorded and the grant is issued.
    """
    if not redirect_uri:
        raise InvalidRequest("redirect_uri is required")
    if len(redirect_uri) > GRANT_REDIRECT_URI_LENGTH:
        raise InvalidRequest(f"redirect_uri is longer than {GRANT_REDIRECT_URI_LENGTH} characters")
    at = _now(now)
    observed: list[Check] = []
    registered = application.response_types
    if (
        registered is not None
        and response_type not in registered
        and _enforced(policy, Check.GRANT_TYPES, application, observed)
    ):
        raise UnsupportedResponseType(
            f"this client is not registered for response_type {response_type[:40]!r}"
        )
    if not code_challenge and not require_pkce:
        require_pkce = _enforced(policy, Check.PKCE_REQUIRED, application, observed)
    parsed = parse_code_challenge(
        code_challenge, code_challenge_method, allow_plain=allow_plain, require=require_pkce
    )
    try:
        _observe(session, models, application, observed, at)
        live = _live(session, models, "grant")
        unmanaged = _unmanaged_values(models, live, extra=extra, copied={})
        managed: dict[str, Any] = {
            "user_id": user_id,
            "application_id": application.id,
            "code": secrets.token_hex(32),
            "expires_at": at + ttl,
            "redirect_uri": redirect_uri,
            "scope_list": list(scopes),
            "organization_id": organization_id,
            "code_challenge": None if parsed is None else parsed.challenge,
            "code_challenge_method": None if parsed is None else parsed.method,
        }
        grant = session.get(models.Grant, _insert(session, live, managed, unmanaged))
        assert grant is not None  # inserted just now in this transaction
        session.commit()
    except BaseException:
        session.rollback()
        raise
    return grant


# --------------------------------------------------------------------------- token endpoint


def verify_pkce(grant: GrantModel, code_verifier: str | None, *, allow_plain: bool = False) -> None:
    """Check ``code_verifier`` against the grant's stored challenge (RFC 7636 §4.6).

    A verifier for a grant without a challenge is rejected (RFC 9700 §2.1.1 downgrade), as is a
    grant with a challenge and no verifier. Raises InvalidGrant or InvalidRequest.
    """
    verify_code_verifier(
        grant.code_challenge, grant.code_challenge_method, code_verifier, allow_plain=allow_plain
    )


def check_redirect_binding(grant: GrantModel, redirect_uri: str | None) -> None:
    """A grant's stored ``redirect_uri`` requires a byte-identical one (RFC 6749 §4.1.3).

    No normalization of any kind: a trailing slash or a case difference is a mismatch. A grant
    without a stored ``redirect_uri`` (possible only where revision 0001 added the column as
    nullable TEXT) is not bound. Raises InvalidGrant.
    """
    stored = grant.redirect_uri
    if stored is None:
        return
    if redirect_uri is None:
        raise InvalidGrant("redirect_uri is required: the code is bound to one")
    if redirect_uri != stored:  # code point for code point, i.e. byte-identical in UTF-8
        raise InvalidGrant("redirect_uri does not match the one the code was issued for")


def exchange_code(
    session: Session,
    *,
    application: ApplicationModel,
    code: str,
    redirect_uri: str | None,
    code_verifier: str | None = None,
    allow_plain: bool = False,
    token_type: str | None = None,
    access_token_ttl: timedelta | None = ACCESS_TOKEN_TTL,
    now: datetime | None = None,
    extra: Mapping[str, Any] | None = None,
    models: OAuthModels = DEFAULT_MODELS,
    policy: EnforcementPolicy = DEFAULT_POLICY,
) -> IssuedToken:
    """Exchange an authorization code for tokens (RFC 6749 §4.1.3) and commit.

    An application whose ``grant_types`` lacks ``authorization_code`` gets UnauthorizedClient
    (nothing written, the code stays usable) when the policy's ``grant_types`` check is
    ``enforce``; under ``observe`` the exchange goes on and is recorded. NULL ``grant_types``
    (not yet backfilled) is not checked.

    ``application`` is the client the caller has authenticated. Checks: same client, not
    expired, redirect binding, PKCE. The code is consumed by the first exchange, whether it
    succeeds or fails: with revision 0005 the grant row is kept and marked (``consumed_at``,
    and ``token_family_id`` = the family of the tokens issued, NULL when the exchange failed)
    by a conditional ``UPDATE ... WHERE consumed_at IS NULL``, so that of two concurrent
    exchanges exactly one wins. On success a token starts a new family (random UUID).

    A consumed code presented again (RFC 6749 §4.1.2, RFC 9700 §4.x) revokes, in one UPDATE,
    every token of the family its exchange produced (every generation of rotation,
    ``revoked_reason = 'code_replay'``; tokens already revoked keep their reason), commits and
    raises InvalidGrant, whoever presents it. The loser of a concurrent exchange is such a
    replay: it waits for the winner's row lock, then revokes what the winner issued. Consumed
    grants stay until :func:`oauthmig.prune.prune_grants` deletes them after expiry.

    Without revision 0005 (its columns are absent) the grant row is deleted instead, as before
    it existed: a replay then finds no code and revokes nothing.

    ``token_type`` (at most 7 characters, e.g. Sentry's ``sntrya_``) is stored and prefixes the
    raw tokens. Token columns the models do not manage take, in order: ``extra``, the grant's
    column of the same name (or the one :data:`EXCHANGE_RENAMES` names), the configured
    default. Raises InvalidRequest or InvalidGrant; no message ever contains the code.
    """
    if not code:
        raise InvalidRequest("code is required")
    if token_type is not None and len(token_type) > _TOKEN_TYPE_LENGTH:
        raise ValueError(f"token_type is at most {_TOKEN_TYPE_LENGTH} characters")
    at = _now(now)
    G = models.Grant
    observed = _check_grant_type(policy, application, "authorization_code")
    try:
        _observe(session, models, application, observed, at)
        grant_live = _live(session, models, "grant")
        marks = grant_live.has(*_REPLAY_COLUMNS)
        query = select(G).where(G.code == code).order_by(G.id).limit(2)
        if marks:
            query = query.options(undefer(G.consumed_at), undefer(G.token_family_id))
        found = list(session.scalars(query.execution_options(populate_existing=True)))
        if len(found) != 1:
            if found:
                # Sentry's code column is indexed, not unique: a code matching two rows is
                # unusable. Retire every row, and revoke what any of them already produced.
                _retire_code(session, models, code, found, at, marks)
                session.commit()
            else:
                session.rollback()
            raise InvalidGrant(_CODE_UNUSABLE)
        grant = found[0]
        if marks and grant.consumed_at is not None:
            _replayed(session, models, grant.token_family_id, at)
        token_live = _live(session, models, "token")
        sources: dict[str, str] = {}
        for column in token_live.unmanaged:
            renamed = EXCHANGE_RENAMES.get(column)
            if column in grant_live.columns:
                sources[column] = column
            elif renamed is not None and renamed in grant_live.columns:
                sources[column] = renamed
        held = _row_values(session, grant_live, grant.id, set(sources.values()))
        copied = {c: held[src] for c, src in sources.items() if src in held}
        failure: OAuthError | None = None
        try:
            if grant.application_id != application.id:
                raise InvalidGrant("the authorization code was issued to another client")
            if grant.expires_at <= at:
                raise InvalidGrant("the authorization code has expired")
            check_redirect_binding(grant, redirect_uri)
            verify_pkce(grant, code_verifier, allow_plain=allow_plain)
        except OAuthError as exc:
            failure = exc
        family = uuid.uuid4() if failure is None else None
        # Consume before issuing anything: only the transaction whose statement changed the row
        # may use it. PostgreSQL re-checks ``consumed_at IS NULL`` after a concurrent consumer
        # commits, so the loser sees rowcount 0 and the winner's committed tokens.
        if marks:
            claim: Any = (
                update(G)
                .where(G.id == grant.id, G.consumed_at.is_(None))
                .values(consumed_at=at, token_family_id=family)
            )
        else:
            claim = delete(G).where(G.id == grant.id)
        claimed = session.execute(claim.execution_options(synchronize_session=False))
        if _rowcount(claimed) != 1:
            if not marks:
                session.rollback()
                raise InvalidGrant(_CODE_UNUSABLE)
            winner = session.scalar(
                select(G.token_family_id)
                .where(G.id == grant.id)
                .execution_options(populate_existing=True)
            )
            _replayed(session, models, winner, at)
        if not marks:
            session.expunge(grant)  # keep its loaded values; the row is gone
        if failure is not None:
            session.commit()  # the code stays consumed (RFC 6749 §10.5)
            raise failure
        assert family is not None
        row, access, refresh = _new_token(
            session,
            models,
            user_id=grant.user_id,
            application_id=grant.application_id,
            scopes=grant.scope_list,
            token_type=token_type,
            family=family,
            parent_id=None,
            now=at,
            ttl=access_token_ttl,
            extra=extra,
            copied=copied,
        )
        issued = _issued(row, access, refresh, reused=False)
        session.commit()
        return issued
    except OAuthError:
        raise
    except BaseException:
        session.rollback()
        raise


def _enforced(
    policy: EnforcementPolicy, check: Check, application: ApplicationModel, observed: list[Check]
) -> bool:
    """Whether ``check`` rejects for ``application``; under observe, notes it in ``observed``."""
    mode = policy.mode(check, application.client_id)
    if mode is Mode.OBSERVE:
        observed.append(check)
    return mode is Mode.ENFORCE


def _check_grant_type(
    policy: EnforcementPolicy, application: ApplicationModel, grant_type: str
) -> list[Check]:
    """Raise UnauthorizedClient for an unregistered grant type under enforce (RFC 6749 §5.2);
    the checks to record under observe. NULL ``grant_types`` (not backfilled) passes."""
    observed: list[Check] = []
    registered = application.grant_types
    if (
        registered is not None
        and grant_type not in registered
        and _enforced(policy, Check.GRANT_TYPES, application, observed)
    ):
        raise UnauthorizedClient(f"this client is not registered for the {grant_type} grant")
    return observed


def _observe(
    session: Session,
    models: OAuthModels,
    application: ApplicationModel,
    observed: Sequence[Check],
    at: datetime,
) -> None:
    """Record the observe-mode checks in the session's transaction (committed with the call)."""
    for check in observed:
        record_observation(
            session,
            application_id=application.id,
            check=check,
            now=at,
            bind_mapper=models.Application,
        )


#: The grant columns of revision 0005, which let :func:`exchange_code` detect a replay.
_REPLAY_COLUMNS: Final = ("consumed_at", "token_family_id")
_CODE_UNUSABLE: Final = "the authorization code is invalid, expired or already used"


def _revoke_family_now(
    session: Session, models: OAuthModels, family: uuid.UUID, reason: str, at: datetime
) -> int:
    """Revoke every unrevoked token of ``family`` in one UPDATE (not committed)."""
    _lock_family(session, family)
    T = models.Token
    return _rowcount(
        session.execute(_revoke_statement(models, T.token_family_id == family, reason, at))
    )


def _replayed(
    session: Session, models: OAuthModels, family: uuid.UUID | None, at: datetime
) -> NoReturn:
    """A consumed code came back: revoke the family its exchange issued, commit, refuse."""
    if family is not None:
        _revoke_family_now(session, models, family, "code_replay", at)
    session.commit()
    raise InvalidGrant(
        "the authorization code was already used; the tokens issued for it have been revoked"
        if family is not None
        else _CODE_UNUSABLE
    )


def _retire_code(
    session: Session,
    models: OAuthModels,
    code: str,
    found: Sequence[GrantModel],
    at: datetime,
    marks: bool,
) -> None:
    """Make every grant row holding ``code`` unusable (not committed): mark them consumed and
    revoke the families of those already exchanged, or delete them without revision 0005."""
    G = models.Grant
    if not marks:
        session.execute(
            delete(G).where(G.code == code).execution_options(synchronize_session=False)
        )
        return
    families = {g.token_family_id for g in found if g.token_family_id is not None}
    session.execute(
        update(G)
        .where(G.code == code, G.consumed_at.is_(None))
        .values(consumed_at=at)
        .execution_options(synchronize_session=False)
    )
    for family in sorted(families):
        _revoke_family_now(session, models, family, "code_replay", at)


def rotate_refresh_token(
    session: Session,
    refresh_token: str,
    *,
    application: ApplicationModel | None = None,
    grace_seconds: float = 0,
    access_token_ttl: timedelta | None = ACCESS_TOKEN_TTL,
    now: datetime | None = None,
    extra: Mapping[str, Any] | None = None,
    models: OAuthModels = DEFAULT_MODELS,
    policy: EnforcementPolicy = DEFAULT_POLICY,
) -> IssuedToken:
    """Exchange a refresh token for a new token row in the same family (RFC 6749 §6) and commit.

    The old row gets ``refresh_token_rotated_at`` and its access token expires now (as Sentry's
    in-place refresh did); the new row records ``parent_token_id``. A legacy token without a
    family gets a fresh one, written to both rows. ``application``, when given, must be the
    client the token was issued to. The new row inherits every column of the old one that the
    models do not manage (``extra`` overrides; configured defaults fill NULLs in ``NOT NULL``
    columns).

    Presenting an already-rotated refresh token again (RFC 9700 §4.14.2):

    * within ``grace_seconds`` of its rotation (0 = no grace, at most
      :data:`MAX_GRACE_SECONDS`, else ValueError), while the successor is itself unused and
      not revoked, returns that successor (``reused=True``) instead of minting another;
    * otherwise, under the policy's ``refresh_reuse`` check (per ``application.client_id``;
      the global mode without ``application``): ``enforce`` revokes every token of the family
      in one UPDATE (``revoked_reason='reuse_detected'``), commits and raises InvalidGrant;
      ``observe`` records the reuse, commits and raises InvalidGrant, leaving the family
      alive; ``off`` raises InvalidGrant only.

    With ``application``, one whose ``grant_types`` lacks ``refresh_token`` gets
    UnauthorizedClient (nothing written) under the ``grant_types`` check's ``enforce``, and
    is recorded and served under ``observe``; NULL ``grant_types`` is not checked.

    Concurrent rotations of one token yield one successor: the old row is claimed by a
    conditional UPDATE (``... WHERE refresh_token_rotated_at IS NULL``) and only the
    transaction that changed it inserts a successor; the loser is handled as a reuse. On
    PostgreSQL, rotation and revocation also take a per-family advisory lock, so that a
    revocation covers a rotation in flight.
    Raises InvalidRequest or InvalidGrant.
    """
    grace = _check_grace(grace_seconds)
    if not refresh_token:
        raise InvalidRequest("refresh_token is required")
    at = _now(now)
    T = models.Token
    observed = (
        [] if application is None else _check_grant_type(policy, application, "refresh_token")
    )
    try:
        if application is not None:
            _observe(session, models, application, observed, at)
        old = session.scalars(
            select(T).where(_matches_secret(T.hashed_refresh_token, T.refresh_token, refresh_token))
        ).one_or_none()
        if old is None:
            session.rollback()
            raise InvalidGrant("the refresh token is invalid")
        if application is not None and old.application_id != application.id:
            session.rollback()
            raise InvalidGrant("the refresh token was issued to another client")
        if old.refresh_token_rotated_at is None and old.revoked_at is None:
            issued = _claim_and_rotate(session, models, old, at, access_token_ttl, extra)
            if issued is not None:
                session.commit()
                return issued
            # Another transaction rotated or revoked it since we read it: see what it did.
            fresh = session.scalars(
                select(T).where(T.id == old.id).execution_options(populate_existing=True)
            ).one_or_none()
            if fresh is None:
                session.rollback()
                raise InvalidGrant("the refresh token is invalid")
            old = fresh
        if old.revoked_at is not None:
            session.rollback()
            raise InvalidGrant("the refresh token has been revoked")
        reuse = policy.mode(
            Check.REFRESH_REUSE, None if application is None else application.client_id
        )
        return _presented_again(session, models, old, grace, at, reuse)
    except OAuthError:
        raise
    except BaseException:
        session.rollback()
        raise


def _claim_and_rotate(
    session: Session,
    models: OAuthModels,
    old: TokenModel,
    at: datetime,
    ttl: timedelta | None,
    extra: Mapping[str, Any] | None,
) -> IssuedToken | None:
    """Claim ``old`` with a conditional UPDATE and insert its successor; None if we lost."""
    T = models.Token
    if old.token_family_id is not None:
        _lock_family(session, old.token_family_id)
    new_family = old.token_family_id or uuid.uuid4()
    old_expiry = old.expires_at
    expires = at if old_expiry is None or old_expiry > at else old_expiry
    # The WHERE re-checks the state under the row lock (PostgreSQL re-evaluates it after a
    # concurrent writer commits), so exactly one transaction sees rowcount 1. COALESCE keeps a
    # family that the token-families backfill may have written meanwhile.
    claimed = session.execute(
        update(T)
        .where(T.id == old.id, T.refresh_token_rotated_at.is_(None), T.revoked_at.is_(None))
        .values(
            refresh_token_rotated_at=at,
            expires_at=expires,
            token_family_id=func.coalesce(T.token_family_id, literal(new_family, Uuid())),
        )
        .execution_options(synchronize_session=False)
    )
    if _rowcount(claimed) != 1:
        return None
    session.refresh(old)
    family = old.token_family_id
    assert family is not None  # set by the UPDATE above
    live = _live(session, models, "token")
    row, access, refresh = _new_token(
        session,
        models,
        user_id=old.user_id,
        application_id=old.application_id,
        scopes=old.scope_list,
        token_type=old.token_type,
        family=family,
        parent_id=old.id,
        now=at,
        ttl=ttl,
        extra=extra,
        copied=_row_values(session, live, old.id, live.unmanaged),
    )
    return _issued(row, access, refresh, reused=False)


def _presented_again(
    session: Session,
    models: OAuthModels,
    old: TokenModel,
    grace: timedelta,
    at: datetime,
    mode: Mode = Mode.ENFORCE,
) -> IssuedToken:
    """``old`` was already rotated: hand back its successor within grace, else revoke."""
    T = models.Token
    rotated_at = old.refresh_token_rotated_at
    assert rotated_at is not None
    if grace > timedelta(0) and at - rotated_at <= grace:
        successor = session.scalars(
            select(T).where(T.parent_token_id == old.id).order_by(T.id).limit(1)
        ).first()
        # Only an untouched successor is handed back: if it was rotated already, its holder
        # and the presenter of ``old`` are two parties, which is the reuse being detected.
        if (
            successor is not None
            and successor.revoked_at is None
            and successor.refresh_token_rotated_at is None
        ):
            issued = _issued(successor, successor.token, successor.refresh_token, reused=True)
            session.commit()
            return issued
    if mode is not Mode.ENFORCE:
        # Only the stale token is refused; the family stays alive (RFC 9700 §4.14.2 leaves
        # the response to the server). Observe counts what enforce would have revoked.
        if mode is Mode.OBSERVE and old.application_id is not None:
            record_observation(
                session,
                application_id=old.application_id,
                check=Check.REFRESH_REUSE,
                now=at,
                bind_mapper=models.Application,
            )
        session.commit()
        raise InvalidGrant("the refresh token was already used")
    if old.token_family_id is not None:
        _lock_family(session, old.token_family_id)
        where = T.token_family_id == old.token_family_id
    else:  # cannot happen through this module: rotation always sets a family
        where = T.id == old.id
    session.execute(_revoke_statement(models, where, "reuse_detected", at))
    session.commit()
    raise InvalidGrant("the refresh token was already used; its token family has been revoked")


def _revoke_statement(models: OAuthModels, where: Any, reason: str, at: datetime) -> Any:
    T = models.Token
    return (
        update(T)
        .where(where, T.revoked_at.is_(None))
        .values(revoked_at=at, revoked_reason=reason)
        .execution_options(synchronize_session=False)
    )


def revoke_family(
    session: Session,
    family_id: uuid.UUID,
    *,
    reason: str,
    now: datetime | None = None,
    models: OAuthModels = DEFAULT_MODELS,
) -> int:
    """Revoke every unrevoked token of a family in one UPDATE and commit; returns the row count.

    ``reason`` is ``reuse_detected``, ``logout`` or ``admin`` (else ValueError). Tokens already
    revoked keep their original time and reason.
    """
    if reason not in REVOKE_REASONS:
        raise ValueError(f"reason must be one of {', '.join(REVOKE_REASONS)}")
    at = _now(now)
    T = models.Token
    try:
        _lock_family(session, family_id)
        result = session.execute(
            _revoke_statement(models, T.token_family_id == family_id, reason, at)
        )
        count = _rowcount(result)
        session.commit()
    except BaseException:
        session.rollback()
        raise
    return count


def find_active_token(
    session: Session,
    access_token: str,
    *,
    now: datetime | None = None,
    models: OAuthModels = DEFAULT_MODELS,
) -> TokenModel | None:
    """The token row for a raw access token, or None if unknown, expired or revoked.

    Resource servers must honour ``revoked_at``: without it reuse revocation has no effect.
    """
    if not access_token:
        return None
    at = _now(now)
    T = models.Token
    row = session.scalars(
        select(T).where(_matches_secret(T.hashed_token, T.token, access_token))
    ).one_or_none()
    if row is None or row.revoked_at is not None:
        return None
    if row.expires_at is not None and row.expires_at <= at:
        return None
    return row


# --------------------------------------------------------------------------- registration


def validate_redirect_uris(
    uris: Iterable[str], app_type: str, *, reject_warnings: bool = False
) -> list[UriReport]:
    """Check redirect URIs as registration must (docs/rules.md); one report per URI, in order.

    Raises InvalidRequest when the list is empty, ``app_type`` is not ``web``/``native``, or
    any URI fails (any error-severity finding; with ``reject_warnings``, any warning too). The
    message names each rejected URI with its rule codes. Store ``report.normalized``.
    """
    if app_type not in (AppType.WEB.value, AppType.NATIVE.value):
        raise InvalidRequest(f"application_type must be web or native, got {app_type[:20]!r}")
    reports = [
        check_uri(uri, app_type, grant_column_length=GRANT_REDIRECT_URI_LENGTH) for uri in uris
    ]
    if not reports:
        raise InvalidRequest("redirect_uris: at least one redirect URI is required")
    bad_verdicts = {"fail", "warn"} if reject_warnings else {"fail"}
    problems: list[str] = []
    for report in reports:
        if report.verdict in bad_verdicts:
            codes = ", ".join(
                f"{f.code} {f.name}"
                for f in report.findings
                if f.severity == "error" or (reject_warnings and f.severity == "warning")
            )
            problems.append(f"{report.uri[:200]!r} ({codes})")
    if problems:
        raise InvalidRequest("redirect_uris rejected: " + "; ".join(problems))
    return reports


def set_redirect_uris(
    application: ApplicationModel,
    uris: Iterable[str],
    app_type: str,
    *,
    reject_warnings: bool = False,
) -> list[UriReport]:
    """Validate ``uris`` and store their normalized forms (duplicates after normalization
    dropped, order kept) and ``application_type`` on ``application``; returns the reports.

    Only the instance changes: persist it with your session. Raises InvalidRequest.
    """
    reports = validate_redirect_uris(uris, app_type, reject_warnings=reject_warnings)
    normalized: list[str] = []
    for report in reports:
        value = report.normalized if report.normalized is not None else report.uri
        if value not in normalized:
            normalized.append(value)
    application.redirect_uris = "\n".join(normalized)
    application.application_type = app_type
    return reports


# --------------------------------------------------------------------------- client metadata

#: RFC 7591 §2 defaults, reported for applications whose metadata columns are still NULL
#: (before the client-metadata backfill): what a client would assume for an omitted field.
_DEFAULT_GRANT_TYPES: Final = ("authorization_code",)
_DEFAULT_RESPONSE_TYPES: Final = ("code",)


def _column_value(application: ApplicationModel, name: str) -> Any:
    """``application.<name>``; None for a deferred column the live table does not have yet
    (revision 0006 not applied), instead of a failing lazy load."""
    state = inspect(application)
    if name not in state.unloaded:
        return state.dict.get(name)
    if state.transient or state.pending:
        return None
    session = state.session
    ref = _MODELS_OF.get(type(application))
    models = ref() if ref is not None else None
    if session is not None and models is not None:
        live = _live_tables(session.connection(), models).get("application")
        if live is not None and not live.has(name):
            return None
    return getattr(application, name)  # loads it (a detached instance raises, as usual)


def client_metadata(
    application: ApplicationModel, *, include_secret: bool = False
) -> dict[str, Any]:
    """The RFC 7591 §3.2.1 client information response for ``application``.

    ``client_id``, ``client_id_issued_at`` (``date_added``, seconds since the epoch),
    ``client_name``, ``application_type``, ``token_endpoint_auth_method``, ``grant_types``,
    ``response_types``, ``redirect_uris`` (normalized as registration stores them, duplicates
    dropped, order kept), ``scope`` when the application has scopes, and the metadata URLs of
    :data:`METADATA_URL_COLUMNS` that are set: ``client_uri`` (Sentry's ``homepage_url``),
    ``policy_uri`` (``privacy_url``), ``tos_uri`` (``terms_url``), ``jwks_uri``,
    ``logo_uri``. Absent values are omitted, never ``null``. The secret is left out unless
    ``include_secret`` (then ``client_secret`` and ``client_secret_expires_at: 0``, "does not
    expire", for a confidential client).

    Metadata columns still NULL (before the client-metadata backfill) are reported as RFC
    7591 §2 defaults would have a client assume: ``none`` for a client without a secret and
    ``client_secret_basic`` otherwise, ``["authorization_code"]``, ``["code"]``, and the
    application type inferred from the redirect URIs. Reads only the instance (and, once,
    which columns the live table has); nothing is written.
    """
    app_type = application.application_type
    if app_type not in (AppType.WEB.value, AppType.NATIVE.value):
        app_type = infer_app_type(application.redirect_uri_list).value
    redirect_uris: list[str] = []
    for uri in application.redirect_uri_list:
        normalized = check_uri(uri, app_type, grant_column_length=None).normalized or uri
        if normalized not in redirect_uris:
            redirect_uris.append(normalized)
    method = application.token_endpoint_auth_method or (
        "none" if application.is_public else "client_secret_basic"
    )
    body: dict[str, Any] = {"client_id": application.client_id}
    if include_secret and not application.is_public:
        body["client_secret"] = application.client_secret
        body["client_secret_expires_at"] = 0
    if application.date_added is not None:
        body["client_id_issued_at"] = int(application.date_added.timestamp())
    if application.name:
        body["client_name"] = application.name
    body["application_type"] = app_type
    body["token_endpoint_auth_method"] = method
    body["grant_types"] = list(application.grant_types or _DEFAULT_GRANT_TYPES)
    body["response_types"] = list(application.response_types or _DEFAULT_RESPONSE_TYPES)
    body["redirect_uris"] = redirect_uris
    if application.scopes:
        body["scope"] = " ".join(application.scopes)
    for name, column in METADATA_URL_COLUMNS.items():
        value = _column_value(application, column)
        if value:
            body[name] = value
    return body
