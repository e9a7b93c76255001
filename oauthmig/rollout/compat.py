"""The compatibility layer: triggers that keep the new columns right for the provider's legacy
code, which writes during the rollout without knowing them (pgroll's expand/contract triggers).

* token: a refreshable token (``refresh_token`` or ``hashed_refresh_token`` set) inserted, or
  updated in place by a legacy refresh, with ``token_family_id`` NULL gets its family by the
  formula of :mod:`oauthmig.family` (the token-families backfill's).
* application: an application inserted without metadata gets what the client-metadata backfill
  would write: ``token_endpoint_auth_method`` ``none`` without a client secret, else the
  configured confidential method; the configured ``grant_types`` and ``response_types``; and
  ``application_type`` ``web`` (a documented safe default: the type needs the redirect rules,
  ``audit-redirects`` flags a native-style application stored as ``web``).

Every row the layer fills is recorded (row id and time) in ``oauthmig_compat_<logical>`` on
that database, which ``oauthmig contract`` reads: rows the layer filled since a point in time
mean the old code still writes. PostgreSQL uses BEFORE triggers (plpgsql, ``SECURITY DEFINER``
so that the application's role need not write the side table) that set ``NEW``; SQLite cannot
change ``NEW``, so AFTER triggers update the row, and the NOT NULL metadata columns that
finalize adds there carry defaults (:func:`sqlite_defaults`); ``grant_types``'s default text is a
marker (the JSON list with a leading space, which the models never write) that tells the
trigger the writer did not supply the metadata.

Installed by the expand revisions (0002 token, 0003 application) on every database hosting
the table, removed by their downgrades before the columns go, and by ``oauthmig contract``.
All of it is plain SQL run through the revision (``op.execute``), so ``--sql`` and
``--dry-run`` show exactly what an online run does. The configured values are baked in when
the triggers are created.
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Sequence
from dataclasses import dataclass

from oauthmig.config import ClientMetadataDefaults
from oauthmig.family import family_high, family_sql

#: The logical tables the layer covers, and the column whose revision brings it.
COMPAT_TABLES: tuple[str, ...] = ("token", "application")
KEY_COLUMNS: dict[str, str] = {"token": "token_family_id", "application": "application_type"}

APP_COLUMNS = ("token_endpoint_auth_method", "grant_types", "response_types", "application_type")


def side_table(logical: str) -> str:
    """The table recording the rows the layer filled in ``logical``."""
    return f"oauthmig_compat_{logical}"


def _name(physical: str, suffix: str) -> str:
    name = f"oauthmig_compat_{physical}_{suffix}"
    if len(name) <= 63:
        return name
    return f"oauthmig_compat_{zlib.crc32(physical.encode()):08x}_{suffix}"


def trigger_names(physical: str, dialect: str) -> tuple[str, ...]:
    """The triggers the layer creates on ``physical``."""
    if dialect == "postgresql":
        return (_name(physical, "fill"),)
    return (_name(physical, "ins"), _name(physical, "upd"))


def _lit(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def _pg_array(values: Sequence[str]) -> str:
    return _lit("{" + ",".join('"' + v.replace('"', '\\"') + '"' for v in values) + "}")


def grant_types_marker(cm: ClientMetadataDefaults) -> str:
    """SQLite's default text of ``grant_types`` once finalize made it NOT NULL: the configured
    list as JSON with a leading space, a text the models never write."""
    return " " + json.dumps(list(cm.grant_types))


def sqlite_defaults(cm: ClientMetadataDefaults) -> dict[str, str]:
    """Column -> SQL default text for the NOT NULL metadata columns on SQLite (legacy INSERTs
    name none of them; the AFTER trigger then writes the inferred values)."""
    return {
        "token_endpoint_auth_method": _lit(cm.confidential_auth_method),
        "grant_types": _lit(grant_types_marker(cm)),
        "response_types": _lit(json.dumps(list(cm.response_types))),
        "application_type": "'web'",
    }


def _auth_method(cm: ClientMetadataDefaults) -> str:
    return (
        "CASE WHEN NEW.client_secret IS NULL OR NEW.client_secret = '' THEN 'none' "
        f"ELSE {_lit(cm.confidential_auth_method)} END"
    )


@dataclass(frozen=True, slots=True)
class CompatTarget:
    """Where the layer goes: one database's dialect, name and routed physical tables."""

    dialect: str
    database: str
    physical: dict[str, str]  # logical -> physical, routed tables only
    client_metadata: ClientMetadataDefaults


def install_sql(t: CompatTarget, logical: str) -> list[str]:
    """Statements (re)creating the layer on ``logical``: idempotent."""
    physical = t.physical[logical]
    side = side_table(logical)
    if t.dialect == "postgresql":
        return _pg_install(t, logical, physical, side)
    return _sqlite_install(t, logical, physical, side)


def remove_sql(t: CompatTarget, logical: str) -> list[str]:
    """Statements removing the layer from ``logical`` (triggers, function, side table)."""
    physical = t.physical[logical]
    out = [
        f"DROP TRIGGER IF EXISTS {name}" + (f" ON {physical}" if t.dialect == "postgresql" else "")
        for name in trigger_names(physical, t.dialect)
    ]
    if t.dialect == "postgresql":
        out.append(f"DROP FUNCTION IF EXISTS {_name(physical, 'fn')}()")
    out.append(f"DROP TABLE IF EXISTS {side_table(logical)}")
    return out


def _pg_install(t: CompatTarget, logical: str, physical: str, side: str) -> list[str]:
    fn = _name(physical, "fn")
    (trigger,) = trigger_names(physical, "postgresql")
    record = (
        f"INSERT INTO {side} (row_id) VALUES (NEW.id) "
        "ON CONFLICT (row_id) DO UPDATE SET filled_at = now();"
    )
    if logical == "token":
        fam = family_sql("postgresql", family_high(physical, t.database), "NEW.id")
        body = f"NEW.token_family_id := {fam}; {record}"
        when = (
            "NEW.token_family_id IS NULL AND "
            "(NEW.refresh_token IS NOT NULL OR NEW.hashed_refresh_token IS NOT NULL)"
        )
        events = "INSERT OR UPDATE OF refresh_token, hashed_refresh_token"
    else:
        cm = t.client_metadata
        body = (
            "NEW.token_endpoint_auth_method := COALESCE(NEW.token_endpoint_auth_method, "
            f"{_auth_method(cm)}); "
            f"NEW.grant_types := COALESCE(NEW.grant_types, {_pg_array(cm.grant_types)}); "
            f"NEW.response_types := COALESCE(NEW.response_types, {_pg_array(cm.response_types)}); "
            "NEW.application_type := COALESCE(NEW.application_type, 'web'); "
            f"{record}"
        )
        when = " OR ".join(f"NEW.{c} IS NULL" for c in APP_COLUMNS)
        events = "INSERT"
    return [
        f"CREATE TABLE IF NOT EXISTS {side} (row_id bigint PRIMARY KEY, "
        "filled_at timestamptz NOT NULL DEFAULT now())",
        f"CREATE OR REPLACE FUNCTION {fn}() RETURNS trigger LANGUAGE plpgsql "
        f"SECURITY DEFINER SET search_path FROM CURRENT AS $$ BEGIN {body} RETURN NEW; END $$",
        f"DROP TRIGGER IF EXISTS {trigger} ON {physical}",
        f"CREATE TRIGGER {trigger} BEFORE {events} ON {physical} FOR EACH ROW "
        f"WHEN ({when}) EXECUTE FUNCTION {fn}()",
    ]


#: SQLite's clock for the side table: UTC, ISO 8601 with milliseconds (sorts as text).
SQLITE_NOW = "strftime('%Y-%m-%d %H:%M:%f', 'now')"


def _sqlite_install(t: CompatTarget, logical: str, physical: str, side: str) -> list[str]:
    ins, upd = trigger_names(physical, "sqlite")
    record = f"INSERT OR REPLACE INTO {side} (row_id, filled_at) VALUES (NEW.id, {SQLITE_NOW});"
    if logical == "token":
        fam = family_sql("sqlite", family_high(physical, t.database), "NEW.id")
        action = f"UPDATE {physical} SET token_family_id = {fam} WHERE id = NEW.id; {record}"
        when = (
            "NEW.token_family_id IS NULL AND "
            "(NEW.refresh_token IS NOT NULL OR NEW.hashed_refresh_token IS NOT NULL)"
        )
        triggers = [
            (ins, "AFTER INSERT"),
            (upd, "AFTER UPDATE OF refresh_token, hashed_refresh_token"),
        ]
    else:
        cm = t.client_metadata
        marker = _lit(grant_types_marker(cm))
        unset = f"(NEW.grant_types IS NULL OR NEW.grant_types = {marker})"
        action = (
            f"UPDATE {physical} SET "
            f"token_endpoint_auth_method = CASE WHEN {unset} OR "
            f"NEW.token_endpoint_auth_method IS NULL THEN {_auth_method(cm)} "
            "ELSE NEW.token_endpoint_auth_method END, "
            f"grant_types = CASE WHEN {unset} THEN {_lit(json.dumps(list(cm.grant_types)))} "
            "ELSE NEW.grant_types END, "
            "response_types = COALESCE(NEW.response_types, "
            f"{_lit(json.dumps(list(cm.response_types)))}), "
            "application_type = COALESCE(NEW.application_type, 'web') "
            f"WHERE id = NEW.id; {record}"
        )
        when = " OR ".join(
            [*(f"NEW.{c} IS NULL" for c in APP_COLUMNS), f"NEW.grant_types = {marker}"]
        )
        triggers = [(ins, "AFTER INSERT")]
    out = [
        f"CREATE TABLE IF NOT EXISTS {side} (row_id INTEGER PRIMARY KEY, "
        f"filled_at TEXT NOT NULL DEFAULT ({SQLITE_NOW}))"
    ]
    for name, event in triggers:
        out.append(f"DROP TRIGGER IF EXISTS {name}")
        out.append(
            f"CREATE TRIGGER {name} {event} ON {physical} FOR EACH ROW WHEN {when} "
            f"BEGIN {action} END"
        )
    return out
