"""Enforcement readiness: per check, the applications that would be rejected under
``enforce``, read from observe mode's record (revision 0007, :mod:`oauthmig.observation_table`).

An operator runs a check in ``observe``, reads this list (``oauthmig status``, ``oauthmig
report --html``) and flips the check to ``enforce`` once it is empty, or holds only clients
whose rejection is accepted. Read-only; one bounded aggregate query per database that hosts the
application table.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Final

from sqlalchemy import column, func, inspect, select, table
from sqlalchemy.engine import Connection

from oauthmig.config import ENFORCEMENT_CHECKS, Settings
from oauthmig.observation_table import OBSERVATION_TABLE, loaded_time, observation_table

#: Observations older than this are not shown (rows stay; one per application, check, day).
WINDOW_DAYS: Final = 30
#: At most this many applications per check and database are listed (most rejections first).
MAX_PER_CHECK: Final = 50


@dataclass(frozen=True, slots=True)
class WouldReject:
    """One application that a check in observe mode would have rejected."""

    check: str
    application_id: int
    client_id: str | None  # None when the application row is gone
    count: int
    first_seen: datetime
    last_seen: datetime


@dataclass(frozen=True, slots=True)
class EnforcementReadiness:
    """What observe mode recorded on one database since ``since``.

    ``recording`` is False where revision 0007 has not created the table (nothing can be
    observed there yet). ``modes`` is each check's global mode in the configuration's
    ``[enforcement]`` and ``observed`` the checks in observe mode globally or for some client
    (a check observed nowhere records nothing). ``applications`` maps each check to the
    applications it would reject (every check present, most rejections first, at most
    :data:`MAX_PER_CHECK`; ``truncated`` names the checks that had more).
    """

    database: str
    recording: bool
    since: datetime
    applications: Mapping[str, tuple[WouldReject, ...]]
    truncated: tuple[str, ...] = ()
    modes: Mapping[str, str] = field(default_factory=dict)
    observed: tuple[str, ...] = ()

    @property
    def ready(self) -> tuple[str, ...]:
        """The checks with nothing observed: safe to enforce, as far as observe mode saw."""
        return tuple(c for c in ENFORCEMENT_CHECKS if not self.applications.get(c))


def enforcement_readiness(
    conn: Connection, settings: Settings, database: str, *, now: datetime | None = None
) -> EnforcementReadiness | None:
    """Readiness on ``database`` (None where the application table is not routed)."""
    if "application" not in settings.tables_on(database):
        return None
    since = (now or datetime.now(UTC)) - timedelta(days=WINDOW_DAYS)
    empty: dict[str, tuple[WouldReject, ...]] = {c: () for c in ENFORCEMENT_CHECKS}
    policy = settings.enforcement
    modes = {c: policy.mode(c) for c in ENFORCEMENT_CHECKS}
    observed = tuple(c for c in ENFORCEMENT_CHECKS if policy.observed(c))
    if not inspect(conn).has_table(OBSERVATION_TABLE):
        return EnforcementReadiness(database, False, since, empty, (), modes, observed)
    o = observation_table
    app = table(settings.tables.application, column("id"), column("client_id"))
    rows = conn.execute(
        select(
            o.c.check_name,
            o.c.application_id,
            app.c.client_id,
            func.sum(o.c.count).label("total"),
            func.min(o.c.first_seen).label("first_seen"),
            func.max(o.c.last_seen).label("last_seen"),
        )
        .select_from(o.outerjoin(app, app.c.id == o.c.application_id))
        .where(o.c.day >= since.date())
        .group_by(o.c.check_name, o.c.application_id, app.c.client_id)
        .order_by(o.c.check_name, func.sum(o.c.count).desc(), o.c.application_id)
    ).all()
    found: dict[str, list[WouldReject]] = {c: [] for c in ENFORCEMENT_CHECKS}
    truncated: list[str] = []
    for r in rows:
        listed = found.setdefault(str(r.check_name), [])
        if len(listed) >= MAX_PER_CHECK:
            if r.check_name not in truncated:
                truncated.append(str(r.check_name))
            continue
        listed.append(
            WouldReject(
                str(r.check_name),
                int(r.application_id),
                None if r.client_id is None else str(r.client_id),
                int(r.total),
                loaded_time(r.first_seen),
                loaded_time(r.last_seen),
            )
        )
    return EnforcementReadiness(
        database,
        True,
        since,
        {c: tuple(v) for c, v in found.items()},
        tuple(truncated),
        modes,
        observed,
    )
