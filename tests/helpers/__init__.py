"""Test helpers that observe real databases: schema dumps, data checksums, CLI runs."""

from __future__ import annotations

import fcntl
import functools
import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from sqlalchemy import inspect, select, table, text
from sqlalchemy.engine import Engine

from oauthmig.cli import run
from oauthmig.config import Settings
from oauthmig.db import make_engine
from oauthmig.legacy import LegacyFlavor
from oauthmig.models import OAuthModels
from oauthmig.resources import json_schema
from oauthmig.runlock import lock_key


@dataclass(frozen=True)
class CliResult:
    """Exit code and the two streams of one CLI run."""

    code: int
    out: str
    err: str


def invoke(capsys: pytest.CaptureFixture[str], *args: str) -> CliResult:
    """Run the real CLI entry point in-process and capture its streams."""
    capsys.readouterr()
    code = run(list(args))
    captured = capsys.readouterr()
    return CliResult(code, captured.out, captured.err)


def schema_dump(settings: Settings) -> dict[str, Any]:
    """Tables, columns (name, type, nullability), indexes and unique constraints per database."""
    dump: dict[str, Any] = {}
    for name in settings.database_names():
        engine = make_engine(settings.databases[name], settings)
        try:
            with engine.connect() as conn:
                insp = inspect(conn)
                db: dict[str, Any] = {}
                for t in sorted(insp.get_table_names()):
                    db[t] = {
                        "columns": [
                            (c["name"], str(c["type"]), c["nullable"]) for c in insp.get_columns(t)
                        ],
                        "indexes": sorted(
                            (i["name"] or "", tuple(i["column_names"])) for i in insp.get_indexes(t)
                        ),
                        "unique": sorted(
                            tuple(u["column_names"]) for u in insp.get_unique_constraints(t)
                        ),
                    }
                dump[name] = db
        finally:
            engine.dispose()
    return dump


def columns_of(settings: Settings, database: str, physical: str) -> set[str]:
    """Column names of one table."""
    engine = make_engine(settings.databases[database], settings)
    try:
        with engine.connect() as conn:
            return {c["name"] for c in inspect(conn).get_columns(physical)}
    finally:
        engine.dispose()


def data_checksum(
    settings: Settings, only_columns: dict[str, list[str]] | None = None
) -> dict[str, tuple[int, str]]:
    """(row count, sha256 of rows ordered by id) per database.table; all columns by default."""
    out: dict[str, tuple[int, str]] = {}
    for name in settings.database_names():
        engine = make_engine(settings.databases[name], settings)
        try:
            with engine.connect() as conn:
                for logical in settings.tables_on(name):
                    physical = settings.tables.physical(logical)
                    cols = (only_columns or {}).get(logical)
                    if cols is None:
                        cols = [c["name"] for c in inspect(conn).get_columns(physical)]
                    t = table(physical)
                    q = (
                        select(*[text(f'"{c}"') for c in cols])
                        .select_from(t)
                        .order_by(text('"id"'))
                    )
                    digest = hashlib.sha256()
                    count = 0
                    for row in conn.execute(q):
                        digest.update(repr(tuple(row)).encode())
                        count += 1
                    out[f"{name}.{physical}"] = (count, digest.hexdigest())
        finally:
            engine.dispose()
    return out


def write_config(path: Path, data: dict[str, Any]) -> str:
    """Write a TOML config (only the shapes our tests use) and return its path."""
    lines: list[str] = []

    def value(v: object) -> str:
        if isinstance(v, str):
            return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, list):
            return "[" + ", ".join(value(x) for x in v) + "]"
        return str(v)

    def section(prefix: str, d: dict[str, Any]) -> None:
        scalars = {k: v for k, v in d.items() if not isinstance(v, dict)}
        tables = {k: v for k, v in d.items() if isinstance(v, dict)}
        if scalars and prefix:
            lines.append(f"[{prefix}]")
        for k, v in scalars.items():
            lines.append(f"{k} = {value(v)}")
        for k, v in tables.items():
            section(f"{prefix}.{k}" if prefix else k, v)

    section("", data)
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def seed_legacy(settings: Settings, rows: int = 50) -> None:
    """Insert a few legacy rows with sparse ids into every routed table."""
    import datetime as dt

    from sqlalchemy import insert

    from oauthmig.legacy import legacy_metadata

    now = dt.datetime(2025, 1, 1, tzinfo=dt.UTC)
    for name in settings.database_names():
        routed = settings.tables_on(name)
        md = legacy_metadata(settings.tables, routed)
        engine = make_engine(settings.databases[name], settings)
        try:
            with engine.begin() as conn:
                if "application" in routed:
                    conn.execute(
                        insert(md.tables[settings.tables.application]),
                        [
                            {
                                "id": i * 7,
                                "client_id": f"{name}-client-{i}",
                                "client_secret": None if i % 3 == 0 else f"secret-{i}",
                                "name": f"app {i}",
                                "redirect_uris": f"https://a{i}.example.com/cb",
                                "scopes": ["org:read"],
                                "date_added": now,
                                "owner_id": i,
                            }
                            for i in range(1, rows + 1)
                        ],
                    )
                if "grant" in routed:
                    conn.execute(
                        insert(md.tables[settings.tables.grant]),
                        [
                            {
                                "id": i * 5,
                                "user_id": i,
                                "application_id": i * 7,
                                "code": f"code-{i}",
                                "expires_at": now + dt.timedelta(days=3650 * (i % 2)),
                                "redirect_uri": f"https://a{i}.example.com/cb",
                                "scope_list": [],
                                "scopes": i % 8,
                                "organization_id": i * 11 if i % 3 else None,
                            }
                            for i in range(1, rows + 1)
                        ],
                    )
                if "token" in routed:
                    conn.execute(
                        insert(md.tables[settings.tables.token]),
                        [
                            {
                                "id": i * 3,
                                "user_id": i,
                                "application_id": None if i % 4 == 0 else i * 7,
                                "token": f"{name}-tok-{i}",
                                "hashed_token": f"{name}-h-{i}",
                                "refresh_token": None if i % 4 == 0 else f"{name}-ref-{i}",
                                "scope_list": ["project:read"],
                                "date_added": now,
                                "scopes": i % 16,
                                "scoping_organization_id": i * 11 if i % 2 else None,
                                "name": f"token {i}" if i % 5 == 0 else None,
                            }
                            for i in range(1, rows + 1)
                        ],
                    )
        finally:
            engine.dispose()


def create_migrated_sentry_shape(
    engine: Engine, models: OAuthModels, flavor: LegacyFlavor | None = None
) -> None:
    """The tables a Sentry install has after ``oauthmig upgrade``: the Sentry-shaped legacy
    tables (unmanaged columns, users 1..TEST_USERS, FKs) plus every column the models map
    that the legacy shape lacks, added as ``oauthmig upgrade``'s expand revisions add them
    (nullable, no default). Faster than running the revisions for every test."""
    from sqlalchemy import insert as core_insert

    from oauthmig.legacy import USERS_TABLE, legacy_metadata, user_rows
    from tests.helpers.databases import TEST_USERS

    md = legacy_metadata(
        models.tables, ("application", "grant", "token"), flavor or LegacyFlavor.FRESH
    )
    md.create_all(engine)
    with engine.begin() as conn:
        conn.execute(core_insert(md.tables[USERS_TABLE]), user_rows(TEST_USERS))
        dialect = conn.dialect
        quote = dialect.identifier_preparer.quote
        for mapped in models.metadata.sorted_tables:
            present = {c.name for c in md.tables[mapped.name].columns}
            for column in mapped.columns:
                if column.name not in present:
                    conn.execute(
                        text(
                            f"ALTER TABLE {quote(mapped.name)} ADD COLUMN {quote(column.name)} "
                            f"{column.type.compile(dialect=dialect)}"
                        )
                    )


def run_lock_held(settings: Settings, database: str, purpose: str) -> bool:
    """Whether another process holds the run lock for ``purpose`` (e.g. ``upgrade``).

    PostgreSQL: a granted session advisory lock on the key in ``pg_locks``; SQLite: the
    sidecar lock file is flocked (probed with a shared, non-blocking flock, released at once).
    """
    engine = make_engine(settings.databases[database], settings)
    try:
        if engine.dialect.name == "postgresql":
            with engine.connect() as conn:
                holders = conn.execute(
                    text(
                        "SELECT count(*) FROM pg_locks l JOIN pg_stat_activity a USING (pid) "
                        "WHERE l.locktype = 'advisory' AND l.granted AND l.classid = 0 "
                        "AND l.objid = :k AND l.objsubid = 1 AND a.datname = current_database()"
                    ),
                    {"k": lock_key(purpose)},
                ).scalar_one()
            return bool(holders)
        path = f"{engine.url.database}.{purpose}.lock"
    finally:
        engine.dispose()
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # also drops the probe's shared lock if it was granted
    return False


@functools.cache
def _validator(document: str) -> jsonschema.Draft202012Validator:
    schema = json.loads(json_schema(document).read_text())
    return jsonschema.Draft202012Validator(schema, format_checker=jsonschema.FormatChecker())


def assert_matches_schema(document: str, value: Any) -> None:
    """Fail, listing every violation, unless ``value`` is valid for the shipped JSON Schema of
    ``document`` (``status``, ``upgrade-sql``, ...: ``docs/schemas/<document>.schema.json``)."""
    errors = sorted(_validator(document).iter_errors(value), key=lambda e: list(e.absolute_path))
    assert not errors, f"{document}: " + "; ".join(
        f"{'/'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}" for e in errors[:10]
    )


def wait_for_lock_wait(engine: Engine, failure: str, timeout: float = 20.0) -> None:
    """Poll pg_stat_activity until a session of ``engine``'s database waits for a lock (row,
    transaction or advisory); fail with ``failure`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    with engine.connect() as conn:
        while time.monotonic() < deadline:
            waiting = conn.execute(
                text(
                    "SELECT count(*) FROM pg_stat_activity "
                    "WHERE datname = current_database() AND wait_event_type = 'Lock'"
                )
            ).scalar()
            conn.rollback()
            if waiting:
                return
            time.sleep(0.01)
    raise AssertionError(failure)
