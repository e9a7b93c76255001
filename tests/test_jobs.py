"""The backfill job table read as typed progress, on real SQLite and PostgreSQL databases."""

from __future__ import annotations

import datetime as dt

import pytest
from sqlalchemy import Column, MetaData, Table, insert, update

from oauthmig.config import settings_from_mapping
from oauthmig.db import make_engine
from oauthmig.errors import SchemaStateError
from oauthmig.rollout.job_state import (
    JOB_TABLE,
    JobPhase,
    JobProgress,
    RunEnd,
    StoredStatus,
    ensure_job_table,
    job_table,
    read_job,
)
from tests.helpers.databases import DatabaseFactory

LATER = ("owner", "generation", "version")
WHEN = dt.datetime(2025, 1, 2, 3, 4, 5, tzinfo=dt.UTC)


def _older_job_table() -> Table:
    """The job table as versions before ``owner``, ``generation`` and ``version`` made it."""
    return Table(
        JOB_TABLE,
        MetaData(),
        *(
            Column(c.name, c.type, primary_key=c.primary_key, nullable=c.nullable)
            for c in job_table.c
            if c.name not in LATER
        ),
    )


def test_progress_reads_from_an_older_job_table_and_after_it_is_extended(
    make_database: DatabaseFactory,
) -> None:
    settings = settings_from_mapping(
        {"databases": {"main": {"url": make_database("main")}}}, {}, "t"
    )
    engine = make_engine(settings.databases["main"], settings, create=True)
    older = _older_job_table()
    row = {
        "job": "token-families",
        "table_name": "sentry_apitoken",
        "status": "paused",
        "phase": "catchup",
        "cursor": 4_000_000_000,  # past 32 bits: bigint columns
        "upper_bound": 4_000_000_500,
        "rows_done": 1200,
        "rows_total": 1500,
        "batches": 12,
        "batch_size": 100,
        "attempts": 2,
        "last_error": None,
        "started_at": WHEN,
        "updated_at": WHEN,
        "finished_at": None,
    }
    try:
        with engine.begin() as conn:
            older.create(conn)
            conn.execute(insert(older).values(**row))
        with engine.connect() as conn:
            progress = read_job(conn, "token-families")
            assert read_job(conn, "client-metadata") is None
            ensure_job_table(conn)
            extended = read_job(conn, "token-families")
    finally:
        engine.dispose()
    assert isinstance(progress, JobProgress)
    assert progress.status is StoredStatus.PAUSED and progress.phase is JobPhase.CATCHUP
    assert (progress.cursor, progress.upper_bound) == (4_000_000_000, 4_000_000_500)
    assert (progress.rows_done, progress.rows_total, progress.batches) == (1200, 1500, 12)
    assert (progress.owner, progress.generation, progress.version) == (None, None, None)
    assert progress.values(["status", "phase", "rows_done"]) == {
        "status": "paused",
        "phase": "catchup",
        "rows_done": 1200,
    }
    assert extended == progress  # the added columns are NULL on the existing row


def test_an_unknown_stored_status_is_a_one_line_error(make_database: DatabaseFactory) -> None:
    settings = settings_from_mapping(
        {"databases": {"main": {"url": make_database("main")}}}, {}, "t"
    )
    engine = make_engine(settings.databases["main"], settings, create=True)
    try:
        with engine.connect() as conn:
            ensure_job_table(conn)
            with conn.begin():
                conn.execute(
                    insert(job_table).values(
                        job="client-metadata",
                        table_name="sentry_apiapplication",
                        status="running",
                        phase="main",
                        cursor=0,
                        upper_bound=10,
                        rows_done=0,
                        rows_total=10,
                        batches=0,
                        batch_size=10,
                        attempts=0,
                        started_at=WHEN,
                        updated_at=WHEN,
                    )
                )
            progress = read_job(conn, "client-metadata")
            assert progress is not None and progress.status is StoredStatus.RUNNING
            # The derived states are never stored; a value no version wrote is refused.
            for bad in (RunEnd.UP_TO_DATE.value, "exploded"):
                with conn.begin():
                    conn.execute(update(job_table).values(status=bad))
                with pytest.raises(SchemaStateError) as refused:
                    read_job(conn, "client-metadata")
                assert f"job 'client-metadata' has status {bad!r}" in refused.value.message
                assert "--restart" in refused.value.message
    finally:
        engine.dispose()
