"""The privileges each command needs on PostgreSQL, and the preflight that checks them.

:data:`COMMAND_PRIVILEGES` is the one table of what a command reads, writes, owns or creates
(``docs/operations.md`` renders it; a test keeps the two in step). :func:`check_privileges`
asks the server in one query per database (``has_table_privilege``, ``has_sequence_privilege``
for the sequences behind inserted ids, ``has_schema_privilege`` for tables oauthmig creates,
``pg_has_role`` on the table's owner for DDL: ``ALTER TABLE``, ``CREATE INDEX`` and triggers
need the owner or a member of the owning role) and refuses in one line naming the role, what
it lacks on which objects and what to grant, before anything is written. SQLite has no
privileges (a file that cannot be written is refused by :mod:`oauthmig.runlock`).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from sqlalchemy import text
from sqlalchemy.engine import Connection

from oauthmig.config import DatabaseConfig, Settings
from oauthmig.errors import PrivilegeError

LOGICAL_TABLES = ("application", "grant", "token")
#: The target of a schema-level need (``CREATE`` on the schema tables are created in).
SCHEMA = "schema"


class Command(StrEnum):
    """The commands that connect to a database, as the table names them."""

    UPGRADE = "upgrade"
    DOWNGRADE = "downgrade"
    STAMP = "stamp"
    STATUS = "status"
    DRY_RUN = "upgrade/downgrade/backfill --dry-run"
    BACKFILL = "backfill"
    BACKFILL_CONTROL = "backfill pause/resume/cancel"
    VERIFY = "verify"
    CONTRACT = "contract"
    PRUNE_GRANTS = "prune-grants"
    AUDIT_REDIRECTS = "audit-redirects"
    REPORT = "report"


class Privilege(StrEnum):
    """What a need asks for: a table privilege, ownership (DDL) or CREATE on the schema."""

    SELECT = "SELECT"
    INSERT = "INSERT"
    UPDATE = "UPDATE"
    DELETE = "DELETE"
    OWNER = "OWNER"
    CREATE = "CREATE"


@dataclass(frozen=True, slots=True)
class Need:
    """Privileges on one object: a logical table (``application``, ``grant``, ``token``: only
    where it is routed), an oauthmig table, or :data:`SCHEMA`. ``creates``: the command creates
    the table when it is missing (then it needs CREATE on the schema instead); a table it only
    reads may be missing."""

    target: str
    privileges: tuple[Privilege, ...]
    creates: bool = False


_S, _I, _U, _D = Privilege.SELECT, Privilege.INSERT, Privilege.UPDATE, Privilege.DELETE
_RW = (_S, _I, _U, _D)
_VERSION, _LOG = "oauthmig_version", "oauthmig_revision_log"
_JOB, _BATCH, _VERIFY = "oauthmig_backfill_job", "oauthmig_backfill_batch", "oauthmig_verify"
_OWN = (Privilege.OWNER,)
_DDL = (
    Need("application", _OWN),
    Need("grant", _OWN),
    Need("token", _OWN),
    Need(SCHEMA, (Privilege.CREATE,)),  # the compatibility layer's functions and side tables
    Need(_VERSION, _RW, creates=True),
    Need(_LOG, _RW, creates=True),
    Need(_JOB, (_S,)),
)
_READ_STATE = (Need(_VERSION, (_S,)), Need(_LOG, (_S,)))
_READ_ALL = (
    Need("application", (_S,)),
    Need("grant", (_S,)),
    Need("token", (_S,)),
    *_READ_STATE,
    Need(_JOB, (_S,)),
    Need(_BATCH, (_S,)),
    Need(_VERIFY, (_S,)),
)

#: What each command needs on PostgreSQL, per object (see :class:`Need`).
COMMAND_PRIVILEGES: dict[Command, tuple[Need, ...]] = {
    Command.UPGRADE: (*_DDL, Need(_VERIFY, (_S, _I, _D), creates=True)),
    Command.DOWNGRADE: (*_DDL, Need(_VERIFY, (_S,))),
    Command.STAMP: (
        Need("application", (_S,)),
        Need("grant", (_S,)),
        Need("token", (_S,)),
        Need(_VERSION, _RW, creates=True),
        Need(_LOG, _RW, creates=True),
        Need(_VERIFY, (_S, _I, _D), creates=True),
    ),
    Command.STATUS: _READ_ALL,
    Command.DRY_RUN: _READ_ALL,
    Command.BACKFILL: (
        Need("application", (_S, _U)),
        Need("token", (_S, _U)),
        *_READ_STATE,
        Need(_JOB, (_S, _I, _U), creates=True),
        Need(_BATCH, (_S, _I, _U, _D), creates=True),
    ),
    Command.BACKFILL_CONTROL: (*_READ_STATE, Need(_JOB, (_S, _U))),
    Command.VERIFY: (
        Need("application", (_S,)),
        Need("token", (_S,)),
        Need(_VERIFY, (_S, _I, _D), creates=True),
    ),
    Command.CONTRACT: (
        Need("application", _OWN),
        Need("grant", _OWN),
        Need("token", _OWN),
    ),
    # FOR UPDATE SKIP LOCKED on the rows it deletes takes UPDATE too.
    Command.PRUNE_GRANTS: (Need("grant", (_S, _U, _D)), *_READ_STATE),
    Command.AUDIT_REDIRECTS: (Need("application", (_S,)), Need("grant", (_S,)), *_READ_STATE),
    Command.REPORT: _READ_ALL,
}

# One row per (object, privilege) asked; a missing table is fine unless the command creates
# it (then CREATE on the schema is what it needs). INSERT also needs USAGE on the sequences
# that fill the table's ids (serial or identity columns): listed in missing_sequences.
_QUERY = text(
    """
SELECT n.target, n.priv, c.oid IS NOT NULL AS present,
  CASE
    WHEN n.priv = 'CREATE' OR c.oid IS NULL THEN
      NOT (n.priv = 'CREATE' OR n.creates) OR has_schema_privilege(current_schema(), 'CREATE')
    WHEN n.priv = 'OWNER' THEN pg_has_role(c.relowner, 'USAGE')
    ELSE has_table_privilege(c.oid, n.priv)
  END AS granted,
  CASE WHEN n.priv = 'INSERT' AND c.oid IS NOT NULL THEN (
    SELECT string_agg(quote_ident(s.relname), ', ' ORDER BY s.relname)
    FROM pg_depend d JOIN pg_class s ON s.oid = d.objid
    WHERE d.classid = 'pg_class'::regclass AND d.refobjid = c.oid AND d.deptype IN ('a', 'i')
      AND CASE WHEN s.relkind = 'S' THEN NOT has_sequence_privilege(s.oid, 'USAGE') END
  ) END AS missing_sequences,
  quote_ident(pg_get_userbyid(c.relowner)) AS owner,
  quote_ident(current_user) AS who, quote_ident(current_schema()) AS schema
FROM unnest(CAST(:targets AS text[]), CAST(:privs AS text[]), CAST(:creates AS boolean[]))
  WITH ORDINALITY AS n(target, priv, creates, ord)
LEFT JOIN pg_class c ON n.target <> :schema AND c.oid = to_regclass(n.target)
ORDER BY n.ord
"""
)


def needs_on(settings: Settings, database: str, command: Command) -> list[tuple[str, Need]]:
    """The needs of ``command`` that apply on ``database``, with each object's physical name
    (logical tables not routed there are left out)."""
    routed = settings.tables_on(database)
    out: list[tuple[str, Need]] = []
    for need in COMMAND_PRIVILEGES[command]:
        if need.target in LOGICAL_TABLES:
            if need.target in routed:
                out.append((settings.tables.physical(need.target), need))
        else:
            out.append((need.target, need))
    return out


def check_privileges(
    conn: Connection, settings: Settings, db: DatabaseConfig, command: Command
) -> None:
    """Raise :class:`PrivilegeError` when the connected role lacks a privilege ``command``
    needs on ``db`` (see :data:`COMMAND_PRIVILEGES`); one query. Nothing to check on SQLite."""
    if conn.dialect.name != "postgresql":
        return
    asked = [
        (physical, need, p)
        for physical, need in needs_on(settings, db.name, command)
        for p in need.privileges
    ]
    rows = conn.execute(
        _QUERY,
        {
            "targets": [a[0] for a in asked],
            "privs": [str(a[2]) for a in asked],
            "creates": [a[1].creates for a in asked],
            "schema": SCHEMA,
        },
    ).all()
    if conn.in_transaction():
        conn.rollback()
    if not rows:
        return
    who, schema = rows[0].who, rows[0].schema
    lacking: dict[str, list[str]] = {}  # object as shown -> privileges lacking
    grants: dict[str, list[str]] = {}  # GRANT target -> privileges
    owners: dict[str, str] = {}  # physical table -> owning role
    for row in rows:
        if row.missing_sequences:
            for seq in row.missing_sequences.split(", "):
                lacking.setdefault(f"sequence {seq}", []).append("USAGE")
                grants.setdefault(f"SEQUENCE {seq}", []).append("USAGE")
        if row.granted:
            continue
        if row.priv == Privilege.OWNER:
            owners[row.target] = row.owner
        elif row.priv == Privilege.CREATE or not row.present:
            shown = f"schema {schema}"
            if "CREATE" not in lacking.get(shown, []):
                lacking.setdefault(shown, []).append("CREATE")
                grants.setdefault(f"SCHEMA {schema}", []).append("CREATE")
        else:
            lacking.setdefault(row.target, []).append(row.priv)
            grants.setdefault(row.target, []).append(row.priv)
    if not lacking and not owners:
        return
    what = [f"{', '.join(privs)} on {obj}" for obj, privs in lacking.items()]
    todo = [f"GRANT {', '.join(p)} ON {obj} TO {who}" for obj, p in grants.items()]
    if owners:
        what.insert(
            0,
            f"ownership of {', '.join(owners)} (ALTER TABLE, CREATE INDEX and triggers need "
            "the owner or a member of its role)",
        )
        todo += [f"GRANT {owner} TO {who}" for owner in dict.fromkeys(owners.values())]
    raise PrivilegeError(
        f"database {db.name!r}: role {who} lacks what {command} needs: {'; '.join(what)}; "
        f"run {'; '.join(todo)}, then rerun"
    )
