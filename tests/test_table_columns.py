"""Shared reflection (``status --summary``): tables reflected once answer as a fresh
reflection does, older tables (without later columns) and missing ones included."""

from __future__ import annotations

from typing import Any

from sqlalchemy import create_engine, event, text

from oauthmig.rollout.batches import BATCH_TABLE, ensure_batch_table, read_history
from oauthmig.rollout.job_state import JOB_TABLE, ensure_job_table, read_job
from oauthmig.table_columns import has_table, shared_reflection, table_columns
from oauthmig.version_tables import LOG_TABLE, VERSION_TABLE, read_log
from tests.helpers.databases import DatabaseFactory


def test_shared_reflection_answers_as_fresh_reflection_on_older_tables(
    make_database: DatabaseFactory,
) -> None:
    engine = create_engine(make_database("control"))
    try:
        with engine.connect() as conn:
            ensure_job_table(conn)
            ensure_batch_table(conn)
            with conn.begin():
                for col in ("owner", "generation", "version"):  # a job table from version 1
                    conn.execute(text(f"ALTER TABLE {JOB_TABLE} DROP COLUMN {col}"))
                conn.execute(text(f"ALTER TABLE {BATCH_TABLE} DROP COLUMN pace"))  # pre issue 24
                conn.execute(
                    text(
                        f"INSERT INTO {JOB_TABLE} (job, table_name, status, phase, cursor, "
                        "upper_bound, rows_done, rows_total, batches, batch_size, attempts, "
                        "started_at, updated_at) VALUES ('j', 't', 'running', 'main', 7, 9, "
                        "3, 9, 1, 5, 0, CURRENT_TIMESTAMP, CURRENT_TIMESTAMP)"
                    )
                )
            tables = [VERSION_TABLE, LOG_TABLE, JOB_TABLE, BATCH_TABLE]
            fresh = {t: table_columns(conn, t) for t in tables}
            reads = (read_job(conn, "j"), read_log(conn), read_history(conn, "j"))
            assert fresh[VERSION_TABLE] is None and fresh[LOG_TABLE] is None
            assert "owner" not in (fresh[JOB_TABLE] or {"owner"})
            assert "pace" not in (fresh[BATCH_TABLE] or {"pace"})
            with shared_reflection(conn, tables):
                statements: list[str] = []

                def seen(*args: Any) -> None:
                    statements.append(args[2])

                event.listen(engine, "before_cursor_execute", seen)
                assert {t: table_columns(conn, t) for t in tables} == fresh
                assert [has_table(conn, t) for t in tables] == [False, False, True, True]
                event.remove(engine, "before_cursor_execute", seen)
                assert statements == []  # answered from the one reflection
                assert (read_job(conn, "j"), read_log(conn), read_history(conn, "j")) == reads
            assert not conn.info.get("oauthmig.table_columns")
        job = reads[0]
        assert job is not None and job.cursor == 7 and job.rows_done == 3
    finally:
        engine.dispose()
