"""A separate process that writes what the provider writes while a rollout runs beside it.

``python -m tests.legacy_writer CONFIG STOP_FILE REPORT_FILE MODE`` writes until STOP_FILE
exists (or MAX_SECONDS pass, or MAX_OPS writes were made), then writes a JSON report
(counts of writes and failures, the first failure messages, the ids it inserted) to
REPORT_FILE and exits. ``READY`` is written beside the report once the first round of writes
succeeded, so a test can wait for it.

MODE ``legacy``: Sentry's unchanged code. Every INSERT names exactly the legacy columns
(:data:`oauthmig.legacy.SENTRY_COLUMNS`, through :func:`oauthmig.legacy.legacy_metadata`): it
creates applications (half public, half confidential), inserts tokens with refresh tokens,
refreshes tokens in place (new token and refresh token on the same row), inserts and deletes
grants; on every database hosting each table. MODE ``library``: the new library
(``oauthmig.models``) beside it: applications with their metadata, a grant, its exchange and a
rotation. Each write is its own transaction; a failure is counted and the loop goes on.
"""

from __future__ import annotations

import json
import secrets
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import Table, create_engine, delete, event, insert, update
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.orm import Session

from oauthmig.config import load_settings
from oauthmig.legacy import legacy_metadata

MAX_SECONDS = 600.0
MAX_OPS = 200_000
REDIRECTS = ("https://app.example.com/cb", "com.example.app:/cb", "http://127.0.0.1/cb")


def _engine(url: str) -> Engine:
    if make_url(url).get_backend_name() == "sqlite":
        # The provider's own busy timeout: SQLite has one writer at a time.
        engine = create_engine(url, connect_args={"timeout": 120})

        @event.listens_for(engine, "connect")
        def _connect(dbapi_conn: Any, _record: Any) -> None:
            dbapi_conn.isolation_level = None

        @event.listens_for(engine, "begin")
        def _begin(conn: Any) -> None:
            conn.exec_driver_sql("BEGIN IMMEDIATE")

        return engine
    return create_engine(url, connect_args={"application_name": "legacy-writer"})


class Writer:
    def __init__(self, config: str, mode: str) -> None:
        self.settings = load_settings(config)
        self.mode = mode
        self.writes = 0
        self.failures: list[str] = []
        self.failed = 0
        self.inserted: dict[str, dict[str, list[int]]] = {}
        self.engines = {
            name: _engine(self.settings.databases[name].url or "")
            for name in self.settings.database_names()
        }
        self.n = 0

    def _do(self, what: str, fn: Any, *args: Any) -> Any:
        self.n += 1
        try:
            out = fn(*args)
        except Exception as exc:  # every failed write is what we count
            self.failed += 1
            if len(self.failures) < 20:
                self.failures.append(f"{what}: {type(exc).__name__}: {str(exc)[:300]}")
            return None
        self.writes += 1
        return out

    def _record(self, db: str, logical: str, row_id: int | None) -> None:
        if row_id is not None:
            self.inserted.setdefault(db, {}).setdefault(logical, []).append(int(row_id))

    def _mine(self, db: str, logical: str) -> list[int]:
        return self.inserted.get(db, {}).get(logical, [])

    @staticmethod
    def _insert(engine: Engine, table: Table, values: dict[str, Any]) -> int:
        with engine.begin() as c:
            key: Any = c.execute(insert(table).values(values)).inserted_primary_key
            return int(key[0])

    @staticmethod
    def _grant_cycle(engine: Engine, grant: Table, values: dict[str, Any]) -> None:
        with engine.begin() as c:
            key: Any = c.execute(insert(grant).values(values)).inserted_primary_key
            gid = key[0]
        with engine.begin() as c:
            c.execute(delete(grant).where(grant.c.id == gid))

    @staticmethod
    def _refresh(engine: Engine, token: Table, row_id: int, values: dict[str, Any]) -> None:
        # Sentry's legacy refresh: new secrets on the same row.
        with engine.begin() as c:
            c.execute(update(token).where(token.c.id == row_id).values(values))

    @staticmethod
    def _secrets(now: datetime) -> dict[str, Any]:
        access, refresh = secrets.token_hex(20), secrets.token_hex(20)
        return {
            "token": access,
            "hashed_token": None,
            "token_last_characters": access[-4:],
            "refresh_token": refresh,
            "hashed_refresh_token": None,
            "expires_at": now + timedelta(hours=8),
        }

    def legacy_round(self) -> None:
        now = datetime.now(UTC)
        t = self.settings.tables
        for db, engine in self.engines.items():
            routed = self.settings.tables_on(db)
            md = legacy_metadata(t, routed)
            k = self.n
            if "application" in routed:
                app = {
                    "client_id": secrets.token_hex(16),
                    "client_secret": None if k % 2 else secrets.token_hex(16),
                    "owner_id": 1 + k % 50,
                    "name": f"legacy app {k}",
                    "status": 0,
                    "allowed_origins": None,
                    "redirect_uris": REDIRECTS[k % len(REDIRECTS)],
                    "homepage_url": None,
                    "privacy_url": None,
                    "terms_url": None,
                    "scopes": ["project:read"],
                    "version": 0,
                    "date_added": now,
                    "requires_org_level_access": False,
                }
                table = md.tables[t.application]
                self._record(
                    db,
                    "application",
                    self._do("insert application", self._insert, engine, table, app),
                )
            apps = self._mine(db, "application")
            if "grant" in routed and apps:
                grant = {
                    "user_id": 1 + k % 50,
                    "application_id": apps[-1],
                    "code": secrets.token_hex(16),
                    "expires_at": now + timedelta(minutes=1),
                    "redirect_uri": REDIRECTS[0],
                    "scope_list": ["project:read"],
                    "organization_id": None,
                    "scopes": 0,
                }
                self._do(
                    "insert and delete grant", self._grant_cycle, engine, md.tables[t.grant], grant
                )
            if "token" in routed:
                token = md.tables[t.token]
                row = {
                    "user_id": 1 + k % 50,
                    "application_id": apps[-1] if apps else None,
                    "token_type": None,
                    "scope_list": ["project:read"],
                    "date_added": now,
                    "scopes": 0,
                    "scoping_organization_id": None,
                    "name": None,
                    **self._secrets(now),
                }
                self._record(
                    db, "token", self._do("insert token", self._insert, engine, token, row)
                )
                mine = self._mine(db, "token")
                if mine:
                    target = mine[k % len(mine)]
                    self._do(
                        "refresh in place", self._refresh, engine, token, target, self._secrets(now)
                    )

    def _library_flow(self, db: str, engine: Engine, models: Any, k: int) -> None:
        from oauthmig.models import exchange_code, new_grant, rotate_refresh_token

        with Session(engine) as s:
            app = models.Application(
                client_id=secrets.token_hex(16),
                client_secret=None,
                name=f"library app {k}",
                redirect_uris=REDIRECTS[0],
                scopes=["project:read"],
                date_added=datetime.now(UTC),
                token_endpoint_auth_method="none",
                grant_types=["authorization_code", "refresh_token"],
                response_types=["code"],
                application_type="web",
            )
            s.add(app)
            s.commit()
            self._record(db, "application", app.id)
            grant = new_grant(
                s,
                application=app,
                user_id=1 + k % 50,
                redirect_uri=REDIRECTS[0],
                scopes=["project:read"],
                models=models,
            )
            issued = exchange_code(
                s, application=app, code=grant.code, redirect_uri=REDIRECTS[0], models=models
            )
            self._record(db, "token", issued.token_id)
            again = rotate_refresh_token(s, issued.refresh_token or "", models=models)
            self._record(db, "token", again.token_id)

    def library_round(self) -> None:
        from oauthmig.models import build_models

        models = build_models(self.settings.tables, defaults={"grant": {"scopes": 0}})
        for db, engine in self.engines.items():
            if {"application", "grant", "token"} <= set(self.settings.tables_on(db)):
                self._do("library flow", self._library_flow, db, engine, models, self.n)

    def run(self, stop: Path, report: Path) -> None:
        ready = report.with_name(report.name + ".READY")
        started = time.monotonic()
        while not stop.exists() and time.monotonic() - started < MAX_SECONDS and self.n < MAX_OPS:
            if self.mode == "legacy":
                self.legacy_round()
            else:
                self.library_round()
            if not ready.exists() and self.writes:
                ready.write_text("ready")
            time.sleep(0.005)  # pacing only (about what a busy provider writes)
        out = {
            "writes": self.writes,
            "failed": self.failed,
            "failures": self.failures,
            "inserted": self.inserted,
            "stopped_by_file": stop.exists(),
        }
        tmp = report.with_name(report.name + ".tmp")
        tmp.write_text(json.dumps(out))
        tmp.replace(report)
        for engine in self.engines.values():
            engine.dispose()


def main(argv: list[str]) -> int:
    config, stop, report, mode = argv
    Writer(config, mode).run(Path(stop), Path(report))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
