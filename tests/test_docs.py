"""Docs stay true: the example config parses to the defaults, the README names every command."""

from __future__ import annotations

from pathlib import Path

from oauthmig.config import (
    ENFORCEMENT_DEFAULTS,
    AuditSettings,
    BackfillSettings,
    MigrateSettings,
    TableNames,
    load_settings,
)

ROOT = Path(__file__).resolve().parent.parent


def test_config_example_is_valid_and_shows_defaults(tmp_path: Path) -> None:
    env = {"SHARD_EU_DATABASE_URL": "postgresql://oauth:pw@db-eu:5432/sentry"}
    settings = load_settings(str(ROOT / "config.example.toml"), env, tmp_path)
    assert settings.database_names() == ("control", "shard_eu")
    assert settings.routing == {
        "application": ("control",),
        "grant": ("control",),
        "token": ("control", "shard_eu"),
    }
    assert settings.tables == TableNames()
    assert settings.migrate == MigrateSettings()
    assert settings.backfill == BackfillSettings()
    assert settings.audit == AuditSettings()
    assert settings.enforcement.modes == ENFORCEMENT_DEFAULTS  # every check, at its default
    assert settings.enforcement.clients == {}
    assert (
        settings.databases["shard_eu"].display_url
        == "postgresql+psycopg://oauth:***@db-eu:5432/sentry"
    )


def test_readme_documents_every_command_and_the_two_start_commands() -> None:
    from oauthmig.cli import cli

    readme = (ROOT / "README.md").read_text()
    for name in cli.commands:
        assert f"oauthmig {name}" in readme, name
    assert "make demo" in readme and "make test" in readme
    ci = [
        line
        for line in (ROOT / ".ci" / "run").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    # CI runs the README's command and nothing else: make test sets up its own components.
    assert ci[-1] == "make test" and not any("apt-get" in line for line in ci), ci
    makefile = (ROOT / "Makefile").read_text()
    assert "\tscripts/test-components\n" in makefile.split("\ntest:", 1)[1].split("\n\n")[0]
    setup = (ROOT / "scripts" / "test-components").read_text()
    for needed in ("[chromium]=chromium", "[pgbouncer]=pgbouncer", "pg_ctlcluster"):
        assert needed in setup, needed


def _privileges_table() -> str:
    """The table of docs/operations.md "Privileges each command needs", from the code's."""
    from oauthmig.privileges import COMMAND_PRIVILEGES, SCHEMA, Privilege

    lines = ["| command | needs, per object |", "| --- | --- |"]
    for command, needs in COMMAND_PRIVILEGES.items():
        cells = []
        for need in needs:
            where = "the schema" if need.target == SCHEMA else f"`{need.target}`"
            what = ", ".join(
                "ownership" if p is Privilege.OWNER else str(p) for p in need.privileges
            )
            cells.append(f"{where}: {what}{' (creates it)' if need.creates else ''}")
        lines.append(f"| `{command}` | {'; '.join(cells)} |")
    return "\n".join(lines) + "\n"


def test_operations_lists_the_privileges_the_code_checks() -> None:
    doc = (ROOT / "docs" / "operations.md").read_text()
    section = doc.split("\n## Privileges each command needs\n", 1)[1].split("\n## ", 1)[0]
    assert _privileges_table() in section, _privileges_table()
