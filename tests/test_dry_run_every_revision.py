"""``--dry-run`` of every revision, in both directions, from every state, on both backends.

A dry run goes through the same revision code as a real run (Alembic's offline mode, reading
the database): each one must exit 0 with its JSON document, and change nothing at all.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from oauthmig.config import settings_from_mapping
from oauthmig.rollout.revisions import Catalogue
from tests.helpers import (
    assert_matches_schema,
    data_checksum,
    invoke,
    schema_dump,
    seed_legacy,
    write_config,
)
from tests.helpers.databases import DatabaseFactory, create_legacy, routed_config


def test_every_dry_run_from_every_state(
    make_database: DatabaseFactory, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = routed_config(make_database("control"), make_database("shard"))
    settings = settings_from_mapping(data, {}, "test")
    create_legacy(settings)
    seed_legacy(settings)
    cfg = write_config(tmp_path / "oauthmig.toml", data)
    states = ["base", *(r.revision for r in Catalogue.load().revisions)]
    assert len(states) >= 7
    # States before this one cannot run the backfills (their columns do not exist yet).
    gate = next(i for i, r in enumerate(Catalogue.load().revisions, 1) if r.requires_backfills)
    tried = refused = 0
    for i, state in enumerate(states):
        if i > 0:
            rev = Catalogue.load().revisions[i - 1]
            if rev.requires_backfills:
                done = invoke(capsys, "--config", cfg, "backfill")
                assert done.code == 0, done.err
            up = invoke(capsys, "--config", cfg, "upgrade", "--to", state)
            assert up.code == 0, up.err
        schema, rows = schema_dump(settings), data_checksum(settings)
        for j, target in enumerate(states):
            if j == i:
                continue
            command = "upgrade" if j > i else "downgrade"
            # Every pair as JSON (schema-checked); the text rendering for neighbouring states.
            for fmt in ("json", "text") if abs(j - i) == 1 else ("json",):
                done = invoke(
                    capsys, "--config", cfg, command, "--to", target, "--dry-run", "--format", fmt
                )
                where = f"{command} --to {target} --dry-run from {state} ({fmt})"
                assert "Traceback" not in done.err, where
                gated = command == "upgrade" and i < gate <= j
                if gated:  # documented: the plan stops at a revision whose backfills wait
                    refused += fmt == "json"
                    assert done.code == 2, (where, done.err)
                    assert "requires backfill" in done.err, (where, done.err)
                    assert len(done.err.strip().splitlines()) == 1, (where, done.err)
                    continue
                assert done.code == 0, (where, done.err)
                if fmt == "json":
                    tried += 1
                    document = json.loads(done.out)
                    assert_matches_schema(command, document)
                    assert document["dry_run"] is True
        assert schema_dump(settings) == schema, state
        assert data_checksum(settings) == rows, state
    assert tried + refused == len(states) * (len(states) - 1) and tried > refused
