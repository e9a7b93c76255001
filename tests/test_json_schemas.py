"""Every ``--format json`` document matches its shipped JSON Schema (``docs/schemas/``).

One rollout per backend walks the states whose documents differ in shape: fresh legacy
tables, expanded with 0004 waiting for its backfills, a failed backfill, backfilled, finalized,
and on PostgreSQL a failed revision; every command that prints JSON runs in each of them and
its output is validated. The schemas themselves are checked for validity and strictness, and
every command offering ``--format json`` (found by walking the click commands) has one.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click
import jsonschema
import pytest
from sqlalchemy import inspect, select, text
from sqlalchemy.orm import Session

from oauthmig.cli import cli
from oauthmig.config import Settings, settings_from_mapping
from oauthmig.db import make_engine
from oauthmig.models import Check, build_models
from oauthmig.observation_table import OBSERVATION_TABLE
from oauthmig.provider.observations import record_observation
from oauthmig.resources import schemas_dir
from tests.helpers import assert_matches_schema, invoke, seed_legacy, write_config
from tests.helpers.databases import DatabaseFactory, create_legacy, routed_config

DRAFT = "https://json-schema.org/draft/2020-12/schema"
# Documents that are not "the output of command X": what Ctrl-C leaves (test_cli_contract).
NOT_A_COMMAND = {"interrupted", "audit-baseline"}
# Subcommands that print one shared document; any other command path "a b" has schema "a-b".
SHARED = {
    "backfill pause": "backfill-request",
    "backfill resume": "backfill-request",
    "backfill cancel": "backfill-request",
}
# Options that select a different document: `upgrade --sql` prints `upgrade-sql`, and so on.
VARIANTS = {"--sql": "sql", "--report": "report", "--summary": "summary"}


class Runner:
    """Runs the CLI with ``--format json`` on one installation and validates every document."""

    def __init__(self, capsys: pytest.CaptureFixture[str], config: str) -> None:
        self.capsys = capsys
        self.config = config
        self.validated: set[str] = set()

    def json(self, document: str, *args: str, code: int = 0) -> Any:
        """Run ``oauthmig ARGS --format json``, expect ``code``, validate stdout as ``document``."""
        result = invoke(self.capsys, "--config", self.config, *args, "--format", "json")
        assert result.code == code, (args, result.err)
        assert "Traceback" not in result.err
        value = json.loads(result.out)
        assert_matches_schema(document, value)
        self.validated.add(document)
        return value

    def every_reader(self, backend: str) -> dict[str, Any]:
        """The commands that only read (or write nothing), in the current state."""
        docs = {
            "status": self.json("status", "status"),
            "status-summary": self.json("status-summary", "status", "--summary"),
            "history": self.json("history", "history"),
            "upgrade-dry": self.json("upgrade", "upgrade", "--dry-run"),
            "upgrade-sql": self.json("upgrade-sql", "upgrade", "--sql"),
            "backfill-dry": self.json("backfill", "backfill", "--dry-run"),
            "report": self.json("backfill-report", "backfill", "--report"),
            "prune-dry": self.json("prune-grants", "prune-grants", "--dry-run"),
            "audit": self.json("audit-redirects", "audit-redirects", "--fail-on", "never"),
        }
        if backend == "postgresql":  # offline SQLite downgrades are refused (exit 2)
            docs["downgrade-sql"] = self.json(
                "downgrade-sql", "downgrade", "--sql", "--from", "head", "--to", "base"
            )
        return docs


def _observe_on_control(settings: Settings) -> None:
    """Two observe-mode records, through the models library, of the first application."""
    models = build_models(settings.tables)
    engine = make_engine(settings.databases["control"], settings)
    try:
        assert not inspect(make_engine(settings.databases["shard"], settings)).has_table(
            OBSERVATION_TABLE
        )
        with Session(engine) as session:
            app = session.scalars(
                select(models.Application).order_by(models.Application.id)
            ).first()
            assert app is not None
            app.client_id = "observed-client"
            for _ in range(2):
                assert record_observation(
                    session,
                    application_id=app.id,
                    check=Check.REFRESH_REUSE,
                    bind_mapper=models.Application,
                )
            session.commit()
    finally:
        engine.dispose()


def _exec(settings: Settings, database: str, *statements: str) -> None:
    engine = make_engine(settings.databases[database], settings)
    try:
        with engine.begin() as conn:
            for statement in statements:
                conn.execute(text(statement))
    finally:
        engine.dispose()


def _break_token_updates(settings: Settings, backend: str) -> None:
    """Make every UPDATE of the shard's tokens fail, as a broken trigger in production would."""
    token = settings.tables.token
    if backend == "postgresql":
        _exec(
            settings,
            "shard",
            "CREATE FUNCTION refuse() RETURNS trigger AS $$ BEGIN "
            "RAISE EXCEPTION 'updates are refused'; END $$ LANGUAGE plpgsql",
            f"CREATE TRIGGER refuse BEFORE UPDATE ON {token} FOR EACH ROW "
            "EXECUTE FUNCTION refuse()",
        )
    else:
        _exec(
            settings,
            "shard",
            f"CREATE TRIGGER refuse BEFORE UPDATE ON {token} "
            "BEGIN SELECT RAISE(ABORT, 'updates are refused'); END",
        )


def _states(doc: dict[str, Any], database: str) -> dict[str, str]:
    db = next(d for d in doc["databases"] if d["database"] == database)
    return {rev: cell["state"] for rev, cell in db["revisions"].items()}


@pytest.fixture
def installation(make_database: DatabaseFactory, tmp_path: Path) -> Iterator[tuple[Settings, str]]:
    """Legacy tables with a few rows on control (all three tables) and shard (token)."""
    # keep_batches 2: a backfill of more batches folds the older ones into the summary row.
    data = routed_config(
        make_database("control"), make_database("shard"), backfill={"keep_batches": 2}
    )
    settings = settings_from_mapping(data, {}, "test")
    create_legacy(settings)
    seed_legacy(settings, rows=30)
    yield settings, write_config(tmp_path / "oauthmig.toml", data)


def test_every_json_document_matches_its_schema_through_a_rollout(
    installation: tuple[Settings, str], backend: str, capsys: pytest.CaptureFixture[str]
) -> None:
    settings, cfg = installation
    run = Runner(capsys, cfg)
    checked = run.json(
        "check-redirect",
        "check-redirect",
        "https://app.example.com/cb",
        "http://*.example.com/cb",
        "--fail-on",
        "never",
    )
    assert [r["verdict"] for r in checked] == ["pass", "fail"]

    # Fresh: nothing applied, 0004 waits for backfills that cannot have run yet.
    fresh = run.every_reader(backend)
    assert fresh["status"]["outstanding"] is True
    assert _states(fresh["status"], "control")["0004"] == "waiting"
    assert {j["state"] for d in fresh["status"]["databases"] for j in d["backfills"]} == {
        "waiting for upgrade"
    }
    assert {j["state"]["history"] is None for j in fresh["report"]["jobs"]} == {True}
    assert [d["consumed_deleted"] for d in fresh["prune-dry"]["databases"]] == [None]
    assert all(d["sql"] for d in fresh["upgrade-dry"]["databases"])

    if backend == "postgresql":
        # A revision that fails on one database: its run carries the error, status the cell.
        _exec(
            settings,
            "shard",
            "CREATE FUNCTION no_ddl() RETURNS event_trigger AS $$ BEGIN "
            "RAISE EXCEPTION 'no DDL here'; END $$ LANGUAGE plpgsql",
            "CREATE EVENT TRIGGER no_ddl ON ddl_command_start WHEN TAG IN ('ALTER TABLE') "
            "EXECUTE FUNCTION no_ddl()",
        )
        failed = run.json("upgrade", "upgrade", code=2)
        assert [d["error"] is None for d in failed["databases"]] == [True, False]
        assert _states(run.json("status", "status"), "shard")["0002"] == "failed"
        _exec(settings, "shard", "DROP EVENT TRIGGER no_ddl", "DROP FUNCTION no_ddl()")

    # Expanded: 0004 waits on both databases, with the rows each backfill has left.
    expanded = run.json("upgrade", "upgrade")
    assert all(d["waiting"] is not None for d in expanded["databases"])
    waiting = run.every_reader(backend)
    assert _states(waiting["status"], "shard")["0004"] == "waiting"
    assert all(j["status"] == "dry-run" for j in waiting["backfill-dry"]["jobs"])
    reverting = run.json("downgrade", "downgrade", "--to", "0002", "--dry-run")
    assert {s["action"] for d in reverting["databases"] for s in d["steps"]} == {"revert"}

    # A backfill that fails on one database: failed there, finished elsewhere, and status says so.
    _break_token_updates(settings, backend)
    broken = run.json("backfill", "backfill", "--batch", "5", code=2)
    assert {(j["database"], j["status"]) for j in broken["jobs"]} >= {("shard", "failed")}
    shard = next(d for d in run.json("status", "status")["databases"] if d["database"] == "shard")
    assert [j["state"] for j in shard["backfills"]] == ["failed"]
    assert shard["backfills"][0]["last_error"]
    history = run.json("backfill-report", "backfill", "--report", "token-families", "-d", "shard")
    [failed_job] = history["jobs"]
    assert [r["outcome"] for r in failed_job["recent"]][:1] == ["failed"]
    assert failed_job["recent"][0]["error_class"]
    on_table = f" ON {settings.tables.token}" if backend == "postgresql" else ""
    _exec(settings, "shard", f"DROP TRIGGER refuse{on_table}")

    # Backfilled: every job finished, 0004 pending.
    filled = run.json("backfill", "backfill", "--batch", "5")
    assert {j["status"] for j in filled["jobs"]} <= {"finished", "up-to-date"}
    backfilled = run.every_reader(backend)
    assert _states(backfilled["status"], "control")["0004"] == "pending"
    # More batches than keep_batches: the older ones are folded into the summary row.
    assert all(j["summary"] is not None for j in backfilled["report"]["jobs"])
    assert {len(j["recent"]) for j in backfilled["report"]["jobs"]} == {2}

    # Requests from another shell: pause holds the finished jobs, resume withdraws it, and a
    # cancel of a finished job records nothing.
    paused = run.json("backfill-request", "backfill", "pause")
    assert {(r["recorded"], r["request"]["action"]) for r in paused["requests"]} == {
        (True, "pause")
    }
    resumed = run.json("backfill-request", "backfill", "resume", "token-families")
    assert {r["request"]["action"] for r in resumed["requests"]} == {"resume"}
    cancelled = run.json("backfill-request", "backfill", "cancel", "client-metadata")
    assert [(r["state"], r["recorded"]) for r in cancelled["requests"]] == [("finished", False)]
    run.json("backfill-request", "backfill", "resume")

    # Finalized: nothing outstanding; reruns are no-ops with their own shapes.
    finalized = run.json("upgrade", "upgrade")
    assert {d["to"] for d in finalized["databases"]} == {backfilled["status"]["head"]}
    done = run.every_reader(backend)
    assert done["status"]["outstanding"] is False
    _observe_on_control(settings)
    observed = {d["database"]: d["enforcement"] for d in run.json("status", "status")["databases"]}
    assert observed["shard"] is None  # 0007 follows the application table: not routed there
    [seen] = observed["control"]["checks"]["refresh_reuse"]["applications"]
    assert (seen["client_id"], seen["count"]) == ("observed-client", 2)
    assert observed["control"]["checks"]["pkce_required"]["applications"] == []
    assert run.json("upgrade", "upgrade")["databases"][0]["steps"] == []
    assert {j["status"] for j in run.json("backfill", "backfill")["jobs"]} == {"up-to-date"}
    if backend == "postgresql":
        run.json("downgrade", "downgrade", "--to", "0003", "--dry-run")

    # Pruning for real, then a database that fails: its error, every other key null.
    pruned = run.json("prune-grants", "prune-grants", "--batch", "7")
    [control] = pruned["databases"]
    assert control["deleted"] == done["prune-dry"]["databases"][0]["deleted"]
    assert control["consumed_deleted"] == 0
    # Everything applied by now: stamp head records nothing and says so per database.
    stamped = run.json("stamp", "stamp", "head")
    assert all(d["stamped"] == [] for d in stamped["databases"])
    verified = run.json("verify", "verify")
    assert verified and all(d["passed"] for d in verified)
    contracted = run.json("contract", "contract", "--since", "2000-01-01T00:00:00Z")
    assert {d["database"] for d in contracted} == {d["database"] for d in verified}

    _exec(settings, "control", f"DROP TABLE {settings.tables.grant}")
    [lost] = run.json("prune-grants", "prune-grants", "--dry-run", code=2)["databases"]
    assert lost["error"] and lost["deleted"] is None

    expected = {p.name.removesuffix(".schema.json") for p in schemas_dir().glob("*.json")}
    if backend == "sqlite":
        expected.discard("downgrade-sql")
    assert run.validated == expected - NOT_A_COMMAND


def _object_schemas(node: Any, where: str = "") -> Iterator[tuple[str, dict[str, Any]]]:
    if isinstance(node, dict):
        if "properties" in node and node.get("type") == "object":
            yield where or "<root>", node
        for key, value in node.items():
            yield from _object_schemas(value, f"{where}/{key}")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _object_schemas(value, f"{where}/{i}")


@pytest.mark.parametrize("path", sorted(schemas_dir().glob("*.json")), ids=lambda p: p.name)
def test_each_schema_is_a_valid_strict_draft_2020_12_schema(path: Path) -> None:
    schema = json.loads(path.read_text())
    assert schema["$schema"] == DRAFT
    assert path.name.endswith(".schema.json") and schema["$id"].endswith(f"/{path.name}")
    jsonschema.Draft202012Validator.check_schema(schema)
    assert schema.get("title") and schema.get("description")
    # Every object with named properties is closed and requires all of them: a renamed,
    # dropped or added key is a schema change, made on purpose.
    objects = list(_object_schemas(schema))
    assert objects, "no object shapes"
    for where, node in objects:
        assert node.get("additionalProperties") is False, where
        assert sorted(node["required"]) == sorted(node["properties"]), where


def _json_commands(group: click.Group, prefix: str = "") -> dict[str, set[str]]:
    """Command path ("backfill pause") -> the options among VARIANTS it has, for every
    command whose --format offers json, subcommands of groups included."""
    found: dict[str, set[str]] = {}
    for name, command in group.commands.items():
        path = f"{prefix}{name}"
        options = [p for p in command.params if isinstance(p, click.Option)]
        if any(
            "--format" in p.opts and isinstance(p.type, click.Choice) and "json" in p.type.choices
            for p in options
        ):
            found[path] = {opt for p in options for opt in p.opts if opt in VARIANTS}
        if isinstance(command, click.Group):
            found |= _json_commands(command, f"{path} ")
    return found


def _schema_names(commands: dict[str, set[str]]) -> set[str]:
    """The schemas the commands need: one each (SHARED or "a-b"), one per variant option."""
    names: set[str] = set()
    for path, variants in commands.items():
        base = SHARED.get(path, path.replace(" ", "-"))
        names |= {base} | {f"{base}-{VARIANTS[opt]}" for opt in variants}
    return names


def test_the_walk_finds_subcommands_and_variants() -> None:
    commands = _json_commands(cli)
    assert {"backfill pause", "backfill resume", "backfill cancel"} <= set(commands)
    assert commands["backfill"] == {"--report"} and commands["upgrade"] == {"--sql"}
    assert {"backfill-request", "backfill-report", "upgrade-sql"} <= _schema_names(commands)


def test_every_command_with_json_output_has_a_schema() -> None:
    commands = _json_commands(cli)
    assert {"status", "upgrade", "downgrade", "backfill", "history"} <= set(commands)
    assert set(SHARED) <= set(commands), "SHARED names a command that does not exist"
    wanted = _schema_names(commands)
    shipped = {p.name.removesuffix(".schema.json") for p in schemas_dir().glob("*.json")}
    assert wanted <= shipped, f"no schema for: {sorted(wanted - shipped)}"
    assert shipped - wanted == NOT_A_COMMAND, f"schemas of no command: {sorted(shipped - wanted)}"
