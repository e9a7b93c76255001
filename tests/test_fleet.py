"""The fleet: ``[waves]``, ``--part I/N``, runners that skip what another runner holds, and
``status --summary`` (on real SQLite and PostgreSQL; many runners as real processes)."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text

from oauthmig.config import Settings, settings_from_mapping
from oauthmig.db import make_engine
from oauthmig.errors import ConfigError, UsageError
from oauthmig.rollout.batches import BATCH_TABLE
from oauthmig.rollout.fleet import Part, parse_part, part_of, select
from oauthmig.rollout.revisions import LOG_TABLE, VERSION_TABLE, history
from tests.forkserver import ForkServer
from tests.helpers import assert_matches_schema, invoke, seed_legacy, write_config
from tests.helpers.databases import DatabaseFactory, create_legacy

HEAD = history()[-1].revision
REVISIONS = [r.revision for r in history()]
ROWS = 12  # legacy rows per table: tokens with a refresh token are i % 4 != 0


def _expected_rows(settings: Settings, name: str) -> dict[str, int]:
    routed = settings.tables_on(name)
    out = {"token-families": sum(1 for i in range(1, ROWS + 1) if i % 4)}
    if "application" in routed:
        out["client-metadata"] = ROWS
    return out


def _fleet(
    make_database: DatabaseFactory, tmp_path: Path, count: int, waves: dict[str, Any] | None
) -> tuple[Settings, str]:
    """``count`` databases with legacy rows: the first two host every table, the others only
    ``token`` (two table sets), under ``[waves]`` when given."""
    names = [f"db{i:02d}" for i in range(count)]
    data: dict[str, Any] = {
        "databases": {n: {"url": make_database(n)} for n in names},
        "routing": {"application": names[:2], "grant": names[:2], "token": names},
        "migrate": {"lock_timeout": "2s", "lock_retries": 2, "statement_timeout": "30s"},
    }
    if waves:
        data["waves"] = waves
    settings = settings_from_mapping(data, {}, "test")
    create_legacy(settings)
    seed_legacy(settings, rows=ROWS)
    return settings, write_config(tmp_path / "oauthmig.toml", data)


def _query(settings: Settings, name: str, sql: str) -> list[Any]:
    engine = make_engine(settings.databases[name], settings)
    try:
        with engine.connect() as conn:
            return list(conn.execute(text(sql)))
    finally:
        engine.dispose()


def _version(settings: Settings, name: str) -> str | None:
    engine = make_engine(settings.databases[name], settings)
    try:
        with engine.connect() as conn:
            if not conn.dialect.has_table(conn, VERSION_TABLE):
                return None
            return conn.execute(text(f"SELECT version_num FROM {VERSION_TABLE}")).scalar()
    finally:
        engine.dispose()


def _assert_done_once(settings: Settings, names: Sequence[str]) -> None:
    """Each database at head, every revision logged once as applied or skipped, and each
    backfill's batches written by one run whose rows add up to the rows that needed it."""
    for name in names:
        assert _version(settings, name) == HEAD, name
        log = _query(settings, name, f"SELECT revision, outcome FROM {LOG_TABLE}")
        assert sorted(r for r, _ in log) == REVISIONS, name
        assert {o for _, o in log} <= {"applied", "skipped"}, (name, log)
        batches = _query(
            settings,
            name,
            f"SELECT job, count(DISTINCT run_id), sum(rows_changed) FROM {BATCH_TABLE} "
            "WHERE outcome <> 'failed' GROUP BY job",
        )
        got = {job: (runs, int(rows)) for job, runs, rows in batches}
        want = {job: (1, rows) for job, rows in _expected_rows(settings, name).items()}
        assert got == want, name


# --------------------------------------------------------------------------- parts and waves


def test_parts_are_deterministic_balanced_and_cover_the_selection_once() -> None:
    names = [f"eu-{i}" for i in range(16)] + ["control"]
    shares = [part_of(names, Part(i, 4)) for i in range(1, 5)]
    assert sorted(n for share in shares for n in share) == sorted(names)
    assert {len(share) for share in shares} <= {4, 5}
    # The same on every host and run (SHA-256 of the name, not the salted hash()); in the
    # selection's order; independent of the order the names come in.
    assert part_of(names, Part(2, 4)) == ("eu-1", "eu-9", "eu-10", "control")
    assert part_of(list(reversed(names)), Part(2, 4)) == tuple(reversed(shares[1]))
    assert part_of(names, Part(1, 1)) == tuple(names)


@pytest.mark.parametrize(
    ("given", "says"),
    [
        ("0/4", "I must be from 1 to N"),
        ("5/4", "I must be from 1 to N"),
        ("1/0", "I must be from 1 to N"),
        ("2", "expected I/N"),
        ("a/b", "expected I/N"),
    ],
)
def test_a_bad_part_is_a_usage_error_naming_the_form(given: str, says: str) -> None:
    with pytest.raises(UsageError, match=says) as refused:
        parse_part(given)
    assert "JOB_COMPLETION_INDEX + 1" in refused.value.message
    assert parse_part(" 3 / 4 ") == Part(3, 4)


def _config(waves: object) -> dict[str, Any]:
    return {
        "databases": {n: {"url": f"sqlite:///{n}.sqlite3"} for n in ("a", "b", "c", "d")},
        "routing": {"application": ["a"], "grant": ["a"], "token": ["a", "b", "c", "d"]},
        "waves": waves,
    }


def test_waves_are_ordered_and_the_rest_is_implied() -> None:
    settings = settings_from_mapping(_config({"canary": ["b"], "ring1": ["d", "a"]}), {}, "t")
    assert [(w.name, w.databases, w.implied) for w in settings.waves] == [
        ("canary", ("b",), False),
        ("ring1", ("d", "a"), False),
        ("rest", ("c",), True),
    ]
    chosen = select(settings, (), "ring1", None)
    assert chosen.names == ("a", "d") and [w.name for w in chosen.earlier] == ["canary"]
    assert chosen.settings is not None and chosen.settings.database_names() == ("a", "d")
    # -d narrows a wave; a part of fewer databases than parts may be empty.
    assert select(settings, ("a", "b"), "ring1", None).names == ("a",)
    assert select(settings, (), "canary", Part(2, 2)).settings is None
    every = settings_from_mapping(_config({"one": ["a", "b"], "two": ["c", "d"]}), {}, "t")
    assert [w.name for w in every.waves] == ["one", "two"]  # nothing left: no implied wave


@pytest.mark.parametrize(
    ("waves", "says"),
    [
        ({"canary": ["zz"]}, "waves.canary: unknown database 'zz'"),
        ({"canary": ["a"], "ring1": ["b", "a"]}, "waves.ring1: database 'a' is already in"),
        ({"rest": ["a"]}, "waves.rest: the name 'rest' is reserved"),
        ({"canary": []}, "waves.canary: a wave lists at least one database"),
        ({"canary": 3}, "waves.canary: expected a list of strings"),
        (["a"], "waves: expected a table"),
    ],
)
def test_bad_waves_are_config_errors_naming_the_key(waves: object, says: str) -> None:
    with pytest.raises(ConfigError, match=says):
        settings_from_mapping(_config(waves), {}, "t")


def test_wave_and_part_are_refused_with_one_line_when_they_select_nothing_usable(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = write_config(tmp_path / "oauthmig.toml", _config({"canary": ["b"]}))
    nowave = invoke(capsys, "--config", cfg, "upgrade", "--wave", "ring9")
    assert nowave.code == 2 and "--wave ring9: no such wave (waves, in order: canary, rest)" in (
        nowave.err
    )
    bad = invoke(capsys, "--config", cfg, "backfill", "--part", "0/2")
    assert bad.code == 2 and "I must be from 1 to N" in bad.err and "Traceback" not in bad.err
    empty = invoke(capsys, "--config", cfg, "upgrade", "--wave", "canary", "--part", "2/2")
    assert empty.code == 0 and "nothing to do: wave canary, part 2/2 selects no database" in (
        empty.out
    )
    assert not list(tmp_path.glob("*.sqlite3"))  # nothing was opened, let alone written


def test_waves_gate_each_other_and_parts_split_them(
    make_database: DatabaseFactory,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    backend: str,
) -> None:
    waves = {"canary": ["db00"], "ring1": ["db01", "db02", "db03"]}
    settings, cfg = _fleet(make_database, tmp_path, 5, waves)

    def cli(*args: str) -> Any:
        return invoke(capsys, "--config", cfg, *args)

    # Nothing ran on the canary yet: ring1 refuses in one line naming it, and writes nothing.
    early = cli("upgrade", "--wave", "ring1")
    assert early.code == 2 and early.err.count("\n") == 1, early.err
    assert (
        f"wave ring1 cannot start: database 'db00' of wave canary is at base, not at {HEAD}"
        in early.err
    )
    assert all(_version(settings, n) is None for n in ("db01", "db02", "db03", "db04"))

    # A failed canary: its token backfill fails (a trigger refuses the UPDATEs).
    refuse: tuple[str, ...] = (
        "CREATE FUNCTION refuse() RETURNS trigger AS $$ BEGIN RAISE EXCEPTION 'refused'; "
        "END $$ LANGUAGE plpgsql",
        f"CREATE TRIGGER refuse BEFORE UPDATE ON {settings.tables.token} FOR EACH ROW "
        "EXECUTE FUNCTION refuse()",
    )
    if backend == "sqlite":
        refuse = (
            f"CREATE TRIGGER refuse BEFORE UPDATE ON {settings.tables.token} "
            "BEGIN SELECT RAISE(ABORT, 'refused'); END",
        )
    engine = make_engine(settings.databases["db00"], settings)
    with engine.begin() as conn:
        for statement in refuse:
            conn.execute(text(statement))
    assert cli("upgrade", "--wave", "canary").code == 0
    assert cli("backfill", "--wave", "canary").code == 2
    stopped = cli("upgrade", "--wave", "ring1")
    assert stopped.code == 2 and "database 'db00' of wave canary" in stopped.err
    assert "backfill token-families failed" in stopped.err
    assert all(_version(settings, n) is None for n in ("db01", "db02", "db03"))
    summary = cli("status", "--summary", "--format", "json", "--check")
    assert summary.code == 1
    doc = json.loads(summary.out)
    assert_matches_schema("status-summary", doc)
    assert doc["stragglers"][0]["database"] == "db00"
    assert doc["stragglers"][0]["reason"] == "failed"
    assert [(w["wave"], w["failed"]) for w in doc["waves"]] == [
        ("canary", 1),
        ("ring1", 0),
        ("rest", 0),
    ]

    # Fixed, the canary finishes; ring1 then goes in two parts, and rest waits for it.
    drop = "DROP TRIGGER refuse"
    with engine.begin() as conn:
        conn.execute(text(drop if backend == "sqlite" else f"{drop} ON {settings.tables.token}"))
    engine.dispose()
    assert cli("backfill", "--wave", "canary").code == 0
    assert cli("upgrade", "--wave", "canary").code == 0
    assert cli("upgrade", "--wave", "rest").code == 2  # ring1 is at base
    mine = {i: part_of(("db01", "db02", "db03"), Part(i, 2)) for i in (1, 2)}
    for step in (("upgrade",), ("backfill",), ("upgrade",)):
        for i in (1, 2):
            ran = cli(*step, "--wave", "ring1", "--part", f"{i}/2", "--format", "json")
            assert ran.code == 0, ran.err
            key = "databases" if step[0] == "upgrade" else "jobs"
            assert {d["database"] for d in json.loads(ran.out)[key]} == set(mine[i])
    assert _version(settings, "db04") is None
    assert cli("upgrade", "--wave", "rest").code == 0
    assert cli("backfill", "--wave", "rest").code == 0
    assert cli("upgrade", "--wave", "rest").code == 0
    _assert_done_once(settings, ["db01", "db02", "db03", "db04"])
    done = cli("status", "--summary", "--check")
    assert done.code == 0, done.out
    assert "no stragglers" in done.out
    plain = cli("status", "--format", "json")
    assert [(w["wave"], w["done"], w["databases"]) for w in json.loads(plain.out)["waves"]] == [
        ("canary", 1, 1),
        ("ring1", 3, 3),
        ("rest", 1, 1),
    ]


# --------------------------------------------------------------------------- many runners


def _runner(forkserver: ForkServer, cfg: str, extra: Sequence[str]) -> list[dict[str, Any]]:
    """One CI job or pod: upgrade, backfill, upgrade, each a real process; their JSON."""
    documents = []
    for step in ("upgrade", "backfill", "upgrade"):
        code, out, err = forkserver.run(
            ["--config", cfg, step, *extra, "--format", "json"], timeout=300
        )
        assert code == 0, (step, extra, err)
        assert "Traceback" not in err
        documents.append(json.loads(out))
    return documents


def _each_step_once(
    settings: Settings, documents: list[list[dict[str, Any]]], names: Sequence[str]
) -> None:
    """Across every runner's output: each revision applied (or skipped) on each database by
    one run, each job's rows changed once, and anything else said as skipped."""
    steps: Counter[tuple[str, str]] = Counter()
    rows: Counter[tuple[str, str]] = Counter()
    for upgrade1, backfilled, upgrade2 in documents:
        for doc in (upgrade1, upgrade2):
            for d in doc["databases"]:
                assert d["error"] is None
                for s in d["steps"]:
                    steps[(d["database"], s["revision"])] += 1
                if d["skipped"] is not None:
                    assert d["skipped"]["message"].startswith("skipped: held by another runner")
        for j in backfilled["jobs"]:
            assert j["status"] in ("finished", "up-to-date", "skipped"), j
            rows[(j["database"], j["job"])] += j["rows_changed"]
    assert set(steps.values()) == {1}
    assert {db for db, _rev in steps} == set(names)
    assert all(n == len(REVISIONS) for n in Counter(db for db, _rev in steps).values())
    want = {(n, job): rows for n in names for job, rows in _expected_rows(settings, n).items()}
    assert dict(rows) == want


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["postgresql"], indirect=True)
def test_sixteen_databases_four_runners_by_part_or_overlapping(
    make_database: DatabaseFactory, tmp_path: Path, forkserver: ForkServer
) -> None:
    settings, cfg = _fleet(make_database, tmp_path, 16, None)
    names = settings.database_names()
    with ThreadPoolExecutor(max_workers=4) as pool:
        by_part = list(
            pool.map(lambda i: _runner(forkserver, cfg, ["--part", f"{i}/4"]), range(1, 5))
        )
    _each_step_once(settings, by_part, names)
    _assert_done_once(settings, names)

    # The same fleet from scratch, four runners on all of it at once.
    for name in names:
        engine = make_engine(settings.databases[name], settings)
        with engine.begin() as conn:
            conn.execute(text("DROP SCHEMA public CASCADE"))
            conn.execute(text("CREATE SCHEMA public"))
        engine.dispose()
    create_legacy(settings)
    seed_legacy(settings, rows=ROWS)
    with ThreadPoolExecutor(max_workers=4) as pool:
        overlapping = list(pool.map(lambda _i: _runner(forkserver, cfg, []), range(4)))
    _each_step_once(settings, overlapping, names)
    _assert_done_once(settings, names)


def test_the_summary_shows_an_unreachable_database_as_one_line(
    make_database: DatabaseFactory, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data: dict[str, Any] = {
        "databases": {
            "live": {"url": make_database("live")},
            "gone": {"url": "postgresql+psycopg://oauth@127.0.0.1:1/sentry"},
            "lost": {"url": f"sqlite:///{tmp_path / 'missing' / 'lost.sqlite3'}"},
        },
        "routing": {"application": ["live"], "grant": ["live"], "token": ["live", "gone", "lost"]},
    }
    live = settings_from_mapping({"databases": {"live": data["databases"]["live"]}}, {}, "t")
    create_legacy(live)
    cfg = write_config(tmp_path / "oauthmig.toml", data)
    shown = invoke(capsys, "--config", cfg, "status", "--summary", "--format", "json")
    assert shown.code == 0, shown.err
    doc = json.loads(shown.out)
    assert_matches_schema("status-summary", doc)
    assert {(c["revision"], c["state"], c["databases"]) for c in doc["counts"]} == {
        (None, "pending", 1),
        (None, "unreachable", 2),
    }
    assert [(s["database"], s["reason"]) for s in doc["stragglers"]] == [
        ("gone", "unreachable"),
        ("lost", "unreachable"),
    ]
    assert all(s["detail"].startswith(f"database '{s['database']}'") for s in doc["stragglers"])
    text_view = invoke(capsys, "--config", cfg, "status", "--summary", "--check")
    assert text_view.code == 1 and "Traceback" not in text_view.err
    assert text_view.out.count("unreachable gone:") == 1
