"""Legacy demo data: the tables a Sentry-style provider has before oauthmig, filled with
realistic rows (messy redirect URIs included) behind ``oauthmig demo``.

:func:`setup_legacy` creates the legacy tables on every configured database, as routed, and
fills them. It refuses to touch a database where a routed table (or an ``oauthmig_*`` table)
already exists unless an earlier demo left its marker table ``oauthmig_demo`` there; over an
earlier demo it drops the demo tables and every ``oauthmig_*`` table and starts again.

Everything is a function of ``seed`` except absolute times, which are relative to the moment
of the run so that "live" grants are live when the rollout runs right after.
:data:`PLANTED` says which example of each redirect rule (docs/rules.md) the data holds.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import MappingProxyType
from typing import Any, cast

import psycopg
from psycopg import sql
from sqlalchemy import (
    BigInteger,
    Column,
    DateTime,
    ForeignKeyConstraint,
    Integer,
    MetaData,
    Table,
    UniqueConstraint,
    insert,
    inspect,
    text,
)
from sqlalchemy.engine import Connection, make_url
from sqlalchemy.schema import (
    AddConstraint,
    CreateIndex,
    DropConstraint,
    DropIndex,
    ExecutableDDLElement,
)

from oauthmig.config import DatabaseConfig, Settings
from oauthmig.db import map_db_errors, open_database
from oauthmig.errors import DatabaseError, UsageError
from oauthmig.legacy import USERS_TABLE, legacy_metadata
from oauthmig.uri import GRANT_REDIRECT_URI_LENGTH

__all__ = [
    "MARKER_TABLE",
    "PLANTED",
    "PLANTED_MIN_APPS",
    "DemoCounts",
    "DemoSetup",
    "Progress",
    "setup_legacy",
]

#: The table whose presence says "the legacy tables here were created by ``oauthmig demo``".
MARKER_TABLE = "oauthmig_demo"
#: Tables oauthmig itself writes (version table, revision log, backfill state) share this prefix.
OAUTHMIG_PREFIX = "oauthmig_"

Progress = Callable[[str, int, int], None]
"""``progress(label, done, total)``, called periodically while rows are loaded."""

GRANT_TTL = timedelta(minutes=10)
TOKEN_TTL = timedelta(days=30)
GRANTS_PER_APP = 1.5
LIVE_GRANT_SHARE = 0.3
UNREGISTERED_LIVE_GRANTS = 3  # per database hosting grants (RU103)
MESSY_APP_SHARE = 0.25  # of the applications that are not planted examples

_CHUNK = 5_000  # rows per executemany on SQLite
_REPORT_EVERY = 10_000  # rows between progress calls


@dataclass(frozen=True, slots=True)
class DemoCounts:
    """What the demo loaded into one database."""

    database: str
    applications: int
    grants: int
    live_grants: int
    tokens: int
    refreshable_tokens: int


@dataclass(frozen=True, slots=True)
class DemoSetup:
    """The seed used and the counts per database (databases hosting no table are left out)."""

    seed: int
    databases: tuple[DemoCounts, ...]


# --------------------------------------------------------------------------- planted examples


def _web(n: str) -> str:
    return f"https://app-{n}.example.com/oauth/callback"


def _native(n: str) -> str:
    return f"com.example.app{n}:/oauth2redirect"


def _loopback(n: str) -> str:
    return f"http://127.0.0.1:{8000 + int(n) % 1000}/callback"


def _lines(*uris: str) -> str:
    return "\n".join(uris)


@dataclass(frozen=True, slots=True)
class _Plant:
    """One kind of legacy mess: the rule code it should trigger, a note for :data:`PLANTED`,
    and the ``redirect_uris`` text it produces for application number ``n``."""

    code: str
    note: str
    build: Callable[[str], str]
    secret: bool | None = None  # True: always a secret; None: the usual distribution


_LONG_QUERY = "&".join(f"param{i}=value{i:03d}" for i in range(18))
_PLANTS: tuple[_Plant, ...] = (
    # RU001 not-a-uri
    _Plant(
        "RU001",
        "space in the host `https://my app-N.example.com/oauth/callback`",
        lambda n: _lines(_web(n), f"https://my app-{n}.example.com/oauth/callback"),
    ),
    _Plant(
        "RU001",
        "control characters (tab, \\x01) inside a URI",
        lambda n: _lines(
            f"https://app-{n}.example.com/oauth/call\tback", f"https://app-{n}.example.com/cb\x01"
        ),
    ),
    _Plant(
        "RU001",
        "non-ASCII IDN host `https://bücher-N.example.com/callback`",
        lambda n: _lines(f"https://bücher-{n}.example.com/callback"),
    ),
    _Plant(
        "RU001",
        "bad percent-encoding `https://app-N.example.com/cb%zz`",
        lambda n: _lines(_web(n), f"https://app-{n}.example.com/cb%zz"),
    ),
    _Plant(
        "RU001",
        "bad ports `:99999` and `:8o8o`",
        lambda n: _lines(
            f"https://app-{n}.example.com:99999/cb", f"https://app-{n}.example.com:8o8o/cb"
        ),
    ),
    _Plant("RU001", "`https://` without a host", lambda n: _lines(_web(n), "https://")),
    _Plant(
        "RU001",
        "bad IP literal `http://[::1:8080/callback` and bad scheme `ht_tp://…`",
        lambda n: _lines(
            _native(n), "http://[::1:8080/callback", f"ht_tp://app-{n}.example.com/cb"
        ),
    ),
    # RU002 relative
    _Plant(
        "RU002",
        "relative `/callback` and `oauth/callback`",
        lambda n: _lines(_web(n), "/callback", "oauth/callback"),
    ),
    _Plant(
        "RU002",
        "network-path reference `//app-N.example.com/cb`",
        lambda n: _lines(f"//app-{n}.example.com/cb"),
    ),
    # RU003 fragment
    _Plant(
        "RU003",
        "empty fragment `https://app-N.example.com/oauth/callback#`",
        lambda n: _lines(_web(n) + "#"),
    ),
    _Plant(
        "RU003",
        "fragment `https://app-N.example.com/oauth/callback#done`",
        lambda n: _lines(_web(n), _web(n) + "#done"),
    ),
    # RU004 wildcard
    _Plant(
        "RU004",
        "wildcard host `https://*.example.com/cb`",
        lambda n: _lines(_web(n), "https://*.example.com/cb"),
    ),
    _Plant(
        "RU004",
        "wildcard path `https://app-N.example.com/*`",
        lambda n: _lines(f"https://app-{n}.example.com/*"),
    ),
    _Plant(
        "RU004",
        "encoded wildcard host `https://%2A.example.com/`",
        lambda n: _lines(_web(n), "https://%2A.example.com/"),
    ),
    # RU005 userinfo
    _Plant(
        "RU005",
        "`https://user:pass@app-N.example.com/cb`",
        lambda n: _lines(f"https://user:pass@app-{n}.example.com/cb"),
    ),
    _Plant(
        "RU005",
        "empty userinfo `https://@app-N.example.com/cb`",
        lambda n: _lines(_web(n), f"https://@app-{n}.example.com/cb"),
    ),
    # RU006 forbidden-scheme
    _Plant("RU006", "`javascript:alert(1)`", lambda n: _lines(_web(n), "javascript:alert(1)")),
    _Plant(
        "RU006",
        "`data:text/html;base64,…`",
        lambda n: _lines("data:text/html;base64,PHNjcmlwdD5hbGVydCgxKTwvc2NyaXB0Pg=="),
    ),
    _Plant("RU006", "`file:///etc/passwd`", lambda n: _lines(_web(n), "file:///etc/passwd")),
    _Plant(
        "RU006",
        "`vbscript:msgbox(1)`, `about:blank`, `blob:https://…`",
        lambda n: _lines(
            "vbscript:msgbox(1)",
            "about:blank",
            f"blob:https://app-{n}.example.com/550e8400-e29b-41d4-a716-446655440000",
        ),
    ),
    # RU007 oob
    _Plant("RU007", "`urn:ietf:wg:oauth:2.0:oob`", lambda n: _lines("urn:ietf:wg:oauth:2.0:oob")),
    _Plant(
        "RU007",
        "`urn:ietf:wg:oauth:2.0:oob:auto` beside a native URI",
        lambda n: _lines(_native(n), "urn:ietf:wg:oauth:2.0:oob:auto"),
    ),
    # RU008 https-required
    _Plant(
        "RU008",
        "web app with `http://app-N.example.com/oauth/callback`",
        lambda n: _lines(_web(n), f"http://app-{n}.example.com/oauth/callback"),
    ),
    # RU009 http-not-loopback
    _Plant(
        "RU009",
        "native app with `http://127.0.0.2:PORT/callback` (loopback range, not 127.0.0.1)",
        lambda n: _lines(_native(n), f"http://127.0.0.2:{8000 + int(n) % 1000}/callback"),
    ),
    _Plant(
        "RU009",
        "`http://192.168.1.5/cb` among native URIs (the app becomes mixed: RU102, RU008)",
        lambda n: _lines(_native(n), _loopback(n), "http://192.168.1.5/cb"),
    ),
    # RU010 localhost-name
    _Plant(
        "RU010",
        "native app with `http://localhost:8080/cb`",
        lambda n: _lines(_native(n), "http://localhost:8080/cb"),
    ),
    # RU011 https-loopback
    _Plant(
        "RU011",
        "`https://127.0.0.1/cb` and `https://[::1]:8443/callback` beside native URIs",
        lambda n: _lines(_native(n), "https://127.0.0.1/cb", "https://[::1]:8443/callback"),
    ),
    # RU012 private-scheme-not-reverse-domain
    _Plant(
        "RU012",
        "private scheme without a dot `myapp:/cb`",
        lambda n: _lines("myapp:/cb", _loopback(n)),
    ),
    # RU013 private-scheme-form
    _Plant(
        "RU013", "`com.example.appN://callback`", lambda n: _lines(f"com.example.app{n}://callback")
    ),
    # RU014 not-normalized, and the stored-text quirks it reports
    _Plant(
        "RU014",
        "`HTTPS://App-N.Example.COM:443/a/../oauth/callback`",
        lambda n: _lines(f"HTTPS://App-{n}.Example.COM:443/a/../oauth/callback"),
    ),
    _Plant(
        "RU014",
        "empty path `https://app-N.example.com` and `%7e` escapes",
        lambda n: _lines(f"https://app-{n}.example.com", f"https://app-{n}.example.com/%7euser/cb"),
    ),
    _Plant(
        "RU014",
        "CRLF line separators",
        lambda n: "\r\n".join((_web(n), f"https://www.app-{n}.example.com/oauth/callback", "")),
    ),
    _Plant(
        "RU014",
        "blank lines between URIs",
        lambda n: f"\n{_web(n)}\n\n\nhttps://staging.app-{n}.example.com/oauth/callback\n",
    ),
    _Plant(
        "RU014",
        "surrounding spaces and tabs",
        lambda n: f"  {_web(n)}  \n\thttps://beta.app-{n}.example.com/oauth/callback ",
    ),
    # RU015 duplicate
    _Plant(
        "RU015",
        "the same URI twice",
        lambda n: _lines(_web(n), f"https://app-{n}.example.com/login", _web(n)),
    ),
    _Plant(
        "RU015",
        "two spellings of one URI (`https://APP-N.example.com:443/oauth/callback`)",
        lambda n: _lines(_web(n), f"https://APP-{n}.example.com:443/oauth/callback"),
    ),
    # RU016 too-long-for-grant
    _Plant(
        "RU016",
        "a redirect URI longer than 255 characters",
        lambda n: _lines(_web(n), f"{_web(n)}?{_LONG_QUERY}"),
    ),
    # RU101 no-redirect-uris
    _Plant("RU101", "empty redirect_uris", lambda n: ""),
    _Plant("RU101", "redirect_uris holding only blank lines", lambda n: "\n  \n"),
    # RU102 mixed-app-type
    _Plant("RU102", "web and native URIs in one app", lambda n: _lines(_web(n), _native(n))),
    _Plant("RU102", "web URI beside a loopback URI", lambda n: _lines(_web(n), _loopback(n))),
    # RU104 native-with-secret
    _Plant(
        "RU104",
        "native app (private scheme) with a client secret",
        lambda n: _lines(_native(n)),
        secret=True,
    ),
    _Plant(
        "RU104",
        "native app (loopback) with a client secret",
        lambda n: _lines(_loopback(n), f"http://[::1]:{9000 + int(n) % 1000}/callback"),
        secret=True,
    ),
)


@dataclass(frozen=True, slots=True)
class _MetadataPlant:
    """A legacy client metadata URL (RU105-RU108): the rule code, a note for :data:`PLANTED`,
    the column it is stored in and the value it gets for application number ``n``. Each goes
    on the application of the redirect plant with the same position, so no extra application
    is needed. RU109 and RU110 read ``token_endpoint_auth_method``, which legacy data lacks
    (the client-metadata backfill writes ``none`` only for clients without a secret)."""

    code: str
    note: str
    column: str
    build: Callable[[str], str]


_METADATA_PLANTS: tuple[_MetadataPlant, ...] = (
    _MetadataPlant(
        "RU105",
        "homepage_url without a scheme `www.app-N.example.com`",
        "homepage_url",
        lambda n: f"www.app-{n}.example.com",
    ),
    _MetadataPlant(
        "RU106",
        "homepage_url over http `http://app-N.example.com/`",
        "homepage_url",
        lambda n: f"http://app-{n}.example.com/",
    ),
    _MetadataPlant(
        "RU107",
        "terms_url with credentials `https://legal:…@app-N.example.com/terms` (masked in reports)",
        "terms_url",
        lambda n: f"https://legal:hunter{n}@app-{n}.example.com/terms",
    ),
    _MetadataPlant(
        "RU108",
        "privacy_url with a fragment `https://app-N.example.com/legal#privacy`",
        "privacy_url",
        lambda n: f"https://app-{n}.example.com/legal#privacy",
    ),
)

_RU103_NOTE = (
    f"{UNREGISTERED_LIVE_GRANTS} live grants per database hosting grants, bound to "
    "`https://app-N.example.com/oauth/old-callback`, which app N does not register"
)


def _planted() -> Mapping[str, str]:
    notes: dict[str, list[str]] = {}
    for plant in _PLANTS:
        notes.setdefault(plant.code, []).append(plant.note)
    notes["RU103"] = [_RU103_NOTE]
    for meta in _METADATA_PLANTS:
        notes.setdefault(meta.code, []).append(meta.note)
    return MappingProxyType({code: "; ".join(notes[code]) for code in sorted(notes)})


PLANTED: Mapping[str, str] = _planted()
"""Rule code -> the example(s) of it that every demo data set holds (with fewer than
:data:`PLANTED_MIN_APPS` applications, only the first planted kinds)."""

#: Applications needed for every planted kind to appear (one application per kind).
PLANTED_MIN_APPS = len(_PLANTS)


# --------------------------------------------------------------------------- applications

_SCOPE_SETS: tuple[list[str], ...] = (
    [],
    ["org:read"],
    ["project:read"],
    ["org:read", "project:read"],
    ["org:read", "project:read", "event:read"],
    ["project:read", "project:write"],
    ["project:releases"],
    ["org:read", "member:read", "team:read"],
    ["event:read", "event:write"],
    ["org:read", "project:read", "project:write", "team:read", "event:admin"],
)
_NAME_A = (
    "Acme",
    "Blue",
    "Rapid",
    "Quiet",
    "Nimbus",
    "Orbit",
    "Delta",
    "Pixel",
    "North",
    "Cobalt",
    "Lumen",
    "Atlas",
)
_NAME_B = (
    "Deploy",
    "Issues",
    "Alerts",
    "Metrics",
    "Release",
    "Sync",
    "Triage",
    "Dashboard",
    "Pager",
    "Insights",
    "Builds",
    "Notifier",
)
_NAME_C = ("Bot", "App", "CLI", "Desktop", "Integration", "Plugin", "for Slack", "Mobile")
_YEAR = 365 * 86_400


@dataclass(frozen=True, slots=True)
class _App:
    id: int
    client_id: str
    client_secret: str | None
    owner_id: int
    name: str
    status: int
    allowed_origins: str | None
    redirect_uris: str
    homepage_url: str | None
    privacy_url: str | None
    terms_url: str | None
    scopes: list[str]
    date_added: datetime
    requires_org_level_access: bool

    def row(self) -> tuple[Any, ...]:
        return (
            self.id,
            self.client_id,
            self.client_secret,
            self.owner_id,
            self.name,
            self.status,
            self.allowed_origins,
            self.redirect_uris,
            self.homepage_url,
            self.privacy_url,
            self.terms_url,
            self.scopes,
            0,
            self.date_added,
            self.requires_org_level_access,
        )

    def grant_uris(self) -> list[str]:
        """The URIs a legacy authorization could have bound a grant to, cut to the column."""
        return [
            line.strip(" \t\r")[:GRANT_REDIRECT_URI_LENGTH]
            for line in self.redirect_uris.split("\n")
            if line.strip(" \t\r")
        ]


_APP_COLUMNS = (
    "id",
    "client_id",
    "client_secret",
    "owner_id",
    "name",
    "status",
    "allowed_origins",
    "redirect_uris",
    "homepage_url",
    "privacy_url",
    "terms_url",
    "scopes",
    "version",
    "date_added",
    "requires_org_level_access",
)
_GRANT_COLUMNS = (
    "id",
    "user_id",
    "application_id",
    "code",
    "expires_at",
    "redirect_uri",
    "scope_list",
    "organization_id",
    "scopes",
)
_TOKEN_COLUMNS = (
    "id",
    "user_id",
    "application_id",
    "token",
    "hashed_token",
    "token_last_characters",
    "refresh_token",
    "hashed_refresh_token",
    "token_type",
    "scope_list",
    "expires_at",
    "date_added",
    "scopes",
    "scoping_organization_id",
    "name",
)
_USER_COLUMNS = ("id", "username")
#: Sentry's legacy ``scopes`` bit field (one bit per scope of the old fixed list).
_SCOPE_BITS = (0, 1, 3, 5, 7, 17, 33, 127, 1025)
_TOKEN_NAMES = ("CI deploy", "release bot", "local dev", "sourcemaps upload", "grafana")

# Id gaps: mostly consecutive, sometimes rows deleted long ago.
_GAPS = (1, 1, 1, 1, 1, 1, 1, 1, 2, 3, 5, 17)


def _hex64(rng: random.Random) -> str:
    return f"{rng.getrandbits(256):064x}"


def _clean_uris(rng: random.Random, n: str) -> str:
    r = rng.random()
    if r < 0.55:
        return _web(n)
    if r < 0.65:
        return _lines(_web(n), f"https://staging.app-{n}.example.com/oauth/callback")
    if r < 0.85:
        return _native(n)
    return _loopback(n)


def _secret(rng: random.Random, forced: bool | None) -> str | None:
    if forced is not None:
        return _hex64(rng) if forced else None
    r = rng.random()
    if r < 0.15:
        return None
    if r < 0.18:
        return ""
    return _hex64(rng)


def _user_count(apps: int, tokens: int) -> int:
    """Users 1..N exist on every database (the legacy tables' FKs reference them)."""
    return max(50, apps + tokens // 4)


def _plan_apps(seed: int, count: int, now: datetime, users: int) -> list[_App]:
    """All applications, deterministic for ``seed``; the planted kinds spread over the ids."""
    rng = random.Random(f"{seed}:application")
    plants = _PLANTS[: min(count, len(_PLANTS))]
    step = max(1, count // max(1, len(plants)))
    planted_at = {i * step: plant for i, plant in enumerate(plants)}
    metadata_at = {i * step: meta for i, meta in enumerate(_METADATA_PLANTS[: len(plants)])}
    apps: list[_App] = []
    next_id = rng.randint(2, 40)
    for index in range(count):
        app_id = next_id
        next_id += rng.choice(_GAPS)
        n = str(app_id)
        plant = planted_at.get(index)
        status = 0
        if plant is None:
            if rng.random() < MESSY_APP_SHARE:
                plant = rng.choice(_PLANTS)
            r = rng.random()
            status = 0 if r < 0.9 else 1 if r < 0.96 else 2  # 1 inactive, 2 pending deletion
        uris = plant.build(n) if plant is not None else _clean_uris(rng, n)
        homepage = f"https://app-{n}.example.com/" if rng.random() < 0.6 else None
        app = _App(
            id=app_id,
            client_id=_hex64(rng),
            client_secret=_secret(rng, plant.secret if plant is not None else None),
            owner_id=rng.randint(1, users),
            name=f"{rng.choice(_NAME_A)} {rng.choice(_NAME_B)} {rng.choice(_NAME_C)} {n}"[:64],
            status=status,
            allowed_origins=f"https://app-{n}.example.com" if rng.random() < 0.2 else None,
            redirect_uris=uris,
            homepage_url=homepage,
            privacy_url=f"{homepage}privacy" if homepage and rng.random() < 0.5 else None,
            terms_url=f"{homepage}terms" if homepage and rng.random() < 0.4 else None,
            scopes=rng.choice(_SCOPE_SETS),
            date_added=now - timedelta(seconds=rng.randrange(6 * _YEAR)),
            requires_org_level_access=rng.random() < 0.1,
        )
        meta = metadata_at.get(index)
        if meta is not None:  # after every draw of the generator: the rest stays the same
            value = meta.build(n)
            if meta.column == "homepage_url":
                app = replace(app, homepage_url=value)
            elif meta.column == "privacy_url":
                app = replace(app, privacy_url=value)
            else:
                app = replace(app, terms_url=value)
        apps.append(app)
    return apps


# --------------------------------------------------------------------------- grants, tokens


@dataclass(slots=True)
class _Tally:
    rows: int = 0
    special: int = 0  # live grants / refreshable tokens


def _grant_rows(
    rng: random.Random,
    apps: Sequence[_App],
    count: int,
    now: datetime,
    tally: _Tally,
    users: int,
) -> Iterator[tuple[Any, ...]]:
    eligible = [(a.id, uris) for a in apps if (uris := a.grant_uris())]
    if not eligible:
        return
    grant_id = rng.randint(2, 40)
    for i in range(count):
        app_id, uris = rng.choice(eligible)
        if i < UNREGISTERED_LIVE_GRANTS:
            live = True  # RU103: the app no longer registers the URI this code is bound to
            uri = f"https://app-{app_id}.example.com/oauth/old-callback"
        else:
            live = i != UNREGISTERED_LIVE_GRANTS and rng.random() < LIVE_GRANT_SHARE
            uri = rng.choice(uris)
        if live:
            expires = now + timedelta(seconds=rng.randint(60, int(GRANT_TTL.total_seconds())))
            tally.special += 1
        else:
            expires = now - timedelta(seconds=rng.randint(60, 2 * _YEAR))
        tally.rows += 1
        yield (
            grant_id,
            rng.randint(1, users),
            app_id,
            _hex64(rng),
            expires,
            uri,
            rng.choice(_SCOPE_SETS),
            rng.randint(1, 20_000) if rng.random() < 0.8 else None,
            rng.choice(_SCOPE_BITS),
        )
        grant_id += rng.choice(_GAPS)


def _token_rows(
    rng: random.Random,
    app_ids: Sequence[int],
    count: int,
    now: datetime,
    tally: _Tally,
    users: int,
) -> Iterator[tuple[Any, ...]]:
    sha256 = hashlib.sha256
    token_id = rng.randint(2, 40)
    for _ in range(count):
        r = rng.random()
        token = _hex64(rng)
        added = now - timedelta(seconds=rng.randrange(_YEAR))
        refresh: str | None = None
        hashed_refresh: str | None = None
        if r < 0.8 and app_ids:  # application token (~70% with a refresh token, ~10% without)
            app_id: int | None = rng.choice(app_ids)
            expires: datetime | None = added + TOKEN_TTL
            if r < 0.7:
                refresh = _hex64(rng)
                hashed_refresh = sha256(refresh.encode()).hexdigest()
                tally.special += 1
        else:  # user auth token: no application, no refresh token, no expiry
            app_id = None
            expires = None
        # Org-scoped tokens name their organization; user auth tokens often carry a label.
        org = rng.randint(1, 20_000) if app_id is not None and rng.random() < 0.4 else None
        name = rng.choice(_TOKEN_NAMES) if app_id is None and rng.random() < 0.7 else None
        tally.rows += 1
        yield (
            token_id,
            rng.randint(1, users),
            app_id,
            token,
            sha256(token.encode()).hexdigest(),
            token[-4:],
            refresh,
            hashed_refresh,
            "bearer" if r > 0.99 else None,
            rng.choice(_SCOPE_SETS),
            expires,
            added,
            rng.choice(_SCOPE_BITS),
            org,
            name,
        )
        token_id += rng.choice(_GAPS)


def _split(total: int, parts: int) -> list[int]:
    """``total`` spread evenly over ``parts`` (the first ones get the remainder)."""
    if parts == 0:
        return []
    base, extra = divmod(total, parts)
    return [base + (1 if i < extra else 0) for i in range(parts)]


# --------------------------------------------------------------------------- loading


def _marker_table(md: MetaData) -> Table:
    return Table(
        MARKER_TABLE,
        md,
        Column("seed", BigInteger, nullable=False),
        Column("apps", Integer, nullable=False),
        Column("tokens", BigInteger, nullable=False),
        Column("created_at", DateTime(timezone=True), nullable=False),
    )


def _load(
    conn: Connection,
    table: Table,
    columns: Sequence[str],
    rows: Iterable[tuple[Any, ...]],
    label: str,
    total: int,
    progress: Progress | None,
) -> None:
    """Bulk-load ``rows`` (tuples in ``columns`` order) inside the connection's transaction."""
    done = 0
    if progress is not None:
        progress(label, 0, total)
    if conn.dialect.name == "postgresql":
        # COPY is an order of magnitude faster than INSERT; psycopg adapts lists to text[].
        raw = cast(psycopg.Connection[Any], conn.connection.driver_connection)
        statement = sql.SQL("COPY {} ({}) FROM STDIN (FORMAT BINARY)").format(
            sql.Identifier(table.name), sql.SQL(", ").join(map(sql.Identifier, columns))
        )
        with raw.cursor() as cur:
            cur.execute(
                "SELECT a.attname, format_type(a.atttypid, NULL) FROM pg_attribute a "
                "WHERE a.attrelid = %s::regclass AND a.attnum > 0 AND NOT a.attisdropped",
                (_quote(conn, table.name),),
            )
            types = dict(cast(list[tuple[str, str]], cur.fetchall()))
        with raw.cursor() as cur, cur.copy(statement) as copy:
            copy.set_types([types[c] for c in columns])
            for row in rows:
                copy.write_row(row)
                done += 1
                if progress is not None and done % _REPORT_EVERY == 0:
                    progress(label, done, total)
    else:
        stmt = insert(table)
        chunk: list[dict[str, Any]] = []
        for row in rows:
            chunk.append(dict(zip(columns, row, strict=True)))
            if len(chunk) >= _CHUNK:
                conn.execute(stmt, chunk)
                done += len(chunk)
                chunk = []
                if progress is not None:
                    progress(label, done, total)
        if chunk:
            conn.execute(stmt, chunk)
            done += len(chunk)
    if progress is not None:
        progress(label, done, total)


def _defer_indexes(conn: Connection, md: MetaData) -> list[ExecutableDDLElement]:
    """On PostgreSQL, drop the fresh tables' unique constraints and indexes and return the DDL
    that adds them back: building an index once after COPY is several times faster than
    maintaining it row by row (random 64-hex keys touch a different leaf page every row)."""
    if conn.dialect.name != "postgresql":
        return []
    restore: list[ExecutableDDLElement] = []
    foreign: list[ExecutableDDLElement] = []
    # Foreign keys too: added once after the load, they validate in one scan, and no deferred
    # check is left pending (PostgreSQL refuses ALTER TABLE while one is).
    for table in reversed(md.sorted_tables):
        for constraint in table.constraints:
            if isinstance(constraint, ForeignKeyConstraint):
                conn.execute(DropConstraint(constraint))
                foreign.append(AddConstraint(constraint))
    for table in md.tables.values():
        for constraint in table.constraints:
            if isinstance(constraint, UniqueConstraint):
                conn.execute(DropConstraint(constraint))
                restore.append(AddConstraint(constraint))
        for index in table.indexes:
            conn.execute(DropIndex(index))
            restore.append(CreateIndex(index))
    conn.execute(text("SET LOCAL maintenance_work_mem = '256MB'"))
    return restore + foreign


def _quote(conn: Connection, name: str) -> str:
    return conn.dialect.identifier_preparer.quote(name)


def _foreign_table(settings: Settings, database: str, existing: set[str]) -> str | None:
    """A table this database already holds that the demo did not create, if any."""
    if MARKER_TABLE in existing:
        return None
    for logical in settings.tables_on(database):
        physical = settings.tables.physical(logical)
        if physical in existing:
            return physical
    if USERS_TABLE in existing:
        return USERS_TABLE
    # oauthmig's own tables describe the data beside them: without a demo marker they belong
    # to a real installation (or would make the fresh demo tables look half-migrated).
    return next((t for t in sorted(existing) if t.startswith(OAUTHMIG_PREFIX)), None)


def _sqlite_file_missing(db: DatabaseConfig) -> bool:
    """True for a SQLite database whose file does not exist yet (it holds no table)."""
    if db.url is None:
        return False
    url = make_url(db.url)
    return (
        url.get_backend_name() == "sqlite"
        and bool(url.database)
        and url.database != ":memory:"
        and not Path(str(url.database)).exists()
    )


def _check(settings: Settings, database: str) -> None:
    db = settings.databases[database]
    if _sqlite_file_missing(db):
        return  # checked without creating the file: a refusal elsewhere must leave no trace
    with map_db_errors(db), open_database(settings, db) as conn:
        existing = set(inspect(conn).get_table_names())
        found = _foreign_table(settings, database, existing)
    if found is not None:
        raise DatabaseError(
            f"database {database!r}: table {found} already exists and was not created by "
            "`oauthmig demo`; refusing to touch it — point --config at empty databases"
        )


@dataclass(frozen=True, slots=True)
class _Job:
    """What one database receives."""

    database: str
    apps: Sequence[_App]
    grants: int
    tokens: int
    users: int


def _drop_earlier_demo(conn: Connection, physical: Mapping[str, str]) -> None:
    """Drop the routed legacy tables, oauthmig's own tables (but the marker) and the users."""
    existing = set(inspect(conn).get_table_names())
    cascade = " CASCADE" if conn.dialect.name == "postgresql" else ""
    doomed = [t for t in physical.values() if t in existing]
    doomed += sorted(t for t in existing if t.startswith(OAUTHMIG_PREFIX) and t != MARKER_TABLE)
    if USERS_TABLE in existing:
        doomed.append(USERS_TABLE)  # last: the other tables reference it
    for name in doomed:
        conn.execute(text(f"DROP TABLE {_quote(conn, name)}{cascade}"))


def _advance_identities(conn: Connection, tables: Sequence[str]) -> None:
    """PostgreSQL: rows carry explicit ids, so move each identity past them (later inserts
    must not collide)."""
    if conn.dialect.name != "postgresql":
        return
    for name in tables:
        conn.execute(
            text(
                "SELECT setval(pg_get_serial_sequence(:t, 'id'), max(id)) "
                f"FROM {_quote(conn, name)}"
            ),
            {"t": _quote(conn, name)},
        )


def _fill(
    conn: Connection,
    settings: Settings,
    job: _Job,
    seed: int,
    now: datetime,
    requested: tuple[int, int],
    progress: Progress | None,
) -> DemoCounts:
    """Drop an earlier demo, create the legacy tables and load them (caller's transaction)."""
    routed = settings.tables_on(job.database)
    physical = {logical: settings.tables.physical(logical) for logical in routed}
    _drop_earlier_demo(conn, physical)
    md = legacy_metadata(settings.tables, routed)
    md.create_all(conn)
    deferred = _defer_indexes(conn, md)
    marker = _marker_table(MetaData())
    marker.create(conn, checkfirst=True)
    conn.execute(marker.delete())

    apps = _Tally()
    grants = _Tally()
    tokens = _Tally()
    label = job.database
    _load(
        conn,
        md.tables[USERS_TABLE],
        _USER_COLUMNS,
        ((i, f"user{i}") for i in range(1, job.users + 1)),
        f"{label}: users",
        job.users,
        None,  # small; the progress bar shows the three OAuth tables
    )
    if "application" in routed:
        _load(
            conn,
            md.tables[physical["application"]],
            _APP_COLUMNS,
            (a.row() for a in job.apps),
            f"{label}: applications",
            len(job.apps),
            progress,
        )
        apps.rows = len(job.apps)
    if "grant" in routed:
        rng = random.Random(f"{seed}:grant:{job.database}")
        _load(
            conn,
            md.tables[physical["grant"]],
            _GRANT_COLUMNS,
            _grant_rows(rng, job.apps, job.grants, now, grants, job.users),
            f"{label}: grants",
            job.grants,
            progress,
        )
    if "token" in routed:
        rng = random.Random(f"{seed}:token:{job.database}")
        app_ids = [a.id for a in job.apps]
        _load(
            conn,
            md.tables[physical["token"]],
            _TOKEN_COLUMNS,
            _token_rows(rng, app_ids, job.tokens, now, tokens, job.users),
            f"{label}: tokens",
            job.tokens,
            progress,
        )
    for ddl in deferred:
        conn.execute(ddl)
    _advance_identities(conn, [*physical.values(), USERS_TABLE])
    conn.execute(
        marker.insert().values(seed=seed, apps=requested[0], tokens=requested[1], created_at=now)
    )
    return DemoCounts(
        job.database, apps.rows, grants.rows, grants.special, tokens.rows, tokens.special
    )


def _analyze(conn: Connection, settings: Settings, database: str) -> None:
    if conn.dialect.name == "postgresql":
        for logical in settings.tables_on(database):
            conn.execute(text(f"ANALYZE {_quote(conn, settings.tables.physical(logical))}"))
    else:
        conn.execute(text("ANALYZE"))


def setup_legacy(
    settings: Settings,
    *,
    apps: int = 2000,
    tokens: int = 20000,
    seed: int = 42,
    progress: Progress | None = None,
) -> DemoSetup:
    """Create the legacy tables on every configured database, as routed, and fill them.

    ``apps`` applications go to every database hosting ``application``; about 1.5 grants per
    application and the ``tokens`` are split evenly over the databases hosting ``grant`` and
    ``token``. Raises :class:`DatabaseError`, before writing anywhere, if any database holds a
    routed or ``oauthmig_*`` table that an earlier demo did not create; tables of an earlier
    demo (and every ``oauthmig_*`` table) are dropped and created again. Each database is
    loaded in one transaction.
    """
    if apps < 0 or tokens < 0:
        raise UsageError("demo: --apps and --tokens must not be negative")
    targets = [name for name in settings.database_names() if settings.tables_on(name)]
    for name in targets:  # every database first: refuse before writing anywhere
        _check(settings, name)
    now = datetime.now(UTC)
    users = _user_count(apps, tokens)
    planned = _plan_apps(seed, apps, now, users)
    grant_dbs = [n for n in targets if "grant" in settings.tables_on(n)]
    token_dbs = [n for n in targets if "token" in settings.tables_on(n)]
    grant_split = dict(
        zip(grant_dbs, _split(round(apps * GRANTS_PER_APP), len(grant_dbs)), strict=True)
    )
    token_split = dict(zip(token_dbs, _split(tokens, len(token_dbs)), strict=True))
    results: list[DemoCounts] = []
    for name in targets:
        job = _Job(name, planned, grant_split.get(name, 0), token_split.get(name, 0), users)
        db = settings.databases[name]
        with (
            map_db_errors(db, "loading the demo data failed", also=(psycopg.Error,)),
            open_database(settings, db, create=True) as conn,
        ):
            with conn.begin():
                if conn.dialect.name == "postgresql":
                    conn.execute(text("SET LOCAL synchronous_commit = off"))
                results.append(_fill(conn, settings, job, seed, now, (apps, tokens), progress))
            with conn.begin():
                _analyze(conn, settings, name)
    return DemoSetup(seed, tuple(results))
