"""Audit every stored redirect URI (and live grants' bound URIs) against the redirect rules.

:func:`audit` checks the routed databases up front (the preflight of every command, with the
revision catalogue the caller gives: reachable, routed tables present, a known revision in the
version table; then which optional columns exist) and returns an :class:`Audit`: iterate it to
stream :class:`AuditFinding` values, one application after another in ``(database, id)`` order; once
the iteration is exhausted, :meth:`Audit.summary` holds the counts.

Memory stays constant in the number of applications: applications are read in keyset batches
(``WHERE id > :last ORDER BY id LIMIT :batch``, an index range read), each batch in its own
short read transaction, and only the current batch and its live grants are held. Keyset batches
rather than one server-side cursor because a live provider should not keep one snapshot open
for the whole audit (on PostgreSQL a long transaction holds back vacuum; on SQLite it blocks
WAL checkpoints), and because they behave the same on both backends.

Per application (docs/rules.md):

* the app type is the ``application_type`` column when it exists and holds ``web`` or
  ``native``, else the inference of the client-metadata backfill
  (:func:`~oauthmig.redirects.rules.infer_app_type` over
  :func:`~oauthmig.redirects.rules.split_redirect_uris`);
* ``has_secret`` is computed in SQL (``client_secret IS NOT NULL AND client_secret <> ''``):
  no secret, token or other credential is ever selected;
* it can use the authorization code grant unless a filled ``grant_types`` column leaves
  ``authorization_code`` out;
* RU103 compares the ``redirect_uri`` of its live grants (``expires_at > now``, and not yet
  exchanged where revision 0005's ``consumed_at`` exists) when the grant table is routed to
  the same database (one query per batch); otherwise RU103 is skipped there
  and the summary says so;
* RU016 uses the length of the grant table's ``redirect_uri`` column on that database
  (``varchar(255)`` -> 255, ``text`` -> no limit), or Sentry's 255
  (:data:`~oauthmig.redirects.rules.GRANT_REDIRECT_URI_LENGTH`) when no grant table is routed
  there.

The client metadata rules (RU105-RU110, :mod:`oauthmig.redirects.metadata_rules`) run on the
same rows: the metadata URLs (``homepage_url``, ``privacy_url``, ``terms_url`` as ``client_uri``,
``policy_uri``, ``tos_uri``; ``jwks_uri`` and ``logo_uri`` once revision 0006 added them) and
``token_endpoint_auth_method`` against ``has_secret``, each read only where the column exists.
Their findings carry ``field``, the RFC 7591 name they are about.

Findings whose code is in ``[audit] ignore`` are dropped and counted in
:attr:`AuditSummary.ignored`.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

from sqlalchemy import (
    DateTime,
    and_,
    bindparam,
    case,
    column,
    func,
    inspect,
    literal,
    select,
    table,
)
from sqlalchemy.engine import Connection, Row
from sqlalchemy.sql.elements import ColumnElement

from oauthmig.config import Settings
from oauthmig.db import map_db_errors, open_database
from oauthmig.errors import ConfigError, DatabaseError
from oauthmig.preflight import check_state
from oauthmig.privileges import Command
from oauthmig.redact import mask_uri, mask_uris_in_text
from oauthmig.redirects.metadata_rules import (
    AUTH_METHOD_COLUMN,
    METADATA_URL_COLUMNS,
    check_metadata,
)
from oauthmig.redirects.rules import (
    GRANT_REDIRECT_URI_LENGTH,
    RULES,
    AppType,
    Severity,
    check_application,
    infer_app_type,
    split_redirect_uris,
)
from oauthmig.revision_types import RevisionInfo
from oauthmig.same_database import check_distinct

__all__ = [
    "DEFAULT_BATCH_SIZE",
    "Audit",
    "AuditFinding",
    "AuditSummary",
    "DatabaseAudit",
    "FailOn",
    "Progress",
    "audit",
]

DEFAULT_BATCH_SIZE = 1000

FailOn = Literal["error", "warning", "never"]
Progress = Callable[[str, int, int], None]
"""``progress(label, applications_done, applications_total)``, called after every batch."""

_APP_TYPES = {t.value: t for t in AppType}
# Application columns the client metadata rules read, when the table has them.
_METADATA_COLUMNS = (*dict.fromkeys(METADATA_URL_COLUMNS.values()), AUTH_METHOD_COLUMN)
_SEVERITY_ORDER = tuple(s.value for s in Severity)  # error, warning, info


@dataclass(frozen=True, slots=True)
class AuditFinding:
    """One rule firing on one stored application (``uri`` is None for application-level
    findings such as RU101; for RU103 it is the live grant's URI). ``line`` is the 1-based
    line of ``redirect_uris`` the finding is on, None when it is on no line. ``field`` is set
    for the client metadata rules: the RFC 7591 name (``client_uri``, ``jwks_uri``, ...,
    ``token_endpoint_auth_method``). ``uri``, ``normalized`` and URIs quoted in ``message``
    pass :func:`oauthmig.redact.mask_uri`: their userinfo and secret-bearing parameter values
    are ``***``."""

    database: str
    application_id: int
    client_id: str
    uri: str | None
    code: str
    name: str
    severity: Severity
    message: str
    normalized: str | None
    line: int | None = None
    field: str | None = None


@dataclass(frozen=True, slots=True)
class DatabaseAudit:
    """What was scanned on one database hosting ``application``.

    ``live_grants`` is None when RU103 could not be checked there (see the summary notes).
    ``app_type_source`` is ``column`` when the ``application_type`` column exists, else
    ``inferred``; with the column, rows where it is NULL are still inferred.
    """

    database: str
    applications: int
    uris: int
    live_grants: int | None
    grant_column_length: int | None
    app_type_source: Literal["column", "inferred"]
    metadata_urls: int = 0


@dataclass(frozen=True, slots=True)
class AuditSummary:
    """Counts of an audit. ``by_severity`` always has ``error``, ``warning`` and ``info``;
    ``by_code`` and ``ignored`` are in code order."""

    applications_scanned: int
    uris_scanned: int
    live_grants_checked: int
    findings: int
    by_severity: Mapping[str, int]
    by_code: Mapping[str, int]
    ignored: Mapping[str, int]
    databases: tuple[DatabaseAudit, ...]
    notes: tuple[str, ...]
    metadata_urls_scanned: int = 0

    def fails(self, fail_on: FailOn) -> bool:
        """Whether findings at or above ``fail_on`` exist (``never``: never)."""
        if fail_on == "never":
            return False
        if fail_on == "error":
            return self.by_severity.get("error", 0) > 0
        return self.by_severity.get("error", 0) + self.by_severity.get("warning", 0) > 0

    def top_codes(self, n: int = 5) -> list[tuple[str, int]]:
        """The ``n`` most frequent codes, most frequent first (ties in code order)."""
        return sorted(self.by_code.items(), key=lambda item: (-item[1], item[0]))[:n]


@dataclass(frozen=True, slots=True)
class _Target:
    """How to read one database hosting ``application`` (decided by the preflight)."""

    database: str
    app_columns: frozenset[str]
    grants_here: bool  # live grants are read beside the applications (RU103)
    grant_column_length: int | None
    grant_consumed_column: bool = False  # revision 0005: exchanged codes are not live


@dataclass(slots=True)
class _Tally:
    applications: int = 0
    uris: int = 0
    live_grants: int = 0
    metadata_urls: int = 0


def _column_length(col_type: Any) -> int | None:
    length = getattr(col_type, "length", None)
    return int(length) if isinstance(length, int) and length > 0 else None


def _preflight(
    settings: Settings, database: str, revisions: Sequence[RevisionInfo]
) -> tuple[_Target, list[str]]:
    """Connect, run the common preflight and read the columns the audit depends on."""
    db = settings.databases[database]
    routed = settings.tables_on(database)
    notes: list[str] = []
    with (
        map_db_errors(db, "cannot read the tables to audit"),
        open_database(settings, db) as conn,
    ):
        check_state(conn, settings, db, revisions, Command.AUDIT_REDIRECTS)
        insp = inspect(conn)
        app_columns = frozenset(c["name"] for c in insp.get_columns(settings.tables.application))
        missing = {"id", "client_id", "redirect_uris"} - app_columns
        if missing:
            raise DatabaseError(
                f"database {database!r}: table {settings.tables.application} has no "
                f"{', '.join(sorted(missing))} column; is [tables] application right?"
            )
        grants_here = consumed_column = False
        length: int | None = GRANT_REDIRECT_URI_LENGTH
        if "grant" in routed:
            grant_cols = {c["name"]: c for c in insp.get_columns(settings.tables.grant)}
            uri_col = grant_cols.get("redirect_uri")
            # Without the column the expand revision adds it as TEXT: no length limit.
            length = None if uri_col is None else _column_length(uri_col["type"])
            needed = {"redirect_uri", "application_id", "expires_at"}
            grants_here = needed <= set(grant_cols)
            consumed_column = "consumed_at" in grant_cols
            if not grants_here:
                absent = ", ".join(sorted(needed - set(grant_cols)))
                notes.append(
                    f"{database}: live grants not checked (RU103): "
                    f"{settings.tables.grant} has no {absent} column"
                )
        elif settings.routing.get("grant"):
            elsewhere = ", ".join(settings.routing["grant"])
            notes.append(
                f"{database}: live grants not checked (RU103): the grant table is routed "
                f"to {elsewhere}, not beside the applications"
            )
        if conn.in_transaction():
            conn.rollback()
        return _Target(database, app_columns, grants_here, length, consumed_column), notes


def _grant_types(value: object) -> list[str] | None:
    """A stored ``grant_types`` value (``text[]``, or JSON text on SQLite) as a list, or None
    when it is NULL or unreadable."""
    if value is None:
        return None
    if isinstance(value, list):
        return [str(v) for v in value]
    if isinstance(value, str):
        try:
            loaded = json.loads(value)
        except ValueError:
            return None
        if isinstance(loaded, list):
            return [str(v) for v in loaded]
    return None


class Audit:
    """A streamed audit. Iterate it (once) for :class:`AuditFinding` values, in
    ``(database, application id)`` order with each application's findings together; then
    :meth:`summary` holds the final counts."""

    def __init__(
        self,
        settings: Settings,
        targets: tuple[_Target, ...],
        notes: tuple[str, ...],
        *,
        batch_size: int,
        now: datetime,
        progress: Progress | None,
    ) -> None:
        self._settings = settings
        self._targets = targets
        self._notes = notes
        self._batch_size = batch_size
        self._now = now
        self._progress = progress
        self._ignore = frozenset(settings.audit.ignore)
        self._by_code: Counter[str] = Counter()
        self._ignored: Counter[str] = Counter()
        self._tallies: dict[str, _Tally] = {t.database: _Tally() for t in targets}
        self._started = False

    @property
    def databases(self) -> tuple[str, ...]:
        """The databases whose applications are audited, in configuration order."""
        return tuple(t.database for t in self._targets)

    def __iter__(self) -> Iterator[AuditFinding]:
        if self._started:
            raise RuntimeError("an Audit can be iterated only once")
        self._started = True
        for target in self._targets:
            yield from self._database(target)

    def summary(self) -> AuditSummary:
        """The counts so far (final once the iteration is exhausted)."""
        by_severity = dict.fromkeys(_SEVERITY_ORDER, 0)
        for code, count in self._by_code.items():
            by_severity[RULES[code].severity.value] += count
        databases = tuple(
            DatabaseAudit(
                t.database,
                self._tallies[t.database].applications,
                self._tallies[t.database].uris,
                self._tallies[t.database].live_grants if t.grants_here else None,
                t.grant_column_length,
                "column" if "application_type" in t.app_columns else "inferred",
                self._tallies[t.database].metadata_urls,
            )
            for t in self._targets
        )
        return AuditSummary(
            applications_scanned=sum(d.applications for d in databases),
            uris_scanned=sum(d.uris for d in databases),
            live_grants_checked=sum(d.live_grants or 0 for d in databases),
            findings=sum(self._by_code.values()),
            by_severity=by_severity,
            by_code=dict(sorted(self._by_code.items())),
            ignored=dict(sorted(self._ignored.items())),
            databases=databases,
            notes=self._notes,
            metadata_urls_scanned=sum(d.metadata_urls for d in databases),
        )

    # ------------------------------------------------------------------ reading

    def _queries(self, target: _Target) -> tuple[Any, Any, Any]:
        """The statements of one database, built once: the first batch of applications, the
        next batch (``id > :after``), and the live grants of an id range."""
        cols = target.app_columns
        t = table(
            self._settings.tables.application,
            column("id"),
            column("client_id"),
            column("client_secret"),
            column("redirect_uris"),
            column("application_type"),
            column("grant_types"),
            *(column(name) for name in _METADATA_COLUMNS),
        )
        has_secret: ColumnElement[Any]
        if "client_secret" in cols:
            # Computed in SQL so that the secret itself never leaves the database.
            has_secret = case(
                (and_(t.c.client_secret.is_not(None), t.c.client_secret != ""), 1), else_=0
            )
        else:
            has_secret = literal(0)
        selected: list[Any] = [
            t.c.id,
            t.c.client_id,
            t.c.redirect_uris,
            has_secret.label("has_secret"),
        ]
        if "application_type" in cols:
            selected.append(t.c.application_type)
        if "grant_types" in cols:
            selected.append(t.c.grant_types)
        selected.extend(t.c[name] for name in _METADATA_COLUMNS if name in cols)
        first = select(*selected).order_by(t.c.id).limit(self._batch_size)
        following = first.where(t.c.id > bindparam("after"))
        g = table(
            self._settings.tables.grant,
            column("application_id"),
            column("redirect_uri"),
            column("expires_at", DateTime(timezone=True)),
            column("consumed_at"),
        )
        grants = select(g.c.application_id, g.c.redirect_uri).where(
            g.c.application_id >= bindparam("lo"),
            g.c.application_id <= bindparam("hi"),
            g.c.expires_at > bindparam("now", type_=DateTime(timezone=True)),
            g.c.redirect_uri.is_not(None),
        )
        if target.grant_consumed_column:
            grants = grants.where(g.c.consumed_at.is_(None))
        return first, following, grants

    def _count(self, conn: Connection) -> int:
        t = table(self._settings.tables.application)
        total = conn.execute(select(func.count()).select_from(t)).scalar_one()
        conn.rollback()
        return int(total)

    def _database(self, target: _Target) -> Iterator[AuditFinding]:
        db = self._settings.databases[target.database]
        first, following, grants = self._queries(target)
        tally = self._tallies[target.database]
        with (
            map_db_errors(db, "reading applications failed"),
            open_database(self._settings, db) as conn,
        ):
            total = self._count(conn) if self._progress is not None else 0
            after: int | None = None
            while True:
                live: dict[int, list[str]] = {}
                try:
                    if after is None:
                        rows = conn.execute(first).all()
                    else:
                        rows = conn.execute(following, {"after": after}).all()
                    if rows and target.grants_here:
                        params = {"lo": rows[0].id, "hi": rows[-1].id, "now": self._now}
                        for app_id, uri in conn.execute(grants, params):
                            live.setdefault(int(app_id), []).append(str(uri))
                finally:
                    # One short read transaction per batch: no snapshot is held while
                    # the caller writes the findings out.
                    if conn.in_transaction():
                        conn.rollback()
                if not rows:
                    break
                for row in rows:
                    yield from self._application(target, row, live.get(int(row.id), ()))
                tally.applications += len(rows)
                after = int(rows[-1].id)
                if self._progress is not None:
                    self._progress(target.database, tally.applications, total)
                if len(rows) < self._batch_size:
                    break

    def _application(
        self, target: _Target, row: Row[Any], live_grant_uris: list[str] | tuple[()]
    ) -> Iterator[AuditFinding]:
        mapping = row._mapping
        stored: str | None = mapping["redirect_uris"]
        app_type = _APP_TYPES.get(mapping.get("application_type") or "")
        if app_type is None:
            app_type = infer_app_type(split_redirect_uris(stored))
        grant_types = _grant_types(mapping.get("grant_types"))
        can_use_code = not grant_types or "authorization_code" in grant_types
        report = check_application(
            stored,
            app_type,
            has_secret=bool(mapping["has_secret"]),
            can_use_code_grant=can_use_code,
            live_grant_uris=live_grant_uris,
            grant_column_length=target.grant_column_length,
        )
        tally = self._tallies[target.database]
        tally.uris += len(report.uris)
        tally.live_grants += len(live_grant_uris)
        app_id = int(mapping["id"])
        client_id = "" if mapping["client_id"] is None else str(mapping["client_id"])
        for f in report.all_findings():
            if f.code in self._ignore:
                self._ignored[f.code] += 1
                continue
            self._by_code[f.code] += 1
            yield AuditFinding(
                target.database,
                app_id,
                client_id,
                None if f.uri is None else mask_uri(f.uri),
                f.code,
                f.name,
                f.severity,
                mask_uris_in_text(f.message),
                None if f.normalized is None else mask_uri(f.normalized),
                f.line,
            )
        urls = {
            name: mapping.get(col) for name, col in METADATA_URL_COLUMNS.items() if col in mapping
        }
        tally.metadata_urls += sum(1 for v in urls.values() if v is not None and v.strip())
        for m in check_metadata(
            urls,
            auth_method=mapping.get(AUTH_METHOD_COLUMN),
            has_secret=bool(mapping["has_secret"]),
            jwks_uri_column="jwks_uri" in target.app_columns,
        ):
            if m.code in self._ignore:
                self._ignored[m.code] += 1
                continue
            self._by_code[m.code] += 1
            yield AuditFinding(
                target.database,
                app_id,
                client_id,
                m.uri,
                m.code,
                m.name,
                m.severity,
                mask_uris_in_text(m.message),
                m.normalized,
                None,
                m.field,
            )


def audit(
    settings: Settings,
    *,
    revisions: Sequence[RevisionInfo],
    batch_size: int = DEFAULT_BATCH_SIZE,
    now: datetime | None = None,
    progress: Progress | None = None,
) -> Audit:
    """Prepare an audit of every database hosting ``application`` (in configuration order).

    Checks every routed database first, as every command does (``revisions`` is the revision
    catalogue, :func:`oauthmig.rollout.revisions.history`, which the caller loads: this module
    does not load Alembic), so that an unreachable, half-migrated or unknown database or a
    missing routed table raises (:class:`~oauthmig.errors.DatabaseError`) before any finding is
    produced.
    ``now`` decides which grants are live (default: the current time). Iterate the result for
    the findings; nothing is read until then.
    """
    if batch_size < 1:
        raise ValueError("batch_size must be at least 1")
    unknown = [code for code in settings.audit.ignore if code not in RULES]
    if unknown:
        # The config layer checks the shape (RU + three digits); only here are the rules known.
        raise ConfigError(
            f"audit.ignore: {unknown[0]!r} is not a rule code of this version (rules: "
            f"{', '.join(RULES)}; see docs/rules.md); remove it"
        )
    targets: list[_Target] = []
    notes: list[str] = []
    hosting = [n for n in settings.database_names() if "application" in settings.tables_on(n)]
    check_distinct(settings, hosting)
    for name in settings.database_names():
        # Only the databases hosting applications are read (their grants beside them); a
        # database hosting only tokens or grants is not needed and may be down.
        if "application" not in settings.tables_on(name):
            continue
        target, db_notes = _preflight(settings, name, revisions)
        notes.extend(db_notes)
        targets.append(target)
    app_dbs = {t.database for t in targets}
    for name in settings.routing.get("grant", ()):
        if name in settings.databases and name not in app_dbs:
            notes.append(
                f"{name}: its grant table is not checked (RU103): no application table "
                "is routed there"
            )
    return Audit(
        settings,
        tuple(targets),
        tuple(notes),
        batch_size=batch_size,
        now=now or datetime.now(UTC),
        progress=progress,
    )
