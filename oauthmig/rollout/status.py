"""Read-only state of every routed database: revisions, backfills, PKCE coverage of live grants."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import and_, column, func, inspect, select, table
from sqlalchemy.engine import Connection
from sqlalchemy.exc import SQLAlchemyError

from oauthmig.config import Settings
from oauthmig.db import connect, describe_error, make_engine, scrub_stored
from oauthmig.errors import OauthmigError
from oauthmig.identity import check_distinct
from oauthmig.rollout.jobs import JobState, job_states
from oauthmig.rollout.revisions import RevisionInfo, history, read_log, revision_position
from oauthmig.rollout.runner import check_state, gate_for


@dataclass(frozen=True, slots=True)
class RevisionState:
    """One cell of the revision × database matrix."""

    revision: str
    state: str  # applied | skipped | pending | waiting | failed
    detail: str | None = None


@dataclass(frozen=True, slots=True)
class DatabaseStatus:
    """Everything ``status`` knows about one database."""

    database: str
    dialect: str
    display_url: str
    tables: tuple[str, ...]
    current: str | None
    revisions: tuple[RevisionState, ...]
    backfills: tuple[JobState, ...]
    live_grants: int | None
    live_grants_without_pkce: int | None
    error: str | None = None

    @property
    def outstanding(self) -> bool:
        """True if anything is pending, waiting or failed (what ``--check`` fails on)."""
        if self.error:
            return True
        if any(r.state in ("pending", "waiting", "failed") for r in self.revisions):
            return True
        return any(j.state != "finished" for j in self.backfills)


@dataclass(frozen=True, slots=True)
class StatusReport:
    """The revision × database matrix and per-database details."""

    revisions: tuple[RevisionInfo, ...]
    databases: tuple[DatabaseStatus, ...]

    @property
    def outstanding(self) -> bool:
        """True if any database has outstanding work."""
        return any(d.outstanding for d in self.databases)


# Backfill status hook: (connection, settings, database) -> job states. Registered by the
# backfill module so that this module does not depend on it.


def _live_grants(conn: Connection, settings: Settings, db: str) -> tuple[int | None, int | None]:
    if "grant" not in settings.tables_on(db):
        return None, None
    physical = settings.tables.physical("grant")
    names = {c["name"] for c in inspect(conn).get_columns(physical)}
    g = table(physical, column("expires_at"), column("code_challenge"))
    live = g.c.expires_at > datetime.now(UTC)
    total = conn.execute(select(func.count()).select_from(g).where(live)).scalar_one()
    if "code_challenge" not in names:
        without = total
    else:
        without = conn.execute(
            select(func.count()).select_from(g).where(and_(live, g.c.code_challenge.is_(None)))
        ).scalar_one()
    conn.rollback()
    return int(total), int(without)


def _database_status(
    settings: Settings, name: str, revisions: list[RevisionInfo]
) -> DatabaseStatus:
    db = settings.databases[name]
    routed = settings.tables_on(name)
    engine = make_engine(db, settings)
    try:
        with connect(engine, db) as conn:
            current = check_state(conn, settings, db, revisions)
            log = read_log(conn)
            applied_upto = revision_position(current, revisions)
            cells: list[RevisionState] = []
            gate_found = False
            for i, rev in enumerate(revisions):
                row: dict[str, Any] = log.get(rev.revision, {})
                if i < applied_upto:
                    state = str(row.get("outcome") or "applied")
                    adopted = row.get("adopted")
                    cells.append(
                        RevisionState(
                            rev.revision, state, f"adopted {adopted}" if adopted else None
                        )
                    )
                    continue
                if row.get("outcome") == "failed":
                    detail = scrub_stored(row.get("detail"), db.url)
                    cells.append(RevisionState(rev.revision, "failed", detail))
                    continue
                if not gate_found:
                    waiting = gate_for(conn, settings, name, rev)
                    if waiting is not None:
                        gate_found = True
                        cells.append(
                            RevisionState(
                                rev.revision,
                                "waiting",
                                waiting.describe(),
                            )
                        )
                        continue
                cells.append(RevisionState(rev.revision, "pending"))
            jobs: list[JobState] = []
            jobs.extend(job_states(conn, settings, name))
            live, without = _live_grants(conn, settings, name)
            return DatabaseStatus(
                name,
                conn.dialect.name,
                db.display_url,
                routed,
                current,
                tuple(cells),
                tuple(jobs),
                live,
                without,
            )
    except OauthmigError as exc:
        return DatabaseStatus(
            name, db.dialect, db.display_url, routed, None, (), (), None, None, exc.message
        )
    except SQLAlchemyError as exc:
        return DatabaseStatus(
            name,
            db.dialect,
            db.display_url,
            routed,
            None,
            (),
            (),
            None,
            None,
            f"database {name!r}: {describe_error(exc, db)}",
        )
    finally:
        engine.dispose()


def status(settings: Settings) -> StatusReport:
    """Read the state of every selected database (never writes)."""
    revisions = history()
    check_distinct(settings)
    return StatusReport(
        tuple(revisions),
        tuple(_database_status(settings, n, revisions) for n in settings.database_names()),
    )
