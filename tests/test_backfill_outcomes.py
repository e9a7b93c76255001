"""How a backfill run ends, as its exit code and its ``--metrics-file`` say (issue 22 §4).

Exit 0 means every selected job is finished (or held by a pause request, which a CI loop must
not spin on); exit 3 means ``--max-runtime`` stopped a job with rows left (run it again);
exit 2 a failure or a cancelled job. The metrics file is written on every way a run ends, and
never keeps saying ``running`` afterwards.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from oauthmig.config import settings_from_mapping
from oauthmig.db import connect, make_engine
from oauthmig.demo.data import setup_legacy
from oauthmig.output.metrics import STATES
from oauthmig.runlock import exclusive_run
from tests.helpers import invoke, write_config
from tests.helpers.databases import DatabaseFactory, routed_config
from tests.test_health import _value, parse_metrics

JOB = "token-families"


@pytest.fixture
def installed(
    make_database: DatabaseFactory, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> tuple[str, str]:
    data = routed_config(make_database("control"), make_database("shard"))
    settings = settings_from_mapping(data, {}, "test")
    setup_legacy(settings, apps=20, tokens=300, seed=3)
    cfg = write_config(tmp_path / "oauthmig.toml", data)
    assert invoke(capsys, "--config", cfg, "upgrade").code == 0
    return cfg, data["databases"]["control"]["url"]  # type: ignore[index]


def _states(prom: Path, **labels: str) -> dict[str, Any]:
    families = parse_metrics(prom.read_text())
    states = {s: _value(families, "state", state=s, **labels) for s in STATES}
    assert sum(v or 0 for v in states.values()) == 1, states
    return {
        "state": next(s for s, v in states.items() if v == 1),
        "running": _value(families, "running", **labels),
        "failed": _value(families, "failed", **labels),
        "finished": _value(families, "finished", **labels),
        "rows_left": _value(families, "rows_left", **labels),
    }


def test_every_way_a_run_ends(
    installed: tuple[str, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg, _ = installed
    prom = tmp_path / "backfill.prom"
    one = ["--config", cfg, "-d", "control"]
    metrics = ["--metrics-file", str(prom)]

    # --max-runtime with rows left: exit 3, state paused, not running, rows left.
    slow = ["--batch", "10", "--sleep", "3600", "--max-runtime", "2"]
    ran = invoke(capsys, *one, "backfill", JOB, *slow, *metrics)
    assert ran.code == 3, ran.err
    assert ran.err.strip().splitlines()[-1].startswith("unfinished: --max-runtime stopped")
    got = _states(prom, job=JOB, database="control")
    assert got["state"] == "paused" and got["running"] == 0 and got["failed"] == 0
    assert (got["rows_left"] or 0) > 0 and got["finished"] == 0

    # Another run holds the lock: skipped, exit 0; the holder's samples describe the job.
    settings = settings_from_mapping({"databases": {"control": {"url": installed[1]}}}, {}, "test")
    db = settings.databases["control"]
    engine = make_engine(db, settings)
    try:
        with connect(engine, db) as conn, exclusive_run(conn, db, f"backfill {JOB}"):
            busy = invoke(capsys, *one, "backfill", JOB, *metrics)
    finally:
        engine.dispose()
    assert busy.code == 0, busy.err
    assert "skipped: held by another runner" in busy.out
    assert _states(prom, job=JOB, database="control") == got  # this run wrote no sample

    # A pause request: exit 0 (a CI loop must not spin on it), state paused.
    assert invoke(capsys, *one, "backfill", "pause", JOB).code == 0
    paused = invoke(capsys, *one, "backfill", JOB, *metrics)
    assert paused.code == 0, paused.err
    assert _states(prom, job=JOB, database="control")["state"] == "paused"
    assert invoke(capsys, *one, "backfill", "resume", JOB).code == 0

    # A cancel request: exit 2, state cancelled, counted as failed.
    assert invoke(capsys, *one, "backfill", "cancel", JOB).code == 0
    cancelled = invoke(capsys, *one, "backfill", JOB, *metrics)
    assert cancelled.code == 2, cancelled.err
    got = _states(prom, job=JOB, database="control")
    assert got["state"] == "cancelled" and got["failed"] == 1 and got["running"] == 0

    # Run to the end: exit 0, finished, nothing left; a later run: up to date, exit 0.
    done = invoke(capsys, *one, "backfill", JOB, "--restart", *metrics, "--format", "json")
    assert done.code == 0, done.err
    assert json.loads(done.out)["jobs"][0]["status"] == "finished"
    got = _states(prom, job=JOB, database="control")
    assert got["state"] == "finished" and got["rows_left"] == 0 and got["failed"] == 0
    again = invoke(capsys, *one, "backfill", JOB, "--max-runtime", "600", *metrics)
    assert again.code == 0, again.err
    assert _states(prom, job=JOB, database="control")["state"] == "up-to-date"
