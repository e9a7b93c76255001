"""A role without the privileges a command needs is refused before anything is written: one
line per database naming the role, what it lacks on which object and what to grant (exit 2,
never a raw ``permission denied``). With exactly what :data:`COMMAND_PRIVILEGES` lists for the
command, the command runs. PostgreSQL only: SQLite has no privileges."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import Engine, make_url

from oauthmig.config import Settings, settings_from_mapping
from oauthmig.privileges import COMMAND_PRIVILEGES, Command, Privilege, needs_on
from tests.helpers import invoke, seed_legacy, write_config
from tests.helpers.databases import DatabaseFactory, create_legacy, routed_config

PG = pytest.mark.parametrize("backend", ["postgresql"], indirect=True)

# In the order they run on one setup (each success leaves what the next one expects), with
# the exit codes a run that had its privileges may end with (1: findings).
CASES: list[tuple[Command, tuple[str, ...], tuple[int, ...]]] = [
    (Command.STATUS, ("status",), (0,)),
    (Command.AUDIT_REDIRECTS, ("audit-redirects",), (0, 1)),
    (Command.REPORT, ("report", "--html", "{tmp}/report.html"), (0,)),
    (Command.VERIFY, ("verify",), (0,)),
    (Command.BACKFILL, ("backfill",), (0,)),
    (Command.BACKFILL_CONTROL, ("backfill", "pause"), (0,)),
    (Command.PRUNE_GRANTS, ("prune-grants",), (0,)),
    (Command.STAMP, ("stamp", "0003"), (0,)),
    (Command.DRY_RUN, ("upgrade", "--dry-run"), (0,)),
    (Command.DRY_RUN, ("backfill", "--dry-run"), (0,)),
    (Command.UPGRADE, ("upgrade",), (0,)),
    (Command.CONTRACT, ("contract", "--since", "2000-01-01T00:00:00Z"), (0,)),
    (Command.DOWNGRADE, ("downgrade", "--to", "0003"), (0,)),
]


# The admin's tables and functions in public go to the database's owner role (the bootstrap
# superuser's objects cannot be REASSIGNed); a table's sequences follow it.
_OWNED_BY = """
DO $$ DECLARE r record; BEGIN
  FOR r IN SELECT tablename FROM pg_tables WHERE schemaname = 'public' LOOP
    EXECUTE format('ALTER TABLE %I OWNER TO OWNER_ROLE', r.tablename);
  END LOOP;
  FOR r IN SELECT p.oid::regprocedure AS f FROM pg_proc p
           WHERE p.pronamespace = 'public'::regnamespace LOOP
    EXECUTE format('ALTER FUNCTION %s OWNER TO OWNER_ROLE', r.f);
  END LOOP;
END $$
"""


@contextmanager
def _session(url: str) -> Iterator[Engine]:
    engine = create_engine(url, isolation_level="AUTOCOMMIT")
    try:
        yield engine
    finally:
        engine.dispose()


def _grant_exactly(
    admin: Engine,
    settings: Settings,
    database: str,
    role: str,
    owner: str,
    command: Command,
    left_out: tuple[str, Privilege] | None,
) -> None:
    """Give ``role`` on ``database`` what the table lists for ``command``, except
    ``left_out``; ownership is membership in ``owner`` (the owner of every table there, so
    leaving out one table's ownership leaves out all)."""
    url = settings.databases[database].url
    assert url is not None
    with _session(url) as engine, engine.connect() as conn:
        for stmt in (
            f"REVOKE ALL ON ALL TABLES IN SCHEMA public FROM {role}",
            f"REVOKE ALL ON ALL SEQUENCES IN SCHEMA public FROM {role}",
            f"REVOKE CREATE ON SCHEMA public FROM {role}",
            f"GRANT USAGE ON ALL SEQUENCES IN SCHEMA public TO {role}",
        ):
            conn.execute(text(stmt))
        member = False
        for physical, need in needs_on(settings, database, command):
            for privilege in need.privileges:
                if (physical, privilege) == left_out:
                    continue
                if privilege is Privilege.OWNER and left_out and left_out[1] is Privilege.OWNER:
                    continue  # one owner role owns every table here
                if privilege is Privilege.OWNER:
                    member = True
                elif privilege is Privilege.CREATE:
                    conn.execute(text(f"GRANT CREATE ON SCHEMA public TO {role}"))
                else:
                    conn.execute(text(f"GRANT {privilege} ON {physical} TO {role}"))
    with admin.connect() as conn:
        conn.execute(
            text(f"{'GRANT' if member else 'REVOKE'} {owner} {'TO' if member else 'FROM'} {role}")
        )


@PG
def test_each_command_names_what_the_role_lacks_and_runs_with_what_the_table_lists(
    make_database: DatabaseFactory,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    pg_admin: Engine,
) -> None:
    assert {c for c, _args, _codes in CASES} == set(COMMAND_PRIVILEGES)
    data = routed_config(make_database("control"), make_database("shard"))
    settings = settings_from_mapping(data, {}, "test")
    create_legacy(settings)
    seed_legacy(settings, rows=20)
    admin_cfg = write_config(tmp_path / "admin.toml", data)
    # As the admin: expand, backfill and verify, so oauthmig's tables exist (owned below).
    for step in (("upgrade",), ("backfill",), ("verify",)):
        assert invoke(capsys, "--config", admin_cfg, *step).code == 0, step
    suffix = uuid.uuid4().hex[:8]
    role = f"oauthmig_r_{suffix}"
    owners = {name: f"oauthmig_o_{suffix}_{name}" for name in settings.database_names()}
    with pg_admin.connect() as conn:
        conn.execute(text(f"CREATE ROLE {role} LOGIN"))
        for owner in owners.values():
            conn.execute(text(f"CREATE ROLE {owner} NOLOGIN"))
    try:
        restricted = routed_config(
            *(
                make_url(data["databases"][n]["url"])  # type: ignore[index]
                .set(username=role)
                .render_as_string(hide_password=False)
                for n in ("control", "shard")
            )
        )
        for name, owner in owners.items():
            url = settings.databases[name].url
            assert url is not None
            with _session(url) as engine, engine.connect() as conn:
                conn.execute(text(_OWNED_BY.replace("OWNER_ROLE", owner)))
        cfg = write_config(tmp_path / "role.toml", restricted)
        for command, args, ok in CASES:
            argv = [a.format(tmp=tmp_path) for a in args]
            physical, need = needs_on(settings, "control", command)[0]
            missing = (physical, need.privileges[0])
            for name in settings.database_names():
                left_out = missing if name == "control" else None
                _grant_exactly(pg_admin, settings, name, role, owners[name], command, left_out)
            refused = invoke(capsys, "--config", cfg, *argv)
            assert refused.code == 2, (argv, refused.out, refused.err)
            assert "permission denied" not in refused.err and "Traceback" not in refused.err
            line = next(x for x in refused.err.splitlines() if "database 'control'" in x)
            assert f"role {role} lacks what {command} needs" in line, line
            if missing[1] is Privilege.OWNER:
                assert f"ownership of {physical}" in line or f", {physical}" in line, line
                assert f"GRANT {owners['control']} TO {role}" in line, line
            else:
                assert f"{missing[1]} on {physical}" in line, line
                assert f"GRANT {missing[1]} ON {physical} TO {role}" in line, line
            assert "database 'shard'" not in refused.err, refused.err
            _grant_exactly(pg_admin, settings, "control", role, owners["control"], command, None)
            done = invoke(capsys, "--config", cfg, *argv)
            assert done.code in ok, (argv, done.out, done.err)
            assert "permission denied" not in done.err, done.err
        # A table the command creates, missing, needs CREATE on the schema (PostgreSQL 15
        # no longer grants it to PUBLIC); inserted ids need USAGE on their sequence.
        control = settings.databases["control"].url
        assert control is not None
        _grant_exactly(pg_admin, settings, "control", role, owners["control"], Command.VERIFY, None)
        with _session(control) as engine, engine.connect() as conn:
            conn.execute(text("DROP TABLE oauthmig_verify"))
        refused = invoke(capsys, "--config", cfg, "-d", "control", "verify")
        assert refused.code == 2 and "CREATE on schema public" in refused.err, refused.err
        assert f"GRANT CREATE ON SCHEMA public TO {role}" in refused.err, refused.err
        _grant_exactly(
            pg_admin, settings, "control", role, owners["control"], Command.BACKFILL, None
        )
        with _session(control) as engine, engine.connect() as conn:
            conn.execute(text(f"REVOKE USAGE ON ALL SEQUENCES IN SCHEMA public FROM {role}"))
        refused = invoke(capsys, "--config", cfg, "-d", "control", "backfill")
        assert refused.code == 2, refused.err
        seq = "oauthmig_backfill_batch_id_seq"
        assert f"USAGE on sequence {seq}" in refused.err, refused.err
        assert f"GRANT USAGE ON SEQUENCE {seq} TO {role}" in refused.err, refused.err
    finally:
        for name in settings.database_names():
            url = settings.databases[name].url
            assert url is not None
            with _session(url) as engine, engine.connect() as conn:
                conn.execute(text(f"DROP OWNED BY {role}, {', '.join(owners.values())}"))
        with pg_admin.connect() as conn:
            conn.execute(text(f"DROP ROLE IF EXISTS {role}, {', '.join(owners.values())}"))
