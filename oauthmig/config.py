"""Configuration: TOML file and environment -> frozen settings.

This module is the only reader of configuration files and of the environment. Resolution order:
``--config PATH`` > ``$OAUTHMIG_CONFIG`` > ``./oauthmig.toml`` > the embedded default (two SQLite
databases under ``./.oauthmig/``). Every error names the offending key and exits 2.
"""

from __future__ import annotations

import math
import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from oauthmig.errors import ConfigError
from oauthmig.redact import mask_url
from oauthmig.uri import URIError, parse_uri

if TYPE_CHECKING:
    from sqlalchemy.engine import URL

LOGICAL_TABLES: tuple[str, ...] = ("application", "grant", "token")
DEFAULT_TABLES: dict[str, str] = {
    "application": "sentry_apiapplication",
    "grant": "sentry_apigrant",
    "token": "sentry_apitoken",
}
CONFIDENTIAL_AUTH_METHODS: tuple[str, ...] = (
    "client_secret_basic",
    "client_secret_post",
    "client_secret_jwt",
    "private_key_jwt",
    "tls_client_auth",
    "self_signed_tls_client_auth",
)
GRANT_TYPES: tuple[str, ...] = (
    "authorization_code",
    "implicit",
    "password",
    "client_credentials",
    "refresh_token",
    "urn:ietf:params:oauth:grant-type:jwt-bearer",
    "urn:ietf:params:oauth:grant-type:saml2-bearer",
    "urn:ietf:params:oauth:grant-type:device_code",
)
RESPONSE_TYPES: tuple[str, ...] = ("code", "token", "id_token", "code id_token", "none")
#: The checks of the enforcement policy (``[enforcement]``, :mod:`oauthmig.provider.policy`).
ENFORCEMENT_CHECKS: tuple[str, ...] = (
    "pkce_required",
    "grant_types",
    "auth_method",
    "refresh_reuse",
)
ENFORCEMENT_MODES: tuple[str, ...] = ("off", "observe", "enforce")
#: The mode of each check when ``[enforcement]`` does not set it: what the library did before
#: the policy existed (PKCE optional, refresh reuse revokes), the registered metadata enforced.
ENFORCEMENT_DEFAULTS: Mapping[str, str] = {
    "pkce_required": "off",
    "grant_types": "enforce",
    "auth_method": "enforce",
    "refresh_reuse": "enforce",
}
EMBEDDED_DIR = ".oauthmig"
ENV_CONFIG = "OAUTHMIG_CONFIG"

_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")
_DB_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_-]{0,62}$")
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|min|h|d)?\s*$")


@dataclass(frozen=True, slots=True)
class DatabaseConfig:
    """One routed database. ``url`` holds the password: never print it, use ``display_url``.

    ``direct_url`` (optional, same server and database) is a connection that keeps a session:
    when ``url`` goes through a transaction pooler (PgBouncer), DDL, run locks and other work
    that needs a session use it (see :attr:`session_url`); ``url`` carries the rest.
    """

    name: str
    url: str | None = field(repr=False)
    display_url: str
    dialect: str
    url_error: str | None = None
    direct_url: str | None = field(default=None, repr=False)
    direct_display_url: str | None = None
    direct_url_error: str | None = None

    @property
    def session_url(self) -> str | None:
        """The URL for work that needs a session: ``direct_url`` when configured, else ``url``."""
        return self.direct_url if self.has_direct else self.url

    @property
    def has_direct(self) -> bool:
        """Whether ``direct_url`` or ``direct_url_env`` is configured (set or not)."""
        return self.direct_display_url is not None

    @property
    def secret_urls(self) -> tuple[str | None, ...]:
        """Every URL of this database that may hold a secret (for redaction)."""
        return (self.url, self.direct_url)


@dataclass(frozen=True, slots=True)
class TableNames:
    """Physical table names for the logical tables."""

    application: str = DEFAULT_TABLES["application"]
    grant: str = DEFAULT_TABLES["grant"]
    token: str = DEFAULT_TABLES["token"]

    def physical(self, logical: str) -> str:
        """Physical name of a logical table (``application``, ``grant`` or ``token``)."""
        value: str = getattr(self, logical)
        return value


@dataclass(frozen=True, slots=True)
class MigrateSettings:
    """Timeouts and retries for DDL."""

    lock_timeout_ms: int = 2000
    lock_retries: int = 8
    statement_timeout_ms: int = 30000
    # Index builds, index drops and VALIDATE: they wait for older snapshots and take only
    # SHARE UPDATE EXCLUSIVE (reads and writes go on), so they get a long budget of their own.
    index_timeout_ms: int = 1_800_000


@dataclass(frozen=True, slots=True)
class ClientMetadataDefaults:
    """What the client-metadata backfill writes for existing applications."""

    confidential_auth_method: str = "client_secret_basic"
    grant_types: tuple[str, ...] = ("authorization_code", "refresh_token")
    response_types: tuple[str, ...] = ("code",)


@dataclass(frozen=True, slots=True)
class ReplicaConfig:
    """A replica whose lag the backfill watches. ``url`` holds the password: never print it."""

    url: str = field(repr=False)
    display_url: str


@dataclass(frozen=True, slots=True)
class HealthSettings:
    """``[backfill.health]``: what the backfill checks between batches before going on.

    All probes are off by default. ``replica_error`` is set when ``replica_url_env`` names an
    unset variable (resolved lazily, like ``url_env``: only a backfill needs the replicas).
    """

    max_replica_lag_ms: int | None = None
    replicas: tuple[ReplicaConfig, ...] = ()
    replica_error: str | None = None
    lag_on_primary: bool = False
    max_autovacuum_on_table_ms: int | None = None
    check_sql: str | None = None
    check_max: float | None = None
    health_interval_ms: int = 5000
    probe_timeout_ms: int = 5000

    @property
    def enabled(self) -> bool:
        """True if any probe is configured."""
        return (
            self.max_replica_lag_ms is not None
            or self.max_autovacuum_on_table_ms is not None
            or self.check_sql is not None
        )


@dataclass(frozen=True, slots=True)
class BackfillSettings:
    """Batching and pacing of backfill jobs."""

    batch_size: int = 1000
    target_batch_seconds: float = 0.1
    sleep_seconds: float = 0.0
    #: Share of wall time spent in batches (sleep >= batch * (1/duty - 1)). None: 1.0 as the
    #: ceiling of latency pacing (PostgreSQL with max_latency_ratio), else 0.5.
    max_duty: float | None = None
    #: Latency pacing: keep the application's statements in flight and the probe's latency
    #: within this multiple of their baselines (:mod:`oauthmig.rollout.pacing`); 0 turns it off.
    max_latency_ratio: float = 1.5
    outage_window_ms: int = 60000  # how long a lost connection is retried before failing
    keep_batches: int = 1000  # batch-history rows kept per job (older ones are summarized)
    client_metadata: ClientMetadataDefaults = field(default_factory=ClientMetadataDefaults)
    health: HealthSettings = field(default_factory=HealthSettings)

    def duty(self, paced: bool) -> float:
        """The duty cycle in force: ``max_duty`` if set, else 1.0 under latency pacing (the
        pacer's ceiling) and 0.5 without it."""
        if self.max_duty is not None:
            return self.max_duty
        return 1.0 if paced else 0.5


#: ``status --summary``: databases read at once, and how long one may take (seconds).
SUMMARY_CONCURRENCY = 8
SUMMARY_TIMEOUT_SECONDS = 10.0
#: GitHub code scanning rejects a run with more results than this ("Results per run"); its other
#: limits (20 runs per file, 25,000 rules per run, 1,000 locations per result, 20 tags per rule)
#: are far above what one oauthmig run holds (1 run, 30 rules, 1 location, no tags).
SARIF_MAX_RESULTS = 25_000

#: Where ``docs/rules.md`` is published; SARIF ``helpUri`` values are this plus ``#<anchor>``.
DEFAULT_DOCS_URL = "https://github.com/oauthmig/oauthmig/blob/main/docs/rules.md"


@dataclass(frozen=True, slots=True)
class AuditSettings:
    """Redirect audit options. ``docs_url`` is the absolute URL of the rules reference
    (``docs/rules.md``) that SARIF reports link each rule to."""

    ignore: tuple[str, ...] = ()
    docs_url: str = DEFAULT_DOCS_URL


#: A value a ``[models.defaults.<table>]`` key may hold: TOML scalars and lists of strings.
ColumnDefault = bool | int | float | str | tuple[str, ...]


@dataclass(frozen=True, slots=True)
class ModelSettings:
    """What the models library writes into columns it does not manage (``[models]``).

    ``defaults`` maps a logical table to ``{column: value}``, used on insert when the caller
    passes no value and there is no row to copy from.
    """

    defaults: Mapping[str, Mapping[str, ColumnDefault]] = field(default_factory=dict)


#: The name of the implied last wave: the databases no ``[waves]`` entry lists.
REST_WAVE = "rest"


@dataclass(frozen=True, slots=True)
class Wave:
    """One named group of databases of a rollout (``[waves]``); waves run in file order.

    ``implied``: the ``rest`` wave, the databases that no configured wave lists."""

    name: str
    databases: tuple[str, ...]
    implied: bool = False


@dataclass(frozen=True, slots=True)
class EnforcementSettings:
    """``[enforcement]``: a mode per check (only the keys given; the rest keep the policy's
    defaults) and ``[enforcement.clients."<client_id>"]`` overrides."""

    modes: Mapping[str, str] = field(default_factory=dict)
    clients: Mapping[str, Mapping[str, str]] = field(default_factory=dict)

    def mode(self, check: str) -> str:
        """The global mode of ``check`` (its default when not set)."""
        return self.modes.get(check, ENFORCEMENT_DEFAULTS[check])

    def observed(self, check: str) -> bool:
        """Whether ``check`` runs in observe mode globally or for some client."""
        return self.mode(check) == "observe" or any(
            over.get(check) == "observe" for over in self.clients.values()
        )


@dataclass(frozen=True, slots=True)
class Settings:
    """Everything a command needs to know about the installation."""

    databases: Mapping[str, DatabaseConfig]
    routing: Mapping[str, tuple[str, ...]]
    tables: TableNames = field(default_factory=TableNames)
    migrate: MigrateSettings = field(default_factory=MigrateSettings)
    backfill: BackfillSettings = field(default_factory=BackfillSettings)
    audit: AuditSettings = field(default_factory=AuditSettings)
    source: str = "embedded default"
    models: ModelSettings = field(default_factory=ModelSettings)
    enforcement: EnforcementSettings = field(default_factory=EnforcementSettings)
    #: ``[waves]`` in order, the implied ``rest`` wave last; empty when none are configured.
    waves: tuple[Wave, ...] = ()

    def tables_on(self, database: str) -> tuple[str, ...]:
        """Logical tables routed to ``database``, in canonical order."""
        return tuple(t for t in LOGICAL_TABLES if database in self.routing.get(t, ()))

    def database_names(self) -> tuple[str, ...]:
        """Configured database names, in file order."""
        return tuple(self.databases)

    def restrict(self, names: tuple[str, ...]) -> Settings:
        """Settings limited to ``names`` (``--database``); unknown names are a usage error."""
        if not names:
            return self
        unknown = [n for n in names if n not in self.databases]
        if unknown:
            known = ", ".join(self.databases)
            raise ConfigError(f"--database {unknown[0]}: no such database (configured: {known})")
        keep = {n: self.databases[n] for n in self.databases if n in names}
        routing = {t: tuple(d for d in dbs if d in keep) for t, dbs in self.routing.items()}
        return Settings(
            keep,
            routing,
            self.tables,
            self.migrate,
            self.backfill,
            self.audit,
            self.source,
            self.models,
            self.enforcement,
            self.waves,
        )


# PostgreSQL keeps lock_timeout and statement_timeout in a 32-bit count of milliseconds.
MAX_DURATION_MS = 2_147_483_647


def parse_duration_ms(
    value: object, key: str, low_ms: int = 0, high_ms: int = MAX_DURATION_MS
) -> int:
    """Parse ``"2s"``, ``"500ms"``, ``"1m"``, ``"2h"``, ``"7d"`` or a number of seconds into ms.

    ``nan``, ``inf`` and values outside ``low_ms..high_ms`` are refused, naming ``key``.
    """
    expected = f'{key}: expected a duration like "2s" or "500ms", got {value!r}'
    if isinstance(value, bool):
        raise ConfigError(expected)
    if isinstance(value, int | float):
        number, factor = float(value), 1000
    elif isinstance(value, str) and (m := _DURATION.match(value)):
        number = float(m.group(1))
        factor = {"ms": 1, "s": 1000, "m": 60000, "min": 60000, "h": 3_600_000, "d": 86_400_000}[
            m.group(2) or "s"
        ]
    else:
        raise ConfigError(expected)
    if math.isnan(number):
        raise ConfigError(expected)
    if number < 0:
        raise ConfigError(f"{key}: must not be negative")
    ms = number * factor
    if not low_ms <= ms <= high_ms:
        raise ConfigError(
            f"{key}: must be between {_show_ms(low_ms)} and {_show_ms(high_ms)}, got {value!r}"
        )
    return int(ms)


def _show_ms(ms: int) -> str:
    if ms == MAX_DURATION_MS:
        return f"{ms}ms (about 24 days)"
    return f"{ms}ms"


def redact_url(url: URL) -> str:
    """The URL as text with its password and secret query parameters replaced by ``***``."""
    return mask_url(url)


def parse_database_url(raw: str, key: str) -> URL:
    """Validate a database URL (PostgreSQL or SQLite); the error never echoes the URL."""
    from sqlalchemy.engine import make_url  # here: commands that read no database skip it
    from sqlalchemy.exc import ArgumentError

    try:
        url = make_url(raw.strip())
    except (ArgumentError, ValueError):
        raise ConfigError(
            f"{key}: not a valid database URL; expected e.g. "
            "postgresql+psycopg://user@host:5432/dbname or sqlite:///path/to/file.sqlite3"
        ) from None
    backend = url.get_backend_name()
    if backend == "postgresql":
        if url.drivername in ("postgresql", "postgres", "postgresql+psycopg"):
            url = url.set(drivername="postgresql+psycopg")
        else:
            raise ConfigError(
                f"{key}: driver {url.get_driver_name()!r} is not supported; use postgresql+psycopg://"
            )
        if not url.database:
            raise ConfigError(f"{key}: the PostgreSQL URL names no database")
    elif backend == "sqlite":
        if url.drivername not in ("sqlite", "sqlite+pysqlite"):
            raise ConfigError(
                f"{key}: driver {url.get_driver_name()!r} is not supported; use sqlite://"
            )
    else:
        raise ConfigError(f"{key}: unsupported database {backend!r}; use postgresql or sqlite")
    return url


def _table(data: Mapping[str, Any], key: str) -> dict[str, Any]:
    value = data.get(key, {})
    if not isinstance(value, dict):
        raise ConfigError(f"{key}: expected a table ([{key}])")
    return value


def _check_keys(data: Mapping[str, Any], allowed: tuple[str, ...], prefix: str) -> None:
    for k in data:
        if k not in allowed:
            where = f"{prefix}.{k}" if prefix else k
            raise ConfigError(f"{where}: unknown key (allowed: {', '.join(allowed)})")


def _int(value: object, key: str, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{key}: expected a whole number, got {value!r}")
    if not low <= value <= high:
        raise ConfigError(f"{key}: must be between {low} and {high}, got {value}")
    return value


def _float(value: object, key: str, low: float, high: float) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or math.isnan(value):
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if not low <= float(value) <= high:
        raise ConfigError(f"{key}: must be between {low} and {high}, got {value}")
    return float(value)


def _latency_ratio(value: object) -> float:
    """``backfill.max_latency_ratio``: 0 (pacing off) or a ratio from 1.05 to 100."""
    key = "backfill.max_latency_ratio"
    if value == 0 and not isinstance(value, bool):
        return 0.0
    try:
        return _float(value, key, 1.05, 100.0)
    except ConfigError as exc:
        raise ConfigError(f"{exc.message} (0 turns latency pacing off)") from None


def _str_list(value: object, key: str, allowed: tuple[str, ...] | None = None) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ConfigError(f"{key}: expected a list of strings")
    if allowed is not None:
        for v in value:
            if v not in allowed:
                raise ConfigError(f"{key}: {v!r} is not one of {', '.join(allowed)}")
    return tuple(value)


def _database_url(
    data: Mapping[str, Any], env: Mapping[str, str], key: str, prefix: str
) -> tuple[URL | None, str | None, str | None]:
    """``(url, shown, error)`` of ``<prefix>`` / ``<prefix>_env`` (``url`` or ``direct_url``);
    an unset variable is not an error yet (``error``): it is resolved lazily, so a database
    excluded with --database need not have its variable set."""
    if prefix in data:
        if not isinstance(data[prefix], str) or not data[prefix].strip():
            raise ConfigError(f"{key}.{prefix}: expected a non-empty string")
        url = parse_database_url(data[prefix], f"{key}.{prefix}")
        return url, redact_url(url), None
    var = data[f"{prefix}_env"]
    if not isinstance(var, str) or not re.match(r"^[A-Za-z_][A-Za-z0-9_]*$", var):
        raise ConfigError(f"{key}.{prefix}_env: expected an environment variable name")
    raw = env.get(var)
    if raw is None or not raw.strip():
        return None, f"${var}", f"{key}.{prefix}_env: environment variable {var} is not set"
    url = parse_database_url(raw, f"{key}.{prefix}_env ({var})")
    return url, redact_url(url), None


def _database(name: str, data: object, env: Mapping[str, str]) -> DatabaseConfig:
    key = f"databases.{name}"
    if not _DB_NAME.match(name):
        raise ConfigError(f"{key}: database names use letters, digits, '_' and '-'")
    if not isinstance(data, dict):
        raise ConfigError(f"{key}: expected a table with url or url_env")
    _check_keys(data, ("url", "url_env", "direct_url", "direct_url_env"), key)
    if ("url" in data) == ("url_env" in data):
        raise ConfigError(f"{key}: set exactly one of url or url_env")
    if "direct_url" in data and "direct_url_env" in data:
        raise ConfigError(f"{key}: set at most one of direct_url or direct_url_env")
    url, shown, error = _database_url(data, env, key, "url")
    assert shown is not None
    db = DatabaseConfig(
        name,
        None if url is None else url.render_as_string(hide_password=False),
        shown,
        "unknown" if url is None else url.get_backend_name(),
        error,
    )
    if "direct_url" not in data and "direct_url_env" not in data:
        return db
    direct, direct_shown, direct_error = _database_url(data, env, key, "direct_url")
    if direct is not None:
        if direct.get_backend_name() != "postgresql":
            raise ConfigError(
                f"{key}.direct_url: only PostgreSQL databases have a direct URL (a connection "
                "that bypasses a pooler); remove it"
            )
        if url is not None and url.get_backend_name() != "postgresql":
            raise ConfigError(f"{key}.direct_url: url is not PostgreSQL; remove direct_url")
    return replace(
        db,
        direct_url=None if direct is None else direct.render_as_string(hide_password=False),
        direct_display_url=direct_shown,
        direct_url_error=direct_error,
    )


def settings_from_mapping(data: Mapping[str, Any], env: Mapping[str, str], source: str) -> Settings:
    """Build and validate settings from parsed TOML (each section in turn, in file order)."""
    _check_keys(
        data,
        (
            "databases",
            "routing",
            "tables",
            "migrate",
            "backfill",
            "audit",
            "models",
            "enforcement",
            "waves",
        ),
        "",
    )
    dbs_raw = _table(data, "databases")
    if not dbs_raw:
        raise ConfigError("databases: at least one database must be configured ([databases.NAME])")
    databases = {name: _database(name, value, env) for name, value in dbs_raw.items()}
    routing = _routing(_table(data, "routing"), databases)
    tables = _tables(_table(data, "tables"))
    migrate = _migrate(_table(data, "migrate"))
    backfill = _backfill(_table(data, "backfill"), env)
    audit = _audit(_table(data, "audit"))
    models = _models(_table(data, "models"))
    enforcement = _enforcement(_table(data, "enforcement"))
    waves = _waves(_table(data, "waves"), tuple(databases))
    return Settings(
        databases, routing, tables, migrate, backfill, audit, source, models, enforcement, waves
    )


def _routing(
    routing_raw: Mapping[str, Any], databases: Mapping[str, DatabaseConfig]
) -> dict[str, tuple[str, ...]]:
    """``[routing]``: the databases each logical table lives on (all of one database's, when
    there is only one)."""
    _check_keys(routing_raw, LOGICAL_TABLES, "routing")
    routing: dict[str, tuple[str, ...]] = {}
    for logical in LOGICAL_TABLES:
        key = f"routing.{logical}"
        if logical not in routing_raw:
            if len(databases) == 1:
                routing[logical] = tuple(databases)
                continue
            raise ConfigError(
                f"{key}: table is routed to no database; list the databases hosting it"
            )
        value = routing_raw[logical]
        if isinstance(value, str):
            value = [value]
        names = _str_list(value, key)
        if not names:
            raise ConfigError(
                f"{key}: table is routed to no database; list the databases hosting it"
            )
        for n in names:
            if n not in databases:
                raise ConfigError(
                    f"{key}: unknown database {n!r} (configured: {', '.join(databases)})"
                )
        if len(set(names)) != len(names):
            raise ConfigError(f"{key}: a database is listed twice")
        routing[logical] = names
    return routing


def _tables(tables_raw: Mapping[str, Any]) -> TableNames:
    """``[tables]``: the physical name of each logical table."""
    _check_keys(tables_raw, LOGICAL_TABLES, "tables")
    names_map = dict(DEFAULT_TABLES)
    for logical, value in tables_raw.items():
        if not isinstance(value, str) or not _IDENTIFIER.match(value):
            raise ConfigError(
                f"tables.{logical}: {value!r} is not a plain SQL name (letters, digits, _; max 63)"
            )
        names_map[logical] = value
    if len(set(names_map.values())) != len(names_map):
        raise ConfigError("tables: two logical tables map to the same physical table")
    tables = TableNames(**names_map)
    return tables


def _migrate(mig_raw: Mapping[str, Any]) -> MigrateSettings:
    """``[migrate]``: the lock and statement timeouts of DDL, none of them zero."""
    _check_keys(
        mig_raw,
        ("lock_timeout", "lock_retries", "statement_timeout", "index_timeout"),
        "migrate",
    )
    migrate = MigrateSettings(
        lock_timeout_ms=parse_duration_ms(
            mig_raw.get("lock_timeout", "2s"), "migrate.lock_timeout"
        ),
        lock_retries=_int(mig_raw.get("lock_retries", 8), "migrate.lock_retries", 0, 100),
        statement_timeout_ms=parse_duration_ms(
            mig_raw.get("statement_timeout", "30s"), "migrate.statement_timeout"
        ),
        index_timeout_ms=parse_duration_ms(
            mig_raw.get("index_timeout", "30min"), "migrate.index_timeout"
        ),
    )
    if migrate.index_timeout_ms <= 0:
        raise ConfigError(
            'migrate.index_timeout: must be greater than zero (0 would wait forever); e.g. "30min"'
        )
    if migrate.lock_timeout_ms <= 0:
        raise ConfigError("migrate.lock_timeout: must be greater than zero (0 would wait forever)")
    if migrate.statement_timeout_ms <= 0:
        # PostgreSQL reads statement_timeout = 0 as "no limit": refused like the other bounds.
        raise ConfigError(
            "migrate.statement_timeout: must be greater than zero (0 would remove the limit); "
            'e.g. "30s"'
        )
    return migrate


def _backfill(bf_raw: Mapping[str, Any], env: Mapping[str, str]) -> BackfillSettings:
    """``[backfill]``: batch sizing and pacing, ``client_metadata`` and ``health``."""
    _check_keys(
        bf_raw,
        (
            "batch_size",
            "target_batch_seconds",
            "sleep_seconds",
            "max_duty",
            "max_latency_ratio",
            "outage_window",
            "keep_batches",
            "client_metadata",
            "health",
        ),
        "backfill",
    )
    client_metadata = _client_metadata(bf_raw.get("client_metadata", {}))
    return BackfillSettings(
        batch_size=_int(bf_raw.get("batch_size", 1000), "backfill.batch_size", 1, 10_000_000),
        target_batch_seconds=_float(
            bf_raw.get("target_batch_seconds", 0.1), "backfill.target_batch_seconds", 0.01, 600
        ),
        sleep_seconds=_float(bf_raw.get("sleep_seconds", 0.0), "backfill.sleep_seconds", 0, 3600),
        max_duty=None
        if bf_raw.get("max_duty") is None
        else _float(bf_raw["max_duty"], "backfill.max_duty", 0.01, 1.0),
        max_latency_ratio=_latency_ratio(bf_raw.get("max_latency_ratio", 1.5)),
        outage_window_ms=parse_duration_ms(
            bf_raw.get("outage_window", "60s"), "backfill.outage_window"
        ),
        keep_batches=_int(bf_raw.get("keep_batches", 1000), "backfill.keep_batches", 1, 1_000_000),
        client_metadata=client_metadata,
        health=_health(bf_raw.get("health", {}), env),
    )


def _client_metadata(cm_raw: object) -> ClientMetadataDefaults:
    """``[backfill.client_metadata]``: what the backfill writes for an application."""
    if not isinstance(cm_raw, dict):
        raise ConfigError("backfill.client_metadata: expected a table")
    _check_keys(
        cm_raw,
        ("confidential_auth_method", "grant_types", "response_types"),
        "backfill.client_metadata",
    )
    method = cm_raw.get("confidential_auth_method", "client_secret_basic")
    if method not in CONFIDENTIAL_AUTH_METHODS:
        raise ConfigError(
            f"backfill.client_metadata.confidential_auth_method: {method!r} is not one of "
            + ", ".join(CONFIDENTIAL_AUTH_METHODS)
        )
    grant_types = _str_list(
        cm_raw.get("grant_types", ["authorization_code", "refresh_token"]),
        "backfill.client_metadata.grant_types",
        GRANT_TYPES,
    )
    response_types = _str_list(
        cm_raw.get("response_types", ["code"]),
        "backfill.client_metadata.response_types",
        RESPONSE_TYPES,
    )
    if not grant_types:
        raise ConfigError("backfill.client_metadata.grant_types: must not be empty")
    if not response_types:
        raise ConfigError("backfill.client_metadata.response_types: must not be empty")
    return ClientMetadataDefaults(method, grant_types, response_types)


def _audit(audit_raw: Mapping[str, Any]) -> AuditSettings:
    """``[audit]``: rule codes to ignore, and where the rules are documented."""
    _check_keys(audit_raw, ("ignore", "docs_url"), "audit")
    ignore = _str_list(audit_raw.get("ignore", []), "audit.ignore")
    for code in ignore:
        if not re.match(r"^RU\d{3}$", code):
            raise ConfigError(f"audit.ignore: {code!r} is not a rule code like RU014")
    docs_url = check_docs_url(audit_raw.get("docs_url", DEFAULT_DOCS_URL), "audit.docs_url")
    return AuditSettings(ignore, docs_url)


def _waves(raw: Mapping[str, Any], databases: tuple[str, ...]) -> tuple[Wave, ...]:
    """``[waves]``: ``NAME = ["db", ...]`` in rollout order; every database in at most one
    wave; the databases no wave lists form the implied last wave ``rest``."""
    waves: list[Wave] = []
    seen: dict[str, str] = {}
    for name, value in raw.items():
        key = f"waves.{name}"
        if name == REST_WAVE:
            raise ConfigError(
                f"{key}: the name {REST_WAVE!r} is reserved for the databases no wave lists; "
                "rename the wave"
            )
        if not _DB_NAME.match(name):
            raise ConfigError(f"{key}: a wave name is letters, digits, _ and - (max 63)")
        if isinstance(value, str):
            value = [value]
        names = _str_list(value, key)
        if not names:
            raise ConfigError(f"{key}: a wave lists at least one database")
        for n in names:
            if n not in databases:
                raise ConfigError(
                    f"{key}: unknown database {n!r} (configured: {', '.join(databases)})"
                )
            if n in seen:
                raise ConfigError(f"{key}: database {n!r} is already in wave {seen[n]!r}")
            seen[n] = name
        waves.append(Wave(name, names))
    rest = tuple(d for d in databases if d not in seen)
    if waves and rest:
        waves.append(Wave(REST_WAVE, rest, implied=True))
    return tuple(waves)


_HEALTH_KEYS = (
    "max_replica_lag",
    "replica_urls",
    "replica_url_env",
    "lag_on_primary",
    "max_autovacuum_on_table",
    "check_sql",
    "check_max",
    "health_interval",
    "probe_timeout",
)
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def _replica(raw: str, key: str) -> ReplicaConfig:
    url = parse_database_url(raw, key)
    if url.get_backend_name() != "postgresql":
        raise ConfigError(f"{key}: replicas are PostgreSQL servers; give a postgresql:// URL")
    return ReplicaConfig(url.render_as_string(hide_password=False), redact_url(url))


def _health(raw: object, env: Mapping[str, str]) -> HealthSettings:
    """``[backfill.health]``: the probes the backfill runs between batches."""
    prefix = "backfill.health"
    if not isinstance(raw, dict):
        raise ConfigError(f"{prefix}: expected a table ([{prefix}])")
    _check_keys(raw, _HEALTH_KEYS, prefix)
    lag_ms: int | None = None
    if "max_replica_lag" in raw:
        lag_ms = parse_duration_ms(raw["max_replica_lag"], f"{prefix}.max_replica_lag")
        if lag_ms <= 0:
            raise ConfigError(f'{prefix}.max_replica_lag: must be greater than zero, e.g. "10s"')
    replicas: list[ReplicaConfig] = []
    urls = raw.get("replica_urls", [])
    if not isinstance(urls, list) or not all(isinstance(u, str) and u.strip() for u in urls):
        raise ConfigError(f"{prefix}.replica_urls: expected a list of PostgreSQL URLs")
    for i, u in enumerate(urls):
        replicas.append(_replica(u, f"{prefix}.replica_urls[{i}]"))
    names = raw.get("replica_url_env", [])
    if isinstance(names, str):
        names = [names]
    if not isinstance(names, list) or not all(
        isinstance(n, str) and _ENV_NAME.match(n) for n in names
    ):
        raise ConfigError(
            f"{prefix}.replica_url_env: expected an environment variable name (or a list)"
        )
    replica_error: str | None = None
    for n in names:
        value = env.get(n)
        if value is None or not value.strip():
            replica_error = replica_error or (
                f"{prefix}.replica_url_env: environment variable {n} is not set"
            )
            continue
        replicas.append(_replica(value, f"{prefix}.replica_url_env ({n})"))
    on_primary = raw.get("lag_on_primary", False)
    if not isinstance(on_primary, bool):
        raise ConfigError(f"{prefix}.lag_on_primary: expected true or false")
    if lag_ms is None and (replicas or names or on_primary):
        raise ConfigError(
            f"{prefix}: replica_urls, replica_url_env and lag_on_primary need "
            'max_replica_lag (e.g. max_replica_lag = "10s")'
        )
    autovacuum_ms: int | None = None
    if "max_autovacuum_on_table" in raw:
        autovacuum_ms = parse_duration_ms(
            raw["max_autovacuum_on_table"], f"{prefix}.max_autovacuum_on_table"
        )
    check_sql = raw.get("check_sql")
    check_max: float | None = None
    if check_sql is not None and (not isinstance(check_sql, str) or not check_sql.strip()):
        raise ConfigError(f"{prefix}.check_sql: expected a SELECT returning one number")
    if ("check_sql" in raw) != ("check_max" in raw):
        raise ConfigError(
            f"{prefix}: check_sql and check_max go together (the query, and the largest "
            "value it may return while the backfill goes on)"
        )
    if "check_max" in raw:
        check_max = _float(raw["check_max"], f"{prefix}.check_max", -1e15, 1e15)
    return HealthSettings(
        max_replica_lag_ms=lag_ms,
        replicas=tuple(replicas),
        replica_error=replica_error,
        lag_on_primary=bool(on_primary) or (lag_ms is not None and not replicas and not names),
        max_autovacuum_on_table_ms=autovacuum_ms,
        check_sql=check_sql.strip() if isinstance(check_sql, str) else None,
        check_max=check_max,
        health_interval_ms=parse_duration_ms(
            raw.get("health_interval", "5s"), f"{prefix}.health_interval", 100, 3_600_000
        ),
        probe_timeout_ms=parse_duration_ms(
            raw.get("probe_timeout", "5s"), f"{prefix}.probe_timeout", 1000, 300_000
        ),
    )


def _models(raw: Mapping[str, Any]) -> ModelSettings:
    """``[models.defaults.<logical table>]``: column = value, for unmanaged columns."""
    _check_keys(raw, ("defaults",), "models")
    defaults_raw = raw.get("defaults", {})
    if not isinstance(defaults_raw, dict):
        raise ConfigError("models.defaults: expected a table ([models.defaults.grant])")
    _check_keys(defaults_raw, LOGICAL_TABLES, "models.defaults")
    defaults: dict[str, dict[str, ColumnDefault]] = {}
    for logical, columns in defaults_raw.items():
        key = f"models.defaults.{logical}"
        if not isinstance(columns, dict):
            raise ConfigError(f"{key}: expected a table of column = value")
        values: dict[str, ColumnDefault] = {}
        for column, value in columns.items():
            where = f"{key}.{column}"
            if not _IDENTIFIER.match(column):
                raise ConfigError(f"{where}: {column!r} is not a plain SQL column name")
            if isinstance(value, bool | int | float | str):
                values[column] = value
            elif isinstance(value, list) and all(isinstance(v, str) for v in value):
                values[column] = tuple(value)
            else:
                raise ConfigError(
                    f"{where}: expected a number, string, boolean or list of strings, "
                    f"got {type(value).__name__}"
                )
        defaults[logical] = values
    return ModelSettings(defaults)


def _modes(raw: Mapping[str, Any], prefix: str) -> dict[str, str]:
    modes: dict[str, str] = {}
    for check, mode in raw.items():
        if mode not in ENFORCEMENT_MODES:
            raise ConfigError(
                f"{prefix}.{check}: expected one of {', '.join(ENFORCEMENT_MODES)}, got {mode!r}"
            )
        modes[check] = mode
    return modes


def _enforcement(raw: Mapping[str, Any]) -> EnforcementSettings:
    """``[enforcement]``: check = mode, and ``[enforcement.clients."<client_id>"]`` overrides."""
    _check_keys(raw, (*ENFORCEMENT_CHECKS, "clients"), "enforcement")
    modes = _modes({k: v for k, v in raw.items() if k != "clients"}, "enforcement")
    clients_raw = raw.get("clients", {})
    if not isinstance(clients_raw, dict):
        raise ConfigError('enforcement.clients: expected a table ([enforcement.clients."ID"])')
    clients: dict[str, dict[str, str]] = {}
    for client_id, over in clients_raw.items():
        key = f"enforcement.clients.{client_id}"
        if not isinstance(over, dict):
            raise ConfigError(f"{key}: expected a table of check = mode")
        _check_keys(over, ENFORCEMENT_CHECKS, key)
        clients[client_id] = _modes(over, key)
    return EnforcementSettings(modes, clients)


def check_docs_url(value: object, key: str) -> str:
    """``value`` if it is an absolute http(s) URL with a host and without userinfo, query or
    fragment (the rule anchors are appended to it); else ConfigError naming ``key``."""
    example = "https://docs.example.com/oauthmig/rules.md"
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{key}: expected an absolute http(s) URL such as {example}")
    try:
        parsed = parse_uri(value)
    except URIError as exc:
        raise ConfigError(f"{key}: not a URL ({exc.reason}); use one such as {example}") from None
    if (parsed.scheme or "").lower() not in ("http", "https") or not parsed.host:
        raise ConfigError(f"{key}: expected an absolute http(s) URL such as {example}")
    if parsed.userinfo is not None or parsed.query is not None or parsed.fragment is not None:
        raise ConfigError(
            f"{key}: must not have credentials, a query or a fragment (rule anchors are "
            f"appended as #ru001-not-a-uri); use a URL such as {example}"
        )
    return value


def embedded_default(base: Path) -> Settings:
    """Two SQLite databases under ``base/.oauthmig``: control (all tables) and shard (token)."""
    folder = base / EMBEDDED_DIR
    data = {
        "databases": {
            "control": {"url": f"sqlite:///{folder / 'control.sqlite3'}"},
            "shard": {"url": f"sqlite:///{folder / 'shard.sqlite3'}"},
        },
        "routing": {
            "application": ["control"],
            "grant": ["control"],
            "token": ["control", "shard"],
        },
    }
    return settings_from_mapping(data, {}, f"embedded default ({folder})")


def load_settings(
    path: str | None = None, env: Mapping[str, str] | None = None, cwd: Path | None = None
) -> Settings:
    """Resolve and load the configuration (see module docstring for the order)."""
    env = os.environ if env is None else env
    cwd = Path.cwd() if cwd is None else cwd
    chosen: Path | None = None
    if path is not None:
        chosen = Path(path)
    elif env.get(ENV_CONFIG):
        chosen = Path(env[ENV_CONFIG])
    elif (cwd / "oauthmig.toml").is_file():
        chosen = cwd / "oauthmig.toml"
    if chosen is None:
        return embedded_default(cwd)
    try:
        text = chosen.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"config file {chosen} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(
            f"config file {chosen} cannot be read: {exc.__class__.__name__}"
        ) from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {chosen}: invalid TOML: {exc}") from None
    return settings_from_mapping(data, env, str(chosen))
