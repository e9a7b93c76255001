"""``status`` never shows an impossible number (issue 22 §4).

On a PostgreSQL table the planner has no statistics for (never analyzed: ``reltuples = -1``)
with sparse ids, the estimate of rows left used to be the id span (twice the rows); after
progress, done + left exceeded the total. Now: left <= total, done + left <= total, and the
JSON says what the estimate came from.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text

from oauthmig.config import settings_from_mapping
from oauthmig.db import make_engine
from oauthmig.rollout.backfill import BackfillOptions, backfill
from tests.helpers import assert_matches_schema, invoke, write_config
from tests.helpers.databases import DatabaseFactory, create_legacy

ROWS = 16_000  # ids 2, 4, ..., 32000: the id span is twice the rows
STEP = 2


def _job(doc: dict[str, Any]) -> dict[str, Any]:
    (database,) = doc["databases"]
    return next(j for j in database["backfills"] if j["job"] == "token-families")


def _assert_possible(job: dict[str, Any]) -> None:
    assert job["remaining"] is not None and job["rows_total"] is not None, job
    assert 0 <= job["remaining"] <= job["rows_total"], job
    assert job["rows_done"] + job["remaining"] <= job["rows_total"], job
    assert job["remaining"] <= ROWS * STEP, job  # at most the ids above the cursor


@pytest.mark.parametrize("backend", ["postgresql"], indirect=True)
def test_never_analyzed_sparse_table_gets_a_possible_estimate(
    make_database: DatabaseFactory, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url = make_database("main")
    data: dict[str, Any] = {"databases": {"main": {"url": url}}}
    settings = settings_from_mapping(data, {}, "test")
    cfg = write_config(tmp_path / "oauthmig.toml", data)
    create_legacy(settings)
    t = settings.tables.token
    engine = make_engine(settings.databases["main"], settings)
    try:
        with engine.begin() as conn:
            # No autovacuum: the table stays never analyzed whatever the machine does.
            conn.execute(text(f"ALTER TABLE {t} SET (autovacuum_enabled = false)"))
            conn.execute(
                text(
                    f"INSERT INTO {t} (id, user_id, token, hashed_token, refresh_token, "
                    "scope_list, date_added, scopes) "
                    "SELECT g * :step, 1 + g % 1000, 'tok-' || g, 'htok-' || g, 'ref-' || g, "
                    "'{}', now(), 0 FROM generate_series(1, :rows) AS g"
                ),
                {"rows": ROWS, "step": STEP},
            )
        assert invoke(capsys, "--config", cfg, "-q", "upgrade").code == 0
        with engine.connect() as conn:
            reltuples = conn.execute(
                text("SELECT reltuples FROM pg_class WHERE oid = to_regclass(:t)"), {"t": t}
            ).scalar_one()
        assert reltuples < 0  # what the issue saw: never analyzed

        status = invoke(capsys, "--config", cfg, "status", "--format", "json")
        doc = json.loads(status.out)
        assert_matches_schema("status", doc)
        job = _job(doc)
        assert job["state"] == "not started" and job["estimate"] is True
        assert job["estimate_basis"] == "probe"
        _assert_possible(job)
        assert abs(job["remaining"] - ROWS) <= ROWS * 0.05, job
        text_status = invoke(capsys, "--config", cfg, "status").out
        assert "the table was never analyzed" in text_status

        # After some progress (stopped after a few batches): still possible.
        seen: list[int] = []

        def progress(_label: str, done: int, _total: int, _note: str | None, /) -> None:
            seen.append(done)
            if len(seen) >= 3:
                stop.set()

        stop = threading.Event()
        result = backfill(
            settings, ["token-families"], BackfillOptions(batch_size=500), progress, stop
        )
        (run,) = result.runs
        assert run.status == "paused" and 0 < run.rows_changed < ROWS, run
        doc = json.loads(invoke(capsys, "--config", cfg, "status", "--format", "json").out)
        assert_matches_schema("status", doc)
        job = _job(doc)
        _assert_possible(job)
        assert job["rows_done"] == run.rows_changed
        assert abs(job["remaining"] - (ROWS - run.rows_changed)) <= ROWS * 0.05, job

        exact = json.loads(
            invoke(capsys, "--config", cfg, "status", "--exact", "--format", "json").out
        )
        counted = _job(exact)
        assert counted["estimate"] is False and counted["estimate_basis"] is None
        assert counted["remaining"] == ROWS - run.rows_changed
    finally:
        engine.dispose()
